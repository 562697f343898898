"""The ``tokenize`` stage: rank-value encoding of each cell (Geneformer style).

A cell becomes the sequence of its expressed genes (value > 0), highest first, one token per
gene, truncated to ``max_len``. With ``gene_median_norm: true`` (the default, as Geneformer does
with its corpus medians) each gene's normalised expression (CP10K, ``expm1`` of the log1p values
of ``prepared.h5ad``) is first divided by that gene's median non-zero value over the training
cells, so a gene ranks high where it is high *for that gene*, and ubiquitous housekeeping genes
stop leading every cell. Ties are broken by gene index (lower first), so the encoding is
deterministic.

Token ids: ``pad_id = 0``, ``mask_id = 1``, ``cls_id = 2``; gene ``g`` (column ``g`` of
``prepared.h5ad``) is ``g + 3``, so ``vocab_size = n_genes + 3``. The sequences hold gene
tokens only: a model that wants a CLS token prepends it itself (its sequence is then
``max_len + 1`` long).

With ``--vocabulary`` (the pretraining protocol, :mod:`sigmoid_sc.vocabulary`) the genes are
the corpus vocabulary's instead, matched by symbol, and the medians are the corpus' (from its
training cells, not the dataset's): token ids then mean the same gene in every dataset. The
file then also holds ``vocab_id``, the vocabulary's digest, and ``--match-rates`` writes the
dataset's match rates (``--min-match-rate`` refuses a dataset below the floor).

Output ``tokens.npz``: ``input_ids`` int32 (all cells' tokens concatenated in obs order),
``offsets`` int64 ``[n_cells + 1]`` (cell ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``, the
same layout as ``cu_seqlens``), ``split`` str ``[n_cells]``, ``obs_names`` str ``[n_cells]``,
``gene_names`` str ``[n_genes]``, ``gene_median`` float32 ``[n_genes]`` (1 where not normalised),
and the scalars ``vocab_size``, ``max_len``, ``pad_id``, ``mask_id``, ``cls_id``.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import scipy.sparse as sp

from . import config
from .config import Tokenize
from .errors import ConfigError, DataError
from .io import write_npz
from .runtime import log_to_stderr, parse_json_arg
from .vocabulary import (
    check_match,
    check_symbols,
    check_tokenize_params,
    gene_nonzero_median,
    load_vocabulary,
    match_rates,
)

log = logging.getLogger(__name__)

PAD_ID, MASK_ID, CLS_ID = 0, 1, 2
N_SPECIAL = 3

#: rows sorted per chunk; bounds the lexsort's working memory (a few x nnz of a chunk)
CHUNK_CELLS = 8192


def rank_value_encode(
    X: sp.spmatrix, max_len: int, gene_scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-value encode every row of ``X`` [cells, genes].

    Each row's positive entries, divided by ``gene_scale`` (float ``[n_genes]``) when given, are
    sorted by value descending, ties by gene index ascending, and cut to the first ``max_len``.

    Returns ``(input_ids, offsets)``: int32 token ids (gene index + 3), concatenated row after
    row, and int64 ``offsets [n_cells + 1]``.
    """
    X = sp.csr_matrix(X)
    if not X.has_sorted_indices:
        X = X.sorted_indices()  # a copy: the caller's matrix is left as it is
    n_cells = X.shape[0]
    lengths = np.zeros(n_cells, dtype=np.int64)
    pieces: list[np.ndarray] = []
    for first in range(0, n_cells, CHUNK_CELLS):
        chunk = X[first : first + CHUNK_CELLS]
        rows = np.repeat(np.arange(chunk.shape[0], dtype=np.int32), np.diff(chunk.indptr))
        genes = chunk.indices.astype(np.int64)
        values = np.asarray(chunk.data, dtype=np.float64)
        positive = values > 0
        rows, genes, values = rows[positive], genes[positive], values[positive]
        if gene_scale is not None:
            values = values / gene_scale[genes]
        # order by row, then value descending, then gene index ascending. Within a row the
        # genes arrive in ascending order (sorted CSR indices), so two stable sorts do it, about
        # twice as fast as a three-key lexsort: by value, then by row.
        order = np.argsort(-values, kind="stable")
        order = order[np.argsort(rows[order], kind="stable")]
        rows, genes = rows[order], genes[order]
        row_counts = np.bincount(rows, minlength=chunk.shape[0])
        row_start = np.concatenate([[0], np.cumsum(row_counts)[:-1]])
        rank = np.arange(len(rows)) - row_start[rows]
        keep = rank < max_len
        pieces.append((genes[keep] + N_SPECIAL).astype(np.int32))
        lengths[first : first + chunk.shape[0]] = np.minimum(row_counts, max_len)
    input_ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return input_ids, offsets


