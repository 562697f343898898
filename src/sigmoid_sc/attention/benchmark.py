"""Attention timing core: TFLOPS of sigmoid and softmax attention, forward and backward.

:func:`benchmark_attention` times each implementation on each case and writes one CSV (the
table the kernel-benchmark figure is drawn from). Cases: dense rows (``dense_tokens`` tokens a
call in sequences of N, hidden ``hidden`` so ``H = hidden / D``) and real cell lengths
(sequences drawn, seeded, from a pool of per-cell lengths until ``varlen_tokens`` tokens).
FLOPs are counted from the real ``n_i^2`` only (padding is waste, not work): forward
``4 * H * D * sum(n_i^2)``, backward 2.5x forward, forward+backward 3.5x forward.

Implementations (:data:`IMPLS`): ``ours`` (this package's Triton kernel: dense rows through
the padded API, real lengths packed, with the batch's :class:`~.varlen.VarlenBatch` built
once outside the timed calls, as the encoder builds it once for all its layers),
``triton_sigmoid`` (the paper's ``triton-sigmoid`` package, only if installed: a comparison,
never a dependency; real lengths zero-padded to the longest), ``sdpa_cudnn`` / ``sdpa_flash``
/ ``sdpa_efficient`` (softmax, dense rows), ``njt_flash`` / ``njt_efficient`` (softmax SDPA on
nested jagged tensors), ``flex_docmask`` (FlexAttention with a document mask built outside the
timed calls), ``naive`` (PyTorch sigmoid attention, N x N materialised; N <= 4K).

Timing is Triton's ``do_bench`` (median) on CUDA; on a CPU (tests, under Triton's interpreter)
a plain wall-clock median of a few calls. bench/kernel.py builds its sweeps and variants on
these pieces.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .reference import pad_packed
from .varlen import VarlenBatch

HIDDEN = 2048
DENSE_TOKENS = 16384
VARLEN_TOKENS = 65536
DENSE_N = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (128, 64)
NAIVE_MAX_N = 4096
#: the CSV's columns, in order (TFLOPS empty where an implementation does not run a case)
COLUMNS = ("case", "hd", "impl", "fwd_tflops", "bwd_tflops", "fwdbwd_tflops",
           "fwd_ms", "bwd_ms", "fwdbwd_ms", "note")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row group of the table: ``name`` (``dense N=8192`` or ``<label> (median .., max
    ..)``), the head dim, the sequence lengths of one call, and whether it is dense."""

    name: str
    head_dim: int
    lengths: tuple[int, ...]
    dense: bool


def sample_lengths(pool: Sequence[int], tokens: int = VARLEN_TOKENS, seed: int = 0) -> np.ndarray:
    """Cells drawn without replacement (seeded) from ``pool`` until at least ``tokens`` tokens
    (or the pool runs out)."""
    pool = np.asarray(pool, dtype=np.int64)
    if pool.ndim != 1 or pool.size == 0 or (pool <= 0).any():
        raise ValueError("cell lengths must be a non-empty list of positive integers")
    picked, total = [], 0
    for i in np.random.default_rng(seed).permutation(pool.size):
        if total >= tokens:
            break
        picked.append(int(pool[i]))
        total += int(pool[i])
    return np.array(picked)


