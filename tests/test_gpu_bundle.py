"""tools/gpu_pipeline.sh (the whole DAG on an offline GPU host, its results packed for the way
back) and tools/gpu_collect.sh (the DAG finished here from what came back), on the CPU.

The pipeline script runs with SKIP_WHEELS=1 (this Python's own packages) and
``--config device=cpu``, with ``import pulp`` failing in the run as on a host where it is not
carried (tools/gpu_wheels.sh). PACK_DIR must hold what would travel back: at most
PACK_MAX_FILES files, each under PACK_MAX_FILE_MIB, plain names, with the per-rule stage times.

The bundle and the collect tests start from a copy of the session's shared run of
tests/configs/tiny.yaml (tests/conftest_workflow.py) with the outputs the script has left to do
removed, so nothing is trained again; the budget and target tests run a one-dataset config from
scratch (a few stages, seconds).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest_workflow import REPO, TINY, TINY_CONFIG, copy_run, job_counts

SCRIPT = REPO / "tools" / "gpu_pipeline.sh"
MiB = 1024 * 1024
MAX_FILES, MAX_FILE_MIB = 8, 16  # the pack's limits, given to the script
DATASETS = list(TINY_CONFIG["datasets"])
FIRST = DATASETS[0]

#: a one-dataset config for the runs from scratch
SMALL = {
    "seeds": [0],
    "attentions": ["softmax", "sigmoid"],
    "device": "cuda",  # replaced by GPU_PIPELINE_EXTRA's --config device=cpu
    "datasets": {
        "blobs": {
            "source": "synthetic",
            "label_key": "cell_type",
            "batch_key": "batch",
            "synthetic": {"n_cells": 240, "n_genes": 80, "n_cell_types": 3, "n_batches": 2},
        }
    },
    "prepare": {"min_genes": 5, "min_cells": 1, "val_fraction": 0.15, "test_fraction": 0.3},
    "tokenize": {"max_len": 32},
    "model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32},
    "train": {"steps": 8, "batch_tokens": 320, "warmup_steps": 2, "eval_every": 4},
    "evaluate": {"n_neighbors": 10},
}


def run_pipeline(
    tmp: Path,
    budget_s: int = 600,
    workdir: Path | None = None,
    config: Path | None = None,
    **extra_env: str,
) -> tuple[subprocess.CompletedProcess, Path]:
    """tools/gpu_pipeline.sh in ``workdir`` (default: a new tmp/work) on ``config`` (default:
    SMALL written to tmp/small.yaml), its first dataset prioritised; returns the process and its
    output folder tmp/out."""
    if config is None:
        config = tmp / "small.yaml"
        config.write_text(yaml.safe_dump(SMALL))
    first = next(iter(yaml.safe_load(config.read_text())["datasets"]))
    # a pulp that cannot be imported, first on PYTHONPATH (the rules' jobs inherit it too)
    blocker = tmp / "no_pulp" / "pulp"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pulp is not carried')\n")
    out = tmp / "out"
    if workdir is None:
        workdir = tmp / "work"
        workdir.mkdir()
    env = {
        **os.environ,
        "PACK_DIR": str(out),
        "PACK_MAX_FILES": str(MAX_FILES),
        "PACK_MAX_FILE_MIB": str(MAX_FILE_MIB),
        "PYTHON": sys.executable,
        "SKIP_WHEELS": "1",
        "PYTHONPATH": str(blocker.parent),
        "GPU_PIPELINE_WORKDIR": str(workdir),
        "GPU_PIPELINE_CONFIGS": str(config),
        "GPU_PIPELINE_EXTRA": "--config device=cpu",
        "GPU_PIPELINE_PRIORITIZE": f"results/{first}/metrics.csv",
        "GPU_PIPELINE_CORES": "2",
        "GPU_PIPELINE_BUDGET_S": str(budget_s),
        **extra_env,
    }
    process = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=budget_s + 120
    )
    return process, out


def remove(workdir: Path, *patterns: str) -> None:
    for pattern in patterns:
        for path in workdir.glob(pattern):
            path.unlink()


#: what the bundle run is left to do on the copy: the cross-dataset tables and their figure
LEFT_TO_DO = ("results/tables/representation*", "results/figures/metrics.*", "results/report.html")


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_bundle")
    work = copy_run(tiny_run, tmp / "work")
    remove(work, *LEFT_TO_DO)
    process, out = run_pipeline(tmp, workdir=work, config=TINY)
    assert process.returncode == 0, (process.stdout + process.stderr)[-6000:]
    # every rule's jobs, as the shared run ran them (rule all has no benchmark: it runs nothing)
    jobs = {r: n for r, n in job_counts(tiny_run.log).items() if r not in ("all", "total")}
    return out, process.stdout, jobs


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def stage_rows(out: Path) -> dict[str, list[str]]:
    """stage_times.md: rule -> [jobs, total_s, median_s, max_s]."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in (out / "stage_times.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| rule", "| ---"))
    ]
    return {row[0]: row[1:] for row in rows}


