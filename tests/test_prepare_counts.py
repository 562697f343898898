"""prepare with a counts matrix that is partly not counts (a batch of RPKM or normalised
values, as in the scIB atlases' counts layers): the same transform for every cell, reported."""

import logging

import numpy as np
import scipy.sparse as sp

from sigmoid_sc import config
from sigmoid_sc.prepare import prepare
from sigmoid_sc.synthetic import synthetic_counts

PARAMS = config.section("prepare", {"min_genes": 1, "min_cells": 1})


def raw(X=None, seed=4):
    adata = synthetic_counts(n_cells=120, n_genes=60, n_cell_types=3, n_batches=2, seed=seed)
    if X is not None:
        adata.X = sp.csr_matrix(X)
    adata.uns["sigmoid_sc"] = {"label_key": "cell_type", "batch_key": "batch", "normalized": False}
    return adata


def test_non_integer_cells_are_normalised_like_counts_and_reported(caplog):
    counts = raw()
    rpkm = np.flatnonzero(counts.obs["batch"].astype(str) == "batch_1")
    dense = counts.X.toarray()
    dense[rpkm] *= 1.37  # a batch in other units: non-integer, same ranking within each cell
    with caplog.at_level(logging.WARNING, logger="sigmoid_sc.prepare"):
        out = prepare(raw(dense), "atlas", PARAMS)
    assert out.uns["sigmoid_sc"]["non_integer_cells"] == rpkm.size
    assert f"{rpkm.size} of 120 cells have non-integer counts" in caplog.text
    # the same transform as an integer cell: log1p of the cell scaled to 10^4
    cell, genes = rpkm[0], counts.var_names.get_indexer(out.var_names)  # genes in no cell: gone
    expected = np.log1p(dense[cell, genes] / dense[cell].sum() * 1e4)
    np.testing.assert_allclose(out.X[cell].toarray().ravel(), expected, rtol=1e-5)
    np.testing.assert_allclose(out.layers["counts"][cell].toarray().ravel(), dense[cell, genes])
    assert prepare(raw(), "counts", PARAMS).uns["sigmoid_sc"]["non_integer_cells"] == 0
