#!/usr/bin/env bash
# Everything an offline GPU host (no internet, no package registry) needs to run the whole DAG,
# gathered here: the Python 3.12 wheels its image lacks into .whl/ (29.7 MiB, + 12.7 MiB of
# fallbacks), packed for the trip as .whl/xz/wheels.tar.xz (28.6 MiB), and the six real
# datasets into data/ (24.3 MiB, checked against their SHA256SUMS).
#
#   bash tools/gpu_wheels.sh            # wheels + data + resolution check
#   NO_CHECK=1 bash tools/gpu_wheels.sh # without the check (it downloads ~300 MB into /tmp)
#
# Then, on the host: bash tools/gpu_pipeline.sh, carrying .whl/xz and data (both git-ignored):
# ~54 MiB with the repository. CARRY_MAX_MIB (default 64) is what the trip to the host may
# carry: the script reports the carried size against it (.whl itself, 42 MiB, would not fit
# beside the data in 64 MiB).
#
# The list below is the closure of snakemake 9.27.1 (the same as .venv), scanpy 1.11.5,
# anndata 0.12.19, scib-metrics 0.5.10 and the package's own dependencies, resolved for
# CPython 3.12 on manylinux x86_64 with .venv's versions, MINUS the packages the GPU image holds
# (IMAGE_PACKAGES below; torch and triton there too).
# Left out on purpose:
#   pulp (36 MB unpacked, the CBC solver binaries): snakemake imports it only for its ILP job
#     scheduler; tools/gpu_pipeline.sh runs `--scheduler greedy`, and without pulp snakemake
#     falls back to greedy anyway (snakemake/api.py), so a local run never imports it.
#     tests/test_gpu_bundle.py runs the pipeline with `import pulp` failing to prove it.
#   snakemake-executor-plugin-slurm(-jobstep): only for --profile profiles/slurm.
# Fallbacks (.whl/fallback/): an image built from a newer index than ours may hold pandas 3 and
# packaging 26 (one without pytz, which every pandas 2 needs, does), while anndata 0.12.19 asks
# for pandas<3 and snakemake 9.27.1 for packaging<26; under Python 3.12 with pandas 3.1.1,
# anndata 0.12.19 cannot write an h5ad (the download stage fails,
# "allow_write_nullable_strings"). gpu_pipeline.sh installs a fallback only when the image's own
# version breaks a carried package's requirement.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WHL=.whl
FALLBACK_DIR=$WHL/fallback
SHARED_DATA=${SHARED_DATA:-../shared/data}
CHECK_DIR=${CHECK_DIR:-/tmp/gpu-wheels-check} # throwaway: the image's own packages, never carried
CARRY_MAX_MIB=${CARRY_MAX_MIB:-64} # what the trip to the host may carry, repository included

PLATFORM_ARGS=(
  --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64
  --platform manylinux_2_5_x86_64
)

# What the image lacks (58 distributions; one version each).
PACKAGES=(
  snakemake==9.27.1
  snakemake-interface-common==1.23.0
  snakemake-interface-executor-plugins==9.4.0
  snakemake-interface-logger-plugins==2.1.0
  snakemake-interface-report-plugins==1.3.0
  snakemake-interface-scheduler-plugins==2.0.2
  snakemake-interface-storage-plugins==4.4.1
  argparse-dataclass==2.0.0 conda-inject==1.3.2 configargparse==1.9.0 docutils==0.22.4
  dpath==2.2.0 gitdb==4.0.12 gitpython==3.2.1 humanfriendly==10.0 immutables==0.21
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  nbformat==5.11.1 fastjsonschema==2.22.3 jupyter-core==5.9.1 traitlets==5.16.1
  platformdirs==4.14.8 smart-open==7.7.1 smmap==5.0.3 tenacity==9.2.1 throttler==1.2.3
  yte==1.9.4 sqlmodel==0.0.37 sqlalchemy==2.0.58 greenlet==3.5.6 pydantic==2.14.4
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  scanpy==1.11.5 anndata==0.12.19 array-api-compat==1.16.0 scverse-misc==0.0.3
  zarr==3.1.6 donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6
  legacy-api-wrap==1.5 natsort==8.4.0 session-info2==0.4.1
  umap-learn==0.5.12 pynndescent==0.7.0
  scib-metrics==0.5.10 plottable==0.1.5
  igraph==1.0.0 texttable==1.7.2 leidenalg==0.12.0
)
# Published as a source archive only: built here (pure Python -> py3-none-any).
SDIST_ONLY=(connection-pool==0.0.3)
FALLBACKS=(pandas==2.3.3 pytz==2026.6 tzdata==2026.6 packaging==25.0)
# Kept: the paper's kernel, a comparison in bench/kernel.py (not a pipeline need).
KEEP=(triton_sigmoid-0.1.2-py3-none-any.whl)

pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

mkdir -p "$WHL" "$FALLBACK_DIR"
echo "== wheels -> $WHL/"
pip_ download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$WHL" "${PACKAGES[@]}"
pip_ wheel -q --no-deps -w "$WHL" "${SDIST_ONLY[@]}"
pip_ download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$FALLBACK_DIR" "${FALLBACKS[@]}"

# One version of each, and nothing stale: two versions of one name stop the whole install.
"$PY" - "$WHL" "$FALLBACK_DIR" "${KEEP[*]}" "${PACKAGES[@]}" "${SDIST_ONLY[@]}" "--" "${FALLBACKS[@]}" <<'EOF'
import re, sys
from pathlib import Path

