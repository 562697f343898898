"""Helpers for the tests that need a real single-node SLURM (tests/test_slurm.py,
tests/test_preemption.py): finding or starting it, stopping what was started, a copy of
``profiles/slurm`` sized for the test node, and a watcher that records every job's state and
requested GPUs from ``scontrol`` while the jobs still exist.

Who stops the daemons:
- the ``slurm_cluster`` fixture starts SLURM with ``.ci/setup-slurm.sh`` when it is installed
  but none answers (as root, with its own state folder; it never installs packages) and stops
  exactly those daemons, by their PIDs, at the end of the session;
- under CI (env ``CI=true``), ``.ci/run`` has already started them with ``.ci/setup-slurm.sh``
  for this test session alone; the fixture stops those too at the end of the session (the
  script recorded their PIDs), so CI leaves no daemons behind;
- on a developer's machine, a SLURM that was already running (started by hand with
  ``bash .ci/setup-slurm.sh``, or a real cluster) is used and left running.

Without a working SLURM the tests are skipped with the reason, except under CI, where that is a
failure.

The DAG of tests/test_slurm.py (:class:`SlurmDag`) is submitted when the session starts, if a
SLURM already answers then (under CI, ``.ci/run`` started it) and the session runs that test:
its jobs spend most of their time waiting for the executor plugin's status checks, whose
interval grows while no job ends, and the other tests run meanwhile. The ``slurm_run`` fixture
waits for it; without an early start it runs it then.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest_workflow import kill_group, output_of, snakemake, snakemake_popen

REPO = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO / ".ci" / "setup-slurm.sh"
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
DEFAULT_STATE_DIR = Path(os.environ.get("SIGMOID_SC_SLURM_STATE", "/run/sigmoid-sc-slurm"))
BASH = shutil.which("bash") or "/bin/bash"
# where the daemons live (often not on a user's PATH)
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
SLURM_TOOLS = ("sinfo", "squeue", "sbatch", "scontrol", "scancel")
READY_STATES = {"idle", "mix", "mixed", "alloc", "allocated"}

# Memory the test node grants each job (MB): the profile asks for cluster-sized memory
# (8-32 GB), more than a 2-core CI machine has for several jobs at once.
TEST_JOB_MEM_MB = 2000
# Status-check delays for the test: seconds, not the profile's 40/20 (the test node answers at
# once and the jobs last seconds). MinJobAge (300 s) stays far above them.
TEST_STATUS_DELAY_S = 3


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _run(
    cmd: list[str], timeout: float = 20, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def slurm_problem() -> str | None:
    """Why SLURM cannot run a job here, or None when a node is ready."""
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"SLURM client tools not on PATH: {', '.join(missing)}"
    try:
        out = _run(["sinfo", "-h", "-o", "%t"])
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer within 20 s (is slurmctld running?)"
    if out.returncode != 0:
        return f"`sinfo` failed (is slurmctld running?): {out.stderr.strip()}"
    states = {s.strip().rstrip("*~#!%$@^-") for s in out.stdout.split()}
    if not states & READY_STATES:
        return f"no SLURM node is ready (node states: {sorted(states) or 'none'})"
    return None


def default_partition() -> str:
    """The cluster's default partition (marked ``*`` by sinfo), else the first one."""
    names = _run(["sinfo", "-h", "-o", "%P"]).stdout.split()
    for name in names:
        if name.endswith("*"):
            return name.rstrip("*")
    return names[0] if names else ""


class _Cluster:
    """The SLURM the session uses, and what it must stop at the end."""

    def __init__(self) -> None:
        self.state_dirs: list[Path] = []  # setup-slurm.sh state folders whose daemons we stop
        self.partition = ""
        self.setup_log = ""

    def stop(self) -> None:
        for state_dir in self.state_dirs:
            env = {**os.environ, "SIGMOID_SC_SLURM_STATE": str(state_dir)}
            _run([BASH, str(SETUP_SCRIPT), "stop"], timeout=120, env=env)
            if state_dir != DEFAULT_STATE_DIR:
                shutil.rmtree(state_dir, ignore_errors=True)
        self.state_dirs.clear()


_SESSION: dict[str, object] = {}  # one cluster per session, shared by every module's fixture


