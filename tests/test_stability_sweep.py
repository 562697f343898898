"""The stability sweep (sigmoid_sc.stability_sweep): its config, the rules, a run as a job (and
resumed), the tables and figures, the GPU driver on the CPU, and a tiny sweep through Snakemake.
The training loop, the task and the checkpoints are sigmoid_sc.stress_test's
(tests/test_stress_test.py)."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sigmoid_sc import stability_sweep as sweep
from sigmoid_sc import stress_test as stress
from sigmoid_sc.errors import ConfigError
from sigmoid_sc.model import Encoder

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

#: a one-layer sweep on 16-token sequences: a run takes about a second on one CPU thread
TINY_SWEEP = {
    "arms": [
        {"name": "softmax_pre", "attention": "softmax"},
        {"name": "sigmoid_post", "attention": "sigmoid", "norm": "post"},
    ],
    "lrs": [3.0e-2, 1.0e4],
    "seeds": [0, 1],
    "n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "vocab_size": 40, "seq_len": 16,
    "batch_size": 2, "n_cell_types": 2, "module_size": 4, "rank_noise": 1.0,
    "warmup_steps": 2, "steps": 6, "early_steps": 2, "final_window": 2, "logit_queries": 4,
    "precision": "fp32", "checkpoint_every": 3,
}  # fmt: skip


def quiet(*_args):
    pass


# --------------------------------------------------------------------------------------------
# configuration


def test_default_sweep_is_a_25m_proxy_on_2048_token_sequences():
    cfg = sweep.sweep_config({})
    assert len(cfg.lrs) >= 6 and min(cfg.lrs) == 1e-4 and max(cfg.lrs) == 3e-2
    ratios = np.diff(np.log(sorted(cfg.lrs)))
    assert np.allclose(ratios, ratios.mean(), rtol=0.02)  # a log grid
    assert [(a.name, a.attention, a.norm, a.qk_norm) for a in cfg.arms] == [
        ("softmax_pre", "softmax", "pre", False), ("sigmoid_pre", "sigmoid", "pre", False),
        ("softmax_post", "softmax", "post", False), ("sigmoid_post", "sigmoid", "post", False),
        ("softmax_pre_qknorm", "softmax", "pre", True),
    ]  # fmt: skip
    assert cfg.steps >= 2000 and cfg.seeds == (0, 1)
    assert (cfg.seq_len, cfg.batch_size) == (2048, 2)  # 4,096 tokens a step
    scfg = sweep.stress_config(cfg, sweep.arm_named(cfg, "softmax_pre_qknorm"), 1e-3, 1)
    assert scfg.qk_norm and scfg.task == "ordered" and scfg.seed == 1
    assert scfg.max_steps == cfg.warmup_steps + cfg.steps == 2100
    with torch.device("meta"):
        model = Encoder(
            stress.model_config(sweep.stress_config(cfg, cfg.arms[0], 1e-3, 0), "softmax")
        )
    assert stress.count_parameters(model) == 25_213_440  # about 25M


@pytest.mark.parametrize(
    "params, words",
    [
        ({"lr": [1e-3]}, "unknown key experiments.stability_sweep.lr "),
        ({"lrs": [1e-3, 1.0001e-3]}, r"stability_sweep.lrs must differ in their first 3"),
        ({"arms": [{"name": "a b", "attention": "softmax"}]}, r"arms\[0\].name must match"),
        ({"arms": [{"name": "a", "attention": "linear"}]}, r"arms\[0\].attention must be one"),
        ({"arms": [{"name": "a", "attention": "softmax", "norm": "mid"}]}, r"arms\[0\].norm"),
        ({"arms": [{"name": "a", "attention": "softmax", "qknorm": True}]}, "qknorm"),
        ({"arms": [{"name": "a", "attention": "softmax"}] * 2}, "the name 'a' is used more"),
        ({"seeds": [0, 0]}, "stability_sweep.seeds lists a value more than once"),
        ({"schedule": "linear"}, "stability_sweep.schedule must be one of"),
        ({"final_window": 5000}, r"final_window \(5000\) must be <="),
        ({"seq_len": 5000}, r"stability_sweep.seq_len \(5000\) needs as many distinct genes"),
    ],
)
def test_config_errors_name_the_key(params, words):
    with pytest.raises(ConfigError, match=words):
        sweep.sweep_config(params)


def test_an_unknown_arm_is_named():
    with pytest.raises(ConfigError, match="no arm named 'nope'.*softmax_pre, sigmoid_post"):
        sweep.arm_named(sweep.sweep_config(TINY_SWEEP), "nope")


# --------------------------------------------------------------------------------------------
# the rules


def test_divergence_rule_flags_each_cause_and_passes_a_stable_run():
    chance = math.log(8189)
    assert sweep.divergence(None, 4.0, chance) is None  # stable
    assert sweep.divergence("gradient norm 1e6 > 1e4 x early median 1", 4.0, chance).startswith(
        "gradient norm"
    )  # stopped by the loop
    assert "non-finite" in sweep.divergence(None, float("nan"), chance)
    assert "non-finite" in sweep.divergence(None, float("inf"), chance)
    assert "above chance" in sweep.divergence(None, chance + 0.01, chance)


def test_learned_rule_needs_70_percent_of_chance():
    chance = math.log(8189)  # 9.01
    assert sweep.learned(0.70 * chance, chance)
    assert not sweep.learned(0.71 * chance, chance)  # fails the rule
    assert not sweep.learned(float("nan"), chance)
    assert sweep.final_loss([9.0, 1.0, 2.0, 3.0], 3) == 2.0


def test_largest_stable_lr_and_boundary():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    assert sweep.largest_stable_lr(dict(zip(lrs, [True, True, False, False]))) == 1e-3
    assert sweep.boundary_lrs(dict(zip(lrs, [True, True, False, False]))) == [1e-3, 1e-2]
    # stable again above a divergence: the boundary is the first divergence, not the last
    assert sweep.largest_stable_lr(dict(zip(lrs, [True, False, True, False]))) == 1e-4
    assert sweep.boundary_lrs(dict(zip(lrs, [True] * 4))) == [1e-1]
    assert sweep.largest_stable_lr(dict(zip(lrs, [False] * 4))) is None
    assert sweep.boundary_lrs(dict(zip(lrs, [False] * 4))) == [1e-4]


# --------------------------------------------------------------------------------------------
# a run (a job)


def test_a_job_writes_its_log_and_summary_and_a_rerun_reads_them(tmp_path):
    cfg = sweep.sweep_config(TINY_SWEEP)
    arm = sweep.arm_named(cfg, "sigmoid_post")
    out = sweep.run_dir(tmp_path, arm.name, 3e-2, 0)
    summary = sweep.run_job(cfg, arm, 3e-2, 0, out, CPU, quiet)
    assert summary["complete"] and summary["steps"] == 8 and not summary["diverged"]
    assert summary["norm"] == "post" and summary["attention"] == "sigmoid"
    assert summary["tokens_per_step"] == 32 and summary["chance_loss"] == math.log(37)
    assert not (out / "state.pt").exists()
    with gzip.open(out / "log.csv.gz", "rt") as fh:
        log = pd.read_csv(fh)
    assert len(log) == 8 and (log["arm"] == "sigmoid_post").all() and (log["seed"] == 0).all()
    assert {"max_attn_logit_layer0", "attn_row_sum_layer0", "grad_norm_layer0"} <= set(log)
    assert summary["final_loss"] == pytest.approx(log["loss"].tail(2).mean(), rel=1e-5)
    assert sweep.read_summary(out / "summary.json") == json.loads(
        (out / "summary.json").read_text()
    )
    diverged = sweep.run_job(cfg, sweep.arm_named(cfg, "softmax_pre"), 1e4, 0,
                             sweep.run_dir(tmp_path, "softmax_pre", 1e4, 0), CPU, quiet)  # fmt: skip
    assert diverged["diverged"] and not diverged["learned"]


def test_the_run_cli_stops_at_its_budget_fails_and_its_rerun_ends_where_one_run_would(tmp_path):
    from sigmoid_sc.cli import main

    params = {**TINY_SWEEP, "steps": 600, "final_window": 5, "checkpoint_every": 50}
    # a job gets the section without the lists of rates and seeds, and its own arm only
    job = {k: v for k, v in params.items() if k not in ("lrs", "seeds", "arms")}
    job["arms"] = [TINY_SWEEP["arms"][1]]

    def run(out, *extra):
        return main(["stability-sweep", "run", "--params-json", json.dumps(job), "--device",
                     "cpu", "--arm", "sigmoid_post", "--lr", "0.03", "--seed", "1",
                     "--out-dir", str(out), *extra])  # fmt: skip

    assert run(tmp_path / "whole") == 0
    assert run(tmp_path / "cut", "--budget-s", "0.5") == 2  # stopped early: the job fails
    assert (tmp_path / "cut" / "state.pt").is_file()
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert run(tmp_path / "cut") == 0
    assert not (tmp_path / "cut" / "state.pt").exists()
    whole = pd.read_csv(tmp_path / "whole" / "log.csv.gz").drop(columns="elapsed_s")
    cut = pd.read_csv(tmp_path / "cut" / "log.csv.gz").drop(columns="elapsed_s")
    pd.testing.assert_frame_equal(cut, whole)  # bitwise on the CPU
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert (summary["seed"], summary["peak_lr"]) == (1, 0.03) and summary["resumed_at_step"] > 0
    assert run(tmp_path / "x", "--arm", "softmax_pre") == 2  # an arm the section lacks


def fake_summaries(cfg, pattern):
    """Summaries whose stability follows ``pattern[arm][lr index]`` (True: stable)."""
    out = []
    for arm in cfg.arms:
        for i, lr in enumerate(cfg.lrs):
            stable = pattern[arm.name][i]
            final = 3.0 + i * 0.1 if stable else float("nan")
            out.append({
                "arm": arm.name, "attention": arm.attention, "norm": arm.norm,
                "qk_norm": arm.qk_norm, "layer_scale": None, "peak_lr": lr, "seed": 0,
                "n_params": 1000, "steps": 10, "planned_steps": 10,
                "stop_reason": "max_steps" if stable else "diverged",
                "diverged": not stable, "divergence_reason": None if stable else "non-finite loss",
                "divergence_step": None if stable else 3, "learned": stable,
                "initial_loss": 3.7, "final_loss": final, "chance_loss": sweep.chance_loss(cfg),
                "max_grad_norm": 1.0, "early_median_grad_norm": 1.0, "max_attn_logit": 2.0,
                "final_max_attn_logit": 2.0, "elapsed_s": 1.0, "step_ms_mean": 100.0,
                "complete": True,
            })  # fmt: skip
    return out


def test_boundary_table_and_markdown():
    cfg = sweep.sweep_config({**TINY_SWEEP, "lrs": [1e-3, 1e-2, 1e-1]})
    summaries = fake_summaries(cfg, {"softmax_pre": [True, False, True],
                                     "sigmoid_post": [True, True, True]})  # fmt: skip
    runs = sweep.runs_table(summaries)
    table = sweep.boundary_table(cfg, runs).set_index("arm")
    assert table.loc["softmax_pre", "largest_stable_lr"] == 1e-3
    assert table.loc["softmax_pre", "smallest_diverged_lr"] == 1e-2
    assert "stable again above the boundary: 0.1" in table.loc["softmax_pre", "notes"]
    assert table.loc["sigmoid_post", "largest_stable_lr"] == 0.1
    assert table.loc["sigmoid_post", "learned_at_largest_stable"]
    assert sweep.sweep_boundary(cfg, summaries) == {"softmax_pre": [1e-3, 1e-2],
                                                    "sigmoid_post": [0.1]}  # fmt: skip
    md = sweep.boundary_markdown(cfg, table.reset_index(), runs)
    assert "| softmax_pre | 0.001 |" in md and "diverged: non-finite loss" in md
    planned = sweep.planned_runs(cfg, sweep.sweep_boundary(cfg, summaries))
    assert ("softmax_pre", 1e-2, 1) in planned and ("sigmoid_post", 0.1, 1) in planned
    assert len(planned) == 2 * 3 + 3


def test_lr_figure_draws_each_arms_final_loss_and_marks_divergences():
    cfg = sweep.sweep_config({**TINY_SWEEP, "lrs": [1e-3, 1e-2, 1e-1]})
    runs = sweep.runs_table(fake_summaries(cfg, {"softmax_pre": [True, False, True],
                                                 "sigmoid_post": [True, True, False]}))  # fmt: skip
    fig = sweep.plot_lr_sensitivity(cfg, runs)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    # the line of an arm joins its stable runs' mean final loss
    assert list(lines["softmax_pre"].get_xdata()) == [1e-3, 1e-1]
    assert list(lines["softmax_pre"].get_ydata()) == [3.0, 3.2]
    assert list(lines["sigmoid_post"].get_xdata()) == [1e-3, 1e-2]
    crosses = [
        line for line in ax.get_lines() if line.get_marker() == "x" and len(line.get_xdata())
    ]
    assert sorted(x for line in crosses for x in line.get_xdata()) == [1e-2, 1e-1]
    assert ax.get_xscale() == "log"
    from sigmoid_sc.figures import pyplot

    pyplot().close(fig)


# --------------------------------------------------------------------------------------------
# the GPU driver, on the CPU


def test_gpu_driver_runs_the_sweep_and_a_second_call_continues(tmp_path):
    from sigmoid_sc.cli import main

    params = json.dumps(TINY_SWEEP)
    out, runs = tmp_path / "out", tmp_path / "carry" / "runs"
    args = ["stability-sweep", "gpu", "--device", "cpu", "--workers", "2", "--params-json",
            params, "--out", str(out), "--runs-dir", str(runs), "--state-dir",
            str(tmp_path / "state"), "--budget-s", "300"]  # fmt: skip
    assert main(args) == 0
    table = pd.read_csv(out / "stability_runs.csv")
    # 2 arms x 2 lrs (seed 0) + seed 1 at each arm's boundary (3e-2 stable, 1e4 diverged)
    assert len(table) == 8 and set(table["seed"]) == {0, 1}
    assert table.groupby(["arm", "peak_lr"]).size().eq(2).all()
    assert table[table["peak_lr"] == 1e4]["diverged"].all()
    boundary = pd.read_csv(out / "stability_boundary.csv").set_index("arm")
    assert (boundary["largest_stable_lr"] == 3e-2).all()
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "stability_boundary.csv", "stability_boundary.md", "stability_lr.png",
        "stability_logits.png", "stability_runs.csv", "stability_runs.tar.gz",
        "stability_sweep.log",
    ])  # fmt: skip
    with tarfile.open(out / "stability_runs.tar.gz") as tar:
        names = tar.getnames()
    assert len(names) == 16 and all(n.startswith("runs/") for n in names)
    # a second call: a finished run is kept, a missing one is run again
    (runs / "sigmoid_post" / "lr0.03" / "seed1" / "summary.json").unlink()
    (out / "stability_sweep.log").unlink()
    assert main(args) == 0
    log = (out / "stability_sweep.log").read_text()
    assert "7 runs finished earlier, 1 to run" in log and "complete" in log
    assert len(pd.read_csv(out / "stability_runs.csv")) == 8


# --------------------------------------------------------------------------------------------
# Snakemake


@pytest.mark.slow
def test_tiny_sweep_runs_end_to_end_through_snakemake(tmp_path):
    cfg = {
        "seeds": [0], "attentions": ["softmax", "sigmoid"], "device": "cpu",
        "datasets": {"blobs": {"source": "synthetic", "label_key": "cell_type",
                               "synthetic": {"n_cells": 40, "n_genes": 30, "n_cell_types": 2,
                                             "n_batches": 1, "seed": 1}}},
        # one arm (the others are the same jobs): 2 first-seed runs, then seed 1 at both
        "experiments": {"stability_sweep": {"enabled": True, **TINY_SWEEP,
                                            "arms": TINY_SWEEP["arms"][1:]}},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(tmp_path), "--configfile", str(path), "--cores", "2",
               "results/figures/stability_lr.png", "results/tables/stability_boundary.md"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert process.returncode == 0, process.stderr[-4000:]
    results = tmp_path / "results"
    runs = pd.read_csv(results / "tables" / "stability_runs.csv")
    assert len(runs) == 4 and set(runs["seed"]) == {0, 1} and (runs["norm"] == "post").all()
    assert json.loads((results / "experiments/stability_sweep/boundary.json").read_text()) == {
        "boundary_lrs": {"sigmoid_post": [3e-2, 1e4]},
        "seeds": [1],
    }
    for name in ("stability_lr.png", "stability_lr.pdf", "stability_logits.png"):
        assert (results / "figures" / name).stat().st_size > 0
    md = (results / "tables" / "stability_boundary.md").read_text()
    assert "| sigmoid_post | 0.03 |" in md
    # a third seed reruns no finished job: a job's params hold its own arm, rate and seed only
    cfg["experiments"]["stability_sweep"]["seeds"] = [0, 1, 2]
    path.write_text(yaml.safe_dump(cfg))
    dry = subprocess.run([*command, "--dry-run", "--quiet", "rules"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-4000:]
    jobs = dict(re.findall(r"^(stability_\w+)\s+(\d+)$", dry.stdout + dry.stderr, re.M))
    # the boundary and the tables again; seed 2's runs join once the boundary is rewritten
    assert jobs == {"stability_boundary": "1", "stability_sweep": "1"}, dry.stdout[-3000:]


# --------------------------------------------------------------------------------------------
# tools/gpu_stability.sh (the GPU host's command), in its CPU smoke mode


def gpu_script(tmp_path, **env_vars):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "SMOKE": "1",
           "PACK_DIR": str(tmp_path / "out"), "CARRY": str(tmp_path / "carry"),
           "PYTHON": sys.executable, "BUDGET": "240", "TMPDIR": str(tmp_path), **env_vars}  # fmt: skip
    process = subprocess.run(["bash", str(ROOT / "tools" / "gpu_stability.sh")], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and all(re.match(r"^[A-Za-z0-9._-]+$", f) for f in files), files
    return process


@pytest.mark.slow
def test_gpu_script_sweep_returns_its_tables_and_the_runs_a_next_call_reuses(tmp_path):
    gpu_script(tmp_path, WORKERS="1")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "stability_boundary.csv", "stability_boundary.md", "stability_lr.png",
        "stability_logits.png", "stability_runs.csv", "stability_runs.tar.gz",
        "stability_sweep.log", "versions.txt",
    ])  # fmt: skip
    runs = pd.read_csv(out / "stability_runs.csv")
    # configs/stability.yaml's sweep, made tiny: 2 arms x 2 rates, then seed 1 at the boundary
    assert len(runs) == 8 and set(runs["seed"]) == {0, 1} and (runs["planned_steps"] == 8).all()
    assert "Complete: 8 of 8" in (out / "stability_boundary.md").read_text()
    # the next call on a fresh machine: the returned runs unpacked into the carried folder
    carry = tmp_path / "next"
    carry.mkdir()
    with tarfile.open(out / "stability_runs.tar.gz") as tar:
        tar.extractall(carry, filter="data")
    (carry / "runs" / "sigmoid_pre" / "lr0.03" / "seed1" / "summary.json").unlink()
    gpu_script(tmp_path, WORKERS="1", CARRY=str(carry), PACK_DIR=str(tmp_path / "out2"))
    log = (tmp_path / "out2" / "stability_sweep.log").read_text()
    assert "7 runs finished earlier, 1 to run" in log
    assert len(pd.read_csv(tmp_path / "out2" / "stability_runs.csv")) == 8


@pytest.mark.slow
def test_gpu_script_confirmation_packs_its_arms_and_a_second_call_reuses_them(tmp_path):
    def call():
        gpu_script(tmp_path, PART="confirm", CONFIRM_LRS="0.001")
        return (tmp_path / "out" / "stress_test.log").read_text()

    call()
    out = tmp_path / "out"
    summary = json.loads((out / "stress_test_summary.json").read_text())
    assert summary["complete"] and set(summary["arms"]) == {"softmax", "sigmoid"}
    assert summary["config"]["task"] == "ordered" and summary["config"]["lr"] == [0.001]
    with tarfile.open(out / "stress_confirm_arms.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["sigmoid.pt", "softmax.pt"]
    log = call()  # the finished arms come from their checkpoints, not trained again
    assert log.count("finished earlier") == 2
