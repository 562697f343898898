"""Attention for packed variable-length tokens: sigmoid (the paper's) and softmax (the baseline).

The model calls only :func:`attention_varlen`, with the batch's :class:`VarlenBatch` (its
sequence metadata, built once a forward pass and shared by every layer). Which
implementation runs:

- sigmoid on CUDA: the project's Triton kernel on the packed tokens (no compute on padding);
  elsewhere the PyTorch reference.
- softmax on CUDA: SDPA on the padded ``[B, N, H, D]`` batch with a key mask, cuDNN first (the
  fastest softmax that bench/train_speed.py measured for the pipeline's own training steps), as
  long as padding at most multiplies the rows by ``PADDED_MAX_RATIO``; batches of short cells
  beside a long one (padding beyond that) take SDPA on nested jagged tensors
  (FlashAttention-2-class varlen, no compute on padding), which can also be requested, as can
  FlexAttention with a document mask and PyTorch's FlashAttention varlen entry point
  (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10, 16-bit inputs on CUDA);
  elsewhere the PyTorch reference.

The kernel's own entry points, :func:`sigmoid_attention_varlen` and
:func:`sigmoid_attention_padded` (FlashAttention-style signatures), import from here too; Triton
is imported only when they are first used, so importing this package stays cheap.

Environment overrides (read at each call, so tests can switch):
``SIGMOID_SC_ATTENTION_BACKEND`` = ``auto`` (default) | ``triton`` | ``reference`` for sigmoid
(``triton`` on CPU needs ``TRITON_INTERPRET=1``); ``SIGMOID_SC_SOFTMAX_BACKEND`` = ``auto`` |
``padded`` | ``njt`` | ``flex`` | ``varlen`` | ``reference`` for softmax.
"""

from __future__ import annotations

import inspect
import math
import os

import torch

from .reference import (
    cell_index,
    default_scale,
    sigmoid_attention_padded_reference,
    sigmoid_attention_varlen_reference,
    softmax_attention_varlen_reference,
)
from .varlen import VarlenBatch

ATTENTION_KINDS = ("softmax", "sigmoid")
SIGMOID_BACKENDS = ("auto", "triton", "reference")
SOFTMAX_BACKENDS = ("auto", "padded", "njt", "flex", "varlen", "reference")

#: the kernel's public functions, imported from ``triton_sigmoid`` on first use (Triton is heavy)
_KERNEL_API = ("sigmoid_attention_varlen", "sigmoid_attention_padded")


