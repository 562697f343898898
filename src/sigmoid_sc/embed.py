"""``sigmoid-sc embed``: cell embeddings of the held-out (test) cells from a trained encoder.

A cell's embedding is the mean of its tokens' final hidden states (:func:`sigmoid_sc.model.pool`),
computed in float32 on packed batches of ``EMBED_BATCH_CELLS`` cells in file order. Cells never
see each other (attention stays within a cell), so the batch size changes nothing but speed.

``val_loss`` is recomputed here, not read from ``history.csv``: the masked-gene loss of the
validation cells under the same fixed masking that training's evaluation uses
(:func:`sigmoid_sc.tokens.validation_loss`), in float32. For an fp32 run it equals the last
``val`` row of ``history.csv`` up to float rounding; for a bf16 run it is the fp32 value.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from .errors import DataError
from .io import write_npz
from .model import pool
from .runtime import resolve_device, set_threads
from .tokens import load_tokens, pack, validation_loss
from .train import load_model

EMBED_BATCH_CELLS = 64  # bounds the padded [B, H, N, N] scores of the CPU reference


@torch.no_grad()
def embed_cells(model, tokens, cells: np.ndarray, device: torch.device) -> np.ndarray:
    """Mean-pooled embeddings, float32 ``[len(cells), d_model]``, in the order of ``cells``."""
    out = []
    for first in range(0, cells.size, EMBED_BATCH_CELLS):
        ids, cu, max_seqlen = pack(tokens, cells[first : first + EMBED_BATCH_CELLS])
        cu_t = torch.from_numpy(cu).to(device)
        hidden = model(torch.from_numpy(ids).to(device), cu_t, max_seqlen)
        out.append(pool(hidden, cu_t).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def embed(
    dataset: str,
    tokens_path: str | os.PathLike,
    model_path: str | os.PathLike,
    device: str,
    output: str | os.PathLike,
) -> None:
    """Write ``output`` (npz): ``X_emb``, ``obs_names``, ``method``, ``seed``, ``val_loss``, ``split``."""
    set_threads()
    dev = resolve_device(device)
    tokens = load_tokens(tokens_path, dataset)
    model, record = load_model(model_path, dev)
    saved = record["tokens"]
    if saved["sha256"] != tokens.metadata()["sha256"]:
        raise DataError(
            f"{dataset}: {model_path} was trained on other tokens than {tokens_path} "
            "(their contents differ); retrain or pass the tokens it was trained on"
        )
    test_cells, val_cells = tokens.cells("test"), tokens.cells("val")
    if test_cells.size == 0:
        raise DataError(f"{dataset}: {tokens_path} has no test cells to embed")
    x_emb = embed_cells(model, tokens, test_cells, dev)
    # validation batches as training packed them (a model.pt from before token budgets: the
    # tokens of EMBED_BATCH_CELLS cells of max_len)
    batch_tokens = record["train_config"].get("batch_tokens", EMBED_BATCH_CELLS * tokens.max_len)
    val_loss = validation_loss(
        model, tokens, val_cells, record["train_config"]["mask_prob"], batch_tokens, dev
    )
    write_npz(
        output,
        X_emb=x_emb,
        obs_names=tokens.obs_names[test_cells].astype(str),
        method=np.array(record["attention"]),
        seed=np.array(record["seed"], dtype=np.int64),
        val_loss=np.array(val_loss, dtype=np.float64),
        split=np.array("test"),
    )


def _run(args: argparse.Namespace) -> None:
    embed(args.dataset, args.tokens, args.model, args.device, args.output)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="mean-pooled embeddings of the test cells from a trained model.pt",
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--tokens", required=True, help="the tokens.npz the model was trained on")
    p.add_argument("--model", required=True, help="model.pt from `sigmoid-sc train`")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument(
        "--output", required=True, help="results/<dataset>/embed/<attention>_seed<S>.npz"
    )
    p.set_defaults(func=_run)
