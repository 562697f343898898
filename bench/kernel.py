"""Sigmoid-attention kernel benchmark: ours vs the paper's package, SDPA softmax and naive torch.

Run on a CUDA machine (the lent H200):

    python bench/kernel.py --out DIR            # correctness + variant sweep + full table
    python bench/kernel.py --out DIR --no-sweep # correctness + full table only

Prints a table and writes ``DIR/kernel_<date>_<gpu>.csv`` and ``.md`` (date, GPU, torch and
triton versions in the header). TFLOPS (bf16, non-causal): forward ``4 * H * D * sum(n_i^2)``,
backward 2.5x forward, forward+backward 3.5x forward; only the real ``n_i^2`` count (padding
is waste, not work). Dense rows: 16K total tokens, hidden 2048 (H = 2048 / D), N = 1K..16K.
Variable-length rows: cells drawn (seeded) from the numbers of expressed genes per cell of
pbmc3k and Baron (``bench/lengths_*.txt``, read from the h5ad files) until ~65K tokens.

Implementations: ``ours`` (this package's Triton kernel; dense rows through the padded API
with full lengths, varlen rows packed), ``triton_sigmoid`` (PyPI ``triton-sigmoid`` 0.1.2,
the paper's kernel, imported only if installed: a comparison, never a dependency; varlen rows
zero-padded to the longest cell), ``sdpa_flash/cudnn/efficient`` (softmax, dense), ``njt_*``
(softmax SDPA on nested jagged tensors), ``flex_docmask`` (FlexAttention + document mask,
block-mask construction included, as the model pays it), ``naive`` (PyTorch sigmoid
attention, materialised N x N; N <= 4K only).

``--warm-jobs J`` first compiles every Triton kernel in J subprocesses (all autotune configs;
their timings are thrown away), so the timed pass reuses the on-disk cache: compile time, not
GPU time, dominates a cold start.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # a checkout without installing the package

from sigmoid_sc.attention import (  # noqa: E402
    flex_document_mask,
    softmax_attention_varlen_flex,
    softmax_attention_varlen_njt,
)
from sigmoid_sc.attention import triton_sigmoid as ts  # noqa: E402
from sigmoid_sc.attention.reference import (  # noqa: E402
    pad_packed,
    sigmoid_attention_varlen_reference,
)

HIDDEN = 2048
DENSE_TOKENS = 16384
VARLEN_TOKENS = 65536
DENSE_N = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (128, 64)  # hd128 first: the headline targets
NAIVE_MAX_N = 4096
SWEEP_DENSE = "dense N=8192"
OPTIONS_BY_HD: dict = {}  # kernel options per head dim, chosen by the sweep of this run
CHECK_LENGTHS = [1, 17, 64, 100, 129, 777, 1000, 3000]
DEVICE = "cuda"  # a CPU smoke test of this script sets "cpu" (Triton interpreter)


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------


def real_lengths(name: str, scale: int = 1) -> np.ndarray:
    """Cells drawn without replacement (seed 0) from bench/lengths_<name>.txt until ~65K tokens."""
    pool = np.loadtxt(ROOT / "bench" / f"lengths_{name}.txt", dtype=np.int64) * scale
    rng = np.random.default_rng(0)
    picked, total = [], 0
    for i in rng.permutation(len(pool)):
        if total >= VARLEN_TOKENS:
            break
        picked.append(int(pool[i]))
        total += int(pool[i])
    return np.array(picked)


VARLEN_SETS = (("pbmc3k", "pbmc3k", 1), ("baron", "Baron", 1), ("baron", "Baron x4", 4))


def workloads(quick: bool, only: str = "", head_dims=HEAD_DIMS):
    """(case, head_dim, lengths, dense) tuples of the table.

    ``only``: a comma list restricting the cases, dense sizes by N and variable-length sets by
    label (``"8192,16384,pbmc3k"``), each as ``hd:case`` to name one head dim (``"64:8192"``).
    """
    wanted = [w for w in only.split(",") if w]

    def keep(d, label):
        return not wanted or str(label) in wanted or f"{d}:{label}" in wanted

    out = []
    for d in head_dims:
        for n in DENSE_N if not quick else DENSE_N[::3]:
            if keep(d, n):
                out.append((f"dense N={n}", d, np.full(DENSE_TOKENS // n, n), True))
        for name, label, scale in VARLEN_SETS:
            if (quick and label != "pbmc3k") or not keep(d, label):
                continue
            lengths = real_lengths(name, scale)
            case = f"{label} (median {int(np.median(lengths))}, max {lengths.max()})"
            out.append((case, d, lengths, False))
    return out


def flops_fwd(lengths, head_dim) -> float:
    heads = HIDDEN // head_dim
    return 4.0 * heads * head_dim * float(np.sum(np.asarray(lengths, dtype=np.float64) ** 2))


class Inputs:
    """Packed bf16 q, k, v, dO for one workload (+ padded views built on demand)."""

    def __init__(self, lengths, head_dim, dtype=torch.bfloat16, device=None, seed=0, heads=None):
        device = device or DEVICE
        gen = torch.Generator(device=device).manual_seed(seed)
        self.lengths = [int(n) for n in lengths]
        self.heads = heads or HIDDEN // head_dim
        self.head_dim = head_dim
        total = sum(self.lengths)
        self.cu = torch.tensor([0, *np.cumsum(self.lengths)], dtype=torch.int32, device=device)
        self.max_seqlen = max(self.lengths)
        shape = (total, self.heads, head_dim)
        self.q, self.k, self.v, self.do = (
            torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
            for _ in range(4)
        )
        self.len_t = torch.tensor(self.lengths, dtype=torch.int32, device=device)

    def padded(self, t):
        return pad_packed(t, self.cu, self.max_seqlen)  # [B, N, H, D]


# ---------------------------------------------------------------------------------------------
# implementations: each returns fwd(q, k, v) -> out on its own layout + the tensors to time on
# ---------------------------------------------------------------------------------------------


def _sdpa_ctx(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, backend)])


def impl_ours(inp: Inputs, dense: bool, **options):
    def fwd(q, k, v):
        if options:
            return _ours_with_options(q, k, v, inp, options)
        if dense:
            return ts.sigmoid_attention_padded(q, k, v, inp.len_t, validate=False)
        return ts.sigmoid_attention_varlen(q, k, v, inp.cu, inp.max_seqlen, validate=False)

    if dense:
        b, n = len(inp.lengths), inp.max_seqlen
        tensors = [t.view(b, n, inp.heads, inp.head_dim) for t in (inp.q, inp.k, inp.v, inp.do)]
    else:
        tensors = [inp.q, inp.k, inp.v, inp.do]
    return fwd, tensors


class _OursOptions(torch.autograd.Function):
    """The kernels with explicit options/configs (the variant sweep), outside the custom op."""

    @staticmethod
    def forward(ctx, q, k, v, seq, options):
        start, length, order, bias, scale, max_seqlen = seq
        o = ts.launch_fwd(q, k, v, start, length, order, bias, scale, max_seqlen, False,
                          config=options.get("config"), **options["opts"])  # fmt: skip
        ctx.save_for_backward(q, k, v)
        ctx.seq, ctx.options = seq, options
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        start, length, order, bias, scale, max_seqlen = ctx.seq
        opts = ctx.options
        dq, dk, dv = ts.launch_bwd(do, q, k, v, start, length, order, bias, scale, max_seqlen, False,
                                   config=opts.get("bwd_config"), dq_config=opts.get("dq_config"),
                                   **opts["opts"])  # fmt: skip
        return dq, dk, dv, None, None


def _ours_with_options(q, k, v, inp: Inputs, options):
    seq = (*ts._varlen_sequences(inp.cu), inp.head_dim**-0.5, inp.max_seqlen)
    shape = q.shape
    rows = [t.reshape(-1, inp.heads, inp.head_dim) for t in (q, k, v)]
    return _OursOptions.apply(*rows, seq, options).view(shape)


def impl_triton_sigmoid(inp: Inputs, dense: bool):
    import triton_sigmoid

    if dense:
        b, n = len(inp.lengths), inp.max_seqlen
        tensors = [t.view(b, n, inp.heads, inp.head_dim) for t in (inp.q, inp.k, inp.v, inp.do)]
        return (lambda q, k, v: triton_sigmoid.sigmoid_attention(q, k, v)), tensors
    tensors = [inp.padded(t) for t in (inp.q, inp.k, inp.v, inp.do)]
    lens = inp.len_t

    def fwd(q, k, v):
        return triton_sigmoid.sigmoid_attention_padded(q, k, v, seq_lens_k=lens, seq_lens_q=lens)

    return fwd, tensors


def impl_sdpa(inp: Inputs, dense: bool, backend: str):
    if not dense:
        raise NotImplementedError
    b, n = len(inp.lengths), inp.max_seqlen
    # [B, N, H, D] storage seen as [B, H, N, D]: the layout a model's projections produce
    tensors = [
        t.view(b, n, inp.heads, inp.head_dim).transpose(1, 2) for t in (inp.q, inp.k, inp.v, inp.do)
    ]

    def fwd(q, k, v):
        with _sdpa_ctx(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return fwd, tensors


def impl_njt(inp: Inputs, dense: bool, backend: str):
    def fwd(q, k, v):
        with _sdpa_ctx(backend):
            return softmax_attention_varlen_njt(q, k, v, inp.cu, inp.max_seqlen)

    return fwd, [inp.q, inp.k, inp.v, inp.do]


def impl_flex(inp: Inputs, dense: bool):
    # the backward is timed by re-running autograd.grad on one graph (retain_graph=True), which a
    # compiled backward with donated buffers refuses (torch 2.11: "non-empty donated buffers")
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    # the mask depends on the batch only (a model builds it once for all its layers): built
    # here, outside the timed calls (run 12 timed it inside: 12 TFLOPS forward at pbmc3k lengths)
    block_mask = flex_document_mask(inp.cu, inp.q.shape[0])

    def fwd(q, k, v):
        return softmax_attention_varlen_flex(q, k, v, inp.cu, inp.max_seqlen, block_mask=block_mask)

    return fwd, [inp.q, inp.k, inp.v, inp.do]


def impl_naive(inp: Inputs, dense: bool):
    if not dense or inp.max_seqlen > NAIVE_MAX_N:
        raise NotImplementedError
    b, n = len(inp.lengths), inp.max_seqlen
    tensors = [
        t.view(b, n, inp.heads, inp.head_dim).transpose(1, 2) for t in (inp.q, inp.k, inp.v, inp.do)
    ]
    scale, bias = inp.head_dim**-0.5, -math.log(n)

    def fwd(q, k, v):
        return torch.sigmoid(q @ k.transpose(-1, -2) * scale + bias) @ v

    return fwd, tensors


# Kernel options measured beside the default in the table (one fixed launch config each, so
# they cost one compile, not an autotuning), each on top of ts.DEFAULT_OPTIONS (TMA both ways,
# tanh both ways, atomic dq): pointer loads in the forward or the backward, the exact backward
# sigmoid, the two-kernel dq path. (The pipelined forward is a launch config: the sweep.)
OURS_VARIANTS = {
    "ours+notma": {"use_tma": False},
    "ours+bwdptr": {"bwd_tma": False},
    "ours+bwdexact": {"bwd_sig_mode": ts.SIG_EXACT},
    "ours+twokernel": {"atomic_dq": False},
}
# the variants' fixed configs: the first (measured best) of the kernel's own lists, so that a
# variant row differs from `ours` by its option only (until session 4 the backward's was
# (64, 128, 8, 2), 15% slower at hd128 than the autotuned (64, 128, 8, 3) whatever the option)
VARIANT_BWD_CONFIG = {d: configs[0] for d, configs in ts._BWD_CONFIGS.items()}
VARIANT_DQ_CONFIG = {128: (128, 64, 8, 2), 64: (128, 64, 8, 3), 32: (128, 64, 4, 3)}


def impl_ours_variant(inp: Inputs, dense: bool, name: str):
    d, opts = inp.head_dim, OURS_VARIANTS[name]
    return impl_ours(inp, dense, opts=opts, config=ts._FWD_CONFIGS[d][0],
                     bwd_config=VARIANT_BWD_CONFIG[d], dq_config=VARIANT_DQ_CONFIG[d])  # fmt: skip


IMPLS = {
    "ours": lambda inp, dense: impl_ours(inp, dense),
    **{
        name: (lambda inp, dense, name=name: impl_ours_variant(inp, dense, name))
        for name in OURS_VARIANTS
    },
    "triton_sigmoid": impl_triton_sigmoid,
    "sdpa_cudnn": lambda inp, dense: impl_sdpa(inp, dense, "CUDNN_ATTENTION"),
    "sdpa_flash": lambda inp, dense: impl_sdpa(inp, dense, "FLASH_ATTENTION"),
    "sdpa_efficient": lambda inp, dense: impl_sdpa(inp, dense, "EFFICIENT_ATTENTION"),
    "njt_flash": lambda inp, dense: impl_njt(inp, dense, "FLASH_ATTENTION"),
    "njt_efficient": lambda inp, dense: impl_njt(inp, dense, "EFFICIENT_ATTENTION"),
    "flex_docmask": impl_flex,
    "naive": impl_naive,
}
DENSE_IMPLS = ("ours", *OURS_VARIANTS, "triton_sigmoid", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "naive")  # fmt: skip
VARLEN_IMPLS = ("ours", *OURS_VARIANTS, "triton_sigmoid", "njt_flash", "njt_efficient", "flex_docmask")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def time_impl(fwd, tensors):
    """Median ms of forward, backward (graph kept) and forward+backward."""
    q, k, v, do = tensors
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        t_fwd = bench_ms(lambda: fwd(*leaves))
    out = fwd(*leaves)
    do = do.reshape(out.shape) if do.shape != out.shape else do
    t_bwd = bench_ms(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True))
    out = None  # free the graph before timing forward+backward
    t_all = bench_ms(lambda: torch.autograd.grad(fwd(*leaves), leaves, do))
    return t_fwd, t_bwd, t_all


# ---------------------------------------------------------------------------------------------
# correctness on the GPU
# ---------------------------------------------------------------------------------------------


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CHECK_COMBOS = [
    (dtype, ref_dtype, tol, d)
    for dtype, ref_dtype, tol in (
        (torch.bfloat16, torch.float32, 2e-2),
        (torch.float16, torch.float32, 5e-3),
        (torch.float32, torch.float64, 1e-4),
    )
    for d in (32, 64, 128)
]


def check_correctness(rows_out: list, combos=CHECK_COMBOS) -> bool:
    """bf16/fp16 against an fp32 reference, fp32 against float64; padded == packed.

    Lengths mix 1, 17, non-multiples of every block size and a few thousand tokens; 4 heads
    keep the materialised reference small. Fresh inputs on each run (seed from the clock).
    """
    ok = True
    lengths = CHECK_LENGTHS
    for dtype, ref_dtype, tol, d in combos:
        seed = int(time.time() * 1000) % 100000
        inp = Inputs(lengths, d, dtype=dtype, seed=seed, heads=4)
        leaves = [t.detach().requires_grad_() for t in (inp.q, inp.k, inp.v)]
        out = ts.sigmoid_attention_varlen(*leaves, inp.cu, inp.max_seqlen)
        grads = torch.autograd.grad(out, leaves, inp.do)
        ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (inp.q, inp.k, inp.v)]
        ref = sigmoid_attention_varlen_reference(*ref_leaves, inp.cu, inp.max_seqlen)
        ref_grads = torch.autograd.grad(ref, ref_leaves, inp.do.to(ref_dtype))
        errs = [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
        good = all(math.isfinite(e) and e < tol for e in errs)
        # padded layout: the same numbers, zeros at padding
        lens = inp.len_t
        pq, pk, pv = (inp.padded(t).requires_grad_() for t in (inp.q, inp.k, inp.v))
        pout = ts.sigmoid_attention_padded(pq, pk, pv, lens)
        valid = torch.arange(inp.max_seqlen, device=DEVICE)[None, :] < lens[:, None]
        pad_err = rel(pout[valid], out.detach())
        pad_zero = bool((pout[~valid] == 0).all())
        good &= pad_zero and pad_err < 1e-3
        ok &= good
        line = (f"check {str(dtype):15s} hd{d:<3d} vs {str(ref_dtype):13s} rel err o {errs[0]:.2e} "
                f"dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e} | padded-vs-packed {pad_err:.1e} "
                f"zeros@pad {pad_zero} (seed {seed}) -> {'OK' if good else 'FAIL'}")  # fmt: skip
        log(line)
        rows_out.append(line)
        del inp, out, grads, ref, ref_grads, pout
        torch.cuda.empty_cache()
    return ok


# ---------------------------------------------------------------------------------------------
# variant sweep (kernel options x launch configs), for bench/NOTES.md
# ---------------------------------------------------------------------------------------------

# every forward variant names its load path (use_tma), whatever ts.DEFAULT_OPTIONS says
FWD_VARIANTS = {
    "exact": {"sig_mode": ts.SIG_EXACT, "use_tma": False},
    "tanh": {"sig_mode": ts.SIG_TANH, "use_tma": False},
    "newton": {"sig_mode": ts.SIG_NEWTON, "use_tma": False},
    "tanh+tma": {"sig_mode": ts.SIG_TANH, "use_tma": True},
    # timing probes (wrong values by design): the tanh form without its MUFU op, and no
    # sigmoid at all (P = the scaled logit); what is left is the loop's matmuls and data flow
    "probe:no-mufu": {"sig_mode": ts.SIG_PROBE_NO_MUFU, "use_tma": True},
    "probe:no-sigmoid": {"sig_mode": ts.SIG_PROBE_NO_SIGMOID, "use_tma": True},
}
BWD_VARIANTS = {
    "atomic-dq exact": {"bwd_sig_mode": ts.SIG_EXACT, "atomic_dq": True},
    "atomic-dq tanh": {"bwd_sig_mode": ts.SIG_TANH, "atomic_dq": True},
    "atomic-dq tanh ptr": {"bwd_sig_mode": ts.SIG_TANH, "atomic_dq": True, "bwd_tma": False},
    "atomic-dq newton": {"bwd_sig_mode": ts.SIG_NEWTON, "atomic_dq": True},
    "two-kernel tanh": {"bwd_sig_mode": ts.SIG_TANH, "atomic_dq": False},
}


# the sweep explores more forward configs than the kernel autotunes over, pipelined (5th entry)
# or not: run 9 measured BLOCK_M = 64 at 4 warps (two programs an SM) no faster at hd128 than
# (128, 64, 8, 3) (384-541 vs 565 at N=8K); (64, 64, 4, 3) stays as its best
SWEEP_FWD_CONFIGS = {
    **ts._FWD_CONFIGS,
    128: [(128, 64, 8, 3, True), (128, 64, 8, 3, False), (128, 64, 8, 2, True),
          (128, 64, 8, 4, True), (128, 128, 8, 2, True), (128, 64, 4, 2, False),
          (128, 128, 8, 3, False), (64, 64, 4, 3, False),
          # 32-key blocks: two programs an SM by registers and shared memory (88-96 KiB at 8
          # warps; the register report: 118-128 registers), pipelined or not
          (128, 32, 8, 3, True), (128, 32, 8, 4, False), (128, 32, 4, 3, False),
          (128, 32, 4, 2, False), (64, 32, 4, 3, False)],
    64: [*ts._FWD_CONFIGS[64], (128, 64, 4, 3, True), (128, 128, 8, 3, True),
         (64, 64, 4, 3, False)],
}  # fmt: skip


# ... and more backward configs than it autotunes over: 0-spill BLOCK_M=32 tiles, 4 warps
SWEEP_BWD_CONFIGS = {
    **ts._BWD_CONFIGS,
    128: [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 4), (32, 128, 8, 2), (32, 128, 8, 3),
          (32, 128, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (128, 64, 8, 2)],
    64: [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4),
         (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 2), (64, 128, 4, 3), (32, 64, 4, 3),
         (128, 64, 8, 3), (128, 128, 8, 2)],
}  # fmt: skip


def override_sweep_configs(text: str, head_dims) -> None:
    """``--sweep-configs``: ``"fwd128:128x64x8x3x1,128x32x8x3x1;bwd:64x128x8x3"`` replaces the
    sweep's config lists of that stage (and head dim; none: every head dim of the run)."""
    for part in filter(None, text.split(";")):
        stage, _, items = part.partition(":")
        table = {"fwd": SWEEP_FWD_CONFIGS, "bwd": SWEEP_BWD_CONFIGS}.get(stage[:3])
        if table is None or not (stage[3:] == "" or stage[3:].isdigit()):
            raise ValueError(f"{stage!r} is not fwd, bwd, fwd<head dim> or bwd<head dim>")
        configs = ts.parse_configs(items, stage[:3])
        if not configs:
            raise ValueError(f"{part!r} names no config")
        for d in [int(stage[3:])] if stage[3:] else head_dims:
            table[d] = configs


