"""The pipeline's config: one schema, one validation, a frozen dataclass per section.

``config.schema.yaml`` (beside this module) is the only source of defaults and checks: types,
ranges, enums, unknown keys. :func:`validate` checks a whole config against it, fills the
defaults in place (the Snakefile calls it before any job) and adds the checks that span several
keys, which a JSON schema cannot express (and the readers' option tables). Every error is one line in
plain words that names the key (``prepare.val_fraction must be < 1; got 1.5``), never a
jsonschema dump.

The stages get their section as JSON on the command line and turn it into the section's
dataclass with :func:`section` (``section("train", params) -> Train``) or, for a dataset entry,
:func:`dataset`; both validate the same way, so a stage trusts what it gets. :func:`load`
reads YAML files (later ones merged over earlier ones, as Snakemake merges ``--configfile``
overlays) into a :class:`Config` holding every section's dataclass.

The protocols (``protocol``: per_dataset | pretrain | both) are read here too: :func:`protocols`
says which run, :func:`pretrain_units` lists the pretraining protocol's units (the sets of
cells it scores, :class:`Unit`) from the datasets' ``role`` and ``holdout``.

Imports only yaml and jsonschema (and, for datasets with reader options, the readers' option
tables), so the Snakefile can import it cheaply.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
N_SPECIAL_TOKENS = 3  # pad, mask, cls: ids 0-2 of every vocabulary (sigmoid_sc.tokenize)
#: metrics that need a dataset's batch_key (sigmoid_sc.evaluate)
BATCH_METRICS = ("asw_batch", "ilisi", "graph_connectivity")


# ----------------------------------------------------------------------------------------------
# the sections


@dataclass(frozen=True)
class Synthetic:
    n_cells: int
    n_genes: int
    n_cell_types: int
    n_batches: int
    seed: int
    gene_names: str  # index | symbols (sigmoid_sc.synthetic.symbol_names)


@dataclass(frozen=True)
class Holdout:
    """A dataset's ``holdout``: its cells whose ``obs[obs_key]`` is in ``values`` are left out
    of the corpus and scored zero-shot as ``name`` (None: ``<dataset>_holdout``)."""

    obs_key: str
    values: tuple[str | int, ...]
    name: str | None


@dataclass(frozen=True)
class Dataset:
    """One entry of ``datasets``. ``name`` is its key; ``scanpy_name`` is the entry's ``name``
    (the scanpy function); ``entry`` is the whole validated entry, read-only, for the keys of
    the ``url`` source (url, files, obs, sha256, ...; see :mod:`sigmoid_sc.fetch`). ``role`` and
    ``holdout``: its part in the pretraining protocol."""

    name: str
    source: str
    label_key: str
    batch_key: str | None
    use_raw: bool
    normalized: bool
    scanpy_name: str | None
    path: str | None
    format: str | None
    reader: Mapping[str, Any]
    synthetic: Synthetic | None
    role: str  # pretrain | evaluate | none
    holdout: Holdout | None
    entry: Mapping[str, Any]


@dataclass(frozen=True)
class Pretrain:
    """``pretrain``: the pretraining protocol's corpus (sigmoid_sc.vocabulary)."""

    sampling: str  # proportional | capped
    max_cells_per_dataset: int | None  # capped: the most training cells of one dataset
    sampling_seed: int
    min_match_rate: float  # floor on a zero-shot dataset's expressed-token match rate


@dataclass(frozen=True)
class Download:
    cache_dir: str
    lockfile: str | None
    require_checksum: bool
    retries: int
    timeout_s: float


@dataclass(frozen=True)
class Prepare:
    min_genes: int
    min_cells: int
    n_top_genes: int | None
    val_fraction: float
    test_fraction: float
    split_seed: int


@dataclass(frozen=True)
class Tokenize:
    max_len: int
    gene_median_norm: bool


@dataclass(frozen=True)
class Model:
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    dropout: float
    cls_token: bool  # one CLS token per cell (sigmoid_sc.model); embed adds X_emb_cls


@dataclass(frozen=True)
class Stop:
    """``train.stop``: when a run ends before ``train.steps`` (``sigmoid_sc.train.plateau_reached``)."""

    rule: str  # none: run train.steps | plateau: stop when the validation loss plateaus
    window: float  # the last fraction of the steps trained so far that the rule looks at
    min_rel_improvement: float  # less relative improvement over the window: a plateau
    min_steps: int  # never before this step (the loss can sit still around warm-up)


