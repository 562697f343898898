"""``sigmoid-sc train``: masked-gene pre-training of the encoder on one dataset's tokens.

Read top to bottom: config, data, model, optimiser, resume, the loop (batch, mask, step,
evaluate, checkpoint), final model. Everything random is a function of ``(seed, step)``:
the cells of step ``t`` come from a permutation of the training cells seeded by
``(seed, epoch)``, the masked positions from a generator seeded by ``(seed, t)``. So the
softmax and sigmoid models see the same batches and the same masks, and a run resumed from
``checkpoint.pt`` sees exactly what an uninterrupted run would have seen.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel (DDP): the global batch of
step ``t`` and its masks are the same function of ``(seed, t)`` as in one process; rank ``r``
takes a contiguous slice of its cells (about ``1/world`` of its tokens) and weights its loss by
its share of the global batch's masked tokens, so the averaged gradient is the gradient of the
mean over all masked tokens: 1 and N processes give the same run up to float rounding (with
``dropout`` > 0 each rank draws its own dropout masks from ``(seed, step, rank)``, so the runs
then agree in distribution, not number by number). Rank 0
alone writes checkpoints, ``history.csv`` and ``model.pt``; every rank resumes from the
checkpoint.

Validation loss uses one fixed masking of the validation cells (seeded by ``VAL_MASK_SEED``,
not by the run's seed), so it is comparable across attention kinds and seeds; ``embed``
recomputes it with the same function.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError
from .io import atomic_path, write_csv
from .model import Encoder, ModelConfig

VAL_MASK_SEED = 20260429  # the validation cells' masking, shared by every run
HISTORY_COLUMNS = ["step", "split", "loss", "lr", "tokens", "elapsed_s"]
MIN_LR_RATIO = 0.1  # cosine decay ends at 10% of the peak learning rate


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32  # cells per step
    lr: float = 1.0e-3  # peak learning rate, reached after warm-up
    weight_decay: float = 0.01  # on matrices and embeddings, not on biases and norms
    warmup_steps: int = 30
    mask_prob: float = 0.15  # each token's chance to be masked (at least one per cell)
    eval_every: int = 50
    checkpoint_every: int = 100
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, CUDA only)


MODEL_SECTION_KEYS = ("n_layers", "d_model", "n_heads", "d_ff", "dropout", "cls_token")


# ----------------------------------------------------------------------------------------
# config


def _section(cls, params: dict, section: str, keys: tuple[str, ...]) -> dict:
    """Check one config section's keys and value types; returns the values given."""
    if not isinstance(params, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {params!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in params.items():
        if key not in keys:
            raise ConfigError(f"unknown key {section}.{key}; expected some of: {', '.join(keys)}")
        kind = type(defaults[key])
        accepted = (int, float) if kind is float else (kind,)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accepted):
            raise ConfigError(f"{section}.{key} must be {kind.__name__}, got {value!r}")
    return dict(params)


def parse_train_config(params: dict) -> TrainConfig:
    keys = tuple(f.name for f in dataclasses.fields(TrainConfig))
    cfg = TrainConfig(**_section(TrainConfig, params, "train", keys))
    for key in ("steps", "batch_size", "eval_every", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.warmup_steps < 0 or cfg.lr <= 0 or cfg.weight_decay < 0:
        raise ConfigError("train.warmup_steps, train.weight_decay must be >= 0 and train.lr > 0")
    if not 0.0 < cfg.mask_prob < 1.0:
        raise ConfigError(f"train.mask_prob must be in (0, 1), got {cfg.mask_prob}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be 'fp32' or 'bf16', got {cfg.precision!r}")
    return cfg


def parse_model_config(params: dict, attention: str, vocab_size: int, max_len: int) -> ModelConfig:
    values = _section(ModelConfig, params, "model", MODEL_SECTION_KEYS)
    for key in ("n_layers", "d_model", "n_heads", "d_ff"):
        if values.get(key, 1) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {values[key]}")
    if not 0.0 <= values.get("dropout", 0.0) < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {values['dropout']}")
    try:
        return ModelConfig(**values, vocab_size=vocab_size, max_len=max_len, attention=attention)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from exc


def resolve_device(name: str) -> torch.device:
    """``cpu`` | ``cuda`` | ``auto`` (CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available; use cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu, cuda or auto, not {name!r}")
    return torch.device(name)


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
    """The encoder and its masked-gene loss as one module, so DDP sees the whole forward
    (the tied head reads ``tok_emb`` outside ``Encoder.forward``)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, cu_seqlens, max_seqlen, masked, mask_id, reduction="mean"):
        return masked_gene_loss(
            self.encoder, input_ids, cu_seqlens, max_seqlen, masked, mask_id, reduction
        )


def wrap_ddp(model: Encoder, dev: torch.device, **options) -> torch.nn.Module:
    """DDP over the encoder and its loss: ``ddp(ids, cu, max_seqlen, masked, mask_id, "sum")``;
    ``options`` go to ``DistributedDataParallel`` (bench/ddp_scaling.py compares some)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        MaskedGeneLoss(model), device_ids=[dev.index] if dev.type == "cuda" else None, **options
    )


def set_threads() -> None:
    """Use the job's thread count (Snakemake sets OMP_NUM_THREADS to the rule's threads)."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


