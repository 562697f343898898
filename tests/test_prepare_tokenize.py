"""prepare (QC, normalisation, split) and tokenize (rank-value encoding) on hand-made data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sigmoid_sc import cli, config
from sigmoid_sc.errors import ConfigError, DataError
from sigmoid_sc.prepare import prepare, stratified_split
from sigmoid_sc.synthetic import synthetic_counts
from sigmoid_sc.tokenize import gene_nonzero_median, rank_value_encode, tokenize

# ---- tokenizer ----------------------------------------------------------------------------

# 4 cells x 6 genes. Row 1 stores an explicit zero (gene 3), which is not an expressed gene.
HAND = sp.csr_matrix(
    (
        np.array([5, 1, 5, 2, 1, 0, 3, 7, 2, 2, 2, 2], dtype=np.float32),
        np.array([1, 2, 3, 5, 0, 3, 2, 4, 0, 1, 2, 3]),
        np.array([0, 4, 6, 8, 12]),
    ),
    shape=(4, 6),
)


def test_hand_matrix_is_what_the_test_says():
    assert HAND.toarray().tolist() == [
        [0, 5, 1, 5, 0, 2],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 3, 0, 7, 0],
        [2, 2, 2, 2, 0, 0],
    ]
    assert HAND.nnz == 12  # the explicit zero is stored


def test_rank_value_encoding_exact_ids_ties_and_truncation():
    input_ids, offsets = rank_value_encode(HAND, max_len=3)
    # cell 0: genes 1 and 3 tie at 5 (lower index first), then gene 5 (2); gene 2 (1) is cut
    # cell 1: gene 0 only (the stored zero of gene 3 is not a token)
    # cell 2: gene 4 (7), gene 2 (3)
    # cell 3: four-way tie, lowest indices first, cut at 3
    expected = [[1, 3, 5], [0], [4, 2], [0, 1, 2]]
    assert input_ids.dtype == np.int32 and offsets.dtype == np.int64
    assert offsets.tolist() == [0, 3, 4, 6, 9]
    assert input_ids.tolist() == [g + 3 for cell in expected for g in cell]


def test_rank_value_encoding_unsorted_csr_indices():
    # the same matrix with row 3's tied genes stored in descending order: ties still go by gene
    unsorted = sp.csr_matrix(
        (HAND.data.copy(), np.r_[HAND.indices[:8], [3, 2, 1, 0]], HAND.indptr.copy()), shape=(4, 6)
    )
    unsorted.has_sorted_indices = False
    assert np.array_equal(unsorted.toarray(), HAND.toarray())
    input_ids, offsets = rank_value_encode(unsorted, max_len=3)
    assert input_ids[6:].tolist() == [3, 4, 5]
    assert unsorted.indices[8:].tolist() == [3, 2, 1, 0]  # the caller's matrix is untouched


def test_rank_value_encoding_without_truncation_and_with_gene_scale():
    input_ids, offsets = rank_value_encode(HAND, max_len=100)
    assert offsets.tolist() == [0, 4, 5, 7, 11]
    assert input_ids[:4].tolist() == [4, 6, 8, 5]
    # dividing gene 1 by 10 drops it from first to last in cell 0 (0.5 < 1 < 2 < 5)
    scale = np.array([1, 10, 1, 1, 1, 1], dtype=np.float64)
    input_ids, offsets = rank_value_encode(HAND, max_len=100, gene_scale=scale)
    assert input_ids[:4].tolist() == [6, 8, 5, 4]
    assert input_ids[7:11].tolist() == [3, 5, 6, 4]  # cell 3: 2, 2, 2 tie then gene 1 at 0.2


def test_rank_value_encoding_chunks_agree(monkeypatch):
    import sigmoid_sc.tokenize as tok

    X = synthetic_counts(n_cells=300, n_genes=100, n_cell_types=3, seed=3).X
    whole = rank_value_encode(X, max_len=40)
    monkeypatch.setattr(tok, "CHUNK_CELLS", 7)  # many chunks, one ragged
    chunked = rank_value_encode(X, max_len=40)
    assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1])
    # against a per-cell loop
    dense = X.toarray()
    for i in (0, 1, 150, 299):
        genes = np.flatnonzero(dense[i] > 0)
        order = genes[np.lexsort((genes, -dense[i, genes]))][:40]
        assert whole[0][whole[1][i] : whole[1][i + 1]].tolist() == (order + 3).tolist()


def test_gene_nonzero_median():
    X = sp.csr_matrix(np.array([[0, 2, 0], [1, 4, 0], [3, 0, 0], [0, 0, 0], [5, 0, 0]]))
    assert gene_nonzero_median(X).tolist() == [3.0, 3.0, 1.0]  # all-zero gene -> 1


def test_tokenize_median_from_train_cells_and_outputs():
    # gene 0 is high everywhere (housekeeping); gene 1 lower but above its own median in cell 2
    values = np.array([[100, 2], [100, 2], [100, 3], [100, 1000], [100, 1000]], dtype=np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(np.log1p(values)),
        obs=pd.DataFrame(
            {"split": ["train", "train", "test", "test", "val"]}, index=[f"c{i}" for i in range(5)]
        ),
        var=pd.DataFrame(index=["ACTB", "CD3E"]),
    )
    t = tokenize(
        adata, "hand", config.section("tokenize", {"max_len": 8, "gene_median_norm": True})
    )
    np.testing.assert_allclose(t["gene_median"], [100, 2], rtol=1e-5)  # train cells only
    cells = np.split(t["input_ids"], t["offsets"][1:-1])
    assert cells[2].tolist() == [4, 3]  # 3 / 2 > 100 / 100: CD3E leads
    assert t["vocab_size"] == 5 and t["max_len"] == 8
    assert (t["pad_id"], t["mask_id"], t["cls_id"]) == (0, 1, 2)
    assert t["obs_names"].tolist() == ["c0", "c1", "c2", "c3", "c4"]
    assert t["split"].tolist() == ["train", "train", "test", "test", "val"]
    assert t["gene_names"].tolist() == ["ACTB", "CD3E"]
    # without the median, the raw value leads
    t = tokenize(
        adata, "hand", config.section("tokenize", {"max_len": 8, "gene_median_norm": False})
    )
    assert np.split(t["input_ids"], t["offsets"][1:-1])[2].tolist() == [3, 4]


def test_tokenize_cli_refuses_an_unknown_key(tmp_path, capsys):
    code = cli.main(
        ["tokenize", "--dataset", "d", "--params-json", json.dumps({"maxlen": 5}),
         "--input", str(tmp_path / "p.h5ad"), "--output", str(tmp_path / "t.npz")]
    )  # fmt: skip
    assert code == 2
    assert "unknown key tokenize.maxlen" in capsys.readouterr().err


# ---- split ----------------------------------------------------------------------------------


def test_split_is_deterministic_and_stratified():
    sizes = {"big": 100, "mid": 50, "small": 5, "pair": 2, "single": 1}
    labels = np.concatenate([[k] * n for k, n in sizes.items()])
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    a = stratified_split(labels, 0.1, 0.2, seed=0)
    b = stratified_split(labels, 0.1, 0.2, seed=0)
    c = stratified_split(labels, 0.1, 0.2, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    counts = pd.crosstab(labels, a)
    assert counts.loc["big"].to_dict() == {"test": 20, "train": 70, "val": 10}
    assert counts.loc["mid"].to_dict() == {"test": 10, "train": 35, "val": 5}
    assert counts.loc["small"].to_dict() == {"test": 1, "train": 3, "val": 1}
    assert counts.loc["pair"].to_dict() == {"test": 1, "train": 1, "val": 0}  # small type in test
    assert counts.loc["single"].to_dict() == {"test": 0, "train": 1, "val": 0}
    # same per-type counts with another seed, different cells
    assert pd.crosstab(labels, c).equals(counts)


# ---- prepare --------------------------------------------------------------------------------


def P(params: dict) -> config.Prepare:
    """The prepare section with ``params`` over the schema's defaults."""
    return config.section("prepare", params)


