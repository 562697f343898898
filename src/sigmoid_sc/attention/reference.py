"""PyTorch reference attention on packed (variable-length) tokens.

These are the CPU paths of the model and the ground truth the Triton kernel is tested
against. Layout follows FlashAttention's varlen API: ``q, k, v`` are ``[total_tokens, H, D]``,
the tokens of all sequences concatenated; ``cu_seqlens`` (int32, ``[B + 1]``) holds the
cumulative lengths, so sequence ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i + 1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale=None`` means ``1/sqrt(D)``."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def sequence_bias(lengths: torch.Tensor, bias: float | torch.Tensor | None) -> torch.Tensor:
    """Per-sequence additive bias ``b_i`` as float32 ``[B]``.

    ``None`` means ``-log(n_i)`` (n_i = the sequence's length), the choice that keeps the
    expected row sum of ``sigmoid(s + b)`` near one at initialisation; a float is used for every
    sequence; a tensor of shape ``[B]`` is taken as given.
    """
    lengths = lengths.to(torch.float32)
    if bias is None:
        return -torch.log(lengths.clamp_min(1.0))
    if isinstance(bias, torch.Tensor):
        return bias.to(device=lengths.device, dtype=torch.float32).expand_as(lengths)
    return torch.full_like(lengths, float(bias))


def cell_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The sequence each packed token belongs to: int64 ``[total]``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    cells = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(cells, lengths, output_size=total)  # output_size: no GPU sync


def cell_and_rank(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed token's sequence and its position in it (0 first): two int64 ``[total]``."""
    cells = cell_index(cu_seqlens, total)
    rank = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[cells]
    return cells, rank


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """``[total, ...]`` -> ``[B, max_seqlen, ...]``, zeros at padded positions."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch = lengths.numel()
    out = x.new_zeros((batch, max_seqlen, *x.shape[1:]))
    mask = torch.arange(max_seqlen, device=x.device)[None, :] < lengths[:, None]
    out[mask] = x
    return out


def unpad(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, N, ...]`` -> ``[sum(lengths), ...]`` (the real tokens, in order)."""
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device).long()[:, None]
    return x[mask]


def sigmoid_attention_padded_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    bias: float | torch.Tensor | None = None,
    *,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``o = sigmoid(q k^T * scale + b_i) v`` over the first ``lengths[i]`` keys.

    q, k, v: ``[B, N, H, D]``; lengths: ``[B]``; key_mask: ``[B, N]`` bool, True at the first
    ``lengths[i]`` positions (built here when None). Computed in the inputs' dtype promoted to
    at least float32; outputs at padded query positions are zero.
    """
    batch, n, heads, d = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    s = default_scale(d, scale)
    lengths = lengths.to(q.device)
    b = sequence_bias(lengths, bias).to(compute)
    valid = key_mask
    if valid is None:
        valid = torch.arange(n, device=q.device)[None, :] < lengths.long()[:, None]  # [B, N]
    # Zeroing padded rows of k and v (a cheap [B, N, H, D] pass, instead of masking the
    # [B, H, N, N] weights) makes padded keys contribute nothing, whatever the padding held.
    keep = valid[:, :, None, None]
    qf, kf, vf = (
        torch.where(keep, t, 0).to(compute).transpose(1, 2).reshape(batch * heads, n, d)
        for t in (q, k, v)
    )
    bias_bh = b.repeat_interleave(heads)[:, None, None]  # [B*H, 1, 1]
    logits = torch.baddbmm(bias_bh, qf, kf.transpose(-1, -2), alpha=s)  # [B*H, N, N]
    out = torch.bmm(torch.sigmoid(logits), vf).view(batch, heads, n, d).transpose(1, 2)
    out = out * keep
    return out.to(q.dtype)


def _batch(cu_seqlens, max_seqlen, total):
    from .varlen import VarlenBatch  # varlen.py imports this module

    return VarlenBatch.of(cu_seqlens, max_seqlen, total)


def sigmoid_attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens,
    max_seqlen: int | None = None,
    scale: float | None = None,
    bias: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed-token sigmoid attention, ``[total, H, D]`` in and out.

    ``cu_seqlens``: int32 ``[B + 1]`` with ``max_seqlen``, or a :class:`~.varlen.VarlenBatch`
    (whose padded-layout rows and key mask are reused).
    """
    batch = _batch(cu_seqlens, max_seqlen, q.shape[0])
    out = sigmoid_attention_padded_reference(
        batch.pad(q),
        batch.pad(k),
        batch.pad(v),
        batch.lengths,
        scale=scale,
        bias=bias,
        key_mask=batch.key_mask,
    )
    return batch.unpad(out)


def softmax_attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens,
    max_seqlen: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Packed-token softmax attention through SDPA on a padded batch with a key mask.

    ``cu_seqlens``: as in :func:`sigmoid_attention_varlen_reference`.
    """
    batch = _batch(cu_seqlens, max_seqlen, q.shape[0])
    qp, kp, vp = (batch.pad(t).transpose(1, 2) for t in (q, k, v))
    mask = batch.key_mask[:, None, None, :]  # keys only; padded query rows are dropped by unpad
    out = F.scaled_dot_product_attention(
        qp, kp, vp, attn_mask=mask, scale=default_scale(q.shape[-1], scale)
    )
    return batch.unpad(out.transpose(1, 2))