@pytest.mark.slow
def test_the_bundle_run_did_what_was_left(bundle):
    """Snakemake ran in the script (greedy scheduler, pulp blocked): only the removed outputs'
    jobs, and snakemake's log is passed through."""
    _, stdout, _ = bundle
    counts = job_counts(stdout)
    assert counts == {"aggregate": 1, "all": 1, "figure_metrics": 1, "total": 3}, counts
    assert "Finished jobid" in stdout


@pytest.mark.slow
def test_the_pack_keeps_to_its_limits(bundle):
    out, _, _ = bundle
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {
        "run_info.txt",
        "stage_times.md",
        "tables_figures.tar.gz",
        "logs.tar.gz",
        "embeddings.tar.gz",
    } <= names, names
    assert len(files) <= MAX_FILES
    for p in files:
        assert p.parent == out  # flat: no folders
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name), p.name
        assert 0 < p.stat().st_size < MAX_FILE_MIB * MiB, (p.name, p.stat().st_size)
    assert sum(p.stat().st_size for p in files) < 64 * MiB


@pytest.mark.slow
def test_the_tarballs_hold_tables_figures_logs_and_embeddings(bundle):
    out, _, _ = bundle
    tables = members(out / "tables_figures.tar.gz")
    for path in (
        "results/tables/representation.csv",
        "results/tables/representation_summary.md",
        "results/figures/metrics.png",
        f"results/figures/umap_{FIRST}.png",
        f"results/figures/loss_{FIRST}.pdf",
        "results/report.html",
        f"results/{FIRST}/metrics.csv",
    ):
        assert path in tables, path
    logs = members(out / "logs.tar.gz")
    assert "results/stage_times.tsv" in logs
    assert f"results/logs/train/{FIRST}/sigmoid_seed0.log" in logs
    assert f"results/benchmarks/train/{FIRST}/softmax_seed0.tsv" in logs
    assert f"results/{FIRST}/train/sigmoid_seed0/history.csv" in logs
    embeddings = members(out / "embeddings.tar.gz")
    for dataset in DATASETS:
        for method in (
            "softmax_seed0",
            "sigmoid_seed1",
            "untrained_softmax",
            "untrained_sigmoid",
            "pca",
        ):
            assert f"results/{dataset}/embed/{method}.npz" in embeddings


@pytest.mark.slow
def test_stage_times_list_every_rule_with_its_jobs(bundle):
    out, _, jobs = bundle
    table = stage_rows(out)
    assert set(table) == set(jobs), table
    for rule, (n, total_s, median_s, max_s) in table.items():
        assert int(n) == jobs[rule], rule
        assert 0 < float(median_s) <= float(max_s) <= float(total_s), (rule, table[rule])


@pytest.mark.slow
def test_run_info_has_versions_and_the_exit_status(bundle):
    out, _, _ = bundle
    info = (out / "run_info.txt").read_text()
    assert "versions: torch " in info and "snakemake 9." in info
    assert "snakemake exit status: 0;" in info
    assert "--config device=cpu" in info


def test_a_run_stopped_at_its_budget_still_packs(tmp_path):
    """Stopped by the budget (exit 124), what exists is packed and the status says so; more
    files than PACK_MAX_FILES are packed all the same, with a warning."""
    process, out = run_pipeline(tmp_path, budget_s=6, PACK_MAX_FILES="1")
    assert process.returncode == 124, (process.stdout + process.stderr)[-4000:]
    info = (out / "run_info.txt").read_text()
    assert "snakemake exit status: 124 (stopped at the budget)" in info
    assert "results/logs/snakemake_run.log" in members(out / "logs.tar.gz")
    assert "more than PACK_MAX_FILES=1" in info


