"""``sigmoid-sc train``: masked-gene pre-training of the encoder on one dataset's tokens.

Read top to bottom: schedule and stopping rule, the step, then the run: data, model, optimiser,
resume, the loop (batch, step, evaluate, stop?, checkpoint), final model. The settings arrive as
``config.Model`` and ``config.Train`` (:func:`sigmoid_sc.config.section`, validated there against
the schema, ``train.stop`` a nested ``config.Stop``). Everything
random is a function of ``(seed, step)``: the cells of step ``t`` are the ``t``-th stretch of a
stream of per-epoch permutations of the training cells seeded by ``(seed, epoch)``, packed up to
``train.batch_tokens`` (:class:`sigmoid_sc.tokens.TokenBatches`), the masked positions come from
a generator seeded by ``(seed, t)``. So the softmax and sigmoid models see the same batches and
the same masks, and a run resumed from ``checkpoint.pt`` sees exactly what an uninterrupted run
would have seen.

A run ends at ``train.steps`` (the cap) or earlier by its stopping rule (``train.stop``,
:func:`plateau_reached` on the validation curve, evaluated every ``eval_every`` steps). The
validation curve lives in the history, which the checkpoint holds, so a resumed run stops where
an uninterrupted one would. ``model.pt`` records ``steps_trained``, ``stop_reason``
(``plateau`` | ``max_steps``), ``plateau`` (the rule's criterion on the final curve, whatever
stopped the run) and ``final_val_loss``; ``history.csv`` every training and validation row.

The step asks the device nothing: the batch, its corrupted ids and masked positions are built
on the host (numpy) and sent in one non-blocking copy, the next batch is prepared while the
device runs this one, and losses are read in bulk at evaluations and checkpoints.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel (DDP): the global batch of
step ``t`` and its masks are the same function of ``(seed, t)`` as in one process; rank ``r``
takes a contiguous slice of its cells (about ``1/world`` of its tokens) and weights its loss by
its share of the global batch's masked tokens, so the averaged gradient is the gradient of the
mean over all masked tokens: 1 and N processes give the same run up to float rounding (with
``dropout`` > 0 each rank draws its own dropout masks from ``(seed, step, rank)``, so the runs
then agree in distribution, not number by number). Rank 0
alone writes checkpoints, ``history.csv`` and ``model.pt``; every rank resumes from the
checkpoint. The data and the objective are in :mod:`sigmoid_sc.tokens`, the DDP plumbing in
:mod:`sigmoid_sc.distributed`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import config
from .attention import ATTENTION_KINDS
from .config import Model, Stop, Train
from .distributed import (
    MaskedGeneLoss,
    StopVote,
    dist_from_env,
    init_distributed,
    shard_batch,
    wrap_ddp,
)
from .errors import ConfigError, DataError
from .io import atomic_path, write_csv
from .model import Encoder, ModelConfig
from .runtime import parse_json_arg, resolve_device, set_threads
from .tokens import (
    Batch,
    TokenBatches,
    check_budget,
    choose_masked,
    load_tokens,
    pack,
    validation_loss,
)

HISTORY_COLUMNS = ["step", "split", "loss", "lr", "tokens", "elapsed_s"]
MIN_LR_RATIO = 0.1  # the cosine schedule ends at 10% of the peak learning rate
STOP_REASONS = ("plateau", "max_steps")
#: settings that change no result bit on the CPU: a run may resume with other values
RESUMABLE_KEYS = ("checkpoint_every", "compile")


# ----------------------------------------------------------------------------------------
# schedule and stopping rule


def lr_factor(step: int, cfg: Train) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up, then
    ``constant`` (1) or ``cosine`` (to ``MIN_LR_RATIO`` at ``train.steps``).

    ``constant`` is the default because runs end by a stopping rule at a step nobody knows in
    advance. A cosine tied to ``train.steps`` decays on a clock the rule does not share: where the
    rule fires early the learning rate is still high, and where the cap ends the run the loss
    flattens because the learning rate went to zero, not because the model has learned what it
    can; either way "validation loss has plateaued" would mean something else in every run. At
    a constant rate, a plateau is the model's at that rate, both attention kinds get the same
    schedule whichever step they stop at, and resuming needs nothing but the step. A short
    linear cool-down after the plateau (warmup-stable-decay) would lower the final loss a little
    more, but its drop is, by design, an improvement over the last steps: the plateau check that
    ``model.pt`` records would then fail on the very runs it describes, so there is none here.
    ``cosine`` stays for runs with a fixed step budget.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def plateau_reached(
    steps, losses, window: float = 0.2, min_rel_improvement: float = 0.01, min_steps: int = 0
) -> bool:
    """Whether a validation curve (``losses`` at ``steps``, ascending) ends on a plateau.

    With the last point at step ``s``: the window starts at the last evaluation at or before
    ``(1 - window) * s`` (so it spans at least ``window`` of the steps); the curve has plateaued
    when ``s >= min_steps`` and the loss improved over the window by less than
    ``min_rel_improvement`` of its value at the window's start:
    ``loss(start) - loss(s) < min_rel_improvement * loss(start)``. A loss that rises counts as no
    improvement. A curve too short to judge (one point, or no evaluation before the window) has
    not plateaued, nor has one whose loss is not finite.
    """
    steps, losses = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if steps.size < 2 or steps.size != losses.size or steps[-1] < max(min_steps, 1):
        return False
    before = np.flatnonzero(steps <= (1.0 - window) * steps[-1])
    if before.size == 0:
        return False
    start, end = losses[before[-1]], losses[-1]
    if not (np.isfinite(start) and np.isfinite(end)):
        return False
    return bool(start - end < min_rel_improvement * start)


def val_curve(history: list[dict]) -> tuple[list[int], list[float]]:
    rows = [r for r in history if r["split"] == "val"]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def history_plateau(history: list[dict], stop: Stop) -> bool:
    """:func:`plateau_reached` on a run's history with the run's ``train.stop`` settings."""
    steps, losses = val_curve(history)
    return plateau_reached(steps, losses, stop.window, stop.min_rel_improvement, stop.min_steps)


# ----------------------------------------------------------------------------------------
# the step


def build_optimizer(model: Encoder, cfg: Train, dev: torch.device):
    """Fused AdamW (CUDA) with weight decay on matrices and embeddings; its lr schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler


