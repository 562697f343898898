"""The ``evaluate`` stage: scib-metrics and UMAP coordinates of every embedding of one dataset.

All embeddings of a dataset (each model x seed, and the PCA baseline) are scored in one process,
so JAX (scib-metrics) and numba (UMAP, pynndescent) compile once; their compilation caches are
also persisted on disk (``NUMBA_CACHE_DIR``, ``JAX_COMPILATION_CACHE_DIR``; default
``.cache/numba`` and ``.cache/jax`` under the working directory unless already set) so the next
process starts warm.

Metrics (columns of ``metrics.csv``; higher is better for all of them):

=========================  =======  ======================================================
column                     range    meaning
=========================  =======  ======================================================
``asw_label``              [0, 1]   cell-type separation: silhouette of cell-type labels,
                                    rescaled ``(s + 1) / 2`` (scib ``silhouette_label``,
                                    euclidean; ``s`` the mean over cells)
``asw_label_raw``          [-1, 1]  the same silhouette ``s`` before rescaling: differences
                                    are twice those of ``asw_label``
``nmi_kmeans``             [0, 1]   NMI of k-means clusters (k = number of cell types) vs labels
``ari_kmeans``             ~[0, 1]  ARI of the same (0 = chance; can dip slightly below 0)
``nmi_leiden``             [0, 1]   NMI of Leiden clusters on the kNN graph vs labels, best of
                                    10 resolutions (0.2 ... 2.0)
``ari_leiden``             ~[0, 1]  ARI at that resolution
``clisi``                  [0, 1]   cell-type LISI, rescaled: 1 = neighbourhoods of one type
``isolated_labels``        [0, 1]   rescaled ``(s + 1) / 2`` silhouette of the labels present
                                    in the fewest batches (mean over cells of each such label,
                                    then over labels; without ``batch_key`` all cells form one
                                    batch, so every label counts: the label-averaged ASW)
``isolated_labels_raw``    [-1, 1]  the same before rescaling
``knn_accuracy``           [0, 1]   cell-type accuracy of a kNN classifier (k = ``n_neighbors``,
                                    euclidean, majority vote) under stratified 5-fold
                                    cross-validation with seeded folds (see :func:`knn_accuracy`)
``asw_batch``              [0, 1]   batch mixing within each cell type: ``1 - |ASW of batch|``
``ilisi``                  [0, 1]   batch LISI, rescaled: 1 = neighbourhoods mix all batches
``graph_connectivity``     [0, 1]   fraction of each type's cells in its largest kNN component
=========================  =======  ======================================================

The batch metrics appear only when the dataset has a ``batch_key`` (recorded in prepared.h5ad;
``asw_batch`` has no raw form worth reporting: it rescales ``|s|``, so its raw value is
``1 - asw_batch``). Each row also carries ``dataset, method, seed, val_loss, steps, stop_reason, plateau, n_cells``, as stored in
the embedding (:mod:`sigmoid_sc.embed`): the model's validation loss (NaN for PCA), the steps
it trained (0 untrained, -1 for PCA), why its training stopped and whether it reached its
plateau (empty: not recorded). An embedding file may hold further poolings of the same cells,
``X_emb_<pooling>`` beside ``X_emb``: each is scored as method ``<method>_<pooling>`` (a CLS
model's ``sigmoid_cls``). Any method name is scored alike.

Neighbours are exact euclidean kNN (self included): ``n_neighbors`` (config, default 15) for
Leiden and graph connectivity, 90 for the LISI metrics (perplexity 30, as scib-metrics'
Benchmarker), both capped at ``n_cells - 1``.

``umap.csv``: ``dataset, method, seed, obs_name, umap1, umap2, label`` (+ ``batch``): a UMAP of
each embedding (umap-learn, ``random_state=0``, the same ``n_neighbors``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import config
from .config import Evaluate
from .errors import ConfigError, DataError
from .io import write_csv
from .runtime import log_to_stderr, parse_json_arg
from .validate import recorded_keys

log = logging.getLogger(__name__)

#: neighbours for LISI: scib-metrics' Benchmarker uses 90 (perplexity 90 / 3 = 30, as Harmony)
LISI_NEIGHBORS = 90
SEED = 0
#: folds of the kNN accuracy's stratified cross-validation
KNN_FOLDS = 5

LABEL_METRICS = (
    "asw_label",
    "asw_label_raw",
    "nmi_kmeans",
    "ari_kmeans",
    "nmi_leiden",
    "ari_leiden",
    "clisi",
    "isolated_labels",
    "isolated_labels_raw",
    "knn_accuracy",
)
#: what an embedding carries besides its scores (columns before the metrics in metrics.csv)
EMBEDDING_COLUMNS = ("val_loss", "steps", "stop_reason", "plateau")
BATCH_METRICS = ("asw_batch", "ilisi", "graph_connectivity")


def setup_compile_caches(root: str | os.PathLike | None = None) -> dict[str, str]:
    """Point numba's and JAX's on-disk compilation caches at ``root`` (default ``./.cache``).

    Variables the user already set win. Call before scib-metrics/umap compile anything; if numba
    was already imported its config is reloaded so the cache folder still applies.
    Returns the folders used.
    """
    root = Path(root) if root is not None else Path.cwd() / ".cache"
    os.environ.setdefault("NUMBA_CACHE_DIR", str(root / "numba"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax"))
    folders = {
        "numba": os.environ["NUMBA_CACHE_DIR"],
        "jax": os.environ["JAX_COMPILATION_CACHE_DIR"],
    }
    for folder in folders.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    if "numba" in sys.modules:
        from numba.core import config as numba_config

        numba_config.reload_config()
    import jax

    jax.config.update("jax_compilation_cache_dir", folders["jax"])
    # the default keeps only programs that took >= 1 s to compile; scib's many small ones add up
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folders


def _codes(values) -> np.ndarray:
    """Integer codes ``{0..k-1}`` of a label or batch column (scib wants numeric labels)."""
    return np.asarray(pd.Categorical(np.asarray(values, dtype=str)).codes, dtype=np.int32)


def exact_neighbors(X: np.ndarray, k: int):
    """Exact euclidean kNN of the rows of ``X`` [n_cells, d], self first: a NeighborsResults."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return NeighborsResults(indices=indices, distances=distances.astype(np.float32))


