"""The workflow as Snakemake runs it: lint, config schema, the whole DAG on a tiny config, reruns.

The end-to-end tests read the session's shared run of the real DAG (every stage, both attention
kinds, two seeds, two small synthetic datasets: tests/configs/tiny.yaml; the ``tiny_run``
fixture, tests/conftest_workflow.py) in a temporary folder, so nothing lands in the
repository's results/. The rerun tests work on a copy of it. Marked ``slow``: the shared run
takes a few minutes on 2 cores.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest_workflow import (
    REPO,
    TINY,
    TINY_CONFIG,
    copy_run,
    job_counts,
    job_messages,
    output_of,
    snakemake,
)

DATASETS = list(TINY_CONFIG["datasets"])
SEEDS = TINY_CONFIG["seeds"]
ATTENTIONS = TINY_CONFIG["attentions"]

#: metrics whose range is [0, 1] (scib-metrics rescales them); ARI may dip below 0 by chance
UNIT_INTERVAL = (
    "asw_label", "nmi_kmeans", "nmi_leiden", "clisi", "isolated_labels", "knn_accuracy"
)  # fmt: skip
#: silhouettes before rescaling, in [-1, 1]: the rescaled column is (raw + 1) / 2
RAW = {"asw_label_raw": "asw_label", "isolated_labels_raw": "isolated_labels"}
ARI = ("ari_kmeans", "ari_leiden")
BATCH_METRICS = ("asw_batch", "ilisi", "graph_connectivity")


# ---------------------------------------------------------------------------------------------
# static checks


def test_lint_is_clean(tmp_path):
    process = snakemake(tmp_path, "--lint", configfile=None)
    assert process.returncode == 0, output_of(process)
    assert "Lints for" not in output_of(process)


def test_embedded_default_dry_run_builds_every_job(tmp_path):
    """config.yaml (no --configfile): every stage for both datasets, 3 seeds, both attentions."""
    process = snakemake(tmp_path, "--dry-run", configfile=None)
    assert process.returncode == 0, output_of(process)
    counts = job_counts(output_of(process))
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    n_datasets = len(default["datasets"])
    n_runs = n_datasets * len(default["seeds"]) * len(default["attentions"])
    assert counts["train"] == n_runs and counts["embed"] == n_runs
    for rule in ("download", "prepare", "tokenize", "pca", "evaluate", "figure_umap"):
        assert counts[rule] == n_datasets, rule
    assert counts["aggregate"] == 1
    assert not (tmp_path / "results").exists()


def test_a_command_line_config_replaces_the_default(tmp_path):
    """--configfile tiny.yaml must not merge config.yaml's datasets into the run."""
    process = snakemake(tmp_path, "--dry-run")
    assert process.returncode == 0, output_of(process)
    text = output_of(process)
    assert "pbmc68k" not in text
    assert job_counts(text)["train"] == len(DATASETS) * len(SEEDS) * len(ATTENTIONS)


