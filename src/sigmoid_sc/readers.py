"""Format readers: each turns one file (or folder, or archive) into an AnnData of raw counts.

Every reader returns cells x genes: ``X`` the counts (float32 CSR), ``var_names`` the genes,
``obs_names`` the cell barcodes or ids, and whatever per-cell annotation the file holds in
``obs``. Formats (the ``format`` of a dataset entry; options come from its ``reader`` mapping):

- ``h5ad``: AnnData; ``layer`` takes ``X`` from a layer (scIB files keep counts in
  ``layers["counts"]``), ``use_raw`` from ``.raw``.
- ``10x_h5``: Cell Ranger HDF5 (v2 and v3) through :func:`scanpy.read_10x_h5`; ``genome``,
  ``gex_only``, ``var_names`` (``gene_symbols`` or ``gene_ids``).
- ``10x_mtx``: Cell Ranger's ``matrix.mtx`` + ``genes.tsv``/``features.tsv`` + ``barcodes.tsv``
  (gzipped or not, v2 or v3 layout), as a folder or inside a tar(.gz); ``var_names``, ``member``.
- ``hdf5``: plain HDF5 arrays (e.g. scanpy's Paul15 file): ``matrix``, ``var_names``,
  ``obs_names``, ``orientation``, ``obs`` (column -> dataset), ``code_labels``.
- ``text`` (also ``csv``, ``tsv``, ``txt``): a delimited matrix, optionally gzipped,
  ``orientation`` ``genes_x_cells`` or ``cells_x_genes``; for files with annotation rows above
  the counts (the Linnarsson lab's Zeisel file) ``obs_rows``, ``obs_names_row``,
  ``data_start_row``, ``data_start_col``, ``var_names_col``.

Any of these may sit inside a tar(.gz) bundle: the archive is unpacked into a temporary folder
(members that would escape it are refused) and ``member`` (a glob) picks the file or folder.

Label tables (:func:`read_labels`, joined by :func:`join_labels`): ``table`` (csv/tsv with a
barcode column) and ``scvi_pbmc_pickle`` (the metadata pickle scvi-tools ships for PBMC 4k+8k).
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import csv
import fnmatch
import gzip
import io
import os
import pickle
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError, DataError

TEXT_FORMATS = {"text", "csv", "tsv", "txt"}
READ_FORMATS = {"h5ad", "10x_h5", "10x_mtx", "hdf5"} | TEXT_FORMATS
GZIP_MAGIC = b"\x1f\x8b"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _counts(X) -> sp.csr_matrix:
    """Counts as float32 CSR, explicit zeros dropped."""
    X = sp.csr_matrix(X, dtype=np.float32)
    X.eliminate_zeros()
    return X


def _open_text(path: Path):
    """A text handle, gunzipping when the file starts with the gzip magic."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    raw = gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def infer_format(path: str | os.PathLike) -> str:
    """Format from a file name (for ``source: path`` entries without ``format``)."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return "10x_mtx"
    for suffix, fmt in (
        (".h5ad", "h5ad"),
        (".h5", "10x_h5"),
        (".hdf5", "hdf5"),
        (".mtx", "10x_mtx"),
        (".mtx.gz", "10x_mtx"),
        (".tar.gz", "10x_mtx"),
        (".tgz", "10x_mtx"),
        (".tar", "10x_mtx"),
        (".csv", "csv"),
        (".csv.gz", "csv"),
        (".tsv", "tsv"),
        (".tsv.gz", "tsv"),
        (".txt", "txt"),
        (".txt.gz", "txt"),
    ):
        if name.endswith(suffix):
            return fmt
    raise ConfigError(f"cannot tell the format of {str(path)!r} from its name: set 'format'")


@contextlib.contextmanager
def _unpacked(path: Path, dataset: str) -> Iterator[Path]:
    """Unpack a tar(.gz) into a temporary folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="sigmoid_sc_tar_") as tmp:
        root = Path(tmp)
        try:
            with tarfile.open(path, "r:*") as tf:
                for member in tf.getmembers():
                    # refuse absolute paths and "..", skip links and devices: a bundle must not
                    # write outside its folder (tarfile's 'data' filter, where present, agrees)
                    target = (root / member.name).resolve()
                    if (
                        not str(target).startswith(str(root.resolve()) + os.sep)
                        and target != root.resolve()
                    ):
                        raise DataError(
                            f"dataset {dataset!r}: archive {path.name} has a member outside its "
                            f"folder ({member.name!r})"
                        )
                    if not (member.isfile() or member.isdir()):
                        continue
                    tf.extract(member, root, set_attrs=False, **_tar_filter())
        except tarfile.TarError as exc:
            raise DataError(f"dataset {dataset!r}: cannot unpack {path.name}: {exc}") from exc
        yield root


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def _tar_filter() -> dict[str, Any]:
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _find_member(root: Path, pattern: str | None, fmt: str, dataset: str) -> Path:
    """The file or folder of an unpacked bundle to read."""
    candidates = sorted(p for p in root.rglob("*") if not p.name.startswith("."))
    if pattern:
        hits = [p for p in candidates if fnmatch.fnmatch(p.relative_to(root).as_posix(), pattern)]
        if len(hits) != 1:
            raise DataError(
                f"dataset {dataset!r}: member pattern {pattern!r} matches {len(hits)} entries of "
                f"the archive (need exactly one); entries: "
                f"{', '.join(p.relative_to(root).as_posix() for p in candidates[:20])}"
            )
        return hits[0]
    if fmt == "10x_mtx":
        folders = sorted(
            {p.parent for p in candidates if p.name in ("matrix.mtx", "matrix.mtx.gz")}
        )
        if len(folders) != 1:
            raise DataError(
                f"dataset {dataset!r}: the archive holds {len(folders)} folders with matrix.mtx "
                f"({', '.join(f.relative_to(root).as_posix() for f in folders) or 'none'}); "
                "set reader.member to pick one"
            )
        return folders[0]
    files = [p for p in candidates if p.is_file()]
    if len(files) != 1:
        raise DataError(
            f"dataset {dataset!r}: the archive holds {len(files)} files; set reader.member to "
            "pick one"
        )
    return files[0]


