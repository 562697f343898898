"""Triton sigmoid attention: forward and backward on packed (varlen) or padded tokens.

Computes, for each sequence ``i`` and head ``h`` independently,

    o = sigmoid(q k^T * scale + b_i) v

with ``b_i = -log(n_i)`` by default (``n_i`` = the sequence's length), no causal mask, and no
attention across sequences. Sigmoid needs no row statistics (no running max, no row sum), so
the forward pass is a plain two-matmul loop over key blocks and the backward pass recomputes
``P = sigmoid(S)`` tile by tile from ``q`` and ``k`` alone: nothing but the output is saved.

Layouts. Both layouts reach one set of kernels as a ``[rows, H, D]`` token matrix plus two int32
arrays ``seq_start[B]`` and ``seq_len[B]``: packed tokens (FlashAttention's varlen API) have
``seq_start = cu_seqlens[:-1]``; the padded ``[B, N, H, D]`` layout is viewed as ``[B*N, H, D]``
with ``seq_start[i] = i*N`` and ``seq_len = lengths``. Padded rows are never read and their
outputs (and gradients) are zero.

Precision: q, k, v in fp16, bf16 or fp32; both matmuls accumulate in fp32; ``P`` is rounded to
the input dtype before ``P v`` (as in every flash-style kernel). fp32 inputs use IEEE fp32 dots
on the GPU (no tf32).

Entry points: :func:`sigmoid_attention_varlen`, :func:`sigmoid_attention_padded` (both
importable from ``sigmoid_sc.attention``, both differentiable through the ``torch.library`` op
``sigmoid_sc::sigmoid_attn_fwd`` with a registered backward, so ``torch.compile`` traces them
without a graph break). On a CPU tensor the kernels run under Triton's interpreter when
``TRITON_INTERPRET=1`` (tests); otherwise the op falls back to a PyTorch implementation of the
same formulas.

What runs, and why (the measurements: bench/NOTES.md): the forward reads q, k, v through host
TMA descriptors on compute capability 9.0+ (pointer loads elsewhere and for unaligned inputs)
and evaluates the sigmoid in its one-special-function-op tanh form for 16-bit inputs (exact for
fp32); the backward is one kernel per key block that accumulates dk, dv in registers and adds
dq into an fp32 buffer with atomics, reading q and dO through TMA where the forward does.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .reference import default_scale
from .varlen import VarlenBatch

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

# How P = sigmoid(x) is evaluated inside the kernels (x = the logit q.k * scale + b):
#   SIG_EXACT: 1 / (1 + exp2(-x log2 e)) -- exp2 and a division (two special-function-unit ops)
#   SIG_TANH: 0.5 * tanh.approx(x / 2) + 0.5 -- one SFU op; the outputs' and gradients' errors
#     stay those of the exact form at fp16/bf16 (bench/NOTES.md): the form for 16-bit inputs,
#     both ways
# Each form takes the logit in its own unit (x log2 e, or x / 2: `logit_unit`), folded into the
# score scale and bias. The tanh is inline PTX on the GPU, exact under the interpreter; fp32
# inputs always use the exact form.
SIG_EXACT, SIG_TANH = 0, 1


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


# the interpreter cannot run inline PTX: there :func:`_tanh_approx` is computed from exp
_INTERPRETER = tl.constexpr(_interpreting())


@triton.jit
def _tanh_approx(u):
    """tanh(u) by the special-function unit's approximation (inline PTX); under the
    interpreter (CPU tests of the tanh form's algebra) by ``1 - 2 / (1 + e^(2u))``."""
    if _INTERPRETER:
        return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))
    else:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _sigmoid_u(u, SIG_MODE: tl.constexpr):
    """sigmoid(x), elementwise, fp32 in and out, from ``u = x * unit(SIG_MODE)``.

    The logit arrives already in the unit its form needs (:func:`_logit_unit`): the kernels
    fold that factor into the score scale and the bias once per program, so no extra multiply
    per score is spent on it.
    """
    if SIG_MODE == 1:
        # sigmoid(x) = (1 + tanh(x/2)) / 2: one MUFU.TANH instead of EX2 + RCP; u = x / 2
        p = 0.5 * _tanh_approx(u) + 0.5
    else:
        p = 1.0 / (1.0 + tl.exp2(-u))  # u = x log2(e)
    return p


@triton.jit
def _logit_unit(SIG_MODE: tl.constexpr):
    """The factor that turns a logit into :func:`_sigmoid_u`'s input (see :func:`logit_unit`)."""
    if SIG_MODE == 1:
        return 0.5
    else:
        return 1.4426950408889634


def logit_unit(sig_mode: int) -> float:
    """Host-side twin of :func:`_logit_unit`: x/2 for the tanh form, x log2(e) otherwise."""
    return 0.5 if sig_mode == SIG_TANH else LOG2E