def test_targets_run_a_subset_of_the_dag(tmp_path):
    """GPU_PIPELINE_TARGETS: one call runs part of the DAG (e.g. three datasets of six)."""
    process, out = run_pipeline(
        tmp_path,
        budget_s=300,
        GPU_PIPELINE_TARGETS="results/blobs/embed/pca.npz",
        GPU_PIPELINE_PRIORITIZE="",  # --prioritize would pull its targets into the run
    )
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    info = (out / "run_info.txt").read_text()
    assert "targets: results/blobs/embed/pca.npz" in info
    assert set(stage_rows(out)) == {"download", "prepare", "pca"}


COLLECT = REPO / "tools" / "gpu_collect.sh"


def run_collect(workdir: Path, *bundles: Path, config: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "COLLECT_CONFIGS": str(config),
        "COLLECT_EXTRA": "--config device=cpu",
        "COLLECT_CORES": "2",
    }
    return subprocess.run(
        ["bash", str(COLLECT), str(workdir), *map(str, bundles)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_collect_finishes_the_dag_here_from_the_gpu_hosts_embeddings(tiny_run, tmp_path):
    """tools/gpu_collect.sh: a call that stopped at the embeddings (a DAG split over calls) is
    unpacked and finished here: evaluate, aggregate and figures run; nothing trains again.

    The host's call: the shared run with everything after the embeddings removed, packed by the
    pipeline script with those embeddings as targets (nothing left to run). The collect: one of
    its datasets (the config with the other dataset left out)."""
    last = DATASETS[-1]
    host = copy_run(tiny_run, tmp_path / "host")
    remove(host, "results/*/metrics.csv", "results/*/umap.csv", "results/tables/*",
           "results/figures/*", "results/report.html")  # fmt: skip
    embeddings = sorted(str(p.relative_to(host)) for p in host.glob(f"results/{last}/embed/*"))
    # trained (every seed and kind), untrained (every kind), PCA
    n_attentions = len(TINY_CONFIG["attentions"])
    assert len(embeddings) == (len(TINY_CONFIG["seeds"]) + 1) * n_attentions + 1, embeddings
    process, out = run_pipeline(
        tmp_path,
        workdir=host,
        config=TINY,
        GPU_PIPELINE_TARGETS=" ".join(embeddings),
        GPU_PIPELINE_PRIORITIZE="",
    )
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    assert "Nothing to be done" in process.stdout
    # the encoders' embeddings (trained and untrained) as the host computed them
    sent = {p: (host / p).read_bytes() for p in embeddings if not p.endswith("pca.npz")}

    config = dict(TINY_CONFIG)
    config["datasets"] = {last: TINY_CONFIG["datasets"][last]}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(config))
    work = tmp_path / "collected"
    done = run_collect(work, out, config=tmp_path / "one.yaml")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", log, re.M))
    assert jobs.get("evaluate") == "1" and jobs.get("aggregate") == "1", jobs
    assert not {"train", "tokenize", "embed", "embed_untrained"} & set(jobs), jobs
    for name in ("representation_summary.md", "representation.csv"):
        assert (work / "results" / "tables" / name).stat().st_size > 0
    assert (work / "results" / "figures" / f"umap_{last}.png").is_file()
    metrics = (work / "results" / last / "metrics.csv").read_text()
    assert "sigmoid" in metrics and "softmax" in metrics
    # the encoders' embeddings (trained and untrained) are the GPU host's, byte for byte
    assert all((work / p).read_bytes() == data for p, data in sent.items())
    assert not list(work.glob(".gpu_collect.*")), "the staging folder was left behind"


def test_collect_refuses_a_bad_bundle_and_writes_nothing(tmp_path):
    """No embeddings: a clear error. A truncated tarball: a clear error, WORKDIR untouched."""
    work, config = tmp_path / "work", tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    empty = tmp_path / "empty"
    empty.mkdir()
    process = run_collect(work, empty, config=config)
    assert process.returncode == 2 and "has no embeddings.tar.gz" in process.stderr

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    payload = tmp_path / "payload" / "results" / "blobs" / "embed"
    payload.mkdir(parents=True)
    (payload / "softmax_seed0.npz").write_bytes(os.urandom(200_000))  # incompressible
    with tarfile.open(bundle / "embeddings.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "payload" / "results", arcname="results")
    whole = (bundle / "embeddings.tar.gz").read_bytes()
    (bundle / "embeddings.tar.gz").write_bytes(whole[: len(whole) // 2])
    process = run_collect(work, bundle, config=config)
    assert process.returncode == 2, process.stdout + process.stderr
    assert "cannot unpack" in process.stderr and "embeddings.tar.gz" in process.stderr
    assert not (work / "results").exists()
    assert not list(work.glob(".gpu_collect.*"))
