#!/usr/bin/env bash
# The whole DAG on an offline GPU host (no internet, no package registry), in one command with a
# time budget; the results are packed into a folder for the trip back.
#
# Here, first: bash tools/gpu_wheels.sh   (wheels into .whl/ and .whl/xz/wheels.tar.xz, the six
#                                          datasets into data/)
# There:       PACK_DIR=<folder> bash tools/gpu_pipeline.sh  (carry .whl/xz and data)
#
# 1. installs the wheels (.whl/xz/wheels.tar.xz unpacked, else .whl/*.whl) into $GPU_SITE
#    (/tmp/site; pip --target, no index) and puts it first on PYTHONPATH; a fallback wheel
#    (fallback/ beside them) goes in only where the image's own version
#    breaks a carried package's requirement (pandas 3 vs anndata's pandas<3, packaging 26 vs
#    snakemake's packaging<26); prints versions and any requirement still unmet.
# 2. runs snakemake on configs/shared_data.yaml + configs/h200_run.yaml, --keep-going, greedy
#    scheduler (pulp is not carried), one retry of a failed job (a training resumes from its
#    checkpoint), at most $GPU_PIPELINE_GPU_SLOTS jobs on the one GPU at once (they time-share
#    it: the 12 big-batch trainings of baron_pancreas and pbmc3k, prioritised, beside small ones
#    that are bound by Python and launches), stopped after $GPU_PIPELINE_BUDGET_S seconds so
#    packing still runs within the host's time limit.
# 3. packs into $PACK_DIR, flat, names [A-Za-z0-9._-], each file under $PACK_MAX_FILE_MIB MiB
#    (larger tarballs are split into parts), and says so when there are more than
#    $PACK_MAX_FILES files (the host may return only so many):
#      run_info.txt          versions, fallbacks, exit status, wall times
#      stage_times.md        per rule: jobs, total / median / max seconds (from benchmark:)
#      tables_figures.tar.gz results/tables, figures, report.html, per-dataset metrics and UMAPs
#      logs.tar.gz           results/logs, benchmarks, stage_times.tsv, train histories,
#                            snakemake's own log
#      embeddings.tar.gz[.partN]  results/*/embed/*.npz
#
# Environment: PACK_DIR (required: the folder the packed results go to); all others optional:
# PACK_MAX_FILES (8), PACK_MAX_FILE_MIB (16), PYTHON (python3), SKIP_WHEELS=1 (use the Python's
# own packages), GPU_SITE, GPU_PIPELINE_CONFIGS (config files, relative to the repository),
# GPU_PIPELINE_EXTRA (more snakemake arguments, e.g. "--config device=cpu"),
# GPU_PIPELINE_WORKDIR (where results/ goes; default the repository), GPU_PIPELINE_CORES (nproc),
# GPU_PIPELINE_GPU_SLOTS (8), GPU_PIPELINE_BUDGET_S (420), GPU_PIPELINE_PRIORITIZE (targets),
# GPU_PIPELINE_TARGETS (snakemake targets: a subset of the DAG for this call, e.g.
# "results/bladder/metrics.csv results/cbmc/metrics.csv results/kidney/metrics.csv"; default
# the whole DAG). A DAG that does not fit one call's budget is split over several calls by
# their targets (the long-cell datasets in one, the short-cell ones in another); then, here,
# tools/gpu_collect.sh unpacks every call's bundle and finishes the DAG on the CPU (evaluate,
# aggregate, figures). Exit status: snakemake's (124: stopped at the budget); packing happens
# in every case.
set -uo pipefail

T0=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
: "${PACK_DIR:?set PACK_DIR to the folder the packed results go to}"
mkdir -p "$PACK_DIR"
PACK_DIR=$(cd "$PACK_DIR" && pwd)
PACK_MAX_FILES=${PACK_MAX_FILES:-8}
PACK_MAX_FILE_MIB=${PACK_MAX_FILE_MIB:-16}
# shellcheck source=tools/lib.sh
source "$REPO/tools/lib.sh"
PY=$(abs_path "${PYTHON:-python3}")
SITE=${GPU_SITE:-/tmp/site}
WORKDIR=${GPU_PIPELINE_WORKDIR:-$REPO}
CORES=${GPU_PIPELINE_CORES:-$(nproc)}
GPU_SLOTS=${GPU_PIPELINE_GPU_SLOTS:-8}
BUDGET=${GPU_PIPELINE_BUDGET_S:-420}
CONFIGS=${GPU_PIPELINE_CONFIGS:-configs/shared_data.yaml configs/h200_run.yaml}
PRIORITIZE=${GPU_PIPELINE_PRIORITIZE-results/baron_pancreas/metrics.csv results/pbmc3k/metrics.csv}
EXTRA=${GPU_PIPELINE_EXTRA:-}
TARGETS=${GPU_PIPELINE_TARGETS:-}
# the default priorities name datasets a subset may leave out
[ -n "$TARGETS" ] && [ -z "${GPU_PIPELINE_PRIORITIZE+set}" ] && PRIORITIZE=""
INFO=$PACK_DIR/run_info.txt
: >"$INFO"

