"""The token data of a training run and the masked-gene objective.

``tokens.npz`` (written by ``sigmoid-sc tokenize``, see docs/ARCHITECTURE.md) is read into
:class:`Tokens`; :func:`pack` concatenates cells into a packed batch (``input_ids``,
``cu_seqlens``, as FlashAttention's varlen API). Everything random is a function of a seed:
:func:`batch_cells` gives the cells of step ``t`` from a permutation seeded by ``(seed, epoch)``,
:func:`choose_masked` the masked positions from the generator it is given.

Validation loss uses one fixed masking of the validation cells (seeded by ``VAL_MASK_SEED``,
not by the run's seed), so it is comparable across attention kinds and seeds; ``embed``
recomputes it with the same function.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .model import Encoder

VAL_MASK_SEED = 20260429  # the validation cells' masking, shared by every run


@dataclass
class Tokens:
    input_ids: np.ndarray  # int64 [total tokens], gene ids, highest rank first per cell
    offsets: np.ndarray  # int64 [n_cells + 1]
    split: np.ndarray  # str [n_cells]: train | val | test
    obs_names: np.ndarray  # str [n_cells]
    vocab_size: int
    max_len: int
    pad_id: int
    mask_id: int
    cls_id: int

    def cells(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def metadata(self) -> dict:
        digest = hashlib.sha256()
        for array in (self.input_ids, self.offsets, self.split.astype(str)):
            digest.update(np.ascontiguousarray(array).tobytes())
        return {
            "n_cells": int(self.offsets.size - 1),
            "n_tokens": int(self.input_ids.size),
            "vocab_size": self.vocab_size,
            "max_len": self.max_len,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
            "cls_id": self.cls_id,
            "sha256": digest.hexdigest(),
        }


def load_tokens(path: str | os.PathLike, dataset: str) -> Tokens:
    """Read and check ``tokens.npz`` (see docs/ARCHITECTURE.md); DataError names the problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{dataset}: tokens file {path} does not exist")
    with np.load(path, allow_pickle=False) as npz:
        missing = {"input_ids", "offsets", "split", "vocab_size", "max_len", "mask_id"} - set(
            npz.files
        )
        if missing:
            raise DataError(f"{dataset}: {path} lacks {sorted(missing)}")
        n_cells = npz["offsets"].size - 1
        tokens = Tokens(
            input_ids=npz["input_ids"].astype(np.int64),
            offsets=npz["offsets"].astype(np.int64),
            split=npz["split"].astype(str),
            obs_names=(
                npz["obs_names"].astype(str)
                if "obs_names" in npz.files
                else np.array([str(i) for i in range(n_cells)])
            ),
            vocab_size=int(npz["vocab_size"]),
            max_len=int(npz["max_len"]),
            pad_id=int(npz["pad_id"]) if "pad_id" in npz.files else 0,
            mask_id=int(npz["mask_id"]),
            cls_id=int(npz["cls_id"]) if "cls_id" in npz.files else 2,
        )
    lengths = np.diff(tokens.offsets)
    if tokens.offsets[0] != 0 or tokens.offsets[-1] != tokens.input_ids.size:
        raise DataError(f"{dataset}: {path}: offsets do not span input_ids")
    if (lengths < 1).any():
        raise DataError(f"{dataset}: {path}: {int((lengths < 1).sum())} cells have no tokens")
    if lengths.max() > tokens.max_len:
        raise DataError(f"{dataset}: {path}: a cell has {lengths.max()} > max_len tokens")
    if tokens.input_ids.min() < 0 or tokens.input_ids.max() >= tokens.vocab_size:
        raise DataError(f"{dataset}: {path}: token ids outside [0, vocab_size)")
    if tokens.split.size != n_cells or tokens.obs_names.size != n_cells:
        raise DataError(f"{dataset}: {path}: split/obs_names do not have one entry per cell")
    return tokens


