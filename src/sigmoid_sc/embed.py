"""``sigmoid-sc embed``: cell embeddings of the held-out (test) cells from an encoder.

A cell's embedding is the mean of its gene tokens' final hidden states
(:func:`sigmoid_sc.model.pool`), computed in float32 on packed batches of ``EMBED_BATCH_CELLS``
cells in file order. Cells never see each other (attention stays within a cell), so the batch
size changes nothing but speed. A model with a CLS token (``model.cls_token``) also gives each
cell's CLS state: ``X_emb_cls`` beside ``X_emb``, scored by ``evaluate`` as method
``<attention>_cls``.

``--model model.pt``: a trained encoder (method = its attention kind), given the tokens it was
trained on or, under the pretraining protocol, any dataset's tokens of its corpus vocabulary
(``vocab_id``: zero-shot). ``--untrained KIND``: the
same encoder at its initial weights, those a training run of seed ``UNTRAINED_SEED`` starts from
(``torch.manual_seed(seed)`` then the constructor, as ``train`` does), built from the config's
model section and the tokens; method ``untrained_<kind>``, mean pooling only. The baseline says
what the encoder's architecture gives before any training.

``val_loss`` is recomputed here, not read from ``history.csv``: the masked-gene loss of the
validation cells under the same fixed masking that training's evaluation uses
(:func:`sigmoid_sc.tokens.validation_loss`), in float32. For an fp32 run it equals the last
``val`` row of ``history.csv`` up to float rounding; for a bf16 run it is the fp32 value; for
the untrained encoder it is the step-0 ``val`` row of the seed-``UNTRAINED_SEED`` runs.

Training facts travel with the embedding from the model's record (defaults where a record
predates them): ``steps`` (``steps_trained``, else ``steps``; 0 untrained), ``stop_reason``
(``""``: not recorded) and ``plateau`` (1.0 reached, 0.0 not, NaN not recorded).
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import numpy as np
import torch

from . import config
from .attention import ATTENTION_KINDS
from .config import Model
from .errors import ConfigError, DataError
from .io import write_npz
from .model import CLS_ID, Encoder, pool
from .runtime import parse_json_arg, resolve_device, set_threads
from .tokens import load_tokens, pack, validation_loss
from .train import load_model, model_config

log = logging.getLogger(__name__)

EMBED_BATCH_CELLS = 64  # bounds the padded [B, H, N, N] scores of the CPU reference
#: the initial weights of the untrained baseline: those of the seed-0 training runs
UNTRAINED_SEED = 0


@torch.no_grad()
def embed_cells(model, tokens, cells: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    """Cell embeddings in the order of ``cells``: ``{"mean": [n, d]}`` float32, plus
    ``"cls"`` (the CLS states) when the model has a CLS token."""
    with_cls = bool(getattr(model.config, "cls_token", False))
    out: dict[str, list] = {"mean": [], "cls": []} if with_cls else {"mean": []}
    for first in range(0, cells.size, EMBED_BATCH_CELLS):
        ids, cu, max_seqlen = pack(tokens, cells[first : first + EMBED_BATCH_CELLS])
        ids_t, cu_t = torch.from_numpy(ids).to(device), torch.from_numpy(cu).to(device)
        if with_cls:
            hidden, cls = model(ids_t, cu_t, max_seqlen, return_cls=True)
            out["cls"].append(cls.float().cpu().numpy())
        else:
            hidden = model(ids_t, cu_t, max_seqlen)
        out["mean"].append(pool(hidden, cu_t).cpu().numpy())
    return {name: np.concatenate(parts).astype(np.float32) for name, parts in out.items()}


def plateau_flag(value) -> float:
    """A record's ``plateau`` as 1.0 (reached), 0.0 (not) or NaN (not recorded)."""
    if value is None:
        return math.nan
    if isinstance(value, dict):  # a richer record: its verdict
        return plateau_flag(value.get("reached"))
    if isinstance(value, bool | np.bool_ | int | np.integer) and int(value) in (0, 1):
        return float(bool(value))
    log.warning("model record: plateau %r is not a yes/no; taken as not recorded", value)
    return math.nan


def training_facts(record: dict) -> dict:
    """``steps``, ``stop_reason``, ``plateau`` of a model record, with defaults for old records."""
    steps = record.get("steps_trained", record.get("steps"))
    return {
        "steps": -1 if steps is None else int(steps),
        "stop_reason": str(record.get("stop_reason") or ""),
        "plateau": plateau_flag(record.get("plateau")),
    }


def initial_model(
    model_params: Model, attention: str, tokens, seed: int = UNTRAINED_SEED
) -> Encoder:
    """The encoder a training run of ``seed`` starts from (train seeds torch, then builds it)."""
    cfg = model_config(model_params, attention, tokens)
    torch.manual_seed(seed)
    return Encoder(cfg)


def _check_cls_id(model, tokens, dataset: str) -> None:
    if getattr(model.config, "cls_token", False) and tokens.cls_id != CLS_ID:
        raise DataError(
            f"{dataset}: the tokens' cls_id is {tokens.cls_id}, the model's CLS token is "
            f"{CLS_ID}; retokenize"
        )