def optimizer_step(
    loss_module, optimizer, scheduler, batch: Batch, autocast, world: int = 1, n_masked: int = 0
) -> torch.Tensor:
    """One training step on ``batch`` (tensors on the device); returns the loss, detached, as a
    device tensor (nothing the host waits for).

    ``loss_module``: :class:`sigmoid_sc.distributed.MaskedGeneLoss` of the encoder, possibly
    compiled, or its DDP wrapper (``world`` > 1). Under DDP the rank's loss is its masked tokens'
    sum over the global batch's ``n_masked``: DDP averages gradients over ranks, so x ``world``
    makes the sum of the ranks' sums over the global count, the mean of one process; the returned
    loss is this rank's share (the history sums the shares).
    """
    args = (batch.input_ids, batch.cu_seqlens, batch.max_seqlen, batch.positions, batch.targets)
    if world == 1:
        with autocast():
            loss = loss_module(*args, "mean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    else:
        with autocast():
            loss_sum = loss_module(*args, "sum")
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (world / n_masked)).backward()
        loss = loss_sum / n_masked
    optimizer.step()
    scheduler.step()
    return loss.detach()


def step_batch(
    tokens, batches: TokenBatches, step: int, seed: int, mask_prob: float, dist=None
) -> tuple[Batch, int, int]:
    """Step ``step``'s batch and masks on the host, a function of ``(seed, step)`` alone (under
    DDP, ``dist``'s slice of it), with the global batch's token and masked-token counts."""
    ids, cu, max_seqlen = pack(tokens, batches(step))
    masked = choose_masked(cu, mask_prob, np.random.default_rng([seed, 1, step]))
    n_tokens, n_masked = int(ids.size), int(masked.sum())
    if (
        dist is not None and dist.world > 1
    ):  # this rank's slice; its loss weighted by its masked tokens
        ids, cu, max_seqlen, masked = shard_batch(ids, cu, masked, dist.rank, dist.world)
    return Batch.masked(ids, cu, max_seqlen, masked, tokens.mask_id), n_tokens, n_masked


def compile_loss(loss_module, dev: torch.device, enabled: bool):
    """``torch.compile`` of the loss module on CUDA when ``enabled`` (dynamic shapes: the token,
    cell and masked-token counts change every step); the CPU keeps eager kernels, so its
    results stay bitwise those of every other CPU run.

    No CUDA graphs: a graph replays fixed shapes, and a token budget fixes only the upper
    bound of a step's tokens; padding every step to the budget, its cell count and its masked
    count would change what the attention kernels and the loss compute.
    """
    if not enabled or dev.type != "cuda":
        return loss_module
    return torch.compile(loss_module, dynamic=True)


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


