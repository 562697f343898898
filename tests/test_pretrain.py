"""The pretraining protocol's parts: its config (protocols, roles, holdouts, the corpus'
sampling), gene symbols and match rates, the corpus vocabulary and medians, sampling, zero-shot
tokens, and what the training loop actually draws."""

from __future__ import annotations

import copy
import dataclasses
import json
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
from sigmoid_sc.aggregate import difference_text
from sigmoid_sc.corpus import pool_tokens
from sigmoid_sc.errors import ConfigError, DataError
from sigmoid_sc.holdout import select_cells
from sigmoid_sc.match_rates import match_table
from sigmoid_sc.prepare import prepare
from sigmoid_sc.protocols import parse_group
from sigmoid_sc.synthetic import symbol_names, synthetic_counts
from sigmoid_sc.tokenize import N_SPECIAL, gene_nonzero_median, tokenize

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


# ---------------------------------------------------------------------------------------------
# a small corpus for real: prepare, holdout, vocabulary, tokens, corpus, train, embed


SYNTHETIC = {
    # corpus, with its batch_1 cells held out
    "alpha": {"n_cells": 260, "n_genes": 90, "n_cell_types": 3, "n_batches": 2, "seed": 11},
    # corpus
    "beta": {"n_cells": 200, "n_genes": 70, "n_cell_types": 3, "n_batches": 1, "seed": 12},
    # evaluation only
    "gamma": {"n_cells": 160, "n_genes": 60, "n_cell_types": 3, "n_batches": 1, "seed": 13},
}
PREPARE = {"min_genes": 5, "min_cells": 1, "val_fraction": 0.15, "test_fraction": 0.25}
TOKENIZE = config.section("tokenize", {"max_len": 24})


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The protocol's files for three synthetic datasets, made by the stages' functions."""
    root = tmp_path_factory.mktemp("pretrain")
    prepared = {}
    for name, params in SYNTHETIC.items():
        raw = synthetic_counts(**params, gene_names="symbols")
        raw.uns["sigmoid_sc"] = {"label_key": "cell_type", "batch_key": "batch"}
        prepared[name] = prepare(raw, name, config.section("prepare", PREPARE))
    units = {
        "alpha": select_cells(prepared["alpha"], "alpha", {**HOLDOUT, "keep": False}),
        "beta": prepared["beta"],
        "alpha_b1": select_cells(prepared["alpha"], "alpha_b1", {**HOLDOUT, "keep": True}),
        "gamma": prepared["gamma"],
    }
    sampling = config.section("pretrain", {"sampling": "capped", "max_cells_per_dataset": 100})
    v, cells, _ = vocabulary.corpus_vocabulary(
        [(n, units[n]) for n in ("alpha", "beta")], sampling, gene_median_norm=True
    )
    tokens = {n: tokenize(a, n, TOKENIZE, vocabulary=v) for n, a in units.items()}
    arrays = pool_tokens(cells, {n: tokens[n] for n in ("alpha", "beta")}, v.vocab_id)
    np.savez(root / "corpus.npz", **arrays)
    for name, t in tokens.items():
        np.savez(root / f"{name}.npz", **t)
    return {"root": root, "units": units, "vocab": v, "cells": cells, "tokens": tokens}


def test_a_holdout_splits_a_dataset_in_two_and_keeps_its_split(small_corpus):
    units = small_corpus["units"]
    corpus_side, held = units["alpha"], units["alpha_b1"]
    assert set(corpus_side.obs["batch"].astype(str)) == {"batch_0"}
    assert set(held.obs["batch"].astype(str)) == {"batch_1"}
    assert not set(corpus_side.obs_names) & set(held.obs_names)
    assert held.uns["sigmoid_sc"]["label_key"] == "cell_type"  # evaluate reads it from here
    assert held.uns["sigmoid_sc"]["selection"]["keep"] is True
    assert {"train", "val", "test"} == set(held.obs["split"].astype(str))


def test_zero_shot_tokens_use_the_corpus_ids(small_corpus):
    v, tokens, units = small_corpus["vocab"], small_corpus["tokens"], small_corpus["units"]
    corpus_arrays = np.load(small_corpus["root"] / "corpus.npz")
    assert str(corpus_arrays["vocab_id"]) == v.vocab_id
    for name in ("alpha_b1", "gamma"):
        t = tokens[name]
        assert str(t["vocab_id"]) == v.vocab_id and int(t["vocab_size"]) == v.symbols.size + 3
        assert np.array_equal(t["gene_names"], corpus_arrays["gene_names"])
    # the top-ranked gene of each gamma cell: by the corpus' medians, not gamma's own
    gamma, t = units["gamma"], tokens["gamma"]
    columns, targets = vocabulary.gene_mapping(gamma.var_names, v.symbols)
    linear = vocabulary.linear(gamma.X).toarray()[:, columns]
    own_median = gene_nonzero_median(sp.csr_matrix(linear[gamma.obs["split"] == "train"]))
    first = t["input_ids"][t["offsets"][:-1]] - N_SPECIAL
    by_corpus = targets[np.argmax(linear / v.gene_median[targets], axis=1)]
    by_own = targets[np.argmax(linear / own_median, axis=1)]
    assert np.array_equal(first, by_corpus)
    assert (by_own != by_corpus).sum() > 10  # the medians matter: the check can fail
    symbols = v.symbols[first]
    assert set(symbols) <= set(vocabulary.symbol_keys(gamma.var_names))
    # the same cell in the corpus and in its own tokens: the same sequence
    alpha, c = tokens["alpha"], corpus_arrays
    k = int(np.flatnonzero(c["dataset"] == "alpha")[0])
    i = int(np.flatnonzero(alpha["obs_names"] == c["source_obs_names"][k])[0])
    assert np.array_equal(
        c["input_ids"][c["offsets"][k] : c["offsets"][k + 1]],
        alpha["input_ids"][alpha["offsets"][i] : alpha["offsets"][i + 1]],
    )


def test_the_corpus_refuses_tokens_of_another_vocabulary(small_corpus):
    tokens = {n: small_corpus["tokens"][n] for n in ("alpha", "beta")}
    own = tokenize(small_corpus["units"]["beta"], "beta", TOKENIZE)
    with pytest.raises(DataError, match="the tokens of 'beta' were not made with the corpus"):
        pool_tokens(small_corpus["cells"], {**tokens, "beta": own}, small_corpus["vocab"].vocab_id)


MODEL = config.section("model", {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32})
TRAIN = config.section(
    "train", {"steps": 30, "batch_tokens": 16 * 24, "warmup_steps": 2, "eval_every": 30}
)


def test_evaluate_only_cells_are_never_in_a_training_batch(small_corpus, monkeypatch, tmp_path):
    """Run the training loop on the corpus tokens and record every batch it packs."""
    from sigmoid_sc import train as train_module

    corpus_path = small_corpus["root"] / "corpus.npz"
    drawn = []
    real_pack = train_module.pack

    def recording_pack(tokens, cells):
        drawn.append(np.array(cells))
        return real_pack(tokens, cells)

    monkeypatch.setattr(train_module, "pack", recording_pack)
    train_module.train("corpus", corpus_path, "sigmoid", 0, MODEL, TRAIN, "cpu", tmp_path / "run")
    assert len(drawn) == 30, "the loop drew no batches through pack"
    c = np.load(corpus_path)
    cells = np.concatenate(drawn)
    origin, names = c["dataset"][cells], c["source_obs_names"][cells]
    assert set(origin) == {"alpha", "beta"}
    assert (c["split"][cells] == "train").all()
    units = small_corpus["units"]
    held_out = set(units["alpha_b1"].obs_names)
    alpha_names = set(names[origin == "alpha"])
    assert alpha_names and not alpha_names & held_out
    assert (units["alpha"].obs.loc[list(alpha_names), "batch"].astype(str) == "batch_0").all()
    # every drawn cell's tokens are those of the training cell it claims to be
    for name in ("alpha", "beta"):
        t = small_corpus["tokens"][name]
        position = {o: i for i, o in enumerate(t["obs_names"])}
        for k in cells[origin == name][:50]:
            i = position[c["source_obs_names"][k]]
            assert t["split"][i] == "train"
            assert np.array_equal(
                c["input_ids"][c["offsets"][k] : c["offsets"][k + 1]],
                t["input_ids"][t["offsets"][i] : t["offsets"][i + 1]],
            )
    # and no evaluation cell's sequence was ever drawn: gamma's sequences are not in the batches
    gamma = small_corpus["tokens"]["gamma"]
    drawn_sequences = {
        c["input_ids"][c["offsets"][k] : c["offsets"][k + 1]].tobytes() for k in set(cells)
    }
    gamma_sequences = {
        gamma["input_ids"][gamma["offsets"][i] : gamma["offsets"][i + 1]].tobytes()
        for i in range(gamma["offsets"].size - 1)
    }
    assert not drawn_sequences & gamma_sequences

    # a zero-shot embedding with the corpus model: accepted for tokens of its vocabulary ...
    from sigmoid_sc.embed import embed, embed_untrained

    model = tmp_path / "run/model.pt"
    embed("gamma", small_corpus["root"] / "gamma.npz", model, "cpu", tmp_path / "gamma.npz")
    out = np.load(tmp_path / "gamma.npz")
    test = small_corpus["tokens"]["gamma"]["split"] == "test"
    assert out["X_emb"].shape == (int(test.sum()), 16) and np.isfinite(out["X_emb"]).all()
    assert str(out["method"]) == "sigmoid" and int(out["steps"]) == 30
    # ... and the untrained baseline of the same vocabulary
    embed_untrained("gamma", small_corpus["root"] / "gamma.npz", "sigmoid", MODEL, 0.15, "cpu",
                    tmp_path / "untrained.npz")  # fmt: skip
    assert str(np.load(tmp_path / "untrained.npz")["method"]) == "untrained_sigmoid"
    # ... refused for a dataset's own tokens (its own vocabulary)
    np.savez(tmp_path / "own.npz", **tokenize(units["gamma"], "gamma", TOKENIZE))
    with pytest.raises(DataError, match="gene vocabulary"):
        embed("gamma", tmp_path / "own.npz", model, "cpu", tmp_path / "x.npz")


def test_holdout_refuses_values_that_are_not_there(small_corpus):
    with pytest.raises(DataError, match=r"dataset 'alpha_x': holdout values \['STIM'\]"):
        select_cells(
            small_corpus["units"]["beta"], "alpha_x", {"obs_key": "batch", "values": ["STIM"]}
        )
    with pytest.raises(DataError, match=r"holdout obs_key 'condition' is not a column"):
        select_cells(
            small_corpus["units"]["beta"], "beta", {"obs_key": "condition", "values": ["STIM"]}
        )


def test_match_rates_through_the_cli_and_their_table(small_corpus, tmp_path):
    """tokenize --vocabulary --match-rates writes the rates the table is made of."""
    v = small_corpus["vocab"]
    v.save(tmp_path / "vocabulary.npz")
    small_corpus["units"]["gamma"].write_h5ad(tmp_path / "gamma.h5ad")
    process = run_cli(
        "tokenize", "--dataset", "gamma", "--params-json", '{"max_len": 24}',
        "--input", tmp_path / "gamma.h5ad", "--output", tmp_path / "t.npz",
        "--vocabulary", tmp_path / "vocabulary.npz", "--match-rates", tmp_path / "m.json",
        "--min-match-rate", "0.5",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    rates = json.loads((tmp_path / "m.json").read_text())
    gamma = small_corpus["units"]["gamma"]
    expected = vocabulary.match_rates(gamma.X, gamma.var_names, v.symbols)
    assert rates["dataset"] == "gamma"
    assert rates["token_match_rate"] == pytest.approx(expected["token_match_rate"])
    assert 0.5 <= rates["token_match_rate"] <= 1
    units = {"gamma": {"dataset": "gamma", "role": "zero_shot"}}
    table = match_table([rates], units, None)
    assert table.iloc[0][["dataset", "source", "role"]].tolist() == ["gamma", "gamma", "zero_shot"]
    assert list(table.columns[:6]) == [
        "dataset",
        "source",
        "role",
        "n_cells",
        "n_genes",
        "n_genes_matched",
    ]
    with pytest.raises(DataError, match=r"no match rates given for \['beta'\]"):
        match_table([rates], {**units, "beta": {"dataset": "beta", "role": "corpus"}}, None)


# ---------------------------------------------------------------------------------------------
# both protocols side by side


def group_files(tmp_path, name, datasets, shift, params):
    """The aggregate stage's outputs for a group of datasets: sigmoid better by ``shift``."""
    from sigmoid_sc import aggregate

    rng = np.random.default_rng(len(name))
    rows = []
    for dataset in datasets:
        for seed, noise in zip((0, 1, 2), (-0.002, 0.0, 0.002)):
            base, sigmoid = rng.normal(0.5, 0.01), shift + noise
            rows += [
                {"dataset": dataset, "method": "softmax", "seed": seed, "asw_label": base},
                {
                    "dataset": dataset,
                    "method": "sigmoid",
                    "seed": seed,
                    "asw_label": base + sigmoid,
                },
            ]
        rows += [
            {"dataset": dataset, "method": "pca", "seed": -1, "asw_label": 0.4},
            {"dataset": dataset, "method": "untrained_sigmoid", "seed": 0, "asw_label": 0.3},
        ]
    table = pd.DataFrame(rows)
    summary = aggregate.summarise(table, params)
    paths = [tmp_path / f"{name}{suffix}" for suffix in (".csv", "_summary.csv", "_summary.md")]
    table.to_csv(paths[0], index=False)
    summary.to_csv(paths[1], index=False)
    paths[2].write_text(aggregate.to_markdown(summary, params))
    return paths, summary


