"""tools/gpu_experiments.sh (the stress test and training-speed tables in one GPU command) in its
CPU smoke mode,
and the partial-result paths it relies on: sigmoid-sc training-speed --time-limit / --merge / the
``cells`` workload, and the stress test's log written while it runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sigmoid_sc import config
from sigmoid_sc import stress_test as stress

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_experiments.sh"
NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # plain file names, flat in PACK_DIR


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


#: a one-layer stress test on 16 tokens: a few CPU seconds (tests add max_steps, early_steps)
TINY_STRESS = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "vocab_size": 60,
               "seq_len": 16, "warmup_steps": 1, "precision": "fp32", "logit_queries": 0}  # fmt: skip


def run_script(tmp_path: Path, **extra_env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """tools/gpu_experiments.sh in smoke mode, its PACK_DIR in ``tmp_path/out``."""
    out = tmp_path / "out"
    process = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env={**env(), "SMOKE": "1", "PACK_DIR": str(out), "PYTHON": sys.executable,
             "TMPDIR": str(tmp_path), **extra_env},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return process, out


def run_speed(tmp_path: Path, name: str, *args: str):
    """sigmoid-sc training-speed with ``args``, its table in ``<name>.csv`` / ``<name>.md``."""
    csv, md = tmp_path / f"{name}.csv", tmp_path / f"{name}.md"
    process = subprocess.run(
        [sys.executable, "-m", "sigmoid_sc.cli", "training-speed", *args,
         "--out-csv", str(csv), "--out-md", str(md)],
        env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return process, csv, md


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_smoke_run_leaves_at_most_8_files_with_both_parts(tmp_path):
    process, out = run_script(tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        ["versions.txt", "gpu_experiments.log", "training_speed.csv", "training_speed.md",
         "stress_test.csv", "stress_test_summary.json", "stress_test.png", "extras.tar.gz"]
    )  # fmt: skip
    assert all(NAME.match(f) and (out / f).is_file() for f in files)
    assert not any(p.name.startswith("gpu_experiments.") for p in tmp_path.iterdir() if p.is_dir())

    versions = (out / "versions.txt").read_text()
    for key in (
        "date_utc:",
        "torch:",
        "triton:",
        "part stress: exit 0",
        "part speed_width1024: exit 0",
    ):
        assert key in versions, versions

    # part 1: both arms, per-step columns, the finished summary (not a partial one)
    log = pd.read_csv(out / "stress_test.csv")
    assert set(log["arm"]) == {"softmax", "sigmoid"}
    for column in ("loss", "grad_norm", "max_layer_grad_norm", "max_attn_logit"):
        assert np.isfinite(log[column]).all(), column
    summary = json.loads((out / "stress_test_summary.json").read_text())
    assert "partial" not in summary and set(summary["arms"]) == {"softmax", "sigmoid"}
    assert summary["config"]["max_steps"] == 4 and summary["config"]["enabled"] is True
    assert (out / "stress_test.png").stat().st_size > 1000

    # part 2: the width-1024 comparison's rows and the shared-data model's, one table
    table = pd.read_csv(out / "training_speed.csv")
    kinds = set(table["workload"].str.split().str[0])
    assert kinds == {"fixed", "real", "cells"}
    cells = table[table["workload"].str.startswith("cells")]
    timed = cells[cells["step_ms_median"].notna()]
    assert set(timed["impl"]) == {"sigmoid_ours", "softmax_varlen"}
    assert (timed["first_step_ms"] > 0).all() and (timed["step_ms_median"] > 0).all()
    assert (timed["step_ms_max"] >= timed["step_ms_p90"]).all()
    md = (out / "training_speed.md").read_text()
    assert "| sigmoid_ours |" in md and "warm-up step times" in md
    # the paper's kernel comes after every other implementation of the comparison
    main = table[~table["workload"].str.startswith("cells")]["impl"].tolist()
    first_paper = main.index("sigmoid_triton_paper")
    assert set(main[first_paper:]) == {"sigmoid_triton_paper"}

    with tarfile.open(out / "extras.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"stress_test.pdf", "training_speed_shared_model.csv", "parts.txt"} <= names
    assert any(n.startswith("warm_paper") for n in names)


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_a_stress_part_cut_by_its_budget_keeps_its_log_and_gets_a_figure(tmp_path):
    process, out = run_script(
        tmp_path, PARTS="stress", STRESS_BUDGET="20", STRESS_MAX_STEPS="1000000",
        STRESS_ARM_SECONDS="1000",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    versions = (out / "versions.txt").read_text()
    assert "part stress: exit 124" in versions and "part speed" not in versions
    assert "part stress_figure_from_partial_log: exit 0" in versions
    log = pd.read_csv(out / "stress_test.csv")
    assert len(log) >= 25 and set(log["arm"]) == {"softmax"}  # cut inside the first arm
    summary = json.loads((out / "stress_test_summary.json").read_text())
    assert summary["partial"] is True and summary["arms"] == {}
    assert (out / "stress_test.png").stat().st_size > 1000
    assert not (out / "training_speed.csv").exists()


def test_time_limit_skips_what_was_not_started_and_merge_joins_tables(tmp_path):
    process, a_csv, _ = run_speed(
        tmp_path, "a", "--smoke", "--workloads", "fixed",
        "--impls", "sigmoid_ours", "softmax_varlen", "--time-limit", "1e-9",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    skipped = pd.read_csv(a_csv)
    assert skipped["step_ms_median"].isna().all()
    assert skipped["note"].str.startswith("skipped: --time-limit").all()

    process, b_csv, _ = run_speed(
        tmp_path, "b", "--smoke", "--workloads", "cells",
        "--impls", "sigmoid_ours", "softmax_varlen", "--head-dims", "8",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    cells = pd.read_csv(b_csv)
    # smoke: 4 cells a step, a different batch each step; tokens = mean over the timed steps
    assert (cells["n_cells"] == 4).all() and (cells["step_ms_median"] > 0).all()
    assert cells["warmup_steps_ms"].astype(str).str.len().gt(0).all()

    process, m_csv, m_md = run_speed(
        tmp_path, "m", "--merge", str(a_csv), str(b_csv), str(tmp_path / "none.csv")
    )
    assert process.returncode == 0, process.stderr
    assert "none.csv is missing" in process.stderr
    merged = pd.read_csv(m_csv)
    assert len(merged) == len(skipped) + len(cells)
    # speed-ups recomputed per setting: the fastest softmax of the cells rows is 1.00x
    best = merged[merged["workload"].str.startswith("cells") & (merged["attention"] == "softmax")]
    assert best["speedup_vs_best_softmax"].max() == pytest.approx(1.0)
    assert "skipped: --time-limit" in m_md.read_text()


@pytest.mark.usefixtures("one_thread")
def test_stress_log_and_summary_are_on_disk_before_the_run_ends(tmp_path, monkeypatch):
    """A stress run stopped from outside in its second arm (here: its second step fails)
    keeps the per-step log so far and a summary of the finished arm, marked partial."""
    loss = stress.masked_gene_loss
    calls = []

    def loss_then_kill(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # softmax: steps 0-2; sigmoid: step 0, then the "kill"
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    monkeypatch.setattr(stress, "masked_gene_loss", loss_then_kill)
    params = {**TINY_STRESS, "max_steps": 3, "early_steps": 2}
    args = Namespace(
        params_json=json.dumps(params), device="cpu", log_csv=str(tmp_path / "log.csv"),
        summary=str(tmp_path / "summary.json"), png=str(tmp_path / "s.png"),
        pdf=str(tmp_path / "s.pdf"), partial_every=1,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        stress._run(args)
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["arm"].tolist() == ["softmax"] * 3 + ["sigmoid"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["partial"] is True and list(summary["arms"]) == ["softmax"]
    assert summary["arms"]["softmax"]["steps"] == 3
    assert not (tmp_path / "s.png").exists()


def test_progress_callback_sees_every_step_and_each_finished_arm():
    cfg = config.section(
        "experiments.stress_test", {**TINY_STRESS, "max_steps": 2, "early_steps": 1}
    )
    calls = []
    rows, summary = stress.run_stress_test(
        cfg,
        torch.device("cpu"),
        log=lambda *_: None,
        on_progress=lambda r, arms, done: calls.append((len(r), sorted(arms), done)),
    )
    assert calls == [
        (1, [], False), (2, [], False), (2, ["softmax"], True),
        (3, ["softmax"], False), (4, ["softmax"], False), (4, ["sigmoid", "softmax"], True),
    ]  # fmt: skip
    assert len(rows) == 4 and set(summary["arms"]) == {"softmax", "sigmoid"}