@dataclass(frozen=True)
class Train:
    steps: int  # the cap: a run ends here unless its stopping rule ended it before
    batch_tokens: int  # tokens per step (cells packed up to it)
    lr: float  # peak learning rate, reached after warm-up
    schedule: str  # after warm-up: constant | cosine (to 10% at steps)
    weight_decay: float  # on matrices and embeddings, not on biases and norms
    warmup_steps: int
    mask_prob: float  # each token's chance to be masked (at least one per cell)
    eval_every: int
    checkpoint_every: int
    precision: str  # fp32 | bf16 (autocast, CUDA only)
    compile: bool  # torch.compile the encoder and its loss (CUDA only)
    stop: Stop


@dataclass(frozen=True)
class Evaluate:
    n_neighbors: int


@dataclass(frozen=True)
class Aggregate:
    primary_metric: str  # named first in the summary and its headline
    claim_relative_change: float  # the paper's claim on asw_label
    bootstrap_resamples: int  # of the percentile bootstrap 95% CIs of sigmoid - softmax
    bootstrap_seed: int
    metrics: tuple[str, ...] | None


@dataclass(frozen=True)
class StressTest:
    enabled: bool
    attentions: tuple[str, ...]
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab_size: int
    seq_len: int
    batch_size: int
    n_cell_types: int
    rank_noise: float
    mask_prob: float
    lr: float | tuple[float, ...]
    warmup_steps: int
    weight_decay: float
    precision: str
    seed: int
    max_steps: int
    max_seconds: float
    early_steps: int
    divergence_factor: float
    logit_queries: int
    logit_every: int
    task: str  # preference | ordered (sigmoid_sc.stress_test.RankSequences)
    task_seed: int | None  # seed of the programmes; None: seed
    module_size: int
    programme_noise: float | None
    norm: str  # the encoder's switches (sigmoid_sc.model)
    qk_norm: bool
    layer_scale: float | None
    schedule: str  # after warm-up: constant | cosine (to min_lr_ratio x the peak at max_steps)
    min_lr_ratio: float
    checkpoint_every: int

    @property
    def lrs(self) -> list[float]:
        """The peak learning rates of the run: ``lr`` as a list (a sweep when several)."""
        return [float(v) for v in self.lr] if isinstance(self.lr, tuple) else [float(self.lr)]


@dataclass(frozen=True)
class SweepArm:
    """One architecture of the stability sweep (an item of ``experiments.stability_sweep.arms``)."""

    name: str
    attention: str
    norm: str  # pre | post (sigmoid_sc.model)
    qk_norm: bool
    layer_scale: float | None


@dataclass(frozen=True)
class StabilitySweep:
    """``experiments.stability_sweep`` (sigmoid_sc.stability_sweep)."""

    enabled: bool
    arms: tuple[SweepArm, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]  # the first at every learning rate, the others at the boundary
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab_size: int
    seq_len: int
    batch_size: int
    task: str
    n_cell_types: int
    module_size: int
    programme_noise: float | None
    rank_noise: float
    mask_prob: float
    task_seed: int
    warmup_steps: int
    steps: int  # after warm-up
    schedule: str
    min_lr_ratio: float
    weight_decay: float
    precision: str
    early_steps: int
    divergence_factor: float
    final_window: int
    learned_fraction: float
    logit_queries: int
    checkpoint_every: int
    max_seconds: float


@dataclass(frozen=True)
class Jacobian:
    enabled: bool
    dataset: str | None
    seed: int | None
    split: str
    n_cells: int
    check_rows: int


@dataclass(frozen=True)
class KernelBenchmark:
    enabled: bool
    head_dims: tuple[int, ...]
    dense_n: tuple[int, ...]
    cell_lengths: tuple[str, ...]
    impls: tuple[str, ...] | None
    hidden: int
    dense_tokens: int
    varlen_tokens: int
    time_limit: float | None
    fallback_csv: str | None


@dataclass(frozen=True)
class TrainingSpeed:
    enabled: bool
    n_layers: int
    d_models: tuple[int, ...]
    head_dims: tuple[int, ...]
    vocab_size: int
    seq_len: int
    tokens: int
    workloads: tuple[str, ...]
    precision: str
    warmup: int
    repeats: int
    smoke: bool


#: (dataclass, field) -> the dataclass of a nested section (of each item, for a list)
NESTED = {(Train, "stop"): Stop, (StabilitySweep, "arms"): SweepArm}