# ------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------


def read_h5ad(path: Path, dataset: str, layer: str | None = None, use_raw: bool = False):
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py and anndata raise many kinds for a bad file
        raise DataError(f"dataset {dataset!r}: cannot read {path.name} as h5ad: {exc}") from exc
    if use_raw:
        if adata.raw is None:
            raise DataError(
                f"dataset {dataset!r}: reader.use_raw is set but {path.name} has no .raw"
            )
        adata = adata.raw.to_adata()
    if layer:
        if layer not in adata.layers:
            raise DataError(
                f"dataset {dataset!r}: layer {layer!r} is not in {path.name}; layers: "
                f"{', '.join(adata.layers.keys()) or '(none)'}"
            )
        adata.X = adata.layers[layer]
    for key in list(adata.layers.keys()):
        del adata.layers[key]  # the counts are in X now; other layers are derived
    adata.X = _counts(adata.X)
    return adata


def read_10x_h5(
    path: Path,
    dataset: str,
    genome: str | None = None,
    gex_only: bool = True,
    var_names: str = "gene_symbols",
):
    import scanpy as sc

    try:
        adata = sc.read_10x_h5(path, genome=genome, gex_only=gex_only)
    except Exception as exc:
        raise DataError(f"dataset {dataset!r}: cannot read {path.name} as 10x h5: {exc}") from exc
    if var_names == "gene_ids":
        adata.var_names = adata.var["gene_ids"].astype(str)
    elif var_names != "gene_symbols":
        raise ConfigError(f"dataset {dataset!r}: reader.var_names must be gene_symbols or gene_ids")
    adata.var_names_make_unique()
    adata.X = _counts(adata.X)
    return adata