def model_config(model_params: Model, attention: str, tokens) -> ModelConfig:
    """The encoder's config: the config's model section, the kind, and the tokens' vocabulary
    size and longest cell (``embed --untrained`` builds its encoder the same way)."""
    return ModelConfig(
        **dataclasses.asdict(model_params),
        vocab_size=tokens.vocab_size,
        max_len=tokens.max_len,
        attention=attention,
    )


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
    model_params: Model,
    train_params: Train,
    device: str,
    out_dir: str | os.PathLike,
    on_step=None,
) -> Path:
    """Train one model; writes ``model.pt`` and ``history.csv`` in ``out_dir`` and returns it.

    ``on_step(step)``, if given, is called after each completed optimiser step (tests use it to
    interrupt a run). ``model_params`` and ``train_params`` are the config's sections
    (``config.section("model", ...)``, ``config.section("train", ...)``), validated there.
    """
    cfg = train_params
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{dataset}: seed must be an integer >= 0, got {seed!r}")
    tokens = load_tokens(tokens_path, dataset)
    model_cfg = model_config(model_params, attention, tokens)
    dev = resolve_device(device)
    dist = dist_from_env()
    train_cells, val_cells = tokens.cells("train"), tokens.cells("val")
    if train_cells.size == 0 or val_cells.size == 0:
        raise DataError(
            f"{dataset}: {tokens_path} has {train_cells.size} train and {val_cells.size} val "
            "cells; training needs both (check prepare.val_fraction and the dataset's size)"
        )
    lengths = np.diff(tokens.offsets)
    try:
        batches = TokenBatches(train_cells, lengths[train_cells], cfg.batch_tokens, seed)
        check_budget(lengths[val_cells], cfg.batch_tokens, "validation cells")
    except ConfigError as exc:
        raise ConfigError(f"{dataset}: {exc}") from exc
    if dist.world > 1 and cfg.batch_tokens < dist.world * int(lengths[train_cells].max()):
        raise ConfigError(
            f"{dataset}: train.batch_tokens {cfg.batch_tokens} (all processes together) must hold "
            f"at least {dist.world} cells of the longest ({int(lengths[train_cells].max())} "
            f"tokens) to be split over {dist.world} processes: raise it to "
            f"{dist.world * int(lengths[train_cells].max())}"
        )
    dev = init_distributed(dist, dev)
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    set_threads()
    use_bf16 = cfg.precision == "bf16" and dev.type == "cuda"
    if cfg.precision == "bf16" and not use_bf16:
        print(f"train {dataset}: precision bf16 needs CUDA; running fp32 on cpu", file=sys.stderr)
    if cfg.compile and dev.type != "cuda":
        print(f"train {dataset}: compile applies on CUDA only; eager on cpu", file=sys.stderr)

    def autocast():
        if use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # model: the same seed gives the same initial weights for both attention kinds
    torch.manual_seed(seed)
    # (numpy: every draw goes through a Generator seeded from (seed, ...); no global state)
    model = Encoder(model_cfg).to(dev)
    optimizer, scheduler = build_optimizer(model, cfg, dev)

    # resume: the checkpoint must come from this very run (same data, config, kind and seed);
    # the settings of RESUMABLE_KEYS alone may change (they change no result)
    train_key = dataclasses.asdict(cfg)
    run_key = {
        "dataset": dataset,
        "attention": attention,
        "seed": seed,
        "model": dataclasses.asdict(model_cfg),
        "train": {k: v for k, v in train_key.items() if k not in RESUMABLE_KEYS},
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
        # the history holds the validation curve, all the stopping rule reads
        start_step, history = state["step"], state["history"]
        elapsed_before, tokens_seen = state["elapsed_s"], state["tokens"]
        if dist.main:
            print(
                f"train {dataset}: resuming from {checkpoint_path} at step {start_step}",
                file=sys.stderr,
            )
    # the encoder and its loss as one module: DDP after the resume (its constructor broadcasts
    # rank 0's weights; every rank loaded the same checkpoint anyway), compiled last
    loss_module = wrap_ddp(model, dev) if dist.world > 1 else MaskedGeneLoss(model)
    loss_module = compile_loss(loss_module, dev, cfg.compile)

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
            model, tokens, val_cells, cfg.mask_prob, cfg.batch_tokens, dev, autocast, dist=dist
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

    def host_batch(step: int) -> tuple[Batch, int, int]:
        batch, n_tokens, n_masked = step_batch(tokens, batches, step, seed, cfg.mask_prob, dist)
        return batch.to(dev), n_tokens, n_masked

    done, stopped, stop_reason = start_step, False, "max_steps"
    vote = StopVote(dist, stop_signal)
    try:
        if start_step == 0:
            evaluate(0)  # the untrained model's loss starts every curve
        model.train()
        # the next step's batch is packed and sent while the device runs this one (the step
        # asks the device nothing, so the host runs ahead)
        upcoming = host_batch(start_step) if start_step < cfg.steps else None
        for step in range(start_step, cfg.steps):
            if vote():
                stopped = True
                break
            batch, n_tokens, n_masked = upcoming
            if dist.world > 1:
                # dropout: a stream per (seed, step, rank), so ranks differ and a resumed run
                # draws what an uninterrupted one would (one process keeps its saved RNG state)
                torch.manual_seed(
                    int(np.random.SeedSequence([seed, 2, step, dist.rank]).generate_state(1)[0])
                )
            lr = optimizer.param_groups[0]["lr"]
            loss = optimizer_step(
                loss_module, optimizer, scheduler, batch, autocast, dist.world, n_masked
            )
            if step + 1 < cfg.steps:
                upcoming = host_batch(step + 1)

            done = step + 1
            tokens_seen += n_tokens
            pending.append(
                {
                    "step": done,
                    "split": "train",
                    "loss": loss,
                    "lr": lr,
                    "tokens": tokens_seen,
                    "elapsed_s": elapsed(),
                }
            )
            bar.update(1)
            plateau_now = False
            if done % cfg.eval_every == 0 or done == cfg.steps:
                evaluate(done)
                # every rank holds the same validation curve: they decide the same
                plateau_now = cfg.stop.rule == "plateau" and history_plateau(history, cfg.stop)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps and not plateau_now:
                checkpoint(done)
            if on_step is not None:
                on_step(done)
            if plateau_now:
                stop_reason = "plateau"
                break
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
    val_loss = val_curve(history)[1][-1]
    plateau = history_plateau(history, cfg.stop)
    print(
        f"train {dataset}: {done} steps ({stop_reason}), final val loss {val_loss:.4f}, "
        f"{'a plateau' if plateau else 'no plateau'} by train.stop's criterion",
        file=sys.stderr,
    )
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save(
            {
                "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "model_config": dataclasses.asdict(model_cfg),
                "train_config": train_key,
                "tokens": tokens.metadata(),
                "dataset": dataset,
                "attention": attention,
                "seed": seed,
                "steps": cfg.steps,  # the cap
                "steps_trained": done,
                "stop_reason": stop_reason,  # one of STOP_REASONS
                "plateau": plateau,  # train.stop's criterion on the final curve, whatever stopped it
                "final_val_loss": val_loss,
                "val_loss": val_loss,
            },
            tmp,
        )
    checkpoint_path.unlink(missing_ok=True)
    if dist.world > 1:
        dist.barrier()
        torch.distributed.destroy_process_group()
    return out_dir


def model_record(path: str | os.PathLike) -> dict:
    """What ``model.pt`` records about its run (dataset, attention, seed, configs, ...), read
    on the CPU; the weights are in ``record["model"]``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"model file {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(path: str | os.PathLike, device: torch.device) -> tuple[Encoder, dict]:
    """``model.pt`` -> (encoder in eval mode on ``device``, the saved record)."""
    record = model_record(path)
    model = Encoder(ModelConfig(**record["model_config"]))
    model.load_state_dict(record["model"])
    return model.to(device).eval(), record


# ----------------------------------------------------------------------------------------
# CLI


def _run(args: argparse.Namespace) -> None:
    train(
        dataset=args.dataset,
        tokens_path=args.tokens,
        attention=args.attention,
        seed=args.seed,
        model_params=config.section("model", parse_json_arg(args.model_json, "--model-json")),
        train_params=config.section("train", parse_json_arg(args.train_json, "--train-json")),
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
    p.add_argument("--attention", required=True, choices=ATTENTION_KINDS)
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--model-json", default="{}", help="the config's model section as JSON")
    p.add_argument("--train-json", default="{}", help="the config's train section as JSON")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--out-dir", required=True, help="results/<dataset>/train/<attention>_seed<S>")
    p.set_defaults(func=_run)