#: keys the config no longer has -> what to write instead (an error says so, naming the key)
REMOVED_KEYS = {
    "train.batch_size": (
        "train.batch_size (cells per step) was replaced by train.batch_tokens (tokens per step, "
        "cells packed up to it): set batch_tokens to about batch_size x the mean cell length"
    ),
}

#: section name (a dotted path of the config) -> its dataclass
SECTIONS = {
    "download": Download,
    "prepare": Prepare,
    "tokenize": Tokenize,
    "model": Model,
    "train": Train,
    "evaluate": Evaluate,
    "aggregate": Aggregate,
    "pretrain": Pretrain,
    "experiments.stress_test": StressTest,
    "experiments.stability_sweep": StabilitySweep,
    "experiments.jacobian": Jacobian,
    "experiments.kernel_benchmark": KernelBenchmark,
    "experiments.training_speed": TrainingSpeed,
}


@dataclass(frozen=True)
class Config:
    """A whole validated config, every section as its dataclass (see :func:`load`)."""

    data_dir: str | None
    seeds: tuple[int, ...]
    attentions: tuple[str, ...]
    device: str
    train_gpus: int
    protocol: str  # per_dataset | pretrain | both
    datasets: Mapping[str, Dataset]
    download: Download
    prepare: Prepare
    tokenize: Tokenize
    model: Model
    train: Train
    evaluate: Evaluate
    aggregate: Aggregate
    pretrain: Pretrain
    stress_test: StressTest
    stability_sweep: StabilitySweep
    jacobian: Jacobian
    kernel_benchmark: KernelBenchmark
    training_speed: TrainingSpeed
    raw: Mapping[str, Any]  # the validated dict, defaults filled


# ----------------------------------------------------------------------------------------------
# the schema and its validator (defaults filled while validating, as Snakemake's validate does)


@functools.cache
def schema() -> dict:
    """The config's JSON schema (config.schema.yaml), parsed once."""
    import yaml

    return yaml.safe_load(SCHEMA_PATH.read_text())


def _subschema(path: str) -> dict:
    """The schema of a dotted section path (``experiments.stress_test``)."""
    node = schema()
    for part in path.split("."):
        try:
            node = node["properties"][part]
        except KeyError:
            raise ConfigError(f"the config has no section {path!r}") from None
    return node


@functools.cache
def _validator_class():
    from jsonschema import Draft202012Validator, validators

    properties = Draft202012Validator.VALIDATORS["properties"]

    def properties_with_defaults(validator, props, instance, sub):
        if isinstance(instance, dict):
            for key, subschema in props.items():
                if "default" in subschema:
                    instance.setdefault(key, copy.deepcopy(subschema["default"]))
        yield from properties(validator, props, instance, sub)

    return validators.extend(Draft202012Validator, {"properties": properties_with_defaults})


def _errors(instance: Any, subschema: dict) -> list:
    """Every schema error of ``instance`` (defaults filled into it on the way)."""
    root = _validator_class()(schema())
    validator = root if subschema is schema() else root.evolve(schema=subschema)
    return sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path])


ATTENTIONS: tuple[str, ...] = tuple(schema()["properties"]["attentions"]["items"]["enum"])

#: keys of earlier configs (dotted paths) -> the keys that replaced them; a config that still
#: uses one fails with a message saying so instead of a bare "unknown key"
RENAMED = {"aggregate.claim_metric": "aggregate.primary_metric"}
"""The attention kinds the config accepts; the tests check them against
``sigmoid_sc.attention.ATTENTION_KINDS``, the one list of kinds."""


# ----------------------------------------------------------------------------------------------
# plain-word messages


def _key(path: Iterable, prefix: str = "") -> str:
    """``datasets.pbmc.files[0].url`` from a path of keys and indices."""
    out = prefix
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "the config"


def _words(value: Any) -> str:
    return ", ".join(str(v) for v in value)


_TYPES = {
    "integer": ("an integer", "integers"),
    "number": ("a number", "numbers"),
    "string": ("a string", "strings"),
    "boolean": ("true or false", "true or false"),
    "array": ("a list", "lists"),
    "object": ("a mapping", "mappings"),
    "null": ("null", "nulls"),
}


