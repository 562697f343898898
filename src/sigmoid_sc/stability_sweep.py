"""``sigmoid-sc stability-sweep``: claim c with models that learn, as a learning-rate sweep.

Final loss against peak learning rate, per architecture arm (Wortsman et al. 2023): the
largest learning rate at which an arm still trains stably is its stability boundary, and the
claim "softmax diverges where sigmoid stays stable" becomes "softmax's boundary lies below
sigmoid's". Every run is one call of the stress test's training loop
(:func:`sigmoid_sc.stress_test.run_arm`: same data generator, measurements, divergence detector
and checkpoints) with:

- the task: ``task="ordered"`` rank sequences (:class:`~sigmoid_sc.stress_test.RankSequences`):
  cell-type programmes that order gene modules, bounded rank noise; the models learn it
  (``docs/records/2026-12-06_cpu``: the loss against chance). Every batch is new, so the training loss is also
  a held-out loss. The programmes come from ``task_seed``, the same for every run;
- arms: attention kind x ``norm`` (pre | post) x ``qk_norm`` (x ``layer_scale``), each a run
  per learning rate of ``lrs`` with the first seed of ``seeds``; the other seeds rerun the
  learning rates around each arm's boundary (:func:`boundary_lrs`). Runs of one seed share
  the initial weights of the parameters they have in common and every batch;
- schedule: linear warm-up over ``warmup_steps``, then ``steps`` steps of a cosine to
  ``min_lr_ratio`` x the peak; AdamW (0.9, 0.95), no gradient clipping; bf16 on CUDA;
- per step: loss, global and per-layer gradient norm, each layer's maximum attention logit and
  its attention entropy (softmax) or mean row sum (sigmoid) over ``logit_queries`` query rows
  per sequence (all heads, all keys).

The rules, each a function of a finished run: :func:`divergence` (the loop stopped it: a
non-finite loss or gradient norm, or a gradient norm above ``divergence_factor`` x its early
median; or its final loss is not finite or above chance, ``ln(n_genes)``) and :func:`learned`
(final loss <= ``learned_fraction`` x chance). The final loss is the mean loss of the last
``final_window`` steps. An arm's largest stable learning rate is the largest one up to which
every run of every lower learning rate was stable (:func:`largest_stable_lr`).

Sub-commands: ``run`` (one arm x learning rate x seed: a job), ``boundary`` (which learning
rates the further seeds rerun), ``summarize`` (tables and figures), ``gpu`` (the whole sweep in
one process tree on one GPU, several runs at a time, within a time budget, resumable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import sys
import tarfile
import time
from pathlib import Path

from . import config
from .config import N_SPECIAL_TOKENS, StabilitySweep, SweepArm
from .errors import ConfigError, DataError
from .io import atomic_path, write_csv, write_json, write_text
from .runtime import parse_json_arg

SECTION = "experiments.stability_sweep"

# ----------------------------------------------------------------------------------------
# configuration: the experiments.stability_sweep section (sigmoid_sc.config)


def sweep_config(params: dict | None) -> StabilitySweep:
    """The section from its mapping (the schema's defaults fill what it leaves out)."""
    return config.section(SECTION, params)


def arm_named(cfg: StabilitySweep, name: str) -> SweepArm:
    for arm in cfg.arms:
        if arm.name == name:
            return arm
    raise ConfigError(
        f"{SECTION}.arms has no arm named {name!r} (arms: {', '.join(a.name for a in cfg.arms)})"
    )


def chance_loss(cfg: StabilitySweep) -> float:
    """The loss of a uniform guess over the genes: ``ln(vocab_size - 3)`` nats."""
    return math.log(cfg.vocab_size - N_SPECIAL_TOKENS)


def lr_tag(lr: float) -> str:
    """A learning rate in file names: 3 significant digits (``0.00226``)."""
    return f"{float(lr):.3g}"


def stress_config(cfg: StabilitySweep, arm: SweepArm, lr: float, seed: int):
    """The stress test's configuration of one run (``max_steps`` = warm-up + ``steps``)."""
    params = {
        "attentions": [arm.attention],
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
        "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size, "task": cfg.task, "n_cell_types": cfg.n_cell_types,
        "module_size": cfg.module_size, "rank_noise": cfg.rank_noise,
        "programme_noise": cfg.programme_noise, "mask_prob": cfg.mask_prob,
        "task_seed": cfg.task_seed, "lr": float(lr), "warmup_steps": cfg.warmup_steps,
        "max_steps": cfg.warmup_steps + cfg.steps, "schedule": cfg.schedule,
        "min_lr_ratio": cfg.min_lr_ratio, "weight_decay": cfg.weight_decay,
        "precision": cfg.precision, "seed": int(seed), "early_steps": cfg.early_steps,
        "divergence_factor": cfg.divergence_factor, "logit_queries": cfg.logit_queries,
        "checkpoint_every": cfg.checkpoint_every, "max_seconds": cfg.max_seconds,
        "norm": arm.norm, "qk_norm": arm.qk_norm, "layer_scale": arm.layer_scale,
    }  # fmt: skip
    return config.section("experiments.stress_test", params)


# ----------------------------------------------------------------------------------------
# the rules


def final_loss(losses, window: int) -> float:
    """Mean loss of the last ``window`` steps (NaN if any of them is not finite)."""
    tail = list(losses)[-window:]
    if not tail:
        return float("nan")
    return float(sum(tail) / len(tail))


def divergence(loop_reason: str | None, final: float, chance: float) -> str | None:
    """Why a finished run counts as diverged, or None when it is stable.

    ``loop_reason``: the training loop's reason for stopping the run (a non-finite loss or
    gradient norm, or a gradient norm above ``divergence_factor`` x its early median), None if
    it ran to the end; ``final``: its final loss; ``chance``: ``ln(n_genes)``.
    """
    if loop_reason:
        return loop_reason
    if not math.isfinite(final):
        return f"non-finite final loss ({final})"
    if final > chance:
        return f"final loss {final:.4g} above chance {chance:.4g}"
    return None


def learned(final: float, chance: float, fraction: float = 0.7) -> bool:
    """Did the run learn the task: final loss at most ``fraction`` x chance."""
    return math.isfinite(final) and final <= fraction * chance


def largest_stable_lr(stable: dict[float, bool]) -> float | None:
    """The largest learning rate up to which every learning rate was stable (``stable``: lr ->
    all runs at that lr stable); None if the smallest already diverged."""
    best = None
    for lr in sorted(stable):
        if not stable[lr]:
            break
        best = lr
    return best


def boundary_lrs(stable: dict[float, bool]) -> list[float]:
    """The learning rates the further seeds rerun: the largest stable one and the next one up
    (the first to diverge); only the smallest if that diverged, the largest if none did."""
    lrs = sorted(stable)
    best = largest_stable_lr(stable)
    if best is None:
        return lrs[:1]
    above = [lr for lr in lrs if lr > best]
    return [best] + above[:1]


# ----------------------------------------------------------------------------------------
# one run (a job)


def run_dir(root: str | Path, arm: str, lr: float, seed: int) -> Path:
    return Path(root) / arm / f"lr{lr_tag(lr)}" / f"seed{seed}"


#: the training loop's summary keys a run's summary keeps
LOOP_KEYS = ("n_params", "steps", "stop_reason", "divergence_step", "early_median_grad_norm",
             "max_grad_norm", "elapsed_s", "step_ms_mean", "peak_memory_gib",
             "resumed_at_step")  # fmt: skip


def run_job(
    cfg: StabilitySweep,
    arm: SweepArm,
    lr: float,
    seed: int,
    out_dir: str | Path,
    device,
    log=print,
    state_dir: str | Path | None = None,
    should_stop=None,
) -> dict:
    """Train one arm x learning rate x seed; write ``log.csv.gz`` and ``summary.json`` into
    ``out_dir`` when it finishes. Its checkpoint (``state_dir``, default ``out_dir``) lets a
    rerun continue; it is deleted once the run is finished. Returns the run's summary
    (``complete`` false when it stopped early: max_seconds or ``should_stop``)."""
    import pandas as pd

    from .stress_test import RankSequences, run_arm

    out_dir = Path(out_dir)
    state = Path(state_dir or out_dir) / "state.pt"
    state.parent.mkdir(parents=True, exist_ok=True)
    scfg = stress_config(cfg, arm, lr, seed)
    rows, loop = run_arm(
        scfg, arm.attention, device, RankSequences(scfg), log=log, lr=lr, checkpoint=state,
        should_stop=should_stop,
    )  # fmt: skip
    if not loop["complete"]:
        return {**loop, "arm": arm.name, "seed": seed, "complete": False}
    chance = chance_loss(cfg)
    losses = [r["loss"] for r in rows]
    final = final_loss(losses, cfg.final_window)
    reason = divergence(loop["divergence_reason"], final, chance)
    logits = [r["max_attn_logit"] for r in rows if math.isfinite(r["max_attn_logit"])]
    summary = {
        **{k: loop[k] for k in LOOP_KEYS},
        **dataclasses.asdict(arm),
        "arm": arm.name,
        "peak_lr": float(lr),
        "seed": int(seed),
        "complete": True,
        "planned_steps": scfg.max_steps,
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "chance_loss": chance,
        "initial_loss": final_loss(losses[: cfg.early_steps], cfg.early_steps),  # first steps
        "final_loss": final,
        "diverged": reason is not None,
        "divergence_reason": reason,
        "learned": learned(final, chance, cfg.learned_fraction) and reason is None,
        "max_attn_logit": max(logits, default=float("nan")),
        "final_max_attn_logit": logits[-1] if logits else float("nan"),
    }
    frame = pd.DataFrame(rows)
    frame["arm"] = arm.name
    frame.insert(3, "seed", int(seed))
    with atomic_path(out_dir / "log.csv.gz") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g", compression="gzip")
    write_json(out_dir / "summary.json", summary)
    state.unlink(missing_ok=True)
    status = f"diverged ({reason})" if reason else ("learned" if summary["learned"] else "stable")
    log(f"sweep {arm.name} lr={lr:g} seed={seed}: {status}; final loss {final:.4g} "
        f"({final / chance:.0%} of chance) after {len(rows)} steps, {loop['elapsed_s']:.0f}s")  # fmt: skip
    return summary


def read_summary(path: str | Path) -> dict | None:
    """A finished run's summary, None if there is none (not run, or unfinished)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read a run summary ({exc})") from exc
    return summary if summary.get("complete") else None


def planned_runs(cfg: StabilitySweep, boundary: dict[str, list[float]] | None) -> list[tuple]:
    """(arm, lr, seed) of the sweep: every lr with the first seed; with ``boundary`` (arm ->
    its boundary lrs), the other seeds at those."""
    runs = [(a.name, float(lr), cfg.seeds[0]) for a in cfg.arms for lr in cfg.lrs]
    for arm in cfg.arms:
        for lr in (boundary or {}).get(arm.name, []):
            runs += [(arm.name, float(lr), seed) for seed in cfg.seeds[1:]]
    return runs


def arm_stability(summaries: list[dict]) -> dict[float, bool]:
    """lr -> every finished run at that lr stable (one arm's summaries)."""
    stable: dict[float, bool] = {}
    for s in summaries:
        lr = float(s["peak_lr"])
        stable[lr] = stable.get(lr, True) and not s["diverged"]
    return stable


def sweep_boundary(cfg: StabilitySweep, summaries: list[dict]) -> dict[str, list[float]]:
    """arm -> the lrs its further seeds rerun, for arms whose first-seed runs all finished."""
    out = {}
    for arm in cfg.arms:
        first = [s for s in summaries if s["arm"] == arm.name and s["seed"] == cfg.seeds[0]]
        if {lr_tag(s["peak_lr"]) for s in first} >= {lr_tag(lr) for lr in cfg.lrs}:
            out[arm.name] = boundary_lrs(arm_stability(first))
    return out


# ----------------------------------------------------------------------------------------
# tables and figures


def runs_table(summaries: list[dict]):
    import pandas as pd

    columns = ["arm", "attention", "norm", "qk_norm", "layer_scale", "peak_lr", "seed",
               "n_params", "steps", "planned_steps", "stop_reason", "diverged",
               "divergence_reason", "divergence_step", "learned", "initial_loss", "final_loss",
               "chance_loss", "max_grad_norm", "early_median_grad_norm", "max_attn_logit",
               "final_max_attn_logit", "elapsed_s", "step_ms_mean"]  # fmt: skip
    frame = pd.DataFrame([{c: s.get(c) for c in columns} for s in summaries], columns=columns)
    frame["final_loss_vs_chance"] = frame["final_loss"] / frame["chance_loss"]
    return frame.sort_values(["arm", "peak_lr", "seed"], kind="stable").reset_index(drop=True)


def boundary_table(cfg: StabilitySweep, runs) -> object:
    """Per arm: its largest stable learning rate, whether it learned there, and more."""
    import pandas as pd

    rows = []
    for arm in cfg.arms:
        part = runs[runs["arm"] == arm.name]
        stable = arm_stability(part.to_dict("records"))
        best = largest_stable_lr(stable)
        at = part[part["peak_lr"] == best] if best is not None else part.iloc[:0]
        learned_lrs = [
            lr for lr in sorted(stable)
            if stable[lr] and bool(part[part["peak_lr"] == lr]["learned"].all())
        ]  # fmt: skip
        diverged = part[part["diverged"].astype(bool)].sort_values("peak_lr")
        above = [lr for lr in sorted(stable) if best is None or lr > best]
        missing = len(set(map(lr_tag, cfg.lrs)) - set(map(lr_tag, part["peak_lr"])))
        notes = []
        if missing:
            notes.append(f"{missing} learning rate(s) not run yet")
        if any(stable[lr] for lr in above):
            notes.append("stable again above the boundary: " + ", ".join(
                f"{lr:g}" for lr in above if stable[lr]))  # fmt: skip
        rows.append({
            "arm": arm.name, "attention": arm.attention, "norm": arm.norm,
            "qk_norm": arm.qk_norm, "layer_scale": arm.layer_scale,
            "largest_stable_lr": best,
            "seeds_at_largest_stable": len(at),
            "final_loss_at_largest_stable": float(at["final_loss"].mean()) if len(at) else None,
            "learned_at_largest_stable": bool(len(at) and at["learned"].astype(bool).all()),
            "largest_learned_lr": max(learned_lrs) if learned_lrs else None,
            "smallest_diverged_lr": float(diverged["peak_lr"].iloc[0]) if len(diverged) else None,
            "first_divergence_reason": diverged["divergence_reason"].iloc[0] if len(diverged) else "",
            "runs": len(part),
            "notes": "; ".join(notes),
        })  # fmt: skip
    return pd.DataFrame(rows)


def boundary_markdown(cfg: StabilitySweep, table, runs, header: str = "") -> str:
    chance = chance_loss(cfg)

    def fmt(v, spec="g"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [
        "# Stability sweep: largest stable learning rate per arm",
        "",
        header,
        f"Chance = ln({cfg.vocab_size - 3}) = {chance:.3f} nats; learned = final loss <= "
        f"{cfg.learned_fraction:g} x chance = {cfg.learned_fraction * chance:.3f}. Final loss: "
        f"mean of the last {cfg.final_window} steps. Diverged: stopped by the loop (non-finite, "
        f"or gradient norm > {cfg.divergence_factor:g} x early median) or final loss above "
        "chance. Largest stable: every learning rate up to it stable, every seed.",
        "",
        "| arm | largest stable lr | final loss there (x chance) | learned there | "
        "largest lr that learned | first diverged lr | runs | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table.to_dict("records"):
        loss = r["final_loss_at_largest_stable"]
        loss_text = "-" if loss is None else f"{loss:.3f} ({loss / chance:.0%})"
        lines.append(
            f"| {r['arm']} | {fmt(r['largest_stable_lr'])} | {loss_text} | "
            f"{'yes' if r['learned_at_largest_stable'] else 'no'} | "
            f"{fmt(r['largest_learned_lr'])} | {fmt(r['smallest_diverged_lr'])} | {r['runs']} | "
            f"{r['notes']} |"
        )
    lines += ["", "## Every run", "",
              "| arm | lr | seed | steps | final loss (x chance) | status | max logit |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in runs.to_dict("records"):
        status = (
            f"diverged: {r['divergence_reason']}" if r["diverged"]
            else ("learned" if r["learned"] else "stable, not learned")
        )  # fmt: skip
        final = r["final_loss"]
        loss = (
            f"{final:.3f} ({final / chance:.0%})" if math.isfinite(final) and final < 10 * chance
            else "-"
        )  # fmt: skip
        lines.append(
            f"| {r['arm']} | {r['peak_lr']:g} | {r['seed']} | {r['steps']} | {loss} | {status} | "
            f"{r['max_attn_logit']:.3g} |"
        )
    return "\n".join(lines) + "\n"


ARM_STYLES = {"pre": "-", "post": "--"}


def arm_style(arm: SweepArm) -> dict:
    from .figures import METHOD_COLOURS

    return {
        "color": METHOD_COLOURS.get(arm.attention, "k"),
        "ls": ":" if arm.qk_norm else ARM_STYLES.get(arm.norm, "-"),
        "marker": "s" if arm.qk_norm else ("o" if arm.norm == "pre" else "^"),
    }


def plot_lr_sensitivity(cfg: StabilitySweep, runs, title: str = ""):
    """Final loss against peak learning rate per arm; diverged runs as crosses at the top."""
    import numpy as np

    from .figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    chance = chance_loss(cfg)
    top = 1.12 * chance
    for arm in cfg.arms:
        part = runs[runs["arm"] == arm.name]
        if part.empty:
            continue
        style = arm_style(arm)
        stable = part[~part["diverged"].astype(bool)]
        mean = stable.groupby("peak_lr")["final_loss"].mean()
        ax.plot(mean.index, mean.values, color=style["color"], ls=style["ls"], lw=1.4,
                label=arm.name)  # fmt: skip
        ax.plot(stable["peak_lr"], stable["final_loss"], style["marker"], color=style["color"],
                ms=4, alpha=0.7, ls="none")  # fmt: skip
        bad = part[part["diverged"].astype(bool)]
        if len(bad):
            y = np.where(np.isfinite(bad["final_loss"]), np.minimum(bad["final_loss"], top), top)
            ax.plot(bad["peak_lr"], y, "x", color=style["color"], ms=8, mew=2, ls="none")
    ax.axhline(chance, color="0.4", lw=0.8, ls="--")
    ax.axhline(cfg.learned_fraction * chance, color="0.4", lw=0.8, ls=":")
    ax.text(min(cfg.lrs), chance, " chance", va="bottom", fontsize=8, color="0.3")
    ax.text(min(cfg.lrs), cfg.learned_fraction * chance, f" {cfg.learned_fraction:g} x chance",
            va="bottom", fontsize=8, color="0.3")  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(0, top * 1.03)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"final loss (nats, mean of last {cfg.final_window} steps)")
    ax.plot([], [], "x", color="k", ms=8, mew=2, label="diverged (drawn at its loss, capped)")
    ax.legend(fontsize=8, frameon=False, loc="lower left")
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.set_title(title or "Learning-rate sensitivity", fontsize=10)
    fig.tight_layout()
    return fig


def plot_logit_growth(cfg: StabilitySweep, logs, runs, title: str = ""):
    """Per arm (columns): the largest attention logit over layers against step, one line per
    learning rate (first seed); below, the smallest layer's attention entropy (softmax) or
    the largest layer's mean row sum (sigmoid)."""
    import numpy as np

    from .figures import pyplot

    plt = pyplot()
    arms = [a for a in cfg.arms if a.name in set(logs["arm"])] or cfg.arms[:1]
    fig, axes = plt.subplots(2, len(arms), figsize=(3.4 * len(arms), 6.0), squeeze=False)
    cmap = plt.get_cmap("viridis")
    lrs = sorted(cfg.lrs)
    first = logs[logs["seed"] == cfg.seeds[0]] if "seed" in logs.columns else logs
    for j, arm in enumerate(arms):
        part = first[first["arm"] == arm.name]
        for lr, run in part.groupby("peak_lr"):
            colour = cmap(lrs.index(lr) / max(1, len(lrs) - 1)) if lr in lrs else "k"
            logit = run["max_attn_logit"].where(lambda v: v > 0)
            axes[0][j].plot(run["step"], logit, color=colour, lw=1, label=f"{lr:g}")
            stem = "attn_entropy" if arm.attention == "softmax" else "attn_row_sum"
            cols = [c for c in run.columns if c.startswith(f"{stem}_layer")]
            if cols:
                values = run[cols].to_numpy(dtype=float)
                with np.errstate(all="ignore"):
                    stat = np.nanmin(values, 1) if stem == "attn_entropy" else np.nanmax(values, 1)
                axes[1][j].plot(run["step"], stat, color=colour, lw=1)
            info = runs[(runs["arm"] == arm.name) & (runs["peak_lr"] == lr)
                        & (runs["seed"] == cfg.seeds[0])]  # fmt: skip
            if len(info) and bool(info["diverged"].iloc[0]):
                axes[0][j].plot(run["step"].iloc[-1:], logit.iloc[-1:], "x", color=colour, ms=7)
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(arm.name, fontsize=9)
        axes[1][j].set_xlabel("optimiser step")
        axes[0][j].grid(alpha=0.3, which="both", lw=0.4)
        axes[1][j].grid(alpha=0.3, lw=0.4)
        axes[1][j].set_ylabel(
            "min over layers: attention entropy (nats)" if arm.attention == "softmax"
            else "max over layers: mean row sum"
        )  # fmt: skip
    axes[0][0].set_ylabel("max |attention logit| over layers")
    axes[0][-1].legend(title="peak lr", fontsize=7, title_fontsize=7, frameon=False)
    fig.suptitle(title or "Attention-logit growth", fontsize=10)
    fig.tight_layout()
    return fig


def collect(paths) -> tuple[list[dict], object]:
    """Finished runs' summaries and their logs (one frame) from ``summary.json`` paths."""
    import pandas as pd

    summaries, logs = [], []
    for path in paths:
        summary = read_summary(path)
        if summary is None:
            continue
        summaries.append(summary)
        log_path = Path(path).with_name("log.csv.gz")
        try:
            logs.append(pd.read_csv(log_path))
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"{log_path}: cannot read a run log ({exc})") from exc
    return summaries, (pd.concat(logs, ignore_index=True) if logs else pd.DataFrame())


def summarize(cfg: StabilitySweep, summary_paths, outputs: dict, header: str = "") -> object:
    """Write the tables and figures named in ``outputs`` (keys: runs_csv, boundary_csv,
    boundary_md, lr_png, lr_pdf, logits_png, logits_pdf; any may be None); returns the
    boundary table."""
    from .figures import save_figure

    summaries, logs = collect(summary_paths)
    if not summaries:
        raise DataError("stability sweep: no finished run to summarise")
    runs = runs_table(summaries)
    table = boundary_table(cfg, runs)
    sizes = sorted({f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}" for n in runs["n_params"]})
    title = (
        f"{'/'.join(sizes)} parameters, {cfg.seq_len} tokens x "
        f"{cfg.batch_size}, {cfg.warmup_steps} + {cfg.steps} steps, no clipping"
    )
    if outputs.get("runs_csv"):
        write_csv(outputs["runs_csv"], runs)
    if outputs.get("boundary_csv"):
        write_csv(outputs["boundary_csv"], table)
    if outputs.get("boundary_md"):
        write_text(outputs["boundary_md"], boundary_markdown(cfg, table, runs, header))
    if outputs.get("lr_png"):
        fig = plot_lr_sensitivity(cfg, runs, f"Learning-rate sensitivity: {title}")
        _save(fig, outputs["lr_png"], outputs.get("lr_pdf"), save_figure)
    if outputs.get("logits_png"):
        fig = plot_logit_growth(cfg, logs, runs, f"Attention logits: {title}")
        _save(fig, outputs["logits_png"], outputs.get("logits_pdf"), save_figure)
    return table


def _save(fig, png, pdf, save_figure) -> None:
    if pdf:
        save_figure(fig, png, pdf)
        return
    from .figures import pyplot

    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    pyplot().close(fig)


# ----------------------------------------------------------------------------------------
# the GPU driver: the whole sweep, several runs at a time on one device


def _worker(params: dict, device_name: str, jobs, results, runs_dir: str, state_dir: str,
            deadline: float, index: int) -> None:  # fmt: skip
    """A process that runs jobs until it gets None; it starts no run it cannot finish before
    ``deadline`` (estimated from its last run) and stops a run there (checkpointed)."""
    import torch

    from .runtime import resolve_device

    torch.set_num_threads(1)
    device = resolve_device(device_name)
    cfg = sweep_config(params)
    log_path = Path(state_dir) / f"worker{index}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    job_name = ""

    def log(message: str) -> None:
        with open(log_path, "a") as fh:
            fh.write(f"[{time.strftime('%H:%M:%S')}] {job_name}{message}\n")

    def should_stop() -> bool:
        return time.time() > deadline

    step_s = None  # seconds a step took in this worker's last finished run
    while True:
        job = jobs.get()
        if job is None:
            break
        name, lr, seed = job
        job_name = f"[{name} lr={lr:g} seed={seed}] "
        planned = cfg.warmup_steps + cfg.steps
        late = time.time() > deadline  # nothing to train: no model, no checkpoint
        if late or (step_s is not None and time.time() + 1.1 * step_s * planned > deadline):
            results.put(("skipped", job, None))
            continue
        try:
            summary = run_job(
                cfg, arm_named(cfg, name), lr, seed, run_dir(runs_dir, name, lr, seed), device, log,
                state_dir=run_dir(state_dir, name, lr, seed), should_stop=should_stop,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 (report it, keep the worker for other jobs)
            log(f"{job}: failed: {type(exc).__name__}: {exc}")
            results.put(("failed", job, f"{type(exc).__name__}: {exc}"))
            continue
        if summary.get("complete") and summary.get("steps") and not summary.get("diverged"):
            step_s = summary["elapsed_s"] / summary["steps"]
        results.put(("done" if summary.get("complete") else "paused", job, summary))


def run_gpu_sweep(cfg: StabilitySweep, params: dict, runs_dir: Path, state_dir: Path,
                  budget_s: float, workers: int, device_name: str, log=print) -> dict:  # fmt: skip
    """Every run of the sweep not finished in ``runs_dir`` yet, ``workers`` at a time, the
    further seeds as soon as an arm's first-seed runs are all done; returns counts."""
    import multiprocessing as mp

    deadline = time.time() + budget_s
    runs_dir.mkdir(parents=True, exist_ok=True)

    def finished() -> list[dict]:
        return [s for s in (read_summary(p) for p in runs_dir.glob("*/*/*/summary.json")) if s]

    done = {(s["arm"], lr_tag(s["peak_lr"]), s["seed"]) for s in finished()}
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    queued: set = set()
    outstanding = 0

    def enqueue(runs) -> None:
        nonlocal outstanding
        for arm, lr, seed in runs:
            key = (arm, lr_tag(lr), seed)
            if key in done or key in queued:
                continue
            queued.add(key)
            jobs.put((arm, lr, seed))
            outstanding += 1

    # first seed, arm by arm, highest learning rate first (divergent runs end early)
    first = [(a.name, float(lr), cfg.seeds[0]) for a in cfg.arms
             for lr in sorted(cfg.lrs, reverse=True)]  # fmt: skip
    enqueue(first)
    enqueue(planned_runs(cfg, sweep_boundary(cfg, finished())))
    log(f"sweep: {len(done)} runs finished earlier, {outstanding} to run, {workers} workers, "
        f"budget {budget_s:.0f}s")  # fmt: skip
    procs = [
        ctx.Process(target=_worker, args=(params, device_name, jobs, results, str(runs_dir),
                                          str(state_dir), deadline, i))
        for i in range(max(1, workers) if outstanding else 0)
    ]  # fmt: skip
    for p in procs:
        p.start()
    counts = {"done": 0, "paused": 0, "skipped": 0, "failed": 0}
    while outstanding:
        try:
            status, job, info = results.get(timeout=5.0)
        except queue.Empty:
            # a worker stops its run within a step of the deadline and checkpoints it
            if time.time() > deadline + 30 or not any(p.is_alive() for p in procs):
                log("sweep: workers did not report in time; stopping them")
                break
            continue
        outstanding -= 1
        counts[status] += 1
        if status == "done":
            done.add((job[0], lr_tag(job[1]), job[2]))
            log(f"sweep: done {job[0]} lr={job[1]:g} seed={job[2]}: "
                f"{'diverged' if info['diverged'] else 'stable'}, final loss "
                f"{info['final_loss']:.4g}, {info['steps']} steps, {info['elapsed_s']:.0f}s")  # fmt: skip
            enqueue(planned_runs(cfg, sweep_boundary(cfg, finished())))
        else:
            log(f"sweep: {status} {job[0]} lr={job[1]:g} seed={job[2]}"
                + (f": {info}" if status == "failed" else ""))  # fmt: skip
    for _ in procs:
        jobs.put(None)
    for p in procs:
        p.join(timeout=max(5.0, deadline + 20 - time.time()))
        if p.is_alive():
            p.terminate()
            p.join(timeout=10)
    for path in sorted(Path(state_dir).glob("worker*.log")):  # the workers' logs, into ours
        log(f"--- {path.name}\n" + path.read_text().rstrip())
        path.unlink()
    planned = len(planned_runs(cfg, sweep_boundary(cfg, finished())))
    counts["finished_total"] = len(finished())
    counts["planned_total"] = planned
    return counts


def _gpu(args: argparse.Namespace) -> None:
    params = parse_json_arg(args.params_json, "--params-json")
    cfg = sweep_config(params)
    out = Path(args.out)
    runs_dir = Path(args.runs_dir or out / "runs")
    state_dir = Path(args.state_dir or runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log_file = out / "stability_sweep.log"

    def log(message: str) -> None:
        line = f"[+{time.time() - t0:.0f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        with open(log_file, "a") as fh:
            fh.write(line + "\n")

    # leave time for the tables, figures and the tarball
    counts = run_gpu_sweep(cfg, params, runs_dir, state_dir, max(1.0, args.budget_s - 45),
                           args.workers, args.device, log)  # fmt: skip
    complete = counts["finished_total"] == counts["planned_total"]
    log(f"sweep: {counts}; {'complete' if complete else 'INCOMPLETE: run the command again'}")
    header = (
        f"{'Complete' if complete else 'Incomplete'}: {counts['finished_total']} of "
        f"{counts['planned_total']} planned runs finished.\n"
    )
    paths = sorted(runs_dir.glob("*/*/*/summary.json"))
    if any(read_summary(p) for p in paths):
        summarize(cfg, paths, {
            "runs_csv": out / "stability_runs.csv", "boundary_csv": out / "stability_boundary.csv",
            "boundary_md": out / "stability_boundary.md", "lr_png": out / "stability_lr.png",
            "logits_png": out / "stability_logits.png",
        }, header)  # fmt: skip
    with atomic_path(out / "stability_runs.tar.gz") as tmp:  # the finished runs, to continue later
        with tarfile.open(tmp, "w:gz") as tar:
            for path in paths:
                if read_summary(path):
                    for f in (path, path.with_name("log.csv.gz")):
                        tar.add(f, arcname=str(f.relative_to(runs_dir.parent)))
    log(f"sweep: wrote {out}")


# ----------------------------------------------------------------------------------------
# CLI


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> None:
    from .runtime import resolve_device, set_threads
    from .stress_test import stop_on_signals

    if not args.lr > 0 or args.seed < 0:
        raise ConfigError(f"--lr must be > 0 and --seed >= 0; got {args.lr:g} and {args.seed}")
    # the run's own learning rate and seed stand in for the section's lists (a job gets the
    # section without them, so that adding a learning rate or a seed reruns no finished job)
    params = parse_json_arg(args.params_json, "--params-json")
    cfg = sweep_config({**params, "lrs": [args.lr], "seeds": [args.seed]})
    arm = arm_named(cfg, args.arm)
    device = resolve_device(args.device)
    set_threads()
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    with stop_on_signals() as request:
        summary = run_job(
            cfg, arm, args.lr, args.seed, args.out_dir, device, _log,
            should_stop=lambda: request() or (deadline is not None and time.monotonic() > deadline),
        )  # fmt: skip
    if not summary["complete"]:
        raise DataError(
            f"run {arm.name} lr={args.lr:g} seed={args.seed} stopped early "
            f"({summary['stop_reason']}) after {summary['steps']} steps; checkpointed: run the "
            "same command again to continue"
        )


def _boundary(args: argparse.Namespace) -> None:
    cfg = sweep_config(parse_json_arg(args.params_json, "--params-json"))
    summaries = [s for s in (read_summary(p) for p in args.summaries) if s]
    boundary = sweep_boundary(cfg, summaries)
    missing = [a.name for a in cfg.arms if a.name not in boundary]
    if missing:
        raise DataError(f"stability sweep: first-seed runs missing for arm(s) {', '.join(missing)}")
    write_json(args.out, {"boundary_lrs": boundary, "seeds": cfg.seeds[1:]})
    for arm, lrs in boundary.items():
        _log(f"sweep boundary {arm}: further seeds at lr {', '.join(f'{lr:g}' for lr in lrs)}")


def _summarize(args: argparse.Namespace) -> None:
    cfg = sweep_config(parse_json_arg(args.params_json, "--params-json"))
    outputs = {k: getattr(args, k) for k in ("runs_csv", "boundary_csv", "boundary_md",
                                             "lr_png", "lr_pdf", "logits_png", "logits_pdf")}  # fmt: skip
    table = summarize(cfg, args.summaries, outputs)
    for r in table.to_dict("records"):
        _log(f"sweep {r['arm']}: largest stable lr {r['largest_stable_lr']}, learned there: "
             f"{r['learned_at_largest_stable']}")  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "stability-sweep",
        help="claim c as a learning-rate sweep: final loss vs lr per arm, divergences marked",
        description=__doc__.splitlines()[0],
    )
    sub = p.add_subparsers(dest="sweep_command", required=True)
    q = sub.add_parser("run", help="one arm x learning rate x seed")
    q.add_argument("--params-json", default="{}", help="the experiments.stability_sweep section")
    q.add_argument("--arm", required=True)
    q.add_argument("--lr", type=float, required=True)
    q.add_argument("--seed", type=int, required=True)
    q.add_argument("--out-dir", required=True, help="log.csv.gz, summary.json (and state.pt)")
    q.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    q.add_argument("--budget-s", type=float, default=None,
                   help="stop (checkpointed) after this many seconds; a rerun continues")  # fmt: skip
    q.set_defaults(func=_run)
    q = sub.add_parser("boundary", help="the learning rates the further seeds rerun")
    q.add_argument("--params-json", default="{}")
    q.add_argument("--out", required=True, help="JSON: arm -> learning rates")
    q.add_argument("summaries", nargs="+", help="the first seed's summary.json files")
    q.set_defaults(func=_boundary)
    q = sub.add_parser("summarize", help="tables and figures from finished runs")
    q.add_argument("--params-json", default="{}")
    for name in ("runs-csv", "boundary-csv", "boundary-md", "lr-png", "lr-pdf", "logits-png",
                 "logits-pdf"):  # fmt: skip
        q.add_argument(f"--{name}", default=None)
    q.add_argument("summaries", nargs="+", help="summary.json files of the runs")
    q.set_defaults(func=_summarize)
    q = sub.add_parser(
        "gpu", help="the whole sweep on one device, several runs at a time, within a budget",
        description="Runs every unfinished run of the sweep (runs finished in --runs-dir are "
        "kept), the further seeds once an arm's first-seed runs are done; writes tables, "
        "figures and a tarball of the finished runs into --out. Run it again to continue.",
    )  # fmt: skip
    q.add_argument("--params-json", default="{}")
    q.add_argument("--out", required=True)
    q.add_argument("--runs-dir", default=None, help="finished runs (default: OUT/runs)")
    q.add_argument("--state-dir", default=None, help="checkpoints (default: the runs' folders)")
    q.add_argument("--budget-s", type=float, default=420.0, help="seconds for this call, all in")
    q.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    q.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    q.set_defaults(func=_gpu)
