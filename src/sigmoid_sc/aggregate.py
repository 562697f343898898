"""The ``aggregate`` stage: every dataset's metrics in one table, and sigmoid vs softmax.

Inputs: each dataset's ``metrics.csv`` (``evaluate``: one row per embedding, columns
``dataset, method, seed``, descriptive columns, then one column per metric). Outputs:

- ``representation.csv``: the rows of all inputs, one per dataset x method x seed;
- ``representation_summary.{csv,md,tex}``: the primary metric (config ``primary_metric``) is
  named first. A row per dataset x pooling x metric, plus ``overall`` rows pooling all
  datasets. Columns: softmax and sigmoid mean and sd over seeds; the absolute difference
  ``sigmoid - softmax`` with a bootstrap 95% confidence interval (:func:`bootstrap_ci`) and
  what it resolves; the relative change ``(sigmoid_mean - softmax_mean) / |softmax_mean|``; a
  paired test over seeds (paired t-test; Wilcoxon signed-rank too from 6 pairs on); the
  baselines (PCA, the untrained encoder of each kind: mean over their rows of the dataset, or
  over the datasets' values for ``overall``); the paper's claim beside ours (``+25%``
  cell-type separation, ``asw_label``).
- ``representation_training.csv`` (and a section of the md and tex): per dataset and kind, the
  runs, steps trained and final validation loss (means over seeds), how the runs stopped, and
  whether every run reached its plateau (``not recorded`` where the model records lack it).

Poolings: methods ``softmax``/``sigmoid`` are mean pooling; ``softmax_<p>``/``sigmoid_<p>``
(``softmax_cls``) pooling ``p``, paired the same way. Any other method (``pca``,
``untrained_softmax``, ...) is a baseline column. Validation loss does not depend on the
pooling: it is summarised for mean pooling only.

Pairs: softmax seed ``s`` with sigmoid seed ``s`` of the same dataset (same split, same batches,
same initial weights apart from attention). Per dataset, ``difference`` is the mean of the
paired differences. ``overall`` pairs over all (dataset, seed) for the means, sds and tests
(means over those pairs, equal to the mean of the per-dataset means when every dataset has the
same seeds); its ``difference`` is the mean over datasets of their mean differences (each
dataset weighs the same, the quantity the two-level bootstrap resamples).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from . import config
from .config import ATTENTIONS, Aggregate
from .errors import ConfigError, DataError
from .io import read_table, write_csv, write_text
from .runtime import parse_json_arg

ID_COLUMNS = ("dataset", "method", "seed")
#: columns of metrics.csv that describe an embedding rather than score it
DESCRIPTIVE_COLUMNS = ("n_cells", "steps", "stop_reason", "plateau")
#: the compared pair, sigmoid - softmax (mean pooling); ``<arm>_<pooling>`` are their other
#: poolings
ARMS = ("softmax", "sigmoid")
MEAN_POOLING = "mean"
#: baselines always given a column in the summary (empty when absent), in this order: PCA and
#: the untrained encoder of each kind
BASELINES = ("pca", *(f"untrained_{kind}" for kind in ATTENTIONS))
METHOD_ORDER = (*ATTENTIONS, *(f"{kind}_cls" for kind in ATTENTIONS), *BASELINES)
OVERALL = "overall"
#: the fewest pairs for which the Wilcoxon signed-rank test is reported (below, its smallest
#: attainable two-sided p is over 0.05 and says nothing)
MIN_PAIRS_WILCOXON = 6
#: coverage of the bootstrap confidence intervals (percentile method)
CI_LEVEL = 0.95
#: a per-dataset interval over fewer paired seeds than this is flagged in the headline: a
#: percentile bootstrap cannot reach beyond the range of the n differences, and the true
#: difference lies outside that range with probability 2 / 2^n (symmetric noise): 25% at n = 3
FEW_PAIRS = 6
NO_DIFFERENCE = "no difference resolved"

#: metrics where lower is better; every other metric of scib (ASW, NMI, ARI, cLISI, isolated
#: labels, batch ASW, iLISI, graph connectivity) and kNN accuracy: higher is better
LOWER_IS_BETTER = frozenset({"val_loss"})
#: metrics that do not depend on the pooling of the embedding (summarised once)
POOLING_FREE = frozenset({"val_loss"})

#: the metric of the paper's headline claim (cell-type separation); its number comes from the
#: config (aggregate.claim_relative_change)
PAPER_CLAIM_METRIC = "asw_label"
#: what the paper says about each metric (arXiv 2604.27124, claim a)
PAPER_CLAIMS = {
    "asw_label": "higher: cell-type separation",
    "asw_label_raw": "higher: cell-type separation",
    "nmi_kmeans": "higher: cell-type cohesion",
    "ari_kmeans": "higher: cell-type cohesion",
    "nmi_leiden": "higher: cell-type cohesion",
    "ari_leiden": "higher: cell-type cohesion",
    "clisi": "higher: cell-type cohesion",
    "isolated_labels": "higher: cell-type cohesion",
    "isolated_labels_raw": "higher: cell-type cohesion",
    "knn_accuracy": "higher: cell-type cohesion",
    "val_loss": "lower",
}

SUMMARY_COLUMNS = (
    "dataset",
    "pooling",
    "metric",
    "primary",
    "higher_is_better",
    "n_pairs",
    "n_datasets",
    "softmax_mean",
    "softmax_sd",
    "sigmoid_mean",
    "sigmoid_sd",
    "difference",
    "ci_low",
    "ci_high",
    "resolved",
    "relative_change",
    "t_statistic",
    "p_ttest",
    "p_wilcoxon",
    *BASELINES,
    "sigmoid_better",
    "paper_claim",
    "paper_relative_change",
)

TRAINING_COLUMNS = (
    "dataset",
    "method",
    "n_runs",
    "steps_mean",
    "steps_min",
    "steps_max",
    "val_loss_mean",
    "plateau",
    "plateau_reached",
    "plateau_recorded",
    "stop_reasons",
)


# --------------------------------------------------------------------------------------------
# reading


def load_metrics(paths: list[str]) -> pd.DataFrame:
    """Concatenate metrics.csv files into the representation table.

    Rows are ordered by dataset (in the order the files are given), method (softmax, sigmoid,
    pca, then others) and seed. Raises DataError naming the file when a column is missing or a
    dataset x method x seed appears twice.
    """
    frames = []
    for path in paths:
        frames.append(read_table(path, ID_COLUMNS, "metrics table"))
    if not frames:
        raise DataError("aggregate: no metrics tables given")
    table = pd.concat(frames, ignore_index=True, sort=False)
    table["seed"] = table["seed"].astype(int)
    duplicated = table.duplicated(list(ID_COLUMNS), keep=False)
    if duplicated.any():
        rows = table.loc[duplicated, list(ID_COLUMNS)].drop_duplicates()
        raise DataError(
            "aggregate: dataset x method x seed appears more than once: "
            + "; ".join(f"{d}/{m}/seed {s}" for d, m, s in rows.itertuples(index=False))
        )
    dataset_order = {name: i for i, name in enumerate(pd.unique(table["dataset"]))}
    method_order = {name: i for i, name in enumerate(METHOD_ORDER)}
    order = pd.DataFrame(
        {
            "d": table["dataset"].map(dataset_order),
            "m": table["method"].map(method_order).fillna(len(METHOD_ORDER)),
            "s": table["seed"],
        }
    )
    table = table.loc[order.sort_values(["d", "m", "s"], kind="stable").index]
    return table.reset_index(drop=True)


def metric_columns(table: pd.DataFrame, selected: list[str] | None = None) -> list[str]:
    """Numeric columns that score an embedding (validation loss first), or ``selected``."""
    if selected is not None:
        unknown = [m for m in selected if m not in table.columns]
        if unknown:
            raise ConfigError(
                f"aggregate.metrics: {', '.join(map(repr, unknown))} not in the metrics tables "
                f"(columns: {', '.join(table.columns)})"
            )
        return list(selected)
    skip = set(ID_COLUMNS) | set(DESCRIPTIVE_COLUMNS)
    numeric = [
        c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])
    ]
    return sorted(numeric, key=lambda c: c != "val_loss")  # stable: val_loss, then file order


# --------------------------------------------------------------------------------------------
# statistics


def relative_change(sigmoid_mean: float, softmax_mean: float) -> float:
    """``(sigmoid - softmax) / |softmax|``; NaN when softmax's mean is 0 or missing."""
    if not np.isfinite(softmax_mean) or softmax_mean == 0 or not np.isfinite(sigmoid_mean):
        return math.nan
    return (sigmoid_mean - softmax_mean) / abs(softmax_mean)