@pytest.mark.parametrize(
    ("edit", "bad_key"),
    [
        (lambda c: c["prepare"].update(min_gene=20), "prepare.min_gene"),
        (lambda c: c.update(sedes=[0]), "sedes"),
        (
            lambda c: c["datasets"]["blobs_a"].update(labelkey="cell_type"),
            "datasets.blobs_a.labelkey",
        ),
        (
            lambda c: c["datasets"]["blobs_b"]["synthetic"].update(n_cell=10),
            "datasets.blobs_b.synthetic.n_cell",
        ),
    ],
    ids=["section", "top-level", "dataset-entry", "synthetic"],
)
def test_unknown_config_key_fails_before_any_job_naming_it(tmp_path, edit, bad_key):
    config = yaml.safe_load(TINY.read_text())
    edit(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    process = snakemake(tmp_path, "--cores", "1", configfile=bad)
    assert process.returncode != 0
    text = output_of(process)
    assert f"invalid config: unknown key {bad_key} (known keys" in text, text[-3000:]
    assert not (tmp_path / "results").exists(), "a job ran despite the bad config"


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            lambda c: c["datasets"]["blobs_a"].update(source="ftp"),
            "datasets.blobs_a.source must be one of scanpy, synthetic, path, url; got 'ftp'",
        ),
        (
            lambda c: c["datasets"].update(
                atlas={"source": "url", "url": "https://example.org/a.h5ad", "label_key": "ct"}
            ),
            "datasets.atlas (source: url) needs `format` (one of h5ad, 10x_h5, 10x_mtx, hdf5, "
            "text, csv, tsv, txt), or `files`",
        ),
        (
            lambda c: c["train"].update(precision="fp16"),
            "train.precision must be one of fp32, bf16; got 'fp16'",
        ),
        (
            lambda c: c["model"].update(n_heads=3),
            "model.d_model (16) must be a multiple of model.n_heads (3)",
        ),
    ],
    ids=["enum", "url-without-format", "precision", "heads"],
)
def test_a_wrong_value_fails_before_any_job_in_plain_words(tmp_path, edit, words):
    config = yaml.safe_load(TINY.read_text())
    edit(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    process = snakemake(tmp_path, "--cores", "1", configfile=bad)
    assert process.returncode != 0
    text = output_of(process)
    assert words in text, text[-3000:]
    assert "jsonschema" not in text and "Failed validating" not in text
    assert not (tmp_path / "results").exists(), "a job ran despite the bad config"


def test_a_dataset_without_its_label_column_fails_before_training(tmp_path):
    """A path dataset whose obs lacks label_key: the download job fails naming both, nothing else
    runs, and no raw.h5ad is left behind."""
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    cells = anndata.AnnData(
        X=sp.csr_matrix(rng.poisson(1.0, size=(60, 40)).astype(np.float32)),
        obs=pd.DataFrame({"celltype": ["a", "b", "c"] * 20}, index=[f"c{i}" for i in range(60)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(40)]),
    )
    cells.write_h5ad(tmp_path / "cells.h5ad")
    config = {
        "seeds": [0],
        "datasets": {"mylab": {"source": "path", "path": "cells.h5ad", "label_key": "cell_type"}},
    }
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    process = snakemake(tmp_path, "--cores", "1", configfile=configfile)
    assert process.returncode != 0
    log = (tmp_path / "results/logs/download/mylab.log").read_text()
    assert "dataset 'mylab'" in log and "label_key 'cell_type'" in log, log
    assert not (tmp_path / "results/mylab/raw.h5ad").exists()
    assert not (tmp_path / "results/mylab/train").exists()
    assert "Job" in output_of(process) and "train mylab" not in output_of(process)


# ---------------------------------------------------------------------------------------------
# the whole DAG, for real


@pytest.mark.slow
def test_every_job_ran_once(tiny_run):
    text = tiny_run.log
    counts = job_counts(text)
    n_runs = len(DATASETS) * len(SEEDS) * len(ATTENTIONS)
    assert counts["train"] == n_runs
    assert counts["embed"] == n_runs
    assert counts["embed_untrained"] == len(DATASETS) * len(ATTENTIONS)
    assert counts["evaluate"] == len(DATASETS)  # all embeddings of a dataset in one job
    assert "steps (100%) done" in text


@pytest.mark.slow
def test_representation_table_has_every_dataset_method_seed(tiny_run):
    workdir = tiny_run.workdir
    table = pd.read_csv(workdir / "results/tables/representation.csv")
    # mean pooling and (cls_token: true) CLS pooling of every run; both untrained encoders; PCA
    expected = {
        (d, m, s) for d in DATASETS for a in ATTENTIONS for s in SEEDS for m in (a, f"{a}_cls")
    }
    expected |= {(d, f"untrained_{a}", 0) for d in DATASETS for a in ATTENTIONS}
    expected |= {(d, "pca", -1) for d in DATASETS}
    assert set(zip(table["dataset"], table["method"], table["seed"])) == expected
    assert len(table) == len(expected)
    for metric in UNIT_INTERVAL:
        values = table[metric]
        assert values.notna().all(), metric
        assert ((values >= 0) & (values <= 1)).all(), (metric, values.tolist())
    for raw, rescaled in RAW.items():
        assert ((table[raw] >= -1) & (table[raw] <= 1)).all(), raw
        np.testing.assert_allclose(table[rescaled], (table[raw] + 1) / 2, rtol=1e-6)
    # the training facts: every trained run did its steps; untrained 0; PCA none
    trained = table["method"].isin(ATTENTIONS + [f"{a}_cls" for a in ATTENTIONS])
    assert (table.loc[trained, "steps"] == TINY_CONFIG["train"]["steps"]).all()
    assert (table.loc[table["method"].str.startswith("untrained_"), "steps"] == 0).all()
    assert (table.loc[table["method"] == "pca", "steps"] == -1).all()
    # a CLS row shares its run's validation loss, not its embedding
    cls_rows = table[table["method"].str.endswith("_cls")].assign(
        method=lambda t: t["method"].str.removesuffix("_cls")
    )
    joined = cls_rows.merge(table, on=["dataset", "method", "seed"], suffixes=("_cls", ""))
    assert len(joined) == len(cls_rows)
    assert (joined["val_loss_cls"] == joined["val_loss"]).all()
    assert (joined["asw_label_cls"] != joined["asw_label"]).any()
    for metric in ARI:
        assert ((table[metric] >= -1) & (table[metric] <= 1)).all(), metric
    models = table[table["method"] != "pca"]
    assert (models["val_loss"] > 0).all() and np.isfinite(models["val_loss"]).all()
    assert table.loc[table["method"] == "pca", "val_loss"].isna().all()
    assert (table["n_cells"] > 0).all()
    # batch metrics only where the dataset has a batch_key
    with_batch = [d for d in DATASETS if TINY_CONFIG["datasets"][d].get("batch_key")]
    for metric in BATCH_METRICS:
        assert metric in table.columns
        rows = table[table["dataset"].isin(with_batch)]
        assert ((rows[metric] >= 0) & (rows[metric] <= 1)).all(), metric
    # every embedding of a dataset scores the same test cells
    assert table.groupby("dataset")["n_cells"].nunique().eq(1).all()


@pytest.mark.slow
def test_summary_rows_and_relative_change_match_the_table(tiny_run):
    workdir = tiny_run.workdir
    table = pd.read_csv(workdir / "results/tables/representation.csv")
    summary = pd.read_csv(workdir / "results/tables/representation_summary.csv")
    assert set(summary["dataset"]) == set(DATASETS) | {"overall"}
    assert summary.iloc[0]["metric"] == "asw_label" and summary.iloc[0]["primary"]
    for metric, poolings in (("asw_label", 2), ("knn_accuracy", 2), ("val_loss", 1)):
        rows = summary[summary["metric"] == metric]
        assert len(rows) == poolings * (len(DATASETS) + 1), metric
    for r in summary[summary["metric"] == "asw_label"].itertuples():
        chosen = table if r.dataset == "overall" else table[table["dataset"] == r.dataset]
        suffix = "" if r.pooling == "mean" else f"_{r.pooling}"
        soft = chosen.loc[chosen["method"] == f"softmax{suffix}", "asw_label"]
        sig = chosen.loc[chosen["method"] == f"sigmoid{suffix}", "asw_label"]
        assert r.softmax_mean == pytest.approx(soft.mean())
        assert r.sigmoid_mean == pytest.approx(sig.mean())
        assert r.softmax_sd == pytest.approx(soft.std(ddof=1))
        assert r.relative_change == pytest.approx(
            (r.sigmoid_mean - r.softmax_mean) / abs(r.softmax_mean)
        )
        if r.dataset != "overall":  # equal seeds: the mean paired difference
            assert r.difference == pytest.approx(sig.mean() - soft.mean())
        assert r.ci_low <= r.difference <= r.ci_high
        assert r.n_pairs == len(SEEDS) * (len(DATASETS) if r.dataset == "overall" else 1)
        assert r.paper_relative_change == pytest.approx(0.25)
        for baseline in ("pca", "untrained_softmax", "untrained_sigmoid"):
            values = chosen.loc[chosen["method"] == baseline]
            per_dataset = values.groupby("dataset")["asw_label"].mean()
            assert getattr(r, baseline) == pytest.approx(per_dataset.mean()), baseline
    training = pd.read_csv(workdir / "results/tables/representation_training.csv")
    assert len(training) == len(DATASETS) * len(ATTENTIONS)
    assert (training["steps_mean"] == TINY_CONFIG["train"]["steps"]).all()
    assert set(training["plateau"]) <= {"yes", "no", "not recorded"}
    markdown = (workdir / "results/tables/representation_summary.md").read_text()
    assert markdown.splitlines()[2].startswith("**Primary metric: `asw_label`**")
    assert "+25%" in markdown and "| overall |" in markdown and "## Training" in markdown
    assert "- overall (cls pooling): asw_label sigmoid - softmax = " in markdown
    tex = (workdir / "results/tables/representation_summary.tex").read_text()
    assert "\\begin{tabular}" in tex and "overall" in tex


@pytest.mark.slow
def test_figures_and_report_exist(tiny_run):
    workdir = tiny_run.workdir
    figures = workdir / "results/figures"
    names = ["metrics"] + [f"{kind}_{d}" for kind in ("umap", "loss") for d in DATASETS]
    for name in names:
        png = figures / f"{name}.png"
        pdf = figures / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert png.stat().st_size > 10_000, png
        assert pdf.read_bytes()[:5] == b"%PDF-", pdf
    report = (workdir / "results/report.html").read_text(errors="replace")
    assert len(report) > 50_000
    for name in (
        "umap_blobs_a.png",
        "loss_blobs_b.png",
        "representation_summary.csv",
        "representation_training.csv",
    ):
        assert name in report, name


@pytest.mark.slow
def test_complete_run_has_nothing_left_to_do(tiny_run):
    workdir = tiny_run.workdir
    process = snakemake(workdir, "--dry-run")
    assert process.returncode == 0, output_of(process)
    assert "Nothing to be done" in output_of(process)


# ---------------------------------------------------------------------------------------------
# rerunning one dataset's branch


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the finished run (results and Snakemake's metadata, times kept)."""
    return copy_run(tiny_run, tmp_path / "run")


def branch_files(workdir: Path, dataset: str) -> dict[str, float]:
    root = workdir / "results" / dataset
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_forced_branch_target_schedules_only_that_dataset(run_copy):
    """The documented `make branch` command: --forcerun prepare of one dataset, its metrics."""
    chosen, other = DATASETS
    process = snakemake(
        run_copy,
        "--dry-run",
        "--forcerun",
        f"results/{chosen}/prepared.h5ad",
        "--",
        f"results/{chosen}/metrics.csv",
    )
    assert process.returncode == 0, output_of(process)
    text = output_of(process)
    counts = job_counts(text)
    runs = len(SEEDS) * len(ATTENTIONS)
    assert counts == {
        "prepare": 1,
        "tokenize": 1,
        "pca": 1,
        "train": runs,
        "embed": runs,
        "embed_untrained": len(ATTENTIONS),
        "evaluate": 1,
        "total": 4 + 2 * runs + len(ATTENTIONS),
    }, counts
    messages = job_messages(text)
    assert len(messages) == counts["total"]
    assert all(chosen in m and other not in m for m in messages), messages


@pytest.mark.slow
def test_editing_one_dataset_entry_reruns_only_its_branch(run_copy, tmp_path):
    """Change one dataset's config entry: its branch and the aggregates rerun, nothing else.
    The smaller dataset is edited (no batch key: its branch reruns faster)."""
    other, chosen = DATASETS
    config = yaml.safe_load(TINY.read_text())
    config["datasets"][chosen]["synthetic"]["n_cells"] += 20
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    untouched = branch_files(run_copy, other)
    before = branch_files(run_copy, chosen)
    table = pd.read_csv(run_copy / "results/tables/representation.csv")
    cells_before = table.groupby("dataset")["n_cells"].first()

    dry = snakemake(run_copy, "--dry-run", configfile=edited)
    assert dry.returncode == 0, output_of(dry)
    messages = job_messages(output_of(dry))
    assert f"download {chosen}" in messages, messages
    assert not [m for m in messages if other in m], messages

    process = snakemake(run_copy, "--cores", "2", configfile=edited)
    assert process.returncode == 0, output_of(process)[-6000:]
    text = output_of(process)
    runs = len(SEEDS) * len(ATTENTIONS)
    counts = job_counts(text)
    assert counts["download"] == 1 and counts["train"] == runs and counts["evaluate"] == 1
    assert counts["aggregate"] == 1 and counts["figure_umap"] == 1, counts
    assert not [m for m in job_messages(text) if other in m]
    assert branch_files(run_copy, other) == untouched, "the other dataset's branch was rewritten"
    after = branch_files(run_copy, chosen)
    assert after["raw.h5ad"] > before["raw.h5ad"] and after["metrics.csv"] > before["metrics.csv"]
    table = pd.read_csv(run_copy / "results/tables/representation.csv")
    assert set(table["dataset"]) == set(DATASETS)
    n_cells = table.groupby("dataset")["n_cells"].first()
    # the edited dataset has more cells, hence more test cells; the other one is as it was
    assert n_cells[chosen] > cells_before[chosen]
    assert n_cells[other] == cells_before[other]


@pytest.mark.parametrize(
    "args, launcher",
    [
        ((), "python"),  # device cpu: no GPU asked for
        (("--config", "device=cuda"), "python"),
        (
            ("--config", "device=cuda", "train_gpus=2"),
            "python -m torch.distributed.run --standalone --nproc_per_node 2",
        ),
        (  # a profile's or the command line's override of the rule's resources
            ("--config", "device=cuda", "--set-resources", "train:gpu=3"),
            "python -m torch.distributed.run --standalone --nproc_per_node 3",
        ),
    ],
)
def test_train_jobs_launch_one_process_per_gpu(tmp_path, args, launcher):
    """Every train job's command starts with what its resources.gpu asks for: one process,
    or torchrun with one DDP process per GPU (the shell decides; this runs that part)."""
    process = snakemake(tmp_path, "--dry-run", "--printshellcmds", *args)
    assert process.returncode == 0, output_of(process)
    commands = re.findall(
        r"^Shell command: .*? (\$\(.*?\)) -m sigmoid_sc\.cli train ", process.stdout, re.M
    )
    assert len(commands) == len(DATASETS) * len(SEEDS) * len(ATTENTIONS), process.stdout[-3000:]
    for command in set(commands):
        words = subprocess.run(["bash", "-c", f"echo {command}"], capture_output=True, text=True)
        assert words.stdout.strip() == launcher, command