def _resolve(ref: str) -> dict:
    node = schema()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _describe(sub: dict, plural: bool = False) -> str:
    """A value the schema ``sub`` accepts, in words (``a number > 0``, ``a list of ...``)."""
    if "$ref" in sub:
        sub = {**_resolve(sub["$ref"]), **{k: v for k, v in sub.items() if k != "$ref"}}
    if "oneOf" in sub or "anyOf" in sub:
        return " or ".join(_describe(b, plural) for b in sub.get("oneOf") or sub["anyOf"])
    if "enum" in sub:
        return f"one of {_words(sub['enum'])}"
    kind = sub.get("type")
    if isinstance(kind, list):
        return " or ".join(_describe({**sub, "type": k}, plural) for k in kind)
    if kind == "array":
        text = f"{_TYPES['array'][plural]} of {_describe(sub.get('items', {}), plural=True)}"
        return text.replace("a lists", "lists")
    text = _TYPES.get(kind, ("a value", "values"))[plural]
    if "exclusiveMinimum" in sub:
        text += f" > {sub['exclusiveMinimum']}"
    elif "minimum" in sub:
        text += f" >= {sub['minimum']}"
    if "pattern" in sub:
        text += f" matching {sub['pattern']}"
    return text


def _needs(keys: Iterable[str]) -> str:
    """``format`` (one of h5ad, ...) and ``url``: required keys, with the choices of ``format``."""
    out = []
    for key in keys:
        note = f" (one of {_words(schema()['$defs']['format']['enum'])})" if key == "format" else ""
        out.append(f"`{key}`{note}")
    return " and ".join(out)


def _condition(error, root: dict) -> str:
    """`` (source: url)`` when the error comes from the ``then`` of an ``if`` on a constant."""
    path = list(error.absolute_schema_path)
    if "then" not in path:
        return ""
    node = root
    for part in path[: path.index("then")]:
        if isinstance(node, dict) and part not in node and "$ref" in node:
            node = _resolve(node["$ref"])  # a $ref is no step of the schema path
        node = node[part]
    for key, sub in ((node.get("if") or {}).get("properties") or {}).items():
        if "const" in sub:
            return f" ({key}: {sub['const']})"
    return ""


def message(error, prefix: str = "", root: dict | None = None) -> str:
    """One jsonschema ``ValidationError`` as a sentence that names the key.

    ``prefix``: the dotted path of the validated section (``train``); ``root``: the schema it
    was validated against (the whole config's by default).
    """
    root = schema() if root is None else root
    kind, value, instance = error.validator, error.validator_value, error.instance
    path = list(error.absolute_path)
    where = _key(path, prefix)
    got = f"; got {instance!r}"
    if kind == "additionalProperties":
        known = sorted((error.schema.get("properties") or {}).keys())
        base = _key(path, prefix) if (path or prefix) else ""
        extra = [f"{base}.{k}" if base else k for k in sorted(set(instance) - set(known))]
        removed = [REMOVED_KEYS[k] for k in extra if k in REMOVED_KEYS]
        unknown = [k for k in extra if k not in REMOVED_KEYS]
        if unknown:
            removed.append(
                f"unknown key {', '.join(unknown)} (known keys of {where}: {_words(known)})"
            )
        return "; ".join(removed)
    if kind == "required":
        return f"{where}{_condition(error, root)} needs {_needs(k for k in value if k not in instance)}"
    if kind in ("oneOf", "anyOf"):
        if error.context and all(e.validator == "required" for e in error.context):
            missing: dict[int, list[str]] = {}
            for e in error.context:
                missing.setdefault(e.relative_schema_path[0], []).extend(
                    k for k in e.validator_value if k not in e.instance
                )
            choices = ", or ".join(_needs(dict.fromkeys(keys)) for keys in missing.values())
            return f"{where}{_condition(error, root)} needs {choices}"
        if not error.context and all("required" in b for b in value):
            choices = ", or ".join(_needs(b["required"]) for b in value)
            return f"{where}{_condition(error, root)}: give only one of {choices}"
        return f"{where} must be {_describe(error.schema)}{got}"
    if kind == "enum":
        return f"{where} must be one of {_words(value)}{got}"
    if kind == "const":
        return f"{where} must be {value!r}{got}"
    if kind == "type":
        return f"{where} must be {_describe(error.schema)}{got}"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if kind in bounds:
        return f"{where} must be {bounds[kind]} {value}{got}"
    if kind == "minItems":
        return f"{where} needs at least {value} item{'s' if value != 1 else ''}"
    if kind == "uniqueItems":
        return f"{where} lists a value more than once{got}"
    if kind == "minProperties":
        return f"{where} needs at least {value} entr{'ies' if value != 1 else 'y'}"
    if kind == "minLength":
        return f"{where} must not be empty"
    if kind == "pattern" and "propertyNames" in error.schema_path:
        return f"{where}: the name {instance!r} must match {value}"
    if kind == "pattern":
        return f"{where} must match {value}{got}"
    return f"{where}: {error.message}"


