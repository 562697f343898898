"""The encoder on packed tokens: cell independence, pooling, initialisation, the attention switch."""

from __future__ import annotations

import math

import pytest
import torch

from sigmoid_sc.model import CLS_ID, Encoder, ModelConfig, cell_index, pool, with_cls_tokens

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


# ---------------------------------------------------------------------------------------------
# the CLS token


def plain_forward(model: Encoder, ids, cu, max_seqlen) -> torch.Tensor:
    """The encoder without a CLS token, written out: embeddings, blocks, final norm."""
    rank = torch.arange(ids.numel()) - cu[:-1].long()[cell_index(cu, ids.numel())]
    h = model.tok_emb(ids) + model.pos_emb(rank)
    for block in model.blocks:
        h = block(h, cu, max_seqlen)
    return model.ln_f(h)


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_without_cls_token_the_model_is_the_plain_encoder(attention):
    assert ModelConfig(vocab_size=VOCAB).cls_token is False  # records without the key load so
    default, off = make_model(attention, seed=2), make_model(attention, seed=2, cls_token=False)
    assert off.pos_emb.weight.shape == (MAX_LEN, 32)
    for (name, a), (_, b) in zip(default.state_dict().items(), off.state_dict().items()):
        assert torch.equal(a, b), name
    ids, cu, max_seqlen = pack(make_cells([5, 24, 1], seed=8))
    with torch.no_grad():
        assert torch.equal(off(ids, cu, max_seqlen), plain_forward(off, ids, cu, max_seqlen))
    with pytest.raises(ValueError, match="cls_token"):
        off(ids, cu, max_seqlen, return_cls=True)


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_cls_token_is_a_prepended_token_at_rank_zero(attention):
    """The CLS model equals the plain encoder (with max_len + 1 positions and the same weights)
    run on cells that start with the CLS id: gene states in the caller's order, one CLS state
    per cell."""
    cls_model = make_model(attention, seed=5, cls_token=True).eval()
    assert cls_model.pos_emb.weight.shape == (MAX_LEN + 1, 32)
    torch.manual_seed(0)
    explicit = Encoder(
        ModelConfig(
            n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=VOCAB,
            max_len=MAX_LEN + 1, attention=attention,
        )
    ).eval()  # fmt: skip
    explicit.load_state_dict(cls_model.state_dict())
    cells = make_cells([6, MAX_LEN, 1, 11], seed=9)  # a cell of max_len genes uses the last row
    ids, cu, max_seqlen = pack(cells)
    prefixed = [torch.cat([torch.tensor([CLS_ID]), c]) for c in cells]
    ids_p, cu_p, max_p = pack(prefixed)
    with torch.no_grad():
        genes, cls = cls_model(ids, cu, max_seqlen, return_cls=True)
        only_genes = cls_model(ids, cu, max_seqlen)
        reference = explicit(ids_p, cu_p, max_p)
    starts = cu_p[:-1].long()
    is_gene = torch.ones(ids_p.numel(), dtype=torch.bool)
    is_gene[starts] = False
    assert genes.shape == (ids.numel(), 32) and cls.shape == (len(cells), 32)
    torch.testing.assert_close(genes, reference[is_gene], rtol=0, atol=1e-6)
    torch.testing.assert_close(cls, reference[starts], rtol=0, atol=1e-6)
    assert torch.equal(only_genes, genes)
    # the gene states are not those of the model without CLS: the token takes part in attention
    cls_model.config.cls_token = False
    with torch.no_grad():
        without = cls_model(ids, cu, max_seqlen)
    assert (without - genes).abs().max() > 1e-3


