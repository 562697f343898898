"""``sigmoid-sc training-speed``: how fast the encoder trains, in one of two comparisons
(``--compare``). Both time the training loop's own step (:func:`sigmoid_sc.train.optimizer_step`
of :class:`sigmoid_sc.distributed.MaskedGeneLoss`, the optimiser of
:func:`sigmoid_sc.train.build_optimizer`) with the same clock (:func:`time_steps`) and count its
work with the same FLOP model (:func:`model_flops`).

``--compare implementations`` (the default; claim b, what the ``training_speed`` rule runs):
one training step of the encoder (forward, masked-gene loss, backward, fused AdamW), bf16
autocast, per attention implementation, on synthetic workloads:

- ``sigmoid_ours``: the model's sigmoid path (``attention_varlen("sigmoid")``: our Triton kernel
  on the packed tokens, no padding);
- ``softmax_varlen``: SDPA on nested jagged tensors (FA2-class varlen,
  ``SIGMOID_SC_SOFTMAX_BACKEND=njt`` in the model);
- ``softmax_flash_varlen``: PyTorch's FlashAttention varlen function on the packed tokens
  (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10; ``SIGMOID_SC_SOFTMAX_BACKEND=varlen``
  in the model);
- ``softmax_sdpa_cudnn``: SDPA's cuDNN backend on the padded ``[B, N, H, D]`` batch (a key
  mask when lengths differ), through the package's ``softmax_attention_varlen_padded``: the
  model's softmax path on CUDA;
- ``softmax_sdpa_flash``: SDPA's flash backend on the dense batch (fixed lengths only: it
  takes no mask);
- ``softmax_sdpa_padded``: SDPA's default dispatch on the padded batch with a key mask;
- ``sigmoid_triton_paper``: the paper's ``triton-sigmoid`` package on the padded batch, only
  if it is installed (a comparison, never a dependency).

The attention implementation is switched by rebinding ``sigmoid_sc.model.attention_varlen``
for the run, so every other layer is identical; the encoder hands every layer the batch's
:class:`sigmoid_sc.attention.VarlenBatch`, which the rebound functions read. Workloads:
``fixed`` (``seq_len`` tokens x ``tokens / seq_len`` sequences, 8K x 2 by default), ``real``
(cells drawn with seed 0 from the expressed genes per cell of real datasets,
``sigmoid_sc/data/lengths_*.txt``, until ``tokens``) and ``cells`` (a fresh batch of
``--cells-per-step`` cells drawn from ``--lengths-file`` every step, capped at ``seq_len``: the
training loop's situation, where the total token count changes from batch to batch). Step
time: median of ``repeats`` after ``warmup`` steps; tokens/s = real tokens per step (mean over
the timed steps for ``cells``) / step time; MFU = the step's model FLOPs / step time / peak.
The warm-up steps are timed too: ``first_step_ms`` (compilation and autotuning included) and
``warmup_steps_ms``.

The settings come from the config's ``experiments.training_speed`` section (``--params-json``,
as the ``training_speed`` rule passes it); options on the command line override them. Rows are
written (CSV and Markdown) after every implementation, so a run cut short keeps what it
measured; ``--time-limit`` skips the implementations not started in time (noted in the row).
The paper's kernel comes last: its autotuning (48 configs per head dim and length bucket) is
the slowest part on a fresh machine. ``--merge A.csv B.csv ...`` joins tables of several runs
(e.g. two model sizes) into one CSV and Markdown table. Without CUDA (and without ``--smoke``)
it writes a table that says so and exits 0.

``--compare variants``: the pipeline's training step on the training cells of a ``tokens.npz``
(``--tokens-npz``), the encoder of a pipeline config (its ``model`` and ``train`` sections,
``--config``, or ``--model-json``), per attention kind and step variant ``tokens[:B][+compile]``:
the training loop's step (:func:`sigmoid_sc.train.optimizer_step` on
:func:`sigmoid_sc.train.step_batch`): cells packed up to ``B`` tokens (default: the config's
``train.batch_tokens``), masks built on the host and sent in one pinned copy, the next batch
built while the device runs this one; ``+compile``: ``train.compile`` on.

A variant's ``@K1,K2`` runs it as ``K`` jobs at once (``K`` processes, one GPU), each with its
own seed, started together after their warm-up. Reported per case: tokens per second per job
(its real tokens over its wall time) and of all jobs together, the median step time, MFU of
all jobs together, and tokens/s per job over the first variant's. Without CUDA (and without
``--smoke``) it is an error. A caller can add variants of its own (:func:`run_variants`'s
``parse`` and ``job``; bench/train_step_before.py adds the step as it was before token
budgets); the job's pieces are :func:`setup_job`, :func:`pipeline_step` and
:func:`measure_job`.

The clock (:func:`time_steps`): CUDA events recorded at every step's start (and after the
last), nothing synchronised between the steps, so a step that asks the device nothing is timed
as the device runs it; ``perf_counter`` on the CPU. The FLOP model (:func:`model_flops`)::

    MFU = FLOPs / time / peak,   peak = 989 TFLOP/s (bf16 dense, H100 and H200 SXM)
    FLOPs of a step = 6 * P * T                       (matmul weights: P = L * (4 d^2 + 2 d f))
                    + 3.5 * L * 4 * sum_i(n_i^2) * d  (attention: forward 4 n^2 d a cell and
                                                       layer, forward + backward 3.5x forward)
                    + 6 * d * V * M                   (the tied head at the M masked tokens)

with T tokens in cells of n_i tokens, width d, MLP width f, L layers, V genes. Embedding
look-ups, norms and element-wise work count nothing.

    sigmoid-sc training-speed --out-csv training_speed.csv --out-md training_speed.md  # CUDA
    sigmoid-sc training-speed --smoke --out-csv x.csv --out-md x.md   # tiny, on the CPU
    sigmoid-sc training-speed --merge a.csv b.csv --out-csv ab.csv --out-md ab.md
    sigmoid-sc training-speed --compare variants --tokens-npz results/pbmc3k/tokens.npz \\
        --config configs/shared_data.yaml --variants tokens@1,4 tokens+compile@1 \\
        --out-csv steps.csv --out-md steps.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import math
import platform
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import config
from . import model as model_module
from .attention import (
    ATTENTION_KINDS,
    SDPA_REFUSED_VIEWS,
    VarlenBatch,
    attention_varlen,
    softmax_attention_varlen_flash,
    softmax_attention_varlen_njt,
    softmax_attention_varlen_padded,
)
from .attention.reference import pad_packed, unpad
from .errors import ConfigError, DataError
from .io import write_csv, write_text
from .model import Encoder, ModelConfig
from .runtime import parse_json_arg

#: expressed genes per cell of real datasets (pbmc3k, Baron pancreas), one number a line
LENGTHS_DIR = Path(__file__).with_name("data")
IMPLS = (
    "sigmoid_ours",
    "softmax_varlen",
    "softmax_flash_varlen",
    "softmax_sdpa_cudnn",
    "softmax_sdpa_flash",
    "softmax_sdpa_padded",
    "sigmoid_triton_paper",
)
CUDA_ONLY = (
    "softmax_flash_varlen", "softmax_sdpa_cudnn", "softmax_sdpa_flash", "sigmoid_triton_paper",
)  # fmt: skip
MASK_ID = 1
N_SPECIAL = 3
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # bf16 dense, SXM
SMOKE_MODEL = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "dropout": 0.0}
COMPARISONS = ("implementations", "variants")
#: the variants table's columns
VARIANT_COLUMNS = [
    "model", "attention", "variant", "jobs", "cells_per_step", "tokens_per_step", "step_ms",
    "tokens_per_s_job", "tokens_per_s_total", "mfu", "speedup_vs_first", "sigmoid_vs_softmax",
    "peak_mem_gib", "first_steps_s", "note",
]  # fmt: skip


class NotApplicable(Exception):
    """This implementation does not apply to this workload (recorded as a note, not timed)."""


# ---------------------------------------------------------------------------------------------
# the step, its clock and its FLOPs (both comparisons)


def autocast_for(precision: str, device: torch.device) -> Callable:
    """The training loop's autocast: bf16 on CUDA when asked for, nothing otherwise."""
    if precision == "bf16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mark(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed_ms(marks: list, device: torch.device) -> list[float]:
    if device.type == "cuda":
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    return [1e3 * (b - a) for a, b in zip(marks, marks[1:])]