def read_10x_mtx(path: Path, dataset: str, var_names: str = "gene_symbols", gex_only: bool = True):
    """A Cell Ranger matrix folder (or the matrix.mtx file inside one)."""
    import scanpy as sc

    folder = path if path.is_dir() else path.parent
    names = {p.name for p in folder.iterdir()}
    if not names & {"matrix.mtx", "matrix.mtx.gz"}:
        raise DataError(f"dataset {dataset!r}: no matrix.mtx(.gz) in {folder}")
    if not names & {"barcodes.tsv", "barcodes.tsv.gz"} or not names & {
        "genes.tsv",
        "genes.tsv.gz",
        "features.tsv",
        "features.tsv.gz",
    }:
        raise DataError(
            f"dataset {dataset!r}: {folder} has matrix.mtx but not both barcodes.tsv and "
            f"genes.tsv/features.tsv (found {', '.join(sorted(names))})"
        )
    if var_names not in ("gene_symbols", "gene_ids"):
        raise ConfigError(f"dataset {dataset!r}: reader.var_names must be gene_symbols or gene_ids")
    try:
        adata = sc.read_10x_mtx(folder, var_names=var_names, make_unique=True, gex_only=gex_only)
    except Exception as exc:
        raise DataError(f"dataset {dataset!r}: cannot read {folder} as 10x mtx: {exc}") from exc
    adata.X = _counts(adata.X)
    return adata


def read_hdf5_arrays(
    path: Path,
    dataset: str,
    matrix: str,
    var_names: str,
    obs_names: str,
    orientation: str = "genes_x_cells",
    obs: dict[str, str] | None = None,
    code_labels: dict[str, dict[str, Any]] | None = None,
    var_names_split: str | None = None,
):
    """Plain HDF5 arrays: a dense count matrix and name vectors (scanpy's Paul15 file).

    ``orientation`` is the matrix as h5py reads it. ``obs`` copies per-cell arrays into obs
    columns. ``code_labels`` turns integer codes into names:
    ``{cell_type: {codes: cluster.id, names: [Ery, MEP, ...], first_code: 1}}``.
    ``var_names_split`` keeps the first of several names joined by it (``"Gata1;Gf1"``).
    """
    import anndata as ad
    import h5py

    def strings(values) -> np.ndarray:
        values = np.asarray(values).ravel()
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])

    try:
        with h5py.File(path, "r") as f:
            missing = [
                k
                for k in (
                    matrix,
                    var_names,
                    obs_names,
                    *(obs or {}).values(),
                    *(c.get("codes", "") for c in (code_labels or {}).values()),
                )
                if k not in f
            ]
            if missing:
                raise DataError(
                    f"dataset {dataset!r}: {path.name} has no dataset(s) {', '.join(missing)}; "
                    f"it holds {', '.join(f.keys())}"
                )
            X = np.asarray(f[matrix][()], dtype=np.float32)
            genes = strings(f[var_names][()])
            cells = strings(f[obs_names][()])
            columns = {col: np.asarray(f[key][()]).ravel() for col, key in (obs or {}).items()}
            codes = {
                col: np.asarray(f[spec["codes"]][()]).ravel()
                for col, spec in (code_labels or {}).items()
            }
    except OSError as exc:
        raise DataError(f"dataset {dataset!r}: cannot read {path.name} as HDF5: {exc}") from exc
    if orientation == "genes_x_cells":
        X = X.T
    elif orientation != "cells_x_genes":
        raise ConfigError(
            f"dataset {dataset!r}: reader.orientation must be genes_x_cells or cells_x_genes"
        )
    if X.shape != (len(cells), len(genes)):
        raise DataError(
            f"dataset {dataset!r}: matrix {matrix!r} is {X.shape} after orientation "
            f"{orientation!r}, but there are {len(cells)} cell and {len(genes)} gene names"
        )
    if var_names_split:
        genes = np.array([g.split(var_names_split)[0] for g in genes])
    frame = pd.DataFrame(index=pd.Index(cells))
    for col, values in columns.items():
        frame[col] = strings(values) if values.dtype.kind in "SOU" else values
    for col, spec in (code_labels or {}).items():
        names = list(spec["names"])
        first = int(spec.get("first_code", 0))
        idx = codes[col].astype(int) - first
        if idx.min() < 0 or idx.max() >= len(names):
            raise DataError(
                f"dataset {dataset!r}: codes of {spec['codes']!r} run {idx.min() + first}.."
                f"{idx.max() + first}, outside the {len(names)} names given for {col!r}"
            )
        frame[col] = pd.Categorical(np.asarray(names, dtype=object)[idx])
    adata = ad.AnnData(X=_counts(X), obs=frame, var=pd.DataFrame(index=pd.Index(genes)))
    adata.var_names_make_unique()
    return adata


