"""Training: loss falls, deterministic batches, resume after preemption, config errors, embed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest_tokens import TINY_MODEL, TINY_TRAIN, sections

from sigmoid_sc import config, distributed
from sigmoid_sc import train as train_mod
from sigmoid_sc.embed import embed, embed_untrained, initial_model
from sigmoid_sc.errors import ConfigError
from sigmoid_sc.model import pool
from sigmoid_sc.tokens import TokenBatches, choose_masked, load_tokens, pack, token_chunks
from sigmoid_sc.train import lr_factor, plateau_reached, train

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tokens_path, out_dir, attention="sigmoid", seed=0, model=None, train_params=None, **kw):
    model, train_params = sections(
        TINY_MODEL if model is None else model, TINY_TRAIN if train_params is None else train_params
    )
    return train("toy", tokens_path, attention, seed, model, train_params, "cpu", out_dir, **kw)


def final_state(out_dir):
    record = torch.load(Path(out_dir) / "model.pt", weights_only=True)
    return record["model"]


def assert_same_run(dir_a, dir_b):
    """Bitwise-equal weights; equal history except the wall-clock column."""
    a, b = final_state(dir_a), final_state(dir_b)
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    hist_a = pd.read_csv(Path(dir_a) / "history.csv").drop(columns="elapsed_s")
    hist_b = pd.read_csv(Path(dir_b) / "history.csv").drop(columns="elapsed_s")
    pd.testing.assert_frame_equal(hist_a, hist_b, check_exact=True)


# --- batches, masks, schedule ------------------------------------------------------------


def stream_batches(lengths, budget, seed, steps):
    cells = np.arange(100, 100 + lengths.size)
    full_lengths = np.zeros(100 + lengths.size, dtype=np.int64)
    full_lengths[cells] = lengths
    batches = TokenBatches(cells, lengths, budget, seed)
    return cells, full_lengths, [batches(t) for t in range(steps)]


def test_token_batches_are_a_function_of_seed_and_step():
    lengths = np.random.default_rng(0).integers(5, 60, size=50)
    _, _, first = stream_batches(lengths, 200, seed=3, steps=30)
    again = TokenBatches(np.arange(100, 150), lengths, 200, seed=3)
    for t in reversed(range(30)):  # any order, a fresh object: the same cells
        np.testing.assert_array_equal(again(t), first[t])
    other = TokenBatches(np.arange(100, 150), lengths, 200, seed=4)
    assert not np.array_equal(other(0), first[0])


@pytest.mark.parametrize(("budget", "seed"), [(60, 0), (200, 1), (333, 2), (1000, 3)])
def test_token_batches_never_exceed_the_budget_and_cover_every_cell_of_an_epoch(budget, seed):
    lengths = np.random.default_rng(seed).integers(1, 61, size=53)
    cells, full_lengths, batches = stream_batches(lengths, budget, seed, steps=150)
    stream = np.concatenate(batches)
    for b in batches:
        assert 0 < full_lengths[b].sum() <= budget
    # every epoch is a permutation of all the cells, the epochs follow one another, and a batch
    # stops only where the next cell would exceed the budget
    epochs = stream.size // cells.size
    assert epochs >= 2
    for e in range(epochs):
        assert sorted(stream[e * cells.size : (e + 1) * cells.size]) == cells.tolist()
    assert not np.array_equal(stream[: cells.size], stream[cells.size : 2 * cells.size])
    for b, nxt in zip(batches, batches[1:]):
        assert full_lengths[b].sum() + full_lengths[nxt[0]] > budget


def test_token_budget_errors_name_the_numbers():
    lengths = np.array([10, 30, 70, 5])
    with pytest.raises(ConfigError, match=r"batch_tokens is 64 but 1 of the 4 .* longest 70"):
        TokenBatches(np.arange(4), lengths, 64, 0)
    with pytest.raises(ConfigError, match=r"batch_tokens is 200 but all 4 .* hold 115 tokens"):
        TokenBatches(np.arange(4), lengths, 200, 0)


def test_token_chunks_pack_in_order_up_to_the_budget():
    lengths = np.array([5, 5, 5, 9, 1, 10, 3])
    bounds = token_chunks(lengths, 10)
    assert bounds.tolist() == [0, 2, 3, 5, 6, 7]
    assert token_chunks(lengths, 1000).tolist() == [0, 7]


def test_masking_at_least_one_per_cell_and_near_mask_prob():
    cu = np.array([0, 1, 3, 203, 1203], dtype=np.int32)
    masked = choose_masked(cu, 0.15, np.random.default_rng(0))
    per_cell = np.add.reduceat(masked, cu[:-1])
    assert (per_cell >= 1).all()
    assert masked[0]  # a one-token cell is always masked
    assert 0.12 < masked[203:].mean() < 0.18


def test_lr_warmup_then_constant_or_cosine_to_ten_percent():
    constant = config.section("train", {"steps": 100, "warmup_steps": 10})
    assert constant.schedule == "constant"
    factors = [lr_factor(t, constant) for t in range(200)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10:] == [1.0] * 190  # past the cap too: the cap is not part of the schedule
    cosine = config.section("train", {"steps": 100, "warmup_steps": 10, "schedule": "cosine"})
    factors = [lr_factor(t, cosine) for t in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, cosine) == pytest.approx(0.1)


# --- the stopping rule on synthetic validation curves --------------------------------------

STEPS = np.arange(0, 1001, 50)


def test_a_curve_that_flattens_has_plateaued():
    loss = 2.0 + 6.0 * np.exp(-STEPS / 100)  # 1% of 2.0 over the last 200 steps: long reached
    assert plateau_reached(STEPS, loss)
    # it had not at step 300, where the loss still fell by a third over the last 20%
    assert not plateau_reached(STEPS[:7], loss[:7])
    # the first step where it has: improvement over [0.8 s, s] below 1% of the loss at 0.8 s
    first = next(k for k in range(2, STEPS.size) if plateau_reached(STEPS[: k + 1], loss[: k + 1]))
    s = STEPS[first]
    start = loss[STEPS <= 0.8 * s][-1]
    assert start - loss[first] < 0.01 * start
    prev_start = loss[STEPS <= 0.8 * STEPS[first - 1]][-1]
    assert prev_start - loss[first - 1] >= 0.01 * prev_start


def test_a_curve_still_falling_has_not_plateaued():
    loss = 8.0 - 0.004 * STEPS  # falls 0.8 over the last 200 steps, well above 1%
    assert not plateau_reached(STEPS, loss)
    slow = 8.0 * (1 - 0.0001 * STEPS)  # 8.0 -> 7.2: 2.2% over the last 20%
    assert not plateau_reached(STEPS, slow)
    assert plateau_reached(STEPS, slow, min_rel_improvement=0.03)


def test_a_rising_or_noisy_flat_curve_has_plateaued():
    rising = 3.0 + 0.001 * STEPS  # a rise counts as no improvement
    assert plateau_reached(STEPS, rising)
    wobble = 3.0 + 0.01 * np.sin(STEPS)  # within 1% of 3.0
    assert plateau_reached(STEPS, wobble)


def test_a_curve_too_short_to_judge_has_not_plateaued():
    assert not plateau_reached([], [])
    assert not plateau_reached([0], [3.0])
    assert not plateau_reached([0, 10], [3.0, 3.0], min_steps=20)  # before min_steps
    assert plateau_reached([0, 10], [3.0, 3.0])  # the window [8, 10] starts at step 0
    # no evaluation at or before 80% of the last step except one at or after it
    assert not plateau_reached([90, 100], [3.0, 3.0])
    assert not plateau_reached([0, 50, 100], [3.0, 3.0, float("nan")])


def test_the_window_starts_at_the_last_evaluation_before_it():
    steps = [0, 250, 500, 750, 1000]
    # window 20% of 1000: from step 800 back to the evaluation at 750
    assert plateau_reached(steps, [8.0, 4.0, 3.0, 2.999, 2.99])
    assert not plateau_reached(steps, [8.0, 4.0, 3.0, 3.05, 2.99])
    assert plateau_reached(steps, [8.0, 4.0, 3.0, 3.05, 2.99], window=0.3)  # from 500


# --- training ------------------------------------------------------------------------------


def test_training_loss_falls_on_structured_data(tokens_path, tmp_path):
    params = {**TINY_TRAIN, "steps": 80, "eval_every": 20, "checkpoint_every": 1000}
    run(tokens_path, tmp_path, train_params=params)
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns) == ["step", "split", "loss", "lr", "tokens", "elapsed_s"]
    val = history[history.split == "val"]
    assert val.step.tolist() == [0, 20, 40, 60, 80]
    vocab = load_tokens(tokens_path, "toy").vocab_size
    assert val.loss.iloc[0] == pytest.approx(np.log(vocab), abs=0.1)  # untrained: uniform
    assert val.loss.iloc[-1] < val.loss.iloc[0] - 0.5
    train_rows = history[history.split == "train"]
    assert train_rows.step.tolist() == list(range(1, 81))
    assert train_rows.loss.tail(10).mean() < train_rows.loss.head(10).mean() - 0.5
    assert (np.diff(train_rows.tokens) > 0).all()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_softmax_and_sigmoid_see_the_same_batches(tokens_path, tmp_path, monkeypatch):
    seen = {}
    original = distributed.packed_gene_loss  # the training step's loss (validation's is not)

    def spy(model, batch, reduction="mean"):
        fields = (batch.input_ids, batch.cu_seqlens, batch.positions, batch.targets)
        seen.setdefault(model.config.attention, []).append(tuple(f.clone() for f in fields))
        return original(model, batch, reduction)

    monkeypatch.setattr(distributed, "packed_gene_loss", spy)
    params = {**TINY_TRAIN, "steps": 4}
    for attention in ("softmax", "sigmoid"):
        run(tokens_path, tmp_path / attention, attention=attention, train_params=params)
    assert len(seen["softmax"]) == len(seen["sigmoid"]) == 4
    for a, b in zip(seen["softmax"], seen["sigmoid"]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    first_seed0 = seen.pop("sigmoid")[0]
    run(tokens_path, tmp_path / "seed1", seed=1, train_params=params)
    assert not torch.equal(seen["sigmoid"][0][0], first_seed0[0])  # another seed, other batches
    # the batches fill the token budget (at most one cell short of it)
    tokens = load_tokens(tokens_path, "toy")
    for ids, _cu, positions, targets in seen["softmax"]:
        assert ids.numel() <= TINY_TRAIN["batch_tokens"]
        assert ids.numel() > TINY_TRAIN["batch_tokens"] - tokens.max_len
        assert (ids[positions] == tokens.mask_id).all() and (targets != tokens.mask_id).all()


def test_same_seed_same_init_inside_train(tokens_path, tmp_path, monkeypatch):
    """The model train builds is identical for both kinds (seeded before construction)."""
    built = {}
    encoder = train_mod.Encoder

    def record(cfg):
        model = encoder(cfg)
        built[cfg.attention] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(train_mod, "Encoder", record)
    for attention in ("softmax", "sigmoid"):
        run(
            tokens_path,
            tmp_path / attention,
            attention=attention,
            train_params={**TINY_TRAIN, "steps": 1},
        )
    for name, value in built["softmax"].items():
        assert torch.equal(value, built["sigmoid"][name]), name


# --- preemption and resume -----------------------------------------------------------------

RESUME_MODEL = {**TINY_MODEL, "dropout": 0.1}  # dropout: the torch RNG state must be restored too


def test_resume_after_sigterm_equals_uninterrupted(tokens_path, tmp_path):
    run(tokens_path, tmp_path / "full", model=RESUME_MODEL)

    def preempt(step):
        if step == 6:  # between checkpoints (every 4): the signal handler must save step 6
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        run(tokens_path, tmp_path / "cut", model=RESUME_MODEL, on_step=preempt)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "cut" / "model.pt").exists()
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6  # nothing lost
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored

    run(tokens_path, tmp_path / "cut", model=RESUME_MODEL)
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_resume_after_crash_from_last_periodic_checkpoint(tokens_path, tmp_path):
    run(tokens_path, tmp_path / "full", model=RESUME_MODEL)

    def crash(step):
        if step == 7:
            raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        run(tokens_path, tmp_path / "cut", model=RESUME_MODEL, on_step=crash)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4  # the last multiple of checkpoint_every
    # the rerun may checkpoint at another interval: that changes no result
    run(
        tokens_path,
        tmp_path / "cut",
        model=RESUME_MODEL,
        train_params={**TINY_TRAIN, "checkpoint_every": 3},
    )
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_checkpoint_of_another_config_is_refused(tokens_path, tmp_path):
    def crash(step):
        if step == 5:
            raise RuntimeError("node lost")

    with pytest.raises(RuntimeError):
        run(tokens_path, tmp_path, on_step=crash)
    assert (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match=r"train\.lr"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "lr": 1e-2})
    with pytest.raises(ConfigError, match="attention"):
        run(tokens_path, tmp_path, attention="softmax")


def test_cli_sigterm_then_rerun_resumes(tokens_path, tmp_path):
    """The real thing: a `sigmoid-sc train` process killed with SIGTERM, then rerun."""
    params = {**TINY_TRAIN, "steps": 150, "eval_every": 10, "checkpoint_every": 1000}
    cli = [
        sys.executable, "-m", "sigmoid_sc.cli", "train", "--dataset", "toy",
        "--tokens", str(tokens_path), "--attention", "softmax", "--seed", "2",
        "--model-json", json.dumps(TINY_MODEL), "--train-json", json.dumps(params),
        "--device", "cpu", "--out-dir", str(tmp_path / "cut"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process run (one_thread)
    proc = subprocess.Popen(cli, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until training is under way (a logged eval past step 0)
        if "step 10/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, stderr
    step = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= step < 150  # checkpoint_every is 1000: only the signal handler saved this
    assert not (tmp_path / "cut" / "model.pt").exists()

    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"at step {step}" in done.stderr and "resuming from" in done.stderr
    train("toy", tokens_path, "softmax", 2, *sections(TINY_MODEL, params), "cpu", tmp_path / "full")
    assert_same_run(tmp_path / "full", tmp_path / "cut")


# --- the stopping rule in a run ------------------------------------------------------------

STOP_TRAIN = {
    **TINY_TRAIN,
    "steps": 40,
    "eval_every": 2,
    "checkpoint_every": 4,
    "stop": {"rule": "plateau", "window": 0.25, "min_rel_improvement": 0.05, "min_steps": 10},
}


def test_model_records_the_stop_and_its_proof(tokens_path, tmp_path):
    run(tokens_path, tmp_path / "rule", train_params=STOP_TRAIN)
    record = torch.load(tmp_path / "rule" / "model.pt", weights_only=True)
    history = pd.read_csv(tmp_path / "rule" / "history.csv")
    val = history[history.split == "val"]
    assert record["stop_reason"] == "plateau" and record["plateau"] is True
    assert 10 <= record["steps_trained"] < 40 and record["steps"] == 40
    assert val.step.tolist() == list(range(0, record["steps_trained"] + 1, 2))  # every val row
    assert record["final_val_loss"] == record["val_loss"]
    assert record["final_val_loss"] == pytest.approx(val.loss.iloc[-1], rel=1e-12)  # csv digits
    assert history[history.split == "train"].step.max() == record["steps_trained"]
    stop = STOP_TRAIN["stop"]
    assert plateau_reached(val.step, val.loss, stop["window"], stop["min_rel_improvement"])
    before = val.iloc[:-1]  # it stopped at the first evaluation where the rule held
    assert not any(
        plateau_reached(before.step[: k + 1], before.loss[: k + 1], 0.25, 0.05, 10)
        for k in range(len(before))
    )
    # without the rule the same run goes on to the cap; its curve is the same up to the stop
    run(
        tokens_path, tmp_path / "cap", train_params={**STOP_TRAIN, "stop": {**stop, "rule": "none"}}
    )
    capped = torch.load(tmp_path / "cap" / "model.pt", weights_only=True)
    assert capped["stop_reason"] == "max_steps" and capped["steps_trained"] == 40
    assert isinstance(capped["plateau"], bool)
    full = pd.read_csv(tmp_path / "cap" / "history.csv")
    cut = full[full.step <= record["steps_trained"]].drop(columns="elapsed_s")
    pd.testing.assert_frame_equal(
        cut.reset_index(drop=True), history.drop(columns="elapsed_s"), check_exact=True
    )


def test_resume_with_the_stopping_rule_equals_uninterrupted(tokens_path, tmp_path):
    params = {**STOP_TRAIN, "checkpoint_every": 1000}
    run(tokens_path, tmp_path / "full", model=RESUME_MODEL, train_params=params)

    def preempt(step):
        if step == 7:  # before min_steps: the rule decides after the resume
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit):
        run(tokens_path, tmp_path / "cut", model=RESUME_MODEL, train_params=params, on_step=preempt)
    run(tokens_path, tmp_path / "cut", model=RESUME_MODEL, train_params=params)
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("full", "cut"))
    for key in ("steps_trained", "stop_reason", "plateau", "final_val_loss"):
        assert a[key] == b[key], key
    assert a["stop_reason"] == "plateau"


# --- config errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key"),
    [("train", "learning_rate"), ("model", "n_layer"), ("model", "attention")],
)
def test_unknown_config_key_is_named(tokens_path, tmp_path, section, key):
    model = {**TINY_MODEL, key: 1} if section == "model" else TINY_MODEL
    params = {**TINY_TRAIN, key: 1} if section == "train" else TINY_TRAIN
    with pytest.raises(ConfigError, match=rf"{section}\.{key}\b"):
        run(tokens_path, tmp_path, model=model, train_params=params)
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_config_values_are_named(tokens_path, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "steps": "many"})
    with pytest.raises(ConfigError, match=r"train\.precision"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "precision": "fp8"})
    with pytest.raises(ConfigError, match=r"n_heads"):
        run(tokens_path, tmp_path, model={**TINY_MODEL, "n_heads": 5})
    with pytest.raises(ConfigError, match=r"seed"):
        run(tokens_path, tmp_path, seed=-1)
    with pytest.raises(ConfigError, match=r"train\.schedule"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "schedule": "linear"})
    with pytest.raises(ConfigError, match=r"train\.stop\.rule"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "stop": {"rule": "early"}})
    with pytest.raises(ConfigError, match=r"train\.stop\.window"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "stop": {"window": 1.5}})
    with pytest.raises(ConfigError, match=r"unknown key train\.stop\.patience"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "stop": {"patience": 3}})
    with pytest.raises(ConfigError, match=r"train\.compile must be true or false"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "compile": 1})
    with pytest.raises(ConfigError, match=r"train\.batch_size .* replaced by train\.batch_tokens"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "batch_size": 16})
    with pytest.raises(ConfigError, match=r"toy: train\.batch_tokens is 20 but \d+ of the"):
        run(tokens_path, tmp_path, train_params={**TINY_TRAIN, "batch_tokens": 20})
    with pytest.raises(ConfigError, match=r"model\.cls_token must be true or false; got 1"):
        run(tokens_path, tmp_path, model={**TINY_MODEL, "cls_token": 1})
    with pytest.raises(ConfigError, match=r"model\.n_layers must be an integer >= 1; got True"):
        run(tokens_path, tmp_path, model={**TINY_MODEL, "n_layers": True})
    assert not list(tmp_path.iterdir())  # nothing written


# --- the run's record ------------------------------------------------------------------------


def test_the_loss_figure_reads_each_runs_kind_and_seed_from_its_record(tokens_path, tmp_path):
    """No meaning in folder names: each run's attention and seed come from the model's record,
    which embed copies into the run's embedding."""
    from sigmoid_sc.cli import main
    from sigmoid_sc.figures import read_histories

    params = {**TINY_TRAIN, "steps": 2}
    histories, embeddings = [], []
    for name, attention, seed in (("a", "softmax", 3), ("b", "sigmoid", 1)):
        run(tokens_path, tmp_path / name, attention=attention, seed=seed, train_params=params)
        embed("toy", tokens_path, tmp_path / name / "model.pt", "cpu", tmp_path / f"{name}.npz")
        histories.append(str(tmp_path / name / "history.csv"))
        embeddings.append(str(tmp_path / f"{name}.npz"))
    frame = read_histories(histories, embeddings)
    assert set(zip(frame["attention"], frame["seed"])) == {("softmax", 3), ("sigmoid", 1)}
    png, pdf = tmp_path / "loss.png", tmp_path / "loss.pdf"
    figure = ["figures", "loss", "--dataset", "toy", "--histories", *histories]
    assert main([*figure, "--embeddings", *embeddings, "--png", str(png), "--pdf", str(pdf)]) == 0
    assert png.stat().st_size > 0 and pdf.stat().st_size > 0
    assert main([*figure, "--embeddings", embeddings[0], "--png", str(png), "--pdf", str(pdf)]) == 2


