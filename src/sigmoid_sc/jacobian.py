"""``sigmoid-sc jacobian``: the Jacobian of attention weights w.r.t. logits, measured (claim d).

For a row of attention logits ``s`` (one query against the ``n`` keys of its cell):

- sigmoid: ``p_j = sigma(s_j + b)`` with ``b = -log(n)``; ``dp_j/ds_l = sigma'(s_j + b) [j = l]``
  where ``sigma' = sigma (1 - sigma) <= 1/4``: the Jacobian is diagonal and bounded by 0.25.
- softmax: ``p = softmax(s)``; ``dp/ds = diag(p) - p p^T``, dense. Its largest entry is
  ``max(max_j p_j (1 - p_j), p_(1) p_(2))`` (the two largest weights), also <= 1/4. Its
  off-diagonal share of the L1 mass is exactly 1/2 whenever ``p`` is not one-hot: the diagonal
  sums to ``sum_j p_j (1 - p_j) = 1 - |p|^2`` and the off-diagonal to
  ``sum_{j != l} p_j p_l = 1 - |p|^2``. Its Frobenius share depends on how spread ``p`` is.

Measured on TRAINED models (the train stage's ``model.pt`` of both kinds) on a batch of cells of
the given split: each attention module's input (the layer-normed hidden states) is captured by
a forward pre-hook, q and k are recomputed from the module's own ``qkv`` weights, and the
logits ``q k^T / sqrt(d)`` of every layer, head, cell and query row are formed exactly. Per
(attention, layer, head) the CSV gives the distribution of the per-row maximum ``|dp/ds|``,
the off-diagonal L1 and Frobenius shares, the per-row infinity norm (max absolute row sum of
the Jacobian), the largest elementwise sigmoid derivative and the number of entries above the
0.25 bound (must be 0). For ``check_rows`` rows per model, the analytic Jacobian is checked
against ``torch.autograd.functional.jacobian`` in float64 (maximum absolute difference, and the
largest off-diagonal entry autograd finds).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
import torch

from . import config
from .attention.reference import default_scale
from .config import Jacobian
from .errors import DataError
from .io import write_csv
from .runtime import parse_json_arg, resolve_device, set_threads
from .tokens import load_tokens, pack
from .train import load_model

SIGMOID_BOUND = 0.25
HIST_BINS = 50  # bins of sigma'(s) over [0, 0.25]
EXAMPLE_KEYS = 32  # keys shown in the example Jacobian heat maps

# ----------------------------------------------------------------------------------------
# the analytic Jacobians and their summaries


def sigmoid_jacobian(s: torch.Tensor, bias: float) -> torch.Tensor:
    """``[n]`` logits -> ``[n, n]`` Jacobian of ``sigmoid(s + bias)``: ``diag(sigma')``."""
    p = torch.sigmoid(s + bias)
    return torch.diag(p * (1 - p))


def softmax_jacobian(s: torch.Tensor) -> torch.Tensor:
    """``[n]`` logits -> ``[n, n]`` Jacobian of ``softmax(s)``: ``diag(p) - p p^T``."""
    p = torch.softmax(s, dim=-1)
    return torch.diag(p) - torch.outer(p, p)


def softmax_row_stats(s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row summaries of the softmax Jacobian without forming it; ``s``: ``[..., n]``.

    Returns tensors of shape ``[...]``: ``row_max`` (largest ``|dp/ds|``), ``offdiag_l1``
    (off-diagonal share of the L1 mass; NaN for a one-hot row), ``offdiag_frob`` (share of the
    squared Frobenius mass), ``inf_norm`` (largest absolute row sum, ``max_j 2 p_j (1 - p_j)``).
    """
    p = torch.softmax(s, dim=-1)
    diag = p * (1 - p)
    if p.shape[-1] > 1:
        top2 = p.topk(2, dim=-1).values
        off_max = top2[..., 0] * top2[..., 1]
    else:
        off_max = torch.zeros_like(p[..., 0])
    sum_p, sum_p2 = p.sum(-1), p.square().sum(-1)
    off_l1 = (sum_p.square() - sum_p2).clamp_min(0)
    diag_l1 = diag.sum(-1)
    off_f2 = (sum_p2.square() - p.pow(4).sum(-1)).clamp_min(0)
    diag_f2 = diag.square().sum(-1)
    return {
        "row_max": torch.maximum(diag.amax(-1), off_max),
        "offdiag_l1": off_l1 / (off_l1 + diag_l1),  # 0/0 = NaN for a one-hot row
        "offdiag_frob": off_f2 / (off_f2 + diag_f2),
        "inf_norm": (2 * diag).amax(-1),
    }


def sigmoid_row_stats(s: torch.Tensor, bias: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-row summaries of sigmoid's (diagonal) Jacobian; also the elementwise ``sigma'``."""
    p = torch.sigmoid(s + bias)
    derivative = p * (1 - p)
    row_max = derivative.amax(-1)
    zero = torch.zeros_like(row_max)
    return {
        "row_max": row_max,
        "offdiag_l1": zero,
        "offdiag_frob": zero,
        "inf_norm": row_max,
    }, derivative


def autograd_check(attention: str, s: torch.Tensor, bias: float) -> tuple[float, float]:
    """(max |autograd - analytic|, max |off-diagonal of autograd's Jacobian|), float64."""
    s = s.detach().double().cpu()
    if attention == "sigmoid":
        numeric = torch.autograd.functional.jacobian(
            lambda x: torch.sigmoid(x + bias), s, vectorize=True
        )
        analytic = sigmoid_jacobian(s, bias)
    else:
        numeric = torch.autograd.functional.jacobian(
            lambda x: torch.softmax(x, dim=-1), s, vectorize=True
        )
        analytic = softmax_jacobian(s)
    off = numeric - torch.diag(torch.diagonal(numeric))
    return float((numeric - analytic).abs().max()), float(off.abs().max())


# ----------------------------------------------------------------------------------------
# logits of a trained model


@torch.no_grad()
def attention_inputs(model, ids: np.ndarray, cu: np.ndarray, max_seqlen: int, device) -> list:
    """The input of every layer's attention module (layer-normed hidden states), ``[T, d]``."""
    captured = []
    handles = [
        block.attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        for block in model.blocks
    ]
    try:
        model(torch.from_numpy(ids).to(device), torch.from_numpy(cu).to(device), max_seqlen)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def layer_logits(attn_module, x: torch.Tensor, cu: np.ndarray):
    """Yield ``(cell, logits [H, n, n])`` float32, ``q k^T * scale`` of one layer, per cell."""
    total, d_model = x.shape
    heads = attn_module.n_heads
    qkv = attn_module.qkv(x).view(total, 3, heads, d_model // heads).float()
    scale = default_scale(d_model // heads, None)
    for cell, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        q = qkv[start:end, 0].transpose(0, 1)  # [H, n, D]
        k = qkv[start:end, 1].transpose(0, 1)
        yield cell, torch.matmul(q, k.transpose(1, 2)) * scale


def analyse_model(model, attention: str, ids, cu, max_seqlen, device, check_rows: int) -> dict:
    """Per (layer, head) row statistics, the sigmoid derivative histogram, checks, an example."""
    inputs = attention_inputs(model, ids, cu, max_seqlen, device)
    n_layers, heads = len(model.blocks), model.blocks[0].attn.n_heads
    per = {(layer, h): {k: [] for k in ("row_max", "offdiag_l1", "offdiag_frob", "inf_norm")}
           for layer in range(n_layers) for h in range(heads)}  # fmt: skip
    hist = torch.zeros(HIST_BINS, dtype=torch.float64)
    extra = {(layer, h): {"max_derivative": 0.0, "above_bound": 0}
             for layer in range(n_layers) for h in range(heads)}  # fmt: skip
    checks = {}
    example = None
    check_targets = {(layer, 0, 0, row) for layer in {0, n_layers - 1} for row in range(check_rows)}
    for layer, x in enumerate(inputs):
        for cell, logits in layer_logits(model.blocks[layer].attn, x, cu):
            n = logits.shape[-1]
            bias = -float(np.log(n))
            if attention == "sigmoid":
                stats, derivative = sigmoid_row_stats(logits, bias)
                # on the device: only the histogram travels to the host
                hist += (
                    torch.histc(derivative.float(), HIST_BINS, 0.0, SIGMOID_BOUND).double().cpu()
                )
                for h in range(heads):
                    e = extra[(layer, h)]
                    e["max_derivative"] = max(e["max_derivative"], float(derivative[h].max()))
                    e["above_bound"] += int((derivative[h] > SIGMOID_BOUND).sum())
            else:
                stats = softmax_row_stats(logits)
            for key, value in stats.items():  # [H, n] each
                value = value.cpu().numpy()
                for h in range(heads):
                    per[(layer, h)][key].append(value[h])
            for layer_c, head_c, cell_c, row in check_targets:
                if (layer_c, cell_c) == (layer, cell) and row < n:
                    checks[(layer_c, head_c, row)] = autograd_check(
                        attention, logits[head_c, row], bias
                    )
            if layer == n_layers - 1 and cell == 0:
                # the Jacobian of the whole row, cropped to its first keys (softmax normalises
                # over all n keys, so cropping the logits first would change it)
                s = logits[0, 0].double().cpu()
                jac = sigmoid_jacobian(s, bias) if attention == "sigmoid" else softmax_jacobian(s)
                example = jac[:EXAMPLE_KEYS, :EXAMPLE_KEYS].abs().numpy()
    rows = []
    for (layer, h), values in per.items():
        arrays = {k: np.concatenate(v) for k, v in values.items()}
        row_max = arrays["row_max"]
        layer_checks = [v for (lc, hc, _), v in checks.items() if (lc, hc) == (layer, h)]
        rows.append(
            {
                "attention": attention,
                "layer": layer,
                "head": h,
                "n_rows": int(row_max.size),
                "row_max_dpds_median": float(np.median(row_max)),
                "row_max_dpds_mean": float(row_max.mean()),
                "row_max_dpds_max": float(row_max.max()),
                "offdiag_l1_share_mean": float(np.nanmean(arrays["offdiag_l1"]))
                if np.isfinite(arrays["offdiag_l1"]).any()
                else float("nan"),
                "offdiag_frob_share_mean": float(np.nanmean(arrays["offdiag_frob"]))
                if np.isfinite(arrays["offdiag_frob"]).any()
                else float("nan"),
                "inf_norm_max": float(arrays["inf_norm"].max()),
                "sigmoid_derivative_max": extra[(layer, h)]["max_derivative"]
                if attention == "sigmoid"
                else float("nan"),
                "entries_above_0.25": extra[(layer, h)]["above_bound"]
                if attention == "sigmoid"
                else 0,
                "autograd_rows": len(layer_checks),
                "autograd_max_abs_err": max((c[0] for c in layer_checks), default=float("nan")),
                "autograd_offdiag_max_abs": max((c[1] for c in layer_checks), default=float("nan")),
            }
        )
    row_max_by_layer = {
        layer: np.concatenate([np.concatenate(per[(layer, h)]["row_max"]) for h in range(heads)])
        for layer in range(n_layers)
    }
    return {
        "table": pd.DataFrame(rows),
        "row_max_by_layer": row_max_by_layer,
        "hist": hist.numpy() if attention == "sigmoid" else None,
        "example": example,
    }


def jacobian_analysis(
    dataset: str,
    tokens_path: str,
    model_paths: dict[str, str],
    params: Jacobian,
    device: str,
) -> dict:
    """Both models on the same cells; ``{"table": DataFrame, "per_attention": {...}, ...}``.

    ``params``: the config's ``experiments.jacobian`` section (split, n_cells, check_rows).
    """
    dev = resolve_device(device)
    tokens = load_tokens(tokens_path, dataset)
    cells = tokens.cells(params.split)
    if cells.size == 0:
        raise DataError(f"{dataset}: {tokens_path} has no {params['split']} cells")
    cells = cells[: params.n_cells]
    ids, cu, max_seqlen = pack(tokens, cells)
    per_attention, tables = {}, []
    for attention, path in model_paths.items():
        model, record = load_model(path, dev)
        if record.get("attention") != attention:
            raise DataError(
                f"{dataset}: {path} holds a {record.get('attention')!r} model, not {attention!r}"
            )
        if record["tokens"]["sha256"] != tokens.metadata()["sha256"]:
            raise DataError(f"{dataset}: {path} was trained on other tokens than {tokens_path}")
        result = analyse_model(model, attention, ids, cu, max_seqlen, dev, params.check_rows)
        per_attention[attention] = result
        tables.append(result["table"])
    table = pd.concat(tables, ignore_index=True)
    table.insert(0, "dataset", dataset)
    table["n_cells"] = int(cells.size)
    return {"table": table, "per_attention": per_attention, "dataset": dataset,
            "n_cells": int(cells.size), "lengths": np.diff(cu),
            "sigmoid_bound": SIGMOID_BOUND}  # fmt: skip


def _run(args: argparse.Namespace) -> None:
    from .experiment_figures import plot_jacobian, save_figure

    params = config.section(
        "experiments.jacobian", parse_json_arg(args.params_json, "--params-json")
    )
    set_threads()
    result = jacobian_analysis(
        args.dataset,
        args.tokens,
        {"softmax": args.softmax_model, "sigmoid": args.sigmoid_model},
        params,
        args.device,
    )
    table = result["table"]
    write_csv(args.csv, table)
    save_figure(plot_jacobian(result), args.png, args.pdf)
    for attention, part in table.groupby("attention"):
        print(
            f"jacobian {args.dataset} {attention}: per-row max |dp/ds| median "
            f"{part['row_max_dpds_median'].median():.4g}, max {part['row_max_dpds_max'].max():.4g}; "
            f"off-diagonal L1 share {part['offdiag_l1_share_mean'].mean():.3f}; autograd error "
            f"{part['autograd_max_abs_err'].max():.2e}",
            file=sys.stderr,
        )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "jacobian",
        help="Jacobian of attention weights w.r.t. logits in trained softmax and sigmoid models",
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--tokens", required=True, help="the dataset's tokens.npz")
    p.add_argument("--softmax-model", required=True, help="model.pt of a softmax run")
    p.add_argument("--sigmoid-model", required=True, help="model.pt of a sigmoid run")
    p.add_argument("--params-json", default="{}", help="the experiments.jacobian section")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--csv", required=True)
    p.add_argument("--png", required=True)
    p.add_argument("--pdf", required=True)
    p.set_defaults(func=_run)