def __getattr__(name: str):
    if name in _KERNEL_API:
        from . import triton_sigmoid

        return getattr(triton_sigmoid, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _backend(env: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(env, "auto").strip().lower() or "auto"
    if value not in allowed:
        raise ValueError(f"environment variable {env}={value!r} is not one of {allowed}")
    return value


def sigmoid_backend(
    device: torch.device, head_dim: int | None = None, dtype: torch.dtype | None = None
) -> str:
    """``triton`` or ``reference``: what sigmoid attention runs on ``device`` now.

    ``auto`` takes the kernel on CUDA when it supports the head dim and dtype (small demo
    models with head dim 8 or 16 run the reference there); ``triton`` forces the kernel,
    which raises ValueError for what it does not support.
    """
    choice = _backend("SIGMOID_SC_ATTENTION_BACKEND", SIGMOID_BACKENDS)
    if choice == "auto":
        if device.type != "cuda":
            return "reference"
        from .triton_sigmoid import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

        supported = (head_dim is None or head_dim in SUPPORTED_HEAD_DIMS) and (
            dtype is None or dtype in SUPPORTED_DTYPES
        )
        return "triton" if supported else "reference"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "SIGMOID_SC_ATTENTION_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1 "
            "(set before triton kernels are defined)"
        )
    return choice


#: ``auto`` pads (cuDNN) while the padded batch holds at most this many times the real tokens:
#: the padded path was measured faster than nested tensors at ratios 1.2 (64 pbmc3k cells
#: capped at 1,024 genes) and 2.2 (12 cells, median 1,002, max 2,611); beyond, its attention
#: work grows with B * max_len^2 against sum(n_i^2), unmeasured, and varlen spends none on it
PADDED_MAX_RATIO = 2.5


def softmax_backend(
    device: torch.device, total: int | None = None, batch: int | None = None,
    max_seqlen: int | None = None,
) -> str:  # fmt: skip
    """``padded``, ``njt``, ``flex``, ``varlen`` or ``reference``: what softmax runs on
    ``device`` now.

    ``auto`` on CUDA: ``padded`` unless the batch's shape (``total`` tokens in ``batch``
    sequences of at most ``max_seqlen``) would pad to more than ``PADDED_MAX_RATIO`` x
    ``total`` rows, then ``njt``.
    """
    choice = _backend("SIGMOID_SC_SOFTMAX_BACKEND", SOFTMAX_BACKENDS)
    if choice == "auto":
        if device.type != "cuda":
            return "reference"
        if None not in (total, batch, max_seqlen) and batch * max_seqlen > PADDED_MAX_RATIO * total:
            return "njt"
        return "padded"
    return choice


#: SDPA backend lists that refused the model's strided q/k/v views (then given copies)
SDPA_REFUSED_VIEWS: set = set()


def _sdpa(backends, q, k, v, **kwargs):
    """SDPA restricted to ``backends`` (SDPBackend names, in priority order; None: SDPA's own
    dispatch). Views a backend refuses are copied, from then on directly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(*tensors):
        if backends is None:
            return torch.nn.functional.scaled_dot_product_attention(*tensors, **kwargs)
        chosen = [getattr(SDPBackend, name) for name in backends]
        try:
            context = sdpa_kernel(chosen, set_priority=True)
        except TypeError:  # torch < 2.6: no priority order, only the allowed set
            context = sdpa_kernel(chosen)
        with context:
            return torch.nn.functional.scaled_dot_product_attention(*tensors, **kwargs)

    key = tuple(backends or ())
    if key not in SDPA_REFUSED_VIEWS:
        try:
            return call(q, k, v)
        except RuntimeError:
            SDPA_REFUSED_VIEWS.add(key)
    return call(*(t.contiguous() for t in (q, k, v)))


def softmax_attention_varlen_padded(
    q, k, v, cu_seqlens, max_seqlen=None, scale=None, backends="auto"
):
    """Softmax attention through SDPA on the padded batch; ``[total, H, D]`` in and out.

    Tokens are scattered into ``[B, max_seqlen, H, D]`` (zeros elsewhere) and attend with a key
    mask; when every sequence has ``max_seqlen`` tokens (known from the shapes alone) the
    packed rows are viewed as the batch, no copy and no mask. ``cu_seqlens``: int32 ``[B + 1]``
    with ``max_seqlen``, or a :class:`VarlenBatch` (its row map and key mask are reused).
    ``backends``: ``auto`` = cuDNN, then memory-efficient, then math for 16-bit inputs on CUDA
    (cuDNN takes no fp32), SDPA's own dispatch otherwise; or a list of
    ``torch.nn.attention.SDPBackend`` names.
    """
    total, n_heads, head_dim = q.shape
    seqs = VarlenBatch.of(cu_seqlens, max_seqlen, total)
    batch, max_seqlen = seqs.batch_size, seqs.max_seqlen
    if backends == "auto":
        half = q.dtype in (torch.float16, torch.bfloat16)
        backends = (
            ["CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]
            if q.device.type == "cuda" and half
            else None
        )
    scale = default_scale(head_dim, scale)
    if total == batch * max_seqlen:  # every sequence is max_seqlen long
        out = _sdpa(
            backends, *(t.view(batch, max_seqlen, n_heads, head_dim).transpose(1, 2) for t in (q, k, v)),
            scale=scale,
        )  # fmt: skip
        return out.transpose(1, 2).reshape(total, n_heads, head_dim)
    out = _sdpa(
        backends, *(seqs.pad(t).transpose(1, 2) for t in (q, k, v)),
        attn_mask=seqs.key_mask[:, None, None, :], scale=scale,
    )  # fmt: skip
    return seqs.unpad(out.transpose(1, 2))


def softmax_attention_varlen_njt(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
    """Softmax attention through SDPA on nested jagged tensors; ``[total, H, D]`` in and out.

    min/max sequence lengths are handed over so SDPA never reads ``cu_seqlens`` on the host.
    ``cu_seqlens``: as in :func:`softmax_attention_varlen_padded`.
    """
    seqs = VarlenBatch.of(cu_seqlens, max_seqlen, q.shape[0])

    def nested(x):  # [total, H, D] -> [B, H, j, D]
        return torch.nested.nested_tensor_from_jagged(
            x, seqs.offsets, min_seqlen=1, max_seqlen=seqs.max_seqlen
        ).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(
        nested(q), nested(k), nested(v), scale=default_scale(q.shape[-1], scale)
    )
    return out.transpose(1, 2).values()


def softmax_attention_varlen_flash(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
    """Softmax attention through PyTorch's FlashAttention varlen entry point
    (``torch.nn.attention.varlen.varlen_attn``) on the packed tokens: no padding, no nested
    tensors, no host read of ``cu_seqlens``; ``[total, H, D]`` in and out, fp16 or bf16 on CUDA.
    ``cu_seqlens``: as in :func:`softmax_attention_varlen_padded`. A scale other than
    ``1/sqrt(D)`` is given to the function where it takes one (torch >= 2.11) and folded into
    q otherwise."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as error:  # torch < 2.10
        raise ValueError(
            f"softmax backend 'varlen' needs torch.nn.attention.varlen (torch >= 2.10); "
            f"torch {torch.__version__} has none"
        ) from error
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"softmax backend 'varlen' takes fp16 or bf16 inputs, not {q.dtype}")
    seqs = VarlenBatch.of(cu_seqlens, max_seqlen, q.shape[0])
    head_dim = q.shape[-1]
    scale = default_scale(head_dim, scale)
    kwargs = {}
    if scale != default_scale(head_dim, None):
        if "scale" in inspect.signature(varlen_attn).parameters:
            kwargs["scale"] = scale
        else:
            q = q * (scale * math.sqrt(head_dim))
    cu = seqs.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, seqs.max_seqlen, seqs.max_seqlen, **kwargs)


