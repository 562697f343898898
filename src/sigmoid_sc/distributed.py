"""Data-parallel training (DDP under ``torchrun``): ranks, sharding, a common stop, the wrapper.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the global batch of step ``t`` and its masks are the
same function of ``(seed, t)`` as in one process; rank ``r`` takes a contiguous slice of its
cells (:func:`shard_batch`, about ``1/world`` of its tokens) and weights its loss by its share
of the global batch's masked tokens, so the averaged gradient is the gradient of the mean over
all masked tokens (see :func:`sigmoid_sc.train.train`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .model import Encoder
from .tokens import Batch, packed_gene_loss


@dataclass
class Dist:
    """This process's place in a torchrun job (world 1: a plain single-process run)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def dist_from_env() -> Dist:
    """WORLD_SIZE/RANK/LOCAL_RANK as torchrun sets them; absent: one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers: {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return Dist(rank=rank, local_rank=local_rank, world=world)


def init_distributed(dist: Dist, dev: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on the CPU); returns this rank's device."""
    if dist.world == 1:
        return dev
    if dev.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={dist.local_rank} but only {torch.cuda.device_count()} GPUs are "
                "visible; start torchrun with --nproc_per_node <= the GPUs of the node"
            )
        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, **kwargs)
    return dev


def shard_bounds(cu_seqlens: np.ndarray, world: int) -> np.ndarray:
    """Cell boundaries ``[world + 1]`` of each rank's contiguous slice of a packed batch.

    Balanced by tokens (rank ``r`` starts at the cell boundary nearest ``r * T / world``), every
    rank at least one cell. A function of the batch alone, so every rank computes the same.
    """
    n_cells = cu_seqlens.size - 1
    if n_cells < world:
        raise ConfigError(f"a batch of {n_cells} cells cannot be split over {world} processes")
    total = int(cu_seqlens[-1])
    bounds = [0]
    for r in range(1, world):
        k = int(np.abs(cu_seqlens.astype(np.int64) - total * r / world).argmin())
        bounds.append(min(max(k, bounds[-1] + 1), n_cells - (world - r)))
    bounds.append(n_cells)
    return np.array(bounds)


def shard_batch(
    ids: np.ndarray, cu_seqlens: np.ndarray, masked: np.ndarray, rank: int, world: int
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Rank ``rank``'s slice of a packed global batch: ids, cu_seqlens, max len, masked."""
    bounds = shard_bounds(cu_seqlens, world)
    first, last = bounds[rank], bounds[rank + 1]
    start, end = int(cu_seqlens[first]), int(cu_seqlens[last])
    cu = (cu_seqlens[first : last + 1] - cu_seqlens[first]).astype(np.int32)
    return ids[start:end], cu, int(np.diff(cu).max()), masked[start:end]


class StopVote:
    """Whether any rank has been signalled, with the same answer on every rank.

    One process: the local flag. Under DDP each call starts an all-reduce (MAX, on a gloo CPU
    group, so no GPU sync) of the local flag and returns the result of the previous call's: the
    ranks stop together at the same step, one step after the first of them got the signal.
    """

    def __init__(self, dist: Dist, flag: list):
        self.flag, self.world = flag, dist.world
        self.work = self.value = None
        if self.world > 1:
            backend = torch.distributed.get_backend()
            self.group = None if backend == "gloo" else torch.distributed.new_group(backend="gloo")

    def __call__(self) -> bool:
        if self.world == 1:
            return bool(self.flag)
        stop = False
        if self.work is not None:
            self.work.wait()
            stop = bool(self.value.item())
        self.value = torch.tensor([1 if self.flag else 0], dtype=torch.int32)
        self.work = torch.distributed.all_reduce(
            self.value, op=torch.distributed.ReduceOp.MAX, group=self.group, async_op=True
        )
        return stop

    def close(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class MaskedGeneLoss(torch.nn.Module):
    """The encoder and its masked-gene loss as one module, so DDP (and ``torch.compile``) sees
    the whole forward (the tied head reads ``tok_emb`` outside ``Encoder.forward``).

    ``forward(input_ids, cu_seqlens, max_seqlen, positions, targets, reduction)``: the fields of
    a :class:`sigmoid_sc.tokens.Batch` on the device, as plain arguments (what DDP passes on).
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, cu_seqlens, max_seqlen, positions, targets, reduction="mean"):
        batch = Batch(input_ids, cu_seqlens, max_seqlen, positions, targets)
        return packed_gene_loss(self.encoder, batch, reduction)


def wrap_ddp(model: Encoder, dev: torch.device, **options) -> torch.nn.Module:
    """DDP over the encoder and its loss:
    ``ddp(ids, cu_seqlens, max_seqlen, positions, targets, "sum")``; ``options`` go to
    ``DistributedDataParallel`` (bench/ddp_scaling.py compares some)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        MaskedGeneLoss(model), device_ids=[dev.index] if dev.type == "cuda" else None, **options
    )