@triton.jit
def _load_rows(base, rows, stride_t, offs_d, n, MASKED: tl.constexpr):
    """Rows ``rows`` of a ``[*, D]`` tile at ``base``; rows >= n read as zeros when MASKED."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=(rows < n)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _fwd_block(acc, q, k, v, qk_scale_u, bias_u, SIG_MODE: tl.constexpr, IN_PREC: tl.constexpr):
    """One key block: ``acc += sigmoid(q k^T * scale + b) v``.

    Key rows past the sequence were loaded as zeros, so their P (= sigmoid(b)) meets a zero row
    of v and adds nothing.
    """
    s = tl.dot(q, tl.trans(k), input_precision=IN_PREC)
    p = _sigmoid_u(s * qk_scale_u + bias_u, SIG_MODE)
    return tl.dot(p.to(v.dtype), v, acc, input_precision=IN_PREC)


@triton.jit
def _full_rows(desc, col, base, start, row0, stride_t, offs, offs_d, USE_TMA: tl.constexpr):
    """The block of rows ``row0..`` of a sequence starting at token ``start``, wholly inside the
    sequence: through the host tensor descriptor ``desc`` at ``[start + row0, col]`` (TMA), or
    by unmasked pointer loads from ``base`` (the sequence's first row of this head)."""
    if USE_TMA:
        return desc.load([start + row0, col])
    else:
        return _load_rows(base, row0 + offs, stride_t, offs_d, 0, False)


@triton.jit
def _program_seq(SeqLen, SeqOrder):
    """``(block, head, sequence b, its length n)`` of this program. Grid ``(cdiv(max_seqlen,
    BLOCK), H, B)``: blocks past a sequence's end are programs that exit at once."""
    b = tl.load(SeqOrder + tl.program_id(2))
    return tl.program_id(0), tl.program_id(1), b, tl.load(SeqLen + b)


@triton.jit
def _attn_fwd(
    Q, K, V, Out, QDesc, KDesc, VDesc,
    SeqStart, SeqLen, SeqOrder, Bias,
    qk_scale_u,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    pad_rows, seqlen_bucket, rows_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SIG_MODE: tl.constexpr, IN_PREC: tl.constexpr, USE_TMA: tl.constexpr,
    ZERO_FILL: tl.constexpr, PIPELINE: tl.constexpr,
):  # fmt: skip
    """One program = one query block of one head (grid: :func:`_program_seq`).

    Sequences are visited longest first (``SeqOrder``) so the long programs start early and
    the short ones fill the tail of the launch. USE_TMA: q and the full key blocks' k and v come
    through the host tensor descriptors ``QDesc``, ``KDesc``, ``VDesc`` (:func:`_head_rows_desc`:
    all heads, head ``h``'s columns at ``h * stride_h``); the last, partial key block always
    through masked pointer loads, which read zeros past the sequence. PIPELINE (a launch config's
    choice, see ``_FWD_CONFIGS``): S of key block j+1 is issued to the tensor cores before the
    sigmoid of block j. ZERO_FILL (padded layout):
    rows ``n..pad_rows`` of the sequence's slot are written as zeros here, which saves a memset.
    """
    pid_m, h, b, n = _program_seq(SeqLen, SeqOrder)
    if pid_m * BLOCK_M < n:
        start = tl.load(SeqStart + b)
        bias_u = tl.load(Bias + b) * _logit_unit(SIG_MODE)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k_base = K + start.to(tl.int64) * stride_kt + h * stride_kh
        v_base = V + start.to(tl.int64) * stride_vt + h * stride_vh
        k_col = h * stride_kh
        v_col = h * stride_vh
        if USE_TMA:
            # rows past the sequence (the next one's, padding, or zeros past the tensor) reach
            # only output rows that are not stored, or are stored as zeros (ZERO_FILL)
            q = QDesc.load([start + pid_m * BLOCK_M, h * stride_qh])
        else:
            q_base = Q + start.to(tl.int64) * stride_qt + h * stride_qh
            q = _load_rows(q_base, offs_m, stride_qt, offs_d, n, True)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        n_full = (n // BLOCK_N) * BLOCK_N
        if PIPELINE:
            # software pipelining by hand: S of block j+1 is issued to the tensor cores before
            # the sigmoid of block j runs on the FMA/MUFU pipes, so the two can overlap
            if n_full > 0:
                k = _full_rows(KDesc, k_col, k_base, start, 0, stride_kt, offs_n, offs_d, USE_TMA)
                s = tl.dot(q, tl.trans(k), input_precision=IN_PREC)
                for start_n in range(BLOCK_N, n_full, BLOCK_N):
                    k = _full_rows(
                        KDesc, k_col, k_base, start, start_n, stride_kt, offs_n, offs_d, USE_TMA
                    )
                    v = _full_rows(
                        VDesc, v_col, v_base, start, start_n - BLOCK_N, stride_vt, offs_n,
                        offs_d, USE_TMA,
                    )  # fmt: skip
                    s_next = tl.dot(q, tl.trans(k), input_precision=IN_PREC)
                    p = _sigmoid_u(s * qk_scale_u + bias_u, SIG_MODE)
                    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=IN_PREC)
                    s = s_next
                v = _full_rows(
                    VDesc, v_col, v_base, start, n_full - BLOCK_N, stride_vt, offs_n, offs_d,
                    USE_TMA,
                )  # fmt: skip
                p = _sigmoid_u(s * qk_scale_u + bias_u, SIG_MODE)
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=IN_PREC)
        else:
            for start_n in range(0, n_full, BLOCK_N):
                k = _full_rows(
                    KDesc, k_col, k_base, start, start_n, stride_kt, offs_n, offs_d, USE_TMA
                )
                v = _full_rows(
                    VDesc, v_col, v_base, start, start_n, stride_vt, offs_n, offs_d, USE_TMA
                )
                acc = _fwd_block(acc, q, k, v, qk_scale_u, bias_u, SIG_MODE, IN_PREC)
        if n_full < n:
            k = _load_rows(k_base, n_full + offs_n, stride_kt, offs_d, n, True)
            v = _load_rows(v_base, n_full + offs_n, stride_vt, offs_d, n, True)
            acc = _fwd_block(acc, q, k, v, qk_scale_u, bias_u, SIG_MODE, IN_PREC)
        o_ptrs = (
            Out
            + (start + offs_m).to(tl.int64)[:, None] * stride_ot
            + h * stride_oh
            + offs_d[None, :]
        )
        if ZERO_FILL:
            acc = tl.where((offs_m < n)[:, None], acc, 0.0)
            tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m < pad_rows)[:, None])
        else:
            tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m < n)[:, None])
    elif ZERO_FILL:
        if pid_m * BLOCK_M < pad_rows:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, HEAD_DIM)
            start = tl.load(SeqStart + b)
            o_ptrs = (
                Out
                + (start + offs_m).to(tl.int64)[:, None] * stride_ot
                + h * stride_oh
                + offs_d[None, :]
            )
            zeros = tl.zeros([BLOCK_M, HEAD_DIM], dtype=Out.dtype.element_ty)
            tl.store(o_ptrs, zeros, mask=(offs_m < pad_rows)[:, None])


