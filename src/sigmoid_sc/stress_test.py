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
  masks (functions of ``(seed, step)``). AdamW, the learning rate below, no gradient
  clipping; bf16 autocast on CUDA.
- data: synthetic gene-rank sequences, each of exactly ``seq_len`` tokens (real cells rarely
  express 8K genes, and the claim is about 8K-token attention). A sequence belongs to one of
  ``n_cell_types`` programmes and lists ``seq_len`` distinct genes, Geneformer-style
  (:class:`RankSequences`). ``task="preference"`` ranks every gene by the programme's
  preference plus Gaussian noise: at 25,000 genes the masked gene is close to unpredictable,
  and models stay at chance. ``task="ordered"``: each programme orders modules of co-regulated
  genes (``module_size``; independent orders, or one shared order displaced by
  ``programme_noise``) and a sequence is its programme's gene order with every gene displaced
  by bounded noise (``rank_noise`` positions), so the masked gene is predictable from the
  programme and the rank: models learn it. Token ids follow tokens.npz (specials 0-2, genes
  from 3).
- architecture: ``norm`` (pre | post), ``qk_norm`` and ``layer_scale`` are the encoder's
  switches (:mod:`sigmoid_sc.model`); the defaults are the pipeline's encoder.
- per step: masked-gene loss, global gradient norm (L2 over all parameters), each layer's
  gradient norm and their maximum, and the maximum attention logit ``max |q.k| / sqrt(d)``
  (before sigmoid's bias), overall and per layer, with each layer's attention entropy (softmax,
  nats, mean over the scanned rows and heads) or mean row sum (sigmoid). These are measured by
  a forward pre-hook on every attention module that recomputes q and k in fp32 from the
  module's own weights: exact over every query row when ``logit_queries`` is 0, otherwise over
  ``logit_queries`` evenly strided query rows per sequence against all keys and heads (the
  maximum is then a lower bound of the exact one, at a small fraction of one attention forward).
- learning rate: linear warm-up over ``warmup_steps``, then constant (``schedule="constant"``)
  or a cosine from the peak to ``min_lr_ratio`` x the peak at ``max_steps`` (``"cosine"``).
- divergence: a non-finite loss or gradient norm, or a gradient norm above
  ``divergence_factor`` (10^4) times the median of the first ``early_steps`` steps. That arm
  stops before its optimiser step, and the step and reason are recorded; the other arm runs on.
  Each arm is also bounded by ``max_steps`` and ``max_seconds``.

Resumable: given a checkpoint file, an arm saves its state (weights, optimiser, the rows so far)
every ``checkpoint_every`` steps and when it stops early (``max_seconds`` of this invocation,
or a stop request such as SIGTERM), and a rerun continues from there to the same result
(bitwise on the CPU). A finished arm's file keeps its rows and summary only, so a rerun returns
them without training. A file written under another configuration is ignored (and replaced).

Outputs: a CSV log (one row per arm and step), a JSON summary (per arm: parameters, steps, stop
reason, divergence), and the figure (gradient norm, loss and maximum logit against step).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import platform
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import config
from .attention.reference import default_scale
from .config import StressTest
from .io import atomic_path, write_csv, write_json
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
        norm=cfg.norm,
        qk_norm=cfg.qk_norm,
        layer_scale=cfg.layer_scale,
    )


def chance_loss(cfg: StressTest) -> float:
    """The loss of a uniform guess over the genes: ``ln(vocab_size - 3)`` nats."""
    return math.log(cfg.vocab_size - N_SPECIAL)


def learning_rate(cfg: StressTest, peak_lr: float, step: int) -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then constant or cosine to
    ``min_lr_ratio * peak_lr`` at step ``max_steps`` (``cfg.schedule``)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak_lr * ((step + 1) / cfg.warmup_steps)  # the original's rounding
    if cfg.schedule == "constant":
        return peak_lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio * peak_lr
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# data: synthetic gene-rank sequences, a function of (seed, step)