def test_protocols_stack_every_group_with_its_statistics(tmp_path):
    from sigmoid_sc import cli

    params = config.section("aggregate", {"bootstrap_resamples": 200})
    own, own_summary = group_files(tmp_path, "own", ["kang", "pbmc68k"], 0.02, params)
    corpus_files, _ = group_files(tmp_path, "corpus", ["kang"], -0.03, params)
    zero, zero_summary = group_files(tmp_path, "zero", ["kang_stim", "pbmc68k"], 0.05, params)
    groups = ["per_dataset:own", "pretrain:corpus", "pretrain:zero_shot"]
    files = list(zip(own, corpus_files, zero))
    out = [tmp_path / f"protocols{s}" for s in (".csv", "_summary.csv", "_summary.md")]
    status = cli.main(
        ["protocols", "--groups", *groups, "--tables", *map(str, files[0]),
         "--summaries", *map(str, files[1]), "--markdowns", *map(str, files[2]),
         "--params-json", '{"bootstrap_resamples": 200}',
         "--sources-json", '{"kang_stim": "kang"}',
         "--table", str(out[0]), "--summary-csv", str(out[1]), "--summary-md", str(out[2])]
    )  # fmt: skip
    assert status == 0
    summary = pd.read_csv(out[1])
    assert list(summary.columns[:3]) == ["protocol", "role", "source"]
    assert set(own_summary.columns) <= set(summary.columns)  # the same statistics, as they are
    zero_rows = summary[summary["role"] == "zero_shot"].drop(columns=["protocol", "role", "source"])
    pd.testing.assert_frame_equal(
        zero_rows.reset_index(drop=True), zero_summary, check_dtype=False, check_like=True
    )
    stim = summary[(summary["dataset"] == "kang_stim") & (summary["metric"] == "asw_label")]
    assert stim["source"].tolist() == ["kang"] and stim["difference"].iloc[0] == pytest.approx(0.05)
    assert len(pd.read_csv(out[0])) == sum(len(pd.read_csv(f)) for f in files[0])
    markdown = out[2].read_text()
    assert "## asw_label (primary metric), side by side" in markdown
    # kang's rows together: its own model, the corpus model on its cells, the held-out STIM cells
    side_by_side = markdown.split("## asw_label (primary metric)")[1].split("\n## ")[0]
    kang = [line for line in side_by_side.splitlines() if line.startswith("| kang |")]
    assert [line.split(" | ")[1:4] for line in kang] == [
        ["kang", "per_dataset", "own"],
        ["kang", "pretrain", "corpus"],
        ["kang_stim", "pretrain", "zero_shot"],
    ]
    row = zero_summary[
        (zero_summary["dataset"] == "kang_stim") & (zero_summary["metric"] == "asw_label")
    ]
    row = row.iloc[0]
    assert row["resolved"].startswith("sigmoid higher")  # the CI excludes 0
    assert f"| {difference_text(row)} | {row['resolved']} |" in kang[2], kang[2]
    assert kang[2].endswith("| 0.400 |  | 0.300 |")  # PCA, untrained softmax (none), sigmoid
    assert "## Protocol pretrain, role zero_shot" in markdown
    with pytest.raises(ConfigError, match="group 'pretrain:own' is not one of"):
        parse_group("pretrain:own")
