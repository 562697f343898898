"""Does a model learn the stability sweep's task? Loss against chance over one run, on any device.

Runs the stress test's training loop (sigmoid_sc.stress_test.run_arm) on the ``ordered`` task
with a config given as JSON (keys of experiments.stress_test) and prints the mean loss of every
``--every`` steps as a fraction of chance, ln(vocab_size - 3); ``--csv`` appends one row per run.

    PYTHONPATH=src python bench/stability_task.py --lr 3e-3 --steps 600 --attention softmax \\
        --config '{"n_layers": 2, "d_model": 64, "n_heads": 2, "d_ff": 256, "vocab_size": 515,
                   "seq_len": 128, "batch_size": 4, "rank_noise": 2.0, "module_size": 16}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from sigmoid_sc import config
from sigmoid_sc import stress_test as stress

TASK = {"task": "ordered", "task_seed": 0, "n_cell_types": 16, "module_size": 16,
        "rank_noise": 2.0, "warmup_steps": 50, "schedule": "cosine", "precision": "fp32",
        "early_steps": 20, "logit_queries": 16, "max_seconds": 1e9}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--steps", type=int, required=True, help="max_steps, warm-up included")
    parser.add_argument("--attention", default="softmax", choices=("softmax", "sigmoid"))
    parser.add_argument("--config", default="{}", help="experiments.stress_test keys (JSON)")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--verbose", action="store_true", help="the loop's log every 10 steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config.section(
        "experiments.stress_test",
        {**TASK, **json.loads(args.config), "lr": args.lr, "max_steps": args.steps},
    )
    t0 = time.perf_counter()
    rows, summary = stress.run_arm(
        cfg, args.attention, torch.device(args.device),
        log=(lambda m: print(m, flush=True)) if args.verbose else (lambda *_: None),
    )  # fmt: skip
    chance = stress.chance_loss(cfg)
    loss = pd.Series([r["loss"] for r in rows])
    curve = {
        end: float(loss.iloc[max(0, end - args.every // 4) : end].mean())
        for end in range(args.every, len(loss) + 1, args.every)
    }
    print(f"{args.attention} norm={cfg.norm} qk_norm={cfg.qk_norm} lr={args.lr:g}: "
          f"{summary['n_params']:,} parameters, {len(rows)} steps, "
          f"{time.perf_counter() - t0:.0f}s; chance {chance:.3f}; first steps "
          f"{loss.iloc[:10].mean():.3f}")  # fmt: skip
    for end, value in curve.items():
        print(f"  step {end}: loss {value:.3f} ({value / chance:.0%} of chance)")
    print(f"  stop: {summary['stop_reason']}, max attention logit {rows[-1]['max_attn_logit']:.3g}")
    if args.csv:
        row = {"attention": args.attention, "norm": cfg.norm, "qk_norm": cfg.qk_norm,
               "lr": args.lr, "steps": len(rows), "n_params": summary["n_params"],
               "chance": chance, "final_loss": curve[max(curve)] if curve else None,
               "config": json.dumps(json.loads(args.config), sort_keys=True)}  # fmt: skip
        path = Path(args.csv)
        pd.DataFrame([row]).to_csv(path, mode="a", header=not path.exists(), index=False)


if __name__ == "__main__":
    main()