def tokenize(adata, dataset: str, params: Tokenize, vocabulary=None) -> dict[str, np.ndarray]:
    """Tokenise a prepared AnnData with the config's ``tokenize`` section; returns the arrays of
    ``tokens.npz`` (see the module doc).

    ``vocabulary`` (a :class:`sigmoid_sc.vocabulary.Vocabulary`): the corpus' genes and medians
    instead of the dataset's own.
    """
    if "split" not in adata.obs:
        raise DataError(
            f"dataset {dataset!r}: prepared data has no obs['split']; run prepare first"
        )
    X = sp.csr_matrix(adata.X)
    split = adata.obs["split"].astype(str).to_numpy()
    n_genes = X.shape[1]
    gene_names = np.asarray(adata.var_names, dtype=str)
    if vocabulary is not None:
        check_tokenize_params(vocabulary, params.gene_median_norm)
        X = vocabulary.cells(X, adata.var_names)
        n_genes, gene_names = len(vocabulary.symbols), vocabulary.symbols.astype(str)
        gene_median = vocabulary.gene_median
        input_ids, offsets = rank_value_encode(X, params.max_len, vocabulary.gene_scale())
    elif params.gene_median_norm:
        # normalised expression (CP10K); ranks compare x / median_g, a ratio of linear values
        X = X.copy()
        X.data = np.expm1(X.data.astype(np.float64))
        train = split == "train"
        if not train.any():
            raise DataError(f"dataset {dataset!r}: no training cells to take gene medians from")
        gene_median = gene_nonzero_median(X[train])
        input_ids, offsets = rank_value_encode(X, params.max_len, gene_median)
    else:
        gene_median = np.ones(n_genes)
        input_ids, offsets = rank_value_encode(X, params.max_len)
    lengths = np.diff(offsets)
    if (lengths == 0).any():
        raise DataError(
            f"dataset {dataset!r}: {int((lengths == 0).sum())} cells have no expressed gene "
            + ("of the corpus vocabulary" if vocabulary is not None else "in prepared data")
        )
    log.info(
        "dataset %s: %d cells, %d tokens, length min %d / median %d / max %d (max_len %d)",
        dataset,
        len(lengths),
        len(input_ids),
        lengths.min(),
        np.median(lengths),
        lengths.max(),
        params.max_len,
    )
    arrays = {
        "input_ids": input_ids,
        "offsets": offsets,
        "split": split.astype(str),
        "obs_names": np.asarray(adata.obs_names, dtype=str),
        "gene_names": gene_names,
        "gene_median": gene_median.astype(np.float32),
        "vocab_size": np.int64(n_genes + N_SPECIAL),
        "max_len": np.int64(params.max_len),
        "pad_id": np.int64(PAD_ID),
        "mask_id": np.int64(MASK_ID),
        "cls_id": np.int64(CLS_ID),
    }
    if vocabulary is not None:
        arrays["vocab_id"] = np.str_(vocabulary.vocab_id)
    return arrays


def run_tokenize(args: argparse.Namespace) -> None:
    log_to_stderr()
    import anndata as ad

    params = config.section("tokenize", parse_json_arg(args.params_json, "tokenize: --params-json"))
    if args.vocabulary is None:
        if args.match_rates is not None or args.min_match_rate is not None:
            raise ConfigError("tokenize: --match-rates and --min-match-rate need --vocabulary")
        write_npz(args.output, **tokenize(ad.read_h5ad(args.input), args.dataset, params))
        return
    from .io import write_json

    if args.min_match_rate is not None:  # the schema's range check, naming the key
        config.section("pretrain", {"min_match_rate": args.min_match_rate})
    vocabulary = load_vocabulary(args.vocabulary)
    adata = ad.read_h5ad(args.input)
    check_symbols(adata.var_names, args.dataset)
    rates = match_rates(adata.X, adata.var_names, vocabulary.symbols)
    log.info(
        "dataset %s: %.1f%% of expressed tokens, %d of %d genes match the corpus vocabulary",
        args.dataset, 100 * rates["token_match_rate"], rates["n_genes_matched"], rates["n_genes"],
    )  # fmt: skip
    if args.min_match_rate is not None:
        check_match(rates, args.dataset, args.min_match_rate)
    write_npz(args.output, **tokenize(adata, args.dataset, params, vocabulary))
    if args.match_rates is not None:
        write_json(args.match_rates, {"dataset": args.dataset, "n_cells": adata.n_obs, **rates})


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenize", help="rank-value encode prepared cells: tokens.npz")
    p.add_argument("--dataset", required=True)
    p.add_argument("--params-json", default="{}", help="the config's tokenize section as JSON")
    p.add_argument("--input", required=True, help="prepared.h5ad")
    p.add_argument("--output", required=True, help="tokens.npz")
    p.add_argument(
        "--vocabulary", default=None, help="the corpus vocabulary.npz (pretraining protocol)"
    )
    p.add_argument(
        "--match-rates", default=None, help="with --vocabulary: write the match rates (json)"
    )
    p.add_argument(
        "--min-match-rate",
        type=float,
        default=None,
        help="with --vocabulary: refuse a dataset whose expressed-token match rate is lower",
    )
    p.set_defaults(func=run_tokenize)