@triton.jit
def _bwd_kv_block(
    dk, dv, k, v, q, do, DQ_ptrs, dq_mask, qk_scale_u, bias_u, scale,
    SIG_MODE: tl.constexpr, IN_PREC: tl.constexpr,
):  # fmt: skip
    """One query block against this program's key block (everything transposed: keys x queries);
    this block's share of dq (``dS K``) is added into the fp32 dq buffer with atomics.

    Query rows past the sequence are zeros in q and do, so their columns of dP^T and dS^T are
    zero and add nothing to dk, dv or dq.
    """
    s_t = tl.dot(k, tl.trans(q), input_precision=IN_PREC)  # [BLOCK_N, BLOCK_M]
    p_t = _sigmoid_u(s_t * qk_scale_u + bias_u, SIG_MODE)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=IN_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=IN_PREC)
    # d sigmoid(x) / dx = p (1 - p); the factor `scale` of dS is applied once at the end
    ds_t = (p_t * (1.0 - p_t) * dp_t).to(q.dtype)
    dk = tl.dot(ds_t, q, dk, input_precision=IN_PREC)
    dq = tl.dot(tl.trans(ds_t), k, input_precision=IN_PREC) * scale
    tl.atomic_add(DQ_ptrs, dq, mask=dq_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DQ, DK, DV, QDesc, DODesc,
    SeqStart, SeqLen, SeqOrder, Bias,
    qk_scale_u, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    pad_rows, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SIG_MODE: tl.constexpr, IN_PREC: tl.constexpr, ZERO_FILL: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """One program = one key block of one head (grid: :func:`_program_seq`).

    Loops over the sequence's query blocks accumulating dk, dv in fp32 registers; the same
    tiles give dq (``dS K``), added into an fp32 buffer with atomics (a second kernel that
    recomputes S for dq was slower). USE_TMA reads the full query blocks' q and dO through the
    host tensor descriptors ``QDesc``, ``DODesc`` (as the forward reads k and v); the last,
    partial block always through masked pointer loads.
    """
    pid_n, h, b, n = _program_seq(SeqLen, SeqOrder)
    if pid_n * BLOCK_N < n:
        start32 = tl.load(SeqStart + b)  # descriptor coordinates are 32-bit
        start = start32.to(tl.int64)
        bias_u = tl.load(Bias + b) * _logit_unit(SIG_MODE)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_base = Q + start * stride_qt + h * stride_qh
        do_base = DO + start * stride_dot + h * stride_doh
        dq_base = DQ + start * stride_dqt + h * stride_dqh
        k = _load_rows(K + start * stride_kt + h * stride_kh, offs_n, stride_kt, offs_d, n, True)
        v = _load_rows(V + start * stride_vt + h * stride_vh, offs_n, stride_vt, offs_d, n, True)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        m_full = (n // BLOCK_M) * BLOCK_M
        for start_m in range(0, m_full, BLOCK_M):
            rows = start_m + offs_m
            q = _full_rows(
                QDesc, h * stride_qh, q_base, start32, start_m, stride_qt, offs_m, offs_d, USE_TMA
            )
            do = _full_rows(
                DODesc, h * stride_doh, do_base, start32, start_m, stride_dot, offs_m, offs_d,
                USE_TMA,
            )  # fmt: skip
            dq_ptrs = dq_base + rows[:, None] * stride_dqt + offs_d[None, :]
            dk, dv = _bwd_kv_block(
                dk, dv, k, v, q, do, dq_ptrs, None, qk_scale_u, bias_u, scale, SIG_MODE, IN_PREC,
            )  # fmt: skip
        if m_full < n:
            rows = m_full + offs_m
            q = _load_rows(q_base, rows, stride_qt, offs_d, n, True)
            do = _load_rows(do_base, rows, stride_dot, offs_d, n, True)
            dq_ptrs = dq_base + rows[:, None] * stride_dqt + offs_d[None, :]
            dk, dv = _bwd_kv_block(
                dk, dv, k, v, q, do, dq_ptrs, (rows < n)[:, None], qk_scale_u, bias_u,
                scale, SIG_MODE, IN_PREC,
            )  # fmt: skip
        dk_ptrs = DK + (start + offs_n)[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :]
        dv_ptrs = DV + (start + offs_n)[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :]
        if ZERO_FILL:  # padded key rows get zero gradients (their dv would be sigmoid(b) * sum dO)
            real = (offs_n < n)[:, None]
            row_mask = (offs_n < pad_rows)[:, None]
            dk = tl.where(real, dk, 0.0)
            dv = tl.where(real, dv, 0.0)
        else:
            row_mask = (offs_n < n)[:, None]
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=row_mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=row_mask)
    elif ZERO_FILL:
        if pid_n * BLOCK_N < pad_rows:
            start = tl.load(SeqStart + b).to(tl.int64)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, HEAD_DIM)
            row_mask = (offs_n < pad_rows)[:, None]
            zeros = tl.zeros([BLOCK_N, HEAD_DIM], dtype=DK.dtype.element_ty)
            dk_ptrs = DK + (start + offs_n)[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :]
            dv_ptrs = DV + (start + offs_n)[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :]
            tl.store(dk_ptrs, zeros, mask=row_mask)
            tl.store(dv_ptrs, zeros, mask=row_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# Small per-head-dim lists so autotuning costs seconds, not minutes, per (head dim, length
# bucket); each entry is one the H100/H200 sweeps of bench/kernel.py kept (bench/NOTES.md).
# Forward entries: (BLOCK_M, BLOCK_N, num_warps, num_stages, pipeline) -- pipeline: S of the
# next key block issued before this block's sigmoid (the kernel's PIPELINE).
_FWD_CONFIGS = {
    # hd128: the pipelined (128, 64, 8, 3) leads on long sequences; (128, 64, 4, 2) and the
    # pipelined (128, 32, 8, 3) fit two programs an SM and lead on real cell lengths, where a
    # program has few key blocks. Pipelining at 4 warps spills.
    128: [(128, 64, 8, 3, True), (128, 32, 8, 3, True), (128, 64, 4, 2, False)],
    # hd64: pipelining gains nothing
    64: [(128, 64, 4, 3, False), (128, 128, 8, 3, False), (128, 128, 4, 3, False),
         (64, 128, 4, 3, False)],
    32: [(128, 64, 4, 3, False), (128, 128, 4, 3, False), (64, 64, 4, 3, False)],
}  # fmt: skip
# Backward: BLOCK_M = query block of the inner loop, BLOCK_N = the program's key block. hd128
# has one config, the autotuner's choice at every length bucket (no autotuning on a training
# job's first step); hd64 the two that led the sweeps. BLOCK_M = 32 tiles spill less and were
# slower: the backward's limit is not registers.
_BWD_CONFIGS = {
    128: [(64, 128, 8, 3)],
    64: [(64, 64, 4, 3), (64, 128, 8, 3)],
    32: [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3)],
}
# Under the interpreter: one small config, several blocks per test sequence.
_INTERP_CONFIG = (32, 16, 4, 1)


