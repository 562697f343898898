"""The encoder on packed tokens: cell independence, pooling, initialisation, the attention switch."""

from __future__ import annotations

import math

import pytest
import torch

from sigmoid_sc.model import Encoder, ModelConfig, cell_index, pool

VOCAB, MAX_LEN = 40, 24


def make_model(attention: str, seed: int = 0, **overrides) -> Encoder:
    torch.manual_seed(seed)
    config = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, dropout=0.0)
    config.update(overrides)
    return Encoder(ModelConfig(**config, vocab_size=VOCAB, max_len=MAX_LEN, attention=attention))


def make_cells(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


def pack(cells):
    lengths = torch.tensor([c.numel() for c in cells])
    cu_seqlens = torch.zeros(len(cells) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return torch.cat(cells), cu_seqlens, int(lengths.max())


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_cell_output_unchanged_when_other_cells_change(attention):
    model = make_model(attention).eval()
    cell = make_cells([7], seed=1)[0]
    batch_a = [*make_cells([3, 1], seed=2), cell]  # the cell is last, the others shorter
    batch_b = [cell, *make_cells([24, 12, 5], seed=3)]  # first, with longer neighbours
    outs = []
    with torch.no_grad():
        for batch, index in ((batch_a, 2), (batch_b, 0), ([cell], 0)):
            ids, cu, max_seqlen = pack(batch)
            hidden = model(ids, cu, max_seqlen)
            start, end = int(cu[index]), int(cu[index + 1])
            outs.append((hidden[start:end], pool(hidden, cu)[index]))
    for hidden, emb in outs[1:]:
        torch.testing.assert_close(hidden, outs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(emb, outs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_cell_gradients_do_not_leak_across_cells(attention):
    """A loss on one cell gives no gradient to the other cells' input embeddings."""
    model = make_model(attention)
    ids, cu, max_seqlen = pack(make_cells([5, 9, 2], seed=4))
    x = model.tok_emb(ids).detach().requires_grad_()
    h = x + model.pos_emb(torch.arange(ids.numel()) - cu[:-1].long()[cell_index(cu, ids.numel())])
    for block in model.blocks:
        h = block(h, cu, max_seqlen)
    model.ln_f(h)[5:14].sum().backward()  # the second cell only
    assert x.grad[5:14].abs().sum() > 0
    assert (x.grad[:5] == 0).all() and (x.grad[14:] == 0).all()


def test_pool_is_mean_of_each_cells_tokens():
    hidden = torch.randn(10, 6, generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 4, 5, 10], dtype=torch.int32)
    expected = torch.stack([hidden[0:4].mean(0), hidden[4:5].mean(0), hidden[5:10].mean(0)])
    torch.testing.assert_close(pool(hidden, cu), expected)


def test_position_is_rank_within_cell():
    """Rank positions restart at 0 in every cell: a cell's first token sees pos_emb[0]."""
    model = make_model("sigmoid").eval()
    with torch.no_grad():
        model.pos_emb.weight.zero_()
        model.pos_emb.weight[0].fill_(5.0)  # only rank 0 carries a signal
        ids, cu, max_seqlen = pack(make_cells([4, 6], seed=6))
        x = model.tok_emb(ids)
        starts = cu[:-1].long()
        rank = torch.arange(ids.numel()) - starts[cell_index(cu, ids.numel())]
        assert rank.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
        embedded = x + model.pos_emb(rank)
        assert torch.allclose((embedded - x)[starts], torch.full((2, 32), 5.0))


def test_same_seed_same_init_for_both_attention_kinds():
    softmax, sigmoid = make_model("softmax", seed=3), make_model("sigmoid", seed=3)
    a, b = softmax.state_dict(), sigmoid.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    other = make_model("sigmoid", seed=4).state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


def test_attention_kind_is_the_only_difference():
    """Same weights, same input: only the attention string differs, and it changes the output."""
    softmax, sigmoid = make_model("softmax", seed=3), make_model("sigmoid", seed=3)
    assert softmax.blocks[0].attn.attention == "softmax"
    assert sigmoid.blocks[0].attn.attention == "sigmoid"
    ids, cu, max_seqlen = pack(make_cells([6, 11], seed=7))
    with torch.no_grad():
        diff = (softmax(ids, cu, max_seqlen) - sigmoid(ids, cu, max_seqlen)).abs().max()
    assert diff > 1e-4
    sigmoid.blocks[0].attn.attention = sigmoid.blocks[1].attn.attention = "softmax"
    with torch.no_grad():
        torch.testing.assert_close(softmax(ids, cu, max_seqlen), sigmoid(ids, cu, max_seqlen))


def test_gpt2_init_scales_residual_projections():
    model = make_model("sigmoid", n_layers=8, d_model=128, d_ff=512)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert block.mlp.proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert (block.attn.qkv.bias == 0).all()
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_head_is_tied_to_token_embedding():
    model = make_model("softmax")
    hidden = torch.randn(3, 32)
    torch.testing.assert_close(model.gene_logits(hidden), hidden @ model.tok_emb.weight.t())
    assert model.gene_logits(hidden).shape == (3, VOCAB)
    vocab_matrices = [n for n, p in model.named_parameters() if p.shape[0] == VOCAB]
    assert vocab_matrices == ["tok_emb.weight"]  # no separate output matrix


def test_config_rejects_unknown_attention_and_bad_heads():
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(vocab_size=VOCAB, attention="linear")
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(vocab_size=VOCAB, d_model=30, n_heads=4)