def rescale_silhouette(s: float) -> float:
    """A silhouette in [-1, 1] mapped to [0, 1]: ``(s + 1) / 2`` (scib's ``rescale=True``)."""
    return (s + 1.0) / 2.0


def knn_accuracy(
    X: np.ndarray, labels, n_neighbors: int = 15, n_folds: int = KNN_FOLDS, seed: int = SEED
) -> float:
    """Cross-validated kNN cell-type accuracy of the embedding ``X`` [n_cells, d].

    Stratified ``n_folds``-fold split (shuffled, seeded by ``seed``); each held-out cell is
    classified by the majority label of its ``n_neighbors`` nearest (euclidean) cells of the
    other folds (uniform weights; a tie goes to the label first in sorted order), and the
    result is the fraction of held-out cells classified right (every scored cell is held out
    exactly once). ``k`` is capped at the number of reference cells.

    Cells of a type with fewer than ``n_folds`` cells cannot be spread over the folds: they are
    never scored, but stay reference cells in every fold, so they can still take votes from
    (and mislead the classification of) the cells around them, as they would in any atlas.
    NaN when fewer than two types have ``n_folds`` cells.
    """
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    X = np.asarray(X, dtype=np.float32)
    codes = _codes(labels)
    counts = np.bincount(codes)
    scored = np.flatnonzero(counts[codes] >= n_folds)
    rare = np.flatnonzero(counts[codes] < n_folds)
    if len(np.unique(codes[scored])) < 2:
        log.warning("kNN accuracy: fewer than two cell types have %d cells; it is NaN", n_folds)
        return float("nan")
    if rare.size:
        log.info(
            "kNN accuracy: %d cells of %d types with fewer than %d cells are references only",
            rare.size, len(np.unique(codes[rare])), n_folds,
        )  # fmt: skip
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    correct = 0
    for train, test in folds.split(scored, codes[scored]):
        reference = np.concatenate([scored[train], rare])
        k = min(n_neighbors, reference.size)
        classifier = KNeighborsClassifier(n_neighbors=k).fit(X[reference], codes[reference])
        correct += int((classifier.predict(X[scored[test]]) == codes[scored[test]]).sum())
    return correct / scored.size