def _renamed(config: Any, prefix: str = "") -> list[str]:
    """A line per renamed key (:data:`RENAMED`) that ``config`` (the section at ``prefix``)
    still uses."""
    problems = []
    for old, new in RENAMED.items():
        if prefix:
            if not old.startswith(prefix + "."):
                continue
            path = old[len(prefix) + 1 :].split(".")
        else:
            path = old.split(".")
        node = config
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            problems.append(f"{old} is now {new}; rename the key")
    return problems


def _raise(problems: list[str], what: str) -> None:
    problems = list(dict.fromkeys(problems))  # one line per problem, in order
    if len(problems) == 1:
        raise ConfigError(f"{what}: {problems[0]}")
    lines = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(f"{what}: {len(problems)} problems:\n{lines}")


# ----------------------------------------------------------------------------------------------
# checks a JSON schema cannot express (several keys at once, or the readers' option tables)


def _section_checks(name: str, s: Mapping, where: str) -> list[str]:
    problems = []
    experiment = name in ("experiments.stress_test", "experiments.stability_sweep")
    if (name == "model" or experiment) and s["d_model"] % s["n_heads"]:
        problems.append(
            f"{where}.d_model ({s['d_model']}) must be a multiple of {where}.n_heads "
            f"({s['n_heads']})"
        )
    if name == "prepare" and s["val_fraction"] + s["test_fraction"] >= 1:
        problems.append(
            f"{where}.val_fraction + {where}.test_fraction must be < 1 to leave training cells; "
            f"got {s['val_fraction']} + {s['test_fraction']}"
        )
    if name == "pretrain":
        cap = s["max_cells_per_dataset"]
        if s["sampling"] == "capped" and cap is None:
            problems.append(
                f"{where}.max_cells_per_dataset is needed when {where}.sampling is capped "
                "(the most training cells one dataset puts in the corpus)"
            )
        if s["sampling"] != "capped" and cap is not None:
            problems.append(
                f"{where}.max_cells_per_dataset is read only when {where}.sampling is capped "
                f"(it is {s['sampling']}); remove it or set sampling: capped"
            )
    if experiment and s["seq_len"] > s["vocab_size"] - N_SPECIAL_TOKENS:
        problems.append(
            f"{where}.seq_len ({s['seq_len']}) needs as many distinct genes, but "
            f"{where}.vocab_size ({s['vocab_size']}) holds {s['vocab_size'] - N_SPECIAL_TOKENS} "
            f"(vocab_size - {N_SPECIAL_TOKENS})"
        )
    if name == "experiments.stability_sweep":
        problems += _sweep_checks(s, where)
    if name == "experiments.kernel_benchmark":
        for head_dim in s["head_dims"]:
            if s["hidden"] % head_dim:
                problems.append(
                    f"{where}.hidden ({s['hidden']}) must be a multiple of every head dim of "
                    f"{where}.head_dims (not of {head_dim})"
                )
    return problems


def _sweep_checks(s: Mapping, where: str) -> list[str]:
    """The stability sweep's arms, learning rates (file names hold 3 significant digits) and
    final window."""
    problems = []
    names = [arm["name"] for arm in s["arms"]]
    for repeated in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}.arms: the name {repeated!r} is used more than once")
    tags: dict[str, list] = {}
    for lr in s["lrs"]:
        tags.setdefault(f"{float(lr):.3g}", []).append(lr)
    for same in (v for v in tags.values() if len(v) > 1):
        problems.append(
            f"{where}.lrs must differ in their first 3 significant digits (they name the runs' "
            f"folders); got {_words(same)}"
        )
    if s["final_window"] > s["steps"]:
        problems.append(
            f"{where}.final_window ({s['final_window']}) must be <= {where}.steps ({s['steps']})"
        )
    return problems


