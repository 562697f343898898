"""One gene vocabulary shared by gene symbol: the pretraining corpus' cells, genes and medians.

Genes are matched across datasets by symbol, case-insensitively: a symbol's key is its
upper-case form, so mouse ``Actb`` meets human ``ACTB`` (symbols of orthologues often agree up
to case; where they do not, the genes stay apart). The corpus vocabulary is every key expressed
in at least one training cell of the corpus, sorted; token id of vocabulary gene ``i`` is
``i + 3`` (the special ids of :mod:`sigmoid_sc.tokenize` come first). Its normalisation
constants are Geneformer's: each gene's median non-zero normalised expression (CP10K) over the
corpus' training cells, pooled across the corpus datasets.

Any dataset, in the corpus or not, is tokenised with that vocabulary (``sigmoid-sc tokenize
--vocabulary``): its normalised expression is mapped onto the vocabulary (columns whose key is
not in it are dropped; columns sharing a key are summed), divided by the corpus medians and
rank-value encoded as usual. Its match rate says how much of it the vocabulary covers: the
fraction of its genes whose key is in the vocabulary, and the fraction of its expressed values
(non-zero cell x gene entries, the tokens before truncation) that map.

A dataset whose gene names are indices or identifiers rather than symbols (``0``, ``gene12``,
``ENSG00000141510``) cannot be matched and is refused, as is a zero-shot dataset whose
expressed-token match rate is below ``pretrain.min_match_rate``: both with a
:class:`DataError` naming it and its rate.

The ``vocabulary`` stage takes the corpus datasets' prepared data and writes the corpus' cells
(its sampling, ``pretrain.sampling``), the vocabulary and a table of the corpus datasets.
``proportional``: every training and validation cell of every corpus dataset joins once, so a
dataset weighs in proportion to its cells (``train`` draws each step's cells from the pooled
training cells). ``capped``: a dataset with more than ``max_cells_per_dataset`` training cells
gives a seeded uniform subset of that many (its validation cells in the same proportion), so no
dataset holds more than its cap of the corpus. Each dataset's draw comes from
``(sampling_seed, crc32 of its name)``: adding or removing another dataset changes no dataset's
sample. Test cells are never in the corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import config
from .config import Pretrain
from .errors import ConfigError, DataError
from .io import write_csv, write_npz
from .runtime import log_to_stderr, parse_json_arg

log = logging.getLogger(__name__)

#: columns of the corpus' cells table (``cells.csv``)
CELLS_COLUMNS = ("dataset", "obs_name", "split")

#: names that are row indices or database identifiers, not symbols
UNNAMED = re.compile(r"^(\d+|gene[_.\-]?\d+|ENS[A-Z]*G\d{6,}(\.\d+)?)$", re.IGNORECASE)
#: a dataset with at least this fraction of such names has no usable symbols
MAX_UNNAMED_FRACTION = 0.5


def symbol_keys(names) -> np.ndarray:
    """The matching key of each gene name: stripped and upper-cased (str array)."""
    return np.array([str(name).strip().upper() for name in names], dtype=str)


def check_symbols(names, dataset: str) -> None:
    """Raise DataError naming ``dataset`` when its gene names are not gene symbols."""
    names = [str(name).strip() for name in names]
    unnamed = [name for name in names if UNNAMED.match(name)]
    if names and len(unnamed) >= MAX_UNNAMED_FRACTION * len(names):
        raise DataError(
            f"dataset {dataset!r} has no gene symbols: {len(unnamed)} of its {len(names)} gene "
            f"names are indices or identifiers (e.g. {', '.join(map(repr, unnamed[:3]))}), so "
            "its match rate with the corpus vocabulary is 0%. The pretraining protocol matches "
            "genes by symbol: give the dataset its symbols (e.g. reader var_names), or set its "
            "role: none to leave it to the per-dataset protocol"
        )


def gene_nonzero_median(X: sp.spmatrix) -> np.ndarray:
    """Median of the positive values of each column of ``X`` [cells, genes]: float64 ``[n_genes]``.

    Genes never positive get 1.0 (no rescaling). One pass over the CSC columns; ``np.median``
    partitions rather than sorts, so this is O(nnz) (0.5 s for 2e7 non-zeros).
    """
    csc = sp.csc_matrix(X)
    median = np.ones(csc.shape[1])
    for g in range(csc.shape[1]):
        values = csc.data[csc.indptr[g] : csc.indptr[g + 1]]
        values = values[values > 0]
        if values.size:
            median[g] = np.median(values.astype(np.float64))
    return median


def linear(X) -> sp.csr_matrix:
    """Normalised expression from prepared ``X`` (log1p values): ``expm1``, float64 CSR."""
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.data = np.expm1(X.data)
    return X


def gene_mapping(names, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(columns, targets)``: the dataset columns whose key is in ``symbols`` (sorted keys),
    and the vocabulary index each maps to."""
    keys = symbol_keys(names)
    position = np.searchsorted(symbols, keys)
    position = np.minimum(position, max(len(symbols) - 1, 0))
    found = (symbols[position] == keys) if len(symbols) else np.zeros(len(keys), dtype=bool)
    columns = np.flatnonzero(found)
    return columns, position[columns]


