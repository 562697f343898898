"""Preemption: a training run killed half-way and run again resumes from its last checkpoint.

Three ways to kill it, each followed by a rerun that must end exactly where an uninterrupted run
with the same seed ends on the CPU (every history row's loss, the final validation loss, every
weight of model.pt):

- SIGTERM to the ``sigmoid-sc train`` process (what SLURM sends on preemption or scancel):
  it finishes the step in progress and checkpoints it, so no step is lost;
- SIGKILL (a node lost, or KillWait run out): the rerun starts from the last periodic
  checkpoint, so at most ``checkpoint_every`` steps are lost;
- ``scancel`` of the SLURM job that ``--profile profiles/slurm`` submitted for the train rule,
  then the same Snakemake command again (needs SLURM; see tests/conftest_slurm.py).

To know exactly how many steps a killed run had done, it evaluates every step
(``eval_every: 1`` prints ``step t/T``) and, in the CPU tests, is frozen with SIGSTOP before the
count is read.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest_slurm import (  # noqa: F401  (slurm_cluster is a fixture)
    REPO,
    JobWatcher,
    make_test_profile,
    slurm_cluster,
    slurm_env,
    started_dag,
    wait_for_jobs_to_end,
)
from conftest_tokens import make_tokens
from conftest_workflow import kill_group, snakemake_popen

STEP_LINE = re.compile(r": step (\d+)/(\d+)")
RESUME_LINE = re.compile(r"resuming from .* at step (\d+)")
MODEL = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "dropout": 0.0}
TRAIN = {
    "steps": 100,
    "batch_tokens": 320,
    "lr": 3.0e-3,
    "warmup_steps": 5,
    "eval_every": 1,  # a `step t/T` line after every step: the count at the kill is exact
    "checkpoint_every": 10,
}
KILL_AFTER_STEP = 35  # half-way-ish, past three periodic checkpoints


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # same thread count in every run: bit-identical CPU maths
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


class TrainProcess:
    """``sigmoid-sc train`` in a subprocess; a thread collects its stderr lines."""

    def __init__(self, tokens: Path, out_dir: Path) -> None:
        cmd = [
            sys.executable, "-m", "sigmoid_sc.cli", "train",
            "--dataset", "tokens", "--tokens", str(tokens), "--attention", "sigmoid",
            "--seed", "3", "--model-json", json.dumps(MODEL), "--train-json", json.dumps(TRAIN),
            "--device", "cpu", "--out-dir", str(out_dir),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=train_env()
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def steps_done(self) -> int:
        """The last step the process reported complete."""
        steps = [int(m.group(1)) for line in self.lines if (m := STEP_LINE.search(line))]
        return max(steps, default=0)

    def wait_for_step(self, step: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.steps_done() < step:
            assert self.proc.poll() is None, "train exited early:\n" + "".join(self.lines[-20:])
            assert time.monotonic() < deadline, f"no step {step} within {timeout_s} s"
            time.sleep(0.01)

    def freeze_and_count(self) -> int:
        """SIGSTOP the process, let the reader drain the pipe, return the steps done."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        fd, pending = self.proc.stderr.fileno(), array.array("i", [0])
        deadline, seen = time.monotonic() + 30, -1
        while time.monotonic() < deadline:
            time.sleep(0.2)
            fcntl.ioctl(fd, termios.FIONREAD, pending)  # bytes still in the pipe
            if pending[0] == 0 and len(self.lines) == seen:
                break
            seen = len(self.lines)
        return self.steps_done()

    def wait(self, timeout_s: float = 300) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code

    def log(self) -> str:
        return "".join(self.lines)


