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
from sigmoid_sc.evaluate import (
    BATCH_METRICS,
    LABEL_METRICS,
    evaluate,
    knn_accuracy,
    score_embedding,
)
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
        "dataset", "method", "seed", "val_loss", "steps", "stop_reason", "plateau", "n_cells",
        *LABEL_METRICS, *BATCH_METRICS,
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


# ---------------------------------------------------------------------------------------------
# every reported metric against a value computed independently on a small fixed embedding


def fixed_embedding():
    """40 cells in 3 overlapping 2-D blobs (types a, b, c of 16, 14 and 10 cells), two batches;
    type c sits in batch b0 only (the isolated label). Silhouettes are middling, so raw and
    rescaled forms differ clearly."""
    rng = np.random.default_rng(7)
    sizes = {"a": 16, "b": 14, "c": 10}
    centres = {"a": (0.0, 0.0), "b": (2.5, 0.5), "c": (1.0, 2.5)}
    X = np.concatenate([rng.normal(centres[t], 1.0, (n, 2)) for t, n in sizes.items()])
    labels = np.repeat(list(sizes), list(sizes.values()))
    batches = np.array(["b0" if (t == "c" or i % 2) else "b1" for i, t in enumerate(labels)])
    return X.astype(np.float32), labels, batches


def distances(X):
    X = np.asarray(X, dtype=np.float64)
    return np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))


def silhouettes(X, labels):
    """Per-cell silhouette from its definition: (b - a) / max(a, b)."""
    D = distances(X)
    out = np.zeros(len(labels))
    for i, label in enumerate(labels):
        same = (labels == label) & (np.arange(len(labels)) != i)
        a = D[i, same].mean()
        b = min(D[i, labels == other].mean() for other in set(labels) - {label})
        out[i] = (b - a) / max(a, b)
    return out


def test_asw_raw_and_rescaled_against_the_silhouette_definition():
    X, labels, batches = fixed_embedding()
    s = silhouettes(X, labels)
    scores = score_embedding(X, labels, batches, n_neighbors=5)
    assert list(scores) == [*LABEL_METRICS, *BATCH_METRICS]
    assert 0.05 < s.mean() < 0.5  # the two forms are far apart here
    assert scores["asw_label_raw"] == pytest.approx(s.mean(), abs=1e-5)
    assert scores["asw_label"] == pytest.approx((s.mean() + 1) / 2, abs=1e-5)
    # isolated labels: type c alone is in the fewest batches; its cells' mean silhouette
    iso = s[labels == "c"].mean()
    assert scores["isolated_labels_raw"] == pytest.approx(iso, abs=1e-5)
    assert scores["isolated_labels"] == pytest.approx((iso + 1) / 2, abs=1e-5)
    # without batches every label is isolated: the mean over labels of each label's mean
    no_batch = score_embedding(X, labels, None, n_neighbors=5)
    per_label = np.mean([s[labels == t].mean() for t in "abc"])
    assert abs(per_label - s.mean()) > 1e-3  # label-averaged differs from cell-averaged
    assert no_batch["isolated_labels_raw"] == pytest.approx(per_label, abs=1e-5)
    assert no_batch["isolated_labels"] == pytest.approx((per_label + 1) / 2, abs=1e-5)


def comb2(n):
    return n * (n - 1) / 2


def nmi_ari_by_hand(labels, clusters):
    """NMI (arithmetic mean of the entropies) and ARI from the contingency table."""
    table = pd.crosstab(labels, clusters).to_numpy().astype(float)
    n = table.sum()
    a, b = table.sum(1), table.sum(0)
    nz = table > 0
    mi = (table[nz] / n * np.log(table[nz] * n / np.outer(a, b)[nz])).sum()
    h = lambda p: -(p / n * np.log(p / n)).sum()  # noqa: E731
    nmi = mi / ((h(a) + h(b)) / 2)
    index = sum(comb2(x) for x in table.ravel())
    expected = sum(comb2(x) for x in a) * sum(comb2(x) for x in b) / comb2(n)
    maximum = (sum(comb2(x) for x in a) + sum(comb2(x) for x in b)) / 2
    return nmi, (index - expected) / (maximum - expected)


def test_kmeans_nmi_and_ari_against_the_contingency_table():
    """Three far-apart tight blobs (k-means finds them for sure); the labels disagree with the
    blobs on 4 cells, so NMI and ARI sit well below 1 at values known by hand."""
    rng = np.random.default_rng(3)
    blob = np.repeat([0, 1, 2], [12, 10, 8])
    X = np.array([[0, 0], [30, 0], [0, 30]], dtype=float)[blob] + rng.normal(0, 0.5, (30, 2))
    labels = np.array(["x", "y", "z"])[blob]
    labels[[0, 1]] = "y"
    labels[[12]] = "z"
    labels[[22]] = "x"
    nmi, ari = nmi_ari_by_hand(labels, blob)
    assert 0.4 < ari < 0.9 and 0.4 < nmi < 0.9
    scores = score_embedding(X.astype(np.float32), labels, None, n_neighbors=5)
    assert scores["nmi_kmeans"] == pytest.approx(nmi, abs=1e-6)
    assert scores["ari_kmeans"] == pytest.approx(ari, abs=1e-6)


def simpson_by_hand(d, same_label_groups, perplexity):
    """Simpson index of one cell: Gaussian-kernel weights on its neighbours' distances ``d``
    with the bandwidth whose entropy is log(perplexity) (solved to machine precision)."""
    from scipy.optimize import brentq

    def entropy(beta):
        p = np.exp(-(d - d.min()) * beta)
        p /= p.sum()
        return -(p * np.log(np.clip(p, 1e-300, None))).sum()

    beta = brentq(lambda b: entropy(b) - np.log(perplexity), 1e-9, 1e4, xtol=1e-14)
    p = np.exp(-(d - d.min()) * beta)
    p /= p.sum()
    return sum(p[group].sum() ** 2 for group in same_label_groups)


