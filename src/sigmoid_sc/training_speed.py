"""``sigmoid-sc training-speed``: the pipeline's own training step on real cells, one job alone
and several jobs sharing one GPU.

Each case trains the encoder of a pipeline config (its ``model`` and ``train`` sections, or
``--model``) on the training cells of a ``tokens.npz`` for ``--warmup`` then ``--steps`` steps,
per attention kind and variant:

- ``today:C``: the step as it was before token budgets, emulated line by line: ``C`` cells a
  step (one seeded permutation per epoch, the remainder dropped), ids and the boolean mask
  copied from pageable memory, the loss indexing hidden states with the boolean mask on the
  device (two host syncs a step);
- ``tokens[:B]``: the training loop's step (:func:`sigmoid_sc.train.optimizer_step` on
  :func:`sigmoid_sc.train.step_batch`): cells packed up to ``B`` tokens (default: the config's
  ``train.batch_tokens``), masks built on the host and sent in one pinned copy, the next batch
  built while the device runs this one; ``+compile``: ``train.compile`` on.

A variant's ``@K1,K2`` runs it as ``K`` jobs at once (``K`` processes, one GPU), each with its own
seed, started together after their warm-up. Reported per case: tokens per second per job (its
real tokens over its wall time) and of all jobs together, the median step time (CUDA events
between step starts, nothing synchronised inside the timed steps), and model FLOP utilisation

    MFU = FLOPs / time / peak,   peak = 989 TFLOP/s (bf16 dense, H100 and H200 SXM)
    FLOPs of a step = 6 * P * T                       (matmul weights: P = L * (4 d^2 + 2 d f))
                    + 3.5 * L * 4 * sum_i(n_i^2) * d  (attention: forward 4 n^2 d a cell and
                                                       layer, forward + backward 3.5x forward)
                    + 6 * d * V * M                   (the tied head at the M masked tokens)

with T tokens in cells of n_i tokens, width d, MLP width f, L layers, V genes. Embedding look-ups,
norms and element-wise work count nothing. For ``K`` jobs MFU is of all jobs together.

Output: ``training_speed.csv`` and ``training_speed.md`` in ``--out``; the table also goes to
stdout. ``--smoke``: a tiny model on the CPU (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # bf16 dense, SXM
SMOKE_MODEL = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "dropout": 0.0}
COLUMNS = [
    "model", "attention", "variant", "jobs", "cells_per_step", "tokens_per_step", "step_ms",
    "tokens_per_s_job", "tokens_per_s_total", "mfu", "speedup_vs_today", "sigmoid_vs_softmax",
    "peak_mem_gib", "first_steps_s", "note",
]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    name: str  # as given, e.g. "tokens:65536+compile"
    today: bool  # the emulated step before token budgets
    cells: int = 0  # today: cells a step
    batch_tokens: int = 0  # tokens: the budget (0: the config's)
    compile: bool = False
    jobs: tuple[int, ...] = (1,)


def parse_variant(text: str) -> Variant:
    """``today:C`` | ``tokens[:B][+compile]``, then optionally ``@K1,K2,...`` (jobs)."""
    spec, _, jobs_text = text.partition("@")
    try:
        jobs = tuple(int(k) for k in jobs_text.split(",")) if jobs_text else (1,)
    except ValueError:
        jobs = ()
    if not jobs or min(jobs) < 1:
        raise ConfigError(f"variant {text!r}: jobs after @ must be integers >= 1, e.g. @1,4")
    name = spec
    compile_on = spec.endswith("+compile")
    spec = spec.removesuffix("+compile")
    kind, _, number = spec.partition(":")
    if kind == "today" and number.isdigit() and int(number) > 0 and not compile_on:
        return Variant(name, True, cells=int(number), jobs=jobs)
    if kind == "tokens" and (number == "" or (number.isdigit() and int(number) > 0)):
        return Variant(name, False, batch_tokens=int(number or 0), compile=compile_on, jobs=jobs)
    raise ConfigError(
        f"variant {text!r}: expected today:CELLS or tokens[:BUDGET][+compile], then @JOBS"
    )


# ----------------------------------------------------------------------------------------------
# FLOPs


def matmul_params(model: dict) -> int:
    """Weights of the encoder's matrix multiplications: q, k, v, out (4 d^2), the MLP (2 d f)."""
    d, f = model["d_model"], model["d_ff"]
    return model["n_layers"] * (4 * d * d + 2 * d * f)