def _start_cluster() -> _Cluster:
    cluster = _Cluster()
    problem = slurm_problem()
    installed = all(shutil.which(d, path=SBIN_PATH) for d in ("munged", "slurmctld", "slurmd"))
    if problem is not None and installed and SETUP_SCRIPT.is_file() and os.geteuid() == 0:
        # installed but not answering: start it, with a state folder of our own so that the
        # stop at the end ends exactly these daemons (installing is .ci/run's job, not ours)
        state_dir = Path(tempfile.mkdtemp(prefix="sigmoid-sc-slurm-state-"))
        env = {
            **os.environ,
            "SIGMOID_SC_SLURM_STATE": str(state_dir),
            "SIGMOID_SC_SLURM_INSTALL": "0",
        }
        try:
            out = _run([BASH, str(SETUP_SCRIPT), "start"], timeout=900, env=env)
            cluster.setup_log = out.stdout + out.stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            cluster.setup_log = f"{exc}"
        cluster.state_dirs.append(state_dir)
        problem = slurm_problem()
        if problem is not None:
            problem += f"\n.ci/setup-slurm.sh said:\n{cluster.setup_log[-3000:]}"
    elif problem is not None and not installed:
        problem += " (slurmctld/slurmd/munged not installed: `sudo bash .ci/setup-slurm.sh`)"
    elif problem is not None and os.geteuid() != 0:
        problem += " (and starting one with .ci/setup-slurm.sh needs root)"
    if problem is None and in_ci() and DEFAULT_STATE_DIR.is_dir():
        # CI: .ci/run started these daemons for this session; stop them at its end
        cluster.state_dirs.append(DEFAULT_STATE_DIR)
    if problem is not None:
        cluster.stop()
        raise RuntimeError(problem)
    cluster.partition = default_partition()
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """A ready single-node SLURM (see the module docstring for who starts and stops it)."""
    if "error" in _SESSION:
        _fail_or_skip(str(_SESSION["error"]))
    if "cluster" not in _SESSION:
        try:
            _SESSION["cluster"] = _start_cluster()
        except RuntimeError as exc:
            _SESSION["error"] = exc
            _fail_or_skip(str(exc))
        owner = True
    else:
        owner = False
    yield _SESSION["cluster"]
    if owner:
        _SESSION.pop("cluster").stop()


