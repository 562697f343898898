"""``sigmoid-sc training-speed``: training-step time of the encoder per attention implementation
(claim b): sigmoid (our Triton kernel, packed) vs softmax.

One full optimiser step of the pipeline's own encoder (:class:`sigmoid_sc.model.Encoder`:
forward, masked-gene loss, backward, fused AdamW), bf16 autocast, per attention implementation:

- ``sigmoid_ours``: the model's sigmoid path (``attention_varlen("sigmoid")``: our Triton kernel
  on the packed tokens, no padding);
- ``softmax_varlen``: SDPA on nested jagged tensors (FA2-class varlen,
  ``SIGMOID_SC_SOFTMAX_BACKEND=njt`` in the model);
- ``softmax_sdpa_cudnn``: SDPA's cuDNN backend on the padded ``[B, N, H, D]`` batch (a key
  mask when lengths differ), through the package's ``softmax_attention_varlen_padded``: the
  model's softmax path on CUDA;
- ``softmax_sdpa_flash``: SDPA's flash backend on the dense batch (fixed lengths only: it
  takes no mask);
- ``softmax_sdpa_padded``: SDPA's default dispatch on the padded batch with a key mask;
- ``sigmoid_triton_paper``: the paper's ``triton-sigmoid`` package on the padded batch, only
  if it is installed (a comparison, never a dependency).

The attention implementation is switched by rebinding ``sigmoid_sc.model.attention_varlen``
for the run, so every other layer is identical. Workloads: ``fixed`` (``seq_len`` tokens x
``tokens / seq_len`` sequences, 8K x 2 by default), ``real`` (cells drawn with seed 0 from the
expressed genes per cell of real datasets, ``sigmoid_sc/data/lengths_*.txt``, until ``tokens``)
and ``cells`` (a fresh batch of ``--cells-per-step`` cells drawn from ``--lengths-file`` every
step, capped at ``seq_len``: the training loop's situation, where the total token count
changes from batch to batch). Step time: CUDA events around each step, median of ``repeats``
after ``warmup`` steps (perf_counter on the CPU); tokens/s = real tokens per step (mean over
the timed steps for ``cells``) / step time. The warm-up steps are timed too:
``first_step_ms`` (compilation and autotuning included) and ``warmup_steps_ms``.

The settings come from the config's ``experiments.training_speed`` section (``--params-json``,
as the ``training_speed`` rule passes it); options on the command line override them. Rows are
written (CSV and Markdown) after every implementation, so a run cut short keeps what it
measured; ``--time-limit`` skips the implementations not started in time (noted in the row).
The paper's kernel comes last: its autotuning (48 configs per head dim and length bucket) is
the slowest part on a fresh machine. ``--merge A.csv B.csv ...`` joins tables of several runs
(e.g. two model sizes) into one CSV and Markdown table.

    sigmoid-sc training-speed --out-csv training_speed.csv --out-md training_speed.md  # CUDA
    sigmoid-sc training-speed --smoke --out-csv x.csv --out-md x.md   # tiny, on the CPU
    sigmoid-sc training-speed --merge a.csv b.csv --out-csv ab.csv --out-md ab.md

Without CUDA (and without ``smoke``) it writes a table that says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import config
from . import model as model_module
from .attention import (
    SDPA_REFUSED_VIEWS,
    attention_varlen,
    softmax_attention_varlen_njt,
    softmax_attention_varlen_padded,
)
from .attention.reference import pad_packed, unpad
from .errors import DataError
from .io import write_csv, write_text
from .model import Encoder, ModelConfig
from .runtime import parse_json_arg
from .tokens import choose_masked, masked_gene_loss

#: expressed genes per cell of real datasets (pbmc3k, Baron pancreas), one number a line
LENGTHS_DIR = Path(__file__).with_name("data")
IMPLS = (
    "sigmoid_ours",
    "softmax_varlen",
    "softmax_sdpa_cudnn",
    "softmax_sdpa_flash",
    "softmax_sdpa_padded",
    "sigmoid_triton_paper",
)
CUDA_ONLY = ("softmax_sdpa_cudnn", "softmax_sdpa_flash", "sigmoid_triton_paper")
MASK_ID = 1
N_SPECIAL = 3


class NotApplicable(Exception):
    """This implementation does not apply to this workload (recorded as a note, not timed)."""


# ---------------------------------------------------------------------------------------------
# attention implementations: (kind, q, k, v, cu_seqlens, max_seqlen, scale) -> [T, H, D]


def _padded_sdpa(backend: str | None):
    """The package's padded SDPA softmax restricted to one SDPA backend (None: SDPA's own
    dispatch); all lengths equal (the fixed workload) is a plain reshape and no mask there."""

    def attend(kind, q, k, v, cu_seqlens, max_seqlen, scale=None, validate=True):  # noqa: ARG001 (the model's keyword)
        return softmax_attention_varlen_padded(
            q, k, v, cu_seqlens, max_seqlen, scale=scale, backends=[backend] if backend else None
        )

    return attend


def _njt_softmax(kind, q, k, v, cu_seqlens, max_seqlen, scale=None, validate=True):  # noqa: ARG001 (the model's keyword)
    return softmax_attention_varlen_njt(q, k, v, cu_seqlens, max_seqlen, scale=scale)


def _paper_sigmoid(dense: bool):
    try:
        import triton_sigmoid
    except ImportError as exc:
        raise NotApplicable("triton-sigmoid is not installed") from exc

    def attend(kind, q, k, v, cu_seqlens, max_seqlen, scale=None, validate=True):  # noqa: ARG001 (the model's keyword)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
        if dense:
            batch = lengths.numel()
            shape = (batch, max_seqlen, *q.shape[1:])
            # contiguous copies: the package is not documented to honour the strides of the
            # model's fused-qkv views (the copy is part of what using it costs)
            out = triton_sigmoid.sigmoid_attention(*(t.contiguous().view(shape) for t in (q, k, v)))
            return out.reshape(q.shape)
        qp, kp, vp = (pad_packed(t, cu_seqlens, max_seqlen) for t in (q, k, v))
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
# workloads


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


def make_batch(lengths: np.ndarray, vocab_size: int, device, rng: np.random.Generator):
    """(input_ids, cu_seqlens, max_seqlen, masked) of cells of ``lengths`` on ``device``."""
    cu = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = np.concatenate([rng.permutation(vocab_size - N_SPECIAL)[:n] + N_SPECIAL for n in lengths])
    masked = choose_masked(cu, 0.15, rng)
    return (
        torch.from_numpy(ids).to(device),
        torch.from_numpy(cu).to(device),
        int(lengths.max()),
        torch.from_numpy(masked).to(device),
    )


# ---------------------------------------------------------------------------------------------
# timing


def time_steps(
    model, optimizer, batches, device, precision: str, warmup: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Milliseconds of ``warmup`` then ``repeats`` full training steps: (warm-up, timed).

    Step ``i`` trains on ``batches[i % len(batches)]``; every step is timed alone (CUDA
    events, synchronised after each), the warm-up ones too (compilation, autotuning).
    """
    use_bf16 = precision == "bf16" and device.type == "cuda"

    def step(i):
        ids, cu, max_seqlen, masked = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
            loss = masked_gene_loss(model, ids, cu, max_seqlen, masked, MASK_ID)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(i)
            times.append(1000 * (time.perf_counter() - t0))
    return times[:warmup], times[warmup:]


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


