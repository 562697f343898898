# Helpers shared by the tools/*.sh scripts (sourced, not run).

# abs_path P: P as an absolute path when it names one (contains a /; the scripts cd later),
# else P unchanged (a command looked up on PATH, e.g. python3)
abs_path() {
  case $1 in
    */*) echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" ;;
    *) echo "$1" ;;
  esac
}

# config_paths REPO CONFIG...: sets the array CONFIG_PATHS, each CONFIG relative to REPO unless
# it is absolute
config_paths() {
  local repo=$1 c
  shift
  CONFIG_PATHS=()
  for c in "$@"; do
    case $c in /*) CONFIG_PATHS+=("$c") ;; *) CONFIG_PATHS+=("$repo/$c") ;; esac
  done
}

# install_wheels PYTHON SITE WHEEL...: the wheels into SITE with PYTHON's pip, offline (no index,
# no dependency resolution: an offline GPU host reaches no registry), no bytecode
install_wheels() {
  local py=$1 site=$2
  shift 2
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$@"
}