whl, fallback, keep = Path(sys.argv[1]), Path(sys.argv[2]), set(sys.argv[3].split())
split = sys.argv.index("--")
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
for folder, pins in ((whl, sys.argv[4:split]), (fallback, sys.argv[split + 1 :])):
    wanted = {norm(p.split("==")[0]): p.split("==")[1] for p in pins}
    seen = {}
    for f in sorted(folder.glob("*.whl")):
        name, version = f.name.split("-")[:2]
        if f.name in keep:
            continue
        if wanted.get(norm(name)) != version:
            print(f"removing stale {f}")
            f.unlink()
            continue
        seen.setdefault(norm(name), []).append(f.name)
    missing = sorted(set(wanted) - set(seen))
    twice = {k: v for k, v in seen.items() if len(v) > 1}
    if missing or twice:
        sys.exit(f"{folder}: missing {missing}, several versions {twice}")
    print(f"{folder}: {len(seen)} wheels, one version each")
EOF
du -cb "$WHL"/*.whl | tail -1 | awk '{printf "wheels (.whl/*.whl): %.1f MiB\n", $1 / 1048576}'
du -cb "$FALLBACK_DIR"/*.whl | tail -1 | awk '{printf "fallbacks (.whl/fallback): %.1f MiB\n", $1 / 1048576}'

# For the trip (CARRY_MAX_MIB, data and repository included): every wheel re-zipped without
# compression (pip reads any zip; RECORD hashes the files, not the zip), then xz over them all:
# ~29 MiB instead of ~42. gpu_pipeline.sh unpacks it and pip-installs the wheels as they are.
echo "== $WHL/xz/wheels.tar.xz (carry .whl/xz)"
STORED=$(mktemp -d)
"$PY" - "$WHL" "$STORED" <<'PYEOF'
import sys
import zipfile
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for wheel in [*src.glob("*.whl"), *src.glob("fallback/*.whl")]:
    out = dst / wheel.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)  # before the change below: zin reads through the same info
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
PYEOF
mkdir -p "$WHL/xz"
tar -cf - -C "$STORED" . | xz -T0 -6 >"$WHL/xz/wheels.tar.xz.tmp"
mv "$WHL/xz/wheels.tar.xz.tmp" "$WHL/xz/wheels.tar.xz"
rm -rf "$STORED"
du -b "$WHL/xz/wheels.tar.xz" | awk '{printf "wheels for the trip (.whl/xz/wheels.tar.xz): %.1f MiB\n", $1 / 1048576}'

echo "== data -> data/"
mkdir -p data
# verified against the folder's SHA256SUMS, so a truncated copy never travels
(cd "$SHARED_DATA" && sha256sum -c --quiet SHA256SUMS)
cp -p "$SHARED_DATA"/*.h5ad "$SHARED_DATA"/SHA256SUMS data/
(cd data && sha256sum -c --quiet SHA256SUMS)
du -cb data/*.h5ad | tail -1 | awk '{printf "data (data/*.h5ad): %.1f MiB\n", $1 / 1048576}'
git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "repo (tracked files): %.1f MiB\n", $1 / 1048576}'
du -cb "$WHL/xz" data | tail -1 | awk -v max="$CARRY_MAX_MIB" '{printf "carried (.whl/xz + data): %.1f MiB, plus the repository, of the %s MiB the trip may carry (CARRY_MAX_MIB)\n", $1 / 1048576, max}'

if [ "${NO_CHECK:-0}" = 1 ]; then
  exit 0
fi

# Proof that nothing is missing: the image's own packages (and pulp, left out above) are
# downloaded into a throwaway folder, then pip resolves the pipeline's needs from the two folders
# alone, for Python 3.12, with no index.
echo "== resolution check (no index; .whl + the image's packages from $CHECK_DIR)"
# the GPU image's own Python packages (besides torch and triton): not carried
IMAGE_PACKAGES=(
  absl-py attrs certifi charset-normalizer chex cloudpickle contourpy cycler fonttools formulaic
  h5py idna interface-meta jax jaxlib jinja2 joblib kiwisolver llvmlite markdown-it-py
  markupsafe matplotlib mdurl ml-dtypes narwhals networkx numba numpy opt-einsum packaging
  pandas patsy pillow psutil pygments pyparsing python-dateutil pyyaml requests rich
  scikit-learn scipy seaborn statsmodels tabulate threadpoolctl toolz tqdm typing-extensions
  urllib3 wrapt pytz tzdata pulp
)
mkdir -p "$CHECK_DIR"
# .venv's versions where it has them (the tested set)
pip_ freeze --exclude-editable 2>/dev/null | grep -v -i -E '^(torch|triton|sigmoid)' >"$CHECK_DIR/constraints.txt" || true
pip_ download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$CHECK_DIR" -c "$CHECK_DIR/constraints.txt" \
  "${IMAGE_PACKAGES[@]}"
rm -rf /tmp/gpu-wheels-check-target
pip_ install --dry-run --no-index \
  --find-links "$WHL" --find-links "$CHECK_DIR" "${PLATFORM_ARGS[@]}" \
  --target /tmp/gpu-wheels-check-target \
  snakemake==9.27.1 scanpy==1.11.5 anndata==0.12.19 scib-metrics==0.5.10 \
  'igraph>=0.11' 'leidenalg>=0.10' 'umap-learn>=0.5.5' 'jsonschema>=4' 'pyyaml>=6' \
  'tqdm>=4.66' 'requests>=2.31' 'h5py>=3.10' 'numpy>=1.26' 'scipy>=1.11' 'pandas>=2.1' \
  'matplotlib>=3.8' | tail -n 3
echo "resolution check: OK (every need of the pipeline is in .whl/ or on the image)"
