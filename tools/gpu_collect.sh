#!/usr/bin/env bash
# Finish, here on the CPU, a DAG whose GPU part ran on an offline GPU host (tools/gpu_pipeline.sh).
#
#   bash tools/gpu_collect.sh WORKDIR BUNDLE_DIR [BUNDLE_DIR ...]
#
# Each BUNDLE_DIR is one call's PACK_DIR as it came back (run_info.txt, tables_figures.tar.gz,
# logs.tar.gz, embeddings.tar.gz or embeddings.tar.gz.part0, .part1, ...). Their results/ trees
# are unpacked into WORKDIR in the order given (a later call's file replaces an earlier one's),
# then Snakemake runs the same Snakefile and configs there with only the rules that need no
# trained model allowed (download, prepare, pca, evaluate, aggregate, the figures): the models'
# embeddings stand as they came, nothing is trained or embedded again, and the cells are
# selected by `prepare` anew (deterministic: same code, same config; evaluate looks every
# embedded cell up by name in the prepared data and stops on one it cannot find). Nothing is
# written into WORKDIR unless every bundle unpacks whole.
#
# Environment (all optional): COLLECT_CONFIGS (config files, default configs/shared_data.yaml
# configs/h200_run.yaml, relative to the repository), COLLECT_CORES (nproc), COLLECT_EXTRA (more
# snakemake arguments, e.g. "--config data_dir=/path/to/shared/data"), COLLECT_TARGETS (default:
# the DAG's rule all), PYTHON (python3; snakemake runs as `$PYTHON -m snakemake`, and a PYTHON
# given as a path puts its folder first on PATH, for the rules' `python`).
# Exit status: 2 for bad arguments or an unreadable bundle, else snakemake's.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 2 ]; then
  echo "usage: $0 WORKDIR BUNDLE_DIR [BUNDLE_DIR ...]" >&2
  exit 2
fi
WORKDIR=$1
shift
# shellcheck source=tools/lib.sh
source "$REPO/tools/lib.sh"
PY=$(abs_path "${PYTHON:-python3}")
# a PYTHON given as a path: its folder first on PATH, for the rules' `python`
case $PY in */*) export PATH="$(dirname "$PY"):$PATH" ;; esac
CORES=${COLLECT_CORES:-$(nproc)}
CONFIGS=${COLLECT_CONFIGS:-configs/shared_data.yaml configs/h200_run.yaml}
EXTRA=${COLLECT_EXTRA:-}
TARGETS=${COLLECT_TARGETS:-}

# check every bundle before unpacking any, so a bad one leaves WORKDIR as it was
for dir in "$@"; do
  [ -d "$dir" ] || { echo "gpu_collect: $dir is not a directory" >&2; exit 2; }
  if [ ! -f "$dir/embeddings.tar.gz" ] && [ ! -f "$dir/embeddings.tar.gz.part0" ]; then
    echo "gpu_collect: $dir has no embeddings.tar.gz (or .part0): not a bundle of tools/gpu_pipeline.sh" >&2
    exit 2
  fi
done
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
# Python's tarfile (no tar options that differ between systems); members must stay inside
# (the code goes in by -c: stdin may carry the tarball)
read -r -d '' UNPACK_PY <<'EOF_PY' || true
import sys, tarfile
src, label, dst = sys.argv[1:4]
try:
    if src == "-":
        tar = tarfile.open(fileobj=sys.stdin.buffer, mode="r|gz")
    else:
        tar = tarfile.open(src)
    with tar:
        tar.extractall(dst, filter="data")
except (tarfile.TarError, OSError, EOFError) as exc:
    sys.exit(f"gpu_collect: cannot unpack {label}: {exc} (truncated or not a tarball?)")
EOF_PY
# everything is unpacked into a staging folder first and copied over only once every bundle
# has unpacked whole: a truncated download never leaves half a results/ tree in WORKDIR
STAGE=$(mktemp -d "$WORKDIR/.gpu_collect.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
unpack() { # unpack SOURCE LABEL: a gzip tarball, or "-" for one read from stdin
  "$PY" -c "$UNPACK_PY" "$1" "$2" "$STAGE"
}
for dir in "$@"; do
  for name in tables_figures.tar.gz logs.tar.gz embeddings.tar.gz; do
    if [ -f "$dir/$name" ]; then
      unpack "$dir/$name" "$dir/$name" || exit 2
    fi
  done
  if [ -f "$dir/embeddings.tar.gz.part0" ]; then
    # parts sort by number, not by name (part10 after part9)
    mapfile -t parts < <(printf '%s\n' "$dir"/embeddings.tar.gz.part* | sort -V)
    cat "${parts[@]}" | unpack - "$dir/embeddings.tar.gz.part*" || exit 2
  fi
  echo "gpu_collect: unpacked $dir"
done
cp -a "$STAGE"/. "$WORKDIR"/
rm -rf "$STAGE"

# shellcheck disable=SC2086  # a list of config files, split on spaces
config_paths "$REPO" $CONFIGS
cd "$WORKDIR"
# the rules that read embeddings and data only; train, tokenize, embed, embed_untrained and the
# GPU experiments are left out, so their outputs (or their absence) are taken as they are. pca is
# allowed: the cells are prepared anew here, so its (deterministic, CPU) baseline is computed
# again.
ALLOWED=(download prepare pca evaluate aggregate figure_metrics figure_umap figure_loss all)
set +e
"$PY" -m snakemake --snakefile "$REPO/Snakefile" --directory "$WORKDIR" --cores "$CORES" \
  --configfile "${CONFIG_PATHS[@]}" $EXTRA --allowed-rules "${ALLOWED[@]}" \
  --scheduler greedy -- $TARGETS
STATUS=$?
set -e
echo "gpu_collect: snakemake exit status $STATUS; results in $WORKDIR/results"
exit $STATUS
