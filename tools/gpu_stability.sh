#!/usr/bin/env bash
# Claim c with models that learn, on one GPU, without Snakemake: configs/stability.yaml's
# sections, the same code the stability_sweep and stress_test rules run. Made for a host that
# gives a command a few minutes: each call works for BUDGET seconds (default 420, all in) and
# leaves at most 8 files in $PACK_DIR; a later call continues where the last one stopped.
#
#   PART=sweep (default): the learning-rate sweep, `sigmoid-sc stability-sweep gpu`: WORKERS
#     processes share the GPU, each taking the next run (arm x learning rate x seed) from a
#     queue; the first seed at every learning rate, highest first, then seed 1 at each arm's
#     boundary as soon as that arm's first-seed runs are done. No run starts that its worker
#     cannot finish before the budget (estimated from its last run). Writes into $PACK_DIR (8
#     files): stability_runs.csv (every run), stability_boundary.{csv,md} (largest stable lr per
#     arm), stability_lr.png, stability_logits.png, stability_sweep.log, stability_runs.tar.gz
#     (the finished runs' per-step logs and summaries), versions.txt.
#   PART=confirm: `sigmoid-sc stress-test` at 160M / 8K tokens / no clipping on the learnable
#     task, at the learning rates CONFIRM_LRS (default: configs/stability.yaml), both kinds,
#     until the budget; writes stress_test.{csv,png}, stress_test_summary.json,
#     stress_confirm_arms.tar.gz (the finished arms), stress_test.log, versions.txt.
#
# Continuing in a later call: the finished runs come back in the tarball; unpack it into $CARRY
# (default .carry/stability, ignored by git) and carry that folder to the next call:
#
#   mkdir -p .carry/stability && tar -xzf <returned>/stability_runs.tar.gz -C .carry/stability
#   mkdir -p .carry/stability/confirm && tar -xzf <returned>/stress_confirm_arms.tar.gz \
#       -C .carry/stability/confirm
#
# A run cut by the budget mid-way restarts from its start in the next call, unless the machine
# is still the same (its checkpoint stays in STATE, default /tmp/stability_state).
#
# Packages: torch (and Triton for the sigmoid kernel), numpy, pandas, matplotlib, PyYAML and
# jsonschema (the config's validation). An image without jsonschema gets it from the wheels in
# WHEELS (default .whl: tools/gpu_wheels.sh's .whl/xz/wheels.tar.xz, or just the four wheels
# for the host's Python, fetched here with e.g. `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux2014_x86_64 -d .whl jsonschema==4.26.0
# jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1`), installed into
# /tmp/site for this call; carry them with the runs.
#
# Time on one H100 (an estimate from FLOPs, not yet a measurement):
#   sweep: a step of the 25.2M proxy on 2 x 2,048 tokens is ~0.91 TFLOP in bf16 (dense 0.54,
#     attention 0.36, tied head 0.01) plus ~0.02 TFLOP of fp32 probe (keys of every token, 64
#     query rows a sequence); these mid-sized shapes run at maybe 150-250 TFLOP/s with 8
#     processes sharing the GPU, ~4-6 ms a step together. The grid is 5 arms x 8 learning rates
#     x 2,100 steps (84,000 steps; diverged runs stop early) plus seed 1 at 2 rates per arm
#     (21,000): <= 105,000 steps, ~7-10 min of training. A call of 420 s trains for ~5 min
#     (start-up: workers, CUDA, Triton autotuning; the tables and figures; the runs its workers
#     did not start because they would not end in time): three calls, a fourth if the GPU is
#     slower than estimated. The log and stability_boundary.md say "Incomplete" until done.
#   confirm: a step of the 160M encoder on 2 x 8,192 tokens is ~29 TFLOP (dense 12.4,
#     attention 16.5, head 0.4) plus ~0.5 TFLOP fp32 of probe: ~95-115 ms at ~300-350 TFLOP/s,
#     ~200-230 s for an arm's 2,100 steps: about one arm a call.
#
# Usage, from the repository root:  PACK_DIR=/some/dir bash tools/gpu_stability.sh
#   PART=confirm CONFIRM_LRS="0.0026 0.00588" PACK_DIR=... bash tools/gpu_stability.sh
#   SMOKE=1 PACK_DIR=/tmp/x bash tools/gpu_stability.sh      (tiny, on the CPU: tests)
# Environment: BUDGET (seconds of this call, default 420), WORKERS (default 8), PYTHON, CARRY,
# STATE, WHEELS, OVERRIDES (JSON merged into the part's section, e.g. '{"steps": 300}' for a
# short trial).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
: "${PACK_DIR:?PACK_DIR must name the folder for the results}"
mkdir -p "$PACK_DIR"
PART=${PART:-sweep}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-420}
WORKERS=${WORKERS:-8}
CARRY=${CARRY:-$ROOT/.carry/stability}
STATE=${STATE:-${TMPDIR:-/tmp}/stability_state}
WHEELS=${WHEELS:-$ROOT/.whl}
CONFIRM_LRS=${CONFIRM_LRS:-}
OVERRIDES=${OVERRIDES:-}
T0=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck source=tools/lib.sh
source "$ROOT/tools/lib.sh"
DEVICE=cuda
[ "$SMOKE" = 1 ] && DEVICE=cpu
mkdir -p "$CARRY" "$STATE"
case "$PART" in
sweep | confirm) ;;
*)
    echo "PART must be sweep or confirm, not $PART" >&2
    exit 2
    ;;
esac

