"""aggregate.py: the representation table and the sigmoid-vs-softmax summary, on hand-made metrics."""

from __future__ import annotations

import itertools
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
    with pytest.raises(ConfigError, match="aggregate.primary_metric must be one of"):
        A(primary_metric="asw")
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
    assert f"| {change_a:+.1%} | +25.0% |" in markdown
    assert (
        (out / "summary.md")
        .read_text()
        .splitlines()[2]
        .startswith("**Primary metric: `asw_label`**")
    )
    tex = (out / "summary.tex").read_text()
    assert "\\begin{tabular}" in tex and "asw\\_label" in tex and "\\end{table}" in tex


# ---------------------------------------------------------------------------------------------
# bootstrap confidence intervals, against enumerated resamples


def exact_distribution(outcomes):
    """{value: probability} of equally likely outcomes (values rounded against float noise)."""
    values, counts = np.unique(np.round(outcomes, 12), return_counts=True)
    return dict(zip(values, counts / counts.sum()))


def exact_quantile(dist, q, margin=0.005):
    """The q-quantile of a discrete distribution, asserting that no atom's cumulative
    probability lies within ``margin`` of q (so a large resample lands on the same atom)."""
    values = np.array(sorted(dist))
    cdf = np.cumsum([dist[v] for v in values])
    assert np.all(np.abs(cdf - q) > margin), "test values too close to an atom's boundary"
    return values[np.searchsorted(cdf, q)]


def test_bootstrap_over_seeds_matches_the_enumerated_resamples():
    """One dataset, 4 paired differences: all 4^4 ordered resamples enumerated by hand."""
    diffs = np.array([0.0, 0.1, 0.3, 0.7])
    outcomes = [np.mean(t) for t in itertools.product(diffs, repeat=4)]
    dist = exact_distribution(outcomes)
    estimate, low, high = aggregate.bootstrap_ci([diffs], n_resamples=40000, seed=1)
    assert estimate == pytest.approx(diffs.mean())
    assert low == pytest.approx(exact_quantile(dist, 0.025), abs=1e-12)
    assert high == pytest.approx(exact_quantile(dist, 0.975), abs=1e-12)
    # the whole resampled distribution, not only its tails
    stats = aggregate.bootstrap_means([diffs], 40000, seed=1)
    seen = exact_distribution(stats)
    assert set(seen) <= set(dist)
    assert max(abs(seen.get(v, 0.0) - p) for v, p in dist.items()) < 0.01
    # seeded: the same call gives the same interval; another seed, other resamples
    assert aggregate.bootstrap_ci([diffs], 40000, seed=1) == (estimate, low, high)
    assert not np.array_equal(stats, aggregate.bootstrap_means([diffs], 40000, seed=2))


def test_two_level_bootstrap_matches_the_enumerated_resamples():
    """Two datasets of 2 seeds: draw 2 datasets with replacement, then 2 seeds within each
    drawn dataset: 4 x 4 x 4 equally likely outcomes, the mean of the drawn datasets' means."""
    groups = [np.array([0.0, 1.0]), np.array([0.2, 0.6])]
    outcomes = [
        (np.mean(s1) + np.mean(s2)) / 2
        for d1, d2 in itertools.product(range(2), repeat=2)
        for s1 in itertools.product(groups[d1], repeat=2)
        for s2 in itertools.product(groups[d2], repeat=2)
    ]
    dist = exact_distribution(outcomes)
    # pooling the 4 values and resampling them as one level is a different distribution
    pooled = exact_distribution([np.mean(t) for t in itertools.product([0, 1, 0.2, 0.6], repeat=4)])
    assert max(abs(pooled.get(v, 0) - dist.get(v, 0)) for v in set(dist) | set(pooled)) > 0.05
    stats = aggregate.bootstrap_means(groups, 60000, seed=0)
    seen = exact_distribution(stats)
    assert set(seen) <= set(dist)
    assert max(abs(seen.get(v, 0.0) - p) for v, p in dist.items()) < 0.01
    estimate, low, high = aggregate.bootstrap_ci(groups, 60000, seed=0)
    assert estimate == pytest.approx((0.5 + 0.4) / 2)
    assert low == pytest.approx(exact_quantile(dist, 0.025), abs=1e-12)
    assert high == pytest.approx(exact_quantile(dist, 0.975), abs=1e-12)


def test_bootstrap_edge_cases():
    assert all(math.isnan(v) for v in aggregate.bootstrap_ci([], 100, 0))
    estimate, low, high = aggregate.bootstrap_ci([np.array([0.3])], 100, 0)
    assert estimate == 0.3 and math.isnan(low) and math.isnan(high)  # nothing to resample
    # one seed per dataset, several datasets: the datasets are resampled
    estimate, low, high = aggregate.bootstrap_ci([np.array([0.1]), np.array([0.5])], 4000, 0)
    assert estimate == pytest.approx(0.3) and low == pytest.approx(0.1) and high == 0.5
    # every dataset weighs the same, whatever its number of seeds
    estimate, _, _ = aggregate.bootstrap_ci([np.array([0.0, 1.0, 2.0]), np.array([10.0])], 100, 0)
    assert estimate == pytest.approx((1.0 + 10.0) / 2)
    assert aggregate.resolved(0.01, 0.2) == "sigmoid higher (better)"
    assert aggregate.resolved(-0.2, -0.01, higher_is_better=False) == "sigmoid lower (better)"
    assert aggregate.resolved(-0.2, 0.01) == "no difference resolved"