@dataclass
class Timing:
    warmup_ms: list[float]  # each warm-up step (compilation, autotuning included)
    step_ms: list[float]  # each timed step
    first_steps_s: float  # wall time of the warm-up steps
    wall_s: float  # wall time of the timed steps, the last one finished
    finite: bool  # every step's loss finite


def time_steps(
    step: Callable[[int], torch.Tensor],
    warmup: int,
    repeats: int,
    device: torch.device,
    before_timed: Callable[[], None] | None = None,
) -> Timing:
    """Run ``step(0) ... step(warmup + repeats - 1)`` (each returns its loss, on the device) and
    time them: milliseconds between consecutive step starts (the last: to its end), nothing
    synchronised in between (a step that asks the device nothing lets the host run ahead, as
    in training). ``before_timed()`` runs between the warm-up and the timed steps (a barrier
    of jobs started together, a reset of the memory statistics)."""
    losses = []

    def run(steps: range) -> list[float]:
        marks = []
        for t in steps:
            marks.append(_mark(device))
            losses.append(step(t))
        marks.append(_mark(device))
        _sync(device)
        return _elapsed_ms(marks, device)

    _sync(device)
    t0 = time.perf_counter()
    warm = run(range(warmup)) if warmup else []
    first_steps_s = time.perf_counter() - t0
    if before_timed is not None:
        before_timed()
    t0 = time.perf_counter()
    timed = run(range(warmup, warmup + repeats))
    wall_s = time.perf_counter() - t0
    finite = bool(torch.isfinite(torch.stack(losses).float()).all()) if losses else True
    return Timing(warm, timed, first_steps_s, wall_s, finite)


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


def batch_stats(cu_seqlens: np.ndarray, n_masked: int) -> tuple[float, float, float, float]:
    """(tokens, sum of squared cell lengths, masked tokens, cells) of one packed batch: what
    :func:`model_flops` needs."""
    n = np.diff(np.asarray(cu_seqlens)).astype(np.float64)
    return float(n.sum()), float((n**2).sum()), float(n_masked), float(n.size)


