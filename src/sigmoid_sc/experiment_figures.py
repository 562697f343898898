"""Figures and tables of the paper's experiments (claims c, d, e): stress test, Jacobian, kernel.

The stages draw their figures with these functions (:mod:`sigmoid_sc.stress_test`,
:mod:`sigmoid_sc.jacobian`, :mod:`sigmoid_sc.kernel_benchmark`).
``sigmoid-sc experiment-figures stress|kernel``: re-render a figure from an existing log/CSV
(e.g. ``bench/results/*.csv`` committed by a GPU run), no GPU needed.

The figures are headless (matplotlib's Agg backend), PNG (150 dpi) and PDF, written atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ATTENTIONS
from .errors import DataError
from .figures import METHOD_COLOURS, pyplot, save_figure
from .io import write_csv, write_text

#: the paper's forward TFLOPS on an H100 (claim e), drawn as reference marks
PAPER_H100_FWD_TFLOPS = {"TritonSigmoid (paper)": 515, "FlashSigmoid": 440, "FlashAttention-2": 361}

#: bench/kernel.py implementation names -> legend labels and colours
KERNEL_IMPLS = {
    "ours": ("ours (Triton sigmoid)", "#d62728"),
    "triton_sigmoid": ("triton-sigmoid 0.1.2 (paper)", "#ff7f0e"),
    "sdpa_cudnn": ("SDPA cuDNN (softmax)", "#1f77b4"),
    "sdpa_flash": ("SDPA flash (softmax, FA2-class)", "#17becf"),
    "sdpa_efficient": ("SDPA efficient (softmax)", "#9467bd"),
    "naive": ("naive torch sigmoid", "#7f7f7f"),
    "njt_flash": ("NJT flash (softmax varlen)", "#17becf"),
    "njt_efficient": ("NJT efficient (softmax varlen)", "#9467bd"),
    "flex_docmask": ("FlexAttention doc mask (softmax)", "#2ca02c"),
}
KERNEL_COLUMNS = ("case", "hd", "impl", "fwd_tflops", "bwd_tflops", "fwdbwd_tflops")


def note_figure(title: str, text: str):
    """A figure that only says why there is nothing to plot (a skipped GPU experiment)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 2.4))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
# stress test (claim c)


