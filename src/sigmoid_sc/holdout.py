"""The ``holdout`` stage: one side of a dataset's holdout (``datasets.<name>.holdout``).

A holdout splits a prepared dataset by an obs column: the cells whose ``obs[obs_key]`` is one of
``values`` (``keep: true``: the held-out side, scored zero-shot under the holdout's name) or the
others (``keep: false``: the dataset's side in the pretraining corpus). Each side is written as a
prepared.h5ad of its own, with the prepare stage's split and ``uns`` kept (the label and batch
keys travel on) and the selection added to ``uns["sigmoid_sc"]["selection"]``. A side without
test cells is refused: it would have nothing to score.
"""

from __future__ import annotations

import argparse
import logging

from .errors import DataError
from .io import write_h5ad
from .runtime import log_to_stderr, parse_json_arg

log = logging.getLogger(__name__)


def select_cells(adata, unit: str, selection: dict):
    """The unit's cells of a prepared AnnData: ``obs[obs_key]`` in ``values`` (``keep``) or not
    (see the module doc)."""
    key, values, keep = selection["obs_key"], selection["values"], selection.get("keep", True)
    if key not in adata.obs.columns:
        raise DataError(
            f"dataset {unit!r}: holdout obs_key {key!r} is not a column of the prepared obs "
            f"(available: {', '.join(map(str, adata.obs.columns))})"
        )
    column = adata.obs[key].astype(str)
    present = sorted(set(column))
    absent = [v for v in values if v not in present]
    if absent:
        raise DataError(
            f"dataset {unit!r}: holdout values {absent} are not in obs[{key!r}] "
            f"(its values: {', '.join(present[:20])})"
        )
    chosen = column.isin(values).to_numpy() == keep
    subset = adata[chosen].copy()
    split = subset.obs["split"].astype(str)
    if not (split == "test").any():
        raise DataError(f"dataset {unit!r}: the selected cells have no test cells to score")
    info = dict(subset.uns.get("sigmoid_sc", {}))
    info["selection"] = {"obs_key": key, "values": list(values), "keep": bool(keep)}
    subset.uns["sigmoid_sc"] = info
    log.info(
        "dataset %s: %d of %d cells (obs[%s] %s %s)",
        unit, subset.n_obs, adata.n_obs, key, "in" if keep else "not in", values,
    )  # fmt: skip
    return subset


def run_holdout(args: argparse.Namespace) -> None:
    log_to_stderr()
    import anndata as ad

    selection = parse_json_arg(args.selection_json, f"dataset {args.dataset!r}: --selection-json")
    write_h5ad(args.output, select_cells(ad.read_h5ad(args.input), args.dataset, selection))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "holdout", help="one side of a holdout of a prepared dataset: its own prepared.h5ad"
    )
    p.add_argument("--dataset", required=True, help="the unit's name (messages)")
    p.add_argument("--input", required=True, help="prepared.h5ad of the whole dataset")
    p.add_argument("--selection-json", required=True, help='{"obs_key", "values", "keep"}')
    p.add_argument("--output", required=True, help="the unit's prepared.h5ad")
    p.set_defaults(func=run_holdout)