# --- embed ---------------------------------------------------------------------------------


def test_embed_writes_test_cells_and_recomputes_val_loss(tokens_path, tmp_path):
    run(tokens_path, tmp_path / "run", attention="softmax", seed=1)
    out = tmp_path / "emb.npz"
    embed("toy", tokens_path, tmp_path / "run" / "model.pt", "cpu", out)
    tokens = load_tokens(tokens_path, "toy")
    test_cells = tokens.cells("test")
    with np.load(out, allow_pickle=False) as npz:
        assert npz["X_emb"].shape == (test_cells.size, TINY_MODEL["d_model"])
        assert npz["X_emb"].dtype == np.float32 and np.isfinite(npz["X_emb"]).all()
        np.testing.assert_array_equal(npz["obs_names"], tokens.obs_names[test_cells])
        assert str(npz["method"]) == "softmax" and int(npz["seed"]) == 1
        assert str(npz["split"]) == "test"
        val_loss = float(npz["val_loss"])
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert val_loss == pytest.approx(history[history.split == "val"].loss.iloc[-1], abs=1e-5)


def test_embed_of_a_cls_model_writes_mean_and_cls_pooling_and_the_records_facts(
    tokens_path, tmp_path
):
    run(tokens_path, tmp_path / "run", attention="sigmoid", model={**TINY_MODEL, "cls_token": True})
    model_path = tmp_path / "run" / "model.pt"
    out = tmp_path / "emb.npz"
    embed("toy", tokens_path, model_path, "cpu", out)
    tokens = load_tokens(tokens_path, "toy")
    test_cells = tokens.cells("test")
    model, record = train_mod.load_model(model_path, torch.device("cpu"))
    assert record["model_config"]["cls_token"] is True
    ids, cu, max_seqlen = pack(tokens, test_cells)
    with torch.no_grad():
        genes, cls = model(torch.from_numpy(ids), torch.from_numpy(cu), max_seqlen, return_cls=True)
    with np.load(out, allow_pickle=False) as npz:
        assert npz["X_emb_cls"].shape == npz["X_emb"].shape == (test_cells.size, 32)
        np.testing.assert_allclose(npz["X_emb_cls"], cls.numpy(), rtol=1e-5, atol=1e-5)
        mean = pool(genes, torch.from_numpy(cu)).numpy()
        np.testing.assert_allclose(npz["X_emb"], mean, rtol=1e-5, atol=1e-5)
        # the record's facts: steps trained, why the run stopped, whether it plateaued
        assert int(npz["steps"]) == record["steps_trained"] == TINY_TRAIN["steps"]
        assert str(npz["stop_reason"]) == record["stop_reason"] == "max_steps"
        assert float(npz["plateau"]) == float(record["plateau"])
    # a record that says how the run stopped: the embedding carries it
    record.update(steps_trained=9, stop_reason="plateau", plateau=True, final_val_loss=3.0)
    torch.save(record, model_path)
    embed("toy", tokens_path, model_path, "cpu", out)
    with np.load(out, allow_pickle=False) as npz:
        assert int(npz["steps"]) == 9 and str(npz["stop_reason"]) == "plateau"
        assert float(npz["plateau"]) == 1.0