class RankSequences:
    """Batches of ``batch_size`` sequences of ``seq_len`` distinct gene tokens each.

    The programmes are drawn from ``task_seed`` (``seed`` when None), the batches from
    ``(seed, step)``: a function of those alone.

    ``task="preference"``: programme ``t`` has a fixed preference over the genes
    (``N(0, 2^2)``); a sequence of programme ``t`` ranks the genes by
    ``preference[t] + rank_noise * N(0, 1)`` and keeps the top ``seq_len``, highest first.
    With thousands of genes within one noise sd of each other, the masked gene is nearly
    unpredictable: the loss stays near chance.

    ``task="ordered"``: the genes form modules of ``module_size`` genes in a fixed internal
    order (co-regulated genes); programme ``t`` orders the modules: independently at random
    (``programme_noise`` None) or as one shared order with each module displaced by
    ``programme_noise * clip(N(0, 1), -3, 3)`` slots (related cell types). A sequence of
    programme ``t`` gives the gene at position ``p`` of the programme's gene order the score
    ``p + rank_noise * clip(N(0, 1), -3, 3)`` and keeps the ``seq_len`` lowest scores, lowest
    first. The noise is bounded, so the gene at rank ``r`` lies within ``6 * rank_noise``
    positions of ``r`` in its programme's order: predictable from the programme (which the other
    genes of the sequence reveal) and the rank, up to ``~ln(rank_noise * sqrt(2 pi e))`` nats
    (less with the neighbours' help), against ``ln(n_genes)`` for a uniform guess; the rank
    alone narrows it down too (more so with a shared order).
    """

    def __init__(self, cfg: StressTest):
        self.cfg = cfg
        n_genes = cfg.vocab_size - N_SPECIAL
        task_seed = cfg.seed if cfg.task_seed is None else cfg.task_seed
        rng = np.random.default_rng([task_seed, 7])
        if cfg.task == "ordered":
            # modules of `module_size` genes in a fixed internal order; a programme orders
            # the modules (the last module may be shorter)
            genes = rng.permutation(n_genes)
            modules = [genes[i : i + cfg.module_size] for i in range(0, n_genes, cfg.module_size)]
            orders = []
            for _ in range(cfg.n_cell_types):
                if cfg.programme_noise is None:  # independent programmes
                    slots = rng.permutation(len(modules))
                else:  # the shared order, each module displaced by bounded noise (slots)
                    noise = np.clip(rng.standard_normal(len(modules)), -3.0, 3.0)
                    slots = np.argsort(np.arange(len(modules)) + cfg.programme_noise * noise)
                orders.append(np.concatenate([modules[m] for m in slots]))
            self.order = np.stack(orders)
            # genes beyond this position cannot reach the top seq_len (bounded noise)
            self.candidates = min(n_genes, cfg.seq_len + math.floor(6 * cfg.rank_noise) + 1)
        else:
            self.preference = (rng.normal(size=(cfg.n_cell_types, n_genes)) * 2.0).astype(
                np.float32
            )

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``input_ids`` int64 ``[B * seq_len]``, ``cu_seqlens`` int32 ``[B + 1]``, masked bool."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 3, step])
        ids = []
        for programme in rng.integers(cfg.n_cell_types, size=cfg.batch_size):
            if cfg.task == "ordered":
                noise = np.clip(rng.standard_normal(self.candidates), -3.0, 3.0)
                score = np.arange(self.candidates) + cfg.rank_noise * noise
                keep = np.argsort(score, kind="stable")[: cfg.seq_len]
                ids.append(self.order[programme, keep] + N_SPECIAL)
                continue
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

    ``q, k`` are recomputed from the module's ``qkv`` weights on its input (the hidden states
    the module sees), with its q/k LayerNorms when ``qk_norm`` is on, so the model itself is
    untouched. ``queries`` = 0 scans every query row in blocks of 1024; otherwise ``queries``
    evenly strided rows per sequence are scanned against all keys (a lower bound of the exact
    maximum). Per layer it also records the maximum and, over the scanned rows and heads, the
    mean attention entropy (softmax, nats) or the mean row sum of ``sigmoid(s - log n)``
    (sigmoid, the model's per-cell bias).
    """

    def __init__(self, model: Encoder, queries: int):
        self.queries = queries
        self.active = False
        self.value = float("nan")
        n_layers = len(model.blocks)
        self.layer_max = [float("nan")] * n_layers
        self.layer_stat = [float("nan")] * n_layers
        self.kinds = [block.attn.attention for block in model.blocks]
        self._max: dict[int, torch.Tensor] = {}
        self._stat: dict[int, torch.Tensor] = {}
        self._rows: dict[int, int] = {}
        self._cu: np.ndarray | None = None
        self._handles = [
            block.attn.register_forward_pre_hook(functools.partial(self._hook, i))
            for i, block in enumerate(model.blocks)
        ]

    def start(self, cu_seqlens: np.ndarray) -> None:
        self.active, self._cu = True, cu_seqlens
        self._max, self._stat, self._rows = {}, {}, {}

    def stop(self) -> float:
        """The maximum since :meth:`start` (one host sync), NaN if not measured; the per-layer
        values land in ``layer_max`` and ``layer_stat``."""
        self.active = False
        n_layers = len(self.layer_max)
        self.layer_max = [float("nan")] * n_layers
        self.layer_stat = [float("nan")] * n_layers
        if not self._max:
            self.value = float("nan")
            return self.value
        layers = sorted(self._max)
        values = torch.stack(
            [self._max[i] for i in layers] + [self._stat[i] / self._rows[i] for i in layers]
        ).tolist()
        for j, i in enumerate(layers):
            self.layer_max[i], self.layer_stat[i] = values[j], values[len(layers) + j]
        self.value = max(values[: len(layers)])  # never NaN: a NaN logit counts as inf
        return self.value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def _hook(self, layer: int, module, args) -> None:
        if not self.active:
            return
        with torch.autocast(args[0].device.type, enabled=False):  # fp32 logits, even under bf16
            self._measure(layer, module, args[0])

    def _measure(self, layer: int, module, x: torch.Tensor) -> None:
        total, d_model = x.shape
        heads, head_dim = module.n_heads, d_model // module.n_heads
        x = x.float()
        weight, bias = module.qkv.weight.float(), module.qkv.bias.float()
        # keys of every token; queries only of the scanned rows (the q third of qkv)
        k = F.linear(x, weight[d_model : 2 * d_model], bias[d_model : 2 * d_model])
        k = k.view(total, heads, head_dim)
        cu = self._cu
        spans = []  # (start, end, the scanned rows of this sequence)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if self.queries and self.queries < end - start:
                rows = torch.linspace(start, end - 1, self.queries, device=x.device).round().long()
            else:
                rows = torch.arange(start, end, device=x.device)
            spans.append((start, end, rows))
        rows_all = torch.cat([rows for _, _, rows in spans])
        q = F.linear(x[rows_all], weight[:d_model], bias[:d_model]).view(-1, heads, head_dim)
        if getattr(module, "qk_norm", False):
            q, k = module.q_norm(q), module.k_norm(k)
        scale = default_scale(head_dim, None)
        offset = 0
        for start, end, rows in spans:
            n = end - start
            ks = k[start:end].transpose(0, 1)  # [H, n, D]
            q_seq = q[offset : offset + rows.numel()]
            offset += rows.numel()
            for qs in q_seq.split(1024):
                logits = torch.matmul(qs.transpose(0, 1), ks.transpose(1, 2)) * scale  # [H, m, n]
                # NaN-aware: a NaN logit is the strongest sign of trouble, keep it
                m = torch.nan_to_num(logits.abs(), nan=float("inf")).amax()
                if module.attention == "softmax":
                    logp = torch.log_softmax(logits, dim=-1)
                    stat = -(logp.exp() * logp).sum(-1).sum()  # entropy, summed over rows
                else:
                    stat = torch.sigmoid(logits - math.log(n)).sum()  # row sums, summed
                self._max[layer] = torch.maximum(self._max[layer], m) if layer in self._max else m
                self._stat[layer] = self._stat[layer] + stat if layer in self._stat else stat
                self._rows[layer] = self._rows.get(layer, 0) + logits.shape[0] * logits.shape[1]


def attention_stat_name(attention: str) -> str:
    """The per-layer attention statistic's column stem: entropy (softmax), row sum (sigmoid)."""
    return "attn_entropy" if attention == "softmax" else "attn_row_sum"


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
# stopping from outside, checkpoints


class StopRequest:
    """A flag a signal handler sets; :func:`run_arm` polls it once per step (``should_stop``)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM,)):
    """Within the block, the ``signals`` set the yielded :class:`StopRequest` instead of ending
    the process (a job's time limit sends SIGTERM first), so an arm checkpoints and returns."""
    request = StopRequest()

    def handler(signum, _frame):
        request.signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


#: keys that may change between invocations without invalidating a checkpoint
RESUMABLE_KEYS = ("enabled", "attentions", "lr", "max_seconds", "checkpoint_every")


def checkpoint_fingerprint(cfg: StressTest, attention: str, peak_lr: float) -> dict:
    """What a checkpoint must have been written under to be continued."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_KEYS}
    return {"config": config, "attention": attention, "peak_lr": float(peak_lr)}


def arm_slug(arm: str) -> str:
    """A file-name-safe form of an arm's name (``softmax lr=0.003`` -> ``softmax_lr-0.003``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", arm.replace("=", "-"))


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path | None, fingerprint: dict, log=print) -> dict | None:
    """The checkpoint at ``path`` if it exists and was written under ``fingerprint``."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 (a torn or foreign file: start over, say so)
        log(f"stress: ignoring unreadable checkpoint {path} ({type(exc).__name__}: {exc})")
        return None
    if state.get("fingerprint") != fingerprint:
        log(f"stress: ignoring checkpoint {path}: written under another configuration")
        return None
    return state


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
    checkpoint: str | Path | None = None,
    should_stop=None,
) -> tuple[list[dict], dict]:
    """Train one arm until divergence, ``max_steps``, ``max_seconds`` or a stop request.

    ``on_step(rows)``, if given, is called with the arm's rows after every step (partial logs).
    ``checkpoint``: a file to continue from (when written under this configuration) and to
    save to every ``checkpoint_every`` steps, on an early stop (``max_seconds`` of this
    invocation, ``should_stop()`` true) and at the end (rows and summary only).

    Returns (rows, summary): a row per completed step (step, lr, loss, grad_norm,
    max_layer_grad_norm, max_grad_layer, max_attn_logit, tokens, elapsed_s, grad_norm_layer<i>,
    max_attn_logit_layer<i>, attn_entropy_layer<i> or attn_row_sum_layer<i>) and the arm's
    summary (n_params, steps, stop_reason, diverged, divergence_step, complete, ...).
    """
    data = data or RankSequences(cfg)
    peak_lr = cfg.lrs[0] if lr is None else float(lr)
    arm = arm_name(cfg, attention, peak_lr)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    fingerprint = checkpoint_fingerprint(cfg, attention, peak_lr)
    state = load_checkpoint(checkpoint, fingerprint, log)
    if state is not None and state.get("summary") is not None:  # finished in an earlier run
        log(
            f"stress {arm}: finished earlier ({state['summary']['stop_reason']}), from {checkpoint}"
        )
        return state["rows"], state["summary"]
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
    tokens, elapsed_before, resumed_at = 0, 0.0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rows, detector.early = state["rows"], state["early"]
        tokens, elapsed_before = state["tokens"], state["elapsed_s"]
        resumed_at = len(rows)
        log(f"stress {arm}: resuming at step {resumed_at} from {checkpoint}")
    stat = attention_stat_name(attention)

    def save(summary: dict | None = None) -> None:
        if checkpoint is None:
            return
        keep = {"fingerprint": fingerprint, "rows": rows, "summary": summary}
        if summary is None:  # unfinished: everything needed to continue
            keep.update(
                model=model.state_dict(), optimizer=optimizer.state_dict(),
                early=detector.early, tokens=tokens, elapsed_s=elapsed_before + clock(),
            )  # fmt: skip
        save_checkpoint(checkpoint, keep)

    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    log(f"stress {arm}: {n_params:,} parameters on {device}, precision "
        f"{'bf16' if use_bf16 else 'fp32'}")  # fmt: skip
    try:
        for step in range(len(rows), cfg.max_steps):
            if clock() > cfg.max_seconds or (should_stop is not None and should_stop()):
                stop_reason = "max_seconds" if clock() > cfg.max_seconds else "interrupted"
                break
            ids, cu, masked = data.batch(step)
            lr = learning_rate(cfg, peak_lr, step)
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
                "elapsed_s": elapsed_before + clock(),
            }
            row.update({f"grad_norm_layer{i}": v for i, v in enumerate(layer_norms)})
            nan = float("nan")
            for i in range(cfg.n_layers):
                row[f"max_attn_logit_layer{i}"] = probe.layer_max[i] if measure else nan
                row[f"{stat}_layer{i}"] = probe.layer_stat[i] if measure else nan
            rows.append(row)
            if on_step is not None:
                on_step(rows)
            reason = detector.check(loss_value, global_norm)
            if reason is not None:  # stop before the optimiser applies it
                stop_reason, divergence = "diverged", {"step": step, "reason": reason}
                log(f"stress {arm}: diverged at step {step}: {reason}")
                break
            optimizer.step()
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save()
            if step % 10 == 0 or step == cfg.max_steps - 1:
                log(f"stress {arm}: step {step} loss {loss_value:.4f} grad norm "
                    f"{global_norm:.4g} max logit {max_logit:.3g} {row['elapsed_s']:.1f}s")  # fmt: skip
    finally:
        probe.remove()
    elapsed = elapsed_before + clock()
    finite = [r for r in rows if math.isfinite(r["grad_norm"])]
    complete = stop_reason in ("max_steps", "diverged")
    summary = {
        "arm": arm,
        "attention": attention,
        "peak_lr": peak_lr,
        "norm": cfg.norm,
        "qk_norm": cfg.qk_norm,
        "layer_scale": cfg.layer_scale,
        "n_params": n_params,
        "steps": len(rows),
        "stop_reason": stop_reason,
        "complete": complete,
        "resumed_at_step": resumed_at,
        "diverged": divergence is not None,
        "divergence_step": divergence["step"] if divergence else None,
        "divergence_reason": divergence["reason"] if divergence else None,
        "early_median_grad_norm": detector.early_median,
        "max_grad_norm": max((r["grad_norm"] for r in finite), default=float("nan")),
        "final_loss": rows[-1]["loss"] if rows else float("nan"),
        "chance_loss": chance_loss(cfg),
        "elapsed_s": elapsed,
        "step_ms_mean": 1000 * elapsed / max(1, len(rows)),
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }
    save(summary if complete else None)
    log(f"stress {arm}: stopped ({stop_reason}) after {len(rows)} steps, {elapsed:.1f}s")
    model = optimizer = None  # free the device memory before the next arm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, summary


def run_stress_test(
    cfg: StressTest,
    device: torch.device,
    log=print,
    on_progress=None,
    checkpoint_dir: str | Path | None = None,
    should_stop=None,
    time_left=None,
) -> tuple[list, dict]:
    """Every arm of ``cfg.attentions`` on the same data; (rows of all arms, summary).

    ``on_progress(rows, arms, arm_done)``, if given, is called after every step with the rows
    so far and the summaries of the finished arms (so a run cut short can keep its log).
    ``checkpoint_dir``: one checkpoint file per arm (:func:`run_arm`), so a rerun continues.
    Once ``should_stop()`` is true, or ``time_left()`` (seconds) is less than the last arm
    trained here took, arms not yet started are skipped (finished ones are still read from
    their checkpoints): the next invocation runs them.
    """
    data = RankSequences(cfg)
    rows, arms = [], {}
    last_arm_s = 0.0
    for lr in cfg.lrs:
        for attention in cfg.attentions:
            path = None
            if checkpoint_dir is not None:
                path = Path(checkpoint_dir) / f"{arm_slug(arm_name(cfg, attention, lr))}.pt"
            stopping = should_stop is not None and should_stop()
            if stopping or (time_left is not None and time_left() < last_arm_s):
                state = load_checkpoint(path, checkpoint_fingerprint(cfg, attention, lr), log)
                if state is None or state.get("summary") is None:
                    log(f"stress {arm_name(cfg, attention, lr)}: not started (time budget)")
                    continue
            started = time.monotonic()
            on_step = None
            if on_progress is not None:

                def on_step(arm_rows, before=rows):
                    on_progress(before + arm_rows, arms, False)

            arm_rows, arm_summary = run_arm(
                cfg, attention, device, data, log, lr=lr, on_step=on_step, checkpoint=path,
                should_stop=should_stop,
            )  # fmt: skip
            rows.extend(arm_rows)  # in place: on_step's `before` is this list
            arms[arm_summary["arm"]] = arm_summary
            if arm_summary.get("resumed_at_step") is None and arm_summary["complete"]:
                last_arm_s = max(last_arm_s, time.monotonic() - started)
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

    # options added with checkpoints: absent from a hand-made Namespace, they are off
    budget_s = getattr(args, "budget_s", None)
    checkpoint_dir = getattr(args, "checkpoint_dir", None)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    # with checkpoints, SIGTERM (a job's time limit) stops at the next step and checkpoints;
    # without, it ends the process at once, leaving the partial log as before
    signals = (signal.SIGTERM,) if checkpoint_dir else ()
    with stop_on_signals(signals) as request:

        def should_stop() -> bool:
            return request() or (deadline is not None and time.monotonic() > deadline)

        rows, summary = run_stress_test(
            cfg, device, log, on_progress=save_partial if args.partial_every else None,
            checkpoint_dir=checkpoint_dir, should_stop=should_stop,
            time_left=None if deadline is None else lambda: deadline - time.monotonic(),
        )  # fmt: skip
    if request.signal is not None:  # checkpointed: the log, the finished arms, a failed job
        finished = {name: arm for name, arm in summary["arms"].items() if arm["complete"]}
        write_csv(args.log_csv, pd.DataFrame(rows))
        write_json(args.summary, {**stress_summary(cfg, finished, device), "partial": True})
        log(f"stress: stopped by signal {request.signal}; checkpointed in {checkpoint_dir}")
        raise SystemExit(128 + request.signal)
    summary["complete"] = len(summary["arms"]) == len(cfg.lrs) * len(cfg.attentions) and all(
        arm["complete"] for arm in summary["arms"].values()
    )
    frame = pd.DataFrame(rows)
    write_csv(args.log_csv, frame)
    write_json(args.summary, summary)
    fig = plot_stress(frame, summary)
    save_figure(fig, args.png, args.pdf)
    for name, arm in summary["arms"].items():
        state = f"diverged at step {arm['divergence_step']}" if arm["diverged"] else "stable"
        log(f"stress {name}: {state}; {arm['steps']} steps ({arm['stop_reason']})")
    if not summary["complete"]:
        log("stress: incomplete; run the same command again to continue"
            + ("" if checkpoint_dir else " (from the start: no --checkpoint-dir)"))  # fmt: skip
    elif checkpoint_dir and not getattr(args, "keep_checkpoints", False):  # a rerun: afresh
        for lr in cfg.lrs:
            for attention in cfg.attentions:
                slug = arm_slug(arm_name(cfg, attention, lr))
                (Path(checkpoint_dir) / f"{slug}.pt").unlink(missing_ok=True)


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
        "--checkpoint-dir", default=None,
        help="one checkpoint per arm (every checkpoint_every steps, on SIGTERM, at the budget): "
        "a rerun with the same configuration continues from them",
    )  # fmt: skip
    p.add_argument(
        "--keep-checkpoints", action="store_true",
        help="keep the finished arms' checkpoints (their rows and summaries) once every arm is "
        "done; by default they are deleted then, so a rerun measures afresh",
    )  # fmt: skip
    p.add_argument(
        "--budget-s", type=float, default=None,
        help="wall-clock seconds for this invocation: arms stop (checkpointed) when it is spent",
    )  # fmt: skip
    p.add_argument(
        "--partial-every", type=int, default=25,
        help="rewrite the log (and a partial summary) every N steps and after each arm; 0: "
        "only at the end",
    )  # fmt: skip
    p.set_defaults(func=_run)
