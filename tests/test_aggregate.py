"""aggregate.py: the representation table and the sigmoid-vs-softmax summary, on hand-made metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sigmoid_sc import aggregate, config
from sigmoid_sc.errors import ConfigError, DataError


def A(**params) -> config.Aggregate:
    """The aggregate section with ``params`` over the schema's defaults."""
    return config.section("aggregate", params)


# asw_label per seed, chosen by hand: dataset "a" gains, dataset "b" loses a little
ASW = {
    ("a", "softmax"): [0.40, 0.42, 0.38],
    ("a", "sigmoid"): [0.50, 0.55, 0.47],
    ("b", "softmax"): [0.60, 0.62, 0.61],
    ("b", "sigmoid"): [0.59, 0.60, 0.62],
}
VAL_LOSS = {
    ("a", "softmax"): [3.0, 3.1, 2.9],
    ("a", "sigmoid"): [2.8, 2.9, 2.85],
    ("b", "softmax"): [2.0, 2.1, 2.05],
    ("b", "sigmoid"): [1.9, 2.0, 2.0],
}
PCA_ASW = {"a": 0.30, "b": 0.50}


def metrics_frame(dataset: str) -> pd.DataFrame:
    rows = []
    for method in ("sigmoid", "softmax"):  # deliberately not in output order
        for seed in (2, 0, 1):
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "seed": seed,
                    "val_loss": VAL_LOSS[(dataset, method)][seed],
                    "n_cells": 100,
                    "asw_label": ASW[(dataset, method)][seed],
                }
            )
    rows.append(
        {
            "dataset": dataset,
            "method": "pca",
            "seed": -1,
            "val_loss": math.nan,
            "n_cells": 100,
            "asw_label": PCA_ASW[dataset],
        }
    )
    return pd.DataFrame(rows)


@pytest.fixture
def metric_files(tmp_path):
    paths = []
    for dataset in ("a", "b"):
        path = tmp_path / f"{dataset}.csv"
        metrics_frame(dataset).to_csv(path, index=False)
        paths.append(str(path))
    return paths


def row(summary: pd.DataFrame, dataset: str, metric: str) -> pd.Series:
    rows = summary[(summary["dataset"] == dataset) & (summary["metric"] == metric)]
    assert len(rows) == 1, (dataset, metric)
    return rows.iloc[0]


def test_table_has_a_row_per_dataset_method_seed_in_order(metric_files):
    table = aggregate.load_metrics(metric_files)
    assert len(table) == 2 * (2 * 3 + 1)
    first = table[table["dataset"] == "a"]
    assert list(first["method"]) == ["softmax"] * 3 + ["sigmoid"] * 3 + ["pca"]
    assert list(first["seed"]) == [0, 1, 2, 0, 1, 2, -1]
    assert list(table["dataset"].unique()) == ["a", "b"]


def test_means_sd_relative_change_and_paired_t_test_per_dataset(metric_files):
    summary = aggregate.summarise(aggregate.load_metrics(metric_files), A())
    for dataset in ("a", "b"):
        soft = np.array(ASW[(dataset, "softmax")])
        sig = np.array(ASW[(dataset, "sigmoid")])
        r = row(summary, dataset, "asw_label")
        assert r["n_pairs"] == 3
        assert r["softmax_mean"] == pytest.approx(soft.mean())
        assert r["sigmoid_mean"] == pytest.approx(sig.mean())
        assert r["softmax_sd"] == pytest.approx(soft.std(ddof=1))
        assert r["sigmoid_sd"] == pytest.approx(sig.std(ddof=1))
        assert r["relative_change"] == pytest.approx((sig.mean() - soft.mean()) / abs(soft.mean()))
        expected = stats.ttest_rel(sig, soft)
        assert r["t_statistic"] == pytest.approx(expected.statistic)
        assert r["p_ttest"] == pytest.approx(expected.pvalue)
        assert math.isnan(r["p_wilcoxon"])  # 3 pairs: too few for a Wilcoxon test
        assert r["pca"] == pytest.approx(PCA_ASW[dataset])
    assert row(summary, "a", "asw_label")["sigmoid_better"]
    assert not row(summary, "b", "asw_label")["sigmoid_better"]


