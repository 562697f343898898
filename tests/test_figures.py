"""The run's figures (sigmoid_sc.figures), read back from the axes: what is drawn is the data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sigmoid_sc import figures

METHODS = [
    "softmax", "sigmoid", "softmax_cls", "sigmoid_cls", "pca", "untrained_softmax",
    "untrained_sigmoid", "scvi",
]  # fmt: skip


def representation_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for d, dataset in enumerate(["a", "b"]):
        for m, method in enumerate(METHODS):
            seeds = [0, 1, 2] if method in METHODS[:4] else [-1]
            for seed in seeds:
                asw = 0.1 * m + 0.01 * d + 0.001 * (seed + 1)
                rows.append(
                    {
                        "dataset": dataset, "method": method, "seed": seed,
                        "val_loss": np.nan if method == "pca" else 3.0 + rng.random(),
                        "steps": 100, "stop_reason": "", "plateau": np.nan, "n_cells": 50,
                        "asw_label": asw, "asw_label_raw": 2 * asw - 1,
                    }
                )  # fmt: skip
    return pd.DataFrame(rows)


def panel(fig, title):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def test_metrics_figure_draws_every_method_and_seed():
    table = representation_table()
    fig = figures.plot_metrics(table)
    try:
        titles = {ax.get_title() for ax in fig.axes if ax.get_visible()}
        assert titles == {"val_loss", "asw_label", "asw_label_raw"}  # no steps, plateau, n_cells
        ax = panel(fig, "asw_label")
        # the bars: one per (dataset, method), its height the mean over seeds, in method order
        bars, dots = {}, {}
        for c in ax.containers:
            if c.get_label() in METHODS:
                bars.setdefault(c.get_label(), []).extend(c.patches)
        for c in ax.collections:
            if c.get_label() in METHODS:
                dots.setdefault(c.get_label(), []).append(c.get_offsets())
        assert set(bars) == set(dots) == set(METHODS)
        for method in METHODS:
            means = table[table["method"] == method].groupby("dataset")["asw_label"].mean()
            heights = [p.get_height() for p in bars[method]]
            np.testing.assert_allclose(heights, means.loc[["a", "b"]].to_numpy())
            # the dots: every seed's value, at its dataset's x position
            for i, dataset in enumerate(["a", "b"]):
                rows = table[(table["method"] == method) & (table["dataset"] == dataset)]
                xy = np.asarray(dots[method][i])
                np.testing.assert_allclose(np.sort(xy[:, 1]), np.sort(rows["asw_label"]))
                assert (np.abs(xy[:, 0] - i) < 0.4).all()
        # methods keep their order left to right within a dataset
        lefts = [bars[m][0].get_x() for m in METHODS]
        assert lefts == sorted(lefts)
        assert ax.get_ylim() == (0, 1.05)
        assert panel(fig, "asw_label_raw").get_ylim() == (-1.05, 1.05)
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == METHODS  # known methods in order, then the others
    finally:
        figures.pyplot().close(fig)


def histories() -> pd.DataFrame:
    frames = []
    for attention, seed, steps in (("softmax", 0, 100), ("sigmoid", 0, 100), ("sigmoid", 1, 60)):
        val_steps = np.arange(0, steps + 1, 20)
        frames.append(
            pd.DataFrame(
                {"step": val_steps, "split": "val", "loss": 5.0 - val_steps / 100 - 0.1 * seed,
                 "attention": attention, "seed": seed}
            )
        )  # fmt: skip
        train_steps = np.arange(1, steps + 1)
        frames.append(
            pd.DataFrame(
                {"step": train_steps, "split": "train", "loss": 6.0 - train_steps / 100,
                 "attention": attention, "seed": seed}
            )
        )  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def test_loss_figure_draws_every_validation_curve_and_the_plateau_windows():
    data = histories()
    fig = figures.plot_loss("toy", data)
    try:
        ax = panel(fig, "validation loss")
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"softmax, seed 0", "sigmoid, seed 0", "sigmoid, seed 1"}
        run = data[
            (data["split"] == "val") & (data["attention"] == "sigmoid") & (data["seed"] == 1)
        ]
        np.testing.assert_array_equal(lines["sigmoid, seed 1"].get_xdata(), run["step"])
        np.testing.assert_allclose(lines["sigmoid, seed 1"].get_ydata(), run["loss"])
        assert lines["softmax, seed 0"].get_color() == figures.METHOD_COLOURS["softmax"]
        # one shaded window per distinct run length: the last 20% of 60 and of 100 steps
        spans = sorted(
            (p.get_x(), p.get_x() + p.get_width()) for p in ax.patches if p.get_width() > 0
        )
        assert spans == [pytest.approx((48.0, 60.0)), pytest.approx((80.0, 100.0))]
        assert figures.plateau_windows(data, 0.5) == [(30.0, 60.0), (50.0, 100.0)]
    finally:
        figures.pyplot().close(fig)


def test_umap_figure_keeps_its_three_panels():
    umap = pd.DataFrame(
        {
            "method": ["softmax", "sigmoid", "sigmoid_cls", "pca", "untrained_sigmoid"] * 4,
            "seed": [0, 0, 0, -1, 0] * 4,
            "umap1": np.arange(20.0), "umap2": np.arange(20.0), "label": ["x", "y"] * 10,
        }
    )  # fmt: skip
    assert figures.umap_panels(umap) == [("softmax", 0), ("sigmoid", 0), ("pca", -1)]