def test_summary_differences_and_intervals_by_hand(metric_files):
    """3 seeds: the percentile interval of a mean over 3 resampled values runs from the
    smallest to the largest difference (each extreme has probability 1/27 > 2.5%)."""
    summary = aggregate.summarise(aggregate.load_metrics(metric_files), A())
    for dataset in ("a", "b"):
        diffs = np.array(ASW[(dataset, "sigmoid")]) - np.array(ASW[(dataset, "softmax")])
        r = row(summary, dataset, "asw_label")
        assert r["difference"] == pytest.approx(diffs.mean())
        assert r["ci_low"] == pytest.approx(diffs.min())
        assert r["ci_high"] == pytest.approx(diffs.max())
    assert row(summary, "a", "asw_label")["resolved"] == "sigmoid higher (better)"
    assert row(summary, "b", "asw_label")["resolved"] == "no difference resolved"
    assert row(summary, "a", "val_loss")["resolved"] == "sigmoid lower (better)"
    overall = row(summary, "overall", "asw_label")
    groups = [np.array(ASW[(d, "sigmoid")]) - np.array(ASW[(d, "softmax")]) for d in "ab"]
    expected = aggregate.bootstrap_ci(groups, 10000, 0)
    assert (overall["difference"], overall["ci_low"], overall["ci_high"]) == pytest.approx(expected)
    # the primary metric leads: first row of every dataset, flagged
    assert summary.groupby("dataset", sort=False)["metric"].first().eq("asw_label").all()
    assert summary.loc[summary["metric"] == "asw_label", "primary"].all()
    assert not summary.loc[summary["metric"] != "asw_label", "primary"].any()
    # another primary metric, the config's number of resamples and seed
    other = aggregate.summarise(
        aggregate.load_metrics(metric_files),
        A(primary_metric="val_loss", bootstrap_resamples=500, bootstrap_seed=3),
    )
    assert other.iloc[0]["metric"] == "val_loss" and other.iloc[0]["primary"]
    r = row(other, "overall", "asw_label")
    assert (r["difference"], r["ci_low"], r["ci_high"]) == pytest.approx(
        aggregate.bootstrap_ci(groups, 500, 3)
    )


def full_metrics_frame() -> pd.DataFrame:
    """Dataset a with every method the pipeline writes: both poolings, both untrained
    encoders, PCA, and the training facts (seed 2 of sigmoid stopped before its plateau)."""
    frame = metrics_frame("a")
    frame["steps"] = np.where(frame["method"] == "pca", -1, 600)
    frame["stop_reason"] = np.where(frame["method"] == "pca", "", "plateau")
    frame["plateau"] = np.where(frame["method"] == "pca", None, True).astype(object)
    late = (frame["method"] == "sigmoid") & (frame["seed"] == 2)
    frame.loc[late, ["steps", "stop_reason", "plateau"]] = [900, "max_steps", False]
    cls = frame[frame["method"].isin(["softmax", "sigmoid"])].copy()
    cls["method"] += "_cls"
    cls["asw_label"] = [0.30, 0.31, 0.29, 0.30, 0.30, 0.33]  # sigmoid seeds 2, 0, 1; softmax
    untrained = pd.DataFrame(
        {
            "dataset": "a",
            "method": ["untrained_softmax", "untrained_sigmoid"],
            "seed": 0,
            "val_loss": [4.0, 4.1],
            "n_cells": 100,
            "asw_label": [0.10, 0.12],
            "steps": 0,
            "stop_reason": "",
            "plateau": None,
        }
    )
    return pd.concat([frame, cls, untrained], ignore_index=True)


