"""``sigmoid-sc stress-test``: the stability stress test of claim c (softmax vs sigmoid).

The paper trains a 160M-parameter bidirectional encoder on 8K-token sequences without gradient
clipping and reports that softmax attention diverges (its gradient norm grows ~10^4-fold) while
sigmoid attention stays stable. This module reruns that experiment:

- model: the pipeline's own :class:`~sigmoid_sc.model.Encoder`. The default (10 layers, width
  1024, 16 heads of 64, MLP 4096, a 25,000-token vocabulary, 8,192 rank positions) has
  159,952,896 parameters; the exact count of every run is printed and recorded.
- arms: one per attention kind (and per learning rate when ``lr`` is a list: a sweep), each
  from the same initial weights (``torch.manual_seed(seed)``
  before the model is built; parameters do not depend on the kind) and the same batches and
  masks (functions of ``(seed, step)``). AdamW, linear warm-up to a constant learning rate,
  no gradient clipping; bf16 autocast on CUDA.
- data: synthetic gene-rank sequences, each of exactly ``seq_len`` tokens (real cells rarely
  express 8K genes, and the claim is about 8K-token attention). A sequence belongs to one of
  ``n_cell_types`` programmes; it lists ``seq_len`` distinct genes ranked by the programme's
  preference plus Gaussian noise (``rank_noise``), Geneformer-style, so the masked-gene
  objective has structure to learn. Token ids follow tokens.npz (specials 0-2, genes from 3).
- per step: masked-gene loss, global gradient norm (L2 over all parameters), each layer's
  gradient norm and their maximum, and the maximum attention logit ``max |q.k| / sqrt(d)``
  (before sigmoid's bias). The logit is measured by a forward pre-hook on every attention
  module that recomputes q and k in fp32 from the module's own ``qkv`` weights: exact over every
  query row when ``logit_queries`` is 0, otherwise over ``logit_queries`` evenly strided
  query rows per sequence against all keys and heads (a lower bound of the exact maximum,
  at a small fraction of one attention forward).
- divergence: a non-finite loss or gradient norm, or a gradient norm above
  ``divergence_factor`` (10^4) times the median of the first ``early_steps`` steps. That arm
  stops before its optimiser step, and the step and reason are recorded; the other arm runs on.
  Each arm is also bounded by ``max_steps`` and ``max_seconds``.

Outputs: a CSV log (one row per arm and step), a JSON summary (per arm: parameters, steps, stop
reason, divergence), and the figure (gradient norm, loss and maximum logit against step).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import platform
import sys
import time

import numpy as np
import torch

from . import config
from .attention.reference import default_scale
from .config import StressTest
from .io import write_csv, write_json
from .model import Encoder, ModelConfig
from .runtime import parse_json_arg, resolve_device, set_threads
from .tokens import choose_masked, masked_gene_loss

N_SPECIAL = 3  # pad 0, mask 1, cls 2 (docs/ARCHITECTURE.md)
MASK_ID = 1


def arm_name(cfg: StressTest, attention: str, lr: float) -> str:
    """``softmax`` for a single learning rate; ``softmax lr=0.003`` in a sweep."""
    return attention if len(cfg.lrs) == 1 else f"{attention} lr={lr:g}"


def model_config(cfg: StressTest, attention: str) -> ModelConfig:
    return ModelConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_ff=cfg.d_ff,
        dropout=0.0,
        vocab_size=cfg.vocab_size,
        max_len=cfg.seq_len,
        attention=attention,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# data: synthetic gene-rank sequences, a function of (seed, step)


class RankSequences:
    """Batches of ``batch_size`` sequences of ``seq_len`` distinct gene tokens each.

    Programme ``t`` has a fixed preference over the genes (``N(0, 2^2)``, seeded by ``seed``);
    a sequence of programme ``t`` ranks the genes by ``preference[t] + rank_noise * N(0, 1)``
    and keeps the top ``seq_len``, highest first.
    """

    def __init__(self, cfg: StressTest):
        self.cfg = cfg
        n_genes = cfg.vocab_size - N_SPECIAL
        rng = np.random.default_rng([cfg.seed, 7])
        self.preference = (rng.normal(size=(cfg.n_cell_types, n_genes)) * 2.0).astype(np.float32)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``input_ids`` int64 ``[B * seq_len]``, ``cu_seqlens`` int32 ``[B + 1]``, masked bool."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 3, step])
        ids = []
        for programme in rng.integers(cfg.n_cell_types, size=cfg.batch_size):
            score = self.preference[programme] + cfg.rank_noise * rng.standard_normal(
                self.preference.shape[1], dtype=np.float32
            )
            top = np.argpartition(-score, cfg.seq_len - 1)[: cfg.seq_len]
            ids.append(top[np.argsort(-score[top], kind="stable")] + N_SPECIAL)
        cu_seqlens = np.arange(cfg.batch_size + 1, dtype=np.int32) * cfg.seq_len
        masked = choose_masked(cu_seqlens, cfg.mask_prob, rng)
        return np.concatenate(ids).astype(np.int64), cu_seqlens, masked


# ----------------------------------------------------------------------------------------
# measurements


def layer_of_parameters(model: Encoder) -> list[int]:
    """For each parameter in ``model.parameters()`` order: its block index, or -1 (embeddings,
    final norm)."""
    block_of = {}
    for i, block in enumerate(model.blocks):
        for p in block.parameters():
            block_of[id(p)] = i
    return [block_of.get(id(p), -1) for p in model.parameters()]


def grad_norms(model: Encoder, layer_index: list[int]) -> tuple[float, list[float]]:
    """(global L2 norm of all gradients, L2 norm of each block's gradients), one host sync.

    Parameters without a gradient count as zero.
    """
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    layers = torch.tensor(
        [li for p, li in zip(params, layer_index) if p.grad is not None], dtype=torch.long
    )
    n_layers = len(model.blocks)
    if not grads:
        return 0.0, [0.0] * n_layers
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])  # [P]
    squares = norms.square()
    per_layer = torch.zeros(n_layers + 1, device=norms.device, dtype=torch.float32)
    # index n_layers collects the parameters outside the blocks (-1)
    per_layer.index_add_(0, torch.where(layers < 0, n_layers, layers).to(norms.device), squares)
    values = torch.cat([squares.sum().sqrt()[None], per_layer[:n_layers].sqrt()]).tolist()
    return values[0], values[1:]


class MaxLogitProbe:
    """Forward pre-hooks that record ``max |q.k| * scale`` over every attention module.

    ``q, k`` are recomputed from the module's ``qkv`` weights on its input (the layer-normed
    hidden states), so the model itself is untouched. ``queries`` = 0 scans every query row in
    blocks of 1024; otherwise ``queries`` evenly strided rows per sequence are scanned against
    all keys (a lower bound of the exact maximum).
    """

    def __init__(self, model: Encoder, queries: int):
        self.queries = queries
        self.active = False
        self.value = float("nan")
        self._max: torch.Tensor | None = None
        self._cu: np.ndarray | None = None
        self._handles = [block.attn.register_forward_pre_hook(self._hook) for block in model.blocks]

    def start(self, cu_seqlens: np.ndarray) -> None:
        self.active, self._cu, self._max = True, cu_seqlens, None

    def stop(self) -> float:
        """The maximum since :meth:`start` (one host sync), NaN if not measured."""
        self.active = False
        self.value = float("nan") if self._max is None else float(self._max)
        return self.value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def _hook(self, module, args) -> None:
        if not self.active:
            return
        with torch.autocast(args[0].device.type, enabled=False):  # fp32 logits, even under bf16
            self._measure(module, args[0])

    def _measure(self, module, x: torch.Tensor) -> None:
        total, d_model = x.shape
        heads = module.n_heads
        qkv = module.qkv(x.float()).view(total, 3, heads, d_model // heads)
        q, k = qkv[:, 0], qkv[:, 1]
        scale = default_scale(d_model // heads, None)
        cu = self._cu
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            n = end - start
            ks = k[start:end].transpose(0, 1)  # [H, n, D]
            if self.queries and self.queries < n:
                rows = torch.linspace(start, end - 1, self.queries, device=x.device).round().long()
                blocks = [q[rows]]
            else:
                blocks = [q[s : min(s + 1024, end)] for s in range(start, end, 1024)]
            for qs in blocks:
                logits = torch.matmul(qs.transpose(0, 1), ks.transpose(1, 2))  # [H, m, n]
                # NaN-aware: a NaN logit is the strongest sign of trouble, keep it
                m = torch.nan_to_num(logits.abs(), nan=float("inf")).amax() * scale
                self._max = m if self._max is None else torch.maximum(self._max, m)


class DivergenceDetector:
    """Divergence = non-finite loss or gradient norm, or a gradient norm above ``factor`` times
    the median gradient norm of the first ``early_steps`` steps (checked from then on)."""

    def __init__(self, early_steps: int, factor: float):
        self.early_steps, self.factor = early_steps, factor
        self.early: list[float] = []

    @property
    def early_median(self) -> float:
        return float(np.median(self.early)) if self.early else float("nan")

    def check(self, loss: float, grad_norm: float) -> str | None:
        """None while stable, else the reason (the step counts as diverged)."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if len(self.early) < self.early_steps:
            self.early.append(grad_norm)
            return None
        if grad_norm > self.factor * self.early_median:
            return (
                f"gradient norm {grad_norm:.4g} > {self.factor:g} x early median "
                f"{self.early_median:.4g}"
            )
        return None


