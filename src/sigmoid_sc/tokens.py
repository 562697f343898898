"""The token data of a training run, its batches and the masked-gene objective.

``tokens.npz`` (written by ``sigmoid-sc tokenize``, see docs/ARCHITECTURE.md) is read into
:class:`Tokens`; :func:`pack` concatenates cells into a packed batch (``input_ids``,
``cu_seqlens``, as FlashAttention's varlen API). Batches hold a budget of tokens, not a number of
cells: :class:`TokenBatches` gives the cells of step ``t``, a function of ``(seed, t)``;
:func:`choose_masked` draws the masked positions from the generator it is given.

A :class:`Batch` is built on the host (numpy): the corrupted ids, the masked positions as
indices and their target genes, so a training step never asks the GPU a question (no boolean
indexing on the device, whose result size the host must wait for); :meth:`Batch.to` sends it
in one copy from pinned memory.

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

from .errors import ConfigError, DataError
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
    vocab_id: str = ""  # the corpus vocabulary's digest (pretraining protocol), else empty

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
            **({"vocab_id": self.vocab_id} if self.vocab_id else {}),
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
            vocab_id=str(npz["vocab_id"]) if "vocab_id" in npz.files else "",
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


def check_budget(lengths: np.ndarray, batch_tokens: int, what: str) -> None:
    """ConfigError unless every cell fits ``batch_tokens`` (``what`` names the cells)."""
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ConfigError(f"train.batch_tokens must be an integer >= 1, got {batch_tokens!r}")
    too_long = lengths > batch_tokens
    if too_long.any():
        raise ConfigError(
            f"train.batch_tokens is {batch_tokens} but {int(too_long.sum())} of the "
            f"{lengths.size} {what} have more tokens (the longest {int(lengths.max())}); "
            f"raise train.batch_tokens to at least {int(lengths.max())} or lower tokenize.max_len"
        )


class TokenBatches:
    """The training cells of every step, packed up to ``batch_tokens``: a function of ``(seed, step)``.

    The cells form a stream, the permutations of ``train_cells`` seeded by ``(seed, epoch)`` for
    epoch 0, 1, 2, ... one after the other; step ``t`` takes the next stretch of the stream, cell
    by cell, until the next cell would exceed the budget. So every cell is trained on once per
    epoch, and no step is a short remainder: a batch at an epoch's end continues into the next
    epoch's permutation (it may then hold one cell twice, each copy with its own masks).

    Where step ``t`` starts depends on the lengths of the batches before it, so the starts are
    computed from step 0 on and kept (a binary search per step; a resumed run at step 20,000
    spends milliseconds on them).
    """

    def __init__(self, train_cells: np.ndarray, lengths: np.ndarray, batch_tokens: int, seed: int):
        check_budget(lengths, batch_tokens, "training cells")
        self.cells_ = np.asarray(train_cells)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.epoch_tokens = int(self.lengths.sum())
        if batch_tokens > self.epoch_tokens:
            raise ConfigError(
                f"train.batch_tokens is {batch_tokens} but all {self.cells_.size} training cells "
                f"hold {self.epoch_tokens} tokens: a step would see cells twice; lower it"
            )
        self.batch_tokens, self.seed = batch_tokens, seed
        self.n = self.cells_.size
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._starts = [0]  # stream position of each step's first cell

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, cumulative tokens [n + 1]) of one epoch's permutation."""
        if epoch not in self._epochs:
            if len(self._epochs) > 4:  # the stream moves forward: old epochs are done with
                del self._epochs[min(self._epochs)]
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.n)
            cum = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum(self.lengths[order], out=cum[1:])
            self._epochs[epoch] = (order, cum)
        return self._epochs[epoch]

    def _tokens_before(self, position: int) -> int:
        epoch, index = divmod(position, self.n)
        return epoch * self.epoch_tokens + int(self._epoch(epoch)[1][index])

    def _next_start(self, position: int) -> int:
        """The stream position after a batch that starts at ``position``."""
        limit = self._tokens_before(position) + self.batch_tokens
        epoch = limit // self.epoch_tokens  # the epoch where the budget runs out
        cum = self._epoch(epoch)[1]
        index = int(np.searchsorted(cum, limit - epoch * self.epoch_tokens, side="right")) - 1
        return epoch * self.n + min(index, self.n)

    def bounds(self, step: int) -> tuple[int, int]:
        """Stream positions ``[first, last)`` of step ``step``'s cells."""
        while len(self._starts) <= step + 1:
            self._starts.append(self._next_start(self._starts[-1]))
        return self._starts[step], self._starts[step + 1]

    def __call__(self, step: int) -> np.ndarray:
        """The cells (indices into the token data) of step ``step``, in stream order."""
        first, last = self.bounds(step)
        positions = np.arange(first, last)
        epochs, index = np.divmod(positions, self.n)
        order = np.concatenate(
            [self._epoch(int(e))[0][index[epochs == e]] for e in np.unique(epochs)]
        )
        return self.cells_[order]


def token_chunks(lengths: np.ndarray, batch_tokens: int) -> np.ndarray:
    """Boundaries ``[k + 1]`` of consecutive cells packed in order up to ``batch_tokens`` each
    (the validation batches: cells in their order, the last chunk what remains)."""
    cum = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    bounds = [0]
    while bounds[-1] < lengths.size:
        end = int(np.searchsorted(cum, cum[bounds[-1]] + batch_tokens, side="right")) - 1
        bounds.append(max(end, bounds[-1] + 1))
    return np.array(bounds, dtype=np.int64)


