"""The ``corpus`` stage: the pretraining corpus' tokens, pooled from its datasets' tokens.

Each corpus dataset (a unit of the pretraining protocol: a whole dataset, or its side of a
holdout) is tokenised with the corpus vocabulary (``sigmoid-sc tokenize --vocabulary``); the
``vocabulary`` stage chose the corpus' cells (``cells.csv``: the sampled training and
validation cells of every corpus dataset, never a test cell). This stage takes those cells'
sequences, as they are, into one tokens.npz: ``train`` trains on it as on any dataset's tokens.

Besides the arrays of every tokens.npz (``obs_names`` become ``<dataset>/<obs_name>``), it holds
``dataset`` (where each cell came from), ``source_obs_names`` (its name there) and the
vocabulary's ``vocab_id``. Tokens of another vocabulary, cells without tokens and a split that
changed since the vocabulary was built are refused.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd

from .errors import ConfigError, DataError
from .io import write_npz
from .runtime import log_to_stderr

log = logging.getLogger(__name__)


def pool_tokens(cells: pd.DataFrame, tokens: dict[str, dict], vocab_id: str) -> dict:
    """The corpus tokens.npz arrays: the chosen ``cells`` taken from each unit's tokens.

    ``tokens``: unit name -> the arrays of its tokens.npz (tokenised with the vocabulary whose
    digest is ``vocab_id``). Cells keep their unit's order; ``obs_names`` become
    ``<dataset>/<obs_name>`` and ``dataset`` says where each cell came from.
    """
    missing = sorted(set(cells["dataset"]) - set(tokens))
    if missing:
        raise DataError(f"corpus: no tokens given for corpus datasets {missing}")
    ids, lengths, split, names, origin = [], [], [], [], []
    reference = None
    for unit, arrays in tokens.items():
        if str(arrays.get("vocab_id", "")) != vocab_id:
            raise DataError(
                f"corpus: the tokens of {unit!r} were not made with the corpus vocabulary; "
                "tokenise them with sigmoid-sc tokenize --vocabulary"
            )
        scalars = {
            k: int(arrays[k]) for k in ("vocab_size", "max_len", "pad_id", "mask_id", "cls_id")
        }
        if reference is not None and scalars != reference:
            raise DataError(f"corpus: the tokens of {unit!r} differ in {scalars} from {reference}")
        reference = scalars
        chosen = cells[cells["dataset"] == unit]
        position = pd.Index(arrays["obs_names"].astype(str))
        index = position.get_indexer(chosen["obs_name"].astype(str))
        if (index < 0).any():
            raise DataError(
                f"corpus: {int((index < 0).sum())} corpus cells of {unit!r} lack tokens"
            )
        unit_split = arrays["split"].astype(str)[index]
        if (unit_split != chosen["split"].to_numpy()).any():
            raise DataError(f"corpus: the split of {unit!r}'s cells changed since the vocabulary")
        offsets = arrays["offsets"]
        for i in index:
            ids.append(arrays["input_ids"][offsets[i] : offsets[i + 1]])
        lengths.append(offsets[index + 1] - offsets[index])
        split.append(unit_split)
        names.append(arrays["obs_names"].astype(str)[index])
        origin.append(np.full(index.size, unit))
    lengths = np.concatenate(lengths)
    names = np.concatenate(names)
    origin = np.concatenate(origin).astype(str)
    first = next(iter(tokens.values()))
    return {
        "input_ids": np.concatenate(ids).astype(np.int32),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "split": np.concatenate(split).astype(str),
        "obs_names": np.char.add(np.char.add(origin, "/"), names.astype(str)),
        "dataset": origin,
        "source_obs_names": names.astype(str),
        "gene_names": first["gene_names"],
        "gene_median": first["gene_median"],
        **{k: np.int64(v) for k, v in reference.items()},
        "vocab_id": np.str_(vocab_id),
    }


def run_corpus(args: argparse.Namespace) -> None:
    log_to_stderr()
    from .io import read_table
    from .vocabulary import CELLS_COLUMNS, load_vocabulary

    if len(args.names) != len(args.tokens):
        raise ConfigError("corpus: --names and --tokens must list the same datasets")
    vocabulary = load_vocabulary(args.vocabulary)
    cells = read_table(args.cells, CELLS_COLUMNS, "corpus cells")
    tokens = {}
    for name, path in zip(args.names, args.tokens):
        with np.load(path, allow_pickle=False) as npz:
            tokens[name] = {key: npz[key] for key in npz.files}
    arrays = pool_tokens(cells, tokens, vocabulary.vocab_id)
    write_npz(args.output, **arrays)
    log.info(
        "corpus: %d cells (%d train, %d val), %d tokens",
        arrays["split"].size,
        int((arrays["split"] == "train").sum()),
        int((arrays["split"] == "val").sum()),
        arrays["input_ids"].size,
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("corpus", help="the pretraining corpus' tokens.npz, pooled")
    p.add_argument("--vocabulary", required=True, help="vocabulary.npz")
    p.add_argument("--cells", required=True, help="the corpus' cells (from vocabulary)")
    p.add_argument("--names", nargs="+", required=True, help="corpus datasets (units)")
    p.add_argument("--tokens", nargs="+", required=True, help="their tokens.npz, in order")
    p.add_argument("--output", required=True, help="the corpus' tokens.npz")
    p.set_defaults(func=run_corpus)
