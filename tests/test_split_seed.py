"""prepare's ``split_seed`` reaches the split, through the function and through the CLI.

The split of a prepared dataset must be exactly ``stratified_split`` of its cell types with the
configured seed, and another seed must give another split (so a seed dropped on the way, or
replaced by a constant, fails here).
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from sigmoid_sc import cli, config
from sigmoid_sc.prepare import prepare, stratified_split
from sigmoid_sc.synthetic import synthetic_counts

ENTRY = {"source": "synthetic", "label_key": "cell_type", "batch_key": "batch"}
PARAMS = {"min_genes": 5, "min_cells": 1, "val_fraction": 0.15, "test_fraction": 0.25}


@pytest.fixture(scope="module")
def raw():
    adata = synthetic_counts(n_cells=160, n_genes=60, n_cell_types=3, seed=6)
    # what download records beside the data: prepare reads the keys from here
    adata.uns["sigmoid_sc"] = {"dataset": "syn", "source": "synthetic", "normalized": False,
                               "label_key": ENTRY["label_key"], "batch_key": ENTRY["batch_key"]}  # fmt: skip
    return adata


def expected_split(prepared, seed: int) -> np.ndarray:
    return stratified_split(
        prepared.obs["cell_type"], PARAMS["val_fraction"], PARAMS["test_fraction"], seed
    )


def split_of(prepared) -> np.ndarray:
    return prepared.obs["split"].astype(str).to_numpy()


def test_stratified_split_depends_on_its_seed(raw):
    labels = raw.obs["cell_type"]
    a = stratified_split(labels, 0.15, 0.25, 0)
    assert np.array_equal(a, stratified_split(labels, 0.15, 0.25, 0))
    assert not np.array_equal(a, stratified_split(labels, 0.15, 0.25, 3))


@pytest.mark.parametrize("seed", [0, 3])
def test_prepare_splits_with_the_configured_seed(raw, seed):
    prepared = prepare(raw, "syn", config.section("prepare", {**PARAMS, "split_seed": seed}))
    np.testing.assert_array_equal(split_of(prepared), expected_split(prepared, seed))
    other = 3 if seed == 0 else 0
    assert not np.array_equal(split_of(prepared), expected_split(prepared, other))
    assert prepared.uns["sigmoid_sc"]["prepare"]["split_seed"] == seed


def test_prepare_without_split_seed_uses_seed_zero(raw):
    prepared = prepare(raw, "syn", config.section("prepare", PARAMS))
    np.testing.assert_array_equal(split_of(prepared), expected_split(prepared, 0))


def test_the_cli_passes_split_seed_to_the_split(raw, tmp_path):
    raw_path = tmp_path / "raw.h5ad"
    raw.write_h5ad(raw_path)
    splits = {}
    for seed in (0, 3):
        out = tmp_path / f"prepared_{seed}.h5ad"
        code = cli.main(
            ["prepare", "--dataset", "syn", "--input", str(raw_path), "--output", str(out),
             "--params-json", json.dumps({**PARAMS, "split_seed": seed})]
        )  # fmt: skip
        assert code == 0
        prepared = ad.read_h5ad(out)
        np.testing.assert_array_equal(split_of(prepared), expected_split(prepared, seed))
        splits[seed] = split_of(prepared)
    assert not np.array_equal(splits[0], splits[3])