def test_cls_pooling_is_paired_and_baselines_sit_beside(tmp_path):
    path = tmp_path / "a.csv"
    full_metrics_frame().to_csv(path, index=False)
    table = aggregate.load_metrics([str(path)])
    assert list(pd.unique(table["method"])) == [
        "softmax", "sigmoid", "softmax_cls", "sigmoid_cls", "pca", "untrained_softmax",
        "untrained_sigmoid",
    ]  # fmt: skip
    summary = aggregate.summarise(table, A())
    assert summary[["pooling", "metric"]].values.tolist() == [
        ["mean", "asw_label"], ["mean", "val_loss"], ["cls", "asw_label"]
    ]  # fmt: skip
    cls = summary.iloc[2]
    sig_cls = np.array([0.30, 0.31, 0.29])[[1, 2, 0]]  # rows were seeds 2, 0, 1
    soft_cls = np.array([0.30, 0.30, 0.33])[[1, 2, 0]]
    assert cls["sigmoid_mean"] == pytest.approx(sig_cls.mean())
    assert cls["difference"] == pytest.approx((sig_cls - soft_cls).mean())
    assert cls["p_ttest"] == pytest.approx(stats.ttest_rel(sig_cls, soft_cls).pvalue)
    for r in (summary.iloc[0], cls):  # baselines: the same columns for every pooling
        assert r["pca"] == pytest.approx(PCA_ASW["a"])
        assert r["untrained_softmax"] == pytest.approx(0.10)
        assert r["untrained_sigmoid"] == pytest.approx(0.12)
    assert summary.iloc[1]["untrained_sigmoid"] == pytest.approx(4.1)  # its initial loss

    training = aggregate.training_summary(table)
    assert training["method"].tolist() == ["softmax", "sigmoid"]
    soft, sig = training.iloc[0], training.iloc[1]
    assert soft["steps_mean"] == 600 and soft["plateau"] == "yes"
    assert soft["val_loss_mean"] == pytest.approx(np.mean(VAL_LOSS[("a", "softmax")]))
    assert sig["steps_mean"] == pytest.approx(700) and sig["steps_max"] == 900
    assert sig["plateau"] == "no" and sig["plateau_reached"] == 2
    assert sig["stop_reasons"] == "plateau x2, max_steps x1"
    markdown = aggregate.to_markdown(summary, A(), training)
    assert "| a | sigmoid | 3 | 700 (600-900) | 2.850 | no (2/3) | plateau x2, max_steps x1 |" in (
        markdown
    )
    assert "- a (cls pooling): asw_label sigmoid - softmax = " in markdown
    # a record without the plateau: said so
    old = metrics_frame("a")
    assert set(aggregate.training_summary(old)["plateau"]) == {"not recorded"}


def test_headline_states_the_interval_in_words(metric_files, tmp_path):
    table = aggregate.load_metrics(metric_files)
    table["asw_label_raw"] = 2 * table["asw_label"] - 1
    params = A()
    summary = aggregate.summarise(table, params)
    markdown = aggregate.to_markdown(summary, params)
    head = markdown.split("## Every metric")[0]
    r = row(summary, "b", "asw_label")
    assert (
        f"- b (mean pooling): asw_label sigmoid - softmax = {r['difference']:+.3f} "
        f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]: no difference resolved\n"
    ) in head
    a = row(summary, "a", "asw_label")
    assert (
        f"- a (mean pooling): asw_label sigmoid - softmax = {a['difference']:+.3f} "
        f"[{a['ci_low']:+.3f}, {a['ci_high']:+.3f}]: sigmoid higher (better) (only 3 seeds: "
        "the interval spans at most the 3 differences and covers less than 95%)\n"
    ) in head
    overall = row(summary, "overall", "asw_label")
    assert (
        f"- overall (mean pooling): asw_label sigmoid - softmax = {overall['difference']:+.3f} "
        f"[{overall['ci_low']:+.3f}, {overall['ci_high']:+.3f}]: no difference resolved\n"
    ) in head
    # a resolved overall difference from 2 datasets carries its caveat
    claimed = overall.copy()
    claimed["resolved"] = "sigmoid higher (better)"
    assert aggregate.headline_sentence(claimed, "asw_label").endswith(
        "sigmoid higher (better) (only 2 datasets: the interval covers less than 95%)"
    )
    assert overall["n_datasets"] == 2 and r["n_datasets"] == 1
    # the raw silhouette sits in the headline too; its difference is twice the rescaled one
    raw = row(summary, "a", "asw_label_raw")
    assert raw["difference"] == pytest.approx(2 * row(summary, "a", "asw_label")["difference"])
    assert "- a (mean pooling): asw_label_raw sigmoid - softmax = " in head
    tex = aggregate.to_latex(summary, params)
    assert tex.splitlines()[0] == "% Primary metric: asw_label (aggregate.primary_metric)."


def test_primary_metric_and_bootstrap_keys_are_checked(metric_files):
    table = aggregate.load_metrics(metric_files)
    with pytest.raises(ConfigError, match="claim_metric is now aggregate.primary_metric"):
        A(claim_metric="asw_label")
    with pytest.raises(ConfigError, match="primary_metric.*'knn_acc'"):
        A(primary_metric="knn_acc")
    with pytest.raises(ConfigError, match="primary_metric: 'knn_accuracy' is not a column"):
        aggregate.summarise(table, A(primary_metric="knn_accuracy"))  # a metric the tables lack
    with pytest.raises(ConfigError, match="bootstrap_resamples must be >= 1"):
        A(bootstrap_resamples=0)
    with pytest.raises(ConfigError, match="bootstrap_seed must be >= 0"):
        A(bootstrap_seed=-1)