# ----------------------------------------------------------------------------------------
# one arm


def run_arm(
    cfg: StressTest,
    attention: str,
    device: torch.device,
    data: RankSequences | None = None,
    log=print,
    lr: float | None = None,
    on_step=None,
) -> tuple[list[dict], dict]:
    """Train one arm until divergence, ``max_steps`` or ``max_seconds``.

    ``on_step(rows)``, if given, is called with the arm's rows after every step (partial logs).

    Returns (rows, summary): a row per completed step (step, lr, loss, grad_norm,
    max_layer_grad_norm, max_grad_layer, max_attn_logit, tokens, elapsed_s, grad_norm_layer<i>)
    and the arm's summary (n_params, steps, stop_reason, diverged, divergence_step, ...).
    """
    data = data or RankSequences(cfg)
    peak_lr = cfg.lrs[0] if lr is None else float(lr)
    arm = arm_name(cfg, attention, peak_lr)
    torch.manual_seed(cfg.seed)  # same initial weights for every attention kind
    model = Encoder(model_config(cfg, attention)).to(device)
    model.train()
    n_params = count_parameters(model)
    layer_index = layer_of_parameters(model)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=peak_lr, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    use_bf16 = cfg.precision == "bf16" and device.type == "cuda"

    def autocast():
        return (
            torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        )

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    probe = MaxLogitProbe(model, cfg.logit_queries)
    detector = DivergenceDetector(cfg.early_steps, cfg.divergence_factor)
    rows: list[dict] = []
    stop_reason, divergence = "max_steps", None
    tokens = 0
    t0 = time.perf_counter()
    log(f"stress {arm}: {n_params:,} parameters on {device}, precision "
        f"{'bf16' if use_bf16 else 'fp32'}")  # fmt: skip
    try:
        for step in range(cfg.max_steps):
            if time.perf_counter() - t0 > cfg.max_seconds:
                stop_reason = "max_seconds"
                break
            ids, cu, masked = data.batch(step)
            lr = peak_lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else peak_lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            measure = step % cfg.logit_every == 0
            if measure:
                probe.start(cu)
            with autocast():
                loss = masked_gene_loss(
                    model,
                    torch.from_numpy(ids).to(device),
                    torch.from_numpy(cu).to(device),
                    cfg.seq_len,
                    torch.from_numpy(masked).to(device),
                    MASK_ID,
                )
            max_logit = probe.stop() if measure else float("nan")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            global_norm, layer_norms = grad_norms(model, layer_index)
            loss_value = float(loss.detach())
            tokens += int(ids.size)
            max_layer = int(np.nanargmax(layer_norms)) if np.isfinite(layer_norms).any() else 0
            row = {
                "arm": arm,
                "attention": attention,
                "peak_lr": peak_lr,
                "step": step,
                "lr": lr,
                "loss": loss_value,
                "grad_norm": global_norm,
                "max_layer_grad_norm": float(np.max(layer_norms)),
                "max_grad_layer": max_layer,
                "max_attn_logit": max_logit,
                "tokens": tokens,
                "elapsed_s": time.perf_counter() - t0,
            }
            row.update({f"grad_norm_layer{i}": v for i, v in enumerate(layer_norms)})
            rows.append(row)
            if on_step is not None:
                on_step(rows)
            reason = detector.check(loss_value, global_norm)
            if reason is not None:  # stop before the optimiser applies it
                stop_reason, divergence = "diverged", {"step": step, "reason": reason}
                log(f"stress {arm}: diverged at step {step}: {reason}")
                break
            optimizer.step()
            if step % 10 == 0 or step == cfg.max_steps - 1:
                log(f"stress {arm}: step {step} loss {loss_value:.4f} grad norm "
                    f"{global_norm:.4g} max logit {max_logit:.3g} {row['elapsed_s']:.1f}s")  # fmt: skip
    finally:
        probe.remove()
    elapsed = time.perf_counter() - t0
    finite = [r for r in rows if math.isfinite(r["grad_norm"])]
    summary = {
        "arm": arm,
        "attention": attention,
        "peak_lr": peak_lr,
        "n_params": n_params,
        "steps": len(rows),
        "stop_reason": stop_reason,
        "diverged": divergence is not None,
        "divergence_step": divergence["step"] if divergence else None,
        "divergence_reason": divergence["reason"] if divergence else None,
        "early_median_grad_norm": detector.early_median,
        "max_grad_norm": max((r["grad_norm"] for r in finite), default=float("nan")),
        "final_loss": rows[-1]["loss"] if rows else float("nan"),
        "elapsed_s": elapsed,
        "step_ms_mean": 1000 * elapsed / max(1, len(rows)),
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }
    log(f"stress {arm}: stopped ({stop_reason}) after {len(rows)} steps, {elapsed:.1f}s")
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, summary