def _dataset_checks(name: str, entry: Mapping, where: str) -> list[str]:
    problems = []
    synthetic = entry.get("synthetic")
    if entry["source"] == "synthetic" and synthetic:
        k = synthetic["n_cell_types"]
        if synthetic["n_cells"] < 2 * k or synthetic["n_genes"] < 4 * k:
            problems.append(
                f"{where}.synthetic needs n_cells >= 2 x n_cell_types and n_genes >= 4 x "
                f"n_cell_types; got n_cells {synthetic['n_cells']}, n_genes "
                f"{synthetic['n_genes']}, n_cell_types {k}"
            )
    if entry.get("holdout") is not None and entry["role"] != "pretrain":
        problems.append(
            f"{where}.holdout splits a corpus dataset: it needs {where}.role: pretrain (got "
            f"{entry['role']}); a dataset with role {entry['role']} is left out of the corpus whole"
        )
    files = entry.get("files") or []
    names = [f["name"] for f in files]
    for repeated in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}.files: the name {repeated!r} is used more than once")
    for i, f in enumerate(files):
        if f.get("batch") is not None and not entry.get("batch_key"):
            problems.append(f"{where}.files[{i}] sets `batch` but {where} has no `batch_key`")
    specs = [(where, entry, False)] + [
        (f"{where}.files[{i}]", f, False) for i, f in enumerate(files)
    ]
    if entry.get("obs"):
        specs.append((f"{where}.obs", entry["obs"], True))
    for place, spec, labels in specs:
        if spec.get("format"):  # a path entry without one: the reader infers it
            from .readers import reader_option_problems

            problems += [
                f"{place}.reader: {p}"
                for p in reader_option_problems(spec["format"], spec.get("reader"), labels)
            ]
    return problems


def _config_checks(config: Mapping) -> list[str]:
    problems = []
    for name, entry in config["datasets"].items():
        problems += _dataset_checks(name, entry, f"datasets.{name}")
    for name in ("prepare", "model", "pretrain"):
        problems += _section_checks(name, config[name], name)
    if "pretrain" in protocols(config):
        problems += _unit_problems(config["datasets"])[1]
    experiments = config["experiments"]
    for name in ("stress_test", "stability_sweep"):
        problems += _section_checks(f"experiments.{name}", experiments[name], f"experiments.{name}")
    jacobian = experiments["jacobian"]
    if jacobian["enabled"]:
        datasets, seeds = list(config["datasets"]), config["seeds"]
        if jacobian["dataset"] is not None and jacobian["dataset"] not in datasets:
            problems.append(
                f"experiments.jacobian.dataset {jacobian['dataset']!r} is not a key of datasets "
                f"({_words(datasets)})"
            )
        if jacobian["seed"] is not None and jacobian["seed"] not in seeds:
            problems.append(
                f"experiments.jacobian.seed {jacobian['seed']} is not one of seeds ({_words(seeds)})"
            )
        if "per_dataset" not in protocols(config):
            problems.append(
                "experiments.jacobian analyses the per-dataset protocol's models: with protocol: "
                "pretrain there are none; set protocol: both or experiments.jacobian.enabled: "
                "false"
            )
        if not {"softmax", "sigmoid"} <= set(config["attentions"]):
            problems.append("experiments.jacobian needs attentions to list softmax and sigmoid")
        if config["model"]["cls_token"]:
            # the analysis slices each layer's attention input by the cells' gene tokens; a CLS
            # model's layers see one more token per cell
            problems.append(
                "experiments.jacobian does not analyse models with model.cls_token: true; "
                "turn one of them off"
            )
    aggregate = config["aggregate"]
    batch_metrics = [m for m in aggregate["metrics"] or [] if m in BATCH_METRICS]
    no_batches = not any(e.get("batch_key") for e in config["datasets"].values())
    if batch_metrics and no_batches:
        problems.append(
            f"aggregate.metrics lists batch metrics ({_words(batch_metrics)}) but no dataset "
            "has a batch_key"
        )
    if aggregate["primary_metric"] in BATCH_METRICS and no_batches:
        problems.append(
            f"aggregate.primary_metric is a batch metric ({aggregate['primary_metric']}) but no "
            "dataset has a batch_key"
        )
    return problems


# ----------------------------------------------------------------------------------------------
# the protocols and the pretraining protocol's units

PROTOCOLS = ("per_dataset", "pretrain")
#: a unit's part in the pretraining protocol: its training cells are in the corpus, or none is
CORPUS, ZERO_SHOT = "corpus", "zero_shot"
#: folders of results/pretrain/ that are no unit's
RESERVED_UNIT_NAMES = frozenset({"corpus", "tables", "figures"})
#: results/pretrain/ itself: no dataset may take the name while the pretraining protocol runs
PRETRAIN_DIR = "pretrain"
#: keys of a dataset entry that only the pretraining protocol reads: the per-dataset stages'
#: params leave them out, so changing a role reruns nothing of the per-dataset protocol
PROTOCOL_KEYS = ("role", "holdout")


