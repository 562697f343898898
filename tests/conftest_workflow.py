"""Running Snakemake in the tests: the one ``snakemake()`` helper and the shared tiny DAG.

Every test that runs the workflow calls :func:`snakemake` (or :func:`snakemake_popen` when it
must watch the run while it goes). The whole DAG of ``tests/configs/tiny.yaml`` (every stage of
two datasets, then the report) runs once per test session, in a temporary folder: the
``tiny_run`` fixture of tests/conftest.py. Tests that only read outputs read that run; tests
that run Snakemake again on a finished run work on a copy (:func:`copy_run`), so the shared run
stays as it finished, and rerun only what they change.

The run (:class:`TinyDag`) is started in the background when the session starts, if a collected
test needs it, at a lower scheduling priority (``nice``): the tests that run meanwhile keep one
core busy at most, and the run uses what they leave.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
TINY_CONFIG = yaml.safe_load(TINY.read_text())

#: seconds a Snakemake call may take before the test fails (its processes are killed)
TIMEOUT_S = 1500
#: the niceness of the background run: the tests in the foreground come first
BACKGROUND_NICE = 10


def snakemake_command(workdir: Path, *args: str, configfile: Path | None = TINY) -> list[str]:
    """The command line: this Python's Snakemake on the repository's Snakefile in ``workdir``;
    ``configfile=None`` runs the embedded default (config.yaml)."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE)]
    command += ["--directory", str(workdir)]
    if configfile is not None:
        command += ["--configfile", str(configfile)]
    return command + list(args)


def snakemake_env(env: dict | None = None) -> dict[str, str]:
    return {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}


def snakemake_popen(
    workdir: Path,
    *args: str,
    configfile: Path | None = TINY,
    env: dict | None = None,
    output=subprocess.PIPE,
    nice: int = 0,
) -> subprocess.Popen:
    """Snakemake started, not waited for: stdout and stderr merged into ``output`` (a pipe,
    read as text from ``stdout``, or an open file), in a process group of its own (so
    :func:`kill_group` ends it with its jobs); ``nice``: its niceness (and its jobs')."""
    command = snakemake_command(workdir, *args, configfile=configfile)
    if nice and shutil.which("nice"):
        command = ["nice", "-n", str(nice), *command]
    return subprocess.Popen(
        command,
        cwd=workdir,
        env=snakemake_env(env),
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the process group of a process started by :func:`snakemake_popen`."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def snakemake(
    workdir: Path,
    *args: str,
    configfile: Path | None = TINY,
    env: dict | None = None,
    timeout: float = TIMEOUT_S,
) -> subprocess.CompletedProcess:
    """Run Snakemake to its end; returns its ``stdout`` and ``stderr`` (both, with
    :func:`output_of`).

    It runs in a process group of its own: on timeout the whole group is killed (no Snakemake
    or job outlives the test) and the test fails with the end of the output.
    """
    command = snakemake_command(workdir, *args, configfile=configfile)
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env=snakemake_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        out, err = process.communicate()
        pytest.fail(f"snakemake did not finish within {timeout} s:\n{(out + err)[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def output_of(process: subprocess.CompletedProcess) -> str:
    """All a finished Snakemake printed (its job table and log go to stderr)."""
    return (process.stdout or "") + (process.stderr or "")


def job_counts(text: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints before running (or dry-running) jobs."""
    block = text.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def job_messages(text: str) -> list[str]:
    """The ``message:`` of every job Snakemake schedules ('Job 12: train blobs_a: ...')."""
    return re.findall(r"^Job \d+: (.+)$", text, flags=re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# the shared run


@dataclass(frozen=True)
class TinyRun:
    """The finished tiny DAG: its folder, Snakemake's output of the run and of the report."""

    workdir: Path
    log: str
    report_log: str

    @property
    def results(self) -> Path:
        return self.workdir / "results"


class TinyDag:
    """tests/configs/tiny.yaml's whole DAG on 2 cores in ``workdir``, then its report, run by a
    thread in the background from the start. :meth:`wait` returns the :class:`TinyRun` (or
    fails the test, with the end of Snakemake's output); :meth:`stop` leaves no Snakemake
    behind."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.outcome: TinyRun | str = "not finished"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _snakemake(self, *args: str) -> tuple[int | None, str]:
        """Snakemake's exit status (None: killed at TIMEOUT_S) and output (merged)."""
        self.process = snakemake_popen(self.workdir, *args, nice=BACKGROUND_NICE)
        try:
            out, _ = self.process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_group(self.process)
            out, _ = self.process.communicate()
            return None, out
        return self.process.returncode, out

    def _run(self) -> None:
        try:
            code, log = self._snakemake("--cores", "2")
            if code != 0:
                self.outcome = f"the shared run failed (exit status {code}):\n{log[-6000:]}"
                return
            if self._stopped.is_set():
                return
            code, report = self._snakemake("--report", "results/report.html")
            if code != 0:
                self.outcome = f"the shared run's report failed:\n{report[-4000:]}"
                return
            self.outcome = TinyRun(self.workdir, log, report)
        except BaseException as exc:  # reported by wait(), in the tests that need the run
            self.outcome = f"the shared run could not run: {type(exc).__name__}: {exc}"

    def wait(self) -> TinyRun:
        self._thread.join()
        if not isinstance(self.outcome, TinyRun):
            pytest.fail(self.outcome, pytrace=False)
        return self.outcome

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self.process is not None and self.process.poll() is None:
            kill_group(self.process)
        self._thread.join(timeout=60)


_SESSION: dict[str, TinyDag] = {}  # the session's shared run, once started


def start_tiny_dag(workdir: Path) -> TinyDag:
    _SESSION["tiny"] = TinyDag(workdir)
    return _SESSION["tiny"]


def started_tiny_dag() -> TinyDag | None:
    return _SESSION.get("tiny")


def start_tiny_dag_early(items, workdir_factory) -> TinyDag | None:
    """Start the shared run now if a collected test uses ``tiny_run``."""
    if not any("tiny_run" in getattr(item, "fixturenames", ()) for item in items):
        return None
    return start_tiny_dag(workdir_factory())


def copy_run(run: TinyRun, dest: Path) -> Path:
    """A copy of the finished run (results and Snakemake's metadata, file times kept)."""
    shutil.copytree(run.workdir, dest, symlinks=True)
    return dest