def score_embedding(
    X: np.ndarray,
    labels,
    batches=None,
    n_neighbors: int = 15,
) -> dict[str, float]:
    """scib metrics of one embedding ``X`` [n_cells, d] against cell-type ``labels`` [n_cells].

    ``batches`` [n_cells] (optional) adds the batch metrics. Ranges: see the module docstring.
    """
    import scib_metrics

    X = np.ascontiguousarray(X, dtype=np.float32)
    n_cells = X.shape[0]
    label_codes = _codes(labels)
    n_labels = len(np.unique(label_codes))
    if n_labels < 2:
        raise DataError(f"only one cell type among the {n_cells} scored cells: nothing to separate")
    k_graph = min(n_neighbors, n_cells - 1)
    k_lisi = min(max(LISI_NEIGHBORS, n_neighbors), n_cells - 1)
    neighbors = exact_neighbors(X, k_lisi)
    graph = neighbors.subset_neighbors(k_graph)

    scores: dict[str, float] = {}
    scores["asw_label_raw"] = float(scib_metrics.silhouette_label(X, label_codes, rescale=False))
    scores["asw_label"] = rescale_silhouette(scores["asw_label_raw"])
    kmeans = scib_metrics.nmi_ari_cluster_labels_kmeans(X, label_codes)
    scores["nmi_kmeans"], scores["ari_kmeans"] = kmeans["nmi"], kmeans["ari"]
    leiden = scib_metrics.nmi_ari_cluster_labels_leiden(
        graph, label_codes, optimize_resolution=True, seed=SEED
    )
    scores["nmi_leiden"], scores["ari_leiden"] = leiden["nmi"], leiden["ari"]
    scores["clisi"] = scib_metrics.clisi_knn(neighbors, label_codes)
    batch_codes = _codes(batches) if batches is not None else np.zeros(n_cells, dtype=np.int32)
    # a mean of per-cell silhouettes, so rescaling the mean equals scib's rescale=True
    scores["isolated_labels_raw"] = float(
        scib_metrics.isolated_labels(X, label_codes, batch_codes, rescale=False)
    )
    scores["isolated_labels"] = rescale_silhouette(scores["isolated_labels_raw"])
    scores["knn_accuracy"] = knn_accuracy(X, label_codes, n_neighbors, KNN_FOLDS, SEED)
    if batches is not None:
        if len(np.unique(batch_codes)) < 2:
            log.warning("only one batch among the scored cells: batch metrics are NaN")
            scores.update(dict.fromkeys(BATCH_METRICS, float("nan")))
        else:
            mixed = any(
                1 < len(np.unique(batch_codes[label_codes == t])) < (label_codes == t).sum()
                for t in np.unique(label_codes)
            )
            scores["asw_batch"] = (
                scib_metrics.silhouette_batch(X, label_codes, batch_codes, rescale=True)
                if mixed
                else float("nan")  # no cell type spans two batches: nothing to mix
            )
            scores["ilisi"] = scib_metrics.ilisi_knn(neighbors, batch_codes)
            scores["graph_connectivity"] = scib_metrics.graph_connectivity(graph, label_codes)
    names = [*LABEL_METRICS, *(BATCH_METRICS if batches is not None else ())]
    return {k: float(scores[k]) for k in names}