def run(args, on_rows=None) -> pd.DataFrame:
    """Every case's row; ``on_rows(frame)`` after each (partial results on disk)."""
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    env = environment(device)
    t_start = time.perf_counter()
    loads = workloads(args)
    prepared = {}  # workload index -> batches on the device, built on first use
    rows = []
    for w, d_model, head_dim, impl in cases(args, loads):
        workload, step_lengths = loads[w]
        if w not in prepared:
            rng = np.random.default_rng(0)
            prepared[w] = [make_batch(n, args.vocab_size, device, rng) for n in step_lengths]
        batches = prepared[w]
        timed_lengths = step_lengths[args.warmup :] if len(step_lengths) > 1 else step_lengths
        tokens = int(round(np.mean([n.sum() for n in timed_lengths])))
        dense = len(step_lengths) == 1 and bool((step_lengths[0] == step_lengths[0][0]).all())
        max_len = max(int(n.max()) for n in step_lengths)
        row = {
            **env,
            "workload": workload,
            "tokens": tokens,
            "n_cells": int(round(np.mean([n.size for n in timed_lengths]))),
            "n_layers": args.n_layers,
            "d_model": d_model,
            "n_heads": d_model // head_dim,
            "head_dim": head_dim,
            "vocab_size": args.vocab_size,
            "precision": args.precision if device.type == "cuda" else "fp32",
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
            "note": "",
        }
        SDPA_REFUSED_VIEWS.clear()  # a row notes its own copies
        model = optimizer = None
        try:
            if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                raise NotApplicable(f"skipped: --time-limit {args.time_limit:g} s reached")
            kind, fn = attention_for(impl, dense, device)
            config = ModelConfig(
                n_layers=args.n_layers, d_model=d_model, n_heads=d_model // head_dim,
                d_ff=4 * d_model, vocab_size=args.vocab_size,
                max_len=max(args.seq_len, max_len), attention=kind,
            )  # fmt: skip
            torch.manual_seed(0)
            model = Encoder(config).to(device)
            row["attention"] = kind
            row["n_params"] = sum(p.numel() for p in model.parameters())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            with model_attention(fn):
                warm, times = time_steps(model, optimizer, batches, device, args.precision,
                                         args.warmup, args.repeats)  # fmt: skip
            median = float(np.median(times))
            row.update(
                first_step_ms=warm[0] if warm else float("nan"),
                warmup_steps_ms=" ".join(f"{t:.1f}" for t in warm),
                step_ms_median=median,
                step_ms_p10=float(np.percentile(times, 10)),
                step_ms_p90=float(np.percentile(times, 90)),
                step_ms_max=float(np.max(times)),
                tokens_per_s=tokens / (median / 1000),
            )
            if SDPA_REFUSED_VIEWS:
                row["note"] = "q, k, v copied to contiguous (strided views refused)"
        except NotApplicable as exc:
            row["note"] = str(exc) if str(exc).startswith("skipped") else f"not applicable: {exc}"
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as exc:  # a backend that refuses a shape is a finding
            row["note"] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            )
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


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu")
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


