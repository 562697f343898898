"""The ``figures`` stage: PNG and PDF figures of a run (headless, matplotlib's Agg backend).

``sigmoid-sc figures metrics``: every metric per dataset, every method of
``representation.csv`` side by side (one dot per seed, mean ± sd): softmax and sigmoid (mean
pooling), their CLS pooling, the untrained encoders and PCA, then any other method.
``sigmoid-sc figures umap``: one dataset's UMAPs of softmax, sigmoid and PCA embeddings side by
side, coloured by cell type, from ``umap.csv`` (the lowest seed of each attention kind; the panel
titles give that embedding's ASW from ``metrics.csv``).
``sigmoid-sc figures loss``: one dataset's training and validation loss against steps, every
run's ``history.csv`` (its attention kind and seed are the run's record, as its embedding keeps
them; never parsed from a folder name); the validation panel shades each run's plateau window,
its last 20% of steps (over which a run at its plateau improves by less than 1%).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd

from .config import ATTENTIONS
from .errors import ConfigError, DataError
from .io import atomic_path, read_table

METHOD_COLOURS = {
    "softmax": "#1f77b4",
    "sigmoid": "#d62728",
    "softmax_cls": "#6baed6",
    "sigmoid_cls": "#fc9272",
    "pca": "#7f7f7f",
    "untrained_softmax": "#c6dbef",
    "untrained_sigmoid": "#fcbba1",
}
#: the kinds (mean pooling), their CLS pooling, PCA, the untrained encoders
METHOD_ORDER = (
    *ATTENTIONS,
    *(f"{kind}_cls" for kind in ATTENTIONS),
    "pca",
    *(f"untrained_{kind}" for kind in ATTENTIONS),
)
#: the UMAP figure's panels: the kinds (mean pooling) and PCA
UMAP_METHODS = (*ATTENTIONS, "pca")
#: colours of methods the figure does not know (any method name is drawn)
OTHER_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
#: the part of a run's steps over which its plateau is judged (shaded in the loss figure)
PLATEAU_FRACTION = 0.2
#: metrics with these names are drawn on their own scale, not [0, 1]
UNBOUNDED = frozenset({"val_loss"})
#: columns of the representation table that describe an embedding rather than score it
DESCRIPTIVE = frozenset({"dataset", "method", "seed", "n_cells", "steps", "stop_reason", "plateau"})


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: CI, SLURM nodes
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png: str, pdf: str) -> None:
    """Write ``fig`` as PNG (150 dpi) and PDF, each atomically, and close it."""
    for path, fmt in ((png, "png"), (pdf, "pdf")):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
    pyplot().close(fig)


# --------------------------------------------------------------------------------------------
# metrics per dataset


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [
        c for c in table.columns if c not in DESCRIPTIVE and pd.api.types.is_numeric_dtype(table[c])
    ]


def methods_and_colours(table: pd.DataFrame) -> dict[str, str]:
    """Every method of the table, known ones in METHOD_ORDER, then the others as they come."""
    present = list(pd.unique(table["method"]))
    known = [m for m in METHOD_ORDER if m in present]
    others = [m for m in present if m not in METHOD_COLOURS]
    colours = {m: METHOD_COLOURS[m] for m in known}
    colours.update({m: OTHER_COLOURS[i % len(OTHER_COLOURS)] for i, m in enumerate(others)})
    return colours


def plot_metrics(table: pd.DataFrame):
    """A panel per metric; per dataset, every method side by side (see methods_and_colours).

    Dots are seeds; a bar with whiskers is the mean ± sd over seeds. Scores in [0, 1] share
    that range, raw silhouettes (``*_raw``) [-1, 1], validation loss its own.
    """
    plt = pyplot()
    metrics = metric_columns(table)
    datasets = list(pd.unique(table["dataset"]))
    colours = methods_and_colours(table)
    methods = list(colours)
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    width = max(3.0, 0.9 * len(datasets) + 1.5)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, 2.8 * nrows), squeeze=False, layout="constrained"
    )
    offsets = np.linspace(-0.3, 0.3, len(methods)) if len(methods) > 1 else np.zeros(1)
    bar_width = 0.6 / max(len(methods), 1)
    rng = np.random.default_rng(0)  # jitter of the seed dots only
    for ax, metric in zip(axes.flat, metrics):
        for j, method in enumerate(methods):
            for i, dataset in enumerate(datasets):
                values = table.loc[
                    (table["dataset"] == dataset) & (table["method"] == method), metric
                ].dropna()
                if values.empty:
                    continue
                x = i + offsets[j]
                mean = values.mean()
                sd = values.std(ddof=1) if len(values) > 1 else 0.0
                colour = colours[method]
                ax.bar(x, mean, width=bar_width, color=colour, alpha=0.35, label=method)
                ax.errorbar(x, mean, yerr=sd, color=colour, capsize=2, lw=1)
                jitter = rng.uniform(-0.2, 0.2, len(values)) * bar_width
                ax.scatter(x + jitter, values, s=8, color=colour, zorder=3, label=method)
        ax.set_title(metric)
        ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
        if metric.endswith("_raw"):
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0.0, color="black", lw=0.5)
        elif metric not in UNBOUNDED:
            ax.set_ylim(0, 1.05)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    # one legend for all panels (a panel may lack a method: PCA has no validation loss)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m], alpha=0.6, label=m) for m in methods]
    fig.legend(
        handles=handles, loc="outside upper center", ncols=min(len(methods), 4), frameon=False
    )
    return fig


# --------------------------------------------------------------------------------------------
# UMAPs


def umap_panels(umap: pd.DataFrame) -> list[tuple[str, int]]:
    """(method, seed) of each panel: the lowest seed of softmax and sigmoid, then PCA."""
    panels = []
    for method in UMAP_METHODS:
        seeds = sorted(umap.loc[umap["method"] == method, "seed"].unique())
        if seeds:
            panels.append((method, int(seeds[0])))
    return panels


def plot_umap(dataset: str, umap: pd.DataFrame, metrics: pd.DataFrame | None = None):
    """UMAPs side by side (softmax | sigmoid | PCA), coloured by cell type (one shared legend)."""
    plt = pyplot()
    panels = umap_panels(umap)
    if not panels:
        raise DataError(f"dataset {dataset!r}: umap.csv has no softmax, sigmoid or pca rows")
    labels = sorted(umap["label"].astype(str).unique())
    cmap = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    colours = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False, layout="constrained"
    )
    for ax, (method, seed) in zip(axes[0], panels):
        cells = umap[(umap["method"] == method) & (umap["seed"] == seed)]
        # shuffled drawing order: no cell type hides under another by file order
        cells = cells.sample(frac=1.0, random_state=0)
        ax.scatter(
            cells["umap1"],
            cells["umap2"],
            s=float(np.clip(4000 / max(len(cells), 1), 2, 24)),  # fewer cells, bigger dots
            linewidths=0,
            c=[colours[label] for label in cells["label"].astype(str)],
        )
        title = method if method == "pca" else f"{method} (seed {seed})"
        if metrics is not None and "asw_label" in metrics.columns:
            row = metrics[(metrics["method"] == method) & (metrics["seed"] == seed)]
            if not row.empty and np.isfinite(row["asw_label"].iloc[0]):
                title += f"\nASW {row['asw_label'].iloc[0]:.3f}"
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=colours[label], label=label)
        for label in labels
    ]
    fig.legend(handles=handles, loc="outside right center", frameon=False, title="cell type")
    fig.suptitle(dataset)
    return fig


# --------------------------------------------------------------------------------------------
# loss curves


def run_of(embedding: str) -> tuple[str, int]:
    """(attention, seed) of a trained run, as its embedding records them (``embed`` copies
    them from the model's record in model.pt; embeddings, unlike models, are small enough to
    travel back from a GPU host)."""
    try:
        with np.load(embedding, allow_pickle=False) as npz:
            return str(npz["method"]), int(npz["seed"])
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{embedding}: cannot read the run's method and seed ({exc})") from exc


def read_histories(histories: list[str], embeddings: list[str]) -> pd.DataFrame:
    """history.csv of several runs, each with the ``attention`` and ``seed`` of its run
    (``embeddings[i]`` is the embedding of the run of ``histories[i]``, see :func:`run_of`)."""
    if len(histories) != len(embeddings):
        raise DataError(
            f"figures loss: {len(histories)} history.csv but {len(embeddings)} embeddings; give "
            "the embedding of every run's history, in the same order"
        )
    frames = []
    for history, embedding in zip(histories, embeddings):
        attention, seed = run_of(embedding)
        frame = read_table(history, ("step", "split", "loss"))
        frame["attention"] = attention
        frame["seed"] = seed
        frames.append(frame)
    if not frames:
        raise DataError("figures loss: no history.csv given")
    return pd.concat(frames, ignore_index=True)


def plateau_windows(histories: pd.DataFrame, fraction: float = PLATEAU_FRACTION) -> list:
    """``(start, end)`` step windows of the runs' plateaus: the last ``fraction`` of each run's
    steps (its last step ``S``: ``((1 - fraction) * S, S)``), one per distinct last step."""
    last = histories.groupby(["attention", "seed"])["step"].max()
    return [((1 - fraction) * s, float(s)) for s in sorted(set(last.tolist()))]


def plot_loss(dataset: str, histories: pd.DataFrame, plateau_fraction: float = PLATEAU_FRACTION):
    """Training (left) and validation (right) loss against step; a line per run. The
    validation panel shades the plateau window of the runs (the last ``plateau_fraction`` of
    their steps; one band per distinct run length)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False, layout="constrained")
    seeds = sorted(histories["seed"].unique())
    styles = ["-", "--", ":", "-."]
    for ax, split in zip(axes[0], ("train", "val")):
        rows = histories[histories["split"] == split]
        for (attention, seed), run in rows.groupby(["attention", "seed"], sort=True):
            run = run.sort_values("step")
            loss = run["loss"]
            if split == "train" and len(run) > 20:
                # per-step training loss is noisy: a running mean shows the trend
                loss = loss.rolling(max(1, len(run) // 20), min_periods=1).mean()
            ax.plot(
                run["step"],
                loss,
                color=METHOD_COLOURS[attention],
                linestyle=styles[seeds.index(seed) % len(styles)],
                marker="o" if split == "val" else None,
                markersize=3,
                label=f"{attention}, seed {seed}",
            )
        if split == "val":
            for i, (start, end) in enumerate(plateau_windows(histories, plateau_fraction)):
                ax.axvspan(
                    start, end, color="0.85", zorder=0,
                    label=f"plateau window (last {plateau_fraction:.0%})" if i == 0 else None,
                )  # fmt: skip
        ax.set_title(f"{'training' if split == 'train' else 'validation'} loss")
        ax.set_xlabel("step")
        ax.set_ylabel("masked-gene cross-entropy")
    handles, labels = axes[0][1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    fig.suptitle(dataset)
    return fig


# --------------------------------------------------------------------------------------------
# CLI


def run_metrics(args: argparse.Namespace) -> None:
    table = read_table(args.table, ("dataset", "method", "seed"))
    save_figure(plot_metrics(table), args.png, args.pdf)


def run_umap(args: argparse.Namespace) -> None:
    umap = read_table(args.umap, ("method", "seed", "umap1", "umap2", "label"))
    metrics = read_table(args.metrics, ("method", "seed")) if args.metrics else None
    save_figure(plot_umap(args.dataset, umap, metrics), args.png, args.pdf)


def run_loss(args: argparse.Namespace) -> None:
    if not 0.0 < args.plateau_fraction <= 1.0:
        raise ConfigError(
            f"figures loss: --plateau-fraction must be in (0, 1], got {args.plateau_fraction}"
        )
    histories = read_histories(args.histories, args.embeddings)
    save_figure(plot_loss(args.dataset, histories, args.plateau_fraction), args.png, args.pdf)


def register(subparsers) -> None:
    p = subparsers.add_parser("figures", help="figures of a run (PNG and PDF)")
    kinds = p.add_subparsers(dest="figure", required=True)

    def outputs(q):
        q.add_argument("--png", required=True, help="output PNG")
        q.add_argument("--pdf", required=True, help="output PDF")

    q = kinds.add_parser("metrics", help="every metric per dataset with seed spread")
    q.add_argument("--table", required=True, help="representation.csv")
    outputs(q)
    q.set_defaults(func=run_metrics)

    q = kinds.add_parser("umap", help="one dataset's UMAPs: softmax | sigmoid | PCA")
    q.add_argument("--dataset", required=True)
    q.add_argument("--umap", required=True, help="umap.csv of the dataset")
    q.add_argument("--metrics", default=None, help="metrics.csv of the dataset (ASW in titles)")
    outputs(q)
    q.set_defaults(func=run_umap)

    q = kinds.add_parser("loss", help="one dataset's training and validation loss curves")
    q.add_argument("--dataset", required=True)
    q.add_argument("--histories", nargs="+", required=True, help="history.csv of each run")
    q.add_argument(
        "--embeddings", nargs="+", required=True, help="each run's embedding, in the same order"
    )
    q.add_argument(
        "--plateau-fraction",
        type=float,
        default=PLATEAU_FRACTION,
        help="the last part of each run's steps shaded as its plateau window (default 0.2)",
    )
    outputs(q)
    q.set_defaults(func=run_loss)
