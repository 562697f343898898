"""Attention for packed variable-length tokens: sigmoid (the paper's) and softmax (the baseline).

The model calls only :func:`attention_varlen`. Which implementation runs:

- sigmoid on CUDA: the project's Triton kernel on the packed tokens (no compute on padding);
  elsewhere the PyTorch reference.
- softmax on CUDA: SDPA on nested jagged tensors (FlashAttention-2-class varlen), measured the
  fastest forward+backward varlen path on real cell lengths (bench/NOTES.md); FlexAttention
  with a document mask on request; elsewhere the PyTorch reference.

Environment overrides (read at each call, so tests can switch):
``SIGMOID_SC_ATTENTION_BACKEND`` = ``auto`` (default) | ``triton`` | ``reference`` for sigmoid
(``triton`` on CPU needs ``TRITON_INTERPRET=1``); ``SIGMOID_SC_SOFTMAX_BACKEND`` = ``auto`` |
``njt`` | ``flex`` | ``reference`` for softmax.
"""

from __future__ import annotations

import os

import torch

from .reference import (
    default_scale,
    sigmoid_attention_padded_reference,
    sigmoid_attention_varlen_reference,
    softmax_attention_varlen_reference,
)

ATTENTION_KINDS = ("softmax", "sigmoid")
SIGMOID_BACKENDS = ("auto", "triton", "reference")
SOFTMAX_BACKENDS = ("auto", "njt", "flex", "reference")


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


def softmax_backend(device: torch.device) -> str:
    """``njt``, ``flex`` or ``reference``: what softmax attention runs on ``device`` now."""
    choice = _backend("SIGMOID_SC_SOFTMAX_BACKEND", SOFTMAX_BACKENDS)
    if choice == "auto":
        return "njt" if device.type == "cuda" else "reference"
    return choice


def softmax_attention_varlen_njt(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """Softmax attention through SDPA on nested jagged tensors; ``[total, H, D]`` in and out.

    min/max sequence lengths are handed over so SDPA never reads ``cu_seqlens`` on the host.
    """
    offsets = cu_seqlens.to(torch.int64)

    def nested(x):  # [total, H, D] -> [B, H, j, D]
        return torch.nested.nested_tensor_from_jagged(
            x, offsets, min_seqlen=1, max_seqlen=int(max_seqlen)
        ).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(
        nested(q), nested(k), nested(v), scale=default_scale(q.shape[-1], scale)
    )
    return out.transpose(1, 2).values()


_FLEX = {}


def softmax_attention_varlen_flex(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """Softmax attention through FlexAttention with a document mask on the packed tokens."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    total = q.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=q.device), lengths, output_size=total
    )

    def same_cell(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    block_mask = create_block_mask(same_cell, None, None, total, total, device=q.device)
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
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Attention over packed tokens ``[total, H, D]``; ``kind`` is ``softmax`` or ``sigmoid``.

    ``cu_seqlens``: int32 ``[B + 1]``. Sigmoid uses the per-sequence bias ``-log(n_i)``.
    ``validate=False`` skips the Triton kernel's check of ``cu_seqlens``' values, which reads
    them on the host (a device sync): for callers whose ``cu_seqlens`` are valid by
    construction, such as the encoder, where a sync in every layer would stall the GPU.
    Returns ``[total, H, D]`` in q's dtype.
    """
    if kind == "sigmoid":
        if sigmoid_backend(q.device, q.shape[-1], q.dtype) == "triton":
            from .triton_sigmoid import sigmoid_attention_varlen

            return sigmoid_attention_varlen(
                q, k, v, cu_seqlens, max_seqlen, scale=scale, validate=validate
            )
        return sigmoid_attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    if kind == "softmax":
        backend = softmax_backend(q.device)
        if backend == "njt":
            return softmax_attention_varlen_njt(q, k, v, cu_seqlens, max_seqlen, scale=scale)
        if backend == "flex":
            return softmax_attention_varlen_flex(q, k, v, cu_seqlens, max_seqlen, scale=scale)
        return softmax_attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")


__all__ = [
    "ATTENTION_KINDS",
    "attention_varlen",
    "sigmoid_attention_padded_reference",
    "sigmoid_attention_varlen_reference",
    "sigmoid_backend",
    "softmax_attention_varlen_flex",
    "softmax_attention_varlen_njt",
    "softmax_attention_varlen_reference",
    "softmax_backend",
]
