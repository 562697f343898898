#!/usr/bin/env bash
# The paper's GPU experiments beside the DAG, in one command on a GPU host with a time limit
# (about 7 minutes of wall time, compiles included):
#
#   part 1, stress test (~3 min, claim c): `sigmoid-sc stress-test` exactly as the stress_test
#     rule runs it, on configs/paper.yaml's experiments.stress_test section with only max_steps
#     and max_seconds overridden (softmax then sigmoid, 160M encoder, 8K x 2 tokens, no
#     clipping). While it runs, background "warmers" compile the Triton kernels that part 2 will
#     autotune (the paper's triton-sigmoid: 48 configs per head dim and length bucket, ~1 min
#     each on a fresh machine; ours: 11). They share the GPU with the stress test, which is a
#     stability measurement, not a timing one; part 2 then runs alone and re-autotunes from the
#     on-disk compile cache (autotune results themselves are per process).
#   part 2, training speed (~3 min, claim b): sigmoid-sc training-speed
#     a) the configs/shared_data.yaml model (6 layers, width 256, 8 heads of 32, bf16) on a new
#        batch of 64 pbmc3k cells every step: ms/step of the first steps and steady state, for
#        sigmoid (ours) and softmax (varlen, cuDNN);
#     b) the paper's comparison: 12 layers, width 1024, head dim 128 and 64, 8K x 2 tokens and
#        real cell lengths, bf16 AdamW; ours, cuDNN, SDPA flash, varlen softmax, then the
#        paper's triton-sigmoid last (the slowest to autotune).
#   pack: eight files in $PACK_DIR (a warning when there are more than PACK_MAX_FILES):
#     versions.txt, gpu_experiments.log, training_speed.{csv,md}, stress_test.{csv,png},
#     stress_test_summary.json, extras.tar.gz (the rest).
#
# GPU memory, sized on the CPU (saved tensors of one step, bf16 autocast, a flash-style kernel
# that keeps q, k, v, o): the stress encoder (160.0M parameters) needs 2.4 GiB for weights,
# gradients and AdamW state plus 8.2 GiB of activations at 2 x 8K tokens; the width-1024,
# 12-layer encoder (185M) 2.8 + 9.7 GiB; the padded paths add ~0.3 GiB a layer (real cells:
# 12 cells padded to 2,611). Warmers are 1-layer models (< 3 GiB each with the CUDA context).
# Peak while part 1 runs: ~30 GiB.
#
# Every part has its own time budget (a `timeout`) and writes its results as it goes, so a part
# cut short still leaves its numbers. Usage, on the GPU host from the repository root:
#
#   PACK_DIR=<folder> bash tools/gpu_experiments.sh
#   SMOKE=1 PACK_DIR=/tmp/x bash tools/gpu_experiments.sh   # tiny, on the CPU (tests)
#
# PARTS="stress speed" (default) runs both; PARTS=speed or PARTS=stress one (a second call).
# Budgets (seconds) can be changed by environment variables: STRESS_BUDGET (whole part 1),
# STRESS_ARM_SECONDS, STRESS_MAX_STEPS, WARM_BUDGET, CELLS_BUDGET, SPEED_BUDGET (part 2b) and
# SPEED_TIME_LIMIT (no new implementation starts after this many seconds of part 2b);
# PACK_MAX_FILES (8).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
: "${PACK_DIR:?PACK_DIR must name the folder for the results}"
mkdir -p "$PACK_DIR"
PACK_MAX_FILES=${PACK_MAX_FILES:-8}
SMOKE=${SMOKE:-0}
PARTS=${PARTS:-stress speed} # a later call can redo one part: PARTS=speed or PARTS=stress
PY=${PYTHON:-python3}
# shellcheck source=tools/lib.sh
source "$ROOT/tools/lib.sh"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_experiments.XXXXXX")
LOG="$PACK_DIR/gpu_experiments.log"
T0=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "[gpu_experiments +$(($(date +%s) - T0))s] $*" | tee -a "$LOG" >&2; }

# run BUDGET NAME CMD...: one part under its time limit, its output appended to the log
run_part() {
    local budget=$1 name=$2 rc start
    shift 2
    start=$(date +%s)
    log "$name: start (budget ${budget}s)"
    timeout -k 10 "$budget" "$@" >>"$LOG" 2>&1
    rc=$?
    log "$name: exit $rc after $(($(date +%s) - start))s$([ "$rc" = 124 ] && echo ' (time budget reached)')"
    echo "part $name: exit $rc, $(($(date +%s) - start)) s (budget $budget s)" >>"$WORK/parts.txt"
    return 0
}

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    STRESS_BUDGET=${STRESS_BUDGET:-120} STRESS_ARM_SECONDS=${STRESS_ARM_SECONDS:-20}
    STRESS_MAX_STEPS=${STRESS_MAX_STEPS:-4} WARM_BUDGET=${WARM_BUDGET:-60}
    CELLS_BUDGET=${CELLS_BUDGET:-90} SPEED_BUDGET=${SPEED_BUDGET:-120}
    SPEED_TIME_LIMIT=${SPEED_TIME_LIMIT:-100}
    SPEED_FLAGS=(--smoke)
    # tiny encoder; in the real run every value but max_steps / max_seconds is paper.yaml's
    STRESS_SMOKE='{"n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "vocab_size": 200,
        "seq_len": 64, "warmup_steps": 2, "early_steps": 2, "logit_queries": 8}'