def paired_tests(softmax: np.ndarray, sigmoid: np.ndarray) -> dict[str, float]:
    """Paired t-test and (n >= 6) Wilcoxon signed-rank test of sigmoid vs softmax.

    ``softmax[i]`` and ``sigmoid[i]`` are the same seed (and dataset). Two-sided p-values; NaN
    where the test is undefined (fewer than 2 pairs, or all differences equal).
    """
    from scipy import stats

    softmax = np.asarray(softmax, dtype=float)
    sigmoid = np.asarray(sigmoid, dtype=float)
    keep = np.isfinite(softmax) & np.isfinite(sigmoid)
    softmax, sigmoid = softmax[keep], sigmoid[keep]
    diff = sigmoid - softmax
    out = {"n_pairs": int(diff.size), "t_statistic": math.nan, "p_ttest": math.nan}
    out["p_wilcoxon"] = math.nan
    # a t statistic needs a spread of differences: identical differences give 0/0
    if diff.size >= 2 and np.ptp(diff) > 0:
        t = stats.ttest_rel(sigmoid, softmax)
        out["t_statistic"], out["p_ttest"] = float(t.statistic), float(t.pvalue)
    if diff.size >= MIN_PAIRS_WILCOXON and np.any(diff != 0):
        out["p_wilcoxon"] = float(stats.wilcoxon(sigmoid, softmax).pvalue)
    return out


