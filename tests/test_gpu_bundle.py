"""tools/gpu_pipeline.sh, the whole DAG on an offline GPU host, run here on the CPU.

The same script, with SKIP_WHEELS=1 (this Python's own packages), a tiny synthetic config and
``--config device=cpu``, in a temporary working directory: the whole DAG runs, and PACK_DIR
holds what would travel back (at most PACK_MAX_FILES files, each under PACK_MAX_FILE_MIB, plain
names) with the per-rule stage times. ``import pulp`` fails in the run, as on a host where it is
not carried (tools/gpu_wheels.sh). About a minute and a half on 2 cores.
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

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_pipeline.sh"
MiB = 1024 * 1024
MAX_FILES, MAX_FILE_MIB = 8, 16  # the pack's limits, given to the script

TINY = {
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
#: rule -> jobs of the tiny DAG (rule all has no benchmark: it runs nothing)
JOBS = {
    "download": 1,
    "prepare": 1,
    "tokenize": 1,
    "train": 2,
    "embed": 2,
    "embed_untrained": 2,
    "pca": 1,
    "evaluate": 1,
    "aggregate": 1,
    "figure_metrics": 1,
    "figure_umap": 1,
    "figure_loss": 1,
}


def run_pipeline(
    tmp: Path, budget_s: int = 600, **extra_env: str
) -> tuple[subprocess.CompletedProcess, Path]:
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    # a pulp that cannot be imported, first on PYTHONPATH (the rules' jobs inherit it too)
    blocker = tmp / "no_pulp" / "pulp"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pulp is not carried')\n")
    out, workdir = tmp / "out", tmp / "work"
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
        "GPU_PIPELINE_PRIORITIZE": "results/blobs/metrics.csv",
        "GPU_PIPELINE_CORES": "2",
        "GPU_PIPELINE_BUDGET_S": str(budget_s),
        **extra_env,
    }
    process = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=budget_s + 120
    )
    return process, out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    process, out = run_pipeline(tmp_path_factory.mktemp("gpu_bundle"))
    assert process.returncode == 0, (process.stdout + process.stderr)[-6000:]
    return out, process.stdout


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


@pytest.mark.slow
def test_the_pack_keeps_to_its_limits(bundle):
    out, _ = bundle
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
    out, _ = bundle
    tables = members(out / "tables_figures.tar.gz")
    for path in (
        "results/tables/representation.csv",
        "results/tables/representation_summary.md",
        "results/figures/metrics.png",
        "results/figures/umap_blobs.png",
        "results/figures/loss_blobs.pdf",
        "results/report.html",
        "results/blobs/metrics.csv",
    ):
        assert path in tables, path
    logs = members(out / "logs.tar.gz")
    assert "results/stage_times.tsv" in logs
    assert "results/logs/train/blobs/sigmoid_seed0.log" in logs
    assert "results/benchmarks/train/blobs/softmax_seed0.tsv" in logs
    assert "results/blobs/train/sigmoid_seed0/history.csv" in logs
    embeddings = members(out / "embeddings.tar.gz")
    for method in (
        "softmax_seed0",
        "sigmoid_seed0",
        "untrained_softmax",
        "untrained_sigmoid",
        "pca",
    ):
        assert f"results/blobs/embed/{method}.npz" in embeddings


@pytest.mark.slow
def test_stage_times_list_every_rule_with_its_jobs(bundle):
    out, _ = bundle
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in (out / "stage_times.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| rule", "| ---"))
    ]
    table = {row[0]: row[1:] for row in rows}
    assert set(table) == set(JOBS), table
    for rule, (jobs, total_s, median_s, max_s) in table.items():
        assert int(jobs) == JOBS[rule], rule
        assert 0 < float(median_s) <= float(max_s) <= float(total_s), (rule, table[rule])


@pytest.mark.slow
def test_run_info_has_versions_and_the_exit_status(bundle):
    out, stdout = bundle
    info = (out / "run_info.txt").read_text()
    assert "versions: torch " in info and "snakemake 9." in info
    assert "snakemake exit status: 0;" in info
    assert "--config device=cpu" in info
    assert "Finished jobid" in stdout  # snakemake's log is passed through


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
    rules = {
        line.strip("|").split("|")[0].strip()
        for line in (out / "stage_times.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| rule", "| ---"))
    }
    assert rules == {"download", "prepare", "pca"}, rules


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


def test_collect_finishes_the_dag_here_from_the_gpu_hosts_embeddings(tmp_path):
    """tools/gpu_collect.sh: a call that stopped at the embeddings (a DAG split over calls) is
    unpacked and finished here: evaluate, aggregate and figures run; nothing trains again."""
    embeddings = " ".join(
        f"results/blobs/embed/{name}.npz"
        for name in ("softmax_seed0", "sigmoid_seed0", "untrained_softmax", "untrained_sigmoid")
    )
    process, out = run_pipeline(
        tmp_path,
        budget_s=400,
        GPU_PIPELINE_TARGETS=f"{embeddings} results/blobs/embed/pca.npz",
        GPU_PIPELINE_PRIORITIZE="",
    )
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    assert not (tmp_path / "work" / "results" / "blobs" / "metrics.csv").exists()
    sent = {p: (tmp_path / "work" / p).read_bytes() for p in embeddings.split()}

    work = tmp_path / "collected"
    done = run_collect(work, out, config=tmp_path / "tiny.yaml")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", log, re.M))
    assert jobs.get("evaluate") == "1" and jobs.get("aggregate") == "1", jobs
    assert not {"train", "tokenize", "embed", "embed_untrained"} & set(jobs), jobs
    for name in ("representation_summary.md", "representation.csv"):
        assert (work / "results" / "tables" / name).stat().st_size > 0
    assert (work / "results" / "figures" / "umap_blobs.png").is_file()
    metrics = (work / "results" / "blobs" / "metrics.csv").read_text()
    assert "sigmoid" in metrics and "softmax" in metrics
    # the encoders' embeddings (trained and untrained) are the GPU host's, byte for byte
    assert all((work / p).read_bytes() == data for p, data in sent.items())
    assert not list(work.glob(".gpu_collect.*")), "the staging folder was left behind"


def test_collect_refuses_a_bad_bundle_and_writes_nothing(tmp_path):
    """No embeddings: a clear error. A truncated tarball: a clear error, WORKDIR untouched."""
    work, config = tmp_path / "work", tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
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
