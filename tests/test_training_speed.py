"""``sigmoid-sc training-speed``: its variants, its FLOP count, and a smoke run on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest_tokens import make_tokens

from sigmoid_sc.errors import ConfigError
from sigmoid_sc.training_speed import Variant, model_flops, parse_variant, today_cells

SRC = Path(__file__).resolve().parents[1] / "src"


def test_variants_parse_and_bad_ones_are_named():
    assert parse_variant("today:64") == Variant("today:64", True, cells=64)
    assert parse_variant("tokens@1,4") == Variant("tokens", False, jobs=(1, 4))
    assert parse_variant("tokens:65536+compile@2") == Variant(
        "tokens:65536+compile", False, batch_tokens=65536, compile=True, jobs=(2,)
    )
    for bad in (
        "today",
        "today:0",
        "today:64+compile",
        "tokens:x",
        "cells:64",
        "tokens@0",
        "tokens@a",
    ):
        with pytest.raises(ConfigError, match="variant"):
            parse_variant(bad)


def test_model_flops_by_hand():
    model = {"n_layers": 2, "d_model": 8, "n_heads": 2, "d_ff": 32}
    # two cells of 3 and 5 tokens, 2 masked, 10 genes
    dense = 6 * 2 * (4 * 64 + 2 * 8 * 32) * 8  # 6 x matmul weights x tokens
    attention = 3.5 * 2 * 4 * (9 + 25) * 8  # 3.5 x layers x 4 sum(n^2) d
    head = 6 * 8 * 10 * 2  # 6 d V M
    assert model_flops(model, 10, 8, 34, 2) == dense + attention + head


def test_today_cells_are_the_fixed_count_batches_of_before():
    cells = np.arange(10, 60)
    steps = [today_cells(cells, 16, 0, t) for t in range(4)]
    assert all(s.size == 16 for s in steps)
    assert len(set(np.concatenate(steps[:3]).tolist())) == 48  # 3 batches an epoch, 2 left out
    assert not np.array_equal(steps[0], steps[3])


def test_smoke_run_on_the_cpu_writes_its_table(tmp_path):
    tokens = make_tokens(tmp_path / "tokens.npz", n_cells=160)
    out = tmp_path / "speed"
    cli = [
        sys.executable, "-m", "sigmoid_sc.cli", "training-speed", "--smoke",
        "--tokens", str(tokens), "--out", str(out), "--attentions", "sigmoid",
        "--variants", "today:8", "tokens:256@1,2", "--steps", "3", "--warmup", "1",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "training_speed.csv")
    assert table[["variant", "jobs"]].values.tolist() == [
        ["today:8", 1], ["tokens:256", 1], ["tokens:256", 2],
    ]  # fmt: skip
    assert table.note.isna().all(), table.note.tolist()
    assert (table.tokens_per_s_job > 0).all() and (table.step_ms > 0).all()
    today, budget = table.iloc[0], table.iloc[1:]
    assert today.cells_per_step == 8 and today.speedup_vs_today == 1.0
    assert (budget.tokens_per_step <= 256).all() and (budget.tokens_per_step > 256 - 32).all()
    # two jobs together: the aggregate is at least each one's rate
    assert table.iloc[2].tokens_per_s_total >= table.iloc[2].tokens_per_s_job
    md = (out / "training_speed.md").read_text()
    assert md in done.stdout and "| 2x32 | sigmoid | tokens:256 | 2 |" in md


def test_without_cuda_it_says_so(tmp_path):
    tokens = make_tokens(tmp_path / "tokens.npz")
    cli = [sys.executable, "-m", "sigmoid_sc.cli", "training-speed", "--tokens", str(tokens),
           "--out", str(tmp_path / "o")]  # fmt: skip
    done = subprocess.run(
        cli, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "CUDA" in done.stderr