def run_stress_test(
    cfg: StressTest, device: torch.device, log=print, on_progress=None
) -> tuple[list, dict]:
    """Every arm of ``cfg.attentions`` on the same data; (rows of all arms, summary).

    ``on_progress(rows, arms, arm_done)``, if given, is called after every step with the rows
    so far and the summaries of the finished arms (so a run cut short can keep its log).
    """
    data = RankSequences(cfg)
    rows, arms = [], {}
    for lr in cfg.lrs:
        for attention in cfg.attentions:
            on_step = None
            if on_progress is not None:

                def on_step(arm_rows, before=rows):
                    on_progress(before + arm_rows, arms, False)

            arm_rows, arm_summary = run_arm(
                cfg, attention, device, data, log, lr=lr, on_step=on_step
            )
            rows.extend(arm_rows)  # in place: on_step's `before` is this list
            arms[arm_summary["arm"]] = arm_summary
            if on_progress is not None:
                on_progress(rows, arms, True)
    return rows, stress_summary(cfg, arms, device)


def stress_summary(cfg: StressTest, arms: dict, device: torch.device) -> dict:
    """The run's summary: config, environment and the summary of each finished arm."""
    return {
        "config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
        },
        "n_params": next(iter(arms.values()))["n_params"] if arms else None,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "data": "synthetic gene-rank sequences (see sigmoid_sc.stress_test)",
        "arms": dict(arms),
    }


