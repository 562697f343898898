"""The pretraining protocol's parts: its config (protocols, roles, holdouts, the corpus'
sampling), gene symbols and match rates, the corpus vocabulary and medians, sampling, zero-shot
tokens, and what the training loop actually draws."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from test_config import edge_cases

from sigmoid_sc import config, vocabulary
from sigmoid_sc.errors import ConfigError, DataError
from sigmoid_sc.synthetic import symbol_names
from sigmoid_sc.tokenize import tokenize

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())


# ---------------------------------------------------------------------------------------------
# config


def pretrain_config(**datasets) -> dict:
    """tiny.yaml's settings with the given dataset entries (synthetic, keys added) and both
    protocols."""
    cfg = copy.deepcopy(TINY)
    cfg.update(protocol="both", experiments={})
    base = cfg["datasets"]["blobs_b"]
    cfg["datasets"] = {name: {**copy.deepcopy(base), **keys} for name, keys in datasets.items()}
    return cfg


def test_protocols_and_units_from_config():
    cfg = pretrain_config(
        kang={"holdout": {"obs_key": "condition", "values": ["STIM"], "name": "kang_stim"}},
        pbmc3k={"role": "pretrain"},
        pbmc68k={"role": "evaluate"},
        kidney={"role": "none"},
    )
    loaded = config.from_dict(cfg)
    assert config.protocols(loaded.raw) == ("per_dataset", "pretrain")
    assert loaded.protocol == "both" and loaded.datasets["kidney"].role == "none"
    assert loaded.datasets["kang"].holdout == config.Holdout("condition", ("STIM",), "kang_stim")
    units = {u.name: u for u in config.pretrain_units(loaded.raw)}
    assert list(units) == ["kang", "pbmc3k", "kang_stim", "pbmc68k"]  # corpus first
    assert [u.role for u in units.values()] == ["corpus", "corpus", "zero_shot", "zero_shot"]
    assert units["kang"].selection() == {"obs_key": "condition", "values": ["STIM"], "keep": False}
    assert units["kang_stim"].selection()["keep"] is True and units["kang_stim"].dataset == "kang"
    assert not units["pbmc3k"].selects
    # the defaults: one protocol, every dataset in the corpus, proportional sampling
    default = config.from_dict({"datasets": TINY["datasets"]})
    assert config.protocols(default.raw) == ("per_dataset",)
    assert default.pretrain == config.Pretrain("proportional", None, 0, 0.5)
    assert {d.role for d in default.datasets.values()} == {"pretrain"}
    unnamed = pretrain_config(a={"holdout": {"obs_key": "batch", "values": [1]}})
    assert [u.name for u in config.pretrain_units(config.validate(unnamed))] == ["a", "a_holdout"]


def test_the_holdout_dataclass_is_the_schemas_keys():
    keys = set(config.schema()["$defs"]["dataset"]["properties"]["holdout"]["properties"])
    assert {f.name for f in dataclasses.fields(config.Holdout)} == keys
    keys = set(config._subschema("pretrain")["properties"])
    assert {f.name for f in dataclasses.fields(config.Pretrain)} == keys


HOLDOUT = {"obs_key": "batch", "values": ["batch_1"]}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.update(protocol="pretrian"), "protocol must be one of per_dataset, pretrain, both; got 'pretrian'"),
        (lambda c: c["datasets"]["a"].update(role="train"), "datasets.a.role must be one of pretrain, evaluate, none"),
        (
            lambda c: c["datasets"]["a"].update(role="evaluate", holdout=HOLDOUT),
            "datasets.a.holdout splits a corpus dataset: it needs datasets.a.role: pretrain (got evaluate)",
        ),
        (lambda c: c["datasets"]["a"].update(holdout={"obs_key": "batch"}), "datasets.a.holdout needs `values`"),
        (lambda c: c["datasets"]["a"].update(holdout={**HOLDOUT, "values": []}), "datasets.a.holdout.values needs at least 1 item"),
        (
            lambda c: c["datasets"]["a"].update(holdout={**HOLDOUT, "name": "corpus"}),
            "datasets.a.holdout.name: 'corpus' is a folder of results/pretrain/",
        ),
        (
            lambda c: c["datasets"]["a"].update(holdout={**HOLDOUT, "name": "b"}),
            "datasets.a.holdout.name: 'b' names another dataset or holdout too",
        ),
        (
            lambda c: c["datasets"]["a"].update(holdout={**HOLDOUT, "name": "a"}),
            "datasets.a.holdout.name: 'a' names another dataset or holdout too",
        ),
        (
            lambda c: c["datasets"].update(pretrain=c["datasets"].pop("b")),
            "datasets.pretrain: the name is taken by the pretraining protocol's results folder",
        ),
        (
            lambda c: c["datasets"].update(tables=c["datasets"].pop("b")),
            "datasets.tables: the name is a folder of results/pretrain/",
        ),
        (
            lambda c: [e.update(role="evaluate") for e in c["datasets"].values()],
            "the pretraining protocol needs a corpus: at least one dataset with role: pretrain",
        ),
        (lambda c: c.update(pretrain={"sampling": "capped"}), "pretrain.max_cells_per_dataset is needed when pretrain.sampling is capped"),
        (
            lambda c: c.update(pretrain={"max_cells_per_dataset": 5}),
            "pretrain.max_cells_per_dataset is read only when pretrain.sampling is capped",
        ),
        (lambda c: c.update(pretrain={"min_match_rate": 2}), "pretrain.min_match_rate must be <= 1; got 2"),
        (lambda c: c.update(pretrain={"samplng": "capped"}), "unknown key pretrain.samplng (known keys of pretrain: "),
        (
            lambda c: c.update(protocol="pretrain", experiments={"jacobian": {"enabled": True}}),
            "experiments.jacobian analyses the per-dataset protocol's models: with protocol: pretrain there are none",
        ),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(edit, expected):
    cfg = pretrain_config(a={}, b={})
    edit(cfg)
    with pytest.raises(ConfigError) as excinfo:
        config.validate(cfg)
    assert expected in str(excinfo.value)


def test_units_are_checked_only_when_the_pretraining_protocol_runs():
    cfg = pretrain_config(a={"role": "evaluate"}, b={"role": "none"})
    cfg["protocol"] = "per_dataset"
    config.validate(cfg)  # no corpus, but no pretraining either
    cfg["protocol"] = "both"
    with pytest.raises(ConfigError, match="needs a corpus"):
        config.validate(cfg)
    # a section on the command line is checked the same way
    with pytest.raises(ConfigError, match=r"^invalid pretrain: pretrain\.max_cells_per_dataset"):
        config.section("pretrain", {"sampling": "capped"})


# ---------------------------------------------------------------------------------------------
# symbols and match rates


def prepared_like(names, values, split, obs_names=None):
    """A prepared AnnData: log1p of the given normalised values, a split column."""
    X = sp.csr_matrix(np.log1p(np.asarray(values, dtype=np.float64)).astype(np.float32))
    n = X.shape[0]
    obs = pd.DataFrame(
        {"split": pd.Categorical(split), "cell_type": ["a", "b"] * (n // 2) + ["a"] * (n % 2)},
        index=obs_names or [f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(names)))
    adata.uns["sigmoid_sc"] = {"label_key": "cell_type", "normalized": True}
    return adata


def test_mouse_and_human_symbols_share_one_vocabulary_entry():
    human = (np.array(["ACTB", "CD3E", "GAPDH"]), sp.csr_matrix([[4.0, 1.0, 2.0], [2.0, 0, 1.0]]))
    mouse = (np.array(["Actb", "Cd3e", "Ptprc"]), sp.csr_matrix([[8.0, 0, 3.0]]))
    v = vocabulary.build_vocabulary(
        [("human", human[1], human[0]), ("mouse", mouse[1], mouse[0])], gene_median_norm=True
    )
    assert list(v.symbols) == ["ACTB", "CD3E", "GAPDH", "PTPRC"]
    # medians pool both species: ACTB 4, 2 (human) and 8 (mouse) -> 4; CD3E: only 1 (Cd3e = 0)
    np.testing.assert_allclose(v.gene_median, [4.0, 1.0, 1.5, 3.0])
    # mouse Actb and human ACTB land in the same column
    mapped = v.cells(sp.csr_matrix(np.log1p([[8.0, 0.0, 3.0]])), mouse[0]).toarray()
    np.testing.assert_allclose(mapped, [[8.0, 0.0, 0.0, 3.0]])


def test_match_rates_count_genes_and_expressed_tokens():
    symbols = np.array(["ACTB", "CD3E", "GAPDH"])
    names = ["Actb", "gapdh", "Xist", "Malat1"]
    X = sp.csr_matrix([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 1.0]])
    rates = vocabulary.match_rates(X, names, symbols)
    assert rates["n_genes"] == 4 and rates["n_genes_matched"] == 2
    assert rates["gene_match_rate"] == pytest.approx(0.5)
    # 8 expressed values; Actb (2) and gapdh (1) map
    assert rates["n_tokens"] == 8 and rates["n_tokens_matched"] == 3
    assert rates["token_match_rate"] == pytest.approx(3 / 8)


@pytest.mark.parametrize(
    "names",
    [
        [f"gene{i}" for i in range(20)],
        [f"gene_{i:05d}" for i in range(20)],
        [str(i) for i in range(20)],
        [f"ENSG{i:011d}" for i in range(20)],
    ],
    ids=["gene-index", "synthetic-index", "numbers", "ensembl"],
)
def test_dataset_without_symbols_is_refused_naming_it(names):
    with pytest.raises(DataError, match=r"dataset 'kidney' has no gene symbols.*0%"):
        vocabulary.check_symbols(names, "kidney")
    vocabulary.check_symbols(["ACTB", "gene1", "MT-CO1", "RP11-34P13.7"], "fine")  # a minority
    vocabulary.check_symbols(symbol_names(50), "synthetic")


def test_dataset_below_the_floor_is_refused_with_its_rate():
    rates = vocabulary.match_rates(
        sp.csr_matrix([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]),
        ["ACTB", "ZZZ1", "ZZZ2", "ZZZ3"],
        np.array(["ACTB", "CD3E"]),
    )
    with pytest.raises(DataError, match=r"dataset 'worm'.*14\.3% of its expressed tokens.*50\.0%"):
        vocabulary.check_match(rates, "worm", 0.5)
    vocabulary.check_match(rates, "worm", 0.1)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sigmoid_sc.cli", *map(str, args)], capture_output=True, text=True
    )


def test_tokenize_cli_refuses_an_unnamed_dataset_and_one_below_the_floor(tmp_path):
    """Through the stage a rule runs: exit status 2, the message names the dataset."""
    v = vocabulary.Vocabulary(np.array(["ACTB", "CD3E"]), np.ones(2), True)
    v.save(tmp_path / "vocabulary.npz")
    values = np.eye(6)[[0, 1, 2, 3]] + 1
    split = ["train", "val", "test", "test"]
    prepared_like([f"gene{i}" for i in range(6)], values, split).write_h5ad(tmp_path / "b.h5ad")
    args = ["--vocabulary", tmp_path / "vocabulary.npz", "--min-match-rate", "0.5"]
    process = run_cli("tokenize", "--dataset", "bladder", "--input", tmp_path / "b.h5ad",
                      "--output", tmp_path / "t.npz", *args)  # fmt: skip
    assert process.returncode == 2, process.stderr
    assert "dataset 'bladder' has no gene symbols" in process.stderr
    names = ["ACTB", "ZZZ1", "ZZZ2", "ZZZ3", "ZZZ4", "ZZZ5"]
    prepared_like(names, values, split).write_h5ad(tmp_path / "w.h5ad")
    process = run_cli("tokenize", "--dataset", "worm", "--input", tmp_path / "w.h5ad",
                      "--output", tmp_path / "t.npz", *args)  # fmt: skip
    assert process.returncode == 2, process.stderr
    assert "dataset 'worm' matches the corpus vocabulary too little: 16.7%" in process.stderr
    process = run_cli("tokenize", "--dataset", "worm", "--input", tmp_path / "w.h5ad",
                      "--output", tmp_path / "t.npz", *args[:-1], "1.5")  # fmt: skip
    assert process.returncode == 2 and "pretrain.min_match_rate must be <= 1" in process.stderr
    assert not (tmp_path / "t.npz").exists()


# ---------------------------------------------------------------------------------------------
# the corpus: sampling, vocabulary, medians


def test_capped_sampling_is_seeded_per_dataset_and_keeps_proportions():
    split = np.array(["train"] * 100 + ["val"] * 20 + ["test"] * 30)
    params = config.section(
        "pretrain", {"sampling": "capped", "max_cells_per_dataset": 40, "sampling_seed": 3}
    )
    train, val = vocabulary.sample_cells(split, "a", params)
    assert train.size == 40 and val.size == 8 and (split[train] == "train").all()
    assert (split[val] == "val").all() and np.all(np.diff(train) > 0)
    again = vocabulary.sample_cells(split, "a", params)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    other = vocabulary.sample_cells(split, "b", params)[0]
    assert not np.array_equal(train, other)  # each dataset its own draw
    reseeded = dataclasses.replace(params, sampling_seed=4)
    assert not np.array_equal(train, vocabulary.sample_cells(split, "a", reseeded)[0])
    small = vocabulary.sample_cells(split[:30], "a", params)[0]
    assert small.size == 30  # under the cap: every training cell
    every = vocabulary.sample_cells(split, "a", config.section("pretrain", {}))
    assert every[0].size == 100 and every[1].size == 20


def test_corpus_medians_come_from_the_corpus_training_cells_only():
    values = np.array([[1.0, 0, 2.0], [3.0, 1.0, 0], [100.0, 100.0, 100.0], [5.0, 2.0, 4.0]])
    a = prepared_like(["Actb", "Cd3e", "Xist"], values, ["train", "train", "test", "train"])
    b = prepared_like(["ACTB", "GAPDH"], [[7.0, 1.0], [50.0, 50.0]], ["train", "val"])
    v, cells, table = vocabulary.corpus_vocabulary(
        [("a", a), ("b", b)], config.section("pretrain", {}), gene_median_norm=True
    )
    assert list(v.symbols) == ["ACTB", "CD3E", "GAPDH", "XIST"]
    # training cells only: ACTB 1, 3, 5 (a) and 7 (b); the test and val cells' 100 and 50 never
    np.testing.assert_allclose(v.gene_median, [4.0, 1.5, 1.0, 3.0], rtol=1e-5)
    assert set(cells["split"]) == {"train", "val"}
    assert cells.loc[cells["dataset"] == "a", "obs_name"].tolist() == ["c0", "c1", "c3"]
    row = table.set_index("dataset").loc["a"]
    assert row["train_cells_in_corpus"] == 3 and row["genes_in_vocabulary"] == 3
    assert row["shared_gene_rate"] == pytest.approx(1 / 3)  # Actb is in b, Cd3e and Xist not
    # without median normalisation: every median 1, and tokenising says it must match
    flat, _, _ = vocabulary.corpus_vocabulary(
        [("a", a), ("b", b)], config.section("pretrain", {}), gene_median_norm=False
    )
    assert (flat.gene_median == 1).all() and flat.vocab_id != v.vocab_id
    with pytest.raises(ConfigError, match="tokenize.gene_median_norm is False"):
        tokenize(a, "a", config.section("tokenize", {"gene_median_norm": False}), vocabulary=v)


def test_a_vocabulary_file_is_checked_against_its_digest(tmp_path):
    v = vocabulary.Vocabulary(np.array(["ACTB", "CD3E"]), np.array([2.0, 3.0]), True)
    v.save(tmp_path / "v.npz")
    loaded = vocabulary.load_vocabulary(tmp_path / "v.npz")
    assert loaded.vocab_id == v.vocab_id and list(loaded.symbols) == ["ACTB", "CD3E"]
    arrays = dict(np.load(tmp_path / "v.npz"))
    arrays["gene_median"] = np.array([2.0, 4.0])
    np.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(DataError, match="does not match its own digest"):
        vocabulary.load_vocabulary(tmp_path / "edited.npz")


#: the keys a value of the pretrain section needs beside it
PARTNERS = {("sampling", "capped"): {"max_cells_per_dataset": 10}}


@pytest.mark.parametrize(("key", "value"), edge_cases("pretrain"))
def test_the_vocabulary_takes_every_value_the_schema_takes(key, value):
    """The pretrain section at the edges of its schema: the vocabulary stage builds a corpus."""
    partners = PARTNERS.get((key, value), {})
    if key == "max_cells_per_dataset" and value is not None:
        partners = {"sampling": "capped"}
    params = config.section("pretrain", {key: value, **partners})
    values = np.exp(np.random.default_rng(0).normal(size=(40, 6)))
    a = prepared_like(symbol_names(6), values, ["train"] * 30 + ["val"] * 5 + ["test"] * 5)
    v, cells, table = vocabulary.corpus_vocabulary([("a", a)], params, gene_median_norm=True)
    cap = params.max_cells_per_dataset if params.sampling == "capped" else 30
    assert v.symbols.size == 6 and table["train_cells_in_corpus"].tolist() == [min(30, cap)]
    assert (cells["split"] == "train").sum() == min(30, cap) and "test" not in set(cells["split"])