@dataclass(frozen=True)
class Unit:
    """One set of cells the pretraining protocol scores: ``results/pretrain/<name>/``.

    ``dataset``: the config entry its cells come from; ``role``: :data:`CORPUS` (its training
    cells are in the corpus) or :data:`ZERO_SHOT`. With ``obs_key`` set, the unit is the cells
    whose ``obs[obs_key]`` is in ``values`` (``keep``) or is not (``not keep``): one side of a
    holdout; else every cell of the dataset.
    """

    name: str
    dataset: str
    role: str
    obs_key: str | None = None
    values: tuple[str, ...] = ()
    keep: bool = True

    @property
    def selects(self) -> bool:
        return self.obs_key is not None

    def selection(self) -> dict:
        """The cell selection as the ``holdout`` stage takes it (JSON-able)."""
        return {"obs_key": self.obs_key, "values": list(self.values), "keep": self.keep}


def protocols(config: Mapping) -> tuple[str, ...]:
    """The protocols a validated config runs: ``("per_dataset",)``, ``("pretrain",)`` or both."""
    protocol = config.get("protocol", "per_dataset")
    return PROTOCOLS if protocol == "both" else (protocol,)


def _unit_problems(datasets: Mapping[str, Mapping]) -> tuple[list[Unit], list[str]]:
    """The units of validated dataset entries (corpus units first, each group in config order),
    and what is wrong with them, each naming its key."""
    problems = []
    if PRETRAIN_DIR in datasets:
        problems.append(
            f"datasets.{PRETRAIN_DIR}: the name is taken by the pretraining protocol's results "
            "folder (results/pretrain/); rename the dataset"
        )
    corpus, zero_shot = [], []
    for name, entry in datasets.items():
        role, holdout = entry.get("role", "pretrain"), entry.get("holdout")
        if role == "none":
            continue
        if role == "evaluate":
            zero_shot.append(Unit(name, name, ZERO_SHOT))
        elif holdout is None:
            corpus.append(Unit(name, name, CORPUS))
        else:
            values = tuple(str(v) for v in holdout["values"])
            held = holdout.get("name") or f"{name}_holdout"
            corpus.append(Unit(name, name, CORPUS, holdout["obs_key"], values, keep=False))
            zero_shot.append(Unit(held, name, ZERO_SHOT, holdout["obs_key"], values, keep=True))
    if not corpus:
        problems.append(
            "the pretraining protocol needs a corpus: at least one dataset with role: pretrain "
            "(datasets.<name>.role, the default)"
        )
    seen: set[str] = set()
    for unit in zero_shot:
        if not unit.selects:  # a whole dataset: its name is its key, unique already
            continue
        where = f"datasets.{unit.dataset}.holdout.name"
        if unit.name in RESERVED_UNIT_NAMES:
            problems.append(
                f"{where}: {unit.name!r} is a folder of results/pretrain/ "
                f"({_words(sorted(RESERVED_UNIT_NAMES))}); choose another name"
            )
        elif unit.name in datasets or unit.name in seen:
            problems.append(f"{where}: {unit.name!r} names another dataset or holdout too")
        seen.add(unit.name)
    for name in datasets:
        if name in RESERVED_UNIT_NAMES and datasets[name].get("role", "pretrain") != "none":
            problems.append(
                f"datasets.{name}: the name is a folder of results/pretrain/ "
                f"({_words(sorted(RESERVED_UNIT_NAMES))}); rename it or set its role: none"
            )
    return corpus + zero_shot, problems


def pretrain_units(config: Mapping) -> list[Unit]:
    """The pretraining protocol's units of a validated config (:func:`validate`): corpus units
    first, then zero-shot ones, each group in the order of ``datasets``."""
    units, problems = _unit_problems(config["datasets"])
    if problems:
        _raise(problems, "invalid config")
    return units


# ----------------------------------------------------------------------------------------------
# the API