def raw_data(adata, label_key="cell_type", batch_key="batch", normalized=False):
    """``adata`` as ``download`` writes raw.h5ad: the keys and ``normalized`` in its uns."""
    adata.uns["sigmoid_sc"] = {"label_key": label_key, "batch_key": batch_key,
                               "normalized": normalized}  # fmt: skip
    return adata


def test_prepare_counts_qc_normalisation_split():
    raw = raw_data(synthetic_counts(n_cells=300, n_genes=120, n_cell_types=3, seed=2))
    dense = raw.X.toarray()
    dense[:5] = 0  # five nearly-empty droplets: one count each
    dense[:5, 0] = 1
    dense[:, 7] = 0  # a gene nobody expresses
    dense[:, 9] = 0  # a gene expressed in two cells only
    dense[10:12, 9] = 4
    raw.X = sp.csr_matrix(dense)
    out = prepare(raw, "syn", P({"min_genes": 10, "min_cells": 3}))
    kept_cells = (dense > 0).sum(axis=1) >= 10
    kept_genes = (dense[kept_cells] > 0).sum(axis=0) >= 3
    assert out.obs_names.tolist() == raw.obs_names[kept_cells].tolist()
    assert out.var_names.tolist() == raw.var_names[kept_genes].tolist()
    assert "cell_000000" not in out.obs_names and kept_cells.sum() > 280
    assert "gene_00007" not in out.var_names and "gene_00009" not in out.var_names
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    # log1p(CP10K), counts kept
    np.testing.assert_allclose(np.expm1(out.X.toarray()).sum(axis=1), 1e4, rtol=1e-3)
    counts = raw[out.obs_names, out.var_names].X.toarray()
    np.testing.assert_array_equal(out.layers["counts"].toarray(), counts)
    assert set(out.obs["split"]) == {"train", "val", "test"}
    assert (pd.crosstab(out.obs["cell_type"], out.obs["split"])["test"] > 0).all()
    # the keys travel on with the data
    assert out.uns["sigmoid_sc"]["label_key"] == "cell_type"
    assert out.uns["sigmoid_sc"]["batch_key"] == "batch" and not out.uns["sigmoid_sc"]["normalized"]