# ----------------------------------------------------------------------------------------
# data: tokens.npz, deterministic batches and masks


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
    dist: Dist | None = None,
) -> float:
    """Mean masked-gene cross-entropy (nats per masked token) over ``cells``.

    The masking is drawn once over all the cells packed in order from ``VAL_MASK_SEED``, so it
    does not depend on the run's seed or on ``batch_size``. Under DDP (``dist.world`` > 1)
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


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up, cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------
# checkpoints


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------------------
# the training run


def train(
    dataset: str,
    tokens_path: str | os.PathLike,
    attention: str,
    seed: int,
    model_params: dict,
    train_params: dict,
    device: str,
    out_dir: str | os.PathLike,
    on_step=None,
) -> Path:
    """Train one model; writes ``model.pt`` and ``history.csv`` in ``out_dir`` and returns it.

    ``on_step(step)``, if given, is called after each completed optimiser step (tests use it to
    interrupt a run).
    """
    cfg = parse_train_config(train_params)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{dataset}: seed must be an integer >= 0, got {seed!r}")
    tokens = load_tokens(tokens_path, dataset)
    model_cfg = parse_model_config(model_params, attention, tokens.vocab_size, tokens.max_len)
    dev = resolve_device(device)
    dist = dist_from_env()
    if dist.world > 1 and min(cfg.batch_size, tokens.cells("train").size) < dist.world:
        raise ConfigError(
            f"{dataset}: train.batch_size {cfg.batch_size} (cells per step, all processes "
            f"together) is smaller than the {dist.world} processes"
        )
    dev = init_distributed(dist, dev)
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    set_threads()
    use_bf16 = cfg.precision == "bf16" and dev.type == "cuda"
    if cfg.precision == "bf16" and not use_bf16:
        print(f"train {dataset}: precision bf16 needs CUDA; running fp32 on cpu", file=sys.stderr)

    def autocast():
        if use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    train_cells, val_cells = tokens.cells("train"), tokens.cells("val")
    if train_cells.size == 0 or val_cells.size == 0:
        raise DataError(
            f"{dataset}: {tokens_path} has {train_cells.size} train and {val_cells.size} val "
            "cells; training needs both (check prepare.val_fraction and the dataset's size)"
        )

    # model: the same seed gives the same initial weights for both attention kinds
    torch.manual_seed(seed)
    # (numpy: every draw goes through a Generator seeded from (seed, ...); no global state)
    model = Encoder(model_cfg).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    # resume: the checkpoint must come from this very run (same data, config, kind and seed);
    # checkpoint_every alone may change (it changes no result)
    run_key = {
        "dataset": dataset,
        "attention": attention,
        "seed": seed,
        "model": dataclasses.asdict(model_cfg),
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_every"},
        "tokens": tokens.metadata(),
    }
    start_step, history, elapsed_before, tokens_seen = 0, [], 0.0, 0
    if checkpoint_path.exists():
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a checkpoint is always written atomically; this is not ours
            raise ConfigError(f"{dataset}: cannot read {checkpoint_path}: {exc}") from exc
        diffs = _differences(state["run_key"], run_key)
        if diffs:
            raise ConfigError(
                f"{dataset}: {checkpoint_path} belongs to a different run ({'; '.join(diffs)}); "
                "delete it to start afresh or restore the config it was written with"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if dev.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start_step, history = state["step"], state["history"]
        elapsed_before, tokens_seen = state["elapsed_s"], state["tokens"]
        if dist.main:
            print(
                f"train {dataset}: resuming from {checkpoint_path} at step {start_step}",
                file=sys.stderr,
            )
    # DDP after the resume (its constructor broadcasts rank 0's weights; every rank loaded the
    # same checkpoint anyway). Its forward is the encoder plus the loss (MaskedGeneLoss).
    ddp = None
    if dist.world > 1:
        ddp = wrap_ddp(model, dev)

    # SIGTERM (SLURM preemption, scancel) and SIGINT: finish the step, checkpoint, exit non-zero
    stop_signal = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            handlers[signum] = signal.signal(signum, lambda s, _frame: stop_signal.append(s))

    from tqdm import tqdm

    t0 = time.perf_counter()
    pending = []  # train rows whose loss is still a device tensor (read in bulk: fewer syncs)
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        file=sys.stderr,
        disable=None if dist.main else True,
        desc=f"{dataset} {attention} seed {seed}",
        unit="step",
    )

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def flush() -> None:
        # under DDP every rank calls this at the same steps: the all-reduce sums the ranks'
        # shares of each step's loss (each rank's share is its masked tokens' sum / all of them)
        if pending:
            losses = torch.stack([row["loss"] for row in pending])
            if dist.world > 1:
                torch.distributed.all_reduce(losses)
            losses = losses.tolist()
            for row, loss in zip(pending, losses):
                history.append({**row, "loss": loss})
            pending.clear()

    def checkpoint(step: int) -> None:
        flush()
        if not dist.main:  # rank 0 writes; the others wait until the file is complete
            dist.barrier()
            return
        save_checkpoint(
            checkpoint_path,
            {
                "run_key": run_key,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if dev.type == "cuda" else None,
                "history": history,
                "elapsed_s": elapsed(),
                "tokens": tokens_seen,
            },
        )
        dist.barrier()

    def evaluate(step: int) -> None:
        flush()
        val = validation_loss(
            model, tokens, val_cells, cfg.mask_prob, cfg.batch_size, dev, autocast, dist=dist
        )
        lr = optimizer.param_groups[0]["lr"] if step == 0 else history[-1]["lr"]
        history.append(
            {
                "step": step,
                "split": "val",
                "loss": val,
                "lr": lr,
                "tokens": tokens_seen,
                "elapsed_s": elapsed(),
            }
        )
        train_loss = f" train {history[-2]['loss']:.4f}" if step else ""
        if dist.main:
            bar.write(
                f"{dataset} {attention} seed {seed}: step {step}/{cfg.steps}{train_loss} "
                f"val {val:.4f} lr {lr:.2e} {elapsed():.1f}s",
                file=sys.stderr,
            )

    done, stopped = start_step, False
    vote = StopVote(dist, stop_signal)
    try:
        if start_step == 0:
            evaluate(0)  # the untrained model's loss starts every curve
        model.train()
        for step in range(start_step, cfg.steps):
            if vote():
                stopped = True
                break
            # the batch and its masks: functions of (seed, step) only
            cells = batch_cells(train_cells, cfg.batch_size, seed, step)
            ids, cu, max_seqlen = pack(tokens, cells)
            masked = choose_masked(cu, cfg.mask_prob, np.random.default_rng([seed, 1, step]))
            n_tokens = int(ids.size)  # of the global batch
            if ddp is not None:  # this rank's slice; its loss weighted by its masked tokens
                n_masked = int(masked.sum())
                # dropout: a stream per (seed, step, rank), so ranks differ and a resumed run
                # draws what an uninterrupted one would (one process keeps its saved RNG state)
                torch.manual_seed(
                    int(np.random.SeedSequence([seed, 2, step, dist.rank]).generate_state(1)[0])
                )
                ids, cu, max_seqlen, masked = shard_batch(ids, cu, masked, dist.rank, dist.world)
            ids_t = torch.from_numpy(ids).to(dev, non_blocking=True)
            cu_t = torch.from_numpy(cu).to(dev, non_blocking=True)
            masked_t = torch.from_numpy(masked).to(dev, non_blocking=True)

            if ddp is None:
                with autocast():
                    loss = masked_gene_loss(
                        model, ids_t, cu_t, max_seqlen, masked_t, tokens.mask_id
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            else:
                with autocast():
                    loss_sum = ddp(ids_t, cu_t, max_seqlen, masked_t, tokens.mask_id, "sum")
                # DDP averages gradients over ranks: x world makes it the sum of the ranks'
                # sums over the global masked-token count, the mean of one process
                optimizer.zero_grad(set_to_none=True)
                (loss_sum * (dist.world / n_masked)).backward()
                loss = loss_sum / n_masked  # this rank's share (flush sums the shares)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()

            done = step + 1
            tokens_seen += n_tokens
            pending.append(
                {
                    "step": done,
                    "split": "train",
                    "loss": loss.detach(),
                    "lr": lr,
                    "tokens": tokens_seen,
                    "elapsed_s": elapsed(),
                }
            )
            bar.update(1)
            if done % cfg.eval_every == 0 or done == cfg.steps:
                evaluate(done)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoint(done)
            if on_step is not None:
                on_step(done)
        vote.close()
        if stopped and done < cfg.steps:
            checkpoint(done)
            bar.close()
            signum = stop_signal[0] if stop_signal else int(signal.SIGTERM)  # another rank's
            if dist.main:
                print(
                    f"train {dataset}: stopped by signal {signum} after step {done}; "
                    f"{checkpoint_path} saved, rerun to resume",
                    file=sys.stderr,
                )
            if dist.world > 1:
                torch.distributed.destroy_process_group()
            raise SystemExit(128 + signum)
    finally:
        bar.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    # final outputs: history, then model.pt; only then is the checkpoint redundant (rank 0
    # writes them; the others wait so that no process exits before the files exist)
    flush()
    if not dist.main:
        dist.barrier()
        torch.distributed.destroy_process_group()
        return out_dir
    import pandas as pd

    write_csv(out_dir / "history.csv", pd.DataFrame(history, columns=HISTORY_COLUMNS))
    val_loss = [r["loss"] for r in history if r["split"] == "val"][-1]
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save(
            {
                "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "model_config": dataclasses.asdict(model_cfg),
                "train_config": dataclasses.asdict(cfg),
                "tokens": tokens.metadata(),
                "dataset": dataset,
                "attention": attention,
                "seed": seed,
                "steps": cfg.steps,
                "val_loss": val_loss,
            },
            tmp,
        )
    checkpoint_path.unlink(missing_ok=True)
    if dist.world > 1:
        dist.barrier()
        torch.distributed.destroy_process_group()
    return out_dir


def load_model(path: str | os.PathLike, device: torch.device) -> tuple[Encoder, dict]:
    """``model.pt`` -> (encoder in eval mode on ``device``, the saved record)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"model file {path} does not exist")
    record = torch.load(path, map_location="cpu", weights_only=True)
    model = Encoder(ModelConfig(**record["model_config"]))
    model.load_state_dict(record["model"])
    return model.to(device).eval(), record


# ----------------------------------------------------------------------------------------
# CLI


def _json(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from exc
    return {} if value is None else value


def _run(args: argparse.Namespace) -> None:
    train(
        dataset=args.dataset,
        tokens_path=args.tokens,
        attention=args.attention,
        seed=args.seed,
        model_params=_json(args.model_json, "--model-json"),
        train_params=_json(args.train_json, "--train-json"),
        device=args.device,
        out_dir=args.out_dir,
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="masked-gene pre-training of one encoder (softmax or sigmoid attention)",
        description="Train one encoder; writes model.pt and history.csv in --out-dir and "
        "resumes from checkpoint.pt there if present.",
    )
    p.add_argument("--dataset", required=True, help="dataset name (for messages and metadata)")
    p.add_argument("--tokens", required=True, help="tokens.npz from `sigmoid-sc tokenize`")
    p.add_argument("--attention", required=True, choices=("softmax", "sigmoid"))
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--model-json", default="{}", help="the config's model section as JSON")
    p.add_argument("--train-json", default="{}", help="the config's train section as JSON")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--out-dir", required=True, help="results/<dataset>/train/<attention>_seed<S>")
    p.set_defaults(func=_run)