# ----------------------------------------------------------------------------------------
# CLI


def _run(args: argparse.Namespace) -> None:
    import pandas as pd

    from .experiment_figures import plot_stress, save_figure

    cfg = config.section(
        "experiments.stress_test", parse_json_arg(args.params_json, "--params-json")
    )
    device = resolve_device(args.device)
    set_threads()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def save_partial(rows: list[dict], arms: dict, arm_done: bool) -> None:
        # every `partial_every` steps and after each arm: a run killed from outside (a
        # job's time limit) keeps its log and the summary of its finished arms
        if arm_done or len(rows) % args.partial_every == 0:
            write_csv(args.log_csv, pd.DataFrame(rows))
            write_json(args.summary, {**stress_summary(cfg, arms, device), "partial": True})

    rows, summary = run_stress_test(
        cfg, device, log, on_progress=save_partial if args.partial_every else None
    )
    frame = pd.DataFrame(rows)
    write_csv(args.log_csv, frame)
    write_json(args.summary, summary)
    fig = plot_stress(frame, summary)
    save_figure(fig, args.png, args.pdf)
    for name, arm in summary["arms"].items():
        state = f"diverged at step {arm['divergence_step']}" if arm["diverged"] else "stable"
        log(f"stress {name}: {state}; {arm['steps']} steps ({arm['stop_reason']})")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "stress-test",
        help="stability stress test: softmax vs sigmoid, long sequences, no gradient clipping",
        description="Train each attention kind from the same init on the same synthetic "
        "8K-token rank sequences; log loss, gradient norms and maximum attention logit per "
        "step; stop an arm on divergence.",
    )
    p.add_argument("--params-json", default="{}", help="the experiments.stress_test section")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--log-csv", required=True, help="per-step log, one row per arm and step")
    p.add_argument("--summary", required=True, help="JSON summary per arm")
    p.add_argument("--png", required=True)
    p.add_argument("--pdf", required=True)
    p.add_argument(
        "--partial-every", type=int, default=25,
        help="rewrite the log (and a partial summary) every N steps and after each arm; 0: "
        "only at the end",
    )  # fmt: skip
    p.set_defaults(func=_run)