def choose_masked(cu_seqlens: np.ndarray, mask_prob: float, rng: np.random.Generator) -> np.ndarray:
    """Bool ``[T]``: each token masked with ``mask_prob``, and at least one per cell."""
    u = rng.random(int(cu_seqlens[-1]))
    masked = u < mask_prob
    cell_min = np.minimum.reduceat(u, cu_seqlens[:-1])  # every cell has >= 1 token
    masked |= u == np.repeat(cell_min, np.diff(cu_seqlens))
    return masked


@dataclass
class Batch:
    """A packed batch with its masks, as the loss takes it (numpy arrays, or tensors after
    :meth:`to`): ``input_ids`` int64 ``[T]`` with masked tokens replaced by the mask id,
    ``cu_seqlens`` int32 ``[B + 1]``, ``max_seqlen``, ``positions`` int64 ``[M]`` (the masked
    tokens, ascending) and ``targets`` int64 ``[M]`` (their genes)."""

    input_ids: np.ndarray | torch.Tensor
    cu_seqlens: np.ndarray | torch.Tensor
    max_seqlen: int
    positions: np.ndarray | torch.Tensor
    targets: np.ndarray | torch.Tensor

    @classmethod
    def masked(
        cls, ids: np.ndarray, cu_seqlens: np.ndarray, max_seqlen: int, masked: np.ndarray,
        mask_id: int,
    ) -> Batch:  # fmt: skip
        positions = np.flatnonzero(masked).astype(np.int64)
        corrupted = np.where(masked, np.int64(mask_id), ids.astype(np.int64))
        return cls(
            corrupted, cu_seqlens, int(max_seqlen), positions, ids[positions].astype(np.int64)
        )

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_masked(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device: torch.device) -> Batch:
        """The batch as tensors on ``device``. CUDA: one non-blocking copy from a pinned buffer
        (the host goes on at once; the copy is ordered before the step's kernels on the stream).
        CPU: the numpy arrays' memory, no copy."""
        arrays = (self.input_ids, self.positions, self.targets)
        if device.type != "cuda":
            ids, positions, targets = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
            return Batch(
                ids, torch.from_numpy(self.cu_seqlens), self.max_seqlen, positions, targets
            )
        sizes = [a.shape[0] for a in arrays] + [self.cu_seqlens.shape[0]]
        staging = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=True)
        host = staging.numpy()
        start = 0
        for a, n in zip([*arrays, self.cu_seqlens], sizes):
            host[start : start + n] = a
            start += n
        ids, positions, targets, cu = staging.to(device, non_blocking=True).split(sizes)
        return Batch(ids, cu.to(torch.int32), self.max_seqlen, positions, targets)


def packed_gene_loss(model: Encoder, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the original gene at the masked positions (mean or sum over them); the
    head runs only there. ``batch`` holds tensors (:meth:`Batch.to`)."""
    hidden = model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
    # index_select: its backward is an index_add, no sort of the indices (as indexing has)
    logits = model.gene_logits(hidden.index_select(0, batch.positions))
    return F.cross_entropy(logits.float(), batch.targets, reduction=reduction)


def masked_gene_loss(
    model: Encoder,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    masked: torch.Tensor,
    mask_id: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`packed_gene_loss` of a boolean mask already on the device (for callers outside the
    training loop: turning the mask into positions reads its count, a device sync)."""
    positions = masked.nonzero().squeeze(1)
    corrupted = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    batch = Batch(corrupted, cu_seqlens, max_seqlen, positions, input_ids[positions])
    return packed_gene_loss(model, batch, reduction)


@torch.no_grad()
def validation_loss(
    model: Encoder,
    tokens: Tokens,
    cells: np.ndarray,
    mask_prob: float,
    batch_tokens: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
    dist=None,
) -> float:
    """Mean masked-gene cross-entropy (nats per masked token) over ``cells``.

    The cells are packed in order up to ``batch_tokens`` a batch (:func:`token_chunks`). The
    masking is drawn once over all of them from ``VAL_MASK_SEED``, so it does not depend on the
    run's seed or on the budget. The batches' loss sums add up on the device (float64, in
    batch order) and are read once. Under DDP (``dist``, a :class:`sigmoid_sc.distributed.Dist`
    with ``world`` > 1) rank ``r`` computes chunks ``r, r + world, ...``; the chunk sums are all-reduced (each is added to zeros, exactly) and
    summed in chunk order, so every rank returns exactly what one process would with the same
    weights.
    """
    world = 1 if dist is None else dist.world
    was_training = model.training
    model.eval()
    ids_all, cu_all, _ = pack(tokens, cells)
    lengths = np.diff(cu_all)
    check_budget(lengths, batch_tokens, "validation cells")
    masked_all = choose_masked(cu_all, mask_prob, np.random.default_rng([VAL_MASK_SEED]))
    bounds = token_chunks(lengths, batch_tokens)
    sums = torch.zeros(bounds.size - 1, dtype=torch.float64, device=device)
    for index in range(bounds.size - 1):
        if world > 1 and index % world != dist.rank:
            continue
        first, last = cu_all[bounds[index]], cu_all[bounds[index + 1]]
        cu = (cu_all[bounds[index] : bounds[index + 1] + 1] - first).astype(np.int32)
        batch = Batch.masked(
            ids_all[first:last], cu, int(np.diff(cu).max()), masked_all[first:last], tokens.mask_id
        )
        with autocast():
            sums[index] = packed_gene_loss(model, batch.to(device), reduction="sum")
    if world > 1:
        torch.distributed.all_reduce(sums)
    total = 0.0
    for value in sums.tolist():  # in chunk order, as Python floats: the same on every rank
        total += value
    model.train(was_training)
    return total / int(masked_all.sum())