# which block size gives a descriptor argument its rows (BLOCK_M: query blocks in both kernels)
_DESC_ROWS = {"QDesc": "BLOCK_M", "DODesc": "BLOCK_M", "KDesc": "BLOCK_N", "VDesc": "BLOCK_N"}


def _desc_blocks(nargs: dict) -> None:
    """Give the host tensor descriptors among a launch's arguments the block shapes of the
    config about to run (an autotuning ``pre_hook``; called by hand for an explicit config)."""
    for name, rows in _DESC_ROWS.items():
        if nargs.get(name) is not None:
            nargs[name].block_shape = [nargs[rows], nargs["HEAD_DIM"]]


def _configs(table, head_dim):
    return [triton.Config(**_explicit(cfg), pre_hook=_desc_blocks) for cfg in table[head_dim]]


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """What a TMA descriptor over a ``[rows, H, D]`` tensor's rows needs: a 16-byte aligned base
    and a positive, 16-byte aligned row stride, unit stride along D (a caller's slice of a fused
    qkv may lack one; a tensor expanded along its rows has row stride 0)."""
    return all(
        t.data_ptr() % 16 == 0
        and t.stride(0) > 0
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.stride(2) == 1
        for t in tensors
    )


def _tma_ok(device: torch.device) -> bool:
    """Tensor-memory-accelerator loads exist from Hopper (compute capability 9.0) on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _use_tma(flag, *tensors: torch.Tensor) -> bool:
    """TMA loads for these tensors: not refused by the caller (``use_tma=False``: the pointer
    loads of GPUs without TMA), on a GPU that has them or under the interpreter (which runs
    host descriptors: the CPU tests' TMA path), and aligned as TMA needs."""
    device = tensors[0].device
    return bool(flag) and (_interpreting() or _tma_ok(device)) and _tma_aligned(*tensors)


def _head_rows_desc(t: torch.Tensor):
    """A host tensor descriptor over ``[rows, H, D]`` as a ``[rows, (H-1)*stride_h + D]`` matrix:
    head ``h``'s block of rows ``r..`` is at coordinates ``[r, h * stride_h]``; rows past the end
    read as zeros. Its block shape is set per launch config (:func:`_desc_blocks`)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows, heads, d = t.shape
    cols = (heads - 1) * t.stride(1) + d
    return TensorDescriptor(t, [rows, cols], [t.stride(0), 1], [16, d])


_TUNED: dict = {}


def _tuned(kind: str, head_dim: int):
    """The autotuned kernel of ``kind`` for ``head_dim``, built once (keyed on the length bucket)."""
    key = (kind, head_dim)
    if key not in _TUNED:
        if kind == "fwd":
            fn = triton.autotune(
                _configs(_FWD_CONFIGS, head_dim), key=["seqlen_bucket", "rows_bucket"]
            )(_attn_fwd)
        else:
            # dq accumulates with atomics: every timed trial must start from zeros
            fn = triton.autotune(
                _configs(_BWD_CONFIGS, head_dim), key=["seqlen_bucket"], reset_to_zero=["DQ"]
            )(_attn_bwd_dkdv)
        _TUNED[key] = fn
    return _TUNED[key]


def autotuned_configs() -> list[str]:
    """What the autotuner chose in this process, a line per kernel and key: ``"dkdv hd128
    (8192, 'torch.bfloat16'): BLOCK_M: 64, ..."`` (key: length bucket[, rows bucket], dtype)."""
    lines = []
    for (kind, head_dim), fn in sorted(_TUNED.items()):
        for key, cfg in getattr(fn, "cache", {}).items():
            lines.append(f"{kind} hd{head_dim} {key[:2]}: {cfg}")
    return lines


def _seqlen_bucket(max_seqlen: int) -> int:
    return 1 << max(6, math.ceil(math.log2(max(max_seqlen, 1))))


def _grid(block: str, max_seqlen: int, n_heads: int, batch: int):
    """The launch grid of a config ``m`` (``m[block]`` rows a program), see :func:`_program_seq`."""
    return lambda m: (triton.cdiv(max_seqlen, m[block]), n_heads, batch)


def _launch(kernel, kind, head_dim, grid, config, args, meta):
    """Launch ``kernel`` at an explicit ``config`` (the caller's; under the interpreter, its own
    small one unless the caller's), or autotuned over ``kind``'s configs; the descriptors' block
    shapes follow the config."""
    if config is None and _interpreting():
        config = _INTERP_CONFIG if kind != "fwd" else (*_INTERP_CONFIG, False)
    if config is not None:
        cfg = _explicit(config)
        _desc_blocks({**dict(zip(kernel.arg_names, args)), **meta, **cfg["kwargs"]})
        kernel[grid(cfg["kwargs"])](*args, **meta, **cfg["kwargs"], num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"])  # fmt: skip
    else:
        _tuned(kind, head_dim)[grid](*args, **meta)


def _explicit(cfg) -> dict:
    """A config tuple ``(BLOCK_M, BLOCK_N, warps, stages[, pipeline])`` as ``triton.Config``'s
    arguments; the forward's have the fifth entry (its PIPELINE), the backward's not."""
    bm, bn, w, s, *pipeline = cfg
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn} | ({"PIPELINE": bool(pipeline[0])} if pipeline else {})
    return {"kwargs": kwargs, "num_warps": w, "num_stages": s}


# --------------------------------------------------------------------------------------------
# Launch wrappers ([rows, H, D] tokens + seq_start/seq_len/seq_order int32 + bias fp32 [B])
# --------------------------------------------------------------------------------------------


def _sig_mode(dtype: torch.dtype, sig_mode: int | None = None) -> int:
    """The sigmoid form for inputs of ``dtype``: the tanh form's error (~1e-3) is below 16-bit
    rounding, not fp32's, so fp32 gets the exact form (under the interpreter the tanh is exact:
    :func:`_tanh_approx`). ``sig_mode`` (SIG_EXACT or SIG_TANH) overrides the choice."""
    if sig_mode is not None:
        if sig_mode not in (SIG_EXACT, SIG_TANH):
            raise ValueError(f"sig_mode must be SIG_EXACT (0) or SIG_TANH (1), got {sig_mode!r}")
        return int(sig_mode)
    return SIG_EXACT if dtype == torch.float32 else SIG_TANH


def _new(like: torch.Tensor, dtype: torch.dtype, zero: bool) -> torch.Tensor:
    """A contiguous tensor of ``like``'s shape: zeros when padded rows must read as zero."""
    make = torch.zeros if zero else torch.empty
    return make(like.shape, dtype=dtype, device=like.device)


def _in_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_fwd(q, k, v, seq_start, seq_len, seq_order, bias, scale, max_seqlen, zero_fill,
               config=None, *, use_tma=True, sig_mode=None):  # fmt: skip
    """Run the forward kernel; ``config`` = ``(BLOCK_M, BLOCK_N, warps, stages[, pipeline])``
    skips autotuning. ``use_tma=False`` takes the pointer loads (the path of GPUs without TMA);
    ``sig_mode`` overrides the sigmoid form (:func:`_sig_mode`)."""
    rows, n_heads, head_dim = q.shape
    o = _new(q, q.dtype, False)  # padded rows are zeroed by the kernel (ZERO_FILL)
    use_tma = _use_tma(use_tma, q, k, v)
    descs = tuple(_head_rows_desc(t) for t in (q, k, v)) if use_tma else (None, None, None)
    sig_mode = _sig_mode(q.dtype, sig_mode)
    # autotuning is keyed on power-of-two buckets: a training run's batches differ in total
    # rows and longest cell at every step, and an exact key would re-tune at every step
    args = (
        q, k, v, o, *descs, seq_start, seq_len, seq_order, bias, scale * logit_unit(sig_mode),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), max_seqlen if zero_fill else 0,
        _seqlen_bucket(max_seqlen), _seqlen_bucket(rows),
    )  # fmt: skip
    meta = {
        "HEAD_DIM": head_dim,
        "SIG_MODE": sig_mode,
        "IN_PREC": _in_prec(q.dtype),
        "USE_TMA": use_tma,
        "ZERO_FILL": bool(zero_fill),
    }
    grid = _grid("BLOCK_M", max_seqlen, n_heads, seq_len.shape[0])
    if config is not None and len(config) == 4:  # no pipelining unless the config says so
        config = (*config, False)
    _launch(_attn_fwd, "fwd", head_dim, grid, config, args, meta)
    return o


