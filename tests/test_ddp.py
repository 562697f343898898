"""DDP under torchrun (CPU, gloo, 2 processes) against one process with the same global batch.

The global batch and its masks are functions of ``(seed, step)`` whatever the number of
processes, and each rank's loss is weighted by its share of the masked tokens, so the loss
curve and the final weights of 2 processes match 1 process up to float rounding. Each torchrun
launch costs a few seconds (three Python processes importing torch on a small CPU box).
"""

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

from sigmoid_sc.distributed import shard_batch, shard_bounds
from sigmoid_sc.errors import ConfigError
from sigmoid_sc.train import train

SRC = Path(__file__).resolve().parents[1] / "src"
RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def single(tokens_path, tmp_path_factory):
    """The reference: the same config in one process."""
    out = tmp_path_factory.mktemp("single")
    train("toy", tokens_path, "sigmoid", 0, *sections(TINY_MODEL, TINY_TRAIN), "cpu", out)
    return out


def torchrun(tokens_path, out_dir, nproc=2, train_params=None, **popen):
    cli = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc),
        "-m", "sigmoid_sc.cli", "train", "--dataset", "toy", "--tokens", str(tokens_path),
        "--attention", "sigmoid", "--seed", "0", "--model-json", json.dumps(TINY_MODEL),
        "--train-json", json.dumps(TINY_TRAIN if train_params is None else train_params),
        "--device", "cpu", "--out-dir", str(out_dir),
    ]  # fmt: skip
    pythonpath = os.pathsep.join(p for p in [str(SRC), os.environ.get("PYTHONPATH")] if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    if popen:
        return subprocess.Popen(cli, env=env, text=True, **popen)
    return subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)


def assert_close_runs(dir_a, dir_b, rtol=RTOL):
    hist_a = pd.read_csv(Path(dir_a) / "history.csv")
    hist_b = pd.read_csv(Path(dir_b) / "history.csv")
    cols = ["step", "split", "lr", "tokens"]
    pd.testing.assert_frame_equal(hist_a[cols], hist_b[cols], check_exact=True)
    np.testing.assert_allclose(hist_a.loss, hist_b.loss, rtol=rtol)
    a = torch.load(Path(dir_a) / "model.pt", weights_only=True)["model"]
    b = torch.load(Path(dir_b) / "model.pt", weights_only=True)["model"]
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=10 * rtol, atol=1e-5, msg=name)


def test_shards_cover_the_batch_balanced_by_tokens():
    lengths = np.array([5, 30, 2, 2, 9, 17, 1, 8])
    cu = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = np.arange(cu[-1])
    masked = ids % 3 == 0
    for world in (1, 2, 3, 8):
        bounds = shard_bounds(cu, world)
        assert bounds[0] == 0 and bounds[-1] == lengths.size and (np.diff(bounds) >= 1).all()
        parts = [shard_batch(ids, cu, masked, r, world) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), ids)
        np.testing.assert_array_equal(np.concatenate([p[3] for p in parts]), masked)
        for p_ids, p_cu, p_max, _ in parts:
            assert p_cu[0] == 0 and p_cu[-1] == p_ids.size and p_max == np.diff(p_cu).max()
    assert shard_bounds(cu, 2).tolist() == [0, 3, 8]  # 37 of the 74 tokens each