def markdown(frame: pd.DataFrame) -> str:
    """The table of one run or of merged runs (each row names its model and step counts)."""
    first = frame.iloc[0] if len(frame) else {}
    lines = [
        "# Training-step speed: sigmoid vs softmax attention",
        "",
        f"{first.get('date', '')}, {first.get('device', '')}, torch {first.get('torch', '')}, "
        f"triton {first.get('triton', '')}. Encoder with MLP 4x width, masked-gene loss, "
        "bf16 autocast on CUDA (fp32 on the CPU), fused AdamW (CUDA). Step ms: median over "
        "the timed steps (p10-p90) after the warm-up steps; first step: the first warm-up "
        "step, compilation and autotuning included.",
        "",
        "| workload | layers x width | heads x hd | implementation | step ms (p10-p90) | "
        "first step ms | steps (warm-up + timed) | tokens/s | speed-up vs best softmax | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in frame.iterrows():
        median = _float(r.get("step_ms_median"))
        ms = (
            f"{median:.1f} ({_float(r['step_ms_p10']):.1f}-{_float(r['step_ms_p90']):.1f})"
            if math.isfinite(median)
            else "-"
        )
        first_ms = _float(r.get("first_step_ms"))
        tps = _float(r.get("tokens_per_s"))
        speedup = _float(r.get("speedup_vs_best_softmax"))
        note = r.get("note")
        lines.append(
            f"| {r['workload']} | {r.get('n_layers', '')} x {r['d_model']} | "
            f"{r['n_heads']} x {r['head_dim']} | {r['impl']} | {ms} | "
            f"{f'{first_ms:.0f}' if math.isfinite(first_ms) else '-'} | "
            f"{r.get('warmup', '')} + {r.get('repeats', '')} | "
            f"{f'{tps:,.0f}' if math.isfinite(tps) else '-'} | "
            f"{f'{speedup:.2f}x' if math.isfinite(speedup) else '-'} | "
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


def write_table(frame: pd.DataFrame, args) -> None:
    write_csv(args.out_csv, frame)
    write_text(args.out_md, markdown(frame))


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


#: settings of the config's section; the command line may override each
SETTINGS = ("n_layers", "d_models", "head_dims", "vocab_size", "seq_len", "tokens", "workloads",
            "precision", "warmup", "repeats", "smoke")  # fmt: skip


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--params-json", default="{}", help="the config's experiments.training_speed section"
    )
    ap.add_argument("--out-csv", required=True)
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--n-layers", type=int)
    ap.add_argument("--d-models", type=int, nargs="+")
    ap.add_argument("--head-dims", type=int, nargs="+")
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--seq-len", type=int, help="fixed workload: tokens per sequence")
    ap.add_argument("--tokens", type=int, help="tokens per step (fixed and real workloads)")
    ap.add_argument("--workloads", nargs="+", choices=("fixed", "real", "cells"))
    ap.add_argument("--cells-per-step", type=int, default=64, help="cells workload: batch size")
    ap.add_argument(
        "--lengths-file", nargs="+", help="cells workload: lengths files (default: data/lengths_*)"
    )
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--precision", choices=("bf16", "fp32"))
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument(
        "--time-limit", type=float, default=0.0,
        help="seconds; implementations not started by then are recorded as skipped (0: none)",
    )  # fmt: skip
    ap.add_argument("--merge", nargs="+", metavar="CSV", help="join these tables, time nothing")
    ap.add_argument("--smoke", action="store_true", default=None, help="a tiny CPU run (tests)")


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """The config section's settings under the options given on the command line."""
    section = config.section(
        "experiments.training_speed", parse_json_arg(args.params_json, "--params-json")
    )
    for name in SETTINGS:
        if getattr(args, name) is None:
            value = getattr(section, name)
            setattr(args, name, list(value) if isinstance(value, tuple) else value)
    args.length_divisor = 1
    if args.smoke:  # seconds on a CPU: tiny widths and lengths, few steps
        args.n_layers, args.d_models, args.head_dims = 2, [32], [8, 16]
        args.vocab_size, args.seq_len, args.tokens = 200, 64, 128
        args.cells_per_step = min(args.cells_per_step, 4)
        args.warmup, args.repeats, args.precision = 1, 3, "fp32"
        args.length_divisor = 50  # real lengths of a few hundred to thousands -> ~10-90
    return args


def run_training_speed(args: argparse.Namespace) -> None:
    args = settle(args)
    if args.merge:
        write_table(merge(args.merge), args)
        return
    if not args.smoke and not torch.cuda.is_available():
        write_skipped(args, "no CUDA GPU on this machine (training-speed times GPU training steps)")
        return
    frame = run(args, on_rows=lambda partial: write_table(partial, args))
    write_table(frame, args)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "training-speed",
        help="training-step time of the encoder per attention implementation (a GPU table)",
        description=__doc__.splitlines()[0],
    )
    add_arguments(p)
    p.set_defaults(func=run_training_speed)