def sweep_jobs(cases, stages=("fwd", "bwd"), variants=None, rounds=1):
    """Flat list of (round, case index, stage, variant, config, dq config): sliceable across
    workers. ``variants``: names to keep (None: all). ``rounds``: each case's jobs that many
    times, the rounds interleaved (variant A, B, ..., A, B, ...), so that a drift of the GPU's
    clocks during the sweep spreads over every variant instead of favouring the first."""
    jobs = []
    keep = (lambda name: True) if not variants else (lambda name: name in variants)
    for ci, (_, d, _, _) in enumerate(cases):
        case_jobs = []
        for name in filter(keep, FWD_VARIANTS if "fwd" in stages else ()):
            for cfg in SWEEP_FWD_CONFIGS[d]:
                case_jobs.append((ci, "fwd", name, cfg, None))
        for name, opts in BWD_VARIANTS.items() if "bwd" in stages else ():
            if not keep(name):
                continue
            for cfg in SWEEP_BWD_CONFIGS[d]:
                for dq_cfg in ts._DQ_CONFIGS[d][:3] if not opts["atomic_dq"] else [None]:
                    case_jobs.append((ci, "bwd", name, cfg, dq_cfg))
        # a case's rounds together: its inputs and reference are built once
        jobs += [(r, *job) for r in range(rounds) for job in case_jobs]
    return jobs


