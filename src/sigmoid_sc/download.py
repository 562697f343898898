"""The ``download`` stage: turn a dataset entry of the config into ``results/<dataset>/raw.h5ad``.

Sources (the entry's ``source``, validated by :mod:`sigmoid_sc.config`):

- ``scanpy``: a dataset shipped inside scanpy's wheel (``name: pbmc68k_reduced``), offline;
  ``use_raw: true`` takes ``.raw`` (all genes, unscaled) as ``X``.
- ``synthetic``: :func:`sigmoid_sc.synthetic.synthetic_counts`, seeded negative-binomial counts
  with known cell types and batches.
- ``path``: a local file, read by :mod:`sigmoid_sc.readers` (h5ad, 10x h5, mtx, text).
- ``url``: http/https with ``sha256``, delegated to :func:`sigmoid_sc.fetch.fetch_url_dataset`.

``normalized: true`` in an entry says ``X`` holds log-normalised values rather than counts. The
data are checked (:mod:`sigmoid_sc.validate`) before anything is written, and ``raw.h5ad`` is
written atomically, so a bad input leaves no output.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import config
from .config import Dataset
from .errors import ConfigError, DataError
from .io import write_h5ad
from .runtime import log_to_stderr, parse_json_arg
from .synthetic import synthetic_counts
from .validate import validate_raw

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


def _from_scanpy(dataset: Dataset):
    import scanpy as sc

    name = dataset.scanpy_name
    loader = getattr(sc.datasets, name, None)
    if loader is None or name.startswith("_") or not callable(loader):
        available = ", ".join(n for n in dir(sc.datasets) if not n.startswith("_"))
        raise ConfigError(
            f"dataset {dataset.name!r}: scanpy has no dataset {name!r}; available: {available}"
        )
    adata = loader()
    if dataset.use_raw:
        if adata.raw is None:
            raise DataError(
                f"dataset {dataset.name!r}: use_raw is set but scanpy's {name!r} has no .raw"
            )
        adata = adata.raw.to_adata()  # keeps obs; var and X from .raw
    return adata


def _from_path(dataset: Dataset):
    """A local file: any format :func:`sigmoid_sc.readers.read_dataset` reads (h5ad, 10x h5,
    10x mtx, hdf5, text; bare or in a tar.gz), with the entry's ``format`` and ``reader`` options.
    """
    from . import readers

    path = Path(dataset.path).expanduser()
    if not path.exists():
        raise DataError(f"dataset {dataset.name!r}: file {str(path)!r} does not exist")
    options = dict(dataset.reader)
    if dataset.use_raw and "use_raw" not in options:
        options["use_raw"] = True  # the entry-level switch, as for scanpy sources
    return readers.read_dataset(path, dataset.format, dataset=dataset.name, options=options)


def load_dataset(
    dataset: Dataset,
    cache_dir: str | None = None,
    lockfile: str | None = None,
    require_checksum: bool = False,
):
    """Load, check and annotate one dataset; returns the AnnData that ``raw.h5ad`` holds.

    ``dataset``: the entry, validated (:func:`sigmoid_sc.config.dataset`). ``X`` becomes float32
    CSR (counts, or log-normalised values when ``normalized: true``); ``uns["sigmoid_sc"]``
    records ``dataset, source, label_key, batch_key, normalized``, which the later stages read.
    Raises :class:`DataError` for bad data (and :class:`DownloadError` for a failed download).
    """
    label_key, batch_key = dataset.label_key, dataset.batch_key
    if dataset.source == "scanpy":
        adata = _from_scanpy(dataset)
    elif dataset.source == "synthetic":
        params = dataclasses.asdict(dataset.synthetic)
        adata = synthetic_counts(**params, label_key=label_key, batch_key=batch_key or "batch")
    elif dataset.source == "path":
        adata = _from_path(dataset)
    else:
        from .fetch import fetch_url_dataset  # lazy: requests etc. only for url entries

        adata = fetch_url_dataset(
            dataset.name, dict(dataset.entry), cache_dir, lockfile, require_checksum
        )
    name = dataset.name

    if not adata.obs_names.is_unique:
        # later stages match cells by obs_names (embeddings, metrics): they must be unique
        log.warning("dataset %s: obs_names are not unique; making them unique", name)
        adata.obs_names_make_unique()
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()

    validate_raw(adata, name, label_key, batch_key)

    # raw.h5ad holds counts, cells and genes only: drop derived slots of the source (a PCA or a
    # neighbour graph of a scaled matrix would be stale once prepare filters cells)
    for slot in (adata.obsm, adata.obsp, adata.varm, adata.varp, adata.layers, adata.uns):
        for key in list(slot.keys()):
            del slot[key]
    X = adata.X
    adata.X = (
        sp.csr_matrix(X, dtype=np.float32) if not sp.isspmatrix_csr(X) else X.astype(np.float32)
    )
    adata.X.eliminate_zeros()
    # labels and batches as string categoricals: stable sorting, clean h5ad round-trip
    for key in (label_key, batch_key):
        if key is not None:
            adata.obs[key] = pd.Categorical(adata.obs[key].astype(str))
    info = {
        "dataset": name,
        "source": dataset.source,
        "label_key": label_key,
        "normalized": dataset.normalized,
    }
    if batch_key is not None:
        info["batch_key"] = batch_key  # h5ad cannot store None: absent means no batch
    adata.uns["sigmoid_sc"] = info
    return adata


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def run_download(args: argparse.Namespace) -> None:
    log_to_stderr()
    entry = parse_json_arg(args.entry_json, f"dataset {args.dataset!r}: --entry-json")
    adata = load_dataset(
        config.dataset(args.dataset, entry),
        cache_dir=args.cache_dir,
        lockfile=args.lockfile,
        require_checksum=args.require_checksum,
    )
    write_h5ad(args.out, adata)
    log.info("dataset %s: wrote %s (%d cells x %d genes)", args.dataset, args.out, *adata.shape)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "download",
        help="load a dataset entry (scanpy, synthetic, path, url), check it, write raw.h5ad",
    )
    p.add_argument("--dataset", required=True, help="dataset name (the key under datasets:)")
    p.add_argument("--entry-json", required=True, help="the dataset's config entry as JSON")
    p.add_argument("--out", required=True, help="output raw.h5ad")
    p.add_argument("--lockfile", default=None, help="url sources: lock file of checksums")
    p.add_argument(
        "--require-checksum", action="store_true", help="url sources: refuse entries without sha256"
    )
    p.add_argument("--cache-dir", default=None, help="url sources: download cache folder")
    p.set_defaults(func=run_download)