def test_two_processes_match_one(tokens_path, single, tmp_path):
    done = torchrun(tokens_path, tmp_path)
    assert done.returncode == 0, done.stderr
    assert_close_runs(single, tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()
    assert done.stderr.count("step 12/12") == 1  # rank 0 alone reports


def test_two_processes_resume_a_checkpoint_and_stop_together_on_sigterm(
    tokens_path, single, tmp_path
):
    """SIGTERM to torchrun mid-run: rank 0 saves, all stop; the rerun (2 processes) resumes."""
    params = {**TINY_TRAIN, "steps": 400, "eval_every": 10, "checkpoint_every": 1000}
    proc = torchrun(tokens_path, tmp_path, train_params=params, stderr=subprocess.PIPE)
    for line in proc.stderr:  # training is under way once step 10 is reported
        if "step 10/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) != 0, stderr
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 10 <= state["step"] < 400, stderr
    assert not (tmp_path / "model.pt").exists()
    assert "stopped by signal" in stderr

    # both ranks resume the checkpoint; the result is the uninterrupted single-process run's
    done = torchrun(tokens_path, tmp_path, train_params=params)
    assert done.returncode == 0, done.stderr
    assert f"at step {state['step']}" in done.stderr and "resuming from" in done.stderr
    assert not (tmp_path / "checkpoint.pt").exists()
    train("toy", tokens_path, "sigmoid", 0, *sections(TINY_MODEL, params), "cpu", tmp_path / "full")
    assert_close_runs(tmp_path / "full", tmp_path, rtol=1e-4)


def test_two_processes_stop_at_the_plateau_where_one_does(tokens_path, tmp_path):
    """Every rank holds the same validation curve, so the stopping rule stops them together,
    at the step where one process stops."""
    params = {
        **TINY_TRAIN,
        "steps": 40,
        "eval_every": 2,
        "stop": {"rule": "plateau", "window": 0.25, "min_rel_improvement": 0.05, "min_steps": 10},
    }
    train("toy", tokens_path, "sigmoid", 0, *sections(TINY_MODEL, params), "cpu", tmp_path / "one")
    done = torchrun(tokens_path, tmp_path / "two", train_params=params)
    assert done.returncode == 0, done.stderr
    assert_close_runs(tmp_path / "one", tmp_path / "two")
    one, two = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("one", "two"))
    assert one["stop_reason"] == two["stop_reason"] == "plateau"
    assert one["steps_trained"] == two["steps_trained"] < 40


def test_a_budget_too_small_to_split_is_named(tokens_path, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    params = {**TINY_TRAIN, "batch_tokens": 100}  # cells of up to 32 tokens: 4 need 128
    with pytest.raises(
        ConfigError, match=r"batch_tokens 100 .* at least 4 cells .* raise it to 128"
    ):
        train("toy", tokens_path, "sigmoid", 0, *sections(TINY_MODEL, params), "cpu", tmp_path)
    assert not list(tmp_path.iterdir())


def test_bench_ddp_scaling_smoke(tmp_path):
    """bench/ddp_scaling.py --smoke: 1 and 2 CPU processes of the tiny model, two rounds, the
    default DDP and the no-all-reduce diagnosis, a full table and rank 0's profiles."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "ddp_scaling.py"
    out_csv, out_md = tmp_path / "scaling.csv", tmp_path / "scaling.md"
    cmd = [sys.executable, str(bench), "--smoke", "--attentions", "sigmoid", "--repeats", "2"]
    cmd += ["--ddp", "default", "no_sync", "--rounds", "2", "--profile-dir", str(tmp_path / "p")]
    cmd += ["--out-csv", str(out_csv), "--out-md", str(out_md)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out_csv)
    assert table.gpus.tolist() == [1, 2, 2] and table.ddp.tolist() == ["none", "default", "no_sync"]
    assert (table.tokens_per_s > 0).all() and (table.rounds == 2).all()
    assert table.tokens_per_step.tolist() == [48, 96, 96]  # weak scaling: a sequence per process
    assert table.scaling_efficiency.iloc[0] == 1.0
    # the median of the rounds, each round's slowest rank
    assert (table.step_ms_min <= table.step_ms).all() and (table.step_ms <= table.step_ms_max).all()
    per_round = [[float(t) for t in r.split()] for r in table.rank_step_ms.iloc[1].split(" / ")]
    assert [len(r) for r in per_round] == [2, 2]
    assert sorted(max(r) for r in per_round) == pytest.approx(
        [table.step_ms_min.iloc[1], table.step_ms_max.iloc[1]], abs=0.051
    )
    assert "| sigmoid | 2 | default | 96 |" in out_md.read_text()
    profile = (tmp_path / "p" / "profile_2gpu.md").read_text()
    assert "## sigmoid, 2 GPU(s), DDP no_sync" in profile and "| aten::" in profile


def test_bench_ddp_scaling_refuses_bf16_gradients_on_gloo(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "bench" / "ddp_scaling.py"
    cmd = [sys.executable, str(bench), "--smoke", "--ddp", "bf16_grads"]
    cmd += ["--out-csv", str(tmp_path / "x.csv"), "--out-md", str(tmp_path / "x.md")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "bf16_grads needs NCCL" in done.stderr
    assert not (tmp_path / "x.csv").exists()