def launch_bwd(do, q, k, v, seq_start, seq_len, seq_order, bias, scale, max_seqlen, zero_fill,
               config=None, *, use_tma=True, sig_mode=None):  # fmt: skip
    """Run the backward kernel; returns ``(dq, dk, dv)`` in the inputs' dtype. ``config`` =
    ``(BLOCK_M, BLOCK_N, warps, stages)`` skips autotuning; ``use_tma``, ``sig_mode``: as in
    :func:`launch_fwd`."""
    rows, n_heads, head_dim = q.shape
    batch = seq_len.shape[0]
    do = do.contiguous() if do.stride(-1) != 1 else do
    dk, dv = _new(k, k.dtype, False), _new(v, v.dtype, False)  # zeroed in-kernel (ZERO_FILL)
    dq = _new(q, torch.float32, True)  # summed in fp32 over key blocks, then rounded once
    sig_mode = _sig_mode(q.dtype, sig_mode)
    use_tma = _use_tma(use_tma, q, do)
    descs = (_head_rows_desc(q), _head_rows_desc(do)) if use_tma else (None, None)
    args = (
        q, k, v, do, dq, dk, dv, *descs, seq_start, seq_len, seq_order, bias,
        scale * logit_unit(sig_mode), scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1), max_seqlen if zero_fill else 0, _seqlen_bucket(max_seqlen),
    )  # fmt: skip
    meta = {"HEAD_DIM": head_dim, "SIG_MODE": sig_mode, "IN_PREC": _in_prec(q.dtype),
            "ZERO_FILL": bool(zero_fill), "USE_TMA": use_tma}  # fmt: skip
    grid = _grid("BLOCK_N", max_seqlen, n_heads, batch)
    _launch(_attn_bwd_dkdv, "dkdv", head_dim, grid, config, args, meta)
    return dq.to(q.dtype), dk, dv