def test_cls_training_is_bitwise_deterministic_on_cpu(tokens_path, tmp_path):
    model = {**TINY_MODEL, "cls_token": True}
    run(tokens_path, tmp_path / "a", model=model, train_params={**TINY_TRAIN, "steps": 6})
    run(tokens_path, tmp_path / "b", model=model, train_params={**TINY_TRAIN, "steps": 6})
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_untrained_baseline_is_the_seed_zero_start_of_training(tokens_path, tmp_path):
    """The untrained encoder is deterministic, kind-specific only through attention, and is the
    model every seed-0 run starts from: its validation loss is the run's step-0 loss."""
    run(tokens_path, tmp_path / "run", attention="softmax", seed=0)
    tiny_model = config.section("model", TINY_MODEL)
    outs = {}
    for name, kind in (("a", "softmax"), ("b", "softmax"), ("c", "sigmoid")):
        outs[name] = tmp_path / f"{name}.npz"
        embed_untrained("toy", tokens_path, kind, tiny_model, 0.15, "cpu", outs[name])
    with np.load(outs["a"]) as a, np.load(outs["b"]) as b, np.load(outs["c"]) as c:
        assert a.files == b.files and "X_emb_cls" not in a.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
        assert str(a["method"]) == "untrained_softmax" and str(c["method"]) == "untrained_sigmoid"
        assert int(a["seed"]) == 0 and int(a["steps"]) == 0
        assert np.abs(a["X_emb"] - c["X_emb"]).max() > 1e-4  # attention differs, weights do not
        history = pd.read_csv(tmp_path / "run" / "history.csv")
        step0 = history[(history.split == "val") & (history.step == 0)].loss.iloc[0]
        assert float(a["val_loss"]) == pytest.approx(step0, abs=1e-5)
    softmax = initial_model(tiny_model, "softmax", load_tokens(tokens_path, "toy"))
    sigmoid = initial_model(tiny_model, "sigmoid", load_tokens(tokens_path, "toy"))
    for (name, p), (_, q) in zip(softmax.state_dict().items(), sigmoid.state_dict().items()):
        assert torch.equal(p, q), name


def test_embed_cli_takes_a_model_or_the_untrained_kind(tokens_path, tmp_path):
    from sigmoid_sc import cli

    base = ["embed", "--dataset", "toy", "--tokens", str(tokens_path), "--device", "cpu"]
    out = tmp_path / "u.npz"
    args = [*base, "--untrained", "sigmoid", "--model-json", json.dumps(TINY_MODEL)]
    assert cli.main([*args, "--mask-prob", "0.3", "--output", str(out)]) == 0
    direct = tmp_path / "direct.npz"
    embed_untrained(
        "toy", tokens_path, "sigmoid", config.section("model", TINY_MODEL), 0.3, "cpu", direct
    )
    with np.load(out) as a, np.load(direct) as b:
        np.testing.assert_array_equal(a["X_emb"], b["X_emb"])
        assert float(a["val_loss"]) == float(b["val_loss"])
    parsed = cli.build_parser().parse_args([*base, "--output", str(out)])
    with pytest.raises(ConfigError, match="exactly one of --model and --untrained"):
        parsed.func(parsed)
