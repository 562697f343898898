"""The ``prepare`` stage: QC, normalisation, gene vocabulary and the train/val/test split.

Input ``raw.h5ad`` (from ``download``), output ``prepared.h5ad``:

- QC: cells with fewer than ``min_genes`` expressed genes are dropped, then genes expressed in
  fewer than ``min_cells`` cells, then (again) cells left with no expressed gene;
- normalisation: counts -> ``normalize_total`` to 10^4 per cell, then ``log1p`` (log1p CP10K);
  skipped when the data are ``normalized`` (the dataset entry says so; ``download`` records it
  in ``uns["sigmoid_sc"]`` with the label and batch keys). Counts are kept in ``layers["counts"]``.
  Non-integer "counts" (a batch of RPKM or normalised values in a counts layer) get the same
  transform, which keeps each cell's gene ranking; their number of cells is logged and kept in
  ``uns["sigmoid_sc"]["non_integer_cells"]``;
- optional ``n_top_genes`` highly variable genes (scanpy's ``seurat`` flavour on log values);
- the gene vocabulary is ``var_names`` in order: gene ``g`` gets token id ``g + 3``;
- ``obs["split"]`` in {train, val, test}: seeded and stratified by cell type, so both attention
  kinds (and the PCA baseline) see the same cells, and every cell type has cells in test.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import config
from .config import Prepare
from .errors import DataError
from .io import write_h5ad
from .runtime import log_to_stderr, parse_json_arg
from .validate import expressed_genes_per_cell, non_integer_cells, recorded_keys, validate_raw

log = logging.getLogger(__name__)

#: fewer cells than this after QC cannot give a train, val and test set worth scoring
MIN_CELLS_AFTER_QC = 30

SPLITS = ("train", "val", "test")


def stratified_split(labels, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Assign each cell to train, val or test, per cell type.

    Within each cell type (in sorted order of type names) the cells are shuffled by one seeded
    generator; ``round(n * test_fraction)`` go to test and ``round(n * val_fraction)`` to val, the
    rest to train. A small type still gets one test cell (if it has >= 2 cells) and one val cell
    (if it has >= 4), and keeps at least one training cell. Deterministic for a given
    ``labels`` sequence and ``seed``.

    Returns a str array ``[n_cells]`` of "train" / "val" / "test".
    """
    labels = np.asarray(pd.Series(labels).astype(str))
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):  # sorted: the generator's draws don't depend on obs order
        cells = np.flatnonzero(labels == label)
        cells = cells[rng.permutation(len(cells))]
        n = len(cells)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if test_fraction > 0 and n >= 2:
            n_test = max(1, n_test)
        if val_fraction > 0 and n >= 4:
            n_val = max(1, n_val)
        # keep at least one training cell per type when there is more than one cell
        while n >= 2 and n_test + n_val > n - 1:
            if n_val > 0 and n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        split[cells[:n_test]] = "test"
        split[cells[n_test : n_test + n_val]] = "val"
    return split.astype(str)