def sweep(results: list, cases, jobs, with_reference: bool = True, deadline: float = math.inf):
    """Time each kernel variant with an explicit launch config; errors vs an fp32 reference.

    Jobs after ``deadline`` (a time.time() value) are skipped: the table needs the rest."""
    cache = {}
    for rnd, ci, stage, name, cfg, dq_cfg in jobs:
        if time.time() > deadline:
            log(f"sweep: deadline reached, {len(jobs)} jobs planned, skipping the rest")
            break
        case, d, lengths, _ = cases[ci]
        if ci not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            inp = Inputs(lengths, d)
            # per-sequence fp32 reference: a padded [B, H, N, N] one needs ~60 GB for pbmc3k
            if with_reference:
                f32 = [t.float() for t in (inp.q, inp.k, inp.v, inp.do)]
                start, scale = inp.cu[:-1], inp.head_dim**-0.5
                bias = -torch.log(inp.len_t.float())
                r = ts._torch_fwd(*f32[:3], start, inp.len_t, bias, scale)
                rg = ts._torch_bwd(f32[3], *f32[:3], start, inp.len_t, bias, scale)
                del f32
            else:  # compile-warm pass: no reference, errors reported as nan
                r, rg = inp.q, (inp.q, inp.k, inp.v)
            cache[ci] = (inp, r, rg)
        inp, ref, ref_grads = cache[ci]
        f = flops_fwd(lengths, d)
        if stage == "fwd":
            options = {"opts": FWD_VARIANTS[name], "config": cfg}
        else:
            options = {
                "opts": BWD_VARIANTS[name],
                "config": ts._FWD_CONFIGS[d][0],
                "bwd_config": cfg,
                "dq_config": dq_cfg,
            }
        try:
            fwd, tensors = impl_ours(inp, False, **options)
            if stage == "fwd":
                with torch.no_grad():
                    err = rel(fwd(*tensors[:3]), ref)
                    ms = bench_ms(lambda: fwd(*tensors[:3]))  # noqa: B023
                tf = f / ms / 1e9
            else:
                leaves = [t.detach().requires_grad_() for t in tensors[:3]]
                out = fwd(*leaves)
                grads = torch.autograd.grad(out, leaves, tensors[3], retain_graph=True)
                err = max(rel(g, x) for g, x in zip(grads, ref_grads))
                ms = bench_ms(
                    lambda: torch.autograd.grad(out, leaves, tensors[3], retain_graph=True)  # noqa: B023
                )
                tf = 2.5 * f / ms / 1e9
            msg = f"{tf:7.1f} TFLOPS  err {err:.2e}"
            results.append(dict(case=case, hd=d, stage=stage, variant=name, config=f"{cfg} dq {dq_cfg}",
                                ms=ms, tflops=tf, err=err, round=rnd))  # fmt: skip
        except Exception as e:  # a variant that fails to compile is a finding, not a crash
            msg = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
        log(f"sweep {case:26s} hd{d} {stage} {name:16s} {cfg} dq {dq_cfg} {msg}")
    cache.clear()
    torch.cuda.empty_cache()