def map_genes(X: sp.spmatrix, names, symbols: np.ndarray) -> sp.csr_matrix:
    """``X`` [cells, genes] onto the vocabulary: ``[cells, len(symbols)]``, shared keys summed."""
    columns, targets = gene_mapping(names, symbols)
    mapping = sp.csr_matrix(
        (np.ones(columns.size), (columns, targets)), shape=(X.shape[1], len(symbols))
    )
    out = sp.csr_matrix(sp.csr_matrix(X) @ mapping)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def match_rates(X: sp.spmatrix, names, symbols: np.ndarray) -> dict:
    """How much of a dataset the vocabulary covers (see the module doc)."""
    X = sp.csr_matrix(X)
    columns, _ = gene_mapping(names, symbols)
    matched = np.zeros(X.shape[1], dtype=bool)
    matched[columns] = True
    positive = X.data > 0
    n_tokens = int(positive.sum())
    n_matched = int(matched[X.indices[positive]].sum())
    n_genes = int(X.shape[1])
    return {
        "n_genes": n_genes,
        "n_genes_matched": int(columns.size),
        "gene_match_rate": columns.size / n_genes if n_genes else float("nan"),
        "n_tokens": n_tokens,
        "n_tokens_matched": n_matched,
        "token_match_rate": n_matched / n_tokens if n_tokens else float("nan"),
    }


def check_match(rates: dict, dataset: str, min_match_rate: float) -> None:
    """Raise DataError naming ``dataset`` and its rate when it is below the floor."""
    rate = rates["token_match_rate"]
    if not rate >= min_match_rate:  # NaN (no expressed value) fails too
        raise DataError(
            f"dataset {dataset!r} matches the corpus vocabulary too little: {rate:.1%} of its "
            f"expressed tokens ({rates['n_genes_matched']} of its {rates['n_genes']} genes, "
            f"{rates['gene_match_rate']:.1%}) have a gene symbol in it, below "
            f"pretrain.min_match_rate {min_match_rate:.1%}. Its genes are named differently "
            "from the corpus' (another species' symbols, or identifiers); lower the floor or "
            "set its role: none"
        )


def vocab_id(symbols: np.ndarray, gene_median: np.ndarray, gene_median_norm: bool) -> str:
    """A digest of what tokenisation takes from a vocabulary (keys, medians, whether used)."""
    digest = hashlib.sha256()
    digest.update("\n".join(symbols).encode())
    digest.update(np.ascontiguousarray(gene_median, dtype=np.float64).tobytes())
    digest.update(b"median" if gene_median_norm else b"no-median")
    return digest.hexdigest()