# --------------------------------------------------------------------------------------------
# PyTorch implementation of the same op (CPU without the interpreter; the op's CPU kernel)
# --------------------------------------------------------------------------------------------


def _torch_fwd(q, k, v, seq_start, seq_len, bias, scale):
    compute = torch.promote_types(q.dtype, torch.float32)
    o = _new(q, q.dtype, True)
    for b, (s0, n) in enumerate(zip(seq_start.tolist(), seq_len.tolist())):
        qi, ki, vi = (t[s0 : s0 + n].to(compute).transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        p = torch.sigmoid(qi @ ki.transpose(-1, -2) * scale + bias[b].to(compute))
        o[s0 : s0 + n] = (p @ vi).transpose(0, 1).to(q.dtype)
    return o


def _torch_bwd(do, q, k, v, seq_start, seq_len, bias, scale):
    compute = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (_new(t, t.dtype, True) for t in (q, k, v))
    for b, (s0, n) in enumerate(zip(seq_start.tolist(), seq_len.tolist())):
        sl = slice(s0, s0 + n)
        qi, ki, vi, doi = (t[sl].to(compute).transpose(0, 1) for t in (q, k, v, do))
        p = torch.sigmoid(qi @ ki.transpose(-1, -2) * scale + bias[b].to(compute))  # [H, n, n]
        dv[sl] = (p.transpose(-1, -2) @ doi).transpose(0, 1).to(v.dtype)
        ds = p * (1 - p) * (doi @ vi.transpose(-1, -2)) * scale
        dq[sl] = (ds @ ki).transpose(0, 1).to(q.dtype)
        dk[sl] = (ds.transpose(-1, -2) @ qi).transpose(0, 1).to(k.dtype)
    return dq, dk, dv


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or _interpreting()


# --------------------------------------------------------------------------------------------
# torch.library custom op with autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("sigmoid_sc::sigmoid_attn_fwd", mutates_args=())
def sigmoid_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_start: torch.Tensor,
    seq_len: torch.Tensor,
    seq_order: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    max_seqlen: int,
    zero_fill: bool,
) -> torch.Tensor:
    """Sigmoid attention on ``[rows, H, D]`` tokens; see the module docstring for the layout."""
    if _use_triton(q):
        return launch_fwd(
            q, k, v, seq_start, seq_len, seq_order, bias, scale, max_seqlen, zero_fill
        )
    return _torch_fwd(q, k, v, seq_start, seq_len, bias, scale)