def choose_options(sweep_rows, head_dim):
    """Fastest forward and backward variants for ``head_dim`` whose error stays within 1.5x the
    exact variant's (so a fast approximation cannot win by being wrong); mean over cases."""
    chosen = {}
    for stage, variants, exact in (
        ("fwd", FWD_VARIANTS, "exact"),
        ("bwd", BWD_VARIANTS, "atomic-dq exact"),
    ):
        best = {}
        for r in median_over_rounds(sweep_rows):
            if r["hd"] != head_dim or r["stage"] != stage:
                continue
            key = (r["case"], r["variant"])
            if key not in best or r["tflops"] > best[key]["tflops"]:
                best[key] = r
        cases = {c for c, _ in best}
        score = {}
        for name in variants:
            if not all((c, name) in best and (c, exact) in best for c in cases):
                continue
            if any(best[(c, name)]["err"] > 1.5 * best[(c, exact)]["err"] + 1e-4 for c in cases):
                continue
            score[name] = sum(best[(c, name)]["tflops"] for c in cases) / max(len(cases), 1)
        if score:
            chosen[stage] = max(score, key=score.get)
    fwd = FWD_VARIANTS.get(chosen.get("fwd", "exact"), {})
    bwd = BWD_VARIANTS.get(chosen.get("bwd", "atomic-dq exact"), {})
    # the backward's sigmoid mode follows its own winner; TMA/WS apply to the forward only
    options = {**ts.DEFAULT_OPTIONS, **fwd, "atomic_dq": bwd.get("atomic_dq", True)}
    return options, bwd.get("bwd_sig_mode", ts.SIG_EXACT), chosen