def pack(tokens: Tokens, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The cells' tokens concatenated: ``input_ids [T]``, ``cu_seqlens`` int32 ``[B+1]``, max len."""
    starts, ends = tokens.offsets[cells], tokens.offsets[cells + 1]
    lengths = ends - starts
    ids = np.concatenate([tokens.input_ids[s:e] for s, e in zip(starts, ends)])
    cu_seqlens = np.zeros(len(cells) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    return ids, cu_seqlens, int(lengths.max())


def batch_cells(train_cells: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The training cells of step ``step``: a function of ``(seed, step)`` only.

    Each epoch is a permutation of ``train_cells`` seeded by ``(seed, epoch)``, cut into
    ``len // batch_size`` full batches (the remainder waits for a later epoch's shuffle).
    """
    batch_size = min(batch_size, train_cells.size)
    per_epoch = train_cells.size // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 0, epoch]).permutation(train_cells.size)
    return train_cells[order[index * batch_size : (index + 1) * batch_size]]


def choose_masked(cu_seqlens: np.ndarray, mask_prob: float, rng: np.random.Generator) -> np.ndarray:
    """Bool ``[T]``: each token masked with ``mask_prob``, and at least one per cell."""
    u = rng.random(int(cu_seqlens[-1]))
    masked = u < mask_prob
    cell_min = np.minimum.reduceat(u, cu_seqlens[:-1])  # every cell has >= 1 token
    masked |= u == np.repeat(cell_min, np.diff(cu_seqlens))
    return masked


def masked_gene_loss(
    model: Encoder,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    masked: torch.Tensor,
    mask_id: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the original gene at masked positions (mean or sum over them)."""
    corrupted = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    hidden = model(corrupted, cu_seqlens, max_seqlen)
    logits = model.gene_logits(hidden[masked])  # the head only where there is a target
    return F.cross_entropy(logits.float(), input_ids[masked], reduction=reduction)


@torch.no_grad()
def validation_loss(
    model: Encoder,
    tokens: Tokens,
    cells: np.ndarray,
    mask_prob: float,
    batch_size: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
    dist=None,
) -> float:
    """Mean masked-gene cross-entropy (nats per masked token) over ``cells``.

    The masking is drawn once over all the cells packed in order from ``VAL_MASK_SEED``, so it
    does not depend on the run's seed or on ``batch_size``. Under DDP (``dist``, a
    :class:`sigmoid_sc.distributed.Dist` with ``world`` > 1)
    rank ``r`` computes chunks ``r, r + world, ...``; the chunk sums are all-reduced (each is
    added to zeros, exactly) and summed in chunk order, so every rank returns exactly what one
    process would with the same weights.
    """
    world = 1 if dist is None else dist.world
    chunk_sums = {}
    was_training = model.training
    model.eval()
    _, cu_all, _ = pack(tokens, cells)
    masked_all = choose_masked(cu_all, mask_prob, np.random.default_rng([VAL_MASK_SEED]))
    total, count = 0.0, 0
    for index, first in enumerate(range(0, cells.size, batch_size)):
        if world > 1 and index % world != dist.rank:
            end = cu_all[min(first + batch_size, cells.size)]
            count += int(masked_all[cu_all[first] : end].sum())
            continue
        chunk = cells[first : first + batch_size]
        ids, cu, max_seqlen = pack(tokens, chunk)
        masked = masked_all[cu_all[first] : cu_all[first] + ids.size]
        with autocast():
            loss_sum = masked_gene_loss(
                model,
                torch.from_numpy(ids).to(device),
                torch.from_numpy(cu).to(device),
                max_seqlen,
                torch.from_numpy(masked).to(device),
                tokens.mask_id,
                reduction="sum",
            )
        if world > 1:
            chunk_sums[index] = float(loss_sum)
        else:
            total += float(loss_sum)
        count += int(masked.sum())
    if world > 1:
        sums = torch.zeros(-(-cells.size // batch_size), dtype=torch.float64, device=device)
        for index, value in chunk_sums.items():
            sums[index] = value
        torch.distributed.all_reduce(sums)
        for value in sums.tolist():
            total += value
    model.train(was_training)
    return total / count