def plot_stress(log: pd.DataFrame, summary: dict | None = None):
    """Gradient norm, loss and maximum attention logit against step, softmax vs sigmoid.

    ``log``: the stress test's CSV (attention, step, loss, grad_norm, max_attn_logit).
    Log-scale y axes; a cross marks an arm's divergence, a dotted line its divergence
    threshold (factor x early median gradient norm).
    """
    missing = [c for c in ("attention", "step", "loss", "grad_norm") if c not in log.columns]
    if missing:
        raise DataError(f"stress-test log lacks column(s) {', '.join(missing)}")
    plt = pyplot()
    panels = [("grad_norm", "global gradient norm"), ("loss", "masked-gene loss (nats)")]
    if "max_attn_logit" in log.columns and log["max_attn_logit"].notna().any():
        panels.append(("max_attn_logit", "max |attention logit|"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    arms = (summary or {}).get("arms", {})
    factor = (summary or {}).get("config", {}).get("divergence_factor")
    # one line per arm: colour = attention kind, line style = peak learning rate (a sweep)
    arm_column = "arm" if "arm" in log.columns else "attention"
    lrs = sorted(log["peak_lr"].unique()) if "peak_lr" in log.columns else []
    styles = ("-", "--", ":", "-.")
    for ax, (column, label) in zip(axes[0], panels):
        for name, arm_log in log.groupby(arm_column, sort=False):
            attention = arm_log["attention"].iloc[0]
            colour = METHOD_COLOURS.get(attention, "k")
            style = styles[lrs.index(arm_log["peak_lr"].iloc[0]) % len(styles)] if lrs else "-"
            arm = arms.get(name, {})
            values = arm_log[column].astype(float).where(lambda v: v > 0)  # log scale: > 0 only
            tag = (
                f" (diverged, step {arm['divergence_step']})"
                if arm.get("diverged")
                else (" (stable)" if arm else "")
            )
            ax.plot(arm_log["step"], values, color=colour, ls=style, lw=1.2, label=f"{name}{tag}")
            if arm.get("diverged"):
                last = arm_log[arm_log["step"] == arm["divergence_step"]]
                finite = np.isfinite(last[column].astype(float)) & (last[column] > 0)
                y = last[column][finite] if finite.any() else values.dropna().tail(1)
                ax.plot(last["step"].iloc[:1], y.iloc[:1], "x", color=colour, ms=9, mew=2)
            if column == "grad_norm" and factor and arm.get("early_median_grad_norm"):
                threshold = factor * arm["early_median_grad_norm"]
                if math.isfinite(threshold):
                    ax.axhline(threshold, color=colour, ls=":", lw=0.6, alpha=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    axes[0][0].legend(fontsize=8, frameon=False)
    if summary:
        cfg = summary.get("config", {})
        fig.suptitle(
            f"Stress test: {summary.get('n_params', 0):,} parameters, "
            f"{cfg.get('seq_len')}-token sequences x {cfg.get('batch_size')}, lr {cfg.get('lr')}, "
            f"no gradient clipping ({summary.get('device', '')})",
            fontsize=10,
        )
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# kernel benchmark (claim e)


def read_kernel_csv(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """bench/kernel.py's CSV: an optional ``# key=value, ...`` header line, then the rows.

    Returns (rows with numeric TFLOPS columns, header dict such as date, gpu, torch, triton).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"kernel benchmark CSV {path}: cannot read ({exc})") from exc
    header = {}
    lines = text.splitlines()
    if lines and lines[0].startswith("#"):
        for part in lines[0].lstrip("# ").split(", "):
            key, _, value = part.partition("=")
            if key:
                header[key.strip()] = value.strip()
        lines = lines[1:]
    try:
        frame = pd.read_csv(io.StringIO("\n".join(lines)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"kernel benchmark CSV {path}: cannot parse ({exc})") from exc
    missing = [c for c in KERNEL_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"kernel benchmark CSV {path}: lacks column(s) {', '.join(missing)}")
    for column in ("fwd_tflops", "bwd_tflops", "fwdbwd_tflops"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame, header


def _dense_n(case: str) -> int | None:
    match = re.match(r"dense N=(\d+)", str(case))
    return int(match.group(1)) if match else None


def plot_kernel(frame: pd.DataFrame, header: dict | None = None, source: str = ""):
    """TFLOPS against sequence length (dense rows), forward and backward, one row per head dim;
    a third column: forward+backward on real cell lengths (variable-length rows).

    The paper's H100 forward numbers (515 TritonSigmoid, 440 FlashSigmoid, 361 FA2) are
    horizontal reference marks on the forward panels.
    """
    plt = pyplot()
    frame = frame.copy()
    frame["N"] = frame["case"].map(_dense_n)
    head_dims = sorted(int(h) for h in frame["hd"].unique())
    varlen = frame[frame["N"].isna()]
    ncols = 3 if not varlen.empty else 2
    fig, axes = plt.subplots(
        len(head_dims), ncols, figsize=(4.8 * ncols, 3.6 * len(head_dims)), squeeze=False
    )
    for row, hd in enumerate(head_dims):
        dense = frame[(frame["hd"] == hd) & frame["N"].notna()]
        for col, (column, stage) in enumerate(
            (("fwd_tflops", "forward"), ("bwd_tflops", "backward"))
        ):
            ax = axes[row][col]
            for impl, label_colour in KERNEL_IMPLS.items():
                part = dense[(dense["impl"] == impl) & dense[column].notna()].sort_values("N")
                if part.empty:
                    continue
                label, colour = label_colour
                ax.plot(part["N"], part[column], "o-", color=colour, label=label, ms=4,
                        lw=2.0 if impl == "ours" else 1.2)  # fmt: skip
            if column == "fwd_tflops":
                for (name, value), style in zip(PAPER_H100_FWD_TFLOPS.items(), ("--", "-.", ":")):
                    ax.axhline(value, color="k", ls=style, lw=0.8, alpha=0.7)
                    ax.annotate(f"{name}, H100: {value}", (0.01, value), xycoords=("axes fraction", "data"),
                                fontsize=6.5, va="bottom")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length N (16K tokens per batch)")
            ax.set_ylabel("TFLOPS")
            ax.set_title(f"{stage}, head dim {hd}", fontsize=10)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3, lw=0.4)
        if ncols == 3:
            ax = axes[row][2]
            part = varlen[varlen["hd"] == hd]
            cases = list(dict.fromkeys(part["case"]))
            impls = [i for i in KERNEL_IMPLS if i in set(part["impl"])]
            width = 0.8 / max(1, len(impls))
            for j, impl in enumerate(impls):
                values = [
                    part[(part["case"] == c) & (part["impl"] == impl)]["fwdbwd_tflops"].max()
                    for c in cases
                ]
                label, colour = KERNEL_IMPLS[impl]
                ax.bar(np.arange(len(cases)) + j * width, values, width, color=colour, label=label)
            ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
            ax.set_xticklabels([c.split(" (")[0] for c in cases], fontsize=8)
            ax.set_ylabel("TFLOPS (forward+backward)")
            ax.set_title(f"real cell lengths, head dim {hd}", fontsize=10)
            ax.grid(alpha=0.3, lw=0.4, axis="y")
            ax.legend(fontsize=6.5, frameon=False)
    axes[0][0].legend(fontsize=6.5, frameon=False, loc="lower right")
    header = header or {}
    title = "Sigmoid-attention kernel, bf16, non-causal"
    if header:
        title += f": {header.get('gpu', '?')}, torch {header.get('torch', '?')}, "
        title += f"triton {header.get('triton', '?')}, {header.get('date', '')}"
    if source:
        title += f"\n{source}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def kernel_markdown(frame: pd.DataFrame, header: dict, source: str = "") -> str:
    """A markdown table: TFLOPS forward / backward / forward+backward per case, head dim, impl."""

    def fmt(x) -> str:
        return "-" if pd.isna(x) else f"{x:.0f}"

    lines = ["# Attention kernel benchmark", ""]
    if header:
        lines += [", ".join(f"{k}: {v}" for k, v in header.items()), ""]
    if source:
        lines += [source, ""]
    lines += [
        "TFLOPS forward / backward / forward+backward (bf16, non-causal; FLOPs 4*H*D*sum(n_i^2) "
        "forward, backward 2.5x). The paper's H100 forward marks: TritonSigmoid 515, "
        "FlashSigmoid 440, FlashAttention-2 361.",
        "",
        "| case | head dim | implementation | fwd | bwd | fwd+bwd | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in frame.iterrows():
        note = r.get("note", "")
        note = "" if pd.isna(note) else str(note)
        lines.append(
            f"| {r['case']} | {r['hd']} | {r['impl']} | {fmt(r['fwd_tflops'])} | "
            f"{fmt(r['bwd_tflops'])} | {fmt(r['fwdbwd_tflops'])} | {note} |"
        )
    return "\n".join(lines) + "\n"


def render_kernel(csv_path, png, pdf, table_csv, table_md, source: str = "") -> None:
    """Figure and tables from one bench/kernel.py CSV."""
    frame, header = read_kernel_csv(csv_path)
    out = frame.copy()
    for key in ("date", "gpu", "torch", "triton", "triton_sigmoid"):
        out[key] = header.get(key, "")
    out["source"] = source or str(csv_path)
    write_csv(table_csv, out)
    write_text(table_md, kernel_markdown(frame, header, source))
    save_figure(plot_kernel(frame, header, source), png, pdf)


def write_skipped(what: str, reason: str, png, pdf, table_csv, table_md) -> None:
    """A GPU experiment that could not run here: a note table and a note figure, not a failure."""
    write_csv(table_csv, pd.DataFrame([{"status": "skipped", "reason": reason}]))
    write_text(table_md, f"# {what}\n\nSkipped: {reason}\n")
    save_figure(note_figure(what, f"skipped: {reason}"), png, pdf)


# --------------------------------------------------------------------------------------------
# CLI


def _render_stress(args: argparse.Namespace) -> None:
    try:
        log = pd.read_csv(args.log_csv)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{args.log_csv}: cannot read ({exc})") from exc
    summary = json.loads(Path(args.summary).read_text()) if args.summary else None
    save_figure(plot_stress(log, summary), args.png, args.pdf)


def _render_kernel(args: argparse.Namespace) -> None:
    render_kernel(
        args.csv, args.png, args.pdf, args.table_csv, args.table_md, source=f"from {args.csv}"
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment-figures", help="re-render an experiment's figure from its saved results"
    )
    kinds = p.add_subparsers(dest="figure", required=True)
    q = kinds.add_parser("stress", help="stress-test curves from its CSV log (+ JSON summary)")
    q.add_argument("--log-csv", required=True)
    q.add_argument("--summary", default=None)
    q.add_argument("--png", required=True)
    q.add_argument("--pdf", required=True)
    q.set_defaults(func=_render_stress)
    q = kinds.add_parser("kernel", help="kernel TFLOPS figure and tables from a bench CSV")
    q.add_argument("--csv", required=True, help="bench/kernel.py's CSV (e.g. bench/results/*.csv)")
    for name in ("png", "pdf", "table-csv", "table-md"):
        q.add_argument(f"--{name}", required=True)
    q.set_defaults(func=_render_kernel)


# --------------------------------------------------------------------------------------------
# Jacobian analysis (claim d)


def plot_jacobian(result: dict):
    """Four views of ``dp/ds`` in trained models (the output of ``jacobian_analysis``).

    (a) histogram of sigmoid's elementwise derivative ``sigma'(s + b)`` over every logit, with
    the 0.25 bound; (b) per-row maximum ``|dp/ds|`` per layer, softmax vs sigmoid (violins);
    (c) off-diagonal share of the Jacobian per layer (L1: 1/2 for softmax by identity, 0 for
    sigmoid; Frobenius as dots); (d, e) ``|dp/ds|`` of one query row of the last layer, first
    keys: dense for softmax, diagonal for sigmoid.
    """
    plt = pyplot()
    table = result["table"]
    per = result["per_attention"]
    fig = plt.figure(figsize=(15, 7.2))
    grid = fig.add_gridspec(2, 6, height_ratios=[1, 1])
    ax_hist = fig.add_subplot(grid[0, 0:2])
    ax_violin = fig.add_subplot(grid[0, 2:4])
    ax_off = fig.add_subplot(grid[0, 4:6])

    sig = per.get("sigmoid")
    bound = result["sigmoid_bound"]
    if sig is not None and sig["hist"] is not None:
        edges = np.linspace(0, bound, len(sig["hist"]) + 1)
        ax_hist.bar(edges[:-1], sig["hist"], width=np.diff(edges), align="edge",
                    color=METHOD_COLOURS["sigmoid"], alpha=0.8)  # fmt: skip
        ax_hist.axvline(bound, color="k", ls="--", lw=1)
        ax_hist.annotate("bound 1/4", (bound, 0.95), xycoords=("data", "axes fraction"),
                         ha="right", fontsize=8)  # fmt: skip
        ax_hist.set_yscale("log")
        ax_hist.set_xlim(0, bound * 1.06)
    ax_hist.set_xlabel("sigmoid derivative sigma'(s + b), every logit")
    ax_hist.set_ylabel("count")
    ax_hist.set_title("(a) sigmoid: elementwise derivative", fontsize=10)

    attentions = [a for a in ATTENTIONS if a in per]
    layers = sorted(next(iter(per.values()))["row_max_by_layer"]) if per else []
    width = 0.8 / max(1, len(attentions))
    for j, attention in enumerate(attentions):
        data = [np.clip(per[attention]["row_max_by_layer"][layer], 1e-12, None) for layer in layers]
        positions = np.arange(len(layers)) + (j - (len(attentions) - 1) / 2) * width
        parts = ax_violin.violinplot(data, positions=positions, widths=width * 0.9,
                                     showmedians=True, showextrema=True)  # fmt: skip
        for body in parts["bodies"]:
            body.set_facecolor(METHOD_COLOURS[attention])
            body.set_alpha(0.5)
        for key in ("cmedians", "cmaxes", "cmins", "cbars"):
            if key in parts:
                parts[key].set_color(METHOD_COLOURS[attention])
        ax_violin.plot([], [], color=METHOD_COLOURS[attention], lw=6, alpha=0.5, label=attention)
    ax_violin.axhline(0.25, color="k", ls="--", lw=1)
    ax_violin.set_yscale("log")
    ax_violin.set_xticks(np.arange(len(layers)))
    ax_violin.set_xticklabels([str(layer) for layer in layers])
    ax_violin.set_xlabel("layer")
    ax_violin.set_ylabel("per-row max |dp/ds|")
    ax_violin.set_title("(b) largest Jacobian entry per query row", fontsize=10)
    ax_violin.legend(fontsize=8, frameon=False)

    for j, attention in enumerate(attentions):
        part = table[table["attention"] == attention].groupby("layer")
        l1 = part["offdiag_l1_share_mean"].mean()
        frob = part["offdiag_frob_share_mean"].mean()
        x = np.arange(len(l1)) + (j - (len(attentions) - 1) / 2) * width
        ax_off.bar(x, l1.fillna(0).to_numpy(), width * 0.9, color=METHOD_COLOURS[attention],
                   alpha=0.6, label=f"{attention}: L1 share")  # fmt: skip
        ax_off.plot(x, frob.fillna(0).to_numpy(), "o", color=METHOD_COLOURS[attention],
                    mec="k", label=f"{attention}: Frobenius share")  # fmt: skip
    ax_off.set_ylim(0, 1)
    ax_off.set_xticks(np.arange(len(layers)))
    ax_off.set_xticklabels([str(layer) for layer in layers])
    ax_off.set_xlabel("layer")
    ax_off.set_ylabel("off-diagonal share of |dp/ds|")
    ax_off.set_title("(c) off-diagonal Jacobian mass", fontsize=10)
    # the L1 bar is 1/2 for any softmax row by construction, and the Frobenius shares of
    # long rows sit near 0 on this axis: say both in numbers
    frob = table.groupby("attention")["offdiag_frob_share_mean"].agg(["min", "max"])
    lines = ["softmax L1 share: 1/2 for any row (rows sum to 0)"] + [
        f"{attention} Frobenius share {lo:.3g}-{hi:.3g}"
        for attention, (lo, hi) in frob.iterrows()
        if np.isfinite(lo)
    ]
    ax_off.text(0.02, 0.72, "\n".join(lines), transform=ax_off.transAxes, fontsize=7, va="top")
    ax_off.legend(fontsize=7, frameon=False, loc="upper right")

    for j, attention in enumerate(attentions):
        ax = fig.add_subplot(grid[1, 3 * j : 3 * j + 3])
        example = per[attention]["example"]
        if example is not None:
            from matplotlib.colors import LogNorm

            # log colour scale, so softmax's small off-diagonal entries show; exact zeros
            # (sigmoid's off-diagonal) are masked and drawn white
            positive = example[example > 0]
            vmax = float(positive.max()) if positive.size else 1.0
            norm = LogNorm(vmin=max(vmax * 1e-6, float(positive.min()) if positive.size else 1e-12),
                           vmax=vmax)  # fmt: skip
            image = ax.imshow(np.ma.masked_equal(example, 0.0), cmap="viridis", norm=norm)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="|dp_j/ds_l| (white: 0)")
        ax.set_xlabel("logit s_l (key)")
        ax.set_ylabel("weight p_j (key)")
        ax.set_title(f"({'de'[j]}) {attention}: |dp/ds| of one query row, last layer", fontsize=10)
    errors = table["autograd_max_abs_err"].dropna()
    note = (
        f"autograd check (float64, {int(table['autograd_rows'].sum())} rows): max |analytic - "
        f"autograd| = {errors.max():.1e}"
        if not errors.empty
        else "no autograd check"
    )
    fig.text(0.5, 0.005, f"{result.get('dataset', '')}: {result.get('n_cells', '?')} cells; {note}",
             ha="center", fontsize=8)  # fmt: skip
    fig.suptitle("Attention Jacobian dp/ds in trained models: sigmoid (diagonal, <= 1/4) vs softmax (dense)",
                 fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    return fig
