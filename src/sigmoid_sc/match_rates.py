"""The ``match-rates`` stage: how well each dataset of the pretraining protocol matches the
corpus vocabulary, one table.

A row per unit (a dataset, or one side of a holdout): its name, ``source`` (the config's dataset
its cells come from), ``role`` (``corpus`` | ``zero_shot``) and the match rates ``sigmoid-sc
tokenize --match-rates`` wrote for it (:func:`sigmoid_sc.vocabulary.match_rates`: genes and
expressed tokens, counts and fractions). Corpus rows also carry the corpus table of ``sigmoid-sc
vocabulary``: their training and validation cells (available and in the corpus) and the
fraction of their genes and expressed tokens shared with the other corpus datasets.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from .errors import DataError
from .io import write_csv
from .runtime import parse_json_arg

#: the columns in front, in this order (then the corpus table's)
KEY_COLUMNS = ("dataset", "source", "role", "n_cells")
RATE_COLUMNS = (
    "n_genes", "n_genes_matched", "gene_match_rate",
    "n_tokens", "n_tokens_matched", "token_match_rate",
)  # fmt: skip


def match_table(rates: list[dict], units: dict, corpus: pd.DataFrame | None) -> pd.DataFrame:
    """A row per unit: its match rates, its source dataset and role, its corpus row if any.

    ``units``: name -> ``{"dataset", "role"}``; every rate must name one of them.
    """
    rows = []
    for r in rates:
        unit = units.get(r.get("dataset"))
        if unit is None:
            raise DataError(f"match-rates: {r.get('dataset')!r} is not a unit of the protocol")
        rows.append({"dataset": r["dataset"], "source": unit["dataset"], "role": unit["role"], **r})
    missing = sorted(set(units) - {row["dataset"] for row in rows})
    if missing:
        raise DataError(f"match-rates: no match rates given for {missing}")
    table = pd.DataFrame(rows)
    front = [c for c in (*KEY_COLUMNS, *RATE_COLUMNS) if c in table.columns]
    table = table[front + [c for c in table.columns if c not in front]]
    if corpus is not None:
        table = table.merge(
            corpus.drop(columns=["genes"], errors="ignore"), on="dataset", how="left"
        )
    return table


def run_match_rates(args: argparse.Namespace) -> None:
    units = parse_json_arg(args.units_json, "match-rates: --units-json")
    rates = []
    for path in args.rates:
        with open(path) as fh:
            rates.append(json.load(fh))
    corpus = pd.read_csv(args.corpus) if args.corpus else None
    write_csv(args.output, match_table(rates, units, corpus))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "match-rates", help="the pretraining protocol's datasets against the corpus vocabulary"
    )
    p.add_argument("--rates", nargs="+", required=True, help="each unit's match json")
    p.add_argument("--units-json", required=True, help="{name: {dataset, role}} of the protocol")
    p.add_argument("--corpus", default=None, help="the corpus table (sigmoid-sc vocabulary)")
    p.add_argument("--output", required=True, help="match_rates.csv")
    p.set_defaults(func=run_match_rates)