def read_text_matrix(
    path: Path,
    dataset: str,
    orientation: str = "genes_x_cells",
    sep: str | None = None,
    obs_rows: dict[str, int] | None = None,
    obs_names_row: int = 0,
    data_start_row: int = 1,
    data_start_col: int = 1,
    var_names_col: int = 0,
    fmt: str = "text",
):
    """A delimited count matrix, gzipped or not.

    Plain layout (defaults): a header row of column names and one row per gene (or cell) whose
    first field is its name. Annotated layout (Zeisel et al. 2015, genes x cells): per-cell
    annotation rows above the counts (``obs_rows: {level1class: 8, ...}``, row indices from 0,
    values from column ``data_start_col`` on), cell names in row ``obs_names_row``, counts from
    row ``data_start_row`` and column ``data_start_col``, gene names in ``var_names_col``.
    """
    import anndata as ad

    if orientation not in ("genes_x_cells", "cells_x_genes"):
        raise ConfigError(
            f"dataset {dataset!r}: reader.orientation must be genes_x_cells or cells_x_genes"
        )
    obs_rows = dict(obs_rows or {})
    with _open_text(path) as fh:
        first = fh.readline()
        if sep is None:
            sep = (
                ","
                if fmt == "csv"
                else "\t"
                if fmt == "tsv" or "\t" in first
                else ","
                if "," in first
                else " "
            )
        fh.seek(0)
        reader = csv.reader(fh, delimiter=sep, skipinitialspace=sep == " ")
        header_rows: dict[int, list[str]] = {}
        row_names: list[str] = []
        rows: list[sp.csr_matrix] = []
        width = None
        for i, row in enumerate(reader):
            if i < data_start_row:
                header_rows[i] = row
                continue
            if not row or all(not field.strip() for field in row):
                continue
            values = row[data_start_col:]
            if width is None:
                width = len(values)
            elif len(values) != width:
                raise DataError(
                    f"dataset {dataset!r}: {path.name} line {i + 1} has {len(values)} values, "
                    f"earlier lines {width}"
                )
            try:
                dense = np.asarray(values, dtype=np.float32)
            except ValueError as exc:
                raise DataError(
                    f"dataset {dataset!r}: {path.name} line {i + 1} holds a non-numeric count ({exc})"
                ) from exc
            rows.append(sp.csr_matrix(dense[None, :]))
            row_names.append(row[var_names_col].strip())
    if not rows:
        raise DataError(f"dataset {dataset!r}: {path.name} holds no data rows")
    X = sp.vstack(rows, format="csr")  # [rows, columns] as in the file
    names_row = header_rows.get(obs_names_row, [])
    # R's write.table leaves out the corner field: the header is one shorter than data rows
    col_names = (
        names_row[data_start_col:]
        if len(names_row) >= width + data_start_col
        else names_row[-width:]
    )
    if len(col_names) != width:
        raise DataError(
            f"dataset {dataset!r}: {path.name} row {obs_names_row} has {len(col_names)} names "
            f"for {width} columns"
        )
    col_names = [c.strip() for c in col_names]
    annotations = {}
    for col, r in obs_rows.items():
        if r not in header_rows:
            raise ConfigError(
                f"dataset {dataset!r}: reader.obs_rows[{col!r}] = {r} is not a row above "
                f"data_start_row {data_start_row}"
            )
        values = header_rows[r][data_start_col:]
        if len(values) != width:
            raise DataError(
                f"dataset {dataset!r}: {path.name} annotation row {r} ({col}) has {len(values)} "
                f"values for {width} columns"
            )
        annotations[col] = [v.strip() for v in values]
    if orientation == "genes_x_cells":
        X, cells, genes = X.T.tocsr(), col_names, row_names
    else:
        cells, genes = row_names, col_names
        if annotations:
            raise ConfigError(f"dataset {dataset!r}: obs_rows need orientation genes_x_cells")
    obs = pd.DataFrame(annotations, index=pd.Index(cells))
    adata = ad.AnnData(X=_counts(X), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.var_names_make_unique()
    adata.obs_names_make_unique()
    return adata


_READER_OPTIONS = {
    "h5ad": {"layer", "use_raw"},
    "10x_h5": {"genome", "gex_only", "var_names"},
    "10x_mtx": {"var_names", "gex_only"},
    "hdf5": {
        "matrix",
        "var_names",
        "obs_names",
        "orientation",
        "obs",
        "code_labels",
        "var_names_split",
    },
    "text": {
        "orientation",
        "sep",
        "obs_rows",
        "obs_names_row",
        "data_start_row",
        "data_start_col",
        "var_names_col",
    },
}


_LABEL_OPTIONS = {
    "scvi_pbmc_pickle": {"column"},
    "table": {"barcode_column", "columns", "sep"},
    "csv": {"barcode_column", "columns", "sep"},
    "tsv": {"barcode_column", "columns", "sep"},
}
_REQUIRED_OPTIONS = {"hdf5": ("matrix", "var_names", "obs_names")}


def reader_option_problems(
    fmt: str, options: dict[str, Any] | None, labels: bool = False
) -> list[str]:
    """What is wrong with the ``reader`` options of a file of format ``fmt`` (a data file, or a
    labels file when ``labels``): unknown options, or ones its reader needs. Empty when fine.

    The config's schema knows the formats; the options each reader takes are known here, beside
    the readers, and :mod:`sigmoid_sc.config` asks before any job runs.
    """
    table = (
        _LABEL_OPTIONS
        if labels
        else {f: _READER_OPTIONS["text" if f in TEXT_FORMATS else f] for f in READ_FORMATS}
    )
    if fmt not in table:
        return [
            f"no reader for {'labels ' if labels else ''}format {fmt!r} (known: {', '.join(sorted(table))})"
        ]
    options = dict(options or {})
    options.pop("member", None)
    known = table[fmt]
    problems = []
    unknown = sorted(set(options) - known)
    if unknown:
        problems.append(
            f"unknown reader option(s) {', '.join(unknown)} for format {fmt!r}; "
            f"known: {', '.join(sorted(known | {'member'}))}"
        )
    for key in () if labels else _REQUIRED_OPTIONS.get(fmt, ()):
        if key not in options:
            problems.append(f"format {fmt} needs reader.{key}")
    return problems


def check_options(
    fmt: str, options: dict[str, Any] | None, dataset: str = "?", labels: bool = False
) -> None:
    """Refuse unknown or missing reader options (see :func:`reader_option_problems`)."""
    problems = reader_option_problems(fmt, options, labels)
    if problems:
        raise ConfigError(f"dataset {dataset!r}: {'; '.join(problems)}")


def read_dataset(
    path: str | os.PathLike,
    fmt: str | None = None,
    dataset: str = "?",
    options: dict[str, Any] | None = None,
):
    """Read one file, folder or tar(.gz) bundle of format ``fmt`` into a counts AnnData."""
    path = Path(path)
    fmt = fmt or infer_format(path)
    options = dict(options or {})
    member = options.pop("member", None)
    if not path.exists():
        raise DataError(f"dataset {dataset!r}: {str(path)!r} does not exist")
    if path.is_file() and not _is_hdf5(path) and tarfile.is_tarfile(path):
        with _unpacked(path, dataset) as root:
            inner = _find_member(root, member, fmt, dataset)
            return read_dataset(inner, fmt, dataset, options)
    kind = "text" if fmt in TEXT_FORMATS else fmt
    check_options(fmt, options, dataset)
    if kind == "h5ad":
        return read_h5ad(path, dataset, **options)
    if kind == "10x_h5":
        return read_10x_h5(path, dataset, **options)
    if kind == "10x_mtx":
        return read_10x_mtx(path, dataset, **options)
    if kind == "hdf5":
        return read_hdf5_arrays(path, dataset, **options)
    return read_text_matrix(path, dataset, fmt=fmt, **options)


def concat_parts(parts: list[tuple[str, Any]], dataset: str):
    """Concatenate the AnnData of several files (cells stacked, genes shared).

    The original cell ids go to ``obs["barcode"]``; ``obs_names`` become ``<part>_<barcode>``
    so two runs of the same chemistry (the same barcode whitelist) cannot collide.
    """
    import anndata as ad

    if len(parts) == 1:
        adata = parts[0][1]
        if "barcode" not in adata.obs:
            adata.obs["barcode"] = adata.obs_names.astype(str)
        return adata
    pieces = []
    for name, adata in parts:
        adata = adata.copy()
        adata.obs["barcode"] = adata.obs_names.astype(str)
        adata.obs_names = [f"{name}_{b}" for b in adata.obs_names]
        pieces.append(adata)
    shared = set(pieces[0].var_names).intersection(*(p.var_names for p in pieces[1:]))
    if not shared:
        raise DataError(f"dataset {dataset!r}: the files {[n for n, _ in parts]} share no gene")
    adata = ad.concat(pieces, join="inner", merge="same")
    adata.X = _counts(adata.X)
    return adata


# ------------------------------------------------------------------------------------------
# labels kept in a separate file
# ------------------------------------------------------------------------------------------


try:  # pandas' own unpickler maps classes renamed across pandas versions (pd.read_pickle's)
    from pandas.compat.pickle_compat import Unpickler as _CompatUnpickler
    from pandas.compat.pickle_compat import _class_locations_map
except ImportError:  # pragma: no cover - a pandas without it
    _CompatUnpickler, _class_locations_map = pickle._Unpickler, {}

_PICKLE_BUILTINS = {
    "object",
    "slice",
    "range",
    "complex",
    "set",
    "frozenset",
    "bytearray",
    "dict",
    "list",
    "tuple",
}
_PICKLE_NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}


