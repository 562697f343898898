"""The PyTorch reference attention (the CPU path and the kernel's ground truth) against loops."""

from __future__ import annotations

import math

import pytest
import torch

from sigmoid_sc.attention import attention_varlen
from sigmoid_sc.attention.reference import (
    pad_packed,
    sigmoid_attention_padded_reference,
    sigmoid_attention_varlen_reference,
    softmax_attention_varlen_reference,
)

LENGTHS = [5, 1, 17, 5, 1]  # awkward, mixed, not multiples of anything
HEADS, HEAD_DIM = 3, 8
# float64 tolerance per kind: the reference computes sigmoid's bias -log(n) in float32
# (sequence_bias), which alone moves float64 outputs by ~1e-8; any logic error is far larger.
F64_TOL = {"softmax": 1e-10, "sigmoid": 1e-7}


def packed_inputs(lengths, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (
        torch.randn(total, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64).to(dtype)
        for _ in range(3)
    )
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, cu_seqlens, max(lengths)


def loop_attention(kind, q, k, v, cu_seqlens, scale=None, bias=None):
    """Float64 attention one sequence, head and query at a time, straight from the formulas."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rows = []
    for i in range(len(cu_seqlens) - 1):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        n = end - start
        b = -math.log(n) if bias is None else bias
        for a in range(start, end):
            heads = []
            for h in range(q.shape[1]):
                scores = torch.stack([(q[a, h] * k[j, h]).sum() * scale for j in range(start, end)])
                if kind == "sigmoid":
                    weights = torch.sigmoid(scores + b)
                else:
                    weights = torch.exp(scores - scores.max())
                    weights = weights / weights.sum()
                heads.append(sum(weights[j - start] * v[j, h] for j in range(start, end)))
            rows.append(torch.stack(heads))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_reference_matches_float64_loop(kind):
    q, k, v, cu, max_seqlen = packed_inputs(LENGTHS)
    expected = loop_attention(kind, q, k, v, cu)
    got = attention_varlen(kind, q, k, v, cu, max_seqlen)
    assert got.shape == q.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=F64_TOL[kind], atol=F64_TOL[kind])


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_reference_float32_inputs_close_to_float64_loop(kind):
    q, k, v, cu, max_seqlen = packed_inputs(LENGTHS, dtype=torch.float32, seed=1)
    got = attention_varlen(kind, q, k, v, cu, max_seqlen)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), loop_attention(kind, q, k, v, cu), rtol=1e-5, atol=1e-5
    )


def test_sigmoid_reference_explicit_scale_and_bias():
    q, k, v, cu, max_seqlen = packed_inputs(LENGTHS, seed=2)
    got = sigmoid_attention_varlen_reference(q, k, v, cu, max_seqlen, scale=0.5, bias=-1.25)
    torch.testing.assert_close(
        got, loop_attention("sigmoid", q, k, v, cu, scale=0.5, bias=-1.25), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_reference_gradients_match_loop(kind):
    q, k, v, cu, max_seqlen = packed_inputs([5, 1, 17], requires_grad=True, seed=3)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=q.dtype)
    got = torch.autograd.grad(
        (attention_varlen(kind, q, k, v, cu, max_seqlen) * grad_out).sum(), (q, k, v)
    )
    expected = torch.autograd.grad((loop_attention(kind, q, k, v, cu) * grad_out).sum(), (q, k, v))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=F64_TOL[kind], atol=F64_TOL[kind])


def test_padded_reference_ignores_garbage_in_padding():
    q, k, v, cu, max_seqlen = packed_inputs(LENGTHS, seed=5)
    lengths = cu[1:] - cu[:-1]
    qp, kp, vp = (pad_packed(t, cu, max_seqlen) for t in (q, k, v))
    clean = sigmoid_attention_padded_reference(qp, kp, vp, lengths)
    pad = torch.arange(max_seqlen)[None, :] >= lengths[:, None]  # [B, N] padded positions
    gen = torch.Generator().manual_seed(6)
    dirty = []
    for t in (qp, kp, vp):
        t = t.clone()
        t[pad] = torch.randn(t[pad].shape, generator=gen, dtype=t.dtype) * 1e3
        dirty.append(t)
    out = sigmoid_attention_padded_reference(*dirty, lengths)
    real = ~pad
    torch.testing.assert_close(out[real], clean[real], rtol=0, atol=0)
    assert (out[pad] == 0).all(), "padded query rows must come out as zeros"
    tol = F64_TOL["sigmoid"]
    torch.testing.assert_close(
        out[real], loop_attention("sigmoid", q, k, v, cu), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_sequence_output_independent_of_its_neighbours(kind):
    """A sequence's output is the same alone and packed with others of any length."""
    q, k, v, cu, max_seqlen = packed_inputs(LENGTHS, seed=7)
    packed = attention_varlen(kind, q, k, v, cu, max_seqlen)
    for i in range(len(LENGTHS)):
        s, e = int(cu[i]), int(cu[i + 1])
        alone = attention_varlen(
            kind, q[s:e], k[s:e], v[s:e], torch.tensor([0, e - s], dtype=torch.int32), e - s
        )
        torch.testing.assert_close(packed[s:e], alone, rtol=1e-12, atol=1e-12)


def test_sigmoid_bias_is_minus_log_length():
    """With zero scores each weight is sigmoid(-log n) = 1/(n+1): rows sum to n/(n+1)."""
    lengths = [1, 4, 9]
    q, k, v, cu, max_seqlen = packed_inputs(lengths, seed=8)
    ones = torch.ones_like(v)
    out = sigmoid_attention_varlen_reference(torch.zeros_like(q), k, ones, cu, max_seqlen)
    expected = torch.cat([torch.full((n, HEADS, HEAD_DIM), n / (n + 1.0)) for n in lengths])
    tol = F64_TOL["sigmoid"]
    torch.testing.assert_close(out, expected.double(), rtol=tol, atol=tol)


def test_softmax_reference_direct_call_matches_dispatch():
    q, k, v, cu, max_seqlen = packed_inputs(LENGTHS, seed=9)
    torch.testing.assert_close(
        softmax_attention_varlen_reference(q, k, v, cu, max_seqlen),
        attention_varlen("softmax", q, k, v, cu, max_seqlen),
        rtol=0,
        atol=0,
    )


def test_unknown_attention_kind_raises():
    q, k, v, cu, max_seqlen = packed_inputs([3])
    with pytest.raises(ValueError, match="linear"):
        attention_varlen("linear", q, k, v, cu, max_seqlen)
