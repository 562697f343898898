"""The one validated config (sigmoid_sc.config): every config of the repository loads, the
schema and the stages agree at the schema's edges, errors are plain words naming the key."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest_tokens import make_tokens

from sigmoid_sc import config
from sigmoid_sc.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
#: configs that only override another one (Snakemake merges them: --configfile A B)
OVERLAYS = {
    "configs/h200_run.yaml": "configs/shared_data.yaml",
    "configs/stability.yaml": "configs/paper.yaml",
}
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# every config of the repository


def repository_configs() -> list[str]:
    paths = ["config.yaml"]
    paths += sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml"))
    paths += sorted(str(p.relative_to(REPO)) for p in (REPO / "tests" / "configs").glob("*.yaml"))
    return [p for p in paths if not p.endswith(".lock.yaml")]


@pytest.mark.parametrize("path", repository_configs())
def test_every_config_of_the_repository_loads(path):
    files = [REPO / OVERLAYS[path], REPO / path] if path in OVERLAYS else [REPO / path]
    if path not in OVERLAYS:
        assert "datasets" in yaml.safe_load((REPO / path).read_text()), (
            f"{path} has no datasets: an overlay? name the config it overrides in OVERLAYS"
        )
    loaded = config.load(*files)
    assert loaded.datasets and set(loaded.attentions) <= set(config.ATTENTIONS)
    for name, dataset in loaded.datasets.items():
        assert dataset.name == name and dataset.label_key
    # every section is the dataclass the stages take, built from the same values
    for name, cls in config.SECTIONS.items():
        node = loaded.raw
        for part in name.split("."):
            node = node[part]
        assert config.section(name, node) == getattr(loaded, name.split(".")[-1])
        assert isinstance(getattr(loaded, name.split(".")[-1]), cls)


def test_overlays_change_only_what_they_name():
    base = config.load(REPO / "configs" / "shared_data.yaml")
    both = config.load(REPO / "configs" / "shared_data.yaml", REPO / "configs" / "h200_run.yaml")
    overlay = yaml.safe_load((REPO / "configs" / "h200_run.yaml").read_text())
    train = dict(overlay["train"])
    stop = dataclasses.replace(base.train.stop, **train.pop("stop", {}))  # merged key by key
    assert both.train == dataclasses.replace(base.train, **train, stop=stop)
    assert both.model == base.model and list(both.datasets) == list(base.datasets)


def test_sections_are_the_schemas_keys():
    """A dataclass field per key of its schema section: nothing can drift between them."""
    for name, cls in config.SECTIONS.items():
        keys = set(config._subschema(name)["properties"])
        assert {f.name for f in dataclasses.fields(cls)} == keys, name
    dataset_keys = set(config.schema()["$defs"]["synthetic"]["properties"])
    assert {f.name for f in dataclasses.fields(config.Synthetic)} == dataset_keys
    for (cls, name), nested in config.NESTED.items():
        section = next(s for s, c in config.SECTIONS.items() if c is cls)
        sub = config._subschema(f"{section}.{name}")
        keys = set(sub.get("items", sub)["properties"])  # a list's items, or a mapping
        assert {f.name for f in dataclasses.fields(nested)} == keys, (section, name)


def schema_defaults(sub: dict) -> dict:
    """The defaults of a section's keys, nested sections' keys each from their own."""
    return {
        key: schema_defaults(prop) if "properties" in prop else prop["default"]
        for key, prop in sub["properties"].items()
    }


def test_defaults_come_from_the_schema_alone():
    train = config.section("train", {})
    assert dataclasses.asdict(train) == schema_defaults(config._subschema("train"))
    assert isinstance(train.stop, config.Stop) and train.stop.rule == "none"
    # a whole config gets every section, filled, and the input is left as it was
    raw = {"datasets": copy.deepcopy(TINY["datasets"])}
    loaded = config.from_dict(raw)
    assert raw == {"datasets": TINY["datasets"]}
    assert loaded.seeds == (0, 1, 2) and loaded.stress_test.n_layers == 10


def test_the_lists_of_names_agree_with_the_code():
    from sigmoid_sc.attention import ATTENTION_KINDS
    from sigmoid_sc.evaluate import BATCH_METRICS, LABEL_METRICS

    # the kinds: the schema's enums, the train stage's choices and the Snakefile's wildcard
    assert config.ATTENTIONS == ATTENTION_KINDS
    stress = config._subschema("experiments.stress_test")["properties"]["attentions"]
    assert tuple(stress["items"]["enum"]) == ATTENTION_KINDS
    from sigmoid_sc.cli import build_parser

    train = build_parser("train")._subparsers._group_actions[0].choices["train"]
    attention = next(a for a in train._actions if a.dest == "attention")
    assert tuple(attention.choices) == ATTENTION_KINDS
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert 'attention="|".join(sigmoid_sc_config.ATTENTIONS)' in common
    metrics = config.schema()["$defs"]["metric"]["enum"]
    assert set(metrics) == {"val_loss", *LABEL_METRICS, *BATCH_METRICS}
    # the kernel benchmark: the timing core's implementations, the kernel's head dims, and
    # the core's workload settings as the section's defaults
    from sigmoid_sc.attention import benchmark
    from sigmoid_sc.attention.triton_sigmoid import SUPPORTED_HEAD_DIMS
    from sigmoid_sc.kernel_benchmark import packaged_lengths

    kernel = config._subschema("experiments.kernel_benchmark")["properties"]
    assert tuple(kernel["impls"]["items"]["enum"]) == tuple(benchmark.IMPLS)
    assert tuple(kernel["head_dims"]["items"]["enum"]) == SUPPORTED_HEAD_DIMS
    defaults = config.section("experiments.kernel_benchmark", {})
    assert defaults.head_dims == benchmark.HEAD_DIMS and defaults.dense_n == benchmark.DENSE_N
    assert (defaults.hidden, defaults.dense_tokens, defaults.varlen_tokens) == (
        benchmark.HIDDEN,
        benchmark.DENSE_TOKENS,
        benchmark.VARLEN_TOKENS,
    )
    assert set(defaults.cell_lengths) <= set(packaged_lengths())


# ---------------------------------------------------------------------------------------------
# the schema's edges: what the schema accepts, a stage must accept too

#: small settings each edge value is put into (one key at a time)
BASES = {
    "prepare": {"min_genes": 5, "min_cells": 1},
    "tokenize": {"max_len": 16},
    "model": {"n_layers": 1, "d_model": 8, "n_heads": 2, "d_ff": 8},
    "train": {"steps": 2, "batch_tokens": 96, "eval_every": 1, "checkpoint_every": 1},
    "aggregate": {},
    "experiments.stress_test": {
        "n_layers": 1,
        "d_model": 8,
        "n_heads": 2,
        "d_ff": 8,
        "vocab_size": 40,
        "seq_len": 8,
        "batch_size": 2,
        "max_steps": 2,
        "early_steps": 1,
        "precision": "fp32",
        "logit_queries": 0,
    },  # fmt: skip
    "experiments.jacobian": {"n_cells": 2, "check_rows": 1},
    "experiments.stability_sweep": {"vocab_size": 40, "seq_len": 8, "steps": 4, "final_window": 1},
}
EPS = 1e-6


def _edges(sub: dict) -> list:
    """Values at the edges of what the schema ``sub`` accepts."""
    if "$ref" in sub:
        sub = {**config._resolve(sub["$ref"]), **{k: v for k, v in sub.items() if k != "$ref"}}
    if "oneOf" in sub:
        return [v for branch in sub["oneOf"] for v in _edges(branch)]
    if "enum" in sub:
        return list(sub["enum"])
    kinds = sub.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    out = [None] if "null" in kinds else []
    if "boolean" in kinds:
        out += [True, False]
    if "integer" in kinds or "number" in kinds:
        step = 1 if "integer" in kinds else EPS
        if "minimum" in sub:
            out.append(sub["minimum"])
        if "exclusiveMinimum" in sub:
            out.append(sub["exclusiveMinimum"] + step)
        if "maximum" in sub:
            out.append(sub["maximum"])
        if "exclusiveMaximum" in sub:
            out.append(sub["exclusiveMaximum"] - step)
    if "array" in kinds:
        out += [[v] for v in _edges(sub.get("items", {}))]
    return out


def edge_cases(name: str) -> list[tuple[str, object]]:
    """(key, edge value) of every key of a section; a nested section's keys one at a time as
    (its key, {nested key: edge value})."""
    props = config._subschema(name)["properties"]
    out = []
    for key, sub in props.items():
        if "properties" in sub:
            out += [(key, {k: v}) for k, v in edge_cases(f"{name}.{key}")]
        else:
            out += [(key, value) for value in _edges(sub)]
    return out


def accepted(name: str, key: str, value):
    """The section with one edge value, or None where the config itself refuses it (which
    happens before any job runs, in plain words)."""
    try:
        return config.section(name, {**BASES.get(name, {}), key: value})
    except ConfigError as exc:
        assert key in str(exc)
        return None


@pytest.fixture(scope="module")
def raw_cells():
    from sigmoid_sc.download import load_dataset

    synthetic = {"n_cells": 200, "n_genes": 60, "n_cell_types": 3, "n_batches": 2, "seed": 3}
    entry = {"source": "synthetic", "label_key": "cell_type", "synthetic": synthetic}
    return load_dataset(config.dataset("edges", entry))


@pytest.fixture(scope="module")
def prepared(raw_cells):
    from sigmoid_sc.prepare import prepare

    return prepare(raw_cells, "edges", config.section("prepare", BASES["prepare"]))


@pytest.mark.parametrize(("key", "value"), edge_cases("prepare"))
def test_prepare_takes_every_value_the_schema_takes(raw_cells, key, value):
    from sigmoid_sc.prepare import prepare

    params = accepted("prepare", key, value)
    if params is not None:
        out = prepare(raw_cells, "edges", params)
        # train needs train and val cells, embed and evaluate test cells
        assert set(out.obs["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(("key", "value"), edge_cases("tokenize"))
def test_tokenize_takes_every_value_the_schema_takes(prepared, key, value):
    from sigmoid_sc.tokenize import tokenize

    params = accepted("tokenize", key, value)
    if params is not None:
        assert tokenize(prepared, "edges", params)["input_ids"].size > 0


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("edges") / "tokens.npz", n_cells=40, max_len=12)


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [("model", k, v) for k, v in edge_cases("model")]
    + [("train", k, v) for k, v in edge_cases("train")],
)
def test_train_takes_every_value_the_schema_takes(tokens, tmp_path, one_thread, name, key, value):
    from sigmoid_sc.train import train

    params = accepted(name, key, value)
    if params is None:
        return
    model = params if name == "model" else config.section("model", BASES["model"])
    settings = params if name == "train" else config.section("train", BASES["train"])
    if key == "batch_tokens" and value < 12:
        # the one limit that depends on the data: every cell must fit the budget (the longest
        # of these holds 12 tokens); train says so, naming the key, before writing anything
        with pytest.raises(ConfigError, match=r"raise train\.batch_tokens to at least 12"):
            train("edges", tokens, "sigmoid", 0, model, settings, "cpu", tmp_path)
        assert not list(tmp_path.iterdir())
        return
    out = train("edges", tokens, "sigmoid", 0, model, settings, "cpu", tmp_path)
    assert (out / "model.pt").is_file()


@pytest.mark.parametrize(("key", "value"), edge_cases("aggregate"))
def test_aggregate_takes_every_value_the_schema_takes(tmp_path, key, value):
    from sigmoid_sc import aggregate

    params = accepted("aggregate", key, value)
    if params is None:
        return
    metrics = config.schema()["$defs"]["metric"]["enum"]
    rng = np.random.default_rng(0)
    rows = [
        {"dataset": "d", "method": method, "seed": seed, **{m: rng.random() for m in metrics}}
        for method in ("softmax", "sigmoid", "pca")
        for seed in ((-1,) if method == "pca" else (0, 1))
    ]
    summary = aggregate.summarise(pd.DataFrame(rows), params)
    aggregate.to_markdown(summary, params)
    aggregate.to_latex(summary, params)
    assert len(summary) > 0


@pytest.mark.parametrize(("key", "value"), edge_cases("experiments.stress_test"))
def test_the_stress_test_takes_every_value_the_schema_takes(one_thread, key, value):
    from sigmoid_sc import stress_test

    cfg = accepted("experiments.stress_test", key, value)
    if cfg is None:
        return
    rows, summary = stress_test.run_stress_test(cfg, CPU, log=lambda *_: None)
    assert set(summary["arms"]) and all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize(("key", "value"), edge_cases("experiments.stability_sweep"))
def test_the_stability_sweep_takes_every_value_the_schema_takes(key, value):
    """Each run of the sweep is a stress-test configuration: every value the sweep's section
    takes must make one, for every arm (the runs themselves: tests/test_stability_sweep.py)."""
    from sigmoid_sc import stability_sweep

    cfg = accepted("experiments.stability_sweep", key, value)
    if cfg is None:
        return
    for arm in cfg.arms:
        run = stability_sweep.stress_config(cfg, arm, cfg.lrs[-1], cfg.seeds[-1])
        assert run.max_steps == cfg.warmup_steps + cfg.steps and run.attentions == (arm.attention,)
        assert (run.norm, run.qk_norm, run.layer_scale) == (arm.norm, arm.qk_norm, arm.layer_scale)


@pytest.fixture(scope="module")
def trained(tokens, tmp_path_factory):
    from sigmoid_sc.train import train

    root = tmp_path_factory.mktemp("edge_models")
    model = config.section("model", BASES["model"])
    settings = config.section("train", BASES["train"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            kind: str(train("edges", tokens, kind, 0, model, settings, "cpu", root / kind))
            + "/model.pt"
            for kind in ("softmax", "sigmoid")
        }
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("key", "value"), edge_cases("experiments.jacobian"))
def test_the_jacobian_takes_every_value_the_schema_takes(tokens, trained, key, value):
    from sigmoid_sc import jacobian

    params = accepted("experiments.jacobian", key, value)
    if params is not None:
        result = jacobian.jacobian_analysis("edges", str(tokens), trained, params, "cpu")
        assert len(result["table"]) > 0


@pytest.mark.parametrize("name", ["download", "evaluate", *list(config.SECTIONS)[-2:]])
def test_the_other_sections_build_at_every_edge(name):
    # their stages need a GPU, the network or JAX's compile: each value is checked to build
    for key, value in edge_cases(name):
        built = accepted(name, key, value)
        assert built is None or getattr(built, key) == (
            tuple(value) if isinstance(value, list) else value
        )


SYNTHETIC_EDGES = [
    (key, value)
    for key, sub in config.schema()["$defs"]["synthetic"]["properties"].items()
    for value in _edges(sub)
]


@pytest.mark.parametrize(("key", "value"), SYNTHETIC_EDGES)
def test_the_synthetic_source_takes_every_value_the_schema_takes(key, value):
    from sigmoid_sc.download import load_dataset

    entry = {
        "source": "synthetic",
        "label_key": "cell_type",
        "batch_key": "batch",
        "synthetic": {"n_cells": 60, "n_genes": 40, "n_cell_types": 3, key: value},
    }
    try:
        dataset = config.dataset("edges", entry)
    except ConfigError as exc:
        assert key in str(exc) or "n_cell_types" in str(exc)
        return
    assert load_dataset(dataset).n_obs == dataset.synthetic.n_cells


# ---------------------------------------------------------------------------------------------
# messages


def invalid(edit) -> str:
    cfg = copy.deepcopy(TINY)
    edit(cfg)
    with pytest.raises(ConfigError) as excinfo:
        config.validate(cfg)
    text = str(excinfo.value)
    for dump in ("is not valid under any of the given schemas", "Failed validating", "{'"):
        assert dump not in text, text
    return text


def test_a_url_dataset_without_format_says_what_it_needs():
    text = invalid(
        lambda c: c["datasets"].update(
            atlas={"source": "url", "url": "https://example.org/a.h5ad", "label_key": "ct"}
        )
    )
    assert text == (
        "invalid config: datasets.atlas (source: url) needs `format` (one of h5ad, 10x_h5, "
        "10x_mtx, hdf5, text, csv, tsv, txt), or `files`"
    )


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["prepare"].update(min_gene=3), "unknown key prepare.min_gene (known keys of prepare: "),
        (lambda c: c.update(sedes=[0]), "unknown key sedes (known keys of the config: "),
        (lambda c: c["train"].update(precision="fp16"), "train.precision must be one of fp32, bf16; got 'fp16'"),
        (lambda c: c["train"].update(steps=0), "train.steps must be >= 1; got 0"),
        (lambda c: c["train"].update(lr="fast"), "train.lr must be a number > 0; got 'fast'"),
        (
            lambda c: c["train"].update(batch_size=32),
            "train.batch_size (cells per step) was replaced by train.batch_tokens (tokens per step",
        ),
        (lambda c: c["train"].update(stop={"rule": "early"}), "train.stop.rule must be one of none, plateau; got 'early'"),
        (lambda c: c["train"].update(stop={"patience": 3}), "unknown key train.stop.patience (known keys of train.stop: "),
        (lambda c: c["datasets"]["blobs_a"].pop("label_key"), "datasets.blobs_a needs `label_key`"),
        (lambda c: c["datasets"]["blobs_a"].update(source="scanpy"), "datasets.blobs_a (source: scanpy) needs `name`"),
        (lambda c: c.update(seeds=[]), "seeds needs at least 1 item"),
        (lambda c: c["model"].update(n_heads=3), "model.d_model (16) must be a multiple of model.n_heads (3)"),
        (
            lambda c: c["prepare"].update(val_fraction=0.5, test_fraction=0.5),
            "prepare.val_fraction + prepare.test_fraction must be < 1",
        ),
        (
            lambda c: c.update(experiments={"jacobian": {"enabled": True, "dataset": "nope"}}),
            "experiments.jacobian.dataset 'nope' is not a key of datasets (blobs_a, blobs_b)",
        ),
        (
            lambda c: c.setdefault("aggregate", {}).update(claim_metric="asw_label"),
            "invalid config: aggregate.claim_metric is now aggregate.primary_metric; rename the key",
        ),
        (
            lambda c: c.setdefault("aggregate", {}).update(primary_metric="asw"),
            "aggregate.primary_metric must be one of val_loss, asw_label, asw_label_raw, ",
        ),
        (
            lambda c: c.update(experiments={"jacobian": {"enabled": True}}),  # tiny: cls_token on
            "experiments.jacobian does not analyse models with model.cls_token: true",
        ),
        (
            lambda c: c.update(experiments={"stress_test": {"lr": [1e-3, -1]}}),
            "experiments.stress_test.lr must be a number > 0 or a list of numbers > 0",
        ),
        (
            lambda c: c["datasets"]["blobs_b"]["synthetic"].update(n_cells=5),
            "datasets.blobs_b.synthetic needs n_cells >= 2 x n_cell_types",
        ),
        (
            lambda c: c["datasets"].update(
                x={"source": "url", "url": "https://e.org/x.h5", "format": "hdf5", "label_key": "c"}
            ),
            "datasets.x.reader: format hdf5 needs reader.matrix",
        ),
    ],
)  # fmt: skip
def test_errors_are_plain_words_naming_the_key(edit, expected):
    assert expected in invalid(edit)


def test_batch_metrics_need_a_dataset_with_batches():
    def no_batches(c, **aggregate):
        for entry in c["datasets"].values():
            entry.pop("batch_key", None)
        c.setdefault("aggregate", {}).update(aggregate)

    assert "aggregate.primary_metric is a batch metric (ilisi) but no dataset has a batch_key" in (
        invalid(lambda c: no_batches(c, primary_metric="ilisi"))
    )
    assert "aggregate.metrics lists batch metrics (asw_batch)" in invalid(
        lambda c: no_batches(c, metrics=["asw_label", "asw_batch"])
    )


def test_new_keys_take_the_schemas_defaults():
    cfg = config.from_dict({"datasets": TINY["datasets"]})
    assert cfg.model.cls_token is False
    assert (cfg.aggregate.primary_metric, cfg.aggregate.bootstrap_resamples) == ("asw_label", 10000)
    assert cfg.aggregate.bootstrap_seed == 0
    with pytest.raises(ConfigError, match=r"^invalid aggregate: aggregate.claim_metric is now"):
        config.section("aggregate", {"claim_metric": "asw_label"})


def test_every_problem_is_listed_once():
    text = invalid(lambda c: c["train"].update(steps=0, precision="fp16", stpes=1))
    assert text.startswith("invalid config: 3 problems:\n  - ")
    assert text.count("\n  - ") == 3


def test_a_section_on_the_command_line_is_checked_the_same_way():
    with pytest.raises(ConfigError, match=r"^invalid train: unknown key train.stpes \(known"):
        config.section("train", {"stpes": 3})
    with pytest.raises(ConfigError, match=r"^invalid train: train.batch_size .* batch_tokens"):
        config.section("train", {"batch_size": 32, "steps": 3})
    with pytest.raises(ConfigError, match=r"^invalid experiments.stress_test: .*seq_len \(9000\)"):
        config.section("experiments.stress_test", {"seq_len": 9000, "vocab_size": 5000})
    with pytest.raises(ConfigError, match=r"datasets.x needs `label_key`"):
        config.dataset("x", {"source": "synthetic", "synthetic": {}})


def test_the_cli_maps_every_stage_to_its_file():
    """``sigmoid-sc <stage>`` lives in ``sigmoid_sc/<stage with _>.py``, registered by it alone."""
    from sigmoid_sc.cli import COMMAND_MODULES, build_parser

    for command, module in COMMAND_MODULES.items():
        path = REPO / "src" / Path(*module.split(".")).with_suffix(".py")
        assert path.is_file(), module
        assert path.stem == command.replace("-", "_"), (command, module)
        commands = build_parser(command)._subparsers._group_actions[0].choices
        assert list(commands) == [command]