@sigmoid_attn_fwd.register_fake
def _(q, k, v, seq_start, seq_len, seq_order, bias, scale, max_seqlen, zero_fill):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("sigmoid_sc::sigmoid_attn_bwd", mutates_args=())
def sigmoid_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_start: torch.Tensor,
    seq_len: torch.Tensor,
    seq_order: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    max_seqlen: int,
    zero_fill: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`sigmoid_attn_fwd` for the output gradient ``do``."""
    if _use_triton(q):
        return launch_bwd(
            do, q, k, v, seq_start, seq_len, seq_order, bias, scale, max_seqlen, zero_fill
        )
    return _torch_bwd(do, q, k, v, seq_start, seq_len, bias, scale)


@sigmoid_attn_bwd.register_fake
def _(do, q, k, v, seq_start, seq_len, seq_order, bias, scale, max_seqlen, zero_fill):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, seq_start, seq_len, seq_order, bias, scale, max_seqlen, zero_fill = inputs
    ctx.save_for_backward(q, k, v, seq_start, seq_len, seq_order, bias)
    ctx.scale, ctx.max_seqlen, ctx.zero_fill = scale, max_seqlen, zero_fill


def _backward(ctx, do):
    q, k, v, seq_start, seq_len, seq_order, bias = ctx.saved_tensors
    dq, dk, dv = sigmoid_attn_bwd(
        do, q, k, v, seq_start, seq_len, seq_order, bias, ctx.scale, ctx.max_seqlen, ctx.zero_fill
    )
    return dq, dk, dv, None, None, None, None, None, None, None


sigmoid_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API with input checks
# --------------------------------------------------------------------------------------------


def _check_qkv(q, k, v, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"sigmoid attention: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dim() != ndim:
            raise ValueError(
                f"sigmoid attention ({layout}): {name} must have {ndim} dims, got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"sigmoid attention: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32"
            )
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"sigmoid attention: q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"sigmoid attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"sigmoid attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"sigmoid attention: head dim {q.shape[-1]} is not supported; use one of {SUPPORTED_HEAD_DIMS}"
        )


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along the head dim is all the kernels need; copy only when it is missing."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias_tensor(bias, seq_len: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return -torch.log(seq_len.to(torch.float32))
    if isinstance(bias, torch.Tensor):
        if bias.numel() not in (1, seq_len.numel()):
            raise ValueError(
                f"sigmoid attention: bias tensor must hold 1 or B={seq_len.numel()} values, got {bias.numel()}"
            )
        return (
            bias.to(device=seq_len.device, dtype=torch.float32)
            .reshape(-1)
            .expand(seq_len.numel())
            .contiguous()
        )
    if isinstance(bias, (int, float)):
        return torch.full(
            (seq_len.numel(),), float(bias), dtype=torch.float32, device=seq_len.device
        )
    raise ValueError(
        f"sigmoid attention: bias must be None, a float or a tensor, got {type(bias).__name__}"
    )


def _check_scale(scale, head_dim: int) -> float:
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(
            f"sigmoid attention: scale must be a float or None, got {type(scale).__name__}"
        )
    s = default_scale(head_dim, scale)
    if not math.isfinite(s):
        raise ValueError(f"sigmoid attention: scale must be finite, got {scale}")
    return s


def _checking_values() -> bool:
    # value checks read small int tensors on the host; a compiled graph skips them (no break)
    return not torch.compiler.is_compiling()


def sigmoid_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | VarlenBatch,
    max_seqlen: int | None = None,
    scale: float | None = None,
    bias: float | torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Sigmoid attention on packed tokens.

    Args:
        q, k, v: ``[total_tokens, H, D]``, fp16/bf16/fp32, D in (32, 64, 128); tokens of all
            sequences concatenated.
        cu_seqlens: int32 ``[B + 1]``, 0 first, strictly increasing, ``total_tokens`` last;
            sequence ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``. Or a
            :class:`~sigmoid_sc.attention.VarlenBatch` of them, whose kernel metadata (starts,
            lengths, launch order, default bias) is built once and reused by every call.
        max_seqlen: the longest sequence's length (at least; sizes the grid), a host int;
            None beside a VarlenBatch.
        scale: logit scale, default ``1/sqrt(D)``.
        bias: None -> ``-log(n_i)`` per sequence; a float -> that constant; a ``[B]`` tensor.
        validate: check ``cu_seqlens``' values (reads them on the host: one device sync on
            CUDA, once per VarlenBatch). Shapes, dtypes and devices are always checked.

    Returns ``[total_tokens, H, D]`` in q's dtype, differentiable in q, k and v.
    """
    _check_qkv(q, k, v, 3, "varlen")
    try:
        seqs = VarlenBatch.of(cu_seqlens, max_seqlen, q.shape[0])
    except ValueError as exc:
        raise ValueError(f"sigmoid attention: {exc}") from None
    if seqs.device != q.device:
        raise ValueError(f"sigmoid attention: cu_seqlens is on {seqs.device}, q on {q.device}")
    if validate and _checking_values():
        try:
            seqs.check_values()
        except ValueError as exc:
            raise ValueError(f"sigmoid attention: {exc}") from None
    s = _check_scale(scale, q.shape[-1])
    seq_start, seq_len, seq_order = seqs.kernel_sequences
    b = seqs.log_length_bias if bias is None else _bias_tensor(bias, seq_len)
    return sigmoid_attn_fwd(
        _rows_view(q),
        _rows_view(k),
        _rows_view(v),
        seq_start,
        seq_len,
        seq_order,
        b,
        s,
        seqs.max_seqlen,
        False,
    )