def peak_flops(device_name: str, override_tflops: float = 0.0) -> float:
    """The device's peak (bf16 dense) in FLOP/s; NaN when unknown (then no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return float("nan")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or "cpu")
    )
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
    }


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(value, kind: str) -> str:
    value = _float(value)
    if not math.isfinite(value):
        return "-"
    if kind == "rate":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    if kind == "commas":
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.1f}"


def _error_note(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


# ---------------------------------------------------------------------------------------------
# implementations: attention functions (kind, q, k, v, cu_seqlens, max_seqlen, scale) -> [T, H, D]
# (``cu_seqlens``: the encoder's VarlenBatch, ``max_seqlen`` then None)


def _padded_sdpa(backend: str | None):
    """The package's padded SDPA softmax restricted to one SDPA backend (None: SDPA's own
    dispatch); all lengths equal (the fixed workload) is a plain reshape and no mask there."""

    def attend(kind, q, k, v, cu_seqlens, max_seqlen=None, scale=None, validate=True):  # noqa: ARG001 (the model's keyword)
        return softmax_attention_varlen_padded(
            q, k, v, cu_seqlens, max_seqlen, scale=scale, backends=[backend] if backend else None
        )

    return attend


def _njt_softmax(kind, q, k, v, cu_seqlens, max_seqlen=None, scale=None, validate=True):  # noqa: ARG001 (the model's keyword)
    return softmax_attention_varlen_njt(q, k, v, cu_seqlens, max_seqlen, scale=scale)


def _flash_varlen_softmax(kind, q, k, v, cu_seqlens, max_seqlen=None, scale=None, validate=True):  # noqa: ARG001 (the model's keyword)
    try:
        return softmax_attention_varlen_flash(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    except ValueError as exc:  # torch without the varlen function
        raise NotApplicable(str(exc)) from exc


def _paper_sigmoid(dense: bool):
    try:
        import triton_sigmoid
    except ImportError as exc:
        raise NotApplicable("triton-sigmoid is not installed") from exc

    def attend(kind, q, k, v, cu_seqlens, max_seqlen=None, scale=None, validate=True):  # noqa: ARG001 (the model's keyword)
        seqs = VarlenBatch.of(cu_seqlens, max_seqlen, q.shape[0])
        cu, longest = seqs.cu_seqlens, seqs.max_seqlen
        lengths = (cu[1:] - cu[:-1]).to(torch.int32)
        if dense:
            shape = (seqs.batch_size, longest, *q.shape[1:])
            # contiguous copies: the package is not documented to honour the strides of the
            # model's fused-qkv views (the copy is part of what using it costs)
            out = triton_sigmoid.sigmoid_attention(*(t.contiguous().view(shape) for t in (q, k, v)))
            return out.reshape(q.shape)
        qp, kp, vp = (pad_packed(t, cu, longest) for t in (q, k, v))
        out = triton_sigmoid.sigmoid_attention_padded(
            qp, kp, vp, seq_lens_k=lengths, seq_lens_q=lengths
        )
        return unpad(out, lengths)

    return attend


def attention_for(impl: str, dense: bool, device: torch.device):
    """(model attention kind, attention function) of one implementation on one workload."""
    if impl in CUDA_ONLY and device.type != "cuda":
        raise NotApplicable("needs CUDA")
    if impl == "sigmoid_ours":
        return "sigmoid", attention_varlen
    if impl == "softmax_varlen":  # on the CPU (smoke runs): the model's varlen reference
        return "softmax", _njt_softmax if device.type == "cuda" else attention_varlen
    if impl == "softmax_flash_varlen":
        return "softmax", _flash_varlen_softmax
    if impl == "softmax_sdpa_padded":
        return "softmax", _padded_sdpa(None)
    if impl == "softmax_sdpa_cudnn":
        return "softmax", _padded_sdpa("CUDNN_ATTENTION")
    if impl == "softmax_sdpa_flash":
        if not dense:
            raise NotApplicable("flash takes no key mask; varlen flash is softmax_varlen")
        return "softmax", _padded_sdpa("FLASH_ATTENTION")
    if impl == "sigmoid_triton_paper":
        return "sigmoid", _paper_sigmoid(dense)
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


@contextlib.contextmanager
def model_attention(fn):
    """Rebind the encoder's attention entry point for the duration of a run."""
    saved = model_module.attention_varlen
    model_module.attention_varlen = fn
    try:
        yield
    finally:
        model_module.attention_varlen = saved


# ---------------------------------------------------------------------------------------------
# implementations: workloads