def test_with_cls_tokens_positions():
    ids = torch.tensor([10, 11, 12, 20, 30, 31])
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    new_ids, new_cu, genes, cls = with_cls_tokens(ids, cu, CLS_ID)
    assert new_ids.tolist() == [2, 10, 11, 12, 2, 20, 2, 30, 31]
    assert new_cu.tolist() == [0, 4, 6, 9] and new_cu.dtype == torch.int32
    assert genes.tolist() == [1, 2, 3, 5, 7, 8] and cls.tolist() == [0, 4, 6]


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_cls_model_cells_stay_independent(attention):
    model = make_model(attention, cls_token=True).eval()
    cell = make_cells([7], seed=1)[0]
    outs = []
    with torch.no_grad():
        for batch, index in (([*make_cells([3, 1], seed=2), cell], 2), ([cell], 0)):
            ids, cu, max_seqlen = pack(batch)
            genes, cls = model(ids, cu, max_seqlen, return_cls=True)
            outs.append((genes[int(cu[index]) : int(cu[index + 1])], cls[index]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


def test_cls_models_of_both_kinds_differ_only_in_attention():
    softmax = make_model("softmax", seed=3, cls_token=True)
    sigmoid = make_model("sigmoid", seed=3, cls_token=True)
    a, b = softmax.state_dict(), sigmoid.state_dict()
    assert list(a) == list(b) == list(make_model("softmax", seed=3).state_dict())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids, cu, max_seqlen = pack(make_cells([6, 11], seed=7))
    with torch.no_grad():
        cls_soft = softmax(ids, cu, max_seqlen, return_cls=True)[1]
        assert (cls_soft - sigmoid(ids, cu, max_seqlen, return_cls=True)[1]).abs().max() > 1e-4
        for block in sigmoid.blocks:
            block.attn.attention = "softmax"
        torch.testing.assert_close(cls_soft, sigmoid(ids, cu, max_seqlen, return_cls=True)[1])


def test_cls_id_is_tokenizes():
    from sigmoid_sc.tokenize import CLS_ID as TOKENIZE_CLS_ID

    assert CLS_ID == TOKENIZE_CLS_ID


# ---------------------------------------------------------------------------------------------
# architecture switches: norm pre | post, qk_norm, layer_scale

SWITCHES = {
    "post": {"norm": "post"},
    "qk_norm": {"qk_norm": True},
    "layer_scale": {"layer_scale": 0.1},
}


def pre_ln_reference(model, ids, cu, max_seqlen):
    """The pipeline's encoder written out by hand: x + attn(LN(x)), x + mlp(LN(x)), final LN."""
    rank = torch.arange(ids.numel()) - cu[:-1].long()[cell_index(cu, ids.numel())]
    x = model.tok_emb(ids) + model.pos_emb(rank)
    for block in model.blocks:
        x = x + block.attn(block.ln_1(x), cu, max_seqlen)
        x = x + block.mlp(block.ln_2(x))
    return model.ln_f(x)


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_default_switches_are_the_pre_ln_encoder_exactly(attention):
    model = make_model(attention)
    assert model.config.norm == "pre" and not model.config.qk_norm
    assert model.config.layer_scale is None
    ids, cu, max_seqlen = pack(make_cells([6, 11], seed=7))
    with torch.no_grad():
        assert torch.equal(model(ids, cu, max_seqlen), pre_ln_reference(model, ids, cu, max_seqlen))
    names = {name for name, _ in model.named_parameters()}
    assert not any(word in name for name in names for word in ("q_norm", "gamma", "drop."))
    assert "ln_f.weight" in names


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_post_ln_normalises_after_each_residual_sum(attention):
    model = make_model(attention, norm="post")
    ids, cu, max_seqlen = pack(make_cells([6, 11], seed=7))
    rank = torch.arange(ids.numel()) - cu[:-1].long()[cell_index(cu, ids.numel())]
    with torch.no_grad():
        x = model.drop.ln(model.tok_emb(ids) + model.pos_emb(rank))
        for block in model.blocks:
            x = block.ln_1(x + block.attn(x, cu, max_seqlen))
            x = block.ln_2(x + block.mlp(x))
        assert torch.equal(model(ids, cu, max_seqlen), x)
    assert isinstance(model.ln_f, torch.nn.Identity)  # no final LayerNorm


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_each_switch_changes_the_forward_pass_of_both_kinds(attention, switch):
    """Same seed: the shared weights are equal; the switched model computes something else."""
    base = make_model(attention, seed=3)
    switched = make_model(attention, seed=3, **SWITCHES[switch])
    shared = base.state_dict()
    missing, unexpected = switched.load_state_dict(shared, strict=False)
    new = {"post": {"drop.ln.weight", "drop.ln.bias"}, "qk_norm": set(), "layer_scale": set()}
    for i in range(2):
        new["qk_norm"] |= {
            f"blocks.{i}.attn.{n}_norm.{w}" for n in "qk" for w in ("weight", "bias")
        }
        new["layer_scale"] |= {f"blocks.{i}.ls_{j}.gamma" for j in (1, 2)}
    assert set(missing) == new[switch]
    assert set(unexpected) == ({"ln_f.weight", "ln_f.bias"} if switch == "post" else set())
    for name, value in switched.state_dict().items():  # init of shared weights: unchanged
        if name in shared:
            assert torch.equal(value, shared[name]), name
    ids, cu, max_seqlen = pack(make_cells([6, 11], seed=7))
    with torch.no_grad():
        diff = (switched(ids, cu, max_seqlen) - base(ids, cu, max_seqlen)).abs().max()
    assert diff > 1e-3, (switch, float(diff))


@pytest.mark.parametrize("switches", [{}, *SWITCHES.values(), {"cls_token": True},
                                      {"norm": "post", "qk_norm": True, "layer_scale": 1e-4}])  # fmt: skip
def test_parameter_counts_follow_the_documented_formula(switches):
    from sigmoid_sc.model import count_parameters_formula

    dims = dict(n_layers=3, d_model=48, n_heads=4, d_ff=80, vocab_size=VOCAB, max_len=MAX_LEN)
    counts = {}
    for attention in ("softmax", "sigmoid"):
        config = ModelConfig(**dims, **switches, attention=attention)
        counts[attention] = sum(p.numel() for p in Encoder(config).parameters())
    assert counts["softmax"] == counts["sigmoid"] == count_parameters_formula(config)
    # the formula of the module docstring, written out
    L, d, f, head_dim = 3, 48, 80, 12
    positions = MAX_LEN + int(config.cls_token)
    expected = VOCAB * d + positions * d + L * (4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d)
    expected += 2 * d  # pre: the final LayerNorm; post: the embeddings' LayerNorm instead
    expected += L * 4 * head_dim if config.qk_norm else 0
    expected += L * 2 * d if config.layer_scale is not None else 0
    assert counts["softmax"] == expected


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k(attention):
    """Scaling the q and k projections 10x changes the model without qk_norm, not with it."""
    ids, cu, max_seqlen = pack(make_cells([6, 11], seed=7))
    diffs = {}
    for qk_norm in (False, True):
        model = make_model(attention, seed=5, qk_norm=qk_norm)
        with torch.no_grad():
            before = model(ids, cu, max_seqlen)
            for block in model.blocks:
                block.attn.qkv.weight[: 2 * 32].mul_(10.0)  # the q and k rows
            after = model(ids, cu, max_seqlen)
        diffs[qk_norm] = float((after - before).abs().max())
    # with qk_norm only LayerNorm's eps (1e-5 against q's variance ~1e-2) is left
    assert diffs[False] > 0.1 and diffs[True] < 0.02 * diffs[False], diffs


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_qk_normed_q_and_k_reach_the_kernel_in_vs_dtype(attention, monkeypatch):
    """CUDA autocast runs LayerNorm in fp32 while q, k, v leave the projection in bf16; the
    kernels take one dtype. Here the q/k norms return fp32 the way autocast's do."""
    from sigmoid_sc import model as model_module

    class Fp32LayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return torch.nn.functional.layer_norm(
                x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
            )

    model = make_model(attention, qk_norm=True).to(torch.bfloat16)
    for block in model.blocks:
        for name in ("q_norm", "k_norm"):
            fp32 = Fp32LayerNorm(8)
            fp32.load_state_dict(getattr(block.attn, name).state_dict())
            setattr(block.attn, name, fp32)
    seen = []
    real = model_module.attention_varlen

    def recording(kind, q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(kind, q, k, v, *args, **kwargs)

    monkeypatch.setattr(model_module, "attention_varlen", recording)
    ids, cu, max_seqlen = pack(make_cells([6, 11], seed=7))
    with torch.no_grad():
        out = model(ids, cu, max_seqlen)
    assert seen == [(torch.bfloat16,) * 3] * 2 and out.dtype == torch.bfloat16


def test_layer_scale_starts_at_its_value_and_a_bad_switch_is_refused():
    model = make_model("sigmoid", layer_scale=1e-3)
    for block in model.blocks:
        assert torch.equal(block.ls_1.gamma, torch.full((32,), 1e-3))
        assert torch.equal(block.ls_2.gamma, torch.full((32,), 1e-3))
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="sandwich")
    with pytest.raises(ValueError, match="layer_scale"):
        ModelConfig(layer_scale=0.0)
