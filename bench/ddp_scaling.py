"""DDP scaling of training: tokens per second of the 160M encoder at 8K tokens on 1-8 GPUs.

The training step of ``sigmoid-sc train`` under torchrun (``sigmoid_sc.distributed``: the encoder and
its masked-gene loss wrapped by ``wrap_ddp``, each rank's slice of the global batch from
``shard_batch``, its loss weighted by its share of the masked tokens, fused AdamW, bf16
autocast), on the stress test's model (``sigmoid_sc.stress_test``: 10 layers, width 1024, 16 heads,
MLP 4096, vocabulary 25,000; 159,952,896 parameters) and its synthetic 8,192-token gene-rank
sequences. Weak scaling: every GPU gets ``--seqs-per-gpu`` sequences per step, so the global
batch grows with the GPUs; scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1).

For each N in ``--gpus`` (those above the visible GPUs are skipped, and said so) this script
launches ``python -m torch.distributed.run --standalone --nproc_per_node N`` on itself in
``--worker`` mode (N = 1: the plain single-process step, no DDP, as ``sigmoid-sc train`` runs); rank 0 times ``--repeats`` steps after ``--warmup`` (every step ends with a
CUDA synchronize, so a step's time includes its gradient all-reduce; the median is reported)
and writes one JSON per N; the launcher writes the table.

``--ddp`` names the DDP set-ups timed on N > 1 GPUs (each its own row): ``default`` (as
``sigmoid-sc train`` wraps the model), ``bucket_view`` (gradients as views into the all-reduce
buckets, static graph), ``bf16_grads`` (gradients all-reduced in bf16: half the bytes, rounded)
and ``no_sync`` (a diagnosis, not training: no all-reduce at all, so its gap to one GPU is what
DDP costs besides communication). ``--profile-dir`` writes, for each launch, rank 0's CUDA
kernel times over three profiled steps of each row (torch.profiler).

    python bench/ddp_scaling.py --out-csv ddp_scaling.csv \\
        --out-md ddp_scaling.md                                # on a multi-GPU machine
    python bench/ddp_scaling.py --smoke --out-csv x.csv --out-md x.md   # tiny, CPU/gloo

Without CUDA (and without ``--smoke``) it writes a table that says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # a checkout without installing the package

SMOKE = dict(  # a tiny model and short sequences: a CPU check of the whole path
    n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=203, seq_len=48, n_cell_types=3
)  # fmt: skip


DDP_VARIANTS = ("default", "bucket_view", "bf16_grads", "no_sync")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--attentions", nargs="+", default=["sigmoid", "softmax"])
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence")
    p.add_argument("--seqs-per-gpu", type=int, default=1, help="sequences per GPU per step")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--ddp", nargs="+", choices=DDP_VARIANTS, default=["default"])
    p.add_argument("--profile-dir", type=Path, help="kernel-time tables of rank 0, per launch")
    p.add_argument("--rounds", type=int, default=1, help="launch every GPU count this often")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (gloo), 1 and 2")
    p.add_argument("--out-csv", type=Path)
    p.add_argument("--out-md", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and (args.out_csv is None or args.out_md is None):
        p.error("--out-csv and --out-md are required")
    if args.smoke and "bf16_grads" in args.ddp:
        p.error("--ddp bf16_grads needs NCCL (CUDA); --smoke runs on gloo")
    if args.smoke:
        args.seq_len = SMOKE["seq_len"]
        args.gpus = [n for n in args.gpus if n <= 2] or [1, 2]
        args.precision = "fp32"
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    return args


# ----------------------------------------------------------------------------------------
# worker: one rank of a torchrun job


def stress_config(args):
    from sigmoid_sc import config

    over = dict(SMOKE) if args.smoke else {}
    over.update(seq_len=args.seq_len, batch_size=args.seqs_per_gpu * int(os.environ["WORLD_SIZE"]))
    return config.section("experiments.stress_test", over)


def ddp_options(variant: str) -> dict:
    """DistributedDataParallel keyword arguments of a ``--ddp`` set-up."""
    return (
        {"gradient_as_bucket_view": True, "static_graph": True} if variant == "bucket_view" else {}
    )


def profile_steps(run_step, batches, sync, cuda: bool) -> str:
    """Kernel times of three steps of ``run_step`` (ms, summed), the top 25, as markdown: the
    GPU's kernels (both streams: compute and NCCL), or on the CPU its operators' self times."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for b in batches[:3]:
            run_step(b)
        sync()
    kind, attr = ("CUDA", "self_device_time_total") if cuda else ("CPU", "self_cpu_time_total")
    # kernels only: GPU-side ranges of annotated regions (DistributedDataParallel.forward,
    # nccl:all_reduce, Optimizer.step) overlap the kernels they contain
    events = [
        e
        for e in prof.key_averages()
        if str(e.device_type).endswith(kind) and not getattr(e, "is_user_annotation", False)
    ]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) / 1e3
    lines = [f"{'GPU kernel' if cuda else 'CPU operator'} time, 3 steps: {total:.1f} ms", ""]
    lines += ["| kernel | calls | self ms |", "|---|---:|---:|"]
    for e in events[:25]:
        lines.append(f"| {e.key[:90]} | {e.count} | {getattr(e, attr) / 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def worker(args) -> None:
    import torch

    from sigmoid_sc.distributed import (
        MaskedGeneLoss,
        dist_from_env,
        init_distributed,
        shard_batch,
        wrap_ddp,
    )
    from sigmoid_sc.model import Encoder
    from sigmoid_sc.runtime import resolve_device
    from sigmoid_sc.stress_test import MASK_ID, RankSequences, count_parameters, model_config
    from sigmoid_sc.tokens import Batch

    dist = dist_from_env()
    dev = init_distributed(dist, resolve_device("cpu" if args.smoke else "cuda"))
    if args.smoke:
        torch.set_num_threads(1)
    cfg = stress_config(args)
    # the global batches, made before timing (data generation is not what is measured)
    data = RankSequences(cfg)
    batches = []
    for step in range(min(4, args.warmup + args.repeats)):
        ids, cu, masked = data.batch(step)
        n_masked = int(masked.sum())
        ids, cu, max_seqlen, masked = shard_batch(ids, cu, masked, dist.rank, dist.world)
        batches.append((Batch.masked(ids, cu, max_seqlen, masked, MASK_ID).to(dev), n_masked))
    use_bf16 = args.precision == "bf16" and dev.type == "cuda"

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(ddp, optimizer, batch, no_sync: bool):
        b, n_masked = batch
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            with ddp.no_sync() if no_sync else contextlib.nullcontext():
                loss_sum = ddp(
                    b.input_ids, b.cu_seqlens, b.max_seqlen, b.positions, b.targets, "sum"
                )
                optimizer.zero_grad(set_to_none=True)
                (loss_sum * (dist.world / n_masked)).backward()
        optimizer.step()

    rows, profiles = [], []
    variants = args.ddp if dist.world > 1 else ["none"]
    for attention in args.attentions:
        for variant in variants:
            torch.manual_seed(0)
            model = Encoder(model_config(cfg, attention)).to(dev)
            # one GPU: no DDP, as `sigmoid-sc train` in one process (the baseline of efficiency)
            ddp = (
                wrap_ddp(model, dev, **ddp_options(variant))
                if dist.world > 1
                else MaskedGeneLoss(model)
            )
            if variant == "bf16_grads":
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=dev.type == "cuda"
            )
            run = functools.partial(step, ddp, optimizer, no_sync=variant == "no_sync")
            times = []
            for i in range(args.warmup + args.repeats):
                sync()
                t0 = time.perf_counter()
                run(batches[i % len(batches)])
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            if args.profile_dir is not None and dist.main:
                profiles.append(f"## {attention}, {dist.world} GPU(s), DDP {variant}\n")
                profiles.append(profile_steps(run, batches, sync, dev.type == "cuda"))
            elif args.profile_dir is not None:  # the other ranks take the same steps
                for b in batches[:3]:
                    run(b)
                sync()
            # every rank's step ends with the same all-reduce; take the slowest rank's median
            rank_ms = [1e3 * float(np.median(times))]
            if dist.world > 1:
                gathered = [None] * dist.world
                torch.distributed.all_gather_object(gathered, rank_ms[0])
                rank_ms = gathered
            step_s = max(rank_ms) / 1e3
            tokens_per_step = cfg.batch_size * cfg.seq_len
            rows.append(
                {
                    "attention": attention,
                    "gpus": dist.world,
                    "ddp": variant,
                    "parameters": count_parameters(model),
                    "seq_len": cfg.seq_len,
                    "tokens_per_step": tokens_per_step,
                    "step_ms": 1e3 * step_s,
                    "rank_step_ms": " ".join(f"{t:.1f}" for t in rank_ms),
                    "tokens_per_s": tokens_per_step / step_s,
                    "peak_mem_gib": (
                        torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
                    ),
                }
            )
            del run, ddp, model, optimizer
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
    if profiles:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        (args.profile_dir / f"profile_{dist.world}gpu.md").write_text("\n".join(profiles))
    # the kernels' autotuned configs of every rank (each process tunes on its own)
    from sigmoid_sc.attention import triton_sigmoid

    tuned = [None] * dist.world
    if dist.world > 1:
        torch.distributed.all_gather_object(tuned, triton_sigmoid.autotuned_configs())
    else:
        tuned = [triton_sigmoid.autotuned_configs()]
    if dist.main:
        args.out_json.write_text(json.dumps({"rows": rows, "autotuned": tuned}))
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------
# launcher: one torchrun job per GPU count, then the table


