"""The ``protocols`` stage: the per-dataset and the pretraining protocols side by side.

Its inputs are the ``aggregate`` stage's outputs of each group of datasets: the per-dataset
protocol's (role ``own``: each model trained on the dataset it is scored on) and the pretraining
protocol's, one group per role (``corpus``: a dataset whose training cells were in the corpus;
``zero_shot``: a dataset never trained on). Their rows are stacked with the columns ``protocol``
(``per_dataset`` | ``pretrain``), ``role`` and ``source`` (the config's dataset the scored cells
come from; a holdout's cells carry their own name in ``dataset``). Whatever statistics
``aggregate`` computes (bootstrap CIs, paired tests, baselines) are carried over as they are:

- ``representation_protocols.csv``: every metrics row of every group;
- ``representation_protocols_summary.csv``: every summary row of every group;
- ``representation_protocols_summary.md``: the primary metric (``aggregate.primary_metric``)
  side by side (a row per protocol, role and pooling for each source dataset, then each group's
  ``overall``), each group's own summary, and the gene-vocabulary match rates.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from . import config
from .aggregate import BASELINES, OVERALL, _baseline_header, _fmt, difference_text
from .aggregate import headline_metrics as primary_and_twin
from .errors import ConfigError, DataError
from .io import read_table, write_csv, write_text
from .runtime import parse_json_arg

ROLE_TEXT = {
    "own": "each dataset's own model (trained on its training cells)",
    "corpus": "pretrained on the corpus; datasets whose training cells are in it",
    "zero_shot": "pretrained on the corpus; datasets never trained on (zero-shot)",
}
PROTOCOL_ROLES = {"per_dataset": ("own",), "pretrain": ("corpus", "zero_shot")}
GROUP_COLUMNS = ("protocol", "role", "source")
#: match-rate columns shown in the Markdown, those present
MATCH_COLUMNS = (
    "dataset", "source", "role", "n_genes", "gene_match_rate", "token_match_rate",
    "shared_gene_rate", "shared_token_rate", "train_cells_in_corpus",
)  # fmt: skip


def parse_group(text: str) -> tuple[str, str]:
    """``per_dataset:own`` -> ``("per_dataset", "own")``; ConfigError for anything else."""
    protocol, _, role = text.partition(":")
    if role not in PROTOCOL_ROLES.get(protocol, ()):
        known = ", ".join(f"{p}:{r}" for p, roles in PROTOCOL_ROLES.items() for r in roles)
        raise ConfigError(f"protocols: group {text!r} is not one of {known}")
    return protocol, role


def _tag(frame: pd.DataFrame, protocol: str, role: str, sources: dict) -> pd.DataFrame:
    frame = frame.copy()
    source = frame["dataset"].map(lambda d: sources.get(d, d))
    for position, (column, value) in enumerate(zip(GROUP_COLUMNS, (protocol, role, source))):
        frame.insert(position, column, value)
    return frame


def stack(frames: list[pd.DataFrame], groups: list[tuple[str, str]], sources: dict):
    """Frames of each group with ``protocol, role, source`` in front, one after the other."""
    return pd.concat(
        [_tag(f, p, r, sources) for f, (p, r) in zip(frames, groups)], ignore_index=True
    )


def side_by_side(summary: pd.DataFrame, metric: str) -> list[str]:
    """Markdown rows of ``metric``: each source dataset under every protocol, role and pooling,
    then every group's ``overall``."""
    rows = summary[summary["metric"] == metric]
    baselines = [b for b in BASELINES if b in rows.columns]
    head = [
        "dataset", "scored cells", "protocol", "role", "pooling", "n", "softmax", "sigmoid",
        "sigmoid - softmax [95% CI]", "verdict", "change", "p (t)",
        *[_baseline_header(b) for b in baselines],
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    order = [s for s in pd.unique(rows["source"]) if s != OVERALL] + [OVERALL]
    for source in order:
        for _, row in rows[rows["source"] == source].iterrows():
            cells = [
                str(source), str(row["dataset"]), row["protocol"], row["role"], row["pooling"],
                _fmt(row["n_pairs"], "int"), _fmt(row["softmax_mean"]), _fmt(row["sigmoid_mean"]),
                difference_text(row), str(row["resolved"]) if pd.notna(row["resolved"]) else "",
                _fmt(row["relative_change"], "percent"), _fmt(row["p_ttest"], "p"),
                *[_fmt(row[b]) for b in baselines],
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def demote(markdown: str) -> list[str]:
    """A group's summary Markdown under a heading of ours: its title dropped, headings one
    level down."""
    lines = markdown.rstrip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return ["#" + line if line.startswith("#") else line for line in lines]


def match_markdown(match: pd.DataFrame) -> list[str]:
    shown = [c for c in MATCH_COLUMNS if c in match.columns]
    lines = ["| " + " | ".join(shown) + " |", "| " + " | ".join("---" for _ in shown) + " |"]
    for _, row in match[shown].iterrows():
        cells = []
        for column in shown:
            value = row[column]
            if isinstance(value, str):
                cells.append(value)
            elif value is None or (isinstance(value, float) and not np.isfinite(value)):
                cells.append("")
            elif "rate" in column:
                cells.append(f"{value:.1%}")
            else:
                cells.append(f"{int(value)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(
    summary: pd.DataFrame,
    groups: list[tuple[str, str]],
    markdowns: list[str],
    primary: str,
    match: pd.DataFrame | None,
) -> str:
    lines = [
        "# Representation quality under the two protocols: sigmoid vs softmax",
        "",
        "Protocols: `per_dataset` trains one model per dataset, attention kind and seed on that "
        "dataset's training cells; `pretrain` trains one model per attention kind and seed on "
        "the pooled corpus (one gene vocabulary shared by symbol) and embeds every dataset "
        "zero-shot. Roles: " + "; ".join(f"`{k}`: {v}" for k, v in ROLE_TEXT.items()) + ". "
        "`scored cells` names the cells scored: a holdout's cells carry a name of their own. "
        "Statistics, intervals and baselines as in each group's summary below; `overall` pools "
        "the datasets of one group only.",
    ]
    for metric in primary_and_twin(summary, primary):
        title = "primary metric" if metric == primary else "the same silhouette, other form"
        lines += ["", f"## {metric} ({title}), side by side", "", *side_by_side(summary, metric)]
    for (protocol, role), markdown in zip(groups, markdowns):
        lines += ["", f"## Protocol {protocol}, role {role}: {ROLE_TEXT[role]}", ""]
        lines += demote(markdown)
    if match is not None:
        lines += ["", "## Gene vocabulary: match rates of the pretraining protocol", ""]
        lines += match_markdown(match)
    return "\n".join(lines) + "\n"


def run_protocols(args: argparse.Namespace) -> None:
    groups = [parse_group(g) for g in args.groups]
    if not (len(args.tables) == len(args.summaries) == len(args.markdowns) == len(groups)):
        raise ConfigError("protocols: give one table, summary and markdown per group")
    params = config.section(
        "aggregate", parse_json_arg(args.params_json, "protocols: --params-json")
    )
    sources = parse_json_arg(args.sources_json, "protocols: --sources-json")
    tables = [read_table(p, ("dataset", "method", "seed"), "metrics table") for p in args.tables]
    summaries = [read_table(p, ("dataset", "metric"), "summary table") for p in args.summaries]
    for path, summary in zip(args.summaries, summaries):
        if params.primary_metric not in set(summary["metric"]):
            raise DataError(f"protocols: {path} has no rows of {params.primary_metric}")
    markdowns = []
    for path in args.markdowns:
        with open(path) as fh:
            markdowns.append(fh.read())
    match = pd.read_csv(args.match_rates) if args.match_rates else None
    summary = stack(summaries, groups, sources)
    write_csv(args.table, stack(tables, groups, sources))
    write_csv(args.summary_csv, summary)
    write_text(
        args.summary_md, to_markdown(summary, groups, markdowns, params.primary_metric, match)
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "protocols", help="the per-dataset and pretraining protocols' tables side by side"
    )
    p.add_argument("--groups", nargs="+", required=True, help="protocol:role of each group")
    p.add_argument("--tables", nargs="+", required=True, help="each group's representation.csv")
    p.add_argument("--summaries", nargs="+", required=True, help="each group's summary csv")
    p.add_argument("--markdowns", nargs="+", required=True, help="each group's summary md")
    p.add_argument("--params-json", default="{}", help="the config's aggregate section as JSON")
    p.add_argument("--sources-json", default="{}", help="scored-cells name -> its dataset")
    p.add_argument("--match-rates", default=None, help="match_rates.csv (pretraining)")
    p.add_argument("--table", required=True, help="output representation_protocols.csv")
    p.add_argument("--summary-csv", required=True, help="output ..._summary.csv")
    p.add_argument("--summary-md", required=True, help="output ..._summary.md")
    p.set_defaults(func=run_protocols)
