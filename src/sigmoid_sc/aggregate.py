"""The ``aggregate`` stage: every dataset's metrics in one table, and sigmoid vs softmax.

Inputs: each dataset's ``metrics.csv`` (``evaluate``: one row per embedding, columns
``dataset, method, seed, val_loss, n_cells`` then one column per metric). Outputs:

- ``representation.csv``: the rows of all inputs, one per dataset x method x seed;
- ``representation_summary.{csv,md,tex}``: a row per dataset x metric, plus ``overall`` rows
  pooling all datasets. Columns: softmax and sigmoid mean and sd over seeds, the relative change
  ``(sigmoid_mean - softmax_mean) / |softmax_mean|``, a paired test over seeds (paired t-test;
  Wilcoxon signed-rank too when there are at least 6 pairs), the PCA baseline's value, and the
  paper's claim beside ours (``+25%`` for cell-type separation, ASW).

Pairs: softmax seed ``s`` with sigmoid seed ``s`` of the same dataset (same split, same batches,
same initial weights apart from attention). ``overall`` pairs over all (dataset, seed); its means
are means over those pairs (equal to the mean of the per-dataset means when every dataset has
the same seeds) and its PCA value is the mean of the datasets' PCA values.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd

from . import config
from .config import ATTENTIONS, Aggregate
from .errors import ConfigError, DataError
from .io import read_table, write_csv, write_text
from .runtime import parse_json_arg

ID_COLUMNS = ("dataset", "method", "seed")
#: columns of metrics.csv that describe an embedding rather than score it
DESCRIPTIVE_COLUMNS = ("n_cells",)
METHOD_ORDER = (*ATTENTIONS, "pca")
OVERALL = "overall"
#: the fewest pairs for which the Wilcoxon signed-rank test is reported (below, its smallest
#: attainable two-sided p is over 0.05 and says nothing)
MIN_PAIRS_WILCOXON = 6

#: metrics where lower is better; every other metric of scib (ASW, NMI, ARI, cLISI, isolated
#: labels, batch ASW, iLISI, graph connectivity) is rescaled so that higher is better
LOWER_IS_BETTER = frozenset({"val_loss"})

#: what the paper says about each metric (arXiv 2604.27124, claim a); the headline number of the
#: claim metric comes from the config (aggregate.claim_relative_change)
PAPER_CLAIMS = {
    "asw_label": "higher: cell-type separation",
    "nmi_kmeans": "higher: cell-type cohesion",
    "ari_kmeans": "higher: cell-type cohesion",
    "nmi_leiden": "higher: cell-type cohesion",
    "ari_leiden": "higher: cell-type cohesion",
    "clisi": "higher: cell-type cohesion",
    "isolated_labels": "higher: cell-type cohesion",
    "val_loss": "lower",
}

SUMMARY_COLUMNS = (
    "dataset",
    "metric",
    "higher_is_better",
    "n_pairs",
    "softmax_mean",
    "softmax_sd",
    "sigmoid_mean",
    "sigmoid_sd",
    "relative_change",
    "mean_difference",
    "t_statistic",
    "p_ttest",
    "p_wilcoxon",
    "pca",
    "sigmoid_better",
    "paper_claim",
    "paper_relative_change",
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


def _sd(values: pd.Series) -> float:
    """Sample standard deviation (ddof=1); NaN for fewer than two values."""
    return float(values.std(ddof=1)) if values.count() >= 2 else math.nan


def summarise_metric(
    rows: pd.DataFrame, metric: str, pca_value: float, dataset: str
) -> dict[str, object]:
    """One summary row: ``rows`` are the softmax/sigmoid rows (one dataset, or all)."""
    soft = rows[rows["method"] == "softmax"]
    sig = rows[rows["method"] == "sigmoid"]
    pairs = soft[["dataset", "seed", metric]].merge(
        sig[["dataset", "seed", metric]], on=["dataset", "seed"], suffixes=("_softmax", "_sigmoid")
    )
    tests = paired_tests(pairs[f"{metric}_softmax"], pairs[f"{metric}_sigmoid"])
    softmax_mean = float(soft[metric].mean()) if soft[metric].count() else math.nan
    sigmoid_mean = float(sig[metric].mean()) if sig[metric].count() else math.nan
    higher = metric not in LOWER_IS_BETTER
    change = relative_change(sigmoid_mean, softmax_mean)
    better = None
    if np.isfinite(softmax_mean) and np.isfinite(sigmoid_mean) and sigmoid_mean != softmax_mean:
        better = bool(sigmoid_mean > softmax_mean) == higher
    return {
        "dataset": dataset,
        "metric": metric,
        "higher_is_better": higher,
        "n_pairs": tests["n_pairs"],
        "softmax_mean": softmax_mean,
        "softmax_sd": _sd(soft[metric]),
        "sigmoid_mean": sigmoid_mean,
        "sigmoid_sd": _sd(sig[metric]),
        "relative_change": change,
        "mean_difference": sigmoid_mean - softmax_mean,
        "t_statistic": tests["t_statistic"],
        "p_ttest": tests["p_ttest"],
        "p_wilcoxon": tests["p_wilcoxon"],
        "pca": pca_value,
        "sigmoid_better": better,
    }


def summarise(table: pd.DataFrame, params: Aggregate) -> pd.DataFrame:
    """The summary: a row per dataset x metric, then the ``overall`` rows (all datasets pooled).

    ``params`` is the config's ``aggregate`` section (claim_metric, claim_relative_change,
    metrics).
    """
    metrics = metric_columns(table, None if params.metrics is None else list(params.metrics))
    models = table[table["method"].isin(["softmax", "sigmoid"])]
    pca = table[table["method"] == "pca"]
    datasets = list(pd.unique(table["dataset"]))
    records = []
    for metric in metrics:
        pca_by_dataset = pca.groupby("dataset", sort=False)[metric].mean()
        for dataset in datasets:
            if table.loc[table["dataset"] == dataset, metric].isna().all():
                continue  # not defined for this dataset (batch metrics without a batch_key)
            records.append(
                summarise_metric(
                    models[models["dataset"] == dataset],
                    metric,
                    float(pca_by_dataset.get(dataset, math.nan)),
                    dataset,
                )
            )
        if len(datasets) > 1:
            pca_mean = float(pca_by_dataset.mean()) if pca_by_dataset.count() else math.nan
            records.append(summarise_metric(models, metric, pca_mean, OVERALL))
    summary = pd.DataFrame.from_records(records)
    if summary.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    summary["paper_claim"] = summary["metric"].map(PAPER_CLAIMS).fillna("")
    claim = summary["metric"] == params.claim_metric
    summary.loc[claim, "paper_claim"] = f"{params.claim_relative_change:+.0%}: cell-type separation"
    summary["paper_relative_change"] = np.where(claim, params.claim_relative_change, np.nan)
    # datasets in input order, overall last; within them metrics in table order
    dataset_rank = {name: i for i, name in enumerate([*datasets, OVERALL])}
    metric_rank = {name: i for i, name in enumerate(metrics)}
    summary = summary.iloc[
        np.lexsort((summary["metric"].map(metric_rank), summary["dataset"].map(dataset_rank)))
    ]
    return summary[list(SUMMARY_COLUMNS)].reset_index(drop=True)


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
    return f"{value:.3f}"


#: (header, column, format) of the rendered tables
RENDERED = (
    ("dataset", "dataset", "text"),
    ("metric", "metric", "text"),
    ("n", "n_pairs", "int"),
    ("softmax", "softmax", "mean_sd"),
    ("sigmoid", "sigmoid", "mean_sd"),
    ("change", "relative_change", "percent"),
    ("p (t)", "p_ttest", "p"),
    ("p (Wilcoxon)", "p_wilcoxon", "p"),
    ("PCA", "pca", "value"),
    ("paper", "paper_claim", "text"),
)


def _cells(row: pd.Series) -> list[str]:
    cells = []
    for _, column, kind in RENDERED:
        if kind == "mean_sd":
            mean, sd = row[f"{column}_mean"], row[f"{column}_sd"]
            text = _fmt(mean)
            if text and np.isfinite(sd):
                text += f" ± {sd:.3f}"
            cells.append(text)
        elif kind == "text":
            cells.append(str(row[column]) if pd.notna(row[column]) else "")
        else:
            cells.append(_fmt(row[column], kind))
    return cells


def headline(summary: pd.DataFrame, claim_metric: str) -> pd.DataFrame:
    """The claim metric's rows: our relative change beside the paper's, per dataset and overall."""
    rows = summary[summary["metric"] == claim_metric]
    return rows[["dataset", "relative_change", "paper_relative_change", "p_ttest", "n_pairs"]]


def to_markdown(summary: pd.DataFrame, params: Aggregate) -> str:
    """The summary as Markdown: the headline claim first, then every metric."""
    claim_metric = params.claim_metric
    lines = [
        "# Representation quality: sigmoid vs softmax attention",
        "",
        f"Relative change = (sigmoid - softmax) / |softmax| of the mean over seeds; p from a "
        f"paired t-test over seeds (Wilcoxon signed-rank from {MIN_PAIRS_WILCOXON} pairs on). "
        "Means ± sample sd over seeds. PCA: the baseline on the same test cells.",
        "",
        f"## Headline: {claim_metric} (the paper claims "
        f"{params.claim_relative_change:+.0%} cell-type separation)",
        "",
        "| dataset | ours | paper | p (t) | n |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in headline(summary, claim_metric).itertuples(index=False):
        lines.append(
            f"| {row.dataset} | {_fmt(row.relative_change, 'percent')} | "
            f"{_fmt(row.paper_relative_change, 'percent')} | {_fmt(row.p_ttest, 'p')} | "
            f"{_fmt(row.n_pairs, 'int')} |"
        )
    lines += ["", "## Every metric", ""]
    lines.append("| " + " | ".join(h for h, _, _ in RENDERED) + " |")
    lines.append("| " + " | ".join("---" for _ in RENDERED) + " |")
    for _, row in summary.iterrows():
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |")
    return "\n".join(lines) + "\n"


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


def to_latex(summary: pd.DataFrame, params: Aggregate) -> str:
    """The summary as a LaTeX table (booktabs), every metric per dataset and overall."""
    header = " & ".join(_tex_escape(h) for h, _, _ in RENDERED)
    lines = [
        "% Representation quality: sigmoid vs softmax attention (sigmoid-sc aggregate).",
        "% Needs \\usepackage{booktabs}.",
        "\\begin{table}",
        "\\centering",
        "\\small",
        "\\begin{tabular}{ll" + "r" * (len(RENDERED) - 3) + "l}",
        "\\toprule",
        header + " \\\\",
        "\\midrule",
    ]
    previous = None
    for _, row in summary.iterrows():
        if previous is not None and row["dataset"] != previous:
            lines.append("\\midrule")
        previous = row["dataset"]
        lines.append(" & ".join(_tex_escape(c) for c in _cells(row)) + " \\\\")
    lines += [
        "\\bottomrule",
        "\\end{tabular}",
        "\\caption{Sigmoid vs softmax attention: mean $\\pm$ sd over seeds, relative change "
        "(sigmoid $-$ softmax)/$|$softmax$|$, paired tests over seeds, the PCA baseline, and the "
        f"paper's claim ({_tex_escape(format(params.claim_relative_change, '+.0%'))} "
        f"{_tex_escape(params.claim_metric)}).}}",
        "\\label{tab:representation}",
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
    write_csv(args.table, table)
    write_csv(args.summary_csv, summary)
    write_text(args.summary_md, to_markdown(summary, params))
    write_text(args.summary_tex, to_latex(summary, params))
    for row in headline(summary, params.claim_metric).itertuples(index=False):
        print(
            f"{row.dataset}: {params.claim_metric} relative change "
            f"{_fmt(row.relative_change, 'percent')} (paper "
            f"{_fmt(row.paper_relative_change, 'percent')}), "
            f"p (t) = {_fmt(row.p_ttest, 'p') or 'n/a'}, n = {row.n_pairs}"
        )
    print(f"wrote {args.table} ({len(table)} rows), {args.summary_csv} ({len(summary)} rows)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "aggregate",
        help="all datasets' metrics in one table; sigmoid vs softmax summary with paired tests",
    )
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.csv of each dataset")
    p.add_argument("--params-json", default="{}", help="the config's aggregate section as JSON")
    p.add_argument("--table", required=True, help="output: representation.csv")
    p.add_argument("--summary-csv", required=True, help="output: representation_summary.csv")
    p.add_argument("--summary-md", required=True, help="output: representation_summary.md")
    p.add_argument("--summary-tex", required=True, help="output: representation_summary.tex")
    p.set_defaults(func=run_aggregate)