def checkpoint_step(out_dir: Path) -> int:
    state = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return int(state["step"])


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """History (losses, lr, tokens per step) and final weights identical to the reference."""
    run = pd.read_csv(run_dir / "history.csv")
    ref = pd.read_csv(reference_dir / "history.csv")
    assert list(run["step"]) == list(ref["step"]) and list(run["split"]) == list(ref["split"])
    for column in ["loss", "lr", "tokens"]:
        np.testing.assert_array_equal(run[column].to_numpy(), ref[column].to_numpy(), column)
    final_val = run.loc[run["split"] == "val", "loss"].iloc[-1]
    assert final_val == ref.loc[ref["split"] == "val", "loss"].iloc[-1]
    got = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    want = torch.load(reference_dir / "model.pt", map_location="cpu", weights_only=True)
    assert got["val_loss"] == want["val_loss"]
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), f"weight {name} differs"
    assert not (run_dir / "checkpoint.pt").exists(), "a finished run leaves no checkpoint"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_tokens(tmp_path_factory.mktemp("tokens") / "tokens.npz", n_cells=160, seed=5)


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out_dir = tmp_path_factory.mktemp("reference")
    proc = TrainProcess(tokens, out_dir)
    assert proc.wait() == 0, proc.log()
    assert "resuming" not in proc.log()
    return out_dir


def test_sigterm_then_rerun_resumes_without_losing_a_step(tokens, reference, tmp_path):
    first = TrainProcess(tokens, tmp_path)
    first.wait_for_step(KILL_AFTER_STEP)
    done = first.freeze_and_count()
    os.kill(first.proc.pid, signal.SIGTERM)
    os.kill(first.proc.pid, signal.SIGCONT)
    code = first.wait()
    assert code == 128 + signal.SIGTERM, first.log()  # non-zero: Snakemake/SLURM see a failure
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "history.csv").exists()
    saved = checkpoint_step(tmp_path)
    # SIGTERM lets the step in progress finish, then checkpoints it: nothing is lost
    assert done <= saved <= done + 1, (done, saved)
    assert saved < TRAIN["steps"], "killed too late to test a resume"

    second = TrainProcess(tokens, tmp_path)
    assert second.wait() == 0, second.log()
    resumed = [int(m.group(1)) for m in RESUME_LINE.finditer(second.log())]
    assert resumed == [saved], second.log()[:2000]
    assert_same_run(tmp_path, reference)


def test_sigkill_then_rerun_loses_at_most_checkpoint_every(tokens, reference, tmp_path):
    first = TrainProcess(tokens, tmp_path)
    first.wait_for_step(KILL_AFTER_STEP)
    done = first.freeze_and_count()
    os.kill(first.proc.pid, signal.SIGKILL)  # no handler runs: only periodic checkpoints count
    assert first.wait() == -signal.SIGKILL
    saved = checkpoint_step(tmp_path)
    every = TRAIN["checkpoint_every"]
    assert saved % every == 0 and 0 < saved <= done
    assert done - saved <= every, f"lost {done - saved} steps (> checkpoint_every {every})"

    second = TrainProcess(tokens, tmp_path)
    assert second.wait() == 0, second.log()
    assert [int(m.group(1)) for m in RESUME_LINE.finditer(second.log())] == [saved]
    assert_same_run(tmp_path, reference)


# ----------------------------------------------------------------------------------------------
# through SLURM: scancel of the train job that profiles/slurm submitted

SLURM_TRAIN = {"steps": 400, "eval_every": 1, "checkpoint_every": 50}
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: \S+rule_train/")


def _snakemake(workdir: Path, config: Path, *args: str, env: dict) -> subprocess.Popen:
    return snakemake_popen(workdir, *args, configfile=config, env=env)


