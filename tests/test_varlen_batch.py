"""VarlenBatch: a packed batch's sequence metadata, built once per forward pass and shared by
every layer; what it caches equals the per-call formulas, every backend gives the same answer
with it as with plain ``(cu_seqlens, max_seqlen)``, and no attention call reads a device value
on the host (checked on fake tensors, which refuse any such read)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from sigmoid_sc import model as model_module
from sigmoid_sc.attention import VarlenBatch, attention_varlen, varlen
from sigmoid_sc.attention.reference import cell_and_rank, pad_packed, unpad
from sigmoid_sc.model import Encoder, ModelConfig

SEED = 20261206
LENGTHS = [7, 1, 33, 12, 40, 5]


def packed(lengths=LENGTHS, heads=2, head_dim=32, seed=SEED):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, generator=gen) for _ in range(3))
    return cu, max(lengths), q, k, v


def test_metadata_equals_the_formulas_and_is_built_once():
    cu, max_seqlen, q, _, _ = packed()
    batch = VarlenBatch(cu, max_seqlen, q.shape[0])
    lengths = torch.tensor(LENGTHS, dtype=torch.int32)
    assert torch.equal(batch.lengths, lengths) and batch.lengths.dtype == torch.int32
    cells, rank = cell_and_rank(cu, q.shape[0])
    assert torch.equal(batch.rank, rank)
    assert torch.equal(batch.padded_rows, cells * max_seqlen + rank)
    assert torch.equal(batch.key_mask, torch.arange(max_seqlen)[None, :] < lengths[:, None])
    seq_start, seq_len, seq_order = batch.kernel_sequences
    assert torch.equal(seq_start, cu[:-1]) and torch.equal(seq_len, lengths)
    assert seq_order.tolist() == [4, 2, 3, 0, 5, 1]  # longest first, ties in order
    assert seq_order.dtype == seq_start.dtype == torch.int32
    assert torch.equal(batch.log_length_bias, -torch.log(lengths.float()))
    assert torch.equal(batch.offsets, cu.long())
    # pad / unpad: the reference's mask-based helpers, by index (no host sync)
    assert torch.equal(batch.pad(q), pad_packed(q, cu, max_seqlen))
    assert torch.equal(batch.unpad(batch.pad(q)), q)
    assert torch.equal(
        batch.unpad(pad_packed(q, cu, max_seqlen)), unpad(pad_packed(q, cu, max_seqlen), lengths)
    )
    # each is computed once: a second access returns the same objects
    for name in ("lengths", "padded_rows", "key_mask", "kernel_sequences", "log_length_bias"):
        assert getattr(batch, name) is getattr(batch, name), name


def test_bad_batches_are_named():
    cu, max_seqlen, q, _, _ = packed()
    with pytest.raises(ValueError, match="int32"):
        VarlenBatch(cu.long(), max_seqlen, 98)
    with pytest.raises(ValueError, match="host int"):
        VarlenBatch(cu, torch.tensor(max_seqlen), 98)
    batch = VarlenBatch(cu, max_seqlen, q.shape[0])
    with pytest.raises(ValueError, match="given beside a VarlenBatch"):
        VarlenBatch.of(batch, max_seqlen + 1, q.shape[0])
    with pytest.raises(ValueError, match="rows"):
        VarlenBatch.of(batch, None, q.shape[0] - 1)
    assert VarlenBatch.of(batch, max_seqlen, q.shape[0]) is batch
    VarlenBatch(cu, max_seqlen, q.shape[0]).check_values()
    with pytest.raises(ValueError, match="total_tokens=97"):
        VarlenBatch(cu, max_seqlen, 97).check_values()
    with pytest.raises(ValueError, match="below the longest"):
        VarlenBatch(cu, 39, q.shape[0]).check_values()


@pytest.mark.parametrize(
    "kind, env, backend",
    [
        ("sigmoid", "SIGMOID_SC_ATTENTION_BACKEND", "reference"),
        ("sigmoid", "SIGMOID_SC_ATTENTION_BACKEND", "triton"),  # the interpreter on the CPU
        ("softmax", "SIGMOID_SC_SOFTMAX_BACKEND", "reference"),
        ("softmax", "SIGMOID_SC_SOFTMAX_BACKEND", "padded"),
        ("softmax", "SIGMOID_SC_SOFTMAX_BACKEND", "njt"),
    ],
)
def test_every_backend_gives_the_same_answer_with_a_batch(kind, env, backend, monkeypatch):
    monkeypatch.setenv(env, backend)
    cu, max_seqlen, q, k, v = packed()
    plain = attention_varlen(kind, q, k, v, cu, max_seqlen)
    batch = VarlenBatch(cu, max_seqlen, q.shape[0])
    shared = [attention_varlen(kind, q, k, v, batch) for _ in range(2)]  # two "layers"
    assert torch.equal(shared[0], plain) and torch.equal(shared[1], plain)


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize(
    "attention, backend",
    [("softmax", "reference"), ("sigmoid", "reference"), ("sigmoid", "triton")],
)
@pytest.mark.parametrize("cls_token", [False, True])
def test_the_encoder_builds_the_metadata_once_a_forward(attention, backend, cls_token, monkeypatch):
    """Three layers, one forward and backward: the token-to-cell map and the kernel's launch
    order are built once (they were built in every layer); with a CLS token too, the batch then
    describing the extended cells."""
    monkeypatch.setenv("SIGMOID_SC_ATTENTION_BACKEND", backend)
    cell_maps = _count_calls(monkeypatch, varlen, "cell_and_rank")
    orders = _count_calls(monkeypatch, varlen.torch, "argsort")
    config = ModelConfig(vocab_size=20, max_len=40, d_model=64, n_heads=2, n_layers=3, d_ff=64,
                         attention=attention, cls_token=cls_token)  # fmt: skip
    model = Encoder(config)
    batches = _count_calls(monkeypatch, model_module, "VarlenBatch")
    cu, max_seqlen, _, _, _ = packed()
    ids = torch.randint(3, 20, (int(cu[-1]),), generator=torch.Generator().manual_seed(SEED))
    model(ids, cu, max_seqlen).sum().backward()
    assert len(batches) == 1
    assert len(cell_maps) == 1
    assert len(orders) == (1 if attention == "sigmoid" and backend == "triton" else 0)


@pytest.mark.parametrize(
    "attention, env, backend",
    [
        ("sigmoid", "SIGMOID_SC_ATTENTION_BACKEND", "triton"),
        ("sigmoid", "SIGMOID_SC_ATTENTION_BACKEND", "reference"),
        ("softmax", "SIGMOID_SC_SOFTMAX_BACKEND", "padded"),
        ("softmax", "SIGMOID_SC_SOFTMAX_BACKEND", "reference"),
    ],
)
@pytest.mark.parametrize("cls_token", [False, True])
def test_no_host_reads_in_a_training_step(attention, env, backend, cls_token, monkeypatch):
    """The encoder's forward and backward on fake tensors, which raise on any read of a device
    value on the host (``.item()``, ``.tolist()``, a boolean-mask index): every attention path
    the encoder takes is free of device syncs. The kernel's optional value check is such a
    read, and is caught (the test can fail)."""
    monkeypatch.setenv(env, backend)
    with FakeTensorMode():
        config = ModelConfig(vocab_size=20, max_len=40, d_model=64, n_heads=2, n_layers=2,
                             d_ff=64, attention=attention, cls_token=cls_token)  # fmt: skip
        model = Encoder(config)
        ids = torch.randint(3, 20, (98,))
        cu = torch.tensor([0, 7, 8, 41, 53, 93, 98], dtype=torch.int32)
        model(ids, cu, 40).sum().backward()
        if backend == "triton":
            q = torch.randn(98, 2, 32)
            with pytest.raises(DataDependentOutputException):
                attention_varlen("sigmoid", q, q, q, VarlenBatch(cu, 40, 98), validate=True)


def test_value_check_runs_once_a_batch(monkeypatch):
    monkeypatch.setenv("SIGMOID_SC_ATTENTION_BACKEND", "triton")
    cu, max_seqlen, q, k, v = packed()
    batch = VarlenBatch(cu, max_seqlen, q.shape[0])
    reads = _count_calls(monkeypatch, batch.cu_seqlens, "tolist")
    for _ in range(3):
        attention_varlen("sigmoid", q, k, v, batch, validate=True)
    assert len(reads) == 1


def test_kernel_api_imports_from_the_package_without_importing_triton_first():
    """``from sigmoid_sc.attention import sigmoid_attention_varlen`` (flash-attn style) works;
    importing ``sigmoid_sc.attention`` alone does not import Triton."""
    code = (
        "import sys; import sigmoid_sc.attention as a; "
        "print('triton' in sys.modules); "
        "from sigmoid_sc.attention import sigmoid_attention_varlen, sigmoid_attention_padded; "
        "from sigmoid_sc.attention import triton_sigmoid as ts; "
        "print(sigmoid_attention_varlen is ts.sigmoid_attention_varlen, "
        "sigmoid_attention_padded is ts.sigmoid_attention_padded)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'sigmoid_attention'"):
        import sigmoid_sc.attention as attention

        attention.sigmoid_attention  # noqa: B018
