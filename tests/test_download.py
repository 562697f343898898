"""The download stage: synthetic generator, scanpy source, and every bad input it must refuse.

A bad input must raise DataError (exit code 2 through the CLI) with a message naming the dataset
and the problem, and leave nothing under the output's name (not even a temporary file).
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sigmoid_sc import cli, config
from sigmoid_sc.download import load_dataset
from sigmoid_sc.errors import ConfigError, DataError
from sigmoid_sc.synthetic import symbol_names, synthetic_counts
from sigmoid_sc.validate import validate_raw


def test_synthetic_shape_types_batches():
    adata = synthetic_counts(
        n_cells=400, n_genes=200, n_cell_types=5, n_batches=3, seed=1, label_key="ct", batch_key="b"
    )
    assert adata.shape == (400, 200)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert set(adata.obs["ct"]) == {f"type_{t}" for t in range(5)}
    assert set(adata.obs["b"]) == {f"batch_{b}" for b in range(3)}
    X = adata.X.toarray()
    assert (X >= 0).all() and np.array_equal(X, np.round(X))  # counts
    expressed = (X > 0).sum(axis=1)
    assert expressed.min() > 0
    # droplet-like: mostly zeros, and cells differ in how many genes they express
    assert 0.4 < 1 - (X > 0).mean() < 0.95
    assert expressed.max() > 2 * expressed.min()
    # validates as a dataset
    validate_raw(adata, "syn", "ct", "b")


def test_synthetic_gene_symbols_name_genes_alike_in_every_seed_and_change_nothing_else():
    index = synthetic_counts(n_cells=60, n_genes=300, n_cell_types=3, seed=5)
    named = synthetic_counts(n_cells=60, n_genes=300, n_cell_types=3, seed=5, gene_names="symbols")
    assert (index.X != named.X).nnz == 0 and index.obs.equals(named.obs)
    names = list(named.var_names)
    assert names[:3] == ["SXAA0", "SXAA1", "SXAA2"] and names[10] == "SXAB0"
    assert names[260] == "SXBA0" and len(set(names)) == len(names)
    # another seed and size: the same names for the genes they both have
    other = synthetic_counts(n_cells=60, n_genes=120, n_cell_types=3, seed=9, gene_names="symbols")
    assert list(other.var_names) == names[:120]
    # past 26 x 26 x 10 genes the letters grow, still distinct
    assert len(set(symbol_names(7000))) == 7000
    with pytest.raises(ConfigError, match="synthetic.gene_names"):
        synthetic_counts(n_cells=60, n_genes=120, n_cell_types=3, gene_names="ensembl")


def test_synthetic_is_seeded_and_types_have_programmes():
    a = synthetic_counts(n_cells=300, n_genes=120, n_cell_types=3, n_batches=2, seed=7)
    b = synthetic_counts(n_cells=300, n_genes=120, n_cell_types=3, n_batches=2, seed=7)
    c = synthetic_counts(n_cells=300, n_genes=120, n_cell_types=3, n_batches=2, seed=8)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0
    # most cells are nearest their own type's mean profile (chance: 1/3); batch, a milder
    # shift, is less predictable than type
    X = np.log1p(a.X.toarray() / a.X.sum(axis=1).A * 1e4)

    def nearest_centroid_accuracy(labels):
        groups = np.unique(labels)
        centroids = np.stack([X[labels == g].mean(axis=0) for g in groups])
        nearest = groups[np.argmin(((X[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
        return (nearest == labels).mean()

    type_accuracy = nearest_centroid_accuracy(a.obs["cell_type"].to_numpy())
    batch_accuracy = nearest_centroid_accuracy(a.obs["batch"].to_numpy())
    assert type_accuracy > 0.8
    assert batch_accuracy < type_accuracy


def test_scanpy_source_pbmc68k_reduced_raw():
    entry = {
        "source": "scanpy",
        "name": "pbmc68k_reduced",
        "label_key": "bulk_labels",
        "use_raw": True,
        "normalized": True,
    }
    adata = load_dataset(config.dataset("pbmc68k", entry))
    assert adata.shape == (700, 765)  # .raw holds every gene
    assert adata.X.min() >= 0
    assert adata.obs["bulk_labels"].nunique() == 10
    assert adata.uns["sigmoid_sc"] == {
        "dataset": "pbmc68k",
        "source": "scanpy",
        "label_key": "bulk_labels",
        "normalized": True,
    }
    # without use_raw, X is the scaled matrix: negative values are refused
    with pytest.raises(DataError, match=r"'pbmc68k'.*negative"):
        load_dataset(config.dataset("pbmc68k", {**entry, "use_raw": False}))


def test_config_errors():
    with pytest.raises(ConfigError, match=r"datasets.d.source must be one of .*; got 'nope'"):
        config.dataset("d", {"source": "nope", "label_key": "x"})
    with pytest.raises(ConfigError, match="unknown key datasets.d.synthetic.n_cell"):
        config.dataset("d", {"source": "synthetic", "label_key": "ct", "synthetic": {"n_cell": 5}})
    # what only scanpy knows is checked when the dataset loads
    with pytest.raises(ConfigError, match="no dataset 'not_a_dataset'"):
        load_dataset(
            config.dataset("d", {"source": "scanpy", "name": "not_a_dataset", "label_key": "x"})
        )


# ---- bad inputs through the CLI: error message, exit code, no output ----------------------


def _good(n_cells: int = 12, n_genes: int = 8) -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32) + 1
    obs = pd.DataFrame(
        {
            "cell_type": [f"t{i % 3}" for i in range(n_cells)],
            "batch": [f"b{i % 2}" for i in range(n_cells)],
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


def _with_x(adata, X):
    adata.X = X
    return adata


def _single_type(adata):
    adata.obs["cell_type"] = "t0"
    return adata


def _empty_cells(adata):
    X = adata.X.copy()
    X[[2, 5, 9]] = 0
    adata.X = sp.csr_matrix(X)  # stored sparse, as most real files
    return adata


def _nan(adata):
    adata.X[1, 1] = np.nan
    return adata


def _inf(adata):
    adata.X[1, 1] = np.inf
    return adata


def _negative(adata):
    adata.X[3, 2] = -1.5
    return adata


BAD_INPUTS = {
    # case: (make the bad AnnData, entry changes, words the message must contain)
    "missing label_key": (
        lambda a: a,
        {"label_key": "celltype"},
        ["label_key 'celltype'", "available columns: cell_type, batch"],
    ),
    "missing batch_key": (lambda a: a, {"batch_key": "donor"}, ["batch_key 'donor'"]),
    "nan": (_nan, {}, ["1 NaN"]),
    "inf": (_inf, {}, ["1 infinite"]),
    "negative": (_negative, {}, ["1 negative"]),
    "empty cells": (_empty_cells, {}, ["3 of 12 cells have no expressed genes", "c2, c5, c9"]),
    "single cell type": (_single_type, {}, ["single cell type"]),
    "empty matrix": (lambda a: a[:, []].copy(), {}, ["empty matrix", "0 genes"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_names_dataset_and_leaves_no_output(case, tmp_path, capsys):
    make_bad, entry_change, words = BAD_INPUTS[case]
    src = tmp_path / "input.h5ad"
    make_bad(_good()).write_h5ad(src)
    entry = {"source": "path", "path": str(src), "label_key": "cell_type", "batch_key": "batch"}
    entry.update(entry_change)
    out_dir = tmp_path / "results" / "mydata"
    out = out_dir / "raw.h5ad"

    with pytest.raises(DataError) as excinfo:
        load_dataset(config.dataset("mydata", entry))
    message = str(excinfo.value)
    assert "'mydata'" in message
    for word in words:
        assert word in message

    code = cli.main(
        ["download", "--dataset", "mydata", "--entry-json", json.dumps(entry), "--out", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "'mydata'" in err and words[0] in err
    assert not out.exists()
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_good_input_written_with_provenance(tmp_path):
    src = tmp_path / "input.h5ad"
    _good().write_h5ad(src)
    out = tmp_path / "raw.h5ad"
    entry = {"source": "path", "path": str(src), "label_key": "cell_type", "batch_key": "batch"}
    code = cli.main(
        ["download", "--dataset", "mine", "--entry-json", json.dumps(entry), "--out", str(out)]
    )
    assert code == 0
    raw = ad.read_h5ad(out)
    assert raw.shape == (12, 8) and sp.issparse(raw.X)
    info = raw.uns["sigmoid_sc"]
    assert info["source"] == "path" and info["batch_key"] == "batch"
    assert info["normalized"] is False or info["normalized"] == np.False_
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
