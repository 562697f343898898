"""The stability stress test (sigmoid_sc.stress_test): config, data, measurements, divergence, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sigmoid_sc import config
from sigmoid_sc import stress_test as stress
from sigmoid_sc.errors import ConfigError
from sigmoid_sc.model import Encoder

TINY = {
    "n_layers": 2,
    "d_model": 16,
    "n_heads": 2,
    "d_ff": 32,
    "vocab_size": 100,
    "seq_len": 32,
    "batch_size": 2,
    "max_steps": 12,
    "early_steps": 3,
    "warmup_steps": 2,
    "lr": 1.0e-3,
    "precision": "fp32",
    "logit_queries": 0,
}
CPU = torch.device("cpu")


def quiet(*_args):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread


def S(params: dict) -> config.StressTest:
    """The experiments.stress_test section with ``params`` over the schema's defaults."""
    return config.section("experiments.stress_test", params)


def test_default_model_is_the_160m_parameter_encoder():
    cfg = S({})
    with torch.device("meta"):  # no memory: only the shapes matter
        model = Encoder(stress.model_config(cfg, "softmax"))
    assert stress.count_parameters(model) == 159_952_896
    assert (cfg.seq_len, cfg.n_layers, cfg.d_model) == (8192, 10, 1024)


@pytest.mark.parametrize(
    "params, words",
    [
        ({"n_layer": 2}, "experiments.stress_test.n_layer"),
        ({"lr": "high"}, "experiments.stress_test.lr"),
        ({"seq_len": 500, "vocab_size": 100}, r"seq_len \(500\) needs as many distinct genes"),
        ({"d_model": 30, "n_heads": 4}, r"d_model \(30\) must be a multiple of"),
        ({"attentions": ["linear"]}, "attentions"),
    ],
)
def test_config_errors_name_the_key(params, words):
    with pytest.raises(ConfigError, match=words):
        S(params)


def test_batches_are_a_function_of_seed_and_step():
    cfg = S(TINY)
    data = stress.RankSequences(cfg)
    ids, cu, masked = data.batch(5)
    again = stress.RankSequences(cfg).batch(5)
    assert np.array_equal(ids, again[0]) and np.array_equal(masked, again[2])
    assert not np.array_equal(ids, data.batch(6)[0])
    assert cu.tolist() == [0, 32, 64]
    for start, end in zip(cu[:-1], cu[1:]):  # distinct genes per sequence, no special tokens
        seq = ids[start:end]
        assert len(set(seq.tolist())) == cfg.seq_len and seq.min() >= stress.N_SPECIAL
        assert masked[start:end].any()


def test_grad_norms_equal_a_direct_computation():
    cfg = S(TINY)
    torch.manual_seed(0)
    model = Encoder(stress.model_config(cfg, "sigmoid"))
    ids, cu, masked = stress.RankSequences(cfg).batch(0)
    loss = stress.masked_gene_loss(
        model, torch.from_numpy(ids), torch.from_numpy(cu), cfg.seq_len,
        torch.from_numpy(masked), stress.MASK_ID,
    )  # fmt: skip
    loss.backward()
    global_norm, layer_norms = stress.grad_norms(model, stress.layer_of_parameters(model))
    direct = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    assert global_norm == pytest.approx(direct, rel=1e-5)
    for i, block in enumerate(model.blocks):
        block_norm = math.sqrt(
            sum(float(p.grad.double().square().sum()) for p in block.parameters())
        )
        assert layer_norms[i] == pytest.approx(block_norm, rel=1e-5)
    assert len(layer_norms) == cfg.n_layers and max(layer_norms) < global_norm


