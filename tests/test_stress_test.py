"""The stability stress test (sigmoid_sc.stress_test): config, data, measurements, divergence, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("qk_norm", [False, True])
def test_max_logit_probe_is_exact_with_all_queries_and_a_bound_when_subsampled(qk_norm):
    cfg = S({**TINY, "qk_norm": qk_norm})
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
            if qk_norm:  # the logits the kernel sees: after the q and k LayerNorms
                q, k = module.q_norm(q), module.k_norm(k)
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


# --------------------------------------------------------------------------------------------
# the learnable task: gene modules ordered by programmes, bounded rank noise


def test_ordered_task_keeps_each_gene_near_its_programme_position():
    """Bounded rank noise: the gene at rank r sits within 6 sd of position r of its programme,
    so the programme and the rank predict it; task_seed fixes the programmes, seed the batches."""
    params = {**TINY, "task": "ordered", "module_size": 4, "vocab_size": 203, "seq_len": 64,
              "n_cell_types": 3, "task_seed": 5}  # fmt: skip
    cfg = S(params)
    data = stress.RankSequences(cfg)
    other_seed = stress.RankSequences(S({**params, "seed": 1}))
    assert np.array_equal(data.order, other_seed.order)  # same task, other batches
    assert not np.array_equal(data.batch(0)[0], other_seed.batch(0)[0])
    other_task = stress.RankSequences(S({**params, "task_seed": 6}))
    assert not np.array_equal(data.order, other_task.order)
    bound = 6 * cfg.rank_noise
    for step in range(5):
        ids, cu, masked = data.batch(step)
        for start, end in zip(cu[:-1], cu[1:]):
            genes = ids[start:end] - stress.N_SPECIAL
            assert len(set(genes.tolist())) == len(genes) == cfg.seq_len
            assert masked[start:end].any()
            # the programme whose order fits the sequence best
            distances = []
            for order in data.order:
                position = np.argsort(order)[genes]
                distances.append(np.abs(position - np.arange(len(genes))).max())
            assert min(distances) <= bound
    # modules: the genes of one module keep one internal order in every programme
    module = data.order[0][:4]
    for order in data.order:
        at = int(np.flatnonzero(order == module[0])[0])
        assert order[at : at + 4].tolist() == module.tolist()


def test_programme_noise_displaces_modules_of_one_shared_order_by_at_most_3_sd():
    base = {"task": "ordered", "vocab_size": 403, "seq_len": 64, "n_cell_types": 4,
            "module_size": 8}  # fmt: skip
    same = stress.RankSequences(S({**base, "programme_noise": 0.0}))
    assert (same.order == same.order[0]).all()  # no noise: one shared order
    free = stress.RankSequences(S(base))
    noisy = stress.RankSequences(S({**base, "programme_noise": 1.5}))
    # a module's score moves at most 3 sd, so its slot at most 2 x 3 sd (others move past it),
    # and two programmes differ by at most twice that
    bound = 4 * 3 * 1.5
    for data in (noisy, free):
        slots = np.argsort(data.order, axis=1) // 8  # [programme, gene] -> module slot
        spread = (slots.max(0) - slots.min(0)).max()
        if data is noisy:
            assert spread <= bound
        else:
            assert spread > bound  # independent orders scatter the modules


def test_preference_task_is_unchanged_by_default():
    cfg = S({"vocab_size": 100, "seq_len": 32, "n_cell_types": 2})
    assert cfg.task == "preference" and cfg.task_seed is None
    rng = np.random.default_rng([cfg.seed, 7])
    expected = (rng.normal(size=(2, 97)) * 2.0).astype(np.float32)
    assert np.array_equal(stress.RankSequences(cfg).preference, expected)


def test_a_small_model_learns_the_ordered_task_below_70_percent_of_chance():
    """At a moderate learning rate the masked-gene loss falls to <= 0.7 x ln(n_genes)."""
    params = {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64, "vocab_size": 67,
              "seq_len": 32, "batch_size": 8, "n_cell_types": 4, "module_size": 8,
              "rank_noise": 1.0, "task": "ordered", "task_seed": 0, "warmup_steps": 10,
              "max_steps": 100, "schedule": "cosine", "precision": "fp32", "early_steps": 10,
              "logit_queries": 4, "lr": 1e-2}  # fmt: skip
    cfg = S(params)
    rows, summary = stress.run_arm(cfg, "softmax", CPU, log=quiet)
    chance = stress.chance_loss(cfg)
    final = float(np.mean([r["loss"] for r in rows[-20:]]))
    assert rows[0]["loss"] > 0.95 * chance and not summary["diverged"]
    assert final <= 0.7 * chance, (final, chance)


def test_learning_rate_warms_up_then_stays_or_follows_a_cosine():
    constant = S({**TINY, "lr": 1e-2, "warmup_steps": 4, "max_steps": 14})
    cosine = S({**TINY, "lr": 1e-2, "warmup_steps": 4, "max_steps": 14, "schedule": "cosine",
                "min_lr_ratio": 0.2})  # fmt: skip
    for cfg in (constant, cosine):
        assert [stress.learning_rate(cfg, 1e-2, s) for s in range(4)] == [
            1e-2 * (s + 1) / 4 for s in range(4)
        ]
    assert [stress.learning_rate(constant, 1e-2, s) for s in range(4, 14)] == [1e-2] * 10
    lrs = [stress.learning_rate(cosine, 1e-2, s) for s in range(4, 15)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[5] == pytest.approx(0.6e-2)  # halfway
    assert lrs[-1] == pytest.approx(0.2e-2) and all(a > b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("switch", [{"norm": "post"}, {"qk_norm": True}, {"layer_scale": 0.1}])
def test_the_encoders_switches_reach_the_model(switch):
    cfg = S({**TINY, **switch})
    model_cfg = stress.model_config(cfg, "sigmoid")
    assert {k: getattr(model_cfg, k) for k in switch} == switch
    torch.manual_seed(0)
    base = stress.count_parameters(Encoder(stress.model_config(S(TINY), "sigmoid")))
    from sigmoid_sc.model import count_parameters_formula

    assert stress.count_parameters(Encoder(model_cfg)) == count_parameters_formula(model_cfg)
    assert (count_parameters_formula(model_cfg) == base) == ("norm" in switch)


def test_probe_records_each_layer_with_entropy_or_row_sum():
    cfg = S({**TINY, "task": "ordered", "module_size": 4, "max_steps": 6})
    for attention in ("softmax", "sigmoid"):
        rows, _ = stress.run_arm(cfg, attention, CPU, log=quiet)
        stat = stress.attention_stat_name(attention)
        for r in rows:
            layer_max = [r[f"max_attn_logit_layer{i}"] for i in range(2)]
            assert max(layer_max) == r["max_attn_logit"] and min(layer_max) > 0
            values = [r[f"{stat}_layer{i}"] for i in range(2)]
            if attention == "softmax":  # entropy of a distribution over 32 keys
                assert all(0 < v <= math.log(32) + 1e-5 for v in values)
            else:  # row sums of sigmoid(s - log n): about 1 for small logits
                assert all(0.2 < v < 5 for v in values)


def test_probe_entropy_and_row_sum_equal_a_direct_computation():
    """Layer 0 of an untrained model: its input is the embedding sum, known without hooks."""
    cfg = S(TINY)
    ids, cu, _ = stress.RankSequences(cfg).batch(0)
    ids_t, cu_t = torch.from_numpy(ids), torch.from_numpy(cu)
    for attention in ("softmax", "sigmoid"):
        torch.manual_seed(0)
        model = Encoder(stress.model_config(cfg, attention))
        probe = stress.MaxLogitProbe(model, 0)
        probe.start(cu)
        with torch.no_grad():
            model(ids_t, cu_t, cfg.seq_len)
            probe.stop()
            probe.remove()
            block = model.blocks[0]
            rank = torch.arange(ids.size) % cfg.seq_len
            x = block.ln_1(model.tok_emb(ids_t) + model.pos_emb(rank))
            q, k, _ = block.attn.qkv(x).view(ids.size, 3, cfg.n_heads, -1).unbind(1)
            values = []
            for s, e in zip(cu[:-1], cu[1:]):
                logits = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / math.sqrt(q.shape[-1])
                if attention == "softmax":
                    p = logits.softmax(-1)
                    values.append(-(p * p.log()).sum(-1).mean())
                else:
                    values.append(torch.sigmoid(logits - math.log(e - s)).sum(-1).mean())
        assert probe.layer_stat[0] == pytest.approx(float(torch.stack(values).mean()), rel=1e-5)


# --------------------------------------------------------------------------------------------
# resumable arms: checkpoints, a stop request (SIGTERM), a time budget

RESUME = {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_ff": 32, "vocab_size": 100,
          "seq_len": 32, "batch_size": 2, "max_steps": 12, "early_steps": 3, "warmup_steps": 2,
          "lr": 1.0e-3, "precision": "fp32", "logit_queries": 0, "task": "ordered",
          "module_size": 4, "schedule": "cosine", "norm": "post", "qk_norm": True}  # fmt: skip


def comparable(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_a_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path, attention):
    cfg = S({**RESUME, "checkpoint_every": 4})
    full_rows, full = stress.run_arm(cfg, attention, CPU, log=quiet)

    path = tmp_path / "arm.pt"
    stops = iter([False] * 5 + [True] * 100)  # stop before step 5: after a checkpoint at 4
    rows, first = stress.run_arm(cfg, attention, CPU, log=quiet, checkpoint=path,
                                 should_stop=lambda: next(stops))  # fmt: skip
    assert first["stop_reason"] == "interrupted" and not first["complete"] and len(rows) == 5
    state = torch.load(path, weights_only=False)
    assert state["summary"] is None and len(state["rows"]) == 5 and "optimizer" in state

    rows, second = stress.run_arm(cfg, attention, CPU, log=quiet, checkpoint=path)
    assert second["complete"] and second["resumed_at_step"] == 5
    assert comparable(rows) == comparable(full_rows)  # bitwise, every measurement
    assert second["final_loss"] == full["final_loss"]
    finished = torch.load(path, weights_only=False)
    assert finished["summary"]["complete"] and "model" not in finished  # rows only
    again, third = stress.run_arm(cfg, attention, CPU, log=quiet, checkpoint=path)
    assert comparable(again) == comparable(full_rows) and third == second  # read, not rerun


def test_sigterm_stops_an_arm_at_a_step_boundary_and_it_resumes(tmp_path):
    cfg = S(RESUME)
    full_rows, _ = stress.run_arm(cfg, "sigmoid", CPU, log=quiet)
    path = tmp_path / "arm.pt"

    def on_step(rows):
        if len(rows) == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # as a job's time limit would

    with stress.stop_on_signals() as request:
        rows, summary = stress.run_arm(cfg, "sigmoid", CPU, log=quiet, checkpoint=path,
                                       on_step=on_step, should_stop=request)  # fmt: skip
    assert request.signal == signal.SIGTERM and summary["stop_reason"] == "interrupted"
    assert len(rows) == 7
    rows, summary = stress.run_arm(cfg, "sigmoid", CPU, log=quiet, checkpoint=path)
    assert summary["resumed_at_step"] == 7 and comparable(rows) == comparable(full_rows)


def test_a_checkpoint_of_another_configuration_is_ignored(tmp_path):
    path = tmp_path / "arm.pt"
    cfg = S(RESUME)
    stops = iter([False] * 3 + [True] * 100)
    stress.run_arm(cfg, "softmax", CPU, log=quiet, checkpoint=path,
                   should_stop=lambda: next(stops))  # fmt: skip
    other = S({**RESUME, "rank_noise": 2.0})
    messages = []
    rows, summary = stress.run_arm(other, "softmax", CPU, log=messages.append, checkpoint=path)
    assert summary["resumed_at_step"] is None and len(rows) == other.max_steps
    assert any("another configuration" in m for m in messages)
    # max_seconds and checkpoint_every may change between invocations
    longer = S({**RESUME, "rank_noise": 2.0, "max_seconds": 99.0, "checkpoint_every": 5})
    assert stress.checkpoint_fingerprint(longer, "softmax", 1e-3) == (
        stress.checkpoint_fingerprint(other, "softmax", 1e-3)
    )


def test_stress_cli_continues_after_its_budget_to_the_uninterrupted_result(tmp_path):
    from sigmoid_sc.cli import main

    params = json.dumps({**RESUME, "max_steps": 300, "checkpoint_every": 50})

    def cli(name, *extra):
        out = tmp_path / name
        status = main(
            ["stress-test", "--device", "cpu", "--params-json", params,
             "--log-csv", str(out / "log.csv"), "--summary", str(out / "s.json"),
             "--png", str(out / "f.png"), "--pdf", str(out / "f.pdf"), *extra]
        )  # fmt: skip
        assert status == 0
        return pd.read_csv(out / "log.csv"), json.loads((out / "s.json").read_text())

    full, full_summary = cli("full")
    ckpt = str(tmp_path / "ckpt")
    # wherever the budget stops it, the rerun ends in the same place
    part, part_summary = cli("part", "--checkpoint-dir", ckpt, "--budget-s", "0.5")
    assert not part_summary["complete"] and len(part) < len(full)
    assert list(Path(ckpt).glob("*.pt"))
    rest, rest_summary = cli("rest", "--checkpoint-dir", ckpt)
    assert rest_summary["complete"] and full_summary["complete"]
    columns = [c for c in full.columns if c != "elapsed_s"]
    pd.testing.assert_frame_equal(rest[columns], full[columns])
    assert not list(Path(ckpt).glob("*.pt"))  # done: deleted, a rerun measures afresh


def test_stress_cli_checkpoints_on_sigterm_fails_and_a_rerun_completes(tmp_path):
    params = json.dumps({**RESUME, "max_steps": 400, "attentions": ["sigmoid"]})
    outputs = ["--log-csv", str(tmp_path / "log.csv"), "--summary", str(tmp_path / "s.json"),
               "--png", str(tmp_path / "f.png"), "--pdf", str(tmp_path / "f.pdf")]  # fmt: skip
    command = [sys.executable, "-m", "sigmoid_sc.cli", "stress-test", "--device", "cpu",
               "--params-json", params, "--checkpoint-dir", str(tmp_path / "ckpt"),
               "--partial-every", "1", *outputs]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "log.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first step is logged: the handler is in place
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["partial"] and summary["arms"] == {} and not (tmp_path / "f.png").exists()
    state = torch.load(tmp_path / "ckpt" / "sigmoid.pt", weights_only=False)
    stopped_at = len(state["rows"])
    assert 0 < stopped_at < 400
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming at step {stopped_at}" in rerun.stderr
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["step"].tolist() == list(range(400))
    assert json.loads((tmp_path / "s.json").read_text())["complete"]


def test_no_arm_starts_that_the_time_left_cannot_hold(tmp_path):
    """After the first arm, no time is left: the other three are not started; a second
    invocation reads the first from its checkpoint and runs the rest."""
    cfg = S({**RESUME, "lr": [1e-3, 2e-3]})
    left = iter([100.0, 0.0, 0.0, 0.0])
    messages = []
    _, summary = stress.run_stress_test(
        cfg, CPU, messages.append, checkpoint_dir=tmp_path, time_left=lambda: next(left)
    )
    assert list(summary["arms"]) == ["softmax lr=0.001"]
    assert sum("not started (time budget)" in m for m in messages) == 3
    rows, summary = stress.run_stress_test(cfg, CPU, quiet, checkpoint_dir=tmp_path)
    assert len(summary["arms"]) == 4 and all(a["complete"] for a in summary["arms"].values())
    assert len(rows) == 4 * cfg.max_steps
