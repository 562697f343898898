"""Checks on a raw dataset before anything is written or trained.

Every check raises :class:`~sigmoid_sc.errors.DataError` with a message that names the dataset and
the problem, so a bad input stops the pipeline at its first stage and leaves no output behind.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import DataError

#: how many offending cell names an error message lists
N_EXAMPLES = 5


def _examples(names) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(names[:N_EXAMPLES])
    return shown + (", ..." if len(names) > N_EXAMPLES else "")


def _values(X) -> np.ndarray:
    """The stored values of ``X`` (the non-zeros of a sparse matrix, all entries of a dense one)."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X)


def expressed_genes_per_cell(X) -> np.ndarray:
    """Number of genes with a value > 0, per cell: int64 ``[n_cells]``."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        positive = X.data > 0
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        return np.bincount(rows[positive], minlength=X.shape[0]).astype(np.int64)
    return (np.asarray(X) > 0).sum(axis=1).astype(np.int64)


def non_integer_cells(X) -> int:
    """Number of cells (rows) holding at least one non-integer value."""
    X = sp.csr_matrix(X)
    fractional = np.asarray(X.data != np.round(X.data))
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    return int(np.unique(rows[fractional]).size)


def recorded_keys(uns, dataset: str, path: str) -> tuple[str, str | None, bool]:
    """``(label_key, batch_key, normalized)`` as ``download`` recorded them in the data's
    ``uns["sigmoid_sc"]`` (``prepare`` passes them on); ``path`` names the file in messages."""
    info = uns.get("sigmoid_sc") if uns is not None else None
    if not info or "label_key" not in info:
        raise DataError(
            f"dataset {dataset!r}: {path} has no uns['sigmoid_sc']['label_key']; it was not "
            "written by `sigmoid-sc download` (or `prepare`): run the pipeline from download"
        )
    batch_key = info.get("batch_key") or None  # h5ad cannot store None: absent means no batch
    return (
        str(info["label_key"]),
        None if batch_key is None else str(batch_key),
        bool(info.get("normalized", False)),
    )


def check_obs_key(adata, dataset: str, key: str, what: str) -> None:
    """Raise if ``obs[key]`` is missing; ``what`` is "label_key" or "batch_key"."""
    if key not in adata.obs.columns:
        available = ", ".join(map(str, adata.obs.columns)) or "(none)"
        raise DataError(
            f"dataset {dataset!r}: {what} {key!r} is not a column of obs; "
            f"available columns: {available}. Set {what} in the dataset's config entry."
        )


def validate_raw(
    adata,
    dataset: str,
    label_key: str,
    batch_key: str | None = None,
) -> None:
    """Check a raw AnnData (cells x genes) for everything that would break a later stage.

    Checks, in order: a non-empty matrix; ``obs[label_key]`` and ``obs[batch_key]`` present and
    without missing values; every value of ``X`` finite and >= 0; every cell with at least one
    expressed gene; at least two cell types.
    """
    n_cells, n_genes = adata.shape
    if n_cells == 0 or n_genes == 0:
        raise DataError(f"dataset {dataset!r}: empty matrix ({n_cells} cells x {n_genes} genes).")

    check_obs_key(adata, dataset, label_key, "label_key")
    if batch_key is not None:
        check_obs_key(adata, dataset, batch_key, "batch_key")
    for key, what in ((label_key, "label_key"), (batch_key, "batch_key")):
        if key is None:
            continue
        missing = pd.isna(adata.obs[key]).to_numpy()
        if missing.any():
            raise DataError(
                f"dataset {dataset!r}: {missing.sum()} cells have no value in obs[{key!r}] "
                f"({what}), e.g. {_examples(adata.obs_names[missing])}."
            )

    values = _values(adata.X)
    if not np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_:
        raise DataError(f"dataset {dataset!r}: X has non-numeric dtype {values.dtype}.")
    n_nan = int(np.isnan(values).sum()) if values.dtype.kind == "f" else 0
    n_inf = int(np.isinf(values).sum()) if values.dtype.kind == "f" else 0
    if n_nan or n_inf:
        raise DataError(
            f"dataset {dataset!r}: X contains {n_nan} NaN and {n_inf} infinite values; "
            "expression values must be finite."
        )
    n_negative = int((values < 0).sum())
    if n_negative:
        raise DataError(
            f"dataset {dataset!r}: X contains {n_negative} negative values (min {values.min():g}); "
            "expected counts or log-normalised expression (>= 0). A scaled matrix (e.g. after "
            "sc.pp.scale) cannot be rank-encoded: use the unscaled values (use_raw: true)."
        )

    n_expressed = expressed_genes_per_cell(adata.X)
    empty = n_expressed == 0
    if empty.any():
        raise DataError(
            f"dataset {dataset!r}: {int(empty.sum())} of {n_cells} cells have no expressed genes "
            f"(all values 0), e.g. {_examples(adata.obs_names[empty])}. Remove them from the input."
        )

    n_types = adata.obs[label_key].nunique()
    if n_types < 2:
        only = adata.obs[label_key].iloc[0]
        raise DataError(
            f"dataset {dataset!r}: obs[{label_key!r}] has a single cell type ({only!r}); "
            "cell-type separation needs at least two."
        )