def hardware(smoke: bool) -> str:
    import torch

    if not smoke and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()})"


def launch(args, n: int, out_json: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
        str(Path(__file__).resolve()), "--worker", "--out-json", str(out_json),
        "--attentions", *args.attentions, "--seq-len", str(args.seq_len),
        "--seqs-per-gpu", str(args.seqs_per_gpu), "--precision", args.precision,
        "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--ddp", *args.ddp,
    ] + (["--smoke"] if args.smoke else [])  # fmt: skip
    if args.profile_dir is not None:
        cmd += ["--profile-dir", str(args.profile_dir.resolve())]
    env = {**os.environ}
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    print(f"ddp_scaling: {n} process(es): {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, env=env, check=True)


def table(rows: list[dict]):
    """One row per (attention, GPUs, DDP set-up): the median step over the rounds, its range,
    and the efficiency from the medians."""
    import pandas as pd

    raw = pd.DataFrame(rows)
    frame = (
        raw.groupby(["attention", "gpus", "ddp"], sort=False)
        .agg(
            parameters=("parameters", "first"),
            seq_len=("seq_len", "first"),
            tokens_per_step=("tokens_per_step", "first"),
            rounds=("step_ms", "size"),
            step_ms=("step_ms", "median"),
            step_ms_min=("step_ms", "min"),
            step_ms_max=("step_ms", "max"),
            rank_step_ms=("rank_step_ms", " / ".join),
            peak_mem_gib=("peak_mem_gib", "max"),
        )
        .reset_index()
    )
    frame["tokens_per_s"] = frame.tokens_per_step / (frame.step_ms / 1e3)
    one = frame[frame.gpus == 1].set_index("attention").tokens_per_s
    frame["scaling_efficiency"] = [
        r.tokens_per_s / (r.gpus * one[r.attention]) if r.attention in one.index else np.nan
        for r in frame.itertuples()
    ]
    order = {v: i for i, v in enumerate(("none", *DDP_VARIANTS))}
    frame["_order"] = frame.ddp.map(order)
    frame = frame.sort_values(["attention", "gpus", "_order"]).drop(columns="_order")
    return frame.reset_index(drop=True)


def markdown(frame, header: list[str]) -> str:
    lines = [*header, ""]
    lines.append(
        "| attention | GPUs | DDP | tokens/step | step (ms) | per rank (ms) | tokens/s | per GPU "
        "| efficiency |"
    )
    lines.append("|---|---:|---|---:|---:|---|---:|---:|---:|")
    for r in frame.itertuples():
        eff = "" if np.isnan(r.scaling_efficiency) else f"{100 * r.scaling_efficiency:.1f}%"
        lines.append(
            f"| {r.attention} | {r.gpus} | {r.ddp} | {r.tokens_per_step:,} | {r.step_ms:.1f}"
            + (f" ({r.step_ms_min:.1f}-{r.step_ms_max:.1f})" if r.rounds > 1 else "")
            + " | "
            f"{r.rank_step_ms} | "
            f"{r.tokens_per_s:,.0f} | {r.tokens_per_s / r.gpus:,.0f} | {eff} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import pandas as pd
    import torch

    from sigmoid_sc.io import write_csv, write_text

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        "# DDP scaling: training tokens/s vs GPUs (bench/ddp_scaling.py)",
        "",
        f"- date: {date}; hardware: {hardware(args.smoke)}; torch {torch.__version__}",
        f"- {'smoke model (CPU, gloo)' if args.smoke else '160M encoder (sigmoid_sc.stress_test)'}, "
        f"{args.seq_len}-token sequences, {args.seqs_per_gpu} per GPU per step (weak scaling), "
        f"{args.precision}; median of {args.repeats} steps after {args.warmup}"
        + (
            f"; {args.rounds} rounds of launches (median over rounds, range in brackets)"
            if args.rounds > 1
            else ""
        ),
        "- efficiency: tokens/s on N GPUs / (N x tokens/s on 1 GPU)",
    ]
    available = 0 if args.smoke else torch.cuda.device_count()
    if not args.smoke and available == 0:
        header.append("- not run: no CUDA device (use --smoke for a CPU check)")
        write_csv(args.out_csv, pd.DataFrame(columns=["attention", "gpus", "tokens_per_s"]))
        write_text(args.out_md, "\n".join(header) + "\n")
        print("ddp_scaling: no CUDA device; wrote an empty table", file=sys.stderr)
        return 0
    counts = [n for n in args.gpus if args.smoke or n <= available]
    skipped = [n for n in args.gpus if n not in counts]
    if skipped:
        header.append(f"- not run: {skipped} GPUs (only {available} visible)")
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):  # interleaved: 1, 2, ..., 1, 2, ...
            for n in counts:
                out_json = Path(tmp) / f"{round_}_{n}.json"
                launch(args, n, out_json)
                result = json.loads(out_json.read_text())
                rows += result["rows"]
                where = f"round {round_}, " if args.rounds > 1 else ""
                for rank, lines in enumerate(result["autotuned"]):
                    notes += [f"- autotuned, {where}{n} GPU(s), rank {rank}: {x}" for x in lines]
    frame = table(rows)
    header += notes
    write_csv(args.out_csv, frame)
    write_text(args.out_md, markdown(frame, header))
    print(markdown(frame, header), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