else
    DEVICE=cuda
    STRESS_BUDGET=${STRESS_BUDGET:-180} STRESS_ARM_SECONDS=${STRESS_ARM_SECONDS:-72}
    STRESS_MAX_STEPS=${STRESS_MAX_STEPS:-600} WARM_BUDGET=${WARM_BUDGET:-150}
    CELLS_BUDGET=${CELLS_BUDGET:-45} SPEED_BUDGET=${SPEED_BUDGET:-160}
    SPEED_TIME_LIMIT=${SPEED_TIME_LIMIT:-115}
    SPEED_FLAGS=()
    STRESS_SMOKE='{}'
    # the paper's kernel, a comparison only: carried as a wheel (.whl/), installed per call
    if ls .whl/triton_sigmoid-*.whl >/dev/null 2>&1; then
        install_wheels "$PY" /tmp/site .whl/triton_sigmoid-*.whl >>"$LOG" 2>&1 &&
            export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
fi

# ------------------------------------------------------------------------------------------
# versions
{
    echo "date_utc: $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "smoke: $SMOKE"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no .git in this copy')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
            --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    fi
    "$PY" - <<'EOF' 2>&1
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
for name in ("triton", "triton_sigmoid", "numpy", "pandas", "matplotlib"):
    try:
        module = __import__(name)
        print(f"{name}:", getattr(module, "__version__", "installed"))
    except Exception as exc:  # noqa: BLE001 (report, do not stop)
        print(f"{name}: not available ({type(exc).__name__})")
EOF
    echo "budgets_s: stress $STRESS_BUDGET (arm $STRESS_ARM_SECONDS, max_steps $STRESS_MAX_STEPS)," \
        "warm $WARM_BUDGET, cells $CELLS_BUDGET, speed $SPEED_BUDGET (no new case after $SPEED_TIME_LIMIT)"
} >"$PACK_DIR/versions.txt"
log "versions: $(tr '\n' ';' <"$PACK_DIR/versions.txt" | cut -c1-400)"

# ------------------------------------------------------------------------------------------
# part 1: stress test, warmers for part 2 in the background

STRESS_JSON=$("$PY" - "$STRESS_MAX_STEPS" "$STRESS_ARM_SECONDS" "$STRESS_SMOKE" <<'EOF'
import json, sys
import yaml
section = (yaml.safe_load(open("configs/paper.yaml")).get("experiments") or {}).get("stress_test") or {}
section.update(json.loads(sys.argv[3]))  # smoke only: a tiny model
section.update(max_steps=int(sys.argv[1]), max_seconds=float(sys.argv[2]))
print(json.dumps(section, sort_keys=True))
EOF
) || { log "cannot read configs/paper.yaml experiments.stress_test"; STRESS_JSON=""; }
log "stress params: $STRESS_JSON"

WARM_PIDS=()
warm() {  # warm NAME ARGS...: one training-speed run whose only purpose is compiling kernels
    local name=$1
    shift
    timeout -k 5 "$WARM_BUDGET" "$PY" -m sigmoid_sc.cli training-speed "${SPEED_FLAGS[@]}" --n-layers 1 \
        --d-models 1024 --warmup 1 --repeats 1 --out-csv "$WORK/warm_$name.csv" \
        --out-md "$WORK/warm_$name.md" "$@" >"$WORK/warm_$name.log" 2>&1 &
    WARM_PIDS+=($!)
}
if [[ " $PARTS " == *" speed "* ]]; then
    warm paper_fixed128 --impls sigmoid_triton_paper --workloads fixed --head-dims 128
    warm paper_fixed64 --impls sigmoid_triton_paper --workloads fixed --head-dims 64
    warm paper_real128 --impls sigmoid_triton_paper --workloads real --head-dims 128
    warm paper_real64 --impls sigmoid_triton_paper --workloads real --head-dims 64
    warm ours --impls sigmoid_ours --workloads fixed real --head-dims 128 64
    log "warmers started: ${WARM_PIDS[*]}"
fi

if [ -n "$STRESS_JSON" ] && [[ " $PARTS " == *" stress "* ]]; then
    # the stress_test rule's command (workflow/rules/experiments.smk), outputs in $PACK_DIR
    run_part "$STRESS_BUDGET" stress env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        "$PY" -m sigmoid_sc.cli stress-test --params-json "$STRESS_JSON" --device "$DEVICE" \
        --log-csv "$PACK_DIR/stress_test.csv" --summary "$PACK_DIR/stress_test_summary.json" \
        --png "$PACK_DIR/stress_test.png" --pdf "$WORK/stress_test.pdf" --partial-every 25
