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
from .config import Model, Train
from .distributed import StopVote, dist_from_env, init_distributed, shard_batch, wrap_ddp
from .errors import ConfigError, DataError
from .io import atomic_path, write_csv
from .model import Encoder, ModelConfig
from .runtime import parse_json_arg, resolve_device, set_threads
from .tokens import batch_cells, choose_masked, load_tokens, masked_gene_loss, pack, validation_loss

HISTORY_COLUMNS = ["step", "split", "loss", "lr", "tokens", "elapsed_s"]
MIN_LR_RATIO = 0.1  # cosine decay ends at 10% of the peak learning rate


def lr_factor(step: int, cfg: Train) -> float:
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
    interrupt a run).
    """
    cfg = train_params
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{dataset}: seed must be an integer >= 0, got {seed!r}")
    tokens = load_tokens(tokens_path, dataset)
    model_cfg = model_config(model_params, attention, tokens)
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