def read_lengths(path: str | Path) -> np.ndarray:
    """Per-cell lengths from a file: a ``tokens.npz`` (its ``offsets``) or text, one a line."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return np.diff(data["offsets"]).astype(np.int64)
    return np.loadtxt(path, dtype=np.int64, ndmin=1)


def make_cases(
    head_dims: Sequence[int] = HEAD_DIMS,
    dense_n: Sequence[int] = DENSE_N,
    cell_lengths: Mapping[str, Sequence[int]] | None = None,
    dense_tokens: int = DENSE_TOKENS,
    varlen_tokens: int = VARLEN_TOKENS,
    seed: int = 0,
) -> list[Case]:
    """Every head dim's dense rows, then its real-length rows (``cell_lengths``: label -> pool
    of per-cell lengths, each sampled by :func:`sample_lengths`)."""
    cases = []
    for d in head_dims:
        for n in dense_n:
            cases.append(Case(f"dense N={n}", d, (n,) * max(1, dense_tokens // n), True))
        for label, pool in (cell_lengths or {}).items():
            lengths = sample_lengths(pool, varlen_tokens, seed)
            name = f"{label} (median {int(np.median(lengths))}, max {lengths.max()})"
            cases.append(Case(name, d, tuple(int(n) for n in lengths), False))
    return cases


def flops_fwd(lengths: Sequence[int], head_dim: int, hidden: int = HIDDEN) -> float:
    heads = hidden // head_dim
    return 4.0 * heads * head_dim * float(np.sum(np.asarray(lengths, dtype=np.float64) ** 2))


class Inputs:
    """Packed q, k, v, dO ``[total, H, D]`` of one case (seeded), its ``cu_seqlens`` and
    :class:`VarlenBatch`; padded views built on demand."""

    def __init__(self, lengths, head_dim, dtype=torch.bfloat16, device="cuda", seed=0,
                 heads=None, hidden=HIDDEN):  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(seed)
        self.lengths = [int(n) for n in lengths]
        self.heads = heads or hidden // head_dim
        self.head_dim = head_dim
        self.device = device
        total = sum(self.lengths)
        self.cu = torch.tensor([0, *np.cumsum(self.lengths)], dtype=torch.int32, device=device)
        self.max_seqlen = max(self.lengths)
        self.batch = VarlenBatch(self.cu, self.max_seqlen, total)
        shape = (total, self.heads, head_dim)
        self.q, self.k, self.v, self.do = (
            torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
            for _ in range(4)
        )
        self.len_t = torch.tensor(self.lengths, dtype=torch.int32, device=device)

    def padded(self, t):
        return pad_packed(t, self.cu, self.max_seqlen)  # [B, N, H, D]

    def dense_view(self, t, transpose: bool = False):
        """``[B, N, H, D]`` view of a dense case's packed rows (``[B, H, N, D]`` if transposed:
        the layout a model's projections give SDPA)."""
        out = t.view(len(self.lengths), self.max_seqlen, self.heads, self.head_dim)
        return out.transpose(1, 2) if transpose else out


# ---------------------------------------------------------------------------------------------
# implementations: each returns (fwd(q, k, v) -> out on its own layout, [q, k, v, dO] to time)
# ---------------------------------------------------------------------------------------------


def _sdpa_ctx(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, backend)])


def impl_ours(inp: Inputs, dense: bool):
    from .triton_sigmoid import sigmoid_attention_padded, sigmoid_attention_varlen

    if dense:
        tensors = [inp.dense_view(t) for t in (inp.q, inp.k, inp.v, inp.do)]
        return (
            lambda q, k, v: sigmoid_attention_padded(q, k, v, inp.len_t, validate=False)
        ), tensors

    def fwd(q, k, v):
        return sigmoid_attention_varlen(q, k, v, inp.batch, validate=False)

    return fwd, [inp.q, inp.k, inp.v, inp.do]


def impl_triton_sigmoid(inp: Inputs, dense: bool):
    import triton_sigmoid

    if dense:
        tensors = [inp.dense_view(t) for t in (inp.q, inp.k, inp.v, inp.do)]
        return (lambda q, k, v: triton_sigmoid.sigmoid_attention(q, k, v)), tensors
    tensors = [inp.padded(t) for t in (inp.q, inp.k, inp.v, inp.do)]
    lens = inp.len_t

    def fwd(q, k, v):
        return triton_sigmoid.sigmoid_attention_padded(q, k, v, seq_lens_k=lens, seq_lens_q=lens)

    return fwd, tensors