say() { echo "$*" | tee -a "$INFO"; }

# --- 1. packages --------------------------------------------------------------------------
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  WHEELS=$REPO/.whl
  if [ -f "$REPO/.whl/xz/wheels.tar.xz" ]; then # the carried form (tools/gpu_wheels.sh)
    WHEELS=$(mktemp -d)
    # Python's lzma, not tar -J: the image need not have xz
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
      "$REPO/.whl/xz/wheels.tar.xz" "$WHEELS" || exit 2
  fi
  ls "$WHEELS"/*.whl >/dev/null || { echo "no wheels in $WHEELS: run tools/gpu_wheels.sh here first" >&2; exit 2; }
  install_wheels "$PY" "$SITE" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
fi

# Requirements of the carried distributions that the environment does not meet; with --fix,
# installs the matching wheel of .whl/fallback/ (repeated: a fallback may bring needs of its own).
check_requirements() {
  "$PY" - "$SITE" "$WHEELS/fallback" "$@" <<'EOF'
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

site, fallback_dir, fix = Path(sys.argv[1]), Path(sys.argv[2]), "--fix" in sys.argv
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
fallbacks = {norm(f.name.split("-")[0]): f for f in fallback_dir.glob("*.whl")}
NOT_CARRIED = {"pulp"}  # snakemake's ILP scheduler only; the run uses --scheduler greedy


def unmet():
    problems = []
    for dist in md.distributions(path=[str(site)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            if norm(req.name) in NOT_CARRIED:
                continue
            try:
                have = md.version(req.name)  # the first on sys.path: $SITE before the image
            except md.PackageNotFoundError:
                problems.append((req.name, f"{dist.metadata['Name']} needs {req}: missing"))
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append((req.name, f"{dist.metadata['Name']} needs {req}: have {have}"))
    return problems


for _ in range(4):
    problems = unmet()
    todo = sorted({fallbacks[norm(n)] for n, _ in problems if norm(n) in fallbacks})
    if not fix or not todo:
        break
    for f in todo:
        print(f"fallback: installing {f.name} ({[p for n, p in problems if norm(n) == norm(f.name.split('-')[0])][0]})")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, todo)],
        check=True,
    )
for _, problem in sorted(set(problems)):
    print(f"unmet requirement: {problem}")
if not problems:
    print("requirements: every need of the carried packages is met")
EOF
}
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  check_requirements --fix 2>&1 | tee -a "$INFO"
  # a fresh interpreter sees the fallbacks just installed
  check_requirements 2>&1 | tail -n 20 | tee -a "$INFO"
fi

# JAX (scib-metrics in evaluate) would take 75% of the GPU's memory at its first use while
# training jobs share the GPU; allocate as needed instead.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

say "== $(date -u +%FT%TZ) on $(hostname), $CORES cores, python $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF' 2>&1 | tee -a "$INFO"
import importlib.metadata as md

names = ["torch", "triton", "numpy", "pandas", "scipy", "scikit-learn", "jax", "jaxlib", "numba",
         "h5py", "anndata", "scanpy", "scib-metrics", "umap-learn", "igraph", "leidenalg",
         "snakemake", "packaging"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} MISSING")
print("versions: " + ", ".join(versions))
import torch

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()} ({gpu})")
import sigmoid_sc  # noqa: F401  (the rules import it from src/)
EOF

# --- 2. the DAG ---------------------------------------------------------------------------
# shellcheck disable=SC2086  # a list of config files, split on spaces
config_paths "$REPO" $CONFIGS
PRIORITY_ARGS=()
# shellcheck disable=SC2206  # a list of targets, split on spaces
[ -n "$PRIORITIZE" ] && PRIORITY_ARGS=(--prioritize $PRIORITIZE)
mkdir -p "$WORKDIR/results/logs"
cd "$WORKDIR" || exit 2
say "== snakemake (budget ${BUDGET}s, ${GPU_SLOTS} GPU slots): configs ${CONFIGS}; extra: ${EXTRA:-none}; targets: ${TARGETS:-all}"
T1=$(date +%s)
# shellcheck disable=SC2086  # EXTRA is a list of words
timeout --signal=TERM --kill-after=30 "$BUDGET" \
  "$PY" -m snakemake --snakefile "$REPO/Snakefile" --directory "$WORKDIR" $TARGETS \
  --cores "$CORES" --resources gpu="$GPU_SLOTS" --scheduler greedy \
  --keep-going --rerun-incomplete --retries 1 "${PRIORITY_ARGS[@]}" \
  --configfile "${CONFIG_PATHS[@]}" $EXTRA 2>&1 | tee results/logs/snakemake_run.log
STATUS=${PIPESTATUS[0]}
T2=$(date +%s)
say "snakemake exit status: $STATUS$([ "$STATUS" = 124 ] && echo ' (stopped at the budget)'); wall $((T2 - T1)) s"
if [ -f results/tables/representation.csv ]; then
  timeout 60 "$PY" -m snakemake --snakefile "$REPO/Snakefile" --directory "$WORKDIR" \
    --configfile "${CONFIG_PATHS[@]}" $EXTRA --report results/report.html \
    >results/logs/snakemake_report.log 2>&1 || say "report: failed (results/logs/snakemake_report.log)"
fi

# --- 3. stage times and packing -------------------------------------------------------------
"$PY" - results/benchmarks results/stage_times.tsv results/stage_times.md "$((T2 - T1))" <<'EOF' 2>&1 | tee -a "$INFO"
import csv
import statistics
import sys
from pathlib import Path

root, tsv, md, wall = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
per_rule = {}
for f in sorted(root.glob("**/*.tsv")):  # results/benchmarks/<rule>/...: one row per job
    rows = list(csv.DictReader(f.open(), delimiter="\t"))
    if rows:
        per_rule.setdefault(f.relative_to(root).parts[0], []).append(float(rows[0]["s"]))