def test_prepare_normalized_input_is_kept():
    raw = synthetic_counts(n_cells=200, n_genes=80, n_cell_types=2, seed=4)
    raw.X = sp.csr_matrix(np.log1p(raw.X.toarray()))
    out = prepare(raw_data(raw, normalized=True), "lognorm", P({"min_genes": 1, "min_cells": 1}))
    assert "counts" not in out.layers
    np.testing.assert_allclose(
        out.X.toarray(), raw[out.obs_names, out.var_names].X.toarray(), rtol=1e-6
    )


def test_prepare_hvg_and_errors():
    raw = raw_data(synthetic_counts(n_cells=200, n_genes=100, n_cell_types=3, seed=5))
    assert prepare(raw, "syn", P({"n_top_genes": 30, "min_genes": 5})).n_vars == 30
    with pytest.raises(ConfigError, match="unknown key prepare.min_gene"):
        P({"min_gene": 5})
    with pytest.raises(DataError, match=r"'syn'.*QC left 0 of 200 cells"):
        prepare(raw, "syn", P({"min_genes": 1000}))
    raw.uns.clear()  # not written by download: the keys are unknown
    with pytest.raises(DataError, match=r"'syn'.*not written by `sigmoid-sc download`"):
        prepare(raw, "syn", P({}))
    with pytest.raises(ConfigError, match=r"prepare.val_fraction \+ prepare.test_fraction"):
        P({"val_fraction": 0.5, "test_fraction": 0.5})


def test_prepare_and_tokenize_cli(tmp_path, capsys):
    raw_path, prepared, tokens = tmp_path / "raw.h5ad", tmp_path / "p.h5ad", tmp_path / "t.npz"
    raw = synthetic_counts(n_cells=150, n_genes=60, n_cell_types=3, seed=6)
    raw_data(raw, label_key="ct").write_h5ad(raw_path)
    base = ["--dataset", "syn", "--input", str(raw_path), "--output", str(prepared)]
    # a failing prepare leaves no output
    assert cli.main(["prepare", *base]) == 2 and not prepared.exists()
    assert "label_key 'ct'" in capsys.readouterr().err
    raw_data(raw).write_h5ad(raw_path)
    params = json.dumps({"min_genes": 5, "min_cells": 1, "split_seed": 3})
    assert cli.main(["prepare", *base, "--params-json", params]) == 0
    code = cli.main(
        ["tokenize", "--dataset", "syn", "--params-json", json.dumps({"max_len": 16}),
         "--input", str(prepared), "--output", str(tokens)]
    )  # fmt: skip
    assert code == 0
    t = np.load(tokens)
    p = ad.read_h5ad(prepared)
    lengths = np.diff(t["offsets"])
    assert len(lengths) == p.n_obs and lengths.max() <= 16 and lengths.min() >= 1
    assert t["input_ids"].min() >= 3 and t["input_ids"].max() < t["vocab_size"] == p.n_vars + 3
    assert t["obs_names"].tolist() == p.obs_names.tolist()
    assert t["split"].tolist() == p.obs["split"].astype(str).tolist()