def test_overall_pairs_every_dataset_and_seed(metric_files):
    summary = aggregate.summarise(aggregate.load_metrics(metric_files), A())
    soft = np.array(ASW[("a", "softmax")] + ASW[("b", "softmax")])
    sig = np.array(ASW[("a", "sigmoid")] + ASW[("b", "sigmoid")])
    r = row(summary, "overall", "asw_label")
    assert r["n_pairs"] == 6
    assert r["softmax_mean"] == pytest.approx(soft.mean())
    assert r["sigmoid_mean"] == pytest.approx(sig.mean())
    assert r["relative_change"] == pytest.approx((sig.mean() - soft.mean()) / soft.mean())
    assert r["p_ttest"] == pytest.approx(stats.ttest_rel(sig, soft).pvalue)
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(sig, soft).pvalue)
    assert r["pca"] == pytest.approx(np.mean(list(PCA_ASW.values())))
    # the paper's claim sits beside ours on the claim metric only
    assert r["paper_relative_change"] == pytest.approx(0.25)
    assert "+25%" in r["paper_claim"]
    assert math.isnan(row(summary, "overall", "val_loss")["paper_relative_change"])


def test_lower_validation_loss_counts_as_better(metric_files):
    summary = aggregate.summarise(aggregate.load_metrics(metric_files), A())
    r = row(summary, "a", "val_loss")
    assert not r["higher_is_better"]
    assert r["relative_change"] < 0
    assert r["sigmoid_better"]
    assert math.isnan(r["pca"])  # PCA has no validation loss
    # n_cells describes an embedding; it is not a metric
    assert "n_cells" not in set(summary["metric"])


def test_identical_differences_give_no_t_test():
    out = aggregate.paired_tests(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 3.5]))
    assert out["n_pairs"] == 3
    assert math.isnan(out["p_ttest"])
    one = aggregate.paired_tests(np.array([1.0]), np.array([2.0]))
    assert one["n_pairs"] == 1 and math.isnan(one["p_ttest"])


def test_unpaired_seeds_are_left_out_of_the_test(tmp_path):
    frame = metrics_frame("a")
    frame = frame[~((frame["method"] == "sigmoid") & (frame["seed"] == 2))]
    frame.to_csv(tmp_path / "a.csv", index=False)
    summary = aggregate.summarise(aggregate.load_metrics([str(tmp_path / "a.csv")]), A())
    r = row(summary, "a", "asw_label")
    assert r["n_pairs"] == 2
    assert r["sigmoid_mean"] == pytest.approx(np.mean(ASW[("a", "sigmoid")][:2]))
    assert "overall" not in set(summary["dataset"])  # one dataset: no pooled rows


def test_duplicate_and_missing_columns_are_errors(tmp_path):
    frame = metrics_frame("a")
    pd.concat([frame, frame.iloc[:1]]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match="a/sigmoid/seed 2"):
        aggregate.load_metrics([str(tmp_path / "dup.csv")])
    frame.drop(columns=["seed"]).to_csv(tmp_path / "noseed.csv", index=False)
    with pytest.raises(DataError, match="noseed.csv.*seed"):
        aggregate.load_metrics([str(tmp_path / "noseed.csv")])


def test_config_errors_name_the_key(metric_files):
    table = aggregate.load_metrics(metric_files)
    with pytest.raises(ConfigError, match="unknown key aggregate.claim_metrc"):
        A(claim_metrc="asw_label")
    with pytest.raises(ConfigError, match="aggregate.claim_metric must be one of"):
        A(claim_metric="asw")
    with pytest.raises(ConfigError, match="nmi_kmeans"):  # a metric these tables lack
        aggregate.summarise(table, A(metrics=["nmi_kmeans"]))


def test_cli_writes_all_four_outputs(metric_files, tmp_path):
    from sigmoid_sc.cli import main

    out = tmp_path / "tables"
    rc = main(
        [
            "aggregate",
            "--metrics",
            *metric_files,
            "--params-json",
            '{"claim_relative_change": 0.25}',
            "--table",
            str(out / "representation.csv"),
            "--summary-csv",
            str(out / "summary.csv"),
            "--summary-md",
            str(out / "summary.md"),
            "--summary-tex",
            str(out / "summary.tex"),
        ]
    )
    assert rc == 0
    table = pd.read_csv(out / "representation.csv")
    assert len(table) == 14
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["dataset"]) == {"a", "b", "overall"}
    markdown = (out / "summary.md").read_text()
    change_a = (np.mean(ASW[("a", "sigmoid")]) - np.mean(ASW[("a", "softmax")])) / np.mean(
        ASW[("a", "softmax")]
    )
    assert f"| a | {change_a:+.1%} | +25.0% |" in markdown
    tex = (out / "summary.tex").read_text()
    assert "\\begin{tabular}" in tex and "asw\\_label" in tex and "\\end{table}" in tex