def prepare(adata, dataset: str, params: Prepare):
    """QC, normalise, select genes and split one raw dataset; returns the prepared AnnData.

    ``adata``: raw cells x genes as ``download`` wrote them: ``X`` counts (or log-normalised
    values), and in ``uns["sigmoid_sc"]`` the label and batch keys and ``normalized``.
    ``params``: the config's ``prepare`` section. Output: ``X`` float32 CSR log1p(CP10K) (or
    the given log-normalised values), ``layers["counts"]`` (counts inputs only),
    ``obs["split"]``, the label and batch columns, and the keys passed on in ``uns``.
    """
    import scanpy as sc

    label_key, batch_key, normalized = recorded_keys(adata.uns, dataset, "raw.h5ad")
    validate_raw(adata, dataset, label_key, batch_key)

    adata = adata.copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    n_cells_raw, n_genes_raw = adata.shape

    # QC. Cells first (drop near-empty droplets), then genes, then cells emptied by gene removal.
    keep_cells = expressed_genes_per_cell(adata.X) >= params.min_genes
    adata = adata[keep_cells].copy()
    if adata.n_obs:
        n_cells_per_gene = expressed_genes_per_cell(adata.X.T.tocsr())
        adata = adata[:, n_cells_per_gene >= params.min_cells].copy()
    if adata.n_obs and adata.n_vars:
        adata = adata[expressed_genes_per_cell(adata.X) > 0].copy()
    if adata.n_obs < MIN_CELLS_AFTER_QC or adata.n_vars == 0:
        raise DataError(
            f"dataset {dataset!r}: QC left {adata.n_obs} of {n_cells_raw} cells and {adata.n_vars} "
            f"of {n_genes_raw} genes (min_genes={params.min_genes}, min_cells={params.min_cells}); "
            f"need at least {MIN_CELLS_AFTER_QC} cells and 1 gene. Lower min_genes/min_cells."
        )
    labels = adata.obs[label_key].astype(str)
    if labels.nunique() < 2:
        raise DataError(
            f"dataset {dataset!r}: after QC only one cell type is left ({labels.iloc[0]!r}); "
            "cell-type separation needs at least two. Lower min_genes/min_cells."
        )
    adata.obs[label_key] = pd.Categorical(labels)
    if batch_key is not None:
        adata.obs[batch_key] = pd.Categorical(adata.obs[batch_key].astype(str))

    n_non_integer = 0 if normalized else non_integer_cells(adata.X)
    if n_non_integer:
        log.warning(
            "dataset %s: %d of %d cells have non-integer counts (RPKM or normalised values?); "
            "they are scaled to 10^4 per cell and log1p-transformed like counts",
            dataset, n_non_integer, adata.n_obs,
        )  # fmt: skip
    if not normalized:
        adata.layers["counts"] = adata.X.copy()
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)

    if params.n_top_genes is not None and params.n_top_genes < adata.n_vars:
        sc.pp.highly_variable_genes(adata, n_top_genes=params.n_top_genes, flavor="seurat")
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
        # a cell whose expressed genes were all dropped has nothing to tokenise
        adata = adata[expressed_genes_per_cell(adata.X) > 0].copy()
        if adata.n_obs < MIN_CELLS_AFTER_QC:
            raise DataError(
                f"dataset {dataset!r}: only {adata.n_obs} cells express any of the "
                f"{params.n_top_genes} highly variable genes; raise n_top_genes"
            )

    adata.uns.pop("log1p", None)  # scanpy's marker; its None base does not round-trip cleanly
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.sort_indices()
    adata.obs["split"] = pd.Categorical(
        stratified_split(
            adata.obs[label_key], params.val_fraction, params.test_fraction, params.split_seed
        ),
        categories=list(SPLITS),
    )
    info = {
        "dataset": dataset,
        "label_key": label_key,
        "normalized": normalized,
        "non_integer_cells": n_non_integer,
        "prepare": {k: v for k, v in dataclasses.asdict(params).items() if v is not None},
    }
    if batch_key is not None:
        info["batch_key"] = batch_key
    adata.uns["sigmoid_sc"] = info
    counts = adata.obs["split"].value_counts()
    log.info(
        "dataset %s: %d cells x %d genes after QC (train %d, val %d, test %d)",
        dataset,
        adata.n_obs,
        adata.n_vars,
        counts["train"],
        counts["val"],
        counts["test"],
    )
    return adata


def run_prepare(args: argparse.Namespace) -> None:
    log_to_stderr()
    import anndata as ad

    params = config.section("prepare", parse_json_arg(args.params_json, "prepare: --params-json"))
    adata = prepare(ad.read_h5ad(args.input), args.dataset, params)
    write_h5ad(args.output, adata)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="QC, normalise, pick the gene vocabulary and split cells: prepared.h5ad"
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--params-json", default="{}", help="the config's prepare section as JSON")
    p.add_argument("--input", required=True, help="raw.h5ad")
    p.add_argument("--output", required=True, help="prepared.h5ad")
    p.set_defaults(func=run_prepare)