def bootstrap_means(groups: Sequence[np.ndarray], n_resamples: int, seed: int) -> np.ndarray:
    """Bootstrap distribution of the mean of group means: float ``[n_resamples]``.

    ``groups`` holds each dataset's paired differences (one value per seed). Every resample
    draws as many datasets as there are, with replacement, and within each drawn dataset as many
    of its values as it has, with replacement (a dataset drawn twice is resampled twice,
    independently); its statistic is the mean over the drawn datasets of their resampled means.
    With one group this is the ordinary bootstrap of a mean over seeds. Seeded
    (``numpy.random.default_rng(seed)``): the same inputs give the same resamples.
    """
    groups = [np.asarray(g, dtype=float).ravel() for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("bootstrap_means: every group needs at least one value")
    if n_resamples < 1:
        raise ValueError(f"bootstrap_means: n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    sizes = np.array([g.size for g in groups])
    padded = np.zeros((len(groups), sizes.max()))
    for i, g in enumerate(groups):
        padded[i, : g.size] = g
    picks = rng.integers(0, len(groups), size=(n_resamples, len(groups)))  # datasets
    n = sizes[picks]  # [B, D]: values of each drawn dataset
    draws = np.floor(rng.random((n_resamples, len(groups), sizes.max())) * n[..., None])
    draws = draws.astype(np.int64)  # [B, D, max_n]: indices < n; columns >= n unused
    used = np.arange(sizes.max()) < n[..., None]
    values = np.where(used, padded[picks[..., None], draws], 0.0)
    return (values.sum(-1) / n).mean(-1)


def bootstrap_ci(
    groups: Sequence[np.ndarray], n_resamples: int, seed: int, level: float = CI_LEVEL
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the mean of group means and its percentile bootstrap interval.

    ``groups``: each dataset's paired differences (sigmoid - softmax, one per seed). One group:
    the seeds are resampled; several: the two-level bootstrap of :func:`bootstrap_means`.
    ``low``/``high`` are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
    resampled statistics (numpy's linear interpolation). Empty groups are dropped; NaN bounds
    when nothing varies to resample (no values, or one group of a single value).
    """
    groups = [np.asarray(g, dtype=float)[np.isfinite(g)] for g in groups]
    groups = [g for g in groups if g.size]
    if not groups:
        return math.nan, math.nan, math.nan
    estimate = float(np.mean([g.mean() for g in groups]))
    if len(groups) == 1 and groups[0].size < 2:
        return estimate, math.nan, math.nan
    stats = bootstrap_means(groups, n_resamples, seed)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return estimate, float(low), float(high)


def resolved(low: float, high: float, higher_is_better: bool = True) -> str:
    """What a confidence interval of sigmoid - softmax says, in words."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return ""
    if low <= 0 <= high:
        return NO_DIFFERENCE
    higher = low > 0
    better = higher == higher_is_better
    return f"sigmoid {'higher' if higher else 'lower'} ({'better' if better else 'worse'})"


def _sd(values: pd.Series) -> float:
    """Sample standard deviation (ddof=1); NaN for fewer than two values."""
    return float(values.std(ddof=1)) if values.count() >= 2 else math.nan


def _arm_methods(pooling: str) -> tuple[str, str]:
    return tuple(arm if pooling == MEAN_POOLING else f"{arm}_{pooling}" for arm in ARMS)


def poolings(table: pd.DataFrame) -> list[str]:
    """The poolings with rows of an arm: mean first, then ``<p>`` of ``softmax_<p>``, sorted."""
    methods = set(table["method"])
    found = {MEAN_POOLING} if methods & set(ARMS) else set()
    for method in methods:
        for arm in ARMS:
            if method.startswith(f"{arm}_"):
                found.add(method[len(arm) + 1 :])
    return sorted(found, key=lambda p: (p != MEAN_POOLING, p))


def baseline_methods(table: pd.DataFrame) -> list[str]:
    """Every method that is no arm and no arm's pooling: BASELINES first, then others seen."""
    arms = {m for p in poolings(table) for m in _arm_methods(p)}
    seen = [m for m in pd.unique(table["method"]) if m not in arms]
    return [*BASELINES, *[m for m in seen if m not in BASELINES]]


def summarise_metric(
    rows: pd.DataFrame,
    metric: str,
    baselines: dict[str, float],
    dataset: str,
    pooling: str,
    bootstrap: tuple[int, int],
) -> dict[str, object]:
    """One summary row: ``rows`` are one pooling's arm rows (one dataset, or all).

    ``baselines``: the baseline columns' values; ``bootstrap``: (resamples, seed).
    """
    soft_name, sig_name = _arm_methods(pooling)
    soft = rows[rows["method"] == soft_name]
    sig = rows[rows["method"] == sig_name]
    pairs = soft[["dataset", "seed", metric]].merge(
        sig[["dataset", "seed", metric]], on=["dataset", "seed"], suffixes=("_softmax", "_sigmoid")
    )
    tests = paired_tests(pairs[f"{metric}_softmax"], pairs[f"{metric}_sigmoid"])
    pairs["diff"] = pairs[f"{metric}_sigmoid"] - pairs[f"{metric}_softmax"]
    groups = [g["diff"].to_numpy() for _, g in pairs.groupby("dataset", sort=False)]
    difference, low, high = bootstrap_ci(groups, *bootstrap)
    softmax_mean = float(soft[metric].mean()) if soft[metric].count() else math.nan
    sigmoid_mean = float(sig[metric].mean()) if sig[metric].count() else math.nan
    higher = metric not in LOWER_IS_BETTER
    better = None
    if np.isfinite(softmax_mean) and np.isfinite(sigmoid_mean) and sigmoid_mean != softmax_mean:
        better = bool(sigmoid_mean > softmax_mean) == higher
    return {
        "dataset": dataset,
        "pooling": pooling,
        "metric": metric,
        "higher_is_better": higher,
        "n_pairs": tests["n_pairs"],
        "n_datasets": sum(bool(np.isfinite(g).any()) for g in groups),
        "softmax_mean": softmax_mean,
        "softmax_sd": _sd(soft[metric]),
        "sigmoid_mean": sigmoid_mean,
        "sigmoid_sd": _sd(sig[metric]),
        "difference": difference,
        "ci_low": low,
        "ci_high": high,
        "resolved": resolved(low, high, higher),
        "relative_change": relative_change(sigmoid_mean, softmax_mean),
        "t_statistic": tests["t_statistic"],
        "p_ttest": tests["p_ttest"],
        "p_wilcoxon": tests["p_wilcoxon"],
        **baselines,
        "sigmoid_better": better,
    }


def summarise(table: pd.DataFrame, params: Aggregate) -> pd.DataFrame:
    """The summary: a row per dataset x pooling x metric, then the ``overall`` rows.

    ``params`` is the config's ``aggregate`` section. Rows: datasets in input order,
    ``overall`` last; within each, mean pooling first, and the primary metric first.
    """
    metrics = metric_columns(table, None if params.metrics is None else list(params.metrics))
    primary = params.primary_metric
    if primary not in table.columns:
        raise ConfigError(
            f"aggregate.primary_metric: {primary!r} is not a column of the metrics tables "
            f"(columns: {', '.join(table.columns)})"
        )
    metrics = [primary, *[m for m in metrics if m != primary]]
    bootstrap = (params.bootstrap_resamples, params.bootstrap_seed)
    datasets = list(pd.unique(table["dataset"]))
    baseline_names = baseline_methods(table)
    extra = [m for m in baseline_names if m not in BASELINES]
    records = []
    for metric in metrics:
        by_dataset = {
            name: table[table["method"] == name].groupby("dataset", sort=False)[metric].mean()
            for name in baseline_names
        }
        for pooling in poolings(table):
            if pooling != MEAN_POOLING and metric in POOLING_FREE:
                continue
            arms = table[table["method"].isin(_arm_methods(pooling))]
            for dataset in datasets:
                rows = arms[arms["dataset"] == dataset]
                if rows.empty or table.loc[table["dataset"] == dataset, metric].isna().all():
                    continue  # not defined here (batch metrics without a batch_key)
                values = {n: float(v.get(dataset, math.nan)) for n, v in by_dataset.items()}
                records.append(summarise_metric(rows, metric, values, dataset, pooling, bootstrap))
            if len(datasets) > 1 and not arms.empty:
                values = {
                    n: float(v.mean()) if v.count() else math.nan for n, v in by_dataset.items()
                }
                records.append(summarise_metric(arms, metric, values, OVERALL, pooling, bootstrap))
    summary = pd.DataFrame.from_records(records)
    columns = [*SUMMARY_COLUMNS[:-3], *extra, *SUMMARY_COLUMNS[-3:]]
    if summary.empty:
        return pd.DataFrame(columns=columns)
    summary["primary"] = summary["metric"] == primary
    summary["paper_claim"] = summary["metric"].map(PAPER_CLAIMS).fillna("")
    claim = summary["metric"] == PAPER_CLAIM_METRIC
    summary.loc[claim, "paper_claim"] = f"{params.claim_relative_change:+.0%}: cell-type separation"
    summary["paper_relative_change"] = np.where(claim, params.claim_relative_change, np.nan)
    dataset_rank = {name: i for i, name in enumerate([*datasets, OVERALL])}
    pooling_rank = {name: i for i, name in enumerate(poolings(table))}
    metric_rank = {name: i for i, name in enumerate(metrics)}
    summary = summary.iloc[
        np.lexsort(
            (
                summary["metric"].map(metric_rank),
                summary["pooling"].map(pooling_rank),
                summary["dataset"].map(dataset_rank),
            )
        )
    ]
    return summary[columns].reset_index(drop=True)


def _plateau_value(value) -> bool | None:
    """A ``plateau`` cell of metrics.csv: True, False or None (empty: not recorded)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "1.0", "yes"):
            return True
        if text in ("false", "0", "0.0", "no"):
            return False
        return None
    return bool(value)


def training_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and trained kind (mean-pooled arms): runs, steps trained, final validation
    loss (means over seeds), and the plateau: ``yes`` (every run reached it), ``no`` (at least
    one did not) or ``not recorded`` (a run's record does not say)."""
    records = []
    arms = table[table["method"].isin(ARMS)]
    for (dataset, method), runs in arms.groupby(["dataset", "method"], sort=False):
        steps = (
            pd.to_numeric(runs["steps"], errors="coerce")
            if "steps" in runs
            else pd.Series(np.nan, index=runs.index)
        )
        steps = steps.where(steps >= 0)  # -1: not recorded
        flags = [_plateau_value(v) for v in runs["plateau"]] if "plateau" in runs else []
        recorded = [f for f in flags if f is not None]
        if len(recorded) < len(runs):
            verdict = "not recorded"
        else:
            verdict = "yes" if all(recorded) else "no"
        reasons = (
            runs["stop_reason"].fillna("").astype(str) if "stop_reason" in runs else pd.Series([])
        )
        counts = reasons[reasons != ""].value_counts(sort=False)
        records.append(
            {
                "dataset": dataset,
                "method": method,
                "n_runs": len(runs),
                "steps_mean": float(steps.mean()) if steps.count() else math.nan,
                "steps_min": float(steps.min()) if steps.count() else math.nan,
                "steps_max": float(steps.max()) if steps.count() else math.nan,
                "val_loss_mean": float(runs["val_loss"].mean())
                if "val_loss" in runs and runs["val_loss"].count()
                else math.nan,
                "plateau": verdict,
                "plateau_reached": sum(bool(f) for f in recorded),
                "plateau_recorded": len(recorded),
                "stop_reasons": ", ".join(f"{r} x{n}" for r, n in counts.items()) or "not recorded",
            }
        )
    frame = pd.DataFrame.from_records(records, columns=list(TRAINING_COLUMNS))
    method_rank = {m: i for i, m in enumerate(ARMS)}
    dataset_rank = {d: i for i, d in enumerate(pd.unique(table["dataset"]))}
    order = np.lexsort((frame["method"].map(method_rank), frame["dataset"].map(dataset_rank)))
    return frame.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# rendering


def _fmt(value: object, kind: str = "value") -> str:
    """Numbers for the Markdown and LaTeX tables; an empty cell for NaN/None."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if kind == "percent":
        return f"{value:+.1%}"
    if kind == "p":
        return f"{value:.2g}"
    if kind == "int":
        return f"{int(value)}"
    if kind == "signed":
        return f"{value:+.3f}"
    return f"{value:.3f}"


def difference_text(row) -> str:
    """``+0.012 [-0.004, +0.027]`` (the interval omitted where there is none)."""
    text = _fmt(row["difference"], "signed")
    if text and np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"]):
        text += f" [{_fmt(row['ci_low'], 'signed')}, {_fmt(row['ci_high'], 'signed')}]"
    return text


def _baseline_header(name: str) -> str:
    if name == "pca":
        return "PCA"
    if name.startswith("untrained_"):
        return f"untrained {name[len('untrained_') :]}"
    return name


def rendered_columns(summary: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(header, column, format) of the rendered tables: the difference and its CI lead."""
    baselines = [c for c in summary.columns if c in BASELINES or c not in SUMMARY_COLUMNS]
    return [
        ("dataset", "dataset", "text"),
        ("pooling", "pooling", "text"),
        ("metric", "metric", "text"),
        ("n", "n_pairs", "int"),
        ("sigmoid - softmax [95% CI]", "difference", "difference"),
        ("softmax", "softmax", "mean_sd"),
        ("sigmoid", "sigmoid", "mean_sd"),
        ("change", "relative_change", "percent"),
        ("p (t)", "p_ttest", "p"),
        ("p (Wilcoxon)", "p_wilcoxon", "p"),
        *[(_baseline_header(b), b, "value") for b in baselines],
        ("paper", "paper_claim", "text"),
    ]


def _cells(row: pd.Series, columns) -> list[str]:
    cells = []
    for _, column, kind in columns:
        if kind == "mean_sd":
            mean, sd = row[f"{column}_mean"], row[f"{column}_sd"]
            text = _fmt(mean)
            if text and np.isfinite(sd):
                text += f" ± {sd:.3f}"
            cells.append(text)
        elif kind == "difference":
            cells.append(difference_text(row))
        elif kind == "text":
            cells.append(str(row[column]) if pd.notna(row[column]) else "")
        else:
            cells.append(_fmt(row[column], kind))
    return cells


def headline(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One metric's rows (every pooling): the difference, its CI, what it resolves, the
    relative change beside the paper's, the paired t-test."""
    rows = summary[summary["metric"] == metric]
    return rows[
        [
            "dataset",
            "pooling",
            "n_pairs",
            "n_datasets",
            "softmax_mean",
            "sigmoid_mean",
            "difference",
            "ci_low",
            "ci_high",
            "resolved",
            "relative_change",
            "paper_relative_change",
            "p_ttest",
        ]
    ]


def headline_sentence(row, metric: str) -> str:
    """``overall (mean pooling): sigmoid - softmax = +0.012 [-0.004, +0.027]: no difference
    resolved`` (a plain statement of the interval)."""
    what = difference_text(row) or "n/a"
    verdict = row["resolved"] or "no interval (too few pairs)"
    # a difference claimed from few seeds or datasets: the interval is too narrow to trust
    claims = row["resolved"] not in ("", NO_DIFFERENCE)
    if claims and row["dataset"] != OVERALL and row["n_pairs"] < FEW_PAIRS:
        n = int(row["n_pairs"])
        verdict += (
            f" (only {n} seeds: the interval spans at most the {n} differences and covers "
            "less than 95%)"
        )
    elif claims and row["dataset"] == OVERALL and row["n_datasets"] < FEW_PAIRS:
        n = int(row["n_datasets"])
        verdict += f" (only {n} datasets: the interval covers less than 95%)"
    return (
        f"{row['dataset']} ({row['pooling']} pooling): {metric} sigmoid - softmax = {what}: "
        f"{verdict}"
    )


def headline_metrics(summary: pd.DataFrame, primary: str) -> list[str]:
    """The primary metric and, where it exists, its raw (or rescaled) twin."""
    twin = primary[: -len("_raw")] if primary.endswith("_raw") else f"{primary}_raw"
    return [primary] + ([twin] if twin in set(summary["metric"]) else [])


def methods_text(params: Aggregate) -> str:
    return (
        f"Differences are sigmoid - softmax; 95% confidence intervals are percentile bootstrap "
        f"intervals ({params.bootstrap_resamples} resamples, seed "
        f"{params.bootstrap_seed}): per dataset over its paired seeds, overall two-level "
        "(datasets resampled, then seeds within each). An interval that contains 0 resolves no "
        f"difference. With fewer than {FEW_PAIRS} seeds a per-dataset interval spans at most "
        "the range of the seeds' differences and covers less than 95% (with 3 seeds the true "
        "difference lies outside that range one time in four); the overall interval, which "
        "resamples datasets too, is the one to read, and it too under-covers with fewer than "
        f"{FEW_PAIRS} datasets. "
        "Relative change = (sigmoid - softmax) / |softmax| of the means over seeds; "
        f"p from a paired t-test over seeds (Wilcoxon signed-rank from {MIN_PAIRS_WILCOXON} "
        "pairs on). Means ± sample sd over seeds. Baselines on the same test cells: PCA, and "
        "the encoder of each kind at its initial weights (untrained)."
    )


def to_markdown(
    summary: pd.DataFrame, params: Aggregate, training: pd.DataFrame | None = None
) -> str:
    """The summary as Markdown: the primary metric named first, the headline with its
    intervals in words, the training facts, then every metric."""
    primary = params.primary_metric
    lines = [
        "# Representation quality: sigmoid vs softmax attention",
        "",
        f"**Primary metric: `{primary}`** (aggregate.primary_metric, fixed in the config "
        "before any run). The paper claims "
        f"{params.claim_relative_change:+.0%} cell-type separation (`{PAPER_CLAIM_METRIC}`).",
        "",
        methods_text(params),
        "",
        f"## Headline: {primary}",
        "",
    ]
    for metric in headline_metrics(summary, primary):
        rows = headline(summary, metric)
        if metric != primary:
            form = "raw, in [-1, 1]" if metric.endswith("_raw") else "rescaled, in [0, 1]"
            lines += [f"`{metric}`, the same silhouette {form}:", ""]
        for _, row in rows.iterrows():
            lines.append(f"- {headline_sentence(row, metric)}")
        lines += [
            "",
            "| dataset | pooling | n | softmax | sigmoid | sigmoid - softmax [95% CI] | "
            "verdict | change | paper | p (t) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for _, row in rows.iterrows():
            lines.append(
                f"| {row['dataset']} | {row['pooling']} | {_fmt(row['n_pairs'], 'int')} | "
                f"{_fmt(row['softmax_mean'])} | {_fmt(row['sigmoid_mean'])} | "
                f"{difference_text(row)} | {row['resolved']} | "
                f"{_fmt(row['relative_change'], 'percent')} | "
                f"{_fmt(row['paper_relative_change'], 'percent')} | {_fmt(row['p_ttest'], 'p')} |"
            )
        lines.append("")
    if training is not None and not training.empty:
        lines += [
            "## Training",
            "",
            "Per dataset and kind: steps trained and final validation loss (means over seeds), "
            "whether every run reached its plateau, and why the runs stopped.",
            "",
            "| dataset | kind | runs | steps | val loss | plateau reached | stopped by |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for _, row in training.iterrows():
            lines.append("| " + " | ".join(_training_cells(row)) + " |")
        lines.append("")
    columns = rendered_columns(summary)
    lines += ["## Every metric", ""]
    lines.append("| " + " | ".join(h for h, _, _ in columns) + " |")
    lines.append("| " + " | ".join("---" for _ in columns) + " |")
    for _, row in summary.iterrows():
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row, columns)) + " |")
    return "\n".join(lines) + "\n"


def _training_cells(row) -> list[str]:
    steps = _fmt(row["steps_mean"], "value").rstrip("0").rstrip(".")
    if np.isfinite(row["steps_min"]) and row["steps_min"] != row["steps_max"]:
        steps += f" ({int(row['steps_min'])}-{int(row['steps_max'])})"
    plateau = row["plateau"]
    if plateau != "not recorded":
        plateau += f" ({int(row['plateau_reached'])}/{int(row['n_runs'])})"
    return [
        str(row["dataset"]),
        str(row["method"]),
        _fmt(row["n_runs"], "int"),
        steps,
        _fmt(row["val_loss_mean"]),
        plateau,
        str(row["stop_reasons"]),
    ]


def _tex_escape(text: str) -> str:
    for char, escaped in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("$", r"\$"),
    ):
        text = text.replace(char, escaped)
    return text.replace("±", r"$\pm$")


def to_latex(summary: pd.DataFrame, params: Aggregate, training: pd.DataFrame | None = None) -> str:
    """The summary as LaTeX tables (booktabs): every metric per dataset and overall, then the
    training facts. The primary metric is named in the first lines and the caption."""
    primary = params.primary_metric
    columns = rendered_columns(summary)
    header = " & ".join(_tex_escape(h) for h, _, _ in columns)
    lines = [
        f"% Primary metric: {primary} (aggregate.primary_metric).",
        "% Representation quality: sigmoid vs softmax attention (sigmoid-sc aggregate).",
        "% Needs \\usepackage{booktabs}.",
        "\\begin{table}",
        "\\centering",
        "\\small",
        "\\begin{tabular}{lll" + "r" * (len(columns) - 4) + "l}",
        "\\toprule",
        header + " \\\\",
        "\\midrule",
    ]
    previous = None
    for _, row in summary.iterrows():
        if previous is not None and row["dataset"] != previous:
            lines.append("\\midrule")
        previous = row["dataset"]
        lines.append(" & ".join(_tex_escape(c) for c in _cells(row, columns)) + " \\\\")
    lines += [
        "\\bottomrule",
        "\\end{tabular}",
        f"\\caption{{Primary metric: {_tex_escape(primary)}. Sigmoid vs softmax attention: the "
        "difference sigmoid $-$ softmax with its percentile bootstrap 95\\% confidence interval "
        f"({params.bootstrap_resamples} resamples; per dataset over paired seeds, overall "
        "two-level over datasets and seeds), mean $\\pm$ sd over seeds, relative change "
        "(sigmoid $-$ softmax)/$|$softmax$|$, paired tests over seeds, the baselines (PCA, the "
        "untrained encoder of each kind), and the paper's claim "
        f"({_tex_escape(format(params.claim_relative_change, '+.0%'))} "
        f"{_tex_escape(PAPER_CLAIM_METRIC)}).}}",
        "\\label{tab:representation}",
        "\\end{table}",
    ]
    if training is not None and not training.empty:
        lines += [
            "",
            "\\begin{table}",
            "\\centering",
            "\\small",
            "\\begin{tabular}{llrrrll}",
            "\\toprule",
            "dataset & kind & runs & steps & val loss & plateau reached & stopped by \\\\",
            "\\midrule",
            *[
                " & ".join(_tex_escape(c) for c in _training_cells(row)) + " \\\\"
                for _, row in training.iterrows()
            ],
            "\\bottomrule",
            "\\end{tabular}",
            "\\caption{Training per dataset and kind: steps trained and final validation loss "
            "(means over seeds), whether every run reached its plateau, why the runs stopped.}",
            "\\label{tab:representation-training}",
            "\\end{table}",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CLI


def run_aggregate(args: argparse.Namespace) -> None:
    params = config.section(
        "aggregate", parse_json_arg(args.params_json, "aggregate: --params-json")
    )
    table = load_metrics(args.metrics)
    summary = summarise(table, params)
    training = training_summary(table)
    write_csv(args.table, table)
    write_csv(args.summary_csv, summary)
    if args.training_csv:
        write_csv(args.training_csv, training)
    write_text(args.summary_md, to_markdown(summary, params, training))
    write_text(args.summary_tex, to_latex(summary, params, training))
    print(f"primary metric: {params.primary_metric}")
    for metric in headline_metrics(summary, params.primary_metric):
        for _, row in headline(summary, metric).iterrows():
            print(headline_sentence(row, metric))
    print(f"wrote {args.table} ({len(table)} rows), {args.summary_csv} ({len(summary)} rows)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "aggregate",
        help="all datasets' metrics in one table; sigmoid vs softmax summary with bootstrap "
        "confidence intervals and paired tests",
    )
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.csv of each dataset")
    p.add_argument("--params-json", default="{}", help="the config's aggregate section as JSON")
    p.add_argument("--table", required=True, help="output: representation.csv")
    p.add_argument("--summary-csv", required=True, help="output: representation_summary.csv")
    p.add_argument("--summary-md", required=True, help="output: representation_summary.md")
    p.add_argument("--summary-tex", required=True, help="output: representation_summary.tex")
    p.add_argument(
        "--training-csv", default=None, help="output: representation_training.csv (optional)"
    )
    p.set_defaults(func=run_aggregate)
