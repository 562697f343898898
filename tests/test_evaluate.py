"""evaluate (scib-metrics, UMAP) and the PCA baseline.

The first scib-metrics call in a process compiles JAX and numba code (tens of seconds); the
tests share one process, so only the first pays it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sigmoid_sc import cli, config
from sigmoid_sc.download import load_dataset
from sigmoid_sc.errors import DataError
from sigmoid_sc.evaluate import BATCH_METRICS, LABEL_METRICS, score_embedding
from sigmoid_sc.pca import pca_embedding
from sigmoid_sc.prepare import prepare


@pytest.fixture(autouse=True)
def _compile_caches(tmp_path_factory, monkeypatch):
    # keep the tests' compilation caches out of the working tree
    root = tmp_path_factory.getbasetemp() / "compile-cache"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(root / "numba"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(root / "jax"))


def clusters(n_per: int = 40, n_types: int = 4, dim: int = 8, spread: float = 1.0, seed: int = 0):
    """Gaussian blobs, one per type, centres 20 apart; two batches mixed within each type."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_types, dim))
    centres *= 20.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat([f"type_{t}" for t in range(n_types)], n_per)
    X = centres[np.repeat(np.arange(n_types), n_per)] + rng.normal(0, spread, (len(labels), dim))
    batches = np.array([f"b{i % 2}" for i in range(len(labels))])
    return X.astype(np.float32), labels, batches


def test_separated_clusters_score_high_and_shuffled_labels_low():
    X, labels, batches = clusters()
    good = score_embedding(X, labels, batches, n_neighbors=15)
    assert set(good) == set(LABEL_METRICS) | set(BATCH_METRICS)
    assert good["asw_label"] > 0.8
    assert good["nmi_kmeans"] > 0.95 and good["ari_kmeans"] > 0.95
    assert good["nmi_leiden"] > 0.9 and good["ari_leiden"] > 0.9
    assert good["clisi"] > 0.95
    assert good["isolated_labels"] > 0.8
    # batches are mixed within each type: good batch scores
    assert good["ilisi"] > 0.7 and good["asw_batch"] > 0.8 and good["graph_connectivity"] > 0.9

    shuffled = np.random.default_rng(1).permutation(labels)
    bad = score_embedding(X, shuffled, batches, n_neighbors=15)
    assert bad["asw_label"] < 0.52  # silhouette ~0 or below -> rescaled <= ~0.5
    assert bad["nmi_kmeans"] < 0.2 and bad["ari_kmeans"] < 0.1
    assert bad["nmi_leiden"] < 0.3
    assert bad["clisi"] < 0.6
    assert bad["graph_connectivity"] < good["graph_connectivity"]


def test_batch_separated_embedding_scores_low_mixing():
    X, labels, _ = clusters()
    batches = np.array([f"b{i % 2}" for i in range(len(labels))])
    X = X.copy()
    X[batches == "b1"] += 8.0  # every type split in two by batch
    split = score_embedding(X, labels, batches, n_neighbors=15)
    X0, _, _ = clusters()
    mixed = score_embedding(X0, labels, batches, n_neighbors=15)
    # LISI's 90 neighbours exceed a type's 20 cells per batch, so even split types see some
    # of the other batch: compare rather than expect 0
    assert split["ilisi"] < 0.5 * mixed["ilisi"]
    assert split["asw_batch"] < mixed["asw_batch"]
    # without batches, no batch columns
    assert set(score_embedding(X0, labels, None)) == set(LABEL_METRICS)


def test_pca_and_evaluate_cli(tmp_path):
    entry = {"source": "synthetic", "label_key": "cell_type", "batch_key": "batch",
             "synthetic": {"n_cells": 240, "n_genes": 100, "n_cell_types": 3, "n_batches": 2}}  # fmt: skip
    raw = load_dataset(config.dataset("syn", entry))  # the keys in uns, as download writes them
    prepared = prepare(raw, "syn", config.section("prepare", {"min_genes": 5, "min_cells": 1}))
    prepared_path = tmp_path / "prepared.h5ad"
    prepared.write_h5ad(prepared_path)

    # PCA baseline: fitted on train cells, test cells projected, deterministic
    pca_path = tmp_path / "embed" / "pca.npz"
    args = ["pca", "--dataset", "syn", "--input", str(prepared_path), "--output", str(pca_path)]
    assert cli.main([*args, "--n-comps", "10"]) == 0
    emb = np.load(pca_path)
    test_names = prepared.obs_names[prepared.obs["split"] == "test"].tolist()
    assert emb["X_emb"].shape == (len(test_names), 10) and emb["X_emb"].dtype == np.float32
    assert emb["obs_names"].tolist() == test_names
    assert str(emb["method"]) == "pca" and int(emb["seed"]) == -1 and np.isnan(emb["val_loss"])
    X_again, _ = pca_embedding(prepared, "syn", n_comps=10)
    np.testing.assert_allclose(np.abs(X_again), np.abs(emb["X_emb"]), rtol=1e-4, atol=1e-4)

    # a "model" embedding: noisy one-hot of the type, seed 3, val_loss 2.5
    labels = prepared.obs.loc[test_names, "cell_type"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    X_model = np.eye(3)[labels] * 5 + rng.normal(0, 0.3, (len(labels), 3))
    model_path = tmp_path / "embed" / "sigmoid_seed3.npz"
    np.savez(
        model_path,
        X_emb=X_model.astype(np.float32),
        obs_names=np.array(test_names),
        method=np.str_("sigmoid"),
        seed=np.int64(3),
        val_loss=np.float64(2.5),
        split=np.str_("test"),
    )

    metrics_path, umap_path = tmp_path / "metrics.csv", tmp_path / "umap.csv"
    base = [
        "evaluate", "--dataset", "syn", "--prepared", str(prepared_path),
        "--params-json", json.dumps({"n_neighbors": 10}),
        "--metrics", str(metrics_path), "--umap", str(umap_path),
    ]  # fmt: skip
    assert cli.main([*base, "--embeddings", str(pca_path), str(model_path)]) == 0
    metrics = pd.read_csv(metrics_path)
    assert list(metrics.columns) == [
        "dataset", "method", "seed", "val_loss", "n_cells", *LABEL_METRICS, *BATCH_METRICS
    ]  # fmt: skip
    assert metrics["method"].tolist() == ["pca", "sigmoid"]
    assert metrics["seed"].tolist() == [-1, 3]
    assert np.isnan(metrics.loc[0, "val_loss"]) and metrics.loc[1, "val_loss"] == 2.5
    assert (metrics["n_cells"] == len(test_names)).all()
    assert metrics.loc[1, "asw_label"] > 0.85 and metrics.loc[1, "nmi_kmeans"] > 0.95
    umap = pd.read_csv(umap_path)
    assert list(umap.columns) == [
        "dataset", "method", "seed", "obs_name", "umap1", "umap2", "label", "batch"
    ]  # fmt: skip
    assert len(umap) == 2 * len(test_names)
    assert np.isfinite(umap[["umap1", "umap2"]].to_numpy()).all()

    # an embedding of cells that are not in prepared.h5ad: DataError, no outputs
    stray = tmp_path / "embed" / "softmax_seed0.npz"
    np.savez(stray, X_emb=X_model.astype(np.float32), obs_names=np.array(["x"] * len(labels)))
    metrics_path.unlink()
    umap_path.unlink()
    args = cli.build_parser().parse_args([*base, "--embeddings", str(pca_path), str(stray)])
    with pytest.raises(DataError, match=r"'syn'.*cells not in the prepared data"):
        args.func(args)
    assert not metrics_path.exists() and not umap_path.exists()