# the config's validation needs jsonschema; an image without it gets the carried wheels
if ! "$PY" -c 'import jsonschema, yaml' 2>/dev/null; then
    FOUND=$WHEELS
    if [ -f "$WHEELS/xz/wheels.tar.xz" ]; then # tools/gpu_wheels.sh's carried form
        FOUND=$(mktemp -d)
        "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
            "$WHEELS/xz/wheels.tar.xz" "$FOUND" || exit 2
    fi
    mapfile -t NEEDED < <(ls "$FOUND"/jsonschema-*.whl "$FOUND"/jsonschema_specifications-*.whl \
        "$FOUND"/referencing-*.whl "$FOUND"/rpds_py-*.whl 2>/dev/null)
    if [ "${#NEEDED[@]}" -lt 4 ]; then
        echo "this Python lacks jsonschema and $WHEELS holds no wheels of it (jsonschema," \
            "jsonschema_specifications, referencing, rpds_py): run tools/gpu_wheels.sh and carry" \
            ".whl/xz, or carry those four wheels in WHEELS" >&2
        exit 2
    fi
    install_wheels "$PY" /tmp/site "${NEEDED[@]}" || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    "$PY" -c 'import jsonschema, yaml' || exit 2
fi

{
    echo "date_utc: $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "part: $PART, smoke: $SMOKE, budget_s: $BUDGET, workers: $WORKERS"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no .git in this copy')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
            --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    fi
    "$PY" - <<'EOF' 2>&1
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "numpy", "pandas", "matplotlib", "jsonschema"):
    try:
        print(f"{name}:", __import__(name).__version__)
    except Exception as exc:  # noqa: BLE001 (report, do not stop)
        print(f"{name}: not available ({type(exc).__name__})")
EOF
} >"$PACK_DIR/versions.txt"

# section NAME: configs/stability.yaml's experiments.NAME as JSON (SMOKE: a tiny model on the
# CPU; CONFIRM_LRS replaces the stress test's learning rates; then OVERRIDES)
section() {
    "$PY" - "$1" "$SMOKE" "$CONFIRM_LRS" "$OVERRIDES" <<'EOF'
import json, sys
import yaml
name, smoke, lrs = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split()
overrides = json.loads(sys.argv[4] or "{}")
section = dict((yaml.safe_load(open("configs/stability.yaml"))["experiments"] or {})[name])
section.pop("enabled", None)
if smoke:
    tiny = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "vocab_size": 40,
            "seq_len": 16, "n_cell_types": 2, "module_size": 4, "rank_noise": 1.0,
            "warmup_steps": 2, "early_steps": 2, "logit_queries": 4, "precision": "fp32"}
    if name == "stability_sweep":
        tiny.update(steps=6, final_window=2, lrs=[3.0e-2, 1.0e4], checkpoint_every=3,
                    arms=[{"name": "softmax_pre", "attention": "softmax"},
                          {"name": "sigmoid_pre", "attention": "sigmoid"}])
    else:
        tiny.update(max_steps=8, checkpoint_every=3)
    section.update(tiny)
if name == "stress_test" and lrs:
    section["lr"] = [float(v) for v in lrs]
section.update(overrides)
print(json.dumps(section, sort_keys=True))
EOF
}

# left MARGIN: the seconds this call has left, less MARGIN (at least 1: `timeout 0` never ends)
left() {
    local s=$((BUDGET - ($(date +%s) - T0) - $1))
    [ "$s" -lt 1 ] && s=1
    echo "$s"
}

case "$PART" in
sweep)
    PARAMS=$(section stability_sweep) || exit 2
    # the driver keeps its own budget (its tables and figures included); the timeout is a
    # last resort that keeps the call within BUDGET
    timeout -k 10 "$(left 5)" "$PY" -m sigmoid_sc.cli stability-sweep gpu --params-json "$PARAMS" \
        --device "$DEVICE" --out "$PACK_DIR" --runs-dir "$CARRY/runs" --state-dir "$STATE/sweep" \
        --budget-s "$(left 15)" --workers "$WORKERS"
    ;;
confirm)
    PARAMS=$(section stress_test) || exit 2
    echo "confirm params: $PARAMS" >>"$PACK_DIR/versions.txt"
    # SIGTERM from `timeout` checkpoints too; the arms' own budget ends first
    timeout -k 30 "$(left 20)" "$PY" -m sigmoid_sc.cli stress-test --params-json "$PARAMS" \
        --device "$DEVICE" --checkpoint-dir "$CARRY/confirm" --keep-checkpoints \
        --budget-s "$(left 60)" --log-csv "$PACK_DIR/stress_test.csv" \
        --summary "$PACK_DIR/stress_test_summary.json" --png "$PACK_DIR/stress_test.png" \
        --pdf "$STATE/stress_test.pdf" >"$PACK_DIR/stress_test.log" 2>&1
    echo "stress-test exit $?" >>"$PACK_DIR/stress_test.log"
    # the finished arms (rows and summaries only, small) go back; unfinished ones stay here
    "$PY" - "$CARRY/confirm" "$PACK_DIR/stress_confirm_arms.tar.gz" <<'EOF'
import sys, tarfile
from pathlib import Path
import torch
folder, target = Path(sys.argv[1]), sys.argv[2]
with tarfile.open(target, "w:gz") as tar:
    for path in sorted(folder.glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if state.get("summary") is not None:
            tar.add(path, arcname=path.name)
            print(f"finished arm: {path.name}")
EOF
    ;;
esac