_FLEX = {}


def flex_document_mask(cu_seqlens: torch.Tensor, total: int, cells: torch.Tensor | None = None):
    """FlexAttention's block mask for packed tokens: a token attends within its own cell only.
    Depends on the batch's ``cu_seqlens`` alone, so a model can build it once for all layers
    (:attr:`VarlenBatch.flex_block_mask` does). ``cells``: each token's cell, if known."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = cell_index(cu_seqlens, total) if cells is None else cells

    def same_cell(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return create_block_mask(same_cell, None, None, total, total, device=cu_seqlens.device)


def softmax_attention_varlen_flex(
    q, k, v, cu_seqlens, max_seqlen=None, scale=None, block_mask=None
):
    """Softmax attention through FlexAttention with a document mask on the packed tokens
    (``block_mask``: :func:`flex_document_mask` of these ``cu_seqlens``; None: the
    :class:`VarlenBatch`'s, built on first use). ``cu_seqlens``: as in
    :func:`softmax_attention_varlen_padded`."""
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    if block_mask is None:
        block_mask = VarlenBatch.of(cu_seqlens, max_seqlen, q.shape[0]).flex_block_mask
    out = _FLEX["fn"](
        *(t.transpose(0, 1)[None] for t in (q, k, v)),
        block_mask=block_mask,
        scale=default_scale(q.shape[-1], scale),
    )
    return out[0].transpose(0, 1)


def attention_varlen(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | VarlenBatch,
    max_seqlen: int | None = None,
    scale: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Attention over packed tokens ``[total, H, D]``; ``kind`` is ``softmax`` or ``sigmoid``.

    ``cu_seqlens``: int32 ``[B + 1]`` with ``max_seqlen`` (a host int), or the batch's
    :class:`VarlenBatch` (``max_seqlen`` then None), whose metadata every layer reuses.
    Sigmoid uses the per-sequence bias ``-log(n_i)``. ``validate=False`` skips the Triton
    kernel's check of ``cu_seqlens``' values, which reads them on the host (a device sync;
    once per :class:`VarlenBatch`): for callers whose ``cu_seqlens`` are valid by
    construction, such as the encoder. Returns ``[total, H, D]`` in q's dtype.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")
    seqs = VarlenBatch.of(cu_seqlens, max_seqlen, q.shape[0])
    if kind == "sigmoid":
        if sigmoid_backend(q.device, q.shape[-1], q.dtype) == "triton":
            from .triton_sigmoid import sigmoid_attention_varlen

            return sigmoid_attention_varlen(q, k, v, seqs, scale=scale, validate=validate)
        return sigmoid_attention_varlen_reference(q, k, v, seqs, scale=scale)
    backend = softmax_backend(q.device, seqs.total, seqs.batch_size, seqs.max_seqlen)
    if backend == "padded":
        return softmax_attention_varlen_padded(q, k, v, seqs, scale=scale)
    if backend == "njt":
        return softmax_attention_varlen_njt(q, k, v, seqs, scale=scale)
    if backend == "flex":
        return softmax_attention_varlen_flex(q, k, v, seqs, scale=scale)
    if backend == "varlen":
        return softmax_attention_varlen_flash(q, k, v, seqs, scale=scale)
    return softmax_attention_varlen_reference(q, k, v, seqs, scale=scale)


__all__ = [
    "ATTENTION_KINDS",
    "VarlenBatch",
    "attention_varlen",
    "flex_document_mask",
    "sigmoid_attention_padded",
    "sigmoid_attention_padded_reference",
    "sigmoid_attention_varlen",
    "sigmoid_attention_varlen_reference",
    "sigmoid_backend",
    "softmax_attention_varlen_flash",
    "softmax_attention_varlen_flex",
    "softmax_attention_varlen_njt",
    "softmax_attention_varlen_padded",
    "softmax_attention_varlen_reference",
    "softmax_backend",
]