def umap_coordinates(X: np.ndarray, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP of ``X`` [n_cells, d] (umap-learn, seeded): float32 ``[n_cells, 2]``."""
    import umap

    n_cells = X.shape[0]
    reducer = umap.UMAP(
        n_neighbors=max(2, min(n_neighbors, n_cells - 1)),
        n_components=2,
        random_state=SEED,
        init="spectral" if n_cells > 10 else "random",
    )
    with warnings.catch_warnings():
        # seeded UMAP is single-threaded by design; its warning saying so is noise in every log
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        coords = reducer.fit_transform(np.asarray(X, dtype=np.float32))
    return coords.astype(np.float32)


def _scalar(arrays, key: str, default):
    if key not in arrays.files:
        return default
    value = arrays[key]
    return value.item() if value.shape == () else value


def _plateau(value) -> object:
    """The embedding's plateau flag for the table: True, False or None (not recorded)."""
    value = float(value)
    return None if not np.isfinite(value) else bool(value)


def load_embedding(path: str | os.PathLike, dataset: str) -> list[dict]:
    """Read an embedding npz: one dict per pooling it holds, ``X_emb`` first.

    Keys read: ``X_emb``, ``obs_names``, ``method``, ``seed``, ``val_loss``, ``steps``,
    ``stop_reason``, ``plateau`` (each optional but the first two), and every
    ``X_emb_<pooling>`` (method ``<method>_<pooling>``, the same cells and facts).
    """
    path = str(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"dataset {dataset!r}: cannot read embedding {path!r}: {exc}") from exc
    for key in ("X_emb", "obs_names"):
        if key not in arrays.files:
            raise DataError(f"dataset {dataset!r}: embedding {path!r} has no {key!r}")
    obs_names = np.asarray(arrays["obs_names"], dtype=str)
    method = str(_scalar(arrays, "method", Path(path).stem))
    facts = {
        "seed": int(_scalar(arrays, "seed", -1)),
        "val_loss": float(_scalar(arrays, "val_loss", np.nan)),
        "steps": int(_scalar(arrays, "steps", -1)),
        "stop_reason": str(_scalar(arrays, "stop_reason", "")),
        "plateau": _plateau(_scalar(arrays, "plateau", np.nan)),
    }
    poolings = ["X_emb"] + sorted(k for k in arrays.files if k.startswith("X_emb_"))
    out = []
    for key in poolings:
        X = np.asarray(arrays[key], dtype=np.float32)
        if X.ndim != 2 or X.shape[0] != len(obs_names):
            raise DataError(
                f"dataset {dataset!r}: embedding {path!r}: {key} has shape {X.shape} but "
                f"{len(obs_names)} obs_names"
            )
        if not np.isfinite(X).all():
            raise DataError(
                f"dataset {dataset!r}: embedding {path!r} has {int((~np.isfinite(X)).sum())} "
                f"non-finite values in {key} (a diverged model?)"
            )
        name = method if key == "X_emb" else f"{method}_{key[len('X_emb_') :]}"
        out.append({"X": X, "obs_names": obs_names, "method": name, **facts})
    return out


def evaluate(
    dataset: str,
    obs: pd.DataFrame,
    embedding_paths: list[str],
    params: Evaluate,
    label_key: str,
    batch_key: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every embedding against the prepared cells' ``obs`` (labels, batches by obs_names).

    ``params``: the config's ``evaluate`` section; ``label_key``, ``batch_key``: the columns of
    ``obs`` (prepared.h5ad records them). Returns ``(metrics, umap)`` frames, the contents of
    ``metrics.csv`` and ``umap.csv``.
    """
    for key, what in ((label_key, "label_key"), (batch_key, "batch_key")):
        if key is not None and key not in obs.columns:
            raise DataError(
                f"dataset {dataset!r}: {what} {key!r} is not a column of the prepared obs "
                f"(available: {', '.join(map(str, obs.columns))})"
            )
    if not embedding_paths:
        raise ConfigError(f"dataset {dataset!r}: no embeddings to evaluate")

    metric_rows, umap_frames = [], []
    loaded = [(path, emb) for path in embedding_paths for emb in load_embedding(path, dataset)]
    for path, emb in loaded:
        missing = ~np.isin(emb["obs_names"], obs.index)
        if missing.any():
            raise DataError(
                f"dataset {dataset!r}: embedding {str(path)!r} has {int(missing.sum())} cells not "
                f"in the prepared data, e.g. {', '.join(emb['obs_names'][missing][:5])}"
            )
        cells = obs.loc[emb["obs_names"]]
        labels = cells[label_key].astype(str).to_numpy()
        batches = cells[batch_key].astype(str).to_numpy() if batch_key else None
        log.info(
            "dataset %s: scoring %s seed %d (%d cells x %d dims)",
            dataset,
            emb["method"],
            emb["seed"],
            *emb["X"].shape,
        )
        started = time.perf_counter()
        scores = score_embedding(emb["X"], labels, batches, n_neighbors=params.n_neighbors)
        metric_rows.append(
            {
                "dataset": dataset,
                "method": emb["method"],
                "seed": emb["seed"],
                **{key: emb[key] for key in EMBEDDING_COLUMNS},
                "n_cells": emb["X"].shape[0],
                **scores,
            }
        )
        coords = umap_coordinates(emb["X"], n_neighbors=params.n_neighbors)
        frame = pd.DataFrame(
            {
                "dataset": dataset,
                "method": emb["method"],
                "seed": emb["seed"],
                "obs_name": emb["obs_names"],
                "umap1": coords[:, 0],
                "umap2": coords[:, 1],
                "label": labels,
            }
        )
        if batches is not None:
            frame["batch"] = batches
        umap_frames.append(frame)
        log.info(
            "dataset %s: %s seed %d scored in %.1f s (asw_label %.3f, nmi_leiden %.3f)",
            dataset, emb["method"], emb["seed"], time.perf_counter() - started,
            scores["asw_label"], scores["nmi_leiden"],
        )  # fmt: skip
    columns = ["dataset", "method", "seed", *EMBEDDING_COLUMNS, "n_cells", *LABEL_METRICS]
    if batch_key:
        columns += list(BATCH_METRICS)
    metrics = pd.DataFrame(metric_rows, columns=columns)
    return metrics, pd.concat(umap_frames, ignore_index=True)


def read_prepared_obs(path: str, dataset: str) -> tuple[pd.DataFrame, str, str | None]:
    """obs of prepared.h5ad (without loading X) and the label and batch keys it records."""
    import anndata as ad

    try:
        adata = ad.read_h5ad(path, backed="r")
    except (OSError, KeyError) as exc:
        raise DataError(f"dataset {dataset!r}: cannot read {path!r}: {exc}") from exc
    try:
        label_key, batch_key, _ = recorded_keys(adata.uns, dataset, path)
        return adata.obs.copy(), label_key, batch_key
    finally:
        adata.file.close()


def run_evaluate(args: argparse.Namespace) -> None:
    log_to_stderr()
    params = config.section("evaluate", parse_json_arg(args.params_json, "evaluate: --params-json"))
    folders = setup_compile_caches()
    log.info("compilation caches: %s", folders)
    obs, label_key, batch_key = read_prepared_obs(args.prepared, args.dataset)
    metrics, umap_frame = evaluate(args.dataset, obs, args.embeddings, params, label_key, batch_key)
    # both files are computed before either is written: a failure leaves neither
    write_csv(args.metrics, metrics)
    write_csv(args.umap, umap_frame)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="scib metrics and UMAP of every embedding: metrics.csv, umap.csv"
    )
    p.add_argument("--dataset", required=True)
    p.add_argument(
        "--prepared", required=True, help="prepared.h5ad (labels, batches and their keys)"
    )
    p.add_argument("--params-json", default="{}", help="the config's evaluate section as JSON")
    p.add_argument("--embeddings", nargs="+", required=True, help="embedding .npz files")
    p.add_argument("--metrics", required=True, help="output metrics.csv")
    p.add_argument("--umap", required=True, help="output umap.csv")
    p.set_defaults(func=run_evaluate)