def sigmoid_attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    bias: float | torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Sigmoid attention on a padded batch.

    Args:
        q, k, v: ``[B, N, H, D]``; sequence ``i`` holds its tokens in rows ``0:lengths[i]``.
        lengths: integer ``[B]``, each in ``1..N``.
        scale, bias, validate: as in :func:`sigmoid_attention_varlen`.

    Returns ``[B, N, H, D]``, zero at padded positions; padded inputs are never read.
    """
    _check_qkv(q, k, v, 4, "padded")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError("sigmoid attention: lengths must be an int32 or int64 tensor")
    batch, n_max, n_heads, head_dim = q.shape
    if lengths.shape != (batch,):
        raise ValueError(
            f"sigmoid attention: lengths must have shape ({batch},), got {tuple(lengths.shape)}"
        )
    if lengths.device != q.device:
        raise ValueError(f"sigmoid attention: lengths is on {lengths.device}, q on {q.device}")
    if validate and _checking_values():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > n_max:
            raise ValueError(f"sigmoid attention: lengths must lie in 1..N={n_max}, got {lo}..{hi}")
    s = _check_scale(scale, head_dim)
    seq_len = lengths.to(torch.int32).contiguous()
    seq_start = torch.arange(batch, device=q.device, dtype=torch.int32) * n_max
    seq_order = torch.argsort(seq_len, descending=True, stable=True).to(torch.int32)
    b = _bias_tensor(bias, seq_len)
    rows = [t.reshape(batch * n_max, n_heads, head_dim) for t in (q, k, v)]
    out = sigmoid_attn_fwd(
        *(_rows_view(t) for t in rows), seq_start, seq_len, seq_order, b, s, n_max, True
    )
    return out.view(batch, n_max, n_heads, head_dim)


__all__ = [
    "SIG_EXACT",
    "SIG_TANH",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "launch_bwd",
    "launch_fwd",
    "sigmoid_attention_padded",
    "sigmoid_attention_varlen",
    "sigmoid_attn_bwd",
    "sigmoid_attn_fwd",
]