header = ["rule", "jobs", "total_s", "median_s", "max_s"]
rows = [
    [rule, len(s), f"{sum(s):.1f}", f"{statistics.median(s):.1f}", f"{max(s):.1f}"]
    for rule, s in sorted(per_rule.items(), key=lambda kv: -sum(kv[1]))
]
tsv.parent.mkdir(parents=True, exist_ok=True)
tsv.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
lines = [f"Per-rule wall times (snakemake benchmark:), snakemake wall {wall} s", "",
         "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
md.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

T3=$(date +%s)
say "total wall so far $((T3 - T0)) s (set-up $((T1 - T0)) s, snakemake $((T2 - T1)) s)"
cp results/stage_times.md "$PACK_DIR/" 2>/dev/null
# pack NAME PATH...: the paths that exist into $PACK_DIR/NAME (nothing when none does)
pack() {
  local name=$1 p paths=()
  shift
  for p in "$@"; do [ -e "$p" ] && paths+=("$p"); done
  if [ ${#paths[@]} -gt 0 ]; then
    tar -czf "$PACK_DIR/$name" "${paths[@]}" 2>>"$INFO"
  else
    say "pack: nothing for $name"
  fi
}
pack tables_figures.tar.gz results/tables results/figures results/report.html results/*/metrics.csv results/*/umap.csv
pack logs.tar.gz results/logs results/benchmarks results/stage_times.tsv results/*/train/*/history.csv .snakemake/log
pack embeddings.tar.gz results/*/embed
# every file under PACK_MAX_FILE_MIB: a larger tarball is split into parts of one MiB less
PART_MIB=$((PACK_MAX_FILE_MIB > 1 ? PACK_MAX_FILE_MIB - 1 : 1))
for f in "$PACK_DIR"/*.tar.gz; do
  if [ "$(stat -c %s "$f")" -gt $((PART_MIB * 1024 * 1024)) ]; then
    split -b "${PART_MIB}M" -d -a 1 "$f" "$f.part" && rm "$f"
  fi
done
N=$(find "$PACK_DIR" -type f | wc -l)
say "packed $N files into $PACK_DIR ($(du -sh "$PACK_DIR" | cut -f1)); join split parts with: cat X.part* > X"
ls -l "$PACK_DIR" | tee -a "$INFO"
[ "$N" -le "$PACK_MAX_FILES" ] || say "WARNING: $N files in $PACK_DIR, more than PACK_MAX_FILES=$PACK_MAX_FILES"
exit "$STATUS"