def test_clisi_against_an_independent_lisi():
    """cLISI: per cell the inverse Simpson index of its neighbours' labels (self excluded),
    weighted by a kernel calibrated to perplexity k // 3 over its k nearest cells (k = 90
    capped at n - 1, self counted), median over cells, rescaled (L - LISI) / (L - 1)."""
    X, labels, batches = fixed_embedding()
    D = distances(X)
    n = len(labels)
    k = min(90, n - 1)
    lisi = []
    for i in range(n):
        nearest = [j for j in np.argsort(D[i], kind="stable")[:k] if j != i]
        d = D[i, nearest]
        groups = [np.flatnonzero(labels[nearest] == t) for t in "abc"]
        lisi.append(1.0 / simpson_by_hand(d, groups, perplexity=k // 3))
    expected = (3 - np.median(lisi)) / (3 - 1)
    assert 0.1 < expected < 0.9
    scores = score_embedding(X, labels, batches, n_neighbors=5)
    assert scores["clisi"] == pytest.approx(expected, abs=2e-3)


def test_knn_accuracy_on_an_embedding_whose_answer_is_known():
    """Three far-apart blobs of 10 cells; two cells labelled x sit inside blob y, so whatever
    the folds, with k = 5 they are voted y and every other cell is right: 30 / 32."""
    rng = np.random.default_rng(5)
    blob = np.repeat([0, 1, 2], 10)
    centres = np.array([[0, 0], [40, 0], [0, 40]], dtype=float)
    X = centres[blob] + rng.normal(0, 1.0, (30, 2))
    X = np.vstack([X, centres[1] + rng.normal(0, 1.0, (2, 2))])
    labels = np.array(["x", "y", "z"])[blob].tolist() + ["x", "x"]
    labels = np.array(labels)
    assert knn_accuracy(X, labels, n_neighbors=5, n_folds=5, seed=0) == pytest.approx(30 / 32)
    assert knn_accuracy(X, labels, n_neighbors=5, n_folds=5, seed=9) == pytest.approx(30 / 32)
    assert score_embedding(X.astype(np.float32), labels, None, n_neighbors=5)[
        "knn_accuracy"
    ] == pytest.approx(30 / 32)
    # a rare type (2 cells, fewer than the 5 folds) far away: never scored, so still 30 / 32
    Xr = np.vstack([X, [[100, 100], [100, 101]]])
    rare = np.append(labels, ["w", "w"])
    assert knn_accuracy(Xr, rare, n_neighbors=5) == pytest.approx(30 / 32)


def test_knn_accuracy_keeps_rare_cells_as_references():
    """k = 1: a cell of type y whose nearest cell is of a rare type is classified as that
    type (the rare cells are references in every fold), so exactly one scored cell is wrong."""
    # x and y: two rows of cells 1 apart; one y cell set apart at (-10, 30), a rare w cell
    # 1 from it (its nearest cell, and no other scored cell's), the other w far away
    line = np.arange(10, dtype=float)
    X = np.vstack([np.c_[line, np.zeros(10)], np.c_[line, np.full(10, 30.0)]])
    X[10] = (-10, 30)
    X = np.vstack([X, [[-11, 30], [60, 60]]])
    labels = np.append(np.repeat(["x", "y"], 10), ["w", "w"])
    assert knn_accuracy(X, labels, n_neighbors=1) == pytest.approx(19 / 20)
    # fewer than two types with enough cells: no accuracy
    assert np.isnan(knn_accuracy(X[:12], np.array(["x"] * 10 + ["w", "w"]), n_neighbors=1))


def test_every_pooling_in_an_embedding_file_is_scored(tmp_path):
    X, labels, batches = fixed_embedding()
    obs = pd.DataFrame(
        {"cell_type": labels, "batch": batches}, index=[f"c{i}" for i in range(len(labels))]
    )
    path = tmp_path / "sigmoid_seed1.npz"
    np.savez(
        path, X_emb=X, X_emb_cls=X[:, ::-1] * 2, obs_names=np.array(obs.index, dtype=str),
        method=np.str_("sigmoid"), seed=np.int64(1), val_loss=np.float64(2.0),
        steps=np.int64(40), stop_reason=np.str_("plateau"), plateau=np.float64(1.0),
    )  # fmt: skip
    old = tmp_path / "softmax_seed1.npz"  # an embedding written before the training facts
    np.savez(old, X_emb=X, obs_names=np.array(obs.index, dtype=str), method=np.str_("softmax"))
    params = config.section("evaluate", {"n_neighbors": 5})
    metrics, umap = evaluate("toy", obs, [str(path), str(old)], params, "cell_type", "batch")
    assert metrics["method"].tolist() == ["sigmoid", "sigmoid_cls", "softmax"]
    first, cls, legacy = (metrics.iloc[i] for i in range(3))
    assert first["steps"] == cls["steps"] == 40 and cls["stop_reason"] == "plateau"
    assert first["plateau"] is True and cls["val_loss"] == 2.0
    assert legacy["steps"] == -1 and legacy["stop_reason"] == "" and legacy["plateau"] is None
    # the CLS embedding is scored as itself: a rescaled copy of X has the same silhouette
    assert cls["asw_label_raw"] == pytest.approx(first["asw_label_raw"], abs=1e-5)
    assert set(umap["method"]) == {"sigmoid", "sigmoid_cls", "softmax"}