def median_over_rounds(sweep_rows):
    """One row per (case, stage, variant, config): the median TFLOPS over the sweep's rounds
    (``--sweep-rounds``; the same config's spread between rounds is the noise to beat) and the
    largest error."""
    groups: dict = {}
    for r in sweep_rows:
        groups.setdefault((r["case"], r["hd"], r["stage"], r["variant"], r["config"]), []).append(r)
    out = []
    for rows in groups.values():
        tf = sorted(r["tflops"] for r in rows)
        out.append({**rows[0], "tflops": float(np.median(tf)), "err": max(r["err"] for r in rows),
                    "rounds": len(rows), "spread": tf[-1] - tf[0]})  # fmt: skip
    return out


def sweep_summary(sweep_rows):
    best = {}
    for r in median_over_rounds(sweep_rows):
        key = (r["case"], r["hd"], r["stage"], r["variant"])
        if key not in best or r["tflops"] > best[key]["tflops"]:
            best[key] = r
    lines = ["best config per variant:"]
    for (case, hd, stage, variant), r in sorted(best.items()):
        lines.append(
            f"  {case:26s} hd{hd:<3d} {stage} {variant:16s} {r['tflops']:6.1f} TFLOPS err {r['err']:.1e} {r['config']}"
            + (f" (median of {r['rounds']}, spread {r['spread']:.1f})" if r["rounds"] > 1 else "")
        )
    return lines