@dataclass(frozen=True)
class Vocabulary:
    symbols: np.ndarray  # str [n]: upper-case keys, sorted
    gene_median: np.ndarray  # float64 [n]: corpus medians (1 where not normalising)
    gene_median_norm: bool

    @property
    def vocab_id(self) -> str:
        return vocab_id(self.symbols, self.gene_median, self.gene_median_norm)

    def gene_scale(self) -> np.ndarray | None:
        return self.gene_median if self.gene_median_norm else None

    def cells(self, X, names) -> sp.csr_matrix:
        """Prepared ``X`` (log1p values) as normalised expression on this vocabulary."""
        return map_genes(linear(X), names, self.symbols)

    def save(self, path: str | os.PathLike) -> None:
        write_npz(
            path,
            symbols=self.symbols.astype(str),
            gene_median=self.gene_median.astype(np.float64),
            gene_median_norm=np.bool_(self.gene_median_norm),
            vocab_id=np.str_(self.vocab_id),
        )


def load_vocabulary(path: str | os.PathLike) -> Vocabulary:
    """Read a vocabulary.npz (``sigmoid-sc vocabulary``) and check it is what it says."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read vocabulary {str(path)!r}: {exc}") from exc
    with npz:
        vocab = Vocabulary(
            symbols=npz["symbols"].astype(str),
            gene_median=npz["gene_median"].astype(np.float64),
            gene_median_norm=bool(npz["gene_median_norm"]),
        )
        if str(npz["vocab_id"]) != vocab.vocab_id:
            raise DataError(f"vocabulary {str(path)!r} does not match its own digest")
    return vocab


def build_vocabulary(
    training: list[tuple[str, sp.spmatrix, np.ndarray]], gene_median_norm: bool
) -> Vocabulary:
    """The corpus vocabulary from each corpus dataset's training cells.

    ``training``: ``(dataset, X, names)`` with ``X`` the training cells' normalised expression
    (:func:`linear`). Keys: every gene symbol expressed in at least one of these cells, sorted;
    medians: per key, the median of its positive values over all of them pooled.
    """
    keys: set[str] = set()
    for dataset, X, names in training:
        check_symbols(names, dataset)
        X = sp.csr_matrix(X)
        expressed = np.zeros(X.shape[1], dtype=bool)
        expressed[X.indices[X.data > 0]] = True
        keys.update(symbol_keys(np.asarray(names)[expressed]))
    symbols = np.array(sorted(keys), dtype=str)
    if symbols.size == 0:
        raise DataError("the corpus' training cells express no gene: the vocabulary is empty")
    if gene_median_norm:
        pooled = sp.vstack([map_genes(X, names, symbols) for _, X, names in training]).tocsr()
        gene_median = gene_nonzero_median(pooled)
    else:
        gene_median = np.ones(symbols.size)
    return Vocabulary(symbols, np.asarray(gene_median, dtype=np.float64), bool(gene_median_norm))


def check_tokenize_params(vocabulary: Vocabulary, gene_median_norm: bool) -> None:
    """ConfigError when tokenize.gene_median_norm differs from the vocabulary's."""
    if vocabulary.gene_median_norm != gene_median_norm:
        raise ConfigError(
            f"tokenize.gene_median_norm is {gene_median_norm} but the corpus vocabulary was built "
            f"with {vocabulary.gene_median_norm}; rebuild the vocabulary"
        )


# --------------------------------------------------------------------------------------------
# the corpus: its cells (sampling) and its vocabulary


