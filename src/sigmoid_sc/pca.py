"""The ``pca`` sub-command: a PCA baseline of the test cells, scored like the models' embeddings.

The principal axes are fitted on the *training* cells only and the test cells are projected on
them, the same protocol as the transformer (which never sees test cells while training), so the
baseline gets no information the models lack. Input is the log-normalised expression of
``prepared.h5ad`` (log1p CP10K), centred on the training mean and not scaled per gene.

Output ``embed/pca.npz``: ``X_emb`` float32 ``[n_test_cells, n_comps]``, ``obs_names`` (test
cells in prepared order), ``method = "pca"``, ``seed = -1``, ``val_loss = NaN``,
``split = "test"``.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import scipy.sparse as sp

from .errors import ConfigError, DataError
from .io import write_npz
from .runtime import log_to_stderr

log = logging.getLogger(__name__)

PCA_SEED = 0


def pca_embedding(adata, dataset: str, n_comps: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Fit PCA on the train cells of a prepared AnnData, project the test cells.

    ``n_comps`` is capped at ``min(n_train_cells, n_genes) - 1``. Returns ``(X_emb, obs_names)``:
    float32 ``[n_test_cells, n_comps]`` and the test cells' names in prepared order.
    """
    import scanpy as sc

    if n_comps < 1:
        raise ConfigError(f"pca: --n-comps must be >= 1, got {n_comps}")
    if "split" not in adata.obs:
        raise DataError(
            f"dataset {dataset!r}: prepared data has no obs['split']; run prepare first"
        )
    split = adata.obs["split"].astype(str).to_numpy()
    train, test = split == "train", split == "test"
    if train.sum() < 3 or not test.any():
        raise DataError(
            f"dataset {dataset!r}: PCA needs >= 3 train cells and >= 1 test cell, got "
            f"{int(train.sum())} train and {int(test.sum())} test"
        )
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X_train, X_test = X[train], X[test]
    n_comps = min(n_comps, min(X_train.shape) - 1)

    # scanpy's PCA (arpack on the implicitly centred sparse matrix, seeded) gives the axes;
    # the projection of the test cells uses the same centring (the training mean)
    fit = sc.AnnData(X_train)
    sc.pp.pca(fit, n_comps=n_comps, zero_center=True, random_state=PCA_SEED)
    components = np.asarray(fit.varm["PCs"], dtype=np.float64)  # [n_genes, n_comps]
    mean = np.asarray(X_train.mean(axis=0), dtype=np.float64).ravel()
    X_emb = np.asarray(X_test @ components) - mean @ components
    return X_emb.astype(np.float32), np.asarray(adata.obs_names[test], dtype=str)


def run_pca(args: argparse.Namespace) -> None:
    log_to_stderr()
    import anndata as ad

    adata = ad.read_h5ad(args.input)
    X_emb, obs_names = pca_embedding(adata, args.dataset, args.n_comps)
    write_npz(
        args.output,
        X_emb=X_emb,
        obs_names=obs_names,
        method=np.str_("pca"),
        seed=np.int64(-1),
        val_loss=np.float64(np.nan),
        split=np.str_("test"),
    )
    log.info("dataset %s: PCA %s of %d test cells", args.dataset, X_emb.shape[1], X_emb.shape[0])


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pca", help="PCA baseline (fit on train cells, project test cells): embed/pca.npz"
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--input", required=True, help="prepared.h5ad")
    p.add_argument("--output", required=True, help="embed/pca.npz")
    p.add_argument("--n-comps", type=int, default=50, help="number of components (default 50)")
    p.set_defaults(func=run_pca)