fi
if [ -f "$PACK_DIR/stress_test.csv" ] && [ ! -f "$PACK_DIR/stress_test.png" ]; then
    # cut short: draw the figure from the partial log (the summary then holds finished arms only)
    run_part 60 stress_figure_from_partial_log "$PY" - "$PACK_DIR" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd
from sigmoid_sc.experiment_figures import plot_stress, save_figure
out = Path(sys.argv[1])
path = out / "stress_test_summary.json"
summary = json.loads(path.read_text()) if path.is_file() else {}
if not summary.get("n_params") and "config" in summary:  # no arm finished: count, no weights
    import torch
    from sigmoid_sc import config, stress_test
    from sigmoid_sc.model import Encoder
    section = config.section("experiments.stress_test", summary["config"])
    with torch.device("meta"):
        summary["n_params"] = stress_test.count_parameters(Encoder(stress_test.model_config(section, "softmax")))
summary["n_params"] = summary.get("n_params") or 0
pdf = out / "stress_test_partial.pdf"
save_figure(plot_stress(pd.read_csv(out / "stress_test.csv"), summary), out / "stress_test.png", pdf)
pdf.unlink()  # only the PNG: the pack keeps to its eight files
print("stress: figure drawn from the partial log")
EOF
fi
for pid in "${WARM_PIDS[@]}"; do wait "$pid"; done # each ends by its own timeout at the latest
for f in "$WORK"/warm_*.log; do [ -f "$f" ] && log "$(basename "$f"): $(tail -n 2 "$f" | tr '\n' ' ' | cut -c1-300)"; done

# ------------------------------------------------------------------------------------------
# part 2: training speed

if [[ " $PARTS " == *" speed "* ]]; then
    # a) the shared-data model, a new batch of 64 real pbmc3k cells every step (the total token
    # count changes each step: an autotune keyed on it would re-tune every step). Vocabulary:
    # pbmc3k keeps ~13.7K genes after prepare's min_cells=3; cells capped at tokenize.max_len 1024.
    run_part "$CELLS_BUDGET" speed_shared_model "$PY" -m sigmoid_sc.cli training-speed "${SPEED_FLAGS[@]}" \
        --workloads cells --cells-per-step 64 --lengths-file src/sigmoid_sc/data/lengths_pbmc3k.txt \
        --n-layers 6 --d-models 256 --head-dims 32 --vocab-size 13717 --seq-len 1024 \
        --impls sigmoid_ours softmax_varlen softmax_sdpa_cudnn --warmup 10 --repeats 40 \
        --out-csv "$WORK/training_speed_shared_model.csv" --out-md "$WORK/training_speed_shared_model.md"

    # b) the paper's comparison (table in $PACK_DIR as it goes)
    run_part "$SPEED_BUDGET" speed_width1024 "$PY" -m sigmoid_sc.cli training-speed "${SPEED_FLAGS[@]}" \
        --n-layers 12 --d-models 1024 --head-dims 128 64 --workloads fixed real \
        --impls sigmoid_ours softmax_sdpa_cudnn softmax_sdpa_flash softmax_varlen sigmoid_triton_paper \
        --warmup 3 --repeats 12 --time-limit "$SPEED_TIME_LIMIT" \
        --out-csv "$PACK_DIR/training_speed.csv" --out-md "$PACK_DIR/training_speed.md"

    # one table: the width-1024 rows, then the shared-data model's
    run_part 60 speed_merge "$PY" -m sigmoid_sc.cli training-speed --merge "$PACK_DIR/training_speed.csv" \
        "$WORK/training_speed_shared_model.csv" --out-csv "$PACK_DIR/training_speed.csv" \
        --out-md "$PACK_DIR/training_speed.md"
fi

# ------------------------------------------------------------------------------------------
# pack: everything else in one archive (the host may return only PACK_MAX_FILES files)
cat "$WORK/parts.txt" >>"$PACK_DIR/versions.txt" 2>/dev/null
log "total $(($(date +%s) - T0))s"
tar -czf "$PACK_DIR/extras.tar.gz" -C "$WORK" . 2>>"$LOG"
rm -rf "$WORK"
ls -l "$PACK_DIR" >&2
N=$(find "$PACK_DIR" -type f | wc -l)
[ "$N" -le "$PACK_MAX_FILES" ] || log "WARNING: $N files in $PACK_DIR, more than PACK_MAX_FILES=$PACK_MAX_FILES"
grep -E '^stress .*: (stable|diverged)' "$LOG" || echo "stress: no verdict (see gpu_experiments.log)"
[ -f "$PACK_DIR/training_speed.md" ] && cat "$PACK_DIR/training_speed.md"
exit 0