# ---------------------------------------------------------------------------------------------
# main table
# ---------------------------------------------------------------------------------------------


def run_table(cases, impls_filter=None, timed=True, on_case=None, deadline=math.inf):
    rows = []
    for case, d, lengths, dense in cases:
        if time.time() > deadline:
            log(f"deadline reached: skipping {case} hd{d}")
            continue
        if d in OPTIONS_BY_HD:
            ts.DEFAULT_OPTIONS.update(OPTIONS_BY_HD[d])
        inp = Inputs(lengths, d)
        f = flops_fwd(lengths, d)
        for name in DENSE_IMPLS if dense else VARLEN_IMPLS:
            if impls_filter and name not in impls_filter:
                continue
            row = dict(case=case, hd=d, impl=name, fwd_tflops="", bwd_tflops="", fwdbwd_tflops="",
                       fwd_ms="", bwd_ms="", fwdbwd_ms="", note="")  # fmt: skip
            try:
                fwd, tensors = IMPLS[name](inp, dense)
                if not timed:  # compile-only pass
                    leaves = [t.detach().requires_grad_() for t in tensors[:3]]
                    out = fwd(*leaves)
                    torch.autograd.grad(out, leaves, tensors[3].reshape(out.shape))
                    continue
                t_f, t_b, t_a = time_impl(fwd, tensors)
                row.update(fwd_ms=t_f, bwd_ms=t_b, fwdbwd_ms=t_a, fwd_tflops=f / t_f / 1e9,
                           bwd_tflops=2.5 * f / t_b / 1e9, fwdbwd_tflops=3.5 * f / t_a / 1e9)  # fmt: skip
            except NotImplementedError:
                continue
            except torch.OutOfMemoryError:
                row["note"] = "OOM"
            except Exception as e:
                row["note"] = (
                    f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                )
                if os.environ.get("BENCH_TRACEBACK"):
                    traceback.print_exc()
            finally:
                torch.cuda.empty_cache()
            if timed:
                rows.append(row)
                fmt = lambda x: f"{x:6.1f}" if isinstance(x, float) else f"{'-':>6s}"  # noqa: E731
                log(f"{case:32s} hd{d:<3d} {name:15s} fwd {fmt(row['fwd_tflops'])} bwd {fmt(row['bwd_tflops'])} "
                    f"fwd+bwd {fmt(row['fwdbwd_tflops'])} {row['note']}")  # fmt: skip
        del inp
        torch.cuda.empty_cache()
        if on_case is not None:
            on_case(rows)  # partial results survive a run cut short
    return rows


def env_header() -> dict:
    import triton

    try:
        from importlib.metadata import version

        ts_version = version("triton-sigmoid")
    except Exception:
        ts_version = "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_sigmoid": ts_version,
        "cuda": torch.version.cuda,
        # `ours` runs with these (after --options), so a table says which kernel it timed
        "kernel_defaults": " ".join(f"{k}={int(v)}" for k, v in ts.DEFAULT_OPTIONS.items()),
    }


def write_outputs(out_dir: Path, header: dict, rows: list, checks: list, sweep_rows: list):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{header['date'][:10]}_h200"
    with open(out_dir / f"{stem}.csv", "w", newline="") as fh:
        fh.write("# " + ", ".join(f"{k}={v}" for k, v in header.items()) + "\n")
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)
    if sweep_rows:
        with open(out_dir / f"{stem}_sweep.csv", "w", newline="") as fh:
            fh.write("# " + ", ".join(f"{k}={v}" for k, v in header.items()) + "\n")
            w = csv.DictWriter(fh, fieldnames=list(sweep_rows[0].keys()))
            w.writeheader()
            w.writerows(sweep_rows)
    lines = [f"# Sigmoid-attention kernel benchmark, {header['date']}", "",
             ", ".join(f"{k}: {v}" for k, v in header.items()), "",
             "TFLOPS forward / backward / forward+backward (bf16, non-causal, hidden 2048; "
             "FLOPs from sum n_i^2; backward = 2.5x forward).", "",
             "| case | hd | impl | fwd | bwd | fwd+bwd | note |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        f = lambda x: f"{x:.0f}" if isinstance(x, float) else "-"  # noqa: E731
        lines.append(f"| {r['case']} | {r['hd']} | {r['impl']} | {f(r['fwd_tflops'])} | {f(r['bwd_tflops'])} "
                     f"| {f(r['fwdbwd_tflops'])} | {r['note']} |")  # fmt: skip
    lines += [
        "",
        "GPU correctness (relative error vs a higher-precision reference):",
        "",
        "```",
        *checks,
        "```",
        "",
    ]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))