def model_flops(
    model: dict, vocab_size: int, n_tokens: float, sum_sq: float, n_masked: float
) -> float:
    """Model FLOPs of training steps (forward + backward) on ``n_tokens`` tokens in cells whose
    squared lengths sum to ``sum_sq``, ``n_masked`` of them masked (see the module docstring)."""
    d, layers = model["d_model"], model["n_layers"]
    dense = 6.0 * matmul_params(model) * n_tokens
    attention = 3.5 * layers * 4.0 * sum_sq * d
    head = 6.0 * d * vocab_size * n_masked
    return dense + attention + head


def peak_flops(device_name: str) -> float:
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return float("nan")


# ----------------------------------------------------------------------------------------------
# one job (runs in its own process)


def today_cells(train_cells: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The cells of step ``step`` before token budgets: ``batch_size`` cells of a permutation
    seeded by ``(seed, epoch)``, ``len // batch_size`` batches an epoch."""
    batch_size = min(batch_size, train_cells.size)
    per_epoch = train_cells.size // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 0, epoch]).permutation(train_cells.size)
    return train_cells[order[index * batch_size : (index + 1) * batch_size]]


def today_loss(model, input_ids, cu_seqlens, max_seqlen, masked, mask_id):
    """The masked-gene loss before host-built batches: boolean indexing on the device."""
    import torch
    import torch.nn.functional as F

    corrupted = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    hidden = model(corrupted, cu_seqlens, max_seqlen)
    logits = model.gene_logits(hidden[masked])
    return F.cross_entropy(logits.float(), input_ids[masked])


def run_job(spec: dict, barrier=None) -> dict:
    """Train ``spec['warmup'] + spec['steps']`` steps of one case; the timing of the last ones."""
    import torch

    from .distributed import MaskedGeneLoss
    from .model import Encoder
    from .runtime import resolve_device
    from .tokens import TokenBatches, choose_masked, load_tokens, pack
    from .train import (
        build_optimizer,
        compile_loss,
        optimizer_step,
        parse_model_config,
        parse_train_config,
        step_batch,
    )

    dev = resolve_device(spec["device"])
    torch.set_num_threads(1)  # as the pipeline's train jobs (OMP_NUM_THREADS = the rule's threads)
    variant = parse_variant(spec["variant"])
    tokens = load_tokens(spec["tokens"], "training-speed")
    train_params = dict(spec["train"])
    if variant.batch_tokens:
        train_params["batch_tokens"] = variant.batch_tokens
    train_params["compile"] = variant.compile
    cfg = parse_train_config(train_params)
    model_cfg = parse_model_config(
        spec["model"], spec["attention"], tokens.vocab_size, tokens.max_len
    )
    seed = spec["seed"]
    torch.manual_seed(seed)
    model = Encoder(model_cfg).to(dev)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg, dev)
    use_bf16 = cfg.precision == "bf16" and dev.type == "cuda"

    def autocast():
        if use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    train_cells = tokens.cells("train")
    lengths = np.diff(tokens.offsets)
    stats = []  # (tokens, sum of n^2, masked tokens, cells) of each step

    if variant.today:

        def step(t: int):
            cells = today_cells(train_cells, variant.cells, seed, t)
            ids, cu, max_seqlen = pack(tokens, cells)
            masked = choose_masked(cu, cfg.mask_prob, np.random.default_rng([seed, 1, t]))
            ids_t = torch.from_numpy(ids).to(dev, non_blocking=True)
            cu_t = torch.from_numpy(cu).to(dev, non_blocking=True)
            masked_t = torch.from_numpy(masked).to(dev, non_blocking=True)
            with autocast():
                loss = today_loss(model, ids_t, cu_t, max_seqlen, masked_t, tokens.mask_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            n = np.diff(cu)
            stats.append((n.sum(), (n.astype(np.float64) ** 2).sum(), masked.sum(), n.size))
            return loss.detach()

    else:
        batches = TokenBatches(train_cells, lengths[train_cells], cfg.batch_tokens, seed)
        loss_module = compile_loss(MaskedGeneLoss(model), dev, cfg.compile)
        upcoming = {}

        def prepare(t: int) -> None:
            batch, _, _ = step_batch(tokens, batches, t, seed, cfg.mask_prob)
            n = np.diff(batch.cu_seqlens)
            upcoming[t] = (
                batch.to(dev),
                (n.sum(), (n.astype(np.float64) ** 2).sum(), batch.n_masked, n.size),
            )

        def step(t: int):
            if t not in upcoming:
                prepare(t)
            batch, stat = upcoming.pop(t)
            loss = optimizer_step(loss_module, optimizer, scheduler, batch, autocast)
            prepare(t + 1)  # the host packs the next batch while the device runs this one
            stats.append(stat)
            return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    losses = []
    t0 = time.perf_counter()
    for t in range(spec["warmup"]):
        losses.append(step(t))
    sync()
    first_steps_s = time.perf_counter() - t0
    if barrier is not None:
        barrier.wait()  # every job starts its timed steps together
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    events = []
    t0 = time.perf_counter()
    for t in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        if dev.type == "cuda":
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        else:
            events.append(time.perf_counter())
        losses.append(step(t))
    if dev.type == "cuda":
        events.append(torch.cuda.Event(enable_timing=True))
        events[-1].record()
    sync()
    wall = time.perf_counter() - t0
    if dev.type == "cuda":
        step_ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    else:
        events.append(time.perf_counter())
        step_ms = [1e3 * (b - a) for a, b in zip(events, events[1:])]
    loss_values = torch.stack(losses).float().cpu().numpy()
    timed = np.array(stats[spec["warmup"] : spec["warmup"] + spec["steps"]], dtype=np.float64)
    n_tokens, sum_sq, n_masked, n_cells = timed.sum(axis=0)
    flops = model_flops(
        dataclasses.asdict(model_cfg), tokens.vocab_size, n_tokens, sum_sq, n_masked
    )
    return {
        "tokens": float(n_tokens),
        "tokens_per_step": float(n_tokens) / spec["steps"],
        "cells_per_step": float(n_cells) / spec["steps"],
        "flops": float(flops),
        "wall_s": wall,
        "step_ms": float(np.median(step_ms)),
        "first_steps_s": first_steps_s,
        "finite": bool(np.isfinite(loss_values).all()),
        "peak_mem_gib": (
            torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        ),
    }


def _job_process(spec: dict, barrier, queue) -> None:
    try:
        queue.put(run_job(spec, barrier))
    except BaseException as exc:  # reported as the case's note, never a hang
        with contextlib.suppress(Exception):
            barrier.abort()
        queue.put(
            {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        )


def run_jobs(spec: dict, jobs: int, timeout: float) -> list[dict]:
    """``jobs`` processes of one case (seeds ``seed, seed + 1, ...``), timed steps together."""
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, queue = ctx.Barrier(jobs), ctx.Queue()
    procs = [
        ctx.Process(target=_job_process, args=({**spec, "seed": spec["seed"] + k}, barrier, queue))
        for k in range(jobs)
    ]
    results, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while len(results) < jobs:
            try:
                results.append(queue.get(timeout=2.0))
            except queue_module.Empty:
                if time.monotonic() > deadline:
                    results.append({"error": f"no result within {timeout:g} s"})
                elif all(not p.is_alive() for p in procs) and queue.empty():
                    codes = ", ".join(str(p.exitcode) for p in procs)
                    results.append({"error": f"a job died without a result (exit codes {codes})"})
                else:
                    continue
                break
        for p in procs:
            p.join(timeout=30)
    finally:  # also on SIGTERM (see _run): no job may go on using the GPU after its case
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return results


# ----------------------------------------------------------------------------------------------
# cases, table


def summarise(results: list[dict], jobs: int, peak: float) -> dict:
    errors = [r["error"] for r in results if "error" in r]
    if errors or len(results) < jobs:
        return {"note": errors[0] if errors else "a job gave no result"}
    per_job = [r["tokens"] / r["wall_s"] for r in results]
    total = sum(r["tokens"] for r in results) / max(r["wall_s"] for r in results)
    flops = sum(r["flops"] for r in results) / max(r["wall_s"] for r in results)
    return {
        "cells_per_step": float(np.mean([r["cells_per_step"] for r in results])),
        "tokens_per_step": float(np.mean([r["tokens_per_step"] for r in results])),
        "step_ms": float(np.median([r["step_ms"] for r in results])),
        "tokens_per_s_job": float(np.mean(per_job)),
        "tokens_per_s_total": total,
        "mfu": flops / peak,
        "peak_mem_gib": max(r["peak_mem_gib"] for r in results),
        "first_steps_s": max(r["first_steps_s"] for r in results),
        "note": "" if all(r["finite"] for r in results) else "non-finite loss",
    }


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_today: tokens/s per job over the ``today`` variant's at the same model, kind
    and jobs; sigmoid_vs_softmax: the sigmoid row's tokens/s per job over softmax's."""

    def key(r, **over):
        return tuple({**r, **over}[k] for k in ("model", "attention", "variant", "jobs"))

    by_key = {key(r): r for r in rows}
    today = {
        (r["model"], r["attention"], r["jobs"]): r for r in rows if r["variant"].startswith("today")
    }
    for r in rows:
        base = today.get((r["model"], r["attention"], r["jobs"]))
        r["speedup_vs_today"] = _ratio(r, base)
        other = by_key.get(key(r, attention="softmax"))
        r["sigmoid_vs_softmax"] = _ratio(r, other) if r["attention"] == "sigmoid" else float("nan")


def _ratio(row: dict, base: dict | None) -> float:
    if base is None:
        return float("nan")
    a, b = row.get("tokens_per_s_job", float("nan")), base.get("tokens_per_s_job", float("nan"))
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def _fmt(value, kind: str) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(value):
        return "-"
    if kind == "rate":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "int":
        return f"{value:,.0f}"
    return f"{value:.1f}"


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# Training speed: the pipeline's training step, alone and sharing one GPU",
        "",
        f"{env['date']}, {env['device']}, torch {env['torch']}, triton {env['triton']}; "
        f"tokens {env['tokens']}; {env['steps']} timed steps after {env['warmup']}. tok/s: real "
        "tokens per second (per job; all jobs together). MFU: model FLOPs (6 P T + attention "
        "3.5 x 4 sum n^2 d L + head 6 d V M) / time / 989 TFLOP/s, of all jobs together. "
        "vs today: tokens/s per job over the today variant's (same kind and jobs). Warm-up s: "
        "the slowest job's steps before timing (compilation, autotuning).",
        "",
        "| model | attention | variant | jobs | cells/step | tokens/step | step ms | tok/s per job "
        "| tok/s all | MFU | vs today | sigmoid / softmax | peak GiB | warm-up s | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['variant']} | {r['jobs']} | "
            f"{_fmt(r.get('cells_per_step'), 'f')} | {_fmt(r.get('tokens_per_step'), 'int')} | "
            f"{_fmt(r.get('step_ms'), 'f')} | {_fmt(r.get('tokens_per_s_job'), 'rate')} | "
            f"{_fmt(r.get('tokens_per_s_total'), 'rate')} | {_fmt(r.get('mfu'), 'pct')} | "
            f"{_fmt(r.get('speedup_vs_today'), 'x')} | {_fmt(r.get('sigmoid_vs_softmax'), 'x')} | "
            f"{_fmt(r.get('peak_mem_gib'), 'f')} | {_fmt(r.get('first_steps_s'), 'f')} | "
            f"{r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def environment(device_name: str, args) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "tokens": Path(args.tokens).name,
        "steps": args.steps,
        "warmup": args.warmup,
    }


def load_config(paths: list[str]) -> tuple[dict, dict]:
    """The ``model`` and ``train`` sections of pipeline config files, merged key by key."""
    import yaml

    model, train = {}, {}
    for path in paths:
        try:
            config = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"training-speed: cannot read {path}: {exc}") from exc
        model.update(config.get("model") or {})
        train.update(config.get("train") or {})
    return model, train


def measure(args) -> list[dict]:
    import torch

    from .runtime import resolve_device

    dev = resolve_device("cpu" if args.smoke else args.device)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device_name)
    model, train = load_config(args.config)
    if args.model_json:
        import json

        model.update(json.loads(args.model_json))
    if args.smoke:
        model = dict(SMOKE_MODEL)
    # the config's step as it trains (its lr warm-up included); nothing stops the timed steps
    train = {**train, "steps": 10**9, "stop": {"rule": "none"}}
    train.pop("checkpoint_every", None)
    if dev.type == "cpu":
        train["precision"] = "fp32"
    label = args.label or f"{model.get('n_layers', '?')}x{model.get('d_model', '?')}"
    variants = [parse_variant(v) for v in args.variants]
    env = environment(device_name or dev.type, args)
    rows, t_start = [], time.perf_counter()
    for variant in variants:
        for jobs in variant.jobs:
            for attention in args.attentions:
                row = {
                    "model": label,
                    "attention": attention,
                    "variant": variant.name,
                    "jobs": jobs,
                }
                if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                    row["note"] = f"skipped: --time-limit {args.time_limit:g} s reached"
                else:
                    spec = {
                        "tokens": str(args.tokens), "model": model, "train": train,
                        "attention": attention, "variant": variant.name, "seed": 0,
                        "device": dev.type, "steps": args.steps, "warmup": args.warmup,
                    }  # fmt: skip
                    row.update(summarise(run_jobs(spec, jobs, args.job_timeout), jobs, peak))
                rows.append(row)
                print(
                    f"training-speed {label} {attention} {variant.name} x{jobs}: "
                    f"{_fmt(row.get('tokens_per_s_job'), 'rate')} tok/s a job, "
                    f"step {_fmt(row.get('step_ms'), 'f')} ms, MFU {_fmt(row.get('mfu'), 'pct')} "
                    f"{row.get('note', '')}",
                    file=sys.stderr,
                    flush=True,
                )
                write_outputs(rows, env, args.out)  # a run cut short keeps what it measured
    return rows


def write_outputs(rows: list[dict], env: dict, out: str | os.PathLike) -> str:
    import pandas as pd

    from .io import write_csv, write_text

    rows = [dict(r) for r in rows]
    add_ratios(rows)
    frame = pd.DataFrame(rows).reindex(columns=["date", "device", *COLUMNS])
    frame["date"], frame["device"] = env["date"], env["device"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "training_speed.csv", frame)
    text = markdown(rows, env)
    write_text(out / "training_speed.md", text)
    return text


def _run(args: argparse.Namespace) -> None:
    from .runtime import resolve_device

    if not args.smoke and resolve_device(args.device).type != "cuda":
        raise ConfigError("training-speed times GPU training steps: run it with CUDA, or --smoke")
    for name in ("steps", "warmup"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            raise ConfigError(f"training-speed: --{name} is {getattr(args, name)}, too small")
    for variant in args.variants:
        parse_variant(variant)  # a typo fails before any job starts
    # SIGTERM (e.g. `timeout`) ends the run through SystemExit: the running case's jobs are
    # killed, the cases measured so far are on disk
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    measure(args)
    print(Path(args.out, "training_speed.md").read_text(), end="")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "training-speed",
        help="tokens/s and MFU of the pipeline's training step, alone and as K jobs on one GPU",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--tokens", required=True, help="a tokens.npz (its training cells are used)")
    p.add_argument("--out", required=True, help="folder for training_speed.csv and .md")
    p.add_argument(
        "--config", nargs="*", default=[], help="pipeline config files (model and train sections)"
    )
    p.add_argument("--model-json", default="", help="model keys over the config's, as JSON")
    p.add_argument("--label", default="", help="the model's name in the table (default LxD)")
    p.add_argument("--attentions", nargs="+", default=["softmax", "sigmoid"])
    p.add_argument(
        "--variants",
        nargs="+",
        default=["today:64@1", "tokens@1"],
        help="today:CELLS | tokens[:BUDGET][+compile], each optionally @JOBS,JOBS (processes)",
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps a job")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation)")
    p.add_argument("--device", default="cuda", choices=("cuda", "auto"))
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's peak")
    p.add_argument(
        "--time-limit", type=float, default=0.0, help="seconds; later cases are skipped (0: none)"
    )
    p.add_argument("--job-timeout", type=float, default=300.0, help="seconds a case may take")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (tests)")
    p.set_defaults(func=_run)