def length_pool(paths: list[Path], max_len: int, divisor: int = 1) -> np.ndarray:
    """Expressed genes per cell of every file in ``paths``, shrunk by ``divisor``, capped."""
    pool = np.concatenate([np.loadtxt(p, dtype=np.int64, comments="#", ndmin=1) for p in paths])
    if pool.size == 0:
        raise DataError(f"{', '.join(map(str, paths))}: no cell lengths found")
    return np.clip(pool // divisor, 1, max_len)


def default_length_files() -> list[Path]:
    return sorted(LENGTHS_DIR.glob("lengths_*.txt"))


def real_lengths(tokens: int, max_len: int, divisor: int = 1, seed: int = 0) -> np.ndarray:
    """Cells drawn (seeded) from every data/lengths_*.txt until ``tokens``, capped at max_len.

    ``divisor`` shrinks every length (the CPU smoke run keeps their spread at a tiny size).
    """
    pool = length_pool(default_length_files(), max_len, divisor)
    rng = np.random.default_rng(seed)
    picked, total = [], 0
    while total < tokens:
        n = int(pool[rng.integers(pool.size)])
        n = min(n, tokens - total) if total + n > tokens and picked else n
        picked.append(n)
        total += n
    return np.array(picked, dtype=np.int64)


def workloads(args) -> list[tuple[str, list[np.ndarray]]]:
    """(name, lengths of each step's batch): one batch reused for ``fixed`` and ``real``,
    ``warmup + repeats`` different batches for ``cells``."""
    out = []
    if "fixed" in args.workloads:
        batch = max(1, args.tokens // args.seq_len)
        out.append((f"fixed {args.seq_len} x {batch}", [np.full(batch, args.seq_len)]))
    if "real" in args.workloads:
        lengths = real_lengths(args.tokens, args.seq_len, args.length_divisor)
        out.append(
            (
                f"real cells (median {int(np.median(lengths))}, max {lengths.max()}, {lengths.size} cells)",
                [lengths],
            )
        )
    if "cells" in args.workloads:
        files = (
            [Path(f) for f in args.lengths_file] if args.lengths_file else default_length_files()
        )
        pool = length_pool(files, args.seq_len, args.length_divisor)
        rng = np.random.default_rng(0)
        steps = [
            pool[rng.integers(pool.size, size=args.cells_per_step)]
            for _ in range(args.warmup + args.repeats)
        ]
        names = "+".join(f.stem.removeprefix("lengths_") for f in files)
        out.append(
            (
                f"cells {names} {args.cells_per_step}/step (new batch every step, "
                f"median {int(np.median(np.concatenate(steps)))}, cap {args.seq_len})",
                steps,
            )
        )
    return out


def make_batch(lengths: np.ndarray, vocab_size: int, rng: np.random.Generator):
    """A :class:`sigmoid_sc.tokens.Batch` (on the host) of cells of ``lengths``, random genes,
    masked as in training; with its :func:`batch_stats`."""
    from .tokens import Batch, choose_masked

    cu = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = np.concatenate([rng.permutation(vocab_size - N_SPECIAL)[:n] + N_SPECIAL for n in lengths])
    masked = choose_masked(cu, 0.15, rng)
    batch = Batch.masked(ids.astype(np.int64), cu, int(lengths.max()), masked, MASK_ID)
    return batch, batch_stats(cu, batch.n_masked)


# ---------------------------------------------------------------------------------------------
# implementations: the table


def cases(args, loads) -> list[tuple]:
    """(workload index, d_model, head_dim, impl) in run order: the paper's kernel last."""
    out = [
        (w, d_model, head_dim, impl)
        for w in range(len(loads))
        for d_model in args.d_models
        for head_dim in args.head_dims
        if d_model % head_dim == 0
        for impl in args.impls
    ]
    return sorted(out, key=lambda c: c[3] == "sigmoid_triton_paper")  # stable


def run_implementations(args, on_rows=None) -> pd.DataFrame:
    """Every case's row; ``on_rows(frame)`` after each (partial results on disk)."""
    from .distributed import MaskedGeneLoss
    from .train import build_optimizer, optimizer_step

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    env = environment(device)
    peak = peak_flops(env["device"], args.peak_tflops)
    precision = args.precision if device.type == "cuda" else "fp32"
    train_cfg = config.section("train", {"precision": precision})
    autocast = autocast_for(precision, device)
    t_start = time.perf_counter()
    loads = workloads(args)
    prepared = {}  # workload index -> (batches on the device, their stats), built on first use
    rows = []
    for w, d_model, head_dim, impl in cases(args, loads):
        workload, step_lengths = loads[w]
        if w not in prepared:
            rng = np.random.default_rng(0)
            built = [make_batch(n, args.vocab_size, rng) for n in step_lengths]
            prepared[w] = ([b.to(device) for b, _ in built], [s for _, s in built])
        batches, stats = prepared[w]
        n_steps = args.warmup + args.repeats
        # the timed steps' batches (step i trains on batch i % len)
        timed = [stats[i % len(stats)] for i in range(args.warmup, n_steps)]
        tokens = float(np.mean([s[0] for s in timed]))
        dense = len(step_lengths) == 1 and bool((step_lengths[0] == step_lengths[0][0]).all())
        max_len = max(int(n.max()) for n in step_lengths)
        row = {
            **env,
            "workload": workload,
            "tokens": int(round(tokens)),
            "n_cells": int(round(np.mean([s[3] for s in timed]))),
            "n_layers": args.n_layers,
            "d_model": d_model,
            "n_heads": d_model // head_dim,
            "head_dim": head_dim,
            "vocab_size": args.vocab_size,
            "precision": precision,
            "impl": impl,
            "n_params": "",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "first_step_ms": float("nan"),
            "warmup_steps_ms": "",
            "step_ms_median": float("nan"),
            "step_ms_p10": float("nan"),
            "step_ms_p90": float("nan"),
            "step_ms_max": float("nan"),
            "tokens_per_s": float("nan"),
            "mfu": float("nan"),
            "note": "",
        }
        SDPA_REFUSED_VIEWS.clear()  # a row notes its own copies
        model = optimizer = None
        try:
            if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                raise NotApplicable(f"skipped: --time-limit {args.time_limit:g} s reached")
            kind, fn = attention_for(impl, dense, device)
            model_cfg = ModelConfig(
                n_layers=args.n_layers, d_model=d_model, n_heads=d_model // head_dim,
                d_ff=4 * d_model, vocab_size=args.vocab_size,
                max_len=max(args.seq_len, max_len), attention=kind,
            )  # fmt: skip
            torch.manual_seed(0)
            model = Encoder(model_cfg).to(device)
            model.train()
            row["attention"] = kind
            row["n_params"] = sum(p.numel() for p in model.parameters())
            optimizer, scheduler = build_optimizer(model, train_cfg, device)
            loss_module = MaskedGeneLoss(model)

            def step(i, batches=batches, parts=(loss_module, optimizer, scheduler)):
                return optimizer_step(*parts, batches[i % len(batches)], autocast)

            with model_attention(fn):
                timing = time_steps(step, args.warmup, args.repeats, device)
            median = float(np.median(timing.step_ms))
            flops = np.mean(
                [model_flops(dataclasses.asdict(model_cfg), args.vocab_size, *s[:3]) for s in timed]
            )
            row.update(
                first_step_ms=timing.warmup_ms[0] if timing.warmup_ms else float("nan"),
                warmup_steps_ms=" ".join(f"{t:.1f}" for t in timing.warmup_ms),
                step_ms_median=median,
                step_ms_p10=float(np.percentile(timing.step_ms, 10)),
                step_ms_p90=float(np.percentile(timing.step_ms, 90)),
                step_ms_max=float(np.max(timing.step_ms)),
                tokens_per_s=tokens / (median / 1000),
                mfu=flops / (median / 1000) / peak,
            )
            notes = []
            if SDPA_REFUSED_VIEWS:
                notes.append("q, k, v copied to contiguous (strided views refused)")
            if not timing.finite:
                notes.append("non-finite loss")
            row["note"] = "; ".join(notes)
        except NotApplicable as exc:
            row["note"] = str(exc) if str(exc).startswith("skipped") else f"not applicable: {exc}"
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as exc:  # a backend that refuses a shape is a finding
            row["note"] = _error_note(exc)
        finally:
            model = optimizer = None  # noqa: F841
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row.setdefault("attention", "sigmoid" if impl.startswith("sigmoid") else "softmax")
        print(
            f"{workload[:40]:40s} L{args.n_layers} d{d_model} hd{head_dim} {impl:22s} "
            f"{row['step_ms_median']:8.2f} ms (first {row['first_step_ms']:.0f} ms) "
            f"{row['note']}",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
        if on_rows is not None:
            on_rows(add_relative(pd.DataFrame(rows)))
    return add_relative(pd.DataFrame(rows))


def add_relative(frame: pd.DataFrame) -> pd.DataFrame:
    """``speedup_vs_best_softmax``: the fastest softmax step of the same setting / this step."""
    keys = ["workload", "d_model", "head_dim"]
    softmax = frame[frame["attention"] == "softmax"].groupby(keys)["step_ms_median"].min()
    best = frame.set_index(keys).index.map(lambda k: softmax.get(k, float("nan")))
    frame["speedup_vs_best_softmax"] = np.asarray(best, dtype=float) / frame["step_ms_median"]
    return frame


def markdown_implementations(frame: pd.DataFrame) -> str:
    """The table of one run or of merged runs (each row names its model and step counts)."""
    first = frame.iloc[0] if len(frame) else {}
    lines = [
        "# Training-step speed: sigmoid vs softmax attention",
        "",
        f"{first.get('date', '')}, {first.get('device', '')}, torch {first.get('torch', '')}, "
        f"triton {first.get('triton', '')}. Encoder with MLP 4x width, masked-gene loss, "
        "bf16 autocast on CUDA (fp32 on the CPU), fused AdamW (CUDA). Step ms: median over "
        "the timed steps (p10-p90) after the warm-up steps; first step: the first warm-up "
        "step, compilation and autotuning included. MFU: model FLOPs (6 P T + attention "
        "3.5 x 4 sum n^2 d L + head 6 d V M) / step time / the device's bf16 peak.",
        "",
        "| workload | layers x width | heads x hd | implementation | step ms (p10-p90) | "
        "first step ms | steps (warm-up + timed) | tokens/s | MFU | speed-up vs best softmax "
        "| note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in frame.iterrows():
        median = _float(r.get("step_ms_median"))
        ms = (
            f"{median:.1f} ({_float(r['step_ms_p10']):.1f}-{_float(r['step_ms_p90']):.1f})"
            if math.isfinite(median)
            else "-"
        )
        note = r.get("note")
        lines.append(
            f"| {r['workload']} | {r.get('n_layers', '')} x {r['d_model']} | "
            f"{r['n_heads']} x {r['head_dim']} | {r['impl']} | {ms} | "
            f"{_fmt(r.get('first_step_ms'), 'int')} | "
            f"{r.get('warmup', '')} + {r.get('repeats', '')} | "
            f"{_fmt(r.get('tokens_per_s'), 'commas')} | {_fmt(r.get('mfu'), 'pct')} | "
            f"{_fmt(r.get('speedup_vs_best_softmax'), 'x')} | "
            f"{'' if not isinstance(note, str) else note} |"
        )
    lines += [
        "",
        "Speed-up > 1: faster than the fastest softmax implementation of the same workload and "
        "model.",
    ]
    cells = frame[frame["workload"].astype(str).str.startswith("cells")]
    if len(cells):
        lines += [
            "",
            "Workload `cells`: a new batch of real cell lengths every step, so the total token "
            "count changes from step to step; warm-up step times (ms), in order:",
            "",
        ]
        for _, r in cells.iterrows():
            if not isinstance(r.get("warmup_steps_ms"), str) or not r["warmup_steps_ms"]:
                continue  # not timed
            lines.append(
                f"- {r['impl']}, {r.get('n_layers', '')} x {r['d_model']}, hd {r['head_dim']}: "
                f"{r.get('warmup_steps_ms', '')}"
            )
    return "\n".join(lines) + "\n"


def merge(paths: list[str]) -> pd.DataFrame:
    """The rows of several runs' CSVs, one table (speed-ups recomputed per setting)."""
    frames = []
    for path in paths:
        if not Path(path).is_file():
            print(f"training-speed --merge: {path} is missing, left out", file=sys.stderr)
            continue
        # warm-up times stay text ("12.5 3.1"), even when a run had a single warm-up step
        frame = pd.read_csv(path, dtype={"warmup_steps_ms": str, "note": str})
        if "workload" in frame.columns:  # a skipped run's table has no rows to merge
            frames.append(frame)
    if not frames:
        raise DataError(f"training-speed --merge: no table among {', '.join(paths)}")
    frame = pd.concat(frames, ignore_index=True).drop(
        columns=["speedup_vs_best_softmax"], errors="ignore"
    )
    return add_relative(frame)


def write_skipped(args, reason: str) -> None:
    frame = pd.DataFrame(
        [{**environment(torch.device("cpu")), "status": "skipped", "reason": reason}]
    )
    write_csv(args.out_csv, frame)
    write_text(
        args.out_md, f"# Training-step speed: sigmoid vs softmax attention\n\nSkipped: {reason}\n"
    )
    print(f"training-speed: skipped, {reason}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# variants: one job (runs in its own process)


@dataclass(frozen=True)
class Variant:
    name: str  # as given, e.g. "tokens:65536+compile"
    batch_tokens: int = 0  # the budget (0: the config's)
    compile: bool = False
    jobs: tuple[int, ...] = (1,)


def parse_jobs(text: str) -> tuple[str, tuple[int, ...]]:
    """``SPEC[@K1,K2,...]`` -> (SPEC, jobs); ``(1,)`` without ``@``."""
    spec, _, jobs_text = text.partition("@")
    try:
        jobs = tuple(int(k) for k in jobs_text.split(",")) if jobs_text else (1,)
    except ValueError:
        jobs = ()
    if not jobs or min(jobs) < 1:
        raise ConfigError(f"variant {text!r}: jobs after @ must be integers >= 1, e.g. @1,4")
    return spec, jobs


def parse_variant(text: str) -> Variant:
    """``tokens[:B][+compile]``, then optionally ``@K1,K2,...`` (jobs)."""
    spec, jobs = parse_jobs(text)
    name = spec
    compile_on = spec.endswith("+compile")
    kind, _, number = spec.removesuffix("+compile").partition(":")
    if kind == "tokens" and (number == "" or (number.isdigit() and int(number) > 0)):
        return Variant(name, batch_tokens=int(number or 0), compile=compile_on, jobs=jobs)
    raise ConfigError(f"variant {text!r}: expected tokens[:BUDGET][+compile], then @JOBS")


@dataclass
class JobSetup:
    """What every variant's step trains: the case's model, optimiser and data
    (:func:`setup_job`)."""

    spec: dict
    device: torch.device
    train: config.Train
    model_config: ModelConfig
    model: Encoder
    optimizer: torch.optim.Optimizer
    scheduler: object
    autocast: Callable
    tokens: object  # sigmoid_sc.tokens.Tokens
    train_cells: np.ndarray
    seed: int
    stats: list = dataclasses.field(default_factory=list)  # batch_stats of each step


def setup_job(spec: dict, batch_tokens: int = 0, compile_on: bool = False) -> JobSetup:
    """The model, optimiser and data of one case. ``spec['model']`` and ``spec['train']``: the
    config's sections (dicts; validated here), ``train.batch_tokens`` replaced by
    ``batch_tokens`` when given, ``train.compile`` by ``compile_on``."""
    from .runtime import resolve_device
    from .tokens import load_tokens
    from .train import build_optimizer

    dev = resolve_device(spec["device"])
    torch.set_num_threads(1)  # as the pipeline's train jobs (OMP_NUM_THREADS = the rule's threads)
    tokens = load_tokens(spec["tokens"], "training-speed")
    train_params = dict(spec["train"])
    if batch_tokens:
        train_params["batch_tokens"] = batch_tokens
    train_params["compile"] = compile_on
    cfg = config.section("train", train_params)
    model_cfg = ModelConfig(
        **dataclasses.asdict(config.section("model", spec["model"])),
        vocab_size=tokens.vocab_size,
        max_len=tokens.max_len,
        attention=spec["attention"],
    )
    seed = spec["seed"]
    torch.manual_seed(seed)
    model = Encoder(model_cfg).to(dev)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg, dev)
    return JobSetup(
        spec, dev, cfg, model_cfg, model, optimizer, scheduler,
        autocast_for(cfg.precision, dev), tokens, tokens.cells("train"), seed,
    )  # fmt: skip


def pipeline_step(job: JobSetup) -> Callable[[int], torch.Tensor]:
    """The training loop's step ``t`` (:func:`sigmoid_sc.train.optimizer_step` on the token
    budget's batch, the next one packed while the device runs this one); its loss."""
    from .distributed import MaskedGeneLoss
    from .tokens import TokenBatches
    from .train import compile_loss, optimizer_step, step_batch

    cfg, tokens, dev = job.train, job.tokens, job.device
    lengths = np.diff(tokens.offsets)
    batches = TokenBatches(job.train_cells, lengths[job.train_cells], cfg.batch_tokens, job.seed)
    loss_module = compile_loss(MaskedGeneLoss(job.model), dev, cfg.compile)
    upcoming = {}

    def prepare(t: int) -> None:
        batch, _, _ = step_batch(tokens, batches, t, job.seed, cfg.mask_prob)
        upcoming[t] = (batch.to(dev), batch_stats(batch.cu_seqlens, batch.n_masked))

    def step(t: int):
        if t not in upcoming:
            prepare(t)
        batch, stat = upcoming.pop(t)
        loss = optimizer_step(loss_module, job.optimizer, job.scheduler, batch, job.autocast)
        prepare(t + 1)  # the host packs the next batch while the device runs this one
        job.stats.append(stat)
        return loss

    return step


def measure_job(job: JobSetup, step: Callable[[int], torch.Tensor], barrier=None) -> dict:
    """Train ``spec['warmup'] + spec['steps']`` steps with ``step`` (which appends each step's
    :func:`batch_stats` to ``job.stats``); the timing and work of the last ones."""
    spec, dev = job.spec, job.device

    def before_timed() -> None:
        if barrier is not None:
            barrier.wait()  # every job starts its timed steps together
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

    timing = time_steps(step, spec["warmup"], spec["steps"], dev, before_timed)
    timed = np.array(job.stats[spec["warmup"] : spec["warmup"] + spec["steps"]], dtype=np.float64)
    n_tokens, sum_sq, n_masked, n_cells = timed.sum(axis=0)
    flops = model_flops(
        dataclasses.asdict(job.model_config), job.tokens.vocab_size, n_tokens, sum_sq, n_masked
    )
    return {
        "tokens": float(n_tokens),
        "tokens_per_step": float(n_tokens) / spec["steps"],
        "cells_per_step": float(n_cells) / spec["steps"],
        "flops": float(flops),
        "wall_s": timing.wall_s,
        "step_ms": float(np.median(timing.step_ms)),
        "first_steps_s": timing.first_steps_s,
        "finite": timing.finite,
        "peak_mem_gib": (
            torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        ),
    }


def run_job(spec: dict, barrier=None) -> dict:
    """One case of a ``tokens`` variant (``spec['variant']``), timed."""
    variant = parse_variant(spec["variant"])
    job = setup_job(spec, variant.batch_tokens, variant.compile)
    return measure_job(job, pipeline_step(job), barrier)


def _job_process(job: Callable, spec: dict, barrier, queue) -> None:
    try:
        queue.put(job(spec, barrier))
    except BaseException as exc:  # reported as the case's note, never a hang
        with contextlib.suppress(Exception):
            barrier.abort()
        queue.put({"error": _error_note(exc)})


def run_jobs(spec: dict, jobs: int, timeout: float, job: Callable = run_job) -> list[dict]:
    """``jobs`` processes of one case (seeds ``seed, seed + 1, ...``), timed steps together;
    each runs ``job(spec, barrier)`` (a module-level function: it is sent to a new process)."""
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, queue = ctx.Barrier(jobs), ctx.Queue()
    procs = [
        ctx.Process(
            target=_job_process, args=(job, {**spec, "seed": spec["seed"] + k}, barrier, queue)
        )
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
    finally:  # also on SIGTERM (see run_training_speed): no job goes on using the GPU
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return results


# ---------------------------------------------------------------------------------------------
# variants: cases, table


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
    """speedup_vs_first: tokens/s per job over the first variant's at the same model, kind and
    jobs; sigmoid_vs_softmax: the sigmoid row's tokens/s per job over softmax's."""

    def key(r, **over):
        return tuple({**r, **over}[k] for k in ("model", "attention", "variant", "jobs"))

    by_key = {key(r): r for r in rows}
    first = rows[0]["variant"] if rows else ""
    for r in rows:
        r["speedup_vs_first"] = _ratio(r, by_key.get(key(r, variant=first)))
        other = by_key.get(key(r, attention="softmax"))
        r["sigmoid_vs_softmax"] = _ratio(r, other) if r["attention"] == "sigmoid" else float("nan")


def _ratio(row: dict, base: dict | None) -> float:
    if base is None:
        return float("nan")
    a, b = _float(row.get("tokens_per_s_job")), _float(base.get("tokens_per_s_job"))
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def markdown_variants(rows: list[dict], env: dict) -> str:
    lines = [
        "# Training speed: the pipeline's training step, alone and sharing one GPU",
        "",
        f"{env['date']}, {env['device']}, torch {env['torch']}, triton {env['triton']}; "
        f"tokens {env['tokens']}; {env['steps']} timed steps after {env['warmup']}. tok/s: real "
        "tokens per second (per job; all jobs together). MFU: model FLOPs (6 P T + attention "
        "3.5 x 4 sum n^2 d L + head 6 d V M) / time / the device's bf16 peak, of all jobs "
        "together. vs first: tokens/s per job over the first variant's (same kind and jobs). "
        "Warm-up s: the slowest job's steps before timing (compilation, autotuning).",
        "",
        "| model | attention | variant | jobs | cells/step | tokens/step | step ms | tok/s per job "
        "| tok/s all | MFU | vs first | sigmoid / softmax | peak GiB | warm-up s | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['variant']} | {r['jobs']} | "
            f"{_fmt(r.get('cells_per_step'), 'f')} | {_fmt(r.get('tokens_per_step'), 'commas')} | "
            f"{_fmt(r.get('step_ms'), 'f')} | {_fmt(r.get('tokens_per_s_job'), 'rate')} | "
            f"{_fmt(r.get('tokens_per_s_total'), 'rate')} | {_fmt(r.get('mfu'), 'pct')} | "
            f"{_fmt(r.get('speedup_vs_first'), 'x')} | {_fmt(r.get('sigmoid_vs_softmax'), 'x')} | "
            f"{_fmt(r.get('peak_mem_gib'), 'f')} | {_fmt(r.get('first_steps_s'), 'f')} | "
            f"{r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def config_sections(paths: list[str], model_json: str) -> tuple[dict, dict]:
    """The ``model`` and ``train`` sections of pipeline config files (later ones merged over
    earlier ones, validated as the pipeline validates them; none: the schema's defaults), the
    model keys of ``model_json`` over the config's."""
    raw = config.load(*paths).raw if paths else {}
    model = dict(raw.get("model") or {})
    if model_json:
        model.update(parse_json_arg(model_json, "--model-json"))
    return model, dict(raw.get("train") or {})


def run_variants(args, parse: Callable = parse_variant, job: Callable = run_job) -> str:
    """Every case of ``--variants`` x jobs x ``--attentions``; the Markdown table.

    ``parse(text)``: a variant (its ``name`` and ``jobs``); ``job(spec, barrier)``: one case of
    it, timed (``spec['variant']`` is the variant's text). A caller adds variants of its own by
    passing both."""
    from .runtime import resolve_device

    dev = resolve_device("cpu" if args.smoke else args.device)
    env = environment(dev)
    peak = peak_flops(env["device"], args.peak_tflops)
    model, train = config_sections(args.config, args.model_json)
    if args.smoke:
        model = dict(SMOKE_MODEL)
    config.section("model", model)  # a wrong key fails before any job starts
    # the config's step as it trains (its lr warm-up included); nothing stops the timed steps
    train = {**train, "steps": 10**9, "stop": {**(train.get("stop") or {}), "rule": "none"}}
    if dev.type == "cpu":
        train["precision"] = "fp32"
    label = args.label or f"{model.get('n_layers', '?')}x{model.get('d_model', '?')}"
    env = {**env, "tokens": Path(args.tokens_npz).name, "steps": args.repeats}
    env["warmup"] = args.warmup
    rows, t_start, text = [], time.perf_counter(), ""
    for variant in [parse(v) for v in args.variants]:
        for jobs in variant.jobs:
            for attention in args.attentions:
                row = {"model": label, "attention": attention, "variant": variant.name}
                row["jobs"] = jobs
                if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                    row["note"] = f"skipped: --time-limit {args.time_limit:g} s reached"
                else:
                    spec = {
                        "tokens": str(args.tokens_npz), "model": model, "train": train,
                        "attention": attention, "variant": variant.name, "seed": 0,
                        "device": dev.type, "steps": args.repeats, "warmup": args.warmup,
                    }  # fmt: skip
                    results = run_jobs(spec, jobs, args.job_timeout, job)
                    row.update(summarise(results, jobs, peak))
                rows.append(row)
                print(
                    f"training-speed {label} {attention} {variant.name} x{jobs}: "
                    f"{_fmt(row.get('tokens_per_s_job'), 'rate')} tok/s a job, "
                    f"step {_fmt(row.get('step_ms'), 'f')} ms, MFU {_fmt(row.get('mfu'), 'pct')} "
                    f"{row.get('note', '')}",
                    file=sys.stderr,
                    flush=True,
                )
                text = write_variants(rows, env, args)  # a run cut short keeps what it measured
    return text


def write_variants(rows: list[dict], env: dict, args) -> str:
    rows = [dict(r) for r in rows]
    add_ratios(rows)
    frame = pd.DataFrame(rows).reindex(columns=["date", "device", *VARIANT_COLUMNS])
    frame["date"], frame["device"] = env["date"], env["device"]
    write_csv(args.out_csv, frame)
    text = markdown_variants(rows, env)
    write_text(args.out_md, text)
    return text


# ---------------------------------------------------------------------------------------------
# CLI

#: settings of the config's section; the command line may override each
SETTINGS = ("n_layers", "d_models", "head_dims", "vocab_size", "seq_len", "tokens", "workloads",
            "precision", "warmup", "repeats", "smoke")  # fmt: skip
#: options of one comparison only -> their default there
ONLY = {
    "implementations": {
        "params_json": None, "n_layers": None, "d_models": None, "head_dims": None,
        "vocab_size": None, "seq_len": None, "tokens": None, "workloads": None,
        "cells_per_step": 64, "lengths_file": None, "impls": list(IMPLS), "precision": None,
        "merge": None,
    },
    "variants": {
        "tokens_npz": None, "config": [], "model_json": "", "label": "",
        "attentions": list(ATTENTION_KINDS), "variants": ["tokens@1"],
        "device": "cuda", "job_timeout": 300.0,
    },
}  # fmt: skip


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--compare", choices=COMPARISONS, default="implementations",
        help="implementations: attention implementations on synthetic workloads (claim b, the "
        "training_speed rule); variants: the training step's variants on a tokens.npz, one "
        "job and K jobs on one GPU, tokens/s and MFU",
    )  # fmt: skip
    ap.add_argument("--out-csv", required=True)
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--warmup", type=int, help="steps before timing (compilation, autotuning)")
    ap.add_argument("--repeats", "--steps", type=int, help="timed steps (a job's)")
    ap.add_argument(
        "--time-limit", type=float, default=0.0,
        help="seconds; cases not started by then are recorded as skipped (0: none)",
    )  # fmt: skip
    ap.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the device's peak for MFU (0: known ones)"
    )
    ap.add_argument("--smoke", action="store_true", default=None, help="a tiny CPU run (tests)")
    impl = ap.add_argument_group("--compare implementations")
    impl.add_argument(
        "--params-json", help="the config's experiments.training_speed section (JSON)"
    )
    impl.add_argument("--n-layers", type=int)
    impl.add_argument("--d-models", type=int, nargs="+")
    impl.add_argument("--head-dims", type=int, nargs="+")
    impl.add_argument("--vocab-size", type=int)
    impl.add_argument("--seq-len", type=int, help="fixed workload: tokens per sequence")
    impl.add_argument("--tokens", type=int, help="tokens per step (fixed and real workloads)")
    impl.add_argument("--workloads", nargs="+", choices=("fixed", "real", "cells"))
    impl.add_argument("--cells-per-step", type=int, help="cells workload: batch size (64)")
    impl.add_argument(
        "--lengths-file", nargs="+", help="cells workload: lengths files (default: data/lengths_*)"
    )
    impl.add_argument("--impls", nargs="+", choices=IMPLS, help="default: all")
    impl.add_argument("--precision", choices=("bf16", "fp32"))
    impl.add_argument("--merge", nargs="+", metavar="CSV", help="join these tables, time nothing")
    var = ap.add_argument_group("--compare variants")
    var.add_argument("--tokens-npz", help="a tokens.npz (its training cells are trained on)")
    var.add_argument(
        "--config", nargs="+", help="pipeline config files (their model and train sections)"
    )
    var.add_argument("--model-json", help="model keys over the config's, as JSON")
    var.add_argument("--label", help="the model's name in the table (default LxD)")
    var.add_argument("--attentions", nargs="+", choices=ATTENTION_KINDS)
    var.add_argument(
        "--variants", nargs="+",
        help="tokens[:BUDGET][+compile], each optionally @JOBS,JOBS (processes); default: tokens@1",
    )  # fmt: skip
    var.add_argument("--device", choices=("cuda", "auto"), help="default: cuda")
    var.add_argument("--job-timeout", type=float, help="seconds a case may take (300)")


def settle(args: argparse.Namespace, parse: Callable = parse_variant) -> argparse.Namespace:
    """The options of ``args.compare`` checked and completed: the other comparison's options
    refused, the config section's settings under the options given on the command line, every
    variant parsed by ``parse``."""
    compare = getattr(args, "compare", "implementations")
    other = next(c for c in COMPARISONS if c != compare)
    given = [name for name in ONLY[other] if getattr(args, name, None) is not None]
    if given:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"training-speed: {options} belong to --compare {other}, not {compare}")
    for name, default in {**ONLY["implementations"], **ONLY["variants"]}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    section = config.section(
        "experiments.training_speed", parse_json_arg(args.params_json or "{}", "--params-json")
    )
    for name in SETTINGS:
        if getattr(args, name) is None:
            value = getattr(section, name)
            setattr(args, name, list(value) if isinstance(value, tuple) else value)
    args.length_divisor = 1
    if compare == "implementations" and args.smoke:  # seconds on a CPU: tiny widths and lengths
        args.n_layers, args.d_models, args.head_dims = 2, [32], [8, 16]
        args.vocab_size, args.seq_len, args.tokens = 200, 64, 128
        args.cells_per_step = min(args.cells_per_step, 4)
        args.warmup, args.repeats, args.precision = 1, 3, "fp32"
        args.length_divisor = 50  # real lengths of a few hundred to thousands -> ~10-90
    if compare == "variants":
        if not args.tokens_npz:
            raise ConfigError("training-speed --compare variants needs --tokens-npz (a tokens.npz)")
        if args.repeats < 1 or args.warmup < 0:
            raise ConfigError(
                f"training-speed: --repeats {args.repeats} must be >= 1 and --warmup "
                f"{args.warmup} >= 0"
            )
        for variant in args.variants:
            parse(variant)  # a typo fails before any job starts
    return args


def run_training_speed(
    args: argparse.Namespace, parse: Callable = parse_variant, job: Callable = run_job
) -> None:
    """The stage; ``parse`` and ``job``: the variants of ``--compare variants`` (see
    :func:`run_variants`)."""
    args = settle(args, parse)
    if args.compare == "variants":
        from .runtime import resolve_device

        if not args.smoke and resolve_device(args.device).type != "cuda":
            raise ConfigError(
                "training-speed --compare variants times GPU training steps: run it with CUDA, "
                "or --smoke"
            )
        # SIGTERM (e.g. `timeout`) ends the run through SystemExit: the running case's jobs
        # are killed, the cases measured so far are on disk
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
        print(run_variants(args, parse, job), end="")
        return
    if args.merge:
        frame = merge(args.merge)
        write_csv(args.out_csv, frame)
        write_text(args.out_md, markdown_implementations(frame))
        return
    if not args.smoke and not torch.cuda.is_available():
        write_skipped(args, "no CUDA GPU on this machine (training-speed times GPU training steps)")
        return

    def write(frame: pd.DataFrame) -> None:
        write_csv(args.out_csv, frame)
        write_text(args.out_md, markdown_implementations(frame))

    write(run_implementations(args, on_rows=write))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "training-speed",
        help="training-step speed of the encoder: per attention implementation (a GPU table), "
        "or per step variant as one and K jobs on one GPU (tokens/s, MFU)",
        description=__doc__.splitlines()[0],
    )
    add_arguments(p)
    p.set_defaults(func=run_training_speed)