def sample_cells(
    split: np.ndarray, dataset: str, params: Pretrain
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the dataset's training and validation cells in the corpus (see the module
    doc)."""
    split = np.asarray(split).astype(str)
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    cap = params.max_cells_per_dataset
    if params.sampling != "capped" or train.size <= cap:
        return train, val
    rng = np.random.default_rng([params.sampling_seed, zlib.crc32(dataset.encode())])
    n_val = min(val.size, max(1, round(val.size * cap / train.size))) if val.size else 0
    return (
        np.sort(rng.choice(train, cap, replace=False)),
        np.sort(rng.choice(val, n_val, replace=False)),
    )


def corpus_vocabulary(units: list[tuple[str, object]], params: Pretrain, gene_median_norm: bool):
    """``(vocabulary, cells, table)`` of the corpus made of ``units`` ``[(name, prepared)]``.

    ``cells``: the chosen cells (``dataset, obs_name, split``). ``table``: a row per corpus
    dataset: its training and validation cells (available and chosen), its genes, and how many
    of them (and of its expressed tokens) it shares with the other corpus datasets.
    """
    if not units:
        raise ConfigError("the pretraining protocol needs at least one corpus dataset")
    training, cells, rows = [], [], []
    for name, adata in units:
        check_symbols(adata.var_names, name)
        if "split" not in adata.obs:
            raise DataError(f"dataset {name!r}: prepared data has no obs['split']")
        split = adata.obs["split"].astype(str).to_numpy()
        train, val = sample_cells(split, name, params)
        if train.size == 0:
            raise DataError(f"dataset {name!r}: no training cells to put in the corpus")
        X = linear(adata.X)
        training.append((name, X[train], np.asarray(adata.var_names, dtype=str)))
        for index, part in ((train, "train"), (val, "val")):
            cells.append(
                pd.DataFrame({"dataset": name, "obs_name": adata.obs_names[index], "split": part})
            )
        rows.append(
            {
                "dataset": name,
                "train_cells": int((split == "train").sum()),
                "train_cells_in_corpus": int(train.size),
                "val_cells": int((split == "val").sum()),
                "val_cells_in_corpus": int(val.size),
            }
        )
    vocabulary = build_vocabulary(training, gene_median_norm)
    keys = {name: set(symbol_keys(names)) for name, _, names in training}
    for row, (name, X, names) in zip(rows, training):
        others = sorted(set().union(*(k for n, k in keys.items() if n != name)))
        shared = match_rates(X, names, np.array(others, dtype=str))
        own = match_rates(X, names, vocabulary.symbols)
        row.update(
            genes=own["n_genes"],
            genes_in_vocabulary=own["n_genes_matched"],
            shared_gene_rate=shared["gene_match_rate"] if others else np.nan,
            shared_token_rate=shared["token_match_rate"] if others else np.nan,
        )
    log.info(
        "corpus of %d datasets: %d training and %d validation cells, %d genes in the vocabulary",
        len(units),
        sum(r["train_cells_in_corpus"] for r in rows),
        sum(r["val_cells_in_corpus"] for r in rows),
        vocabulary.symbols.size,
    )
    return vocabulary, pd.concat(cells, ignore_index=True), pd.DataFrame(rows)


def run_vocabulary(args: argparse.Namespace) -> None:
    log_to_stderr()
    import anndata as ad

    if len(args.names) != len(args.prepared):
        raise ConfigError("vocabulary: --names and --prepared must list the same datasets")
    params = config.section(
        "pretrain", parse_json_arg(args.pretrain_json, "vocabulary: --pretrain-json")
    )
    tokenize = config.section(
        "tokenize", parse_json_arg(args.tokenize_json, "vocabulary: --tokenize-json")
    )
    units = [(name, ad.read_h5ad(path)) for name, path in zip(args.names, args.prepared)]
    vocabulary, cells, table = corpus_vocabulary(units, params, tokenize.gene_median_norm)
    write_csv(args.cells, cells)
    write_csv(args.table, table)
    vocabulary.save(args.vocabulary)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "vocabulary",
        help="the pretraining corpus' cells, gene vocabulary (by symbol) and medians",
    )
    p.add_argument("--names", nargs="+", required=True, help="corpus datasets (units)")
    p.add_argument("--prepared", nargs="+", required=True, help="their prepared.h5ad, in order")
    p.add_argument("--pretrain-json", default="{}", help="the config's pretrain section")
    p.add_argument("--tokenize-json", default="{}", help="the config's tokenize section")
    p.add_argument("--vocabulary", required=True, help="output vocabulary.npz")
    p.add_argument("--cells", required=True, help="output: the corpus' cells (csv)")
    p.add_argument("--table", required=True, help="output: a row per corpus dataset (csv)")
    p.set_defaults(func=run_vocabulary)