def minimal(out_dir: Path, header: dict):
    """A short validation run: hd128 only, one launch config per kernel (a handful of
    compiles, no autotuning), bf16 correctness, dense N=8K and pbmc3k against SDPA/NJT."""
    t0 = time.time()  # hd128's forward and backward have one config each (triton_sigmoid.py)
    checks: list = []
    ok = check_correctness(checks, [(torch.bfloat16, torch.float32, 2e-2, 128)])
    log(f"GPU correctness: {'OK' if ok else 'FAILED'} ({time.time() - t0:.0f} s)")
    write_outputs(out_dir, header, [], checks, [])
    pbmc = real_lengths("pbmc3k")
    cases = [
        ("dense N=8192", 128, np.full(DENSE_TOKENS // 8192, 8192), True),
        (f"pbmc3k (median {int(np.median(pbmc))}, max {pbmc.max()})", 128, pbmc, False),
    ]
    rows: list = []
    for case in cases:
        rows += run_table([case], ["ours", "sdpa_cudnn", "sdpa_flash", "njt_flash"])
        write_outputs(out_dir, header, rows, checks, [])
        if case[3]:  # the one-MUFU-op sigmoid, forward only, same config
            inp = Inputs(case[2], 128)
            fwd, tensors = impl_ours(
                inp, False, opts={"sig_mode": ts.SIG_TANH}, config=(128, 64, 8, 3)
            )
            with torch.no_grad():
                f32 = [t.float() for t in (inp.q, inp.k, inp.v)]
                ref = ts._torch_fwd(
                    *f32, inp.cu[:-1], inp.len_t, -torch.log(inp.len_t.float()), 128**-0.5
                )
                err = rel(fwd(*tensors[:3]), ref)
                ms = bench_ms(lambda: fwd(*tensors[:3]))  # noqa: B023
            line = f"variant tanh fwd {case[0]} hd128: {flops_fwd(case[2], 128) / ms / 1e9:.1f} TFLOPS, rel err {err:.2e}"
            log(line)
            checks.append(line)
            del inp, ref, f32
        log(f"elapsed {time.time() - t0:.0f} s")
    write_outputs(out_dir, header, rows, checks, [])


def slice_autotune_configs(i: int, n: int) -> None:
    """Keep every n-th autotune config from the i-th on, for ours and for triton-sigmoid.

    The warm workers then compile disjoint slices of each kernel's configs in parallel (the
    same kernel's configs compiled in every worker would cost the whole list's compile time
    in each); the timed pass autotunes over the full lists from the on-disk cache.
    """
    for table in (ts._FWD_CONFIGS, ts._BWD_CONFIGS, ts._DQ_CONFIGS):
        for d in table:
            table[d] = table[d][i::n]
    ts._TUNED.clear()
    try:
        import triton_sigmoid  # noqa: F401
        from triton.runtime.autotuner import Autotuner
    except (ImportError, RuntimeError):  # not installed, or no CUDA device (it checks on import)
        return
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("triton_sigmoid"):
            for obj in list(vars(mod).values()):
                if isinstance(obj, Autotuner):
                    obj.configs = obj.configs[i::n]


def warm(jobs: int, passthrough: list, deadline: float = math.inf):
    """Compile every kernel (all autotune configs) in ``jobs`` subprocesses, untimed.

    Stops at ``deadline`` (a time.time() value): warming is an optimisation, and a run whose
    warm phase outlasted its device call measured nothing (bench/NOTES.md, run 3).
    """
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--warm-part", f"{i}/{jobs}", *passthrough],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for i in range(jobs)
    ]
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()) if deadline < math.inf else None)
        except subprocess.TimeoutExpired:
            log("warm compile pass: deadline reached, stopping the warm processes")
            for q in procs:
                q.kill()
            break


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--quick", action="store_true", help="two dense sizes and pbmc3k only")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--impls", default="", help="comma list to restrict the table")
    ap.add_argument("--warm-jobs", type=int, default=0)
    ap.add_argument("--warm-part", default="")
    ap.add_argument(
        "--time-limit", type=float, default=math.inf, help="seconds; later table cases are skipped"
    )
    ap.add_argument("--minimal", action="store_true", help="hd128 only, one config per kernel")
    ap.add_argument("--cases", default="", help="e.g. 8192,16384,64:8192,pbmc3k (see workloads)")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument(
        "--check-dtypes", default="bf16,fp16,fp32", help="GPU correctness checks to run"
    )
    ap.add_argument("--sweep-stages", default="fwd,bwd", help="stages the sweep times")
    ap.add_argument("--sweep-rounds", type=int, default=1, help="times each sweep job, interleaved")
    ap.add_argument("--sweep-configs", default="", help="fwd[HD]:BMxBNxWxS[xP],...;bwd[HD]:BMxBNxWxS,"
                    "... (default: SWEEP_FWD_CONFIGS / SWEEP_BWD_CONFIGS)")  # fmt: skip
    ap.add_argument(
        "--sweep-variants",
        default="",
        help="comma list of sweep variants to keep, e.g. 'atomic-dq tanh' (default: all); a "
        "restricted sweep only reports, it chooses no options for the table",
    )
    ap.add_argument("--warm-limit", type=float, default=math.inf, help="seconds for --warm-jobs")
    ap.add_argument(
        "--options",
        default="",
        help="kernel defaults for this run, e.g. use_tma=0,bwd_sig_mode=0 (the pre-run-6 kernel)",
    )
    args = ap.parse_args(argv)
    try:
        ts.DEFAULT_OPTIONS.update(ts.parse_options(args.options))
    except ValueError as exc:
        sys.exit(f"--options: {exc}")
    if not torch.cuda.is_available():
        sys.exit("bench/kernel.py needs a CUDA GPU")
    impls_filter = [s for s in args.impls.split(",") if s]
    head_dims = tuple(int(d) for d in args.head_dims.split(","))
    cases = workloads(args.quick, args.cases, head_dims)
    sweep_cases = [c for c in cases if c[0] == SWEEP_DENSE or c[0].startswith("pbmc3k")]
    stages = tuple(x for x in args.sweep_stages.split(",") if x)
    variants = [x for x in args.sweep_variants.split(",") if x]
    unknown = set(stages) - {"fwd", "bwd"} | set(variants) - {*FWD_VARIANTS, *BWD_VARIANTS}
    if unknown:
        sys.exit(f"--sweep-stages/--sweep-variants: unknown {sorted(unknown)}")
    try:
        override_sweep_configs(args.sweep_configs, head_dims)
    except ValueError as exc:
        sys.exit(f"--sweep-configs: {exc}")
    jobs = [] if args.no_sweep else sweep_jobs(sweep_cases, stages, variants, args.sweep_rounds)
    full_sweep = set(stages) == {"fwd", "bwd"} and not variants
    dtype_names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    wanted = {dtype_names[x] for x in args.check_dtypes.split(",") if x}
    checks_todo = [c for c in CHECK_COMBOS if c[0] in wanted and c[3] in head_dims]
    if args.warm_part:  # child: compile a slice of every task, results thrown away
        i, n = map(int, args.warm_part.split("/"))
        check_correctness([], checks_todo[i::n])
        sweep([], sweep_cases, [j for j in jobs if j[0] == 0][i::n], with_reference=False)
        if not args.no_table:
            slice_autotune_configs(i, n)
            # each fixed-config variant is compiled by one worker only
            others = {v for j, v in enumerate(OURS_VARIANTS) if j % n != i}
            run_table(cases, [x for x in impls_filter or IMPLS if x not in others], timed=False)
        return
    header = env_header()
    log("env:", header, "kernel defaults:", ts.DEFAULT_OPTIONS)
    t_start = time.time()
    if args.minimal:
        return minimal(args.out, header)
    if args.warm_jobs:
        passthrough = [
            a
            for a in (argv if argv is not None else sys.argv[1:])
            if a.startswith("--") and a in ("--quick", "--no-sweep", "--no-table")
        ] + [
            f"--impls={args.impls}",
            f"--cases={args.cases}",
            f"--head-dims={args.head_dims}",
            f"--check-dtypes={args.check_dtypes}",
            f"--options={args.options}",
            f"--sweep-stages={args.sweep_stages}",
            f"--sweep-variants={args.sweep_variants}",
        ]  # fmt: skip  (workers compile the same kernel variants)
        # at most half of the time limit: the timed table needs the rest
        limit = min(args.time_limit / 2, args.warm_limit)
        warm(args.warm_jobs, passthrough, deadline=t_start + limit)
        log(f"warm compile pass: {time.time() - t_start:.0f} s")
    checks: list = []
    ok = check_correctness(checks, checks_todo)
    log("GPU correctness:", "OK" if ok else "FAILED", f"({time.time() - t_start:.0f} s)")
    sweep_rows: list = []
    if jobs:
        t0 = time.time()
        # the sweep gets up to 60% of the time limit from the start; the table the rest
        sweep(sweep_rows, sweep_cases, jobs, deadline=t_start + 0.6 * args.time_limit)
        summary = sweep_summary(sweep_rows)
        for d in HEAD_DIMS if full_sweep else ():
            options, bwd_mode, chosen = choose_options(sweep_rows, d)
            OPTIONS_BY_HD[d] = {**options, "bwd_sig_mode": bwd_mode}
            summary.append(
                f"chosen for hd{d}: {chosen} -> options {options} (bwd sigmoid mode {bwd_mode})"
            )
        log("\n".join(summary))
        checks += summary
        log(f"sweep: {time.time() - t0:.0f} s")
    write_outputs(args.out, header, [], checks, sweep_rows)
    rows = (
        []
        if args.no_table
        else run_table(
            cases,
            impls_filter,
            on_case=lambda rows: write_outputs(args.out, header, rows, checks, sweep_rows),
            deadline=t_start + args.time_limit,
        )
    )
    write_outputs(args.out, header, rows, checks, sweep_rows)
    # what the autotuner chose for `ours` (run 6's forward at N=8K picked a config slower than
    # the fixed one): key = (length bucket[, rows bucket], then Triton's dtype entries)
    for line in ts.autotuned_configs():
        log(f"autotuned {line}")
    log(f"total {time.time() - t_start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
