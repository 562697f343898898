"""Both protocols through Snakemake on a tiny config (tests/configs/tiny_pretrain.yaml): the
whole DAG once, then dry runs of reruns: one zero-shot dataset's branch, an edited entry, a
changed match-rate floor, and the GPU part of the protocol from the tokens alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest_workflow import job_counts, job_messages, output_of, snakemake

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "tiny_pretrain.yaml"
TINY = yaml.safe_load(CONFIG.read_text())
RUNS = len(TINY["seeds"]) * len(TINY["attentions"])
UNITS = {
    "blobs_a": "corpus",
    "blobs_b": "corpus",
    "blobs_a_b1": "zero_shot",
    "blobs_c": "zero_shot",
}
PRETRAINING = {"pretrain_vocabulary", "pretrain_corpus", "pretrain_train"}
KINDS = len(TINY["attentions"])


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain_run")
    # twice tiny.yaml's jobs: a longer limit than the helper's default
    process = snakemake(workdir, "--cores", "2", configfile=CONFIG, timeout=3600)
    assert process.returncode == 0, output_of(process)[-6000:]
    return workdir, output_of(process)


@pytest.fixture
def run_copy(pretrain_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(pretrain_run[0], copy, symlinks=True)
    return copy


@pytest.mark.slow
def test_both_protocols_ran(pretrain_run):
    _, text = pretrain_run
    counts = job_counts(text)
    assert counts["train"] == len(TINY["datasets"]) * RUNS  # per dataset
    assert counts["pretrain_train"] == RUNS  # one per kind and seed, on the corpus
    assert counts["pretrain_vocabulary"] == counts["pretrain_corpus"] == 1
    assert counts["pretrain_tokenize"] == counts["pretrain_evaluate"] == len(UNITS)
    assert counts["pretrain_embed"] == len(UNITS) * RUNS
    assert counts["pretrain_embed_untrained"] == len(UNITS) * KINDS  # the baselines
    assert counts["pretrain_holdout"] == 2  # blobs_a's two sides
    assert counts["pretrain_pca"] == 2  # the sides' own PCA; whole datasets reuse theirs
    assert counts["protocols"] == 1 and counts["pretrain_aggregate"] == 2


@pytest.mark.slow
def test_the_corpus_holds_only_corpus_training_and_validation_cells(pretrain_run):
    import anndata as ad

    workdir, _ = pretrain_run
    corpus = np.load(workdir / "results/pretrain/corpus/tokens.npz")
    assert set(corpus["dataset"]) == {"blobs_a", "blobs_b"}
    assert set(corpus["split"]) == {"train", "val"}
    cap = TINY["pretrain"]["max_cells_per_dataset"]
    for name in ("blobs_a", "blobs_b"):
        assert ((corpus["dataset"] == name) & (corpus["split"] == "train")).sum() <= cap
    prepared = ad.read_h5ad(workdir / "results/blobs_a/prepared.h5ad", backed="r")
    obs = prepared.obs
    alpha = corpus["source_obs_names"][corpus["dataset"] == "blobs_a"]
    assert (obs.loc[alpha, "batch"].astype(str) == "batch_0").all()
    assert (obs.loc[alpha, "split"].astype(str) != "test").all()
    prepared.file.close()
    # every dataset's tokens carry the corpus vocabulary
    for unit in UNITS:
        tokens = np.load(workdir / f"results/pretrain/{unit}/tokens.npz")
        assert str(tokens["vocab_id"]) == str(corpus["vocab_id"]), unit
        assert np.array_equal(tokens["gene_names"], corpus["gene_names"]), unit


@pytest.mark.slow
def test_side_by_side_tables(pretrain_run):
    workdir, _ = pretrain_run
    tables = workdir / "results/tables"
    summary = pd.read_csv(tables / "representation_protocols_summary.csv")
    groups = set(zip(summary["protocol"], summary["role"]))
    assert groups == {("per_dataset", "own"), ("pretrain", "corpus"), ("pretrain", "zero_shot")}
    own = pd.read_csv(tables / "representation_summary.csv")
    assert set(own.columns) <= set(summary.columns)  # the same statistics, whatever they are
    pretrain = summary[summary["protocol"] == "pretrain"]
    for unit, role in UNITS.items():
        rows = pretrain[pretrain["dataset"] == unit]
        assert (rows["role"] == role).all() and len(rows), unit
        metrics = pd.read_csv(workdir / f"results/pretrain/{unit}/metrics.csv")
        # every method of the per-dataset protocol: both poolings, the untrained baselines, PCA
        assert set(metrics["method"]) == {
            "softmax", "sigmoid", "softmax_cls", "sigmoid_cls",
            "untrained_softmax", "untrained_sigmoid", "pca",
        }, unit  # fmt: skip
        assert set(rows["pooling"]) == {"mean", "cls"}, unit
        asw = rows[(rows["metric"] == "asw_label") & (rows["pooling"] == "mean")].iloc[0]
        soft = metrics.loc[metrics["method"] == "softmax", "asw_label"]
        assert asw["softmax_mean"] == pytest.approx(soft.mean())
        assert asw["n_pairs"] == len(TINY["seeds"])
        for baseline in ("pca", "untrained_sigmoid"):
            value = metrics.loc[metrics["method"] == baseline, "asw_label"].iloc[0]
            assert asw[baseline] == pytest.approx(value), (unit, baseline)
        assert asw["source"] == ("blobs_a" if unit == "blobs_a_b1" else unit)
        # the pretrained models' facts travel with their embeddings: one run per kind and seed
        trained = metrics[metrics["method"].isin(TINY["attentions"])]
        assert set(trained["stop_reason"]) <= {"plateau", "max_steps"}, unit
        assert (trained["steps"] <= TINY["train"]["steps"]).all(), unit
    table = pd.read_csv(tables / "representation_protocols.csv")
    assert set(table["protocol"]) == {"per_dataset", "pretrain"}
    markdown = (tables / "representation_protocols_summary.md").read_text()
    assert "## asw_label (primary metric), side by side" in markdown
    assert "| blobs_a | blobs_a_b1 | pretrain | zero_shot | mean |" in markdown
    training = pd.read_csv(
        workdir / "results/pretrain/tables/zero_shot/representation_training.csv"
    )
    assert set(training["dataset"]) == {"blobs_a_b1", "blobs_c"}
    match = pd.read_csv(workdir / "results/pretrain/tables/match_rates.csv")
    assert dict(zip(match["dataset"], match["role"])) == UNITS
    assert match["token_match_rate"].between(TINY["pretrain"]["min_match_rate"], 1).all()


def dry_run_jobs(workdir, *args, configfile=CONFIG):
    process = snakemake(workdir, "--dry-run", *args, configfile=configfile)
    assert process.returncode == 0, output_of(process)
    text = output_of(process)
    return job_counts(text) if "Job stats:" in text else {}, job_messages(text)


@pytest.mark.slow
def test_rerunning_one_zero_shot_branch_reruns_no_pretraining(run_copy):
    counts, messages = dry_run_jobs(
        run_copy,
        "--forcerun",
        "results/blobs_c/prepared.h5ad",
        "--",
        "results/pretrain/blobs_c/metrics.csv",
    )
    assert not PRETRAINING & set(counts), counts
    assert counts["pretrain_embed"] == RUNS and counts["pretrain_evaluate"] == 1, counts
    assert counts["pretrain_embed_untrained"] == KINDS, counts
    assert all("blobs_c" in m for m in messages), messages
    # a holdout's zero-shot side: its own branch only
    counts, messages = dry_run_jobs(
        run_copy, "--forcerun", "results/pretrain/blobs_a_b1/selected.h5ad", "--",
        "results/pretrain/blobs_a_b1/metrics.csv",
    )  # fmt: skip
    assert not PRETRAINING & set(counts), counts
    assert counts["pretrain_embed"] == RUNS and "prepare" not in counts, counts
    assert all("blobs_a_b1" in m for m in messages), messages
    # the whole run with that branch forced: its jobs, the tables, no pretraining
    counts, messages = dry_run_jobs(run_copy, "--forcerun", "results/blobs_c/prepared.h5ad")
    assert not PRETRAINING & set(counts), counts
    others = [m for m in messages if "blobs_c" not in m]
    tables = ("aggregate", "protocols", "figure: metrics", "pretraining protocol: match rates")
    assert others and all(m.startswith(tables) for m in others), others


@pytest.mark.slow
def test_editing_a_zero_shot_dataset_or_the_floor_reruns_no_pretraining(run_copy, tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config["datasets"]["blobs_c"]["synthetic"]["n_cells"] += 20
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    counts, messages = dry_run_jobs(run_copy, configfile=edited)
    assert counts["download"] == 1 and not PRETRAINING & set(counts), counts
    assert "download blobs_c" in messages

    config = yaml.safe_load(CONFIG.read_text())
    config["pretrain"]["min_match_rate"] = 0.3
    floor = tmp_path / "floor.yaml"
    floor.write_text(yaml.safe_dump(config))
    counts, messages = dry_run_jobs(run_copy, configfile=floor)
    assert counts["pretrain_tokenize"] == 2 and not PRETRAINING & set(counts), counts
    assert {m.split()[1] for m in messages if m.startswith("tokenize")} == {"blobs_a_b1", "blobs_c"}


@pytest.mark.slow
def test_changing_a_role_reruns_only_the_tables_that_list_the_units(run_copy, tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config["datasets"]["blobs_c"]["role"] = "none"
    edited = tmp_path / "role.yaml"
    edited.write_text(yaml.safe_dump(config))
    counts, _ = dry_run_jobs(run_copy, configfile=edited)
    tables = {"pretrain_aggregate", "pretrain_match_rates", "protocols", "pretrain_figure_metrics"}
    assert set(counts) - {"all", "total"} <= tables, counts  # no per-dataset job, no pretraining


@pytest.mark.slow
def test_the_gpu_part_runs_from_the_tokens_alone(pretrain_run, tmp_path):
    """Carry the tokens, the vocabulary and the corpus' cells to an empty folder: training and
    embedding need nothing else (no raw data, no prepared data)."""
    workdir, _ = pretrain_run
    carried = [
        Path("results/pretrain/corpus/vocabulary.npz"),
        Path("results/pretrain/corpus/cells.csv"),
    ]
    carried += [Path(f"results/pretrain/{unit}/tokens.npz") for unit in UNITS]
    for path in carried:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(workdir / path, tmp_path / path)
    allowed = ["pretrain_corpus", "pretrain_train", "pretrain_embed", "pretrain_embed_untrained"]
    counts, _ = dry_run_jobs(
        tmp_path, "--allowed-rules", *allowed, "pretrain_models", "--", "pretrain_models"
    )
    assert counts == {
        "pretrain_corpus": 1,
        "pretrain_train": RUNS,
        "pretrain_embed": RUNS * len(UNITS),
        "pretrain_embed_untrained": KINDS * len(UNITS),
        "pretrain_models": 1,
        "total": 2 + RUNS * (1 + len(UNITS)) + KINDS * len(UNITS),
    }, counts


# ---------------------------------------------------------------------------------------------
# dry runs: which protocol runs what, and errors before any job


def test_each_protocol_alone(tmp_path):
    per_dataset, _ = dry_run_jobs(tmp_path, "--config", "protocol=per_dataset")
    assert not [rule for rule in per_dataset if rule.startswith("pretrain") or rule == "protocols"]
    assert per_dataset["train"] == len(TINY["datasets"]) * RUNS
    pretrain, _ = dry_run_jobs(tmp_path, "--config", "protocol=pretrain")
    assert "train" not in pretrain and "embed" not in pretrain and "aggregate" not in pretrain
    assert pretrain["pretrain_train"] == RUNS and pretrain["protocols"] == 1
    # PCA of a whole dataset is the per-dataset protocol's file, made once for both
    assert pretrain["pca"] == 2 and pretrain["pretrain_pca"] == 2  # blobs_b, blobs_c; a's sides
    assert not (tmp_path / "results").exists()


def test_a_bad_holdout_fails_before_any_job(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config["datasets"]["blobs_a"]["holdout"]["name"] = "blobs_b"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    process = snakemake(tmp_path, "--dry-run", configfile=bad)
    assert process.returncode != 0
    assert "datasets.blobs_a.holdout.name: 'blobs_b' names another dataset" in output_of(process)
    assert not (tmp_path / "results").exists()
