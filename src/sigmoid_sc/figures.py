"""The ``figures`` stage: PNG and PDF figures of a run (headless, matplotlib's Agg backend).

``sigmoid-sc figures metrics``: every metric per dataset, softmax and sigmoid (one dot per
seed, mean ± sd) beside the PCA baseline, from ``representation.csv``.
``sigmoid-sc figures umap``: one dataset's UMAPs of softmax, sigmoid and PCA embeddings side by
side, coloured by cell type, from ``umap.csv`` (the lowest seed of each attention kind; the panel
titles give that embedding's ASW from ``metrics.csv``).
``sigmoid-sc figures loss``: one dataset's training and validation loss against steps, every
run's ``history.csv`` (its attention kind and seed are the run's record, as its embedding keeps
them; never parsed from a folder name).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd

from .config import ATTENTIONS
from .errors import DataError
from .io import atomic_path, read_table

METHOD_COLOURS = {"softmax": "#1f77b4", "sigmoid": "#d62728", "pca": "#7f7f7f"}
METHOD_ORDER = (*ATTENTIONS, "pca")
#: metrics with these names are drawn on their own scale, not [0, 1]
UNBOUNDED = frozenset({"val_loss"})


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
    skip = {"dataset", "method", "seed", "n_cells"}
    return [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])]


def plot_metrics(table: pd.DataFrame):
    """A panel per metric; per dataset, softmax, sigmoid and PCA side by side.

    Dots are seeds; a bar with whiskers is the mean ± sd over seeds.
    """
    plt = pyplot()
    metrics = metric_columns(table)
    datasets = list(pd.unique(table["dataset"]))
    methods = [m for m in METHOD_ORDER if m in set(table["method"])]
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    width = max(3.0, 0.9 * len(datasets) + 1.5)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, 2.8 * nrows), squeeze=False, layout="constrained"
    )
    offsets = np.linspace(-0.25, 0.25, len(methods)) if len(methods) > 1 else np.zeros(1)
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
                ax.bar(x, mean, width=0.22, color=METHOD_COLOURS[method], alpha=0.35)
                ax.errorbar(x, mean, yerr=sd, color=METHOD_COLOURS[method], capsize=3, lw=1)
                jitter = rng.uniform(-0.05, 0.05, len(values))
                ax.scatter(x + jitter, values, s=10, color=METHOD_COLOURS[method], zorder=3)
        ax.set_title(metric)
        ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
        if metric not in UNBOUNDED:
            ax.set_ylim(0, 1.05)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    # one legend for all panels (a panel may lack a method: PCA has no validation loss)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=METHOD_COLOURS[m], alpha=0.6, label=m) for m in methods
    ]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(methods), frameon=False)
    return fig


# --------------------------------------------------------------------------------------------
# UMAPs


def umap_panels(umap: pd.DataFrame) -> list[tuple[str, int]]:
    """(method, seed) of each panel: the lowest seed of softmax and sigmoid, then PCA."""
    panels = []
    for method in METHOD_ORDER:
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


def plot_loss(dataset: str, histories: pd.DataFrame):
    """Training (left) and validation (right) loss against step; a line per run."""
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
    histories = read_histories(args.histories, args.embeddings)
    save_figure(plot_loss(args.dataset, histories), args.png, args.pdf)


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
    outputs(q)
    q.set_defaults(func=run_loss)