def _pickle_allowed(module: str, name: str) -> bool:
    if module == "builtins":
        return name in _PICKLE_BUILTINS
    if (module, name) in {
        ("copyreg", "_reconstructor"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }:
        return True
    if module.split(".")[0] == "numpy":
        return name in _PICKLE_NUMPY
    if module.startswith(("pandas.core.", "pandas._libs.")):
        return not module.startswith("pandas.core.computation") and not name.startswith(
            ("read", "eval", "to_", "query")
        )
    return False


class _SafeUnpickler(_CompatUnpickler):
    """Unpickles numpy arrays and pandas frames, nothing else.

    A pickle can call any function it names; this one resolves only numpy/pandas data classes
    and their reconstructors (after pandas' own map of renamed classes, e.g. ``Int64Index``),
    so a tampered file fails with an error instead of running code.
    """

    def find_class(self, module: str, name: str):
        # Python 2 names (__builtin__, copy_reg) as pickle itself maps them, then pandas' renames
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        module, name = _class_locations_map.get((module, name), (module, name))
        if not _pickle_allowed(module, name):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a pickle")
        try:
            return super().find_class(module, name)
        except (ModuleNotFoundError, AttributeError):
            if module.startswith("pandas.core.indexes"):
                return pd.Index  # an index class gone from this pandas
            raise


def _load_pickle(path: Path, dataset: str):
    for encoding in ("ASCII", "latin1"):  # latin1: pickles written by Python 2
        try:
            with open(path, "rb") as fh:
                return _SafeUnpickler(fh, encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as exc:
            raise DataError(f"dataset {dataset!r}: cannot load pickle {path.name}: {exc}") from exc
    raise DataError(f"dataset {dataset!r}: cannot decode pickle {path.name}")


def read_labels(
    path: str | os.PathLike, fmt: str, dataset: str = "?", options: dict[str, Any] | None = None
) -> pd.DataFrame:
    """A labels table: index = cell barcode (repeats allowed, in file order), label columns.

    ``table`` (csv/tsv, gzipped or not): ``barcode_column`` (default the first), ``columns``
    (``{obs column: file column}``, default all), ``sep``. ``scvi_pbmc_pickle``: the
    ``barcodes``, ``clusters`` and ``list_clusters`` of scvi-tools' ``pbmc_metadata.pickle``
    become a column named ``column`` (default ``cell_type``).
    """
    path = Path(path)
    options = dict(options or {})
    if fmt == "scvi_pbmc_pickle":
        check_options(fmt, options, dataset, labels=True)
        meta = _load_pickle(path, dataset)
        try:
            barcodes = np.asarray(meta["barcodes"].index).ravel().astype(str)
            clusters = np.asarray(meta["clusters"]).ravel().astype(int)
            names = np.asarray(meta["list_clusters"]).ravel().astype(str)
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataError(
                f"dataset {dataset!r}: {path.name} lacks scvi-tools' barcodes/clusters/"
                f"list_clusters ({exc})"
            ) from exc
        if len(barcodes) != len(clusters) or clusters.min() < 0 or clusters.max() >= len(names):
            raise DataError(
                f"dataset {dataset!r}: {path.name}: {len(barcodes)} barcodes, {len(clusters)} "
                f"cluster codes in 0..{clusters.max()}, {len(names)} cluster names: inconsistent"
            )
        return pd.DataFrame(
            {options.get("column", "cell_type"): names[clusters]},
            index=pd.Index(barcodes, name="barcode"),
        )
    if fmt in ("table", "csv", "tsv"):
        check_options(fmt, options, dataset, labels=True)
        sep = options.get("sep") or ("," if fmt == "csv" else None)
        with _open_text(path) as fh:
            frame = pd.read_csv(fh, sep=sep, engine="python", dtype=str)
        barcode_column = options.get("barcode_column", frame.columns[0])
        if barcode_column not in frame:
            raise DataError(
                f"dataset {dataset!r}: labels file {path.name} has no column {barcode_column!r}; "
                f"columns: {', '.join(frame.columns)}"
            )
        columns = options.get("columns") or {c: c for c in frame.columns if c != barcode_column}
        missing = [c for c in columns.values() if c not in frame]
        if missing:
            raise DataError(
                f"dataset {dataset!r}: labels file {path.name} has no column(s) {', '.join(missing)}"
            )
        out = pd.DataFrame(
            {new: frame[old].to_numpy() for new, old in columns.items()},
            index=pd.Index(frame[barcode_column].astype(str), name="barcode"),
        )
        return out
    raise ConfigError(
        f"dataset {dataset!r}: unknown labels format {fmt!r}; known: table, csv, tsv, scvi_pbmc_pickle"
    )


def join_labels(
    adata,
    table: pd.DataFrame,
    dataset: str = "?",
    key_column: str = "barcode",
    drop_unlabelled: bool = True,
    min_fraction: float = 0.5,
):
    """Add the columns of ``table`` to ``adata.obs``, matching ``obs[key_column]`` to its index.

    Barcodes may repeat (two 10x runs share a whitelist): the k-th occurrence of a barcode in
    the table goes to the k-th cell carrying it, in the order of ``adata`` (files in entry
    order). Cells with no label are dropped (``drop_unlabelled``); fewer than ``min_fraction``
    of cells labelled means the keys do not match (a suffix like ``-1``?) and is an error.
    """
    keys = (
        adata.obs[key_column].astype(str).to_numpy()
        if key_column in adata.obs
        else adata.obs_names.to_numpy(str)
    )
    # occurrence number of each key, on both sides
    cell_rank = pd.Series(keys).groupby(keys).cumcount().to_numpy()
    table_keys = table.index.to_numpy(str)
    table_rank = pd.Series(table_keys).groupby(table_keys).cumcount().to_numpy()
    position = {(k, r): i for i, (k, r) in enumerate(zip(table_keys, table_rank))}
    rows = np.array([position.get((k, r), -1) for k, r in zip(keys, cell_rank)])
    found = rows >= 0
    if found.mean() < min_fraction:
        raise DataError(
            f"dataset {dataset!r}: only {int(found.sum())} of {len(keys)} cells have a label in "
            f"the labels file (cell keys look like {keys[:2].tolist()}, label keys like "
            f"{table_keys[:2].tolist()})"
        )
    for col in table.columns:
        values = np.full(len(keys), None, dtype=object)
        values[found] = table[col].to_numpy()[rows[found]]
        adata.obs[col] = values
    if drop_unlabelled and not found.all():
        adata = adata[found].copy()
    for col in table.columns:
        adata.obs[col] = pd.Categorical(adata.obs[col].astype(str))
    return adata