def write_embedding(
    output, dataset: str, model, tokens, dev, mask_prob: float, *, method: str, seed: int,
    facts: dict, pooled: tuple[str, ...], batch_tokens: int | None = None,
) -> None:  # fmt: skip
    """Embed the test cells, recompute the validation loss, write the npz (see module doc).

    Validation batches are packed up to ``batch_tokens`` (the run's own budget; None: the tokens
    of EMBED_BATCH_CELLS cells of max_len, for records from before token budgets).
    """
    test_cells, val_cells = tokens.cells("test"), tokens.cells("val")
    if test_cells.size == 0:
        raise DataError(f"{dataset}: the tokens have no test cells to embed")
    embeddings = embed_cells(model.to(dev).eval(), tokens, test_cells, dev)
    if batch_tokens is None:
        batch_tokens = EMBED_BATCH_CELLS * tokens.max_len
    val_loss = validation_loss(model, tokens, val_cells, mask_prob, batch_tokens, dev)
    extra = {f"X_emb_{name}": embeddings[name] for name in pooled if name in embeddings}
    write_npz(
        output,
        X_emb=embeddings["mean"],
        **extra,
        obs_names=tokens.obs_names[test_cells].astype(str),
        method=np.array(method),
        seed=np.array(seed, dtype=np.int64),
        val_loss=np.array(val_loss, dtype=np.float64),
        steps=np.array(facts["steps"], dtype=np.int64),
        stop_reason=np.array(facts["stop_reason"]),
        plateau=np.array(facts["plateau"], dtype=np.float64),
        split=np.array("test"),
    )


def embed(
    dataset: str,
    tokens_path: str | os.PathLike,
    model_path: str | os.PathLike,
    device: str,
    output: str | os.PathLike,
) -> None:
    """Write ``output`` (npz): ``X_emb`` (mean), ``X_emb_cls`` (CLS models), ``obs_names``,
    ``method``, ``seed``, ``val_loss``, ``steps``, ``stop_reason``, ``plateau``, ``split``."""
    set_threads()
    dev = resolve_device(device)
    tokens = load_tokens(tokens_path, dataset)
    model, record = load_model(model_path, dev)
    saved = record["tokens"]
    # the tokens it was trained on, or (pretraining protocol) tokens of the same vocabulary
    same_vocabulary = bool(tokens.vocab_id) and saved.get("vocab_id") == tokens.vocab_id
    if saved["sha256"] != tokens.metadata()["sha256"] and not same_vocabulary:
        raise DataError(
            f"{dataset}: {model_path} was trained on other tokens than {tokens_path} "
            "(their contents differ) and not on tokens of their gene vocabulary; retrain or "
            "pass the tokens it was trained on"
        )
    _check_cls_id(model, tokens, dataset)
    write_embedding(
        output, dataset, model, tokens, dev, record["train_config"]["mask_prob"],
        method=str(record["attention"]), seed=int(record["seed"]),
        facts=training_facts(record), pooled=("cls",),
        batch_tokens=record["train_config"].get("batch_tokens"),
    )  # fmt: skip


def embed_untrained(
    dataset: str,
    tokens_path: str | os.PathLike,
    attention: str,
    model_params: Model,
    mask_prob: float,
    device: str,
    output: str | os.PathLike,
    seed: int = UNTRAINED_SEED,
) -> None:
    """The untrained baseline's npz: method ``untrained_<attention>``, mean pooling, steps 0."""
    set_threads()
    dev = resolve_device(device)
    tokens = load_tokens(tokens_path, dataset)
    config.section("train", {"mask_prob": mask_prob})  # the same check as training's
    model = initial_model(model_params, attention, tokens, seed)
    _check_cls_id(model, tokens, dataset)
    write_embedding(
        output, dataset, model, tokens, dev, mask_prob,
        method=f"untrained_{attention}", seed=seed,
        facts={"steps": 0, "stop_reason": "", "plateau": math.nan}, pooled=(),
    )  # fmt: skip


def _run(args: argparse.Namespace) -> None:
    if (args.model is None) == (args.untrained is None):
        raise ConfigError("embed: give exactly one of --model and --untrained")
    if args.model is not None:
        embed(args.dataset, args.tokens, args.model, args.device, args.output)
        return
    model_params = config.section("model", parse_json_arg(args.model_json, "embed: --model-json"))
    embed_untrained(
        args.dataset, args.tokens, args.untrained, model_params, args.mask_prob, args.device,
        args.output,
    )  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embeddings of the test cells: a trained model.pt, or the untrained encoder",
    )
    p.add_argument("--dataset", required=True)
    p.add_argument(
        "--tokens",
        required=True,
        help="the tokens.npz the model was trained on, or tokens of its corpus vocabulary",
    )
    p.add_argument("--model", default=None, help="model.pt from `sigmoid-sc train`")
    p.add_argument(
        "--untrained",
        default=None,
        choices=ATTENTION_KINDS,
        help="instead of --model: the encoder of this kind at its seed-0 initial weights",
    )
    p.add_argument("--model-json", default="{}", help="--untrained: the config's model section")
    p.add_argument(
        "--mask-prob", type=float, default=0.15, help="--untrained: train.mask_prob (val_loss)"
    )
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument(
        "--output",
        required=True,
        help="results/<dataset>/embed/<attention>_seed<S>.npz or untrained_<attention>.npz",
    )
    p.set_defaults(func=_run)