def impl_sdpa(inp: Inputs, dense: bool, backend: str):
    if not dense:
        raise NotImplementedError
    tensors = [inp.dense_view(t, transpose=True) for t in (inp.q, inp.k, inp.v, inp.do)]

    def fwd(q, k, v):
        with _sdpa_ctx(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return fwd, tensors


def impl_njt(inp: Inputs, dense: bool, backend: str):
    from . import softmax_attention_varlen_njt

    def fwd(q, k, v):
        with _sdpa_ctx(backend):
            return softmax_attention_varlen_njt(q, k, v, inp.batch)

    return fwd, [inp.q, inp.k, inp.v, inp.do]


def impl_flex(inp: Inputs, dense: bool):
    # the backward is timed by re-running autograd.grad on one graph (retain_graph=True), which a
    # compiled backward with donated buffers refuses ("non-empty donated buffers")
    import torch._functorch.config as functorch_config

    from . import softmax_attention_varlen_flex

    functorch_config.donated_buffer = False
    block_mask = inp.batch.flex_block_mask  # built once, outside the timed calls

    def fwd(q, k, v):
        return softmax_attention_varlen_flex(q, k, v, inp.batch, block_mask=block_mask)

    return fwd, [inp.q, inp.k, inp.v, inp.do]


def impl_naive(inp: Inputs, dense: bool):
    if not dense or inp.max_seqlen > NAIVE_MAX_N:
        raise NotImplementedError
    tensors = [inp.dense_view(t, transpose=True) for t in (inp.q, inp.k, inp.v, inp.do)]
    scale, bias = inp.head_dim**-0.5, -math.log(inp.max_seqlen)

    def fwd(q, k, v):
        return torch.sigmoid(q @ k.transpose(-1, -2) * scale + bias) @ v

    return fwd, tensors


#: name -> ``impl(inputs, dense) -> (fwd, [q, k, v, dO])``; NotImplementedError: no such row
IMPLS: dict[str, Callable] = {
    "ours": impl_ours,
    "triton_sigmoid": impl_triton_sigmoid,
    "sdpa_cudnn": lambda inp, dense: impl_sdpa(inp, dense, "CUDNN_ATTENTION"),
    "sdpa_flash": lambda inp, dense: impl_sdpa(inp, dense, "FLASH_ATTENTION"),
    "sdpa_efficient": lambda inp, dense: impl_sdpa(inp, dense, "EFFICIENT_ATTENTION"),
    "njt_flash": lambda inp, dense: impl_njt(inp, dense, "FLASH_ATTENTION"),
    "njt_efficient": lambda inp, dense: impl_njt(inp, dense, "EFFICIENT_ATTENTION"),
    "flex_docmask": impl_flex,
    "naive": impl_naive,
}
DENSE_IMPLS = ("ours", "triton_sigmoid", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "naive")
VARLEN_IMPLS = ("ours", "triton_sigmoid", "njt_flash", "njt_efficient", "flex_docmask")


def triton_sigmoid_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("triton_sigmoid") is not None


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def bench_ms(fn, device: str = "cuda", cpu_reps: int = 3) -> float:
    """Median milliseconds of ``fn()``: Triton's ``do_bench`` on CUDA (warm-up 25 ms, 100 ms
    of repetitions), else the median of ``cpu_reps`` wall-clock calls after one warm-up."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def time_impl(fwd, tensors, device: str = "cuda") -> tuple[float, float, float]:
    """Median ms of the forward, the backward (graph kept) and forward+backward."""
    q, k, v, do = tensors
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        t_fwd = bench_ms(lambda: fwd(*leaves), device)
    out = fwd(*leaves)
    do = do.reshape(out.shape) if do.shape != out.shape else do
    t_bwd = bench_ms(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), device)
    out = None  # free the graph before timing forward+backward
    t_all = bench_ms(lambda: torch.autograd.grad(fwd(*leaves), leaves, do), device)
    return t_fwd, t_bwd, t_all


def _empty_cache(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_table(
    cases: Sequence[Case],
    impls: Sequence[str] | None = None,
    *,
    registry: Mapping[str, Callable] = IMPLS,
    dense_impls: Sequence[str] = DENSE_IMPLS,
    varlen_impls: Sequence[str] = VARLEN_IMPLS,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    hidden: int = HIDDEN,
    timed: bool = True,
    on_case: Callable[[list], None] | None = None,
    deadline: float = math.inf,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """A row per (case, implementation) that runs it (``impls``: a filter, None: all of
    ``dense_impls`` / ``varlen_impls`` that ``registry`` knows). An implementation that fails
    (out of memory, a backend missing) gets a row with its error in ``note``. Cases after
    ``deadline`` (a ``time.time()`` value) are skipped; ``on_case(rows)`` after each case lets
    partial results survive a run cut short. ``timed=False`` only runs each once (compiling)."""
    rows: list[dict] = []
    for case in cases:
        if time.time() > deadline:
            log(f"deadline reached: skipping {case.name} hd{case.head_dim}")
            continue
        d = case.head_dim
        inp = Inputs(case.lengths, d, dtype=dtype, device=device, hidden=hidden)
        f = flops_fwd(case.lengths, d, hidden)
        for name in dense_impls if case.dense else varlen_impls:
            if (impls and name not in impls) or name not in registry:
                continue
            row = dict.fromkeys(COLUMNS, "") | {"case": case.name, "hd": d, "impl": name}
            try:
                fwd, tensors = registry[name](inp, case.dense)
                if not timed:  # compile-only pass
                    leaves = [t.detach().requires_grad_() for t in tensors[:3]]
                    out = fwd(*leaves)
                    torch.autograd.grad(out, leaves, tensors[3].reshape(out.shape))
                    continue
                t_f, t_b, t_a = time_impl(fwd, tensors, device)
                row.update(fwd_ms=t_f, bwd_ms=t_b, fwdbwd_ms=t_a, fwd_tflops=f / t_f / 1e9,
                           bwd_tflops=2.5 * f / t_b / 1e9, fwdbwd_tflops=3.5 * f / t_a / 1e9)  # fmt: skip
            except NotImplementedError:
                continue
            except torch.OutOfMemoryError:
                row["note"] = "OOM"
            except Exception as exc:  # a backend that is missing here is a row, not a crash
                first = str(exc).splitlines()[0][:120] if str(exc) else ""
                row["note"] = f"{type(exc).__name__}: {first}"
                log(traceback.format_exc(limit=3))
            finally:
                _empty_cache(device)
            if timed:
                rows.append(row)
                log(_row_line(row))
        del inp
        _empty_cache(device)
        if on_case is not None:
            on_case(rows)
    return rows


def _row_line(row: dict) -> str:
    def fmt(x):
        return f"{x:6.1f}" if isinstance(x, float) else f"{'-':>6s}"

    return (f"{row['case']:32s} hd{row['hd']:<3d} {row['impl']:15s} fwd {fmt(row['fwd_tflops'])} "
            f"bwd {fmt(row['bwd_tflops'])} fwd+bwd {fmt(row['fwdbwd_tflops'])} {row['note']}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the CSV
# ---------------------------------------------------------------------------------------------


def env_header(device: str = "cuda") -> dict:
    """Date, device, and the versions the numbers depend on (the CSV's first line)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        from importlib.metadata import version

        ts_version = version("triton-sigmoid")
    except Exception:
        ts_version = "not installed"
    cuda = torch.device(device).type == "cuda"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_sigmoid": ts_version,
        "cuda": torch.version.cuda,
    }


def device_slug(name: str) -> str:
    """A short file-name word for a device name: ``NVIDIA H100 80GB HBM3`` -> ``h100``."""
    match = re.search(r"\b([A-Za-z]\d{2,4})\b", name)
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def csv_text(header: Mapping[str, object], rows: Sequence[Mapping]) -> str:
    """The CSV: ``# key=value, ...`` (the header), then :data:`COLUMNS` and the rows."""
    out = io.StringIO()
    out.write("# " + ", ".join(f"{k}={v}" for k, v in header.items()) + "\n")
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_table(path: str | Path, header: Mapping[str, object], rows: Sequence[Mapping]) -> None:
    """:func:`csv_text` written atomically to ``path``."""
    from ..io import write_text

    write_text(path, csv_text(header, rows))


def benchmark_attention(
    out_csv: str | Path,
    *,
    cell_lengths: Mapping[str, Sequence[int]] | None = None,
    head_dims: Sequence[int] = HEAD_DIMS,
    dense_n: Sequence[int] = DENSE_N,
    impls: Sequence[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    hidden: int = HIDDEN,
    dense_tokens: int = DENSE_TOKENS,
    varlen_tokens: int = VARLEN_TOKENS,
    time_limit: float = math.inf,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Time every implementation on every case and write the table to ``out_csv``.

    Cases (:func:`make_cases`): for each head dim, dense rows of N in ``dense_n`` and a row per
    entry of ``cell_lengths`` (label -> per-cell lengths, e.g. :func:`read_lengths` of a
    ``tokens.npz``; sampled to ~``varlen_tokens`` tokens). ``impls``: names of :data:`IMPLS`
    to keep (None: all; ``triton_sigmoid`` only where the package is installed).
    ``time_limit``: seconds, later cases skipped. The CSV is rewritten after every case, so a
    run cut short leaves its rows. Returns the rows (:data:`COLUMNS`).
    """
    start = time.time()
    if impls is None:
        impls = [n for n in IMPLS if n != "triton_sigmoid" or triton_sigmoid_installed()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {sorted(IMPLS)}")
    cases = make_cases(head_dims, dense_n, cell_lengths, dense_tokens, varlen_tokens)
    header = env_header(device) | {"dtype": str(dtype).removeprefix("torch.")}
    log(f"kernel benchmark: {header}")
    rows = run_table(
        cases, impls, dtype=dtype, device=device, hidden=hidden, log=log,
        on_case=lambda rows: write_table(out_csv, header, rows), deadline=start + time_limit,
    )  # fmt: skip
    write_table(out_csv, header, rows)
    return rows
