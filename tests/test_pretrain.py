"""The pretraining protocol's parts: its config (protocols, roles, holdouts, the corpus'
sampling), gene symbols and match rates, the corpus vocabulary and medians, sampling, zero-shot
tokens, and what the training loop actually draws."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from sigmoid_sc import config
from sigmoid_sc.errors import ConfigError

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
