"""The Jacobian analysis (sigmoid_sc.jacobian): analytic forms vs autograd, trained models, CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest_tokens import make_tokens, sections

from sigmoid_sc import config
from sigmoid_sc import jacobian as jac
from sigmoid_sc.errors import ConfigError, DataError
from sigmoid_sc.train import train

TINY_MODEL = {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_ff": 32}
TINY_TRAIN = {"steps": 4, "batch_tokens": 320, "warmup_steps": 1, "eval_every": 4,
              "checkpoint_every": 4}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def J(params: dict) -> config.Jacobian:
    """The experiments.jacobian section with ``params`` over the schema's defaults."""
    return config.section("experiments.jacobian", params)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dataset's tokens and a trained softmax and sigmoid model of the same seed
    (trained on one torch thread, as the module's tests run; the count is restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("jacobian")
        tokens = make_tokens(root / "tokens.npz", n_cells=80, n_genes=40, max_len=24)
        models = {}
        for attention in ("softmax", "sigmoid"):
            out = train(
                "toy",
                tokens,
                attention,
                0,
                *sections(TINY_MODEL, TINY_TRAIN),
                "cpu",
                root / attention,
            )
            models[attention] = out / "model.pt"
    finally:
        torch.set_num_threads(threads)
    return tokens, models


def logits_row(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g, dtype=torch.float64) * 3
    s[0] = 0.0  # sigma'(0 + b) with b = 0 is the maximum, 1/4
    s[1] = 40.0  # saturated ends: derivatives ~0, never negative
    s[2] = -40.0
    return s


@pytest.mark.parametrize("n, bias", [(1, 0.0), (7, 0.0), (33, -math.log(33))])
def test_sigmoid_derivative_equals_autograd_is_bounded_and_diagonal(n, bias):
    s = logits_row(max(n, 3), n)[:n].requires_grad_()
    numeric = torch.autograd.functional.jacobian(lambda x: torch.sigmoid(x + bias), s)
    analytic = jac.sigmoid_jacobian(s.detach(), bias)
    assert torch.allclose(numeric, analytic, atol=1e-15, rtol=0)
    off = numeric - torch.diag(torch.diagonal(numeric))
    assert torch.count_nonzero(off) == 0  # exactly zero, not merely small
    derivative = torch.diagonal(analytic)
    assert (derivative >= 0).all() and (derivative <= jac.SIGMOID_BOUND).all()
    _, elementwise = jac.sigmoid_row_stats(s.detach(), bias)
    assert torch.equal(elementwise, derivative)
    # the bound is attained where s + b = 0 and the elementwise derivative is sigma (1 - sigma)
    assert float(jac.sigmoid_jacobian(torch.zeros(1, dtype=torch.float64), 0.0)) == 0.25


def test_sigmoid_bound_holds_on_a_dense_grid_of_logits():
    s = torch.linspace(-60, 60, 200_001, dtype=torch.float32)
    _, derivative = jac.sigmoid_row_stats(s, 0.0)
    assert float(derivative.max()) <= 0.25 and float(derivative.min()) >= 0.0


@pytest.mark.parametrize("n", [2, 9, 64])
def test_softmax_jacobian_equals_autograd_and_is_dense(n):
    s = logits_row(n, n) if n >= 3 else torch.tensor([0.3, -1.2], dtype=torch.float64)
    numeric = torch.autograd.functional.jacobian(lambda x: torch.softmax(x, dim=-1), s)
    analytic = jac.softmax_jacobian(s)
    assert torch.allclose(numeric, analytic, atol=1e-15, rtol=0)
    off = numeric - torch.diag(torch.diagonal(numeric))
    mask = ~torch.eye(n, dtype=torch.bool)
    assert (off[mask] != 0).all()  # every off-diagonal entry nonzero: a dense Jacobian
    assert (off[mask] < 0).all()  # -p_j p_l


def test_softmax_row_stats_match_the_full_jacobian():
    s = torch.randn(3, 5, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    stats = jac.softmax_row_stats(s)
    for idx in np.ndindex(3, 5):
        full = jac.softmax_jacobian(s[idx]).abs()
        mask = ~torch.eye(17, dtype=torch.bool)
        assert float(stats["row_max"][idx]) == pytest.approx(float(full.max()), rel=1e-12)
        l1 = float(full[mask].sum() / full.sum())
        assert float(stats["offdiag_l1"][idx]) == pytest.approx(l1, rel=1e-9)
        assert l1 == pytest.approx(0.5, rel=1e-9)  # the identity the docstring states
        frob = float(full[mask].square().sum() / full.square().sum())
        assert float(stats["offdiag_frob"][idx]) == pytest.approx(frob, rel=1e-9)
        assert float(stats["inf_norm"][idx]) == pytest.approx(float(full.sum(1).max()), rel=1e-12)


def test_autograd_check_reports_zero_off_diagonals_for_sigmoid_only():
    s = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    err_sig, off_sig = jac.autograd_check("sigmoid", s, -math.log(20))
    err_soft, off_soft = jac.autograd_check("softmax", s, 0.0)
    assert err_sig < 1e-15 and err_soft < 1e-15
    assert off_sig == 0.0 and off_soft > 1e-6


def test_recomputed_logits_are_the_models_own(trained):
    """q, k from the hooked inputs reproduce the attention modules' outputs exactly."""
    tokens_path, models = trained
    from sigmoid_sc.tokens import load_tokens, pack
    from sigmoid_sc.train import load_model

    tokens = load_tokens(tokens_path, "toy")
    ids, cu, max_seqlen = pack(tokens, tokens.cells("test")[:5])
    for attention, path in models.items():
        model, _ = load_model(path, torch.device("cpu"))
        outputs = []
        hooks = [
            b.attn.register_forward_hook(lambda m, a, o, out=outputs: out.append(o))
            for b in model.blocks
        ]
        inputs = jac.attention_inputs(model, ids, cu, max_seqlen, torch.device("cpu"))
        for h in hooks:
            h.remove()
        for layer, x in enumerate(inputs):
            module = model.blocks[layer].attn
            v = module.qkv(x).view(x.shape[0], 3, module.n_heads, -1)[:, 2]
            ys = []
            for cell, logits in jac.layer_logits(module, x, cu):
                s, e = cu[cell], cu[cell + 1]
                if attention == "sigmoid":
                    p = torch.sigmoid(logits - math.log(e - s))
                else:
                    p = torch.softmax(logits, dim=-1)
                ys.append(torch.matmul(p, v[s:e].transpose(0, 1)).transpose(0, 1))  # [n, H, D]
            y = torch.cat(ys).reshape(x.shape)
            with torch.no_grad():
                assert torch.allclose(module.proj(y), outputs[layer], atol=1e-5, rtol=1e-4)


def test_analysis_of_trained_models(trained):
    tokens_path, models = trained
    result = jac.jacobian_analysis("toy", str(tokens_path), {k: str(v) for k, v in models.items()},
                                   J({"n_cells": 6, "check_rows": 3}), "cpu")  # fmt: skip
    table = result["table"]
    assert len(table) == 2 * TINY_MODEL["n_layers"] * TINY_MODEL["n_heads"]
    sig, soft = table[table.attention == "sigmoid"], table[table.attention == "softmax"]
    assert (sig["offdiag_l1_share_mean"] == 0).all() and (sig["offdiag_frob_share_mean"] == 0).all()
    assert np.allclose(soft["offdiag_l1_share_mean"], 0.5)
    assert (soft["offdiag_frob_share_mean"] > 0).all()
    assert (sig["entries_above_0.25"] == 0).all() and (sig["sigmoid_derivative_max"] <= 0.25).all()
    assert (table["row_max_dpds_max"] <= 0.25).all() and (table["row_max_dpds_median"] > 0).all()
    checked = table.dropna(subset=["autograd_max_abs_err"])
    assert set(checked["layer"]) == {0, TINY_MODEL["n_layers"] - 1}
    assert (checked["autograd_rows"] == 3).all()
    assert (checked["autograd_max_abs_err"] < 1e-12).all()
    assert (checked[checked.attention == "sigmoid"]["autograd_offdiag_max_abs"] == 0).all()
    assert (checked[checked.attention == "softmax"]["autograd_offdiag_max_abs"] > 0).all()
    n_rows = int(result["lengths"].sum())
    assert (table["n_rows"] == n_rows).all() and result["n_cells"] == 6
    hist = result["per_attention"]["sigmoid"]["hist"]
    assert hist.sum() == sum(int(n) ** 2 for n in result["lengths"]) * TINY_MODEL["n_layers"] * 2


def test_cli_writes_table_and_figure(trained, tmp_path):
    from sigmoid_sc.cli import main

    tokens_path, models = trained
    out = {k: tmp_path / f"jacobian.{k}" for k in ("csv", "png", "pdf")}
    status = main(
        ["jacobian", "--dataset", "toy", "--tokens", str(tokens_path),
         "--softmax-model", str(models["softmax"]), "--sigmoid-model", str(models["sigmoid"]),
         "--params-json", '{"n_cells": 4, "check_rows": 1}', "--device", "cpu",
         "--csv", str(out["csv"]), "--png", str(out["png"]), "--pdf", str(out["pdf"])]
    )  # fmt: skip
    assert status == 0
    table = pd.read_csv(out["csv"])
    assert set(table["attention"]) == {"softmax", "sigmoid"} and (table["n_cells"] == 4).all()
    assert out["png"].read_bytes()[:4] == b"\x89PNG" and out["pdf"].read_bytes()[:4] == b"%PDF"


def test_swapped_models_are_refused(trained):
    tokens_path, models = trained
    swapped = {"softmax": str(models["sigmoid"]), "sigmoid": str(models["softmax"])}
    with pytest.raises(DataError, match="holds a 'sigmoid' model"):
        jac.jacobian_analysis("toy", str(tokens_path), swapped, J({"n_cells": 2}), "cpu")


@pytest.mark.parametrize(
    "params, words",
    [
        ({"cells": 3}, "experiments.jacobian.cells"),
        ({"split": "all"}, "split"),
        ({"n_cells": 0}, "n_cells"),
        ({"n_cells": True}, "n_cells"),
    ],  # fmt: skip
)
def test_bad_params_name_the_key(params, words):
    with pytest.raises(ConfigError, match=words):
        J(params)


def test_the_example_is_a_crop_of_the_whole_rows_jacobian(trained, monkeypatch):
    monkeypatch.setattr(jac, "EXAMPLE_KEYS", 4)  # fewer keys than every cell has
    tokens_path, models = trained
    from sigmoid_sc.tokens import load_tokens, pack
    from sigmoid_sc.train import load_model

    tokens = load_tokens(tokens_path, "toy")
    cells = tokens.cells("test")[:3]
    ids, cu, max_seqlen = pack(tokens, cells)
    model, _ = load_model(models["softmax"], torch.device("cpu"))
    result = jac.analyse_model(model, "softmax", ids, cu, max_seqlen, torch.device("cpu"), 0)
    x = jac.attention_inputs(model, ids, cu, max_seqlen, torch.device("cpu"))[-1]
    _, logits = next(jac.layer_logits(model.blocks[-1].attn, x, cu))
    full = jac.softmax_jacobian(logits[0, 0].double()).abs().numpy()
    assert full.shape[0] > 4 and result["example"].shape == (4, 4)
    assert np.allclose(result["example"], full[:4, :4], atol=1e-12)