def _finish(proc: subprocess.Popen, timeout_s: float = 600) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        pytest.fail(f"snakemake did not finish within {timeout_s} s:\n{out[-5000:]}")
    return proc.returncode, out


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scancel_of_slurm_train_job_then_rerun_resumes(slurm_cluster, tmp_path):  # noqa: F811
    # test_slurm.py's DAG, if started with the session, ends first: its train and embed jobs
    # would hold the node's one (fake) GPU that this train job asks for
    if started_dag() is not None:
        started_dag().wait()
    config = yaml.safe_load((REPO / "tests" / "configs" / "slurm_tiny.yaml").read_text())
    config["train"].update(SLURM_TRAIN)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    (dataset,) = config["datasets"]
    target = f"results/{dataset}/train/sigmoid_seed0/model.pt"
    out_dir = Path(target).parent
    train_log = Path(f"results/logs/train/{dataset}/sigmoid_seed0.log")
    env = slurm_env(slurm_cluster)
    env["OMP_NUM_THREADS"] = "1"

    # the stages before training run locally; the train job goes to SLURM
    workdir = tmp_path / "run"
    workdir.mkdir()
    code, out = _finish(
        _snakemake(workdir, config_path, "--cores", "2", f"results/{dataset}/tokens.npz", env=env)
    )
    assert code == 0, out[-5000:]
    # an identical copy for the uninterrupted reference (Snakemake's metadata included)
    reference_dir = tmp_path / "reference"
    shutil.copytree(workdir, reference_dir, symlinks=True)

    profile = make_test_profile(tmp_path / "profile" / "slurm")
    # --retries 0: Snakemake stops after the cancelled job, so its checkpoint can be inspected
    # before the rerun (with the profile's retries it would resubmit, and resume, by itself)
    with JobWatcher() as watcher:
        run = _snakemake(workdir, config_path, "--profile", str(profile), "--retries", "0",
                         target, env=env)  # fmt: skip
        lines: list[str] = []

        def read() -> None:
            for line in run.stdout:
                lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        log_path = workdir / train_log
        try:
            deadline = time.monotonic() + 300
            done = 0
            while done < SLURM_TRAIN["steps"] // 4:
                assert run.poll() is None, "snakemake ended before the kill:\n" + "".join(lines)
                assert time.monotonic() < deadline, "training did not reach a quarter in 300 s"
                time.sleep(0.05)
                text = log_path.read_text() if log_path.exists() else ""
                done = max((int(m.group(1)) for m in STEP_LINE.finditer(text)), default=0)
            job_ids = SUBMITTED.findall("".join(lines))
            assert len(job_ids) == 1, "".join(lines)
            subprocess.run(["scancel", job_ids[0]], check=True, timeout=30)
            wait_for_jobs_to_end(job_ids)
            code = run.wait(timeout=300)
        finally:
            # a failed check leaves no Snakemake and no SLURM job behind
            if run.poll() is None:
                kill_group(run)
                run.wait()
                leftover = SUBMITTED.findall("".join(lines))
                if leftover:
                    subprocess.run(["scancel", *leftover], capture_output=True, timeout=30)
            reader.join(timeout=10)
    assert code != 0, "snakemake should report the cancelled job as failed"
    assert watcher.jobs[job_ids[0]]["JobState"] == "CANCELLED", watcher.jobs[job_ids[0]]

    log_text = log_path.read_text()
    done = max(int(m.group(1)) for m in STEP_LINE.finditer(log_text))
    saved = checkpoint_step(workdir / out_dir)
    every = SLURM_TRAIN["checkpoint_every"]
    assert 0 < saved < SLURM_TRAIN["steps"], (saved, log_text[-2000:])
    assert 0 <= done - saved <= every, f"done {done}, checkpoint at {saved} (every {every})"
    assert not (workdir / target).exists()
    graceful = "stopped by signal" in log_text  # SLURM's SIGTERM reached train's handler
    print(f"scancel at step {done}: checkpoint at step {saved}, graceful stop: {graceful}")

    # the same command again: one new SLURM job, which resumes from the checkpoint; meanwhile
    # (the SLURM job spends much of its time waiting for status checks) the uninterrupted
    # reference, locally on the CPU, same Snakemake rule and config
    reference = _snakemake(reference_dir, config_path, "--cores", "1", target, env=env)
    try:
        code, out = _finish(
            _snakemake(workdir, config_path, "--profile", str(profile), target, env=env)
        )
        reference_code, reference_out = _finish(reference)
    finally:
        if reference.poll() is None:
            kill_group(reference)
            reference.wait()
    assert code == 0, out[-5000:]
    assert len(SUBMITTED.findall(out)) == 1, out[-5000:]
    resumed = [int(m.group(1)) for m in RESUME_LINE.finditer(log_path.read_text())]
    assert resumed == [saved], log_path.read_text()[:2000]
    assert reference_code == 0, reference_out[-5000:]
    assert_same_run(workdir / out_dir, reference_dir / out_dir)