def test_max_logit_probe_is_exact_with_all_queries_and_a_bound_when_subsampled():
    cfg = S(TINY)
    torch.manual_seed(0)
    model = Encoder(stress.model_config(cfg, "softmax"))
    ids, cu, _ = stress.RankSequences(cfg).batch(0)
    ids_t, cu_t = torch.from_numpy(ids), torch.from_numpy(cu)

    expected = []  # the logits the attention modules really see, from their own inputs
    hooks = [
        b.attn.register_forward_pre_hook(lambda m, a: expected.append((m, a[0].detach())))
        for b in model.blocks
    ]
    with torch.no_grad():
        model(ids_t, cu_t, cfg.seq_len)
    for h in hooks:
        h.remove()
    exact = 0.0
    for module, x in expected:
        x = x.detach()
        with torch.no_grad():
            q, k, _ = module.qkv(x).view(x.shape[0], 3, cfg.n_heads, -1).unbind(1)
        for s, e in zip(cu[:-1], cu[1:]):
            logits = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / math.sqrt(q.shape[-1])
            exact = max(exact, float(logits.abs().max()))

    for queries, check in ((0, "exact"), (4, "bound")):
        probe = stress.MaxLogitProbe(model, queries)
        probe.start(cu)
        with torch.no_grad():
            model(ids_t, cu_t, cfg.seq_len)
        value = probe.stop()
        probe.remove()
        if check == "exact":
            assert value == pytest.approx(exact, rel=1e-5)
        else:
            assert 0 < value <= exact * (1 + 1e-6)
    assert not any(b.attn._forward_pre_hooks for b in model.blocks)  # hooks removed


def test_detector_flags_non_finite_values_and_a_jump_over_the_early_median():
    detector = stress.DivergenceDetector(early_steps=3, factor=100.0)
    for g in (1.0, 2.0, 3.0):
        assert detector.check(5.0, g) is None
    assert detector.early_median == 2.0
    assert detector.check(5.0, 199.0) is None  # below 100 x 2
    assert "early median" in detector.check(5.0, 201.0)
    assert "non-finite loss" in stress.DivergenceDetector(3, 100.0).check(float("nan"), 1.0)
    assert "non-finite gradient" in stress.DivergenceDetector(3, 100.0).check(1.0, float("inf"))