def validate(config: dict) -> dict:
    """Check a whole config; fill its defaults in place and return it.

    Raises :class:`ConfigError` listing every problem in plain words, each naming its key.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"invalid config: expected a mapping, got {type(config).__name__}")
    problems = _renamed(config) or [message(e) for e in _errors(config, schema())]
    if not problems:
        problems = _config_checks(config)
    if problems:
        _raise(problems, "invalid config")
    return config


def _checked(params: Any, subschema: dict, where: str) -> dict:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where} must be a mapping, got {params!r}")
    params = copy.deepcopy(params)
    problems = _renamed(params, where) or [
        message(e, where, subschema) for e in _errors(params, subschema)
    ]
    if problems:
        _raise(problems, f"invalid {where}")
    return params


def _build(cls, values: Mapping):
    def frozen(name, value):
        if (cls, name) in NESTED:
            if isinstance(value, list):
                return tuple(_build(NESTED[cls, name], item) for item in value)
            return _build(NESTED[cls, name], value)
        return tuple(value) if isinstance(value, list) else value

    return cls(**{f.name: frozen(f.name, values[f.name]) for f in dataclasses.fields(cls)})


def section(name: str, params: Mapping | None):
    """A config section (``"train"``, ``"experiments.stress_test"``, ...) as its dataclass.

    ``params`` is the section as the config gives it (keys left out take the schema's
    defaults). Raises :class:`ConfigError` naming the key when a value is wrong.
    """
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section {name!r}; known: {_words(SECTIONS)}")
    values = _checked(params, _subschema(name), name)
    problems = _section_checks(name, values, name)
    if problems:
        _raise(problems, f"invalid {name}")
    return _build(SECTIONS[name], values)


def dataset(name: str, entry: Mapping) -> Dataset:
    """The entry of dataset ``name`` (a key of ``datasets``) as a :class:`Dataset`."""
    where = f"datasets.{name}"
    pattern = schema()["properties"]["datasets"]["propertyNames"]["pattern"]
    if not re.match(pattern, name):
        raise ConfigError(f"invalid config: the dataset name {name!r} must match {pattern}")
    values = _checked(entry, schema()["$defs"]["dataset"], where)
    problems = _dataset_checks(name, values, where)
    if problems:
        _raise(problems, f"invalid {where}")
    synthetic = values.get("synthetic")
    return Dataset(
        name=name,
        source=values["source"],
        label_key=values["label_key"],
        batch_key=values["batch_key"] or None,
        use_raw=values["use_raw"],
        normalized=values["normalized"],
        scanpy_name=values.get("name"),
        path=values.get("path"),
        format=values.get("format"),
        reader=MappingProxyType(dict(values.get("reader") or {})),
        synthetic=_build(Synthetic, synthetic) if synthetic else None,
        role=values["role"],
        holdout=_build(Holdout, values["holdout"]) if values.get("holdout") else None,
        entry=MappingProxyType(values),
    )


def merge(base: dict, overlay: Mapping) -> dict:
    """``overlay`` merged into a copy of ``base``, key by key (as Snakemake merges configs)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def from_dict(config: Mapping) -> Config:
    """A validated :class:`Config` from a config mapping (left unchanged)."""
    raw = validate(copy.deepcopy(dict(config)))
    experiments = raw["experiments"]
    return Config(
        data_dir=raw["data_dir"],
        seeds=tuple(raw["seeds"]),
        attentions=tuple(raw["attentions"]),
        device=raw["device"],
        train_gpus=raw["train_gpus"],
        protocol=raw["protocol"],
        datasets=MappingProxyType({n: dataset(n, e) for n, e in raw["datasets"].items()}),
        download=_build(Download, raw["download"]),
        prepare=_build(Prepare, raw["prepare"]),
        tokenize=_build(Tokenize, raw["tokenize"]),
        model=_build(Model, raw["model"]),
        train=_build(Train, raw["train"]),
        evaluate=_build(Evaluate, raw["evaluate"]),
        aggregate=_build(Aggregate, raw["aggregate"]),
        pretrain=_build(Pretrain, raw["pretrain"]),
        stress_test=_build(StressTest, experiments["stress_test"]),
        stability_sweep=_build(StabilitySweep, experiments["stability_sweep"]),
        jacobian=_build(Jacobian, experiments["jacobian"]),
        kernel_benchmark=_build(KernelBenchmark, experiments["kernel_benchmark"]),
        training_speed=_build(TrainingSpeed, experiments["training_speed"]),
        raw=MappingProxyType(raw),
    )


def load(*paths: str | os.PathLike) -> Config:
    """Read config files (each later one merged over the earlier ones) and validate them."""
    import yaml

    if not paths:
        raise ConfigError("config.load: no config file given")
    merged: dict = {}
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
        merged = merge(merged, data)
    return from_dict(merged)
