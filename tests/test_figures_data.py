"""The run's figures show the numbers they are drawn from (sigmoid_sc.figures).

Each figure is built from a small hand-made table and its data are read back from the
matplotlib artists: the metrics figure's dots, bars and whiskers are the table's values, means
and standard deviations at their dataset and method; the loss figure's lines are the runs'
histories; the UMAP panels hold exactly the cells of their embedding, coloured by cell type.
The stage's CLI is run once per figure with its files written, and the figure it saved is the
one checked.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from sigmoid_sc import cli
from sigmoid_sc import figures as fig_mod

DATASETS = ["beta", "alpha"]  # not sorted: the figure keeps the table's order
SEEDS = [0, 1, 2]
COLOUR = {method: to_rgba(c) for method, c in fig_mod.METHOD_COLOURS.items()}


def metrics_table() -> pd.DataFrame:
    rng = np.random.default_rng(11)
    rows = []
    for dataset in DATASETS:
        for method in ("softmax", "sigmoid"):
            for seed in SEEDS:
                rows.append(
                    {
                        "dataset": dataset,
                        "method": method,
                        "seed": seed,
                        "asw_label": round(rng.uniform(0.1, 0.9), 4),
                        "nmi_kmeans": round(rng.uniform(0.1, 0.9), 4),
                        "val_loss": round(rng.uniform(2.0, 4.0), 4),
                        "n_cells": 50,
                    }
                )
        rows.append(
            {
                "dataset": dataset,
                "method": "pca",
                "seed": -1,
                "asw_label": round(rng.uniform(0.1, 0.9), 4),
                "nmi_kmeans": round(rng.uniform(0.1, 0.9), 4),
                "val_loss": np.nan,
                "n_cells": 50,
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture
def saved(monkeypatch):
    """The figures the CLI saves, by PNG name (the files are written as usual)."""
    figures = {}
    save = fig_mod.save_figure

    def keep(fig, png, pdf):
        figures[str(png)] = fig
        save(fig, png, pdf)

    monkeypatch.setattr(fig_mod, "save_figure", keep)
    yield figures
    for fig in figures.values():
        fig_mod.pyplot().close(fig)


def run_cli(tmp_path, saved, *args):
    png, pdf = tmp_path / "out.png", tmp_path / "out.pdf"
    assert cli.main(["figures", *args, "--png", str(png), "--pdf", str(pdf)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    return saved[str(png)]


def method_of(colour) -> str:
    rgb = tuple(np.round(colour[:3], 4))
    (method,) = [m for m, c in COLOUR.items() if tuple(np.round(c[:3], 4)) == rgb]
    return method


def slot(x: float) -> tuple[str, str]:
    """(dataset, method) of an x position: dataset i at i, methods at -0.25, 0, +0.25."""
    i = int(round(x))
    j = int(round((x - i) / 0.25)) + 1
    return DATASETS[i], ("softmax", "sigmoid", "pca")[j]


# --------------------------------------------------------------------------------------------
# metrics


def test_metrics_figure_shows_the_table(tmp_path, saved):
    table = metrics_table()
    table.to_csv(tmp_path / "representation.csv", index=False)
    fig = run_cli(tmp_path, saved, "metrics", "--table", str(tmp_path / "representation.csv"))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert set(panels) == {"asw_label", "nmi_kmeans", "val_loss"}
    for metric, ax in panels.items():
        assert [t.get_text() for t in ax.get_xticklabels()] == DATASETS
        expected = {
            key: rows[metric].dropna().to_numpy()
            for key, rows in table.groupby(["dataset", "method"])
            if rows[metric].notna().any()
        }
        # dots: every seed's value, at its dataset and in its method's colour
        dots: dict[tuple[str, str], list[float]] = {}
        for points in ax.collections:
            if points.get_offsets().size == 0 or not hasattr(points, "get_facecolors"):
                continue
            if len(points.get_facecolors()) != 1 or points.get_offsets().shape[1] != 2:
                continue
            for x, y in points.get_offsets():
                dataset, method = slot(x)
                assert method_of(points.get_facecolors()[0]) == method, (metric, x)
                dots.setdefault((dataset, method), []).append(float(y))
        assert set(dots) == set(expected), metric
        for key, values in expected.items():
            assert sorted(dots[key]) == pytest.approx(sorted(values)), (metric, key)
        # bars: the mean of each (dataset, method), in its colour
        bars = {}
        for bar in ax.patches:
            key = slot(bar.get_x() + bar.get_width() / 2)
            assert method_of(bar.get_facecolor()) == key[1]
            bars[key] = bar.get_height()
        assert set(bars) == set(expected), metric
        for key, values in expected.items():
            assert bars[key] == pytest.approx(values.mean()), (metric, key)
        # whiskers: mean ± sd over seeds (ddof 1); one value (PCA): no spread
        whiskers = 0
        for container in ax.containers:
            if not hasattr(container, "has_yerr") or not container.has_yerr:
                continue
            (segments,) = container.lines[2]
            ((x, low), (_, high)) = segments.get_segments()[0]
            values = expected[slot(x)]
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            assert (low, high) == pytest.approx((values.mean() - sd, values.mean() + sd))
            whiskers += 1
        assert whiskers == len(expected), metric


# --------------------------------------------------------------------------------------------
# loss curves


def history(steps: int, eval_every: int, offset: float) -> pd.DataFrame:
    rng = np.random.default_rng(int(offset * 100))
    train = pd.DataFrame(
        {"step": np.arange(1, steps + 1), "split": "train"}
        | {"loss": offset + 3 * np.exp(-np.arange(steps) / 10) + rng.uniform(0, 0.1, steps)}
    )
    val_steps = np.arange(0, steps + 1, eval_every)
    val = pd.DataFrame(
        {"step": val_steps, "split": "val", "loss": offset + 3.2 * np.exp(-val_steps / 10)}
    )
    frame = pd.concat([val, train]).sample(frac=1.0, random_state=1)  # any row order
    return frame.assign(lr=1e-3, tokens=0, elapsed_s=0.0)


def lines_of(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
        for line in ax.get_lines()
    }


def test_long_training_curves_show_a_running_mean(tmp_path):
    """More than 20 training steps: the line is the mean of the last len // 20 steps; the
    validation points (51 here) are drawn as they are."""
    frame = history(100, 2, 0.7).assign(attention="sigmoid", seed=0)
    fig = fig_mod.plot_loss("blobs", frame)
    try:
        (x, y) = lines_of(fig.axes[0])["sigmoid, seed 0"]
        loss = frame[frame["split"] == "train"].sort_values("step")["loss"].to_numpy()
        window = 100 // 20
        want = [loss[max(0, i - window + 1) : i + 1].mean() for i in range(loss.size)]
        np.testing.assert_array_equal(x, np.arange(1, 101))
        np.testing.assert_allclose(y, want, rtol=1e-12)
        (_, val_y) = lines_of(fig.axes[1])["sigmoid, seed 0"]
        val = frame[frame["split"] == "val"].sort_values("step")["loss"].to_numpy()
        np.testing.assert_allclose(val_y, val, rtol=1e-12)  # validation points are not smoothed
    finally:
        fig_mod.pyplot().close(fig)


# --------------------------------------------------------------------------------------------
# UMAPs


def umap_table() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    frames = []
    for method, seeds in (("softmax", [1, 0]), ("sigmoid", [2, 1]), ("pca", [-1])):
        for seed in seeds:
            n = 30
            frames.append(
                pd.DataFrame(
                    {
                        "method": method,
                        "seed": seed,
                        "umap1": rng.normal(size=n).round(5),
                        "umap2": rng.normal(size=n).round(5),
                        "label": rng.choice(["B", "T", "NK"], size=n),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def test_umap_panels_hold_their_embedding_coloured_by_cell_type(tmp_path, saved):
    umap = umap_table()
    metrics = pd.DataFrame(
        {
            # another seed's row first: the title must pick its own seed's
            "method": ["softmax", "softmax", "sigmoid", "sigmoid", "pca"],
            "seed": [1, 0, 2, 1, -1],
            "asw_label": [0.1, 0.612, 0.2, 0.534, 0.401],
        }
    )
    umap.to_csv(tmp_path / "umap.csv", index=False)
    metrics.to_csv(tmp_path / "metrics.csv", index=False)
    fig = run_cli(tmp_path, saved, "umap", "--dataset", "blobs", "--umap",
                  str(tmp_path / "umap.csv"), "--metrics", str(tmp_path / "metrics.csv"))  # fmt: skip
    panels = [ax for ax in fig.axes if ax.collections]
    # the lowest seed of each kind, then PCA; each title gives that embedding's ASW
    expected = [("softmax", 0, "0.612"), ("sigmoid", 1, "0.534"), ("pca", -1, "0.401")]
    assert len(panels) == len(expected)
    colour_of_label: dict[str, tuple] = {}
    for ax, (method, seed, asw) in zip(panels, expected):
        assert ax.get_title().startswith(method) and f"ASW {asw}" in ax.get_title()
        cells = umap[(umap["method"] == method) & (umap["seed"] == seed)]
        (points,) = ax.collections
        drawn = sorted(map(tuple, np.asarray(points.get_offsets()).round(5)))
        assert drawn == sorted(zip(cells["umap1"], cells["umap2"]))
        # one colour per cell type, the same in every panel
        by_point = {
            tuple(np.round(xy, 5)): tuple(c)
            for xy, c in zip(points.get_offsets(), points.get_facecolors())
        }
        for x, y, label in zip(cells["umap1"], cells["umap2"], cells["label"]):
            colour = by_point[(x, y)]
            assert colour_of_label.setdefault(label, colour) == colour, label
    assert len(set(colour_of_label.values())) == 3