def _fail_or_skip(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true but SLURM is not usable: {reason}", pytrace=False)
    pytest.skip(f"SLURM not available: {reason}")


def slurm_env(cluster: _Cluster | str) -> dict[str, str]:
    """Environment for a Snakemake run with profiles/slurm: partition (the cluster's, or the
    one given) and (no) account."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env["SIGMOID_SC_SLURM_PARTITION"] = cluster if isinstance(cluster, str) else cluster.partition
    env["SIGMOID_SC_SLURM_ACCOUNT"] = ""  # no accounting database on the test node
    return env


def make_test_profile(dest_dir: Path) -> Path:
    """A copy of profiles/slurm/config.yaml for the test node; returns its folder.

    Changed, and only these: every ``mem_mb`` capped at TEST_JOB_MEM_MB, the status-check
    delays and latency-wait shortened. Executor, status command, partition/account placeholders,
    GPU requests, retries, runtimes and logs stay as users get them.
    """
    profile = yaml.safe_load(PROFILE.read_text())
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        if "mem_mb" in resources:
            resources["mem_mb"] = min(int(resources["mem_mb"]), TEST_JOB_MEM_MB)
    profile["slurm-init-seconds-before-status-checks"] = TEST_STATUS_DELAY_S
    profile["latency-wait"] = 5
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest_dir


_FIELD = re.compile(r"(\w+)=(\S*)")


def scontrol_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld still knows (running, or ended less than MinJobAge ago)."""
    out = _run(["scontrol", "show", "job", "-o"])
    jobs = {}
    for line in out.stdout.splitlines():
        fields = dict(_FIELD.findall(line))
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


class JobWatcher:
    """Polls ``scontrol show job`` in a thread; keeps the last record of every job seen.

    Finished jobs vanish from slurmctld MinJobAge seconds after they end; polling every second
    while Snakemake runs keeps their final state and requested TRES (``TresPerJob=gres:gpu:1``
    for ``--gpus=1``, ``TresPerNode`` for ``--gres``) however long the run takes.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.jobs: dict[str, dict[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def poll(self) -> None:
        try:
            self.jobs.update(scontrol_jobs())
        except (subprocess.TimeoutExpired, OSError):
            pass  # slurmctld busy: the next poll catches up

    def __enter__(self) -> JobWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.poll()


def wait_for_jobs_to_end(job_ids: list[str], timeout_s: float = 120) -> None:
    """Block until none of ``job_ids`` is pending or running (e.g. after scancel)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = scontrol_jobs()
        if not any(
            jobs.get(j, {}).get("JobState") in {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING"}
            for j in job_ids
        ):
            return
        time.sleep(1)
    raise TimeoutError(f"SLURM jobs {job_ids} still active after {timeout_s} s")


# ----------------------------------------------------------------------------------------------
# the tiny DAG through the profile, started early

DAG_CONFIG = REPO / "tests" / "configs" / "slurm_tiny.yaml"
DAG_TIMEOUT_S = 900
SUBMITTED = re.compile(
    r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", re.M
)


def expected_jobs(workdir: Path, env: dict) -> Counter:
    """Jobs per rule of the DAG, from a dry run of the same config (``all`` excluded)."""
    out = snakemake(
        workdir, "--dry-run", "--quiet", "rules", "--cores", "1", configfile=DAG_CONFIG,
        env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, output_of(out)
    counts = Counter()
    for line in output_of(out).split("Job stats:", 1)[1].splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in {"all", "total", "job"}:
            counts[parts[0]] = int(parts[1])
    return counts


class SlurmDag:
    """tests/configs/slurm_tiny.yaml's whole DAG, sent through the test copy of
    ``profiles/slurm`` by a Snakemake running in the background, a :class:`JobWatcher` beside
    it. :meth:`wait` ends it (at the latest DAG_TIMEOUT_S after the start) and returns what
    the checks need; :meth:`stop` leaves no Snakemake and no SLURM job behind."""

    def __init__(self, root: Path, partition: str) -> None:
        self.workdir = root / "slurm_dag"
        self.workdir.mkdir(parents=True)
        profile = make_test_profile(root / "profile" / "slurm")
        self.partition = partition
        self.env = slurm_env(partition)
        self.expected = expected_jobs(self.workdir, self.env)
        self.log_path = root / "snakemake.log"
        self.watcher = JobWatcher()
        self.watcher.__enter__()
        with open(self.log_path, "w") as log:
            self.process = snakemake_popen(
                self.workdir, "--profile", str(profile), "--verbose", configfile=DAG_CONFIG,
                env=self.env, output=log,
            )  # fmt: skip
        self.deadline = time.monotonic() + DAG_TIMEOUT_S
        self.result: dict | None = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def _cancel_submitted(self) -> None:
        ids = [slurm_id for _, slurm_id, _ in SUBMITTED.findall(self.log())]
        if ids:
            _run(["scancel", *ids], timeout=30)

    def wait(self) -> dict:
        if self.result is None:
            timed_out = False
            try:
                self.process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(self.process)
                self.process.wait()
                timed_out = True
            self.watcher.__exit__(None, None, None)
            if self.process.returncode != 0:
                self._cancel_submitted()  # leave nothing queued behind a failed run
            log = self.log()
            self.result = {
                "returncode": self.process.returncode,
                "timed_out": timed_out,
                "workdir": self.workdir,
                "log": log,
                "expected": self.expected,
                "submitted": SUBMITTED.findall(log),
                "jobs": self.watcher.jobs,
                "partition": self.partition,
            }
        return self.result

    def stop(self) -> None:
        if self.process.poll() is None:
            kill_group(self.process)
            self.process.wait()
            self._cancel_submitted()
        if self.result is None:
            self.watcher.__exit__(None, None, None)


def start_dag(root: Path, partition: str) -> SlurmDag:
    dag = SlurmDag(root, partition)
    _SESSION["dag"] = dag
    return dag


def started_dag() -> SlurmDag | None:
    """The session's DAG, if it was started (early or by test_slurm.py)."""
    return _SESSION.get("dag")


def start_dag_early(items, root_factory) -> SlurmDag | None:
    """Start the DAG now if a collected test uses ``slurm_run`` and a SLURM answers already
    (never starts SLURM itself: the ``slurm_cluster`` fixture does that, later, as before)."""
    if not any("slurm_run" in getattr(item, "fixturenames", ()) for item in items):
        return None
    if slurm_problem() is not None:
        return None
    return start_dag(root_factory(), default_partition())