def test_stable_arm_runs_to_max_steps_with_finite_values():
    cfg = S(TINY)
    rows, summary = stress.run_arm(cfg, "sigmoid", CPU, log=quiet)
    assert summary["stop_reason"] == "max_steps" and not summary["diverged"]
    assert summary["steps"] == cfg.max_steps == len(rows)
    assert [r["step"] for r in rows] == list(range(cfg.max_steps))
    for r in rows:
        for key in ("loss", "grad_norm", "max_layer_grad_norm", "max_attn_logit"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["max_layer_grad_norm"] == max(
            r[f"grad_norm_layer{i}"] for i in range(cfg.n_layers)
        )
    assert rows[0]["lr"] == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert rows[-1]["lr"] == pytest.approx(cfg.lr)
    assert summary["n_params"] > 0 and summary["early_median_grad_norm"] > 0


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_an_arm_with_a_huge_learning_rate_diverges_and_stops(attention):
    cfg = S({**TINY, "lr": 1.0e4, "warmup_steps": 0, "max_steps": 40})
    rows, summary = stress.run_arm(cfg, attention, CPU, log=quiet)
    assert summary["diverged"] and summary["stop_reason"] == "diverged"
    step = summary["divergence_step"]
    assert rows[-1]["step"] == step < cfg.max_steps - 1  # stopped there, cleanly
    last = rows[-1]
    bad = not math.isfinite(last["loss"]) or not math.isfinite(last["grad_norm"])
    jump = last["grad_norm"] > cfg.divergence_factor * summary["early_median_grad_norm"]
    assert bad or jump
    assert summary["divergence_reason"]


def test_a_nan_loss_stops_the_arm_at_that_step(monkeypatch):
    """An engineered divergence: the loss turns NaN at step 4 exactly."""
    real_loss = stress.masked_gene_loss
    calls = []

    def loss_turning_nan(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(stress, "masked_gene_loss", loss_turning_nan)
    cfg = S(TINY)
    rows, summary = stress.run_arm(cfg, "softmax", CPU, log=quiet)
    assert summary["divergence_step"] == 4 and len(rows) == 5
    assert summary["divergence_reason"].startswith("non-finite loss")
    assert all(math.isfinite(r["loss"]) for r in rows[:4])


def test_max_seconds_bounds_an_arm():
    cfg = S({**TINY, "max_steps": 10_000, "max_seconds": 0.5})
    rows, summary = stress.run_arm(cfg, "sigmoid", CPU, log=quiet)
    assert summary["stop_reason"] == "max_seconds" and 0 < len(rows) < 10_000


def test_cli_writes_log_summary_and_figure(tmp_path):
    from sigmoid_sc.cli import main

    params = {**TINY, "max_steps": 4}
    out = {k: tmp_path / n for k, n in
           (("log", "log.csv"), ("summary", "s.json"), ("png", "f.png"), ("pdf", "f.pdf"))}  # fmt: skip
    status = main(
        ["stress-test", "--device", "cpu", "--params-json", json.dumps(params),
         "--log-csv", str(out["log"]), "--summary", str(out["summary"]),
         "--png", str(out["png"]), "--pdf", str(out["pdf"])]
    )  # fmt: skip
    assert status == 0
    log = pd.read_csv(out["log"])
    assert list(log.groupby("attention").size().items()) == [("sigmoid", 4), ("softmax", 4)]
    summary = json.loads(out["summary"].read_text())
    assert set(summary["arms"]) == {"softmax", "sigmoid"}
    assert summary["n_params"] == summary["arms"]["softmax"]["n_params"]
    assert summary["config"]["seq_len"] == 32
    assert out["png"].read_bytes()[:4] == b"\x89PNG" and out["pdf"].read_bytes()[:4] == b"%PDF"
    # same initial weights and batches: the first step's loss is the same for both kinds up to
    # the attention difference, which at initialisation is small but not zero
    first = log[log["step"] == 0].set_index("attention")["loss"]
    assert first["softmax"] == pytest.approx(first["sigmoid"], rel=0.05)


def test_cli_refuses_an_unknown_key(tmp_path, capsys):
    from sigmoid_sc.cli import main

    status = main(
        ["stress-test", "--device", "cpu", "--params-json", '{"learning_rate": 1}',
         "--log-csv", str(tmp_path / "l.csv"), "--summary", str(tmp_path / "s.json"),
         "--png", str(tmp_path / "f.png"), "--pdf", str(tmp_path / "f.pdf")]
    )  # fmt: skip
    assert status == 2
    assert "experiments.stress_test.learning_rate" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_learning_rate_sweep_runs_one_arm_per_kind_and_rate(tmp_path):
    cfg = S({**TINY, "lr": [1.0e-3, 1.0e4], "max_steps": 8})
    rows, summary = stress.run_stress_test(cfg, CPU, log=quiet)
    names = ["softmax lr=0.001", "sigmoid lr=0.001", "softmax lr=10000", "sigmoid lr=10000"]
    assert list(summary["arms"]) == names
    assert [a["peak_lr"] for a in summary["arms"].values()] == [1e-3, 1e-3, 1e4, 1e4]
    assert not summary["arms"]["sigmoid lr=0.001"]["diverged"]
    assert summary["arms"]["softmax lr=10000"]["diverged"]
    log = pd.DataFrame(rows)
    assert set(log["arm"]) == set(names) and (log["peak_lr"] > 0).all()
    from sigmoid_sc.experiment_figures import plot_stress, save_figure

    save_figure(plot_stress(log, summary), tmp_path / "f.png", tmp_path / "f.pdf")
    assert (tmp_path / "f.png").stat().st_size > 0


@pytest.mark.parametrize("lr", [[], [1e-3, "x"], [True], 0.0])
def test_bad_learning_rates_are_refused(lr):
    with pytest.raises(ConfigError, match="lr"):
        S({**TINY, "lr": lr})
