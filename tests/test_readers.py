"""Format readers (sigmoid_sc.readers) on small hand-made files of every format.

One 4-cell x 5-gene count matrix is written as h5ad (counts in a layer), 10x HDF5 (v3),
10x mtx folders (v2 plain, v3 gzipped) and a tar.gz of one, plain HDF5 arrays (Paul15-style),
text matrices (csv cells x genes gzipped, tsv genes x cells with R's short header, the annotated
Zeisel layout); every reader must give back exactly these counts, names and labels. Label joins
cover repeated barcodes across runs and scvi-tools' PBMC pickle; a pickle that would run code
is refused.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sigmoid_sc import readers
from sigmoid_sc.errors import ConfigError, DataError

# cells x genes
COUNTS = np.array(
    [
        [0, 3, 0, 1, 7],
        [2, 0, 0, 0, 1],
        [0, 0, 5, 2, 0],
        [1, 1, 1, 0, 4],
    ],
    dtype=np.float32,
)
CELLS = ["AAAC-1", "AAAG-1", "CCCT-1", "GGGA-1"]
GENES = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY"]
GENE_IDS = [f"ENSG0000{i}" for i in range(5)]
LABELS = ["T", "B", "Mono", "NK"]


def _assert_counts(adata, cells=CELLS, genes=GENES):
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    assert list(adata.obs_names) == list(cells)
    assert list(adata.var_names) == list(genes)
    np.testing.assert_array_equal(adata.X.toarray(), COUNTS)


def _write(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _mtx_folder(folder: Path, v3: bool) -> Path:
    folder.mkdir(parents=True)
    m = sp.coo_matrix(COUNTS.T)  # genes x cells, as Cell Ranger writes it
    body = io.BytesIO()
    import scipy.io

    scipy.io.mmwrite(body, m.astype(np.int64), field="integer")
    suffix = ".gz" if v3 else ""
    _write(folder / f"matrix.mtx{suffix}", body.getvalue().decode(), gz=v3)
    genes = "".join(
        f"{gid}\t{g}" + ("\tGene Expression" if v3 else "") + "\n"
        for gid, g in zip(GENE_IDS, GENES)
    )
    _write(folder / ("features.tsv.gz" if v3 else "genes.tsv"), genes, gz=v3)
    _write(folder / f"barcodes.tsv{suffix}", "".join(c + "\n" for c in CELLS), gz=v3)
    return folder


# ------------------------------------------------------------------------------------------
# count matrices
# ------------------------------------------------------------------------------------------


def test_h5ad_counts_layer(tmp_path):
    norm = np.log1p(COUNTS)
    adata = ad.AnnData(
        norm,
        obs=pd.DataFrame({"cell_type": LABELS}, index=CELLS),
        var=pd.DataFrame(index=GENES),
        layers={"counts": sp.csr_matrix(COUNTS)},
    )
    adata.write_h5ad(tmp_path / "x.h5ad")
    out = readers.read_dataset(tmp_path / "x.h5ad", "h5ad", "d", {"layer": "counts"})
    _assert_counts(out)
    assert list(out.obs["cell_type"]) == LABELS and not out.layers
    with pytest.raises(DataError, match=r"layer 'raw_counts' is not in x.h5ad; layers: counts"):
        readers.read_dataset(tmp_path / "x.h5ad", "h5ad", "d", {"layer": "raw_counts"})
    with pytest.raises(ConfigError, match=r"unknown reader option\(s\) lyer"):
        readers.read_dataset(tmp_path / "x.h5ad", "h5ad", "d", {"lyer": "counts"})


def test_10x_h5_v3(tmp_path):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    csc = sp.csc_matrix(COUNTS.T)  # genes x cells; CSC over cells = CSR of cells x genes
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"] = csc.data.astype(np.int32)
        m["indices"] = csc.indices.astype(np.int64)
        m["indptr"] = csc.indptr.astype(np.int64)
        m["shape"] = np.array(COUNTS.T.shape, dtype=np.int32)
        m["barcodes"] = np.array(CELLS, dtype="S")
        feats = m.create_group("features")
        feats["id"] = np.array(GENE_IDS, dtype="S")
        feats["name"] = np.array(GENES, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * 5, dtype="S")
        feats["genome"] = np.array(["GRCh38"] * 5, dtype="S")
        feats["_all_tag_keys"] = np.array(["genome"], dtype="S")
    _assert_counts(readers.read_dataset(path, "10x_h5", "d"))
    _assert_counts(
        readers.read_dataset(path, "10x_h5", "d", {"var_names": "gene_ids"}), genes=GENE_IDS
    )


@pytest.mark.parametrize("v3", [False, True])
def test_10x_mtx_folder(tmp_path, v3):
    folder = _mtx_folder(tmp_path / "mtx", v3)
    _assert_counts(readers.read_dataset(folder, "10x_mtx", "d"))
    _assert_counts(
        readers.read_dataset(folder, None, "d", {"var_names": "gene_ids"}), genes=GENE_IDS
    )


def test_10x_mtx_inside_tar_gz(tmp_path):
    folder = _mtx_folder(tmp_path / "filtered_gene_bc_matrices" / "GRCh38", v3=False)
    bundle = tmp_path / "pbmc_filtered_gene_bc_matrices.tar.gz"
    with tarfile.open(bundle, "w:gz") as tf:
        tf.add(folder.parent, arcname="filtered_gene_bc_matrices")
    _assert_counts(readers.read_dataset(bundle, "10x_mtx", "d"))
    # a missing barcodes file is named
    os.remove(folder / "barcodes.tsv")
    with pytest.raises(DataError, match="not both barcodes.tsv"):
        readers.read_dataset(folder, "10x_mtx", "d")


def test_h5ad_inside_tar_gz_with_member(tmp_path):
    from sigmoid_sc.fetch import check_format

    adata = ad.AnnData(
        sp.csr_matrix(COUNTS),
        obs=pd.DataFrame({"cell_type": LABELS}, index=CELLS),
        var=pd.DataFrame(index=GENES),
    )
    (tmp_path / "bundle").mkdir()
    adata.write_h5ad(tmp_path / "bundle" / "counts.h5ad")
    (tmp_path / "bundle" / "README.txt").write_text("two files: member picks one")
    path = tmp_path / "bundle.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        tf.add(tmp_path / "bundle", arcname="bundle")
    check_format(path, "h5ad")  # a bundle passes the download check; its member is read below
    _assert_counts(readers.read_dataset(path, "h5ad", "d", {"member": "*/counts.h5ad"}))
    with pytest.raises(DataError, match="holds 2 files; set reader.member"):
        readers.read_dataset(path, "h5ad", "d")


def test_tar_member_escaping_its_folder_is_refused(tmp_path):
    bundle = tmp_path / "evil.tar.gz"
    with tarfile.open(bundle, "w:gz") as tf:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"a,b"))
    with pytest.raises(DataError, match="outside its folder"):
        readers.read_dataset(bundle, "csv", "d")
    assert not (tmp_path.parent / "outside.txt").exists()


def test_text_csv_cells_by_genes_gzipped(tmp_path):
    text = (
        "cell,"
        + ",".join(GENES)
        + "\n"
        + "".join(
            c + "," + ",".join(str(int(v)) for v in row) + "\n" for c, row in zip(CELLS, COUNTS)
        )
    )
    path = _write(tmp_path / "m.csv.gz", text, gz=True)
    _assert_counts(readers.read_dataset(path, "csv", "d", {"orientation": "cells_x_genes"}))


def test_text_tsv_genes_by_cells_short_header(tmp_path):
    # R's write.table: the header has no corner field
    text = (
        "\t".join(CELLS)
        + "\n"
        + "".join(
            g + "\t" + "\t".join(str(int(v)) for v in COUNTS[:, j]) + "\n"
            for j, g in enumerate(GENES)
        )
    )
    _assert_counts(readers.read_dataset(_write(tmp_path / "m.tsv", text), None, "d"))
    bad = text.replace("GNLY\t7", "GNLY\tseven")
    with pytest.raises(DataError, match="non-numeric count"):
        readers.read_dataset(_write(tmp_path / "bad.tsv", bad), "tsv", "d")


def test_text_annotated_zeisel_layout(tmp_path):
    # the Linnarsson lab's layout: annotation rows (column 0 empty, the name in column 1), cell
    # ids in row 7, a spacer row, then genes with their gene-cluster number in column 1
    def row(name, values):
        return "\t".join(["", name] + list(values)) + "\n"

    lines = [
        row("tissue", ["sscortex", "ca1hippocampus", "sscortex", "sscortex"]),
        row("group #", ["1", "2", "3", "4"]),
        row("total mRNA mol", ["11", "3", "7", "7"]),
        row("well", ["1", "2", "3", "4"]),
        row("sex", ["1", "-1", "1", "1"]),
        row("age", ["21", "20", "22", "21"]),
        row("diameter", ["0", "9.5", "0", "0"]),
        row("cell_id", CELLS),
        row("level1class", LABELS),
        row("level2class", ["T1", "B1", "Mono1", "NK1"]),
        "\t\t\t\t\t\n",
    ] + [
        "\t".join([g, str(j % 3)] + [str(int(v)) for v in COUNTS[:, j]]) + "\n"
        for j, g in enumerate(GENES)
    ]
    path = _write(tmp_path / "expression_mRNA.txt", "".join(lines))
    options = {
        "orientation": "genes_x_cells",
        "sep": "\t",
        "obs_rows": {"tissue": 0, "level1class": 8, "level2class": 9},
        "obs_names_row": 7,
        "data_start_row": 11,
        "data_start_col": 2,
        "var_names_col": 0,
    }
    out = readers.read_dataset(path, "text", "zeisel", options)
    _assert_counts(out)
    assert list(out.obs["level1class"]) == LABELS
    assert out.obs.loc["AAAG-1", "tissue"] == "ca1hippocampus"


def test_hdf5_arrays_paul15_layout(tmp_path):
    path = tmp_path / "paul15.h5"
    with h5py.File(path, "w") as f:
        f["data.debatched"] = COUNTS.T  # genes x cells as h5py reads it
        f["data.debatched_rownames"] = np.array([f"{g};alias{g}" for g in GENES], dtype="S")
        f["data.debatched_colnames"] = np.array(CELLS, dtype="S")
        f["cluster.id"] = np.array([[1], [3], [2], [3]])
    options = {
        "matrix": "data.debatched",
        "orientation": "genes_x_cells",
        "var_names": "data.debatched_rownames",
        "obs_names": "data.debatched_colnames",
        "var_names_split": ";",
        "code_labels": {
            "cell_type": {"codes": "cluster.id", "first_code": 1, "names": ["Ery", "MEP", "GMP"]}
        },
    }
    out = readers.read_dataset(path, "hdf5", "paul15", options)
    _assert_counts(out)
    assert list(out.obs["cell_type"]) == ["Ery", "GMP", "MEP", "GMP"]
    with pytest.raises(DataError, match=r"is \(5, 4\) after orientation 'cells_x_genes'"):
        readers.read_dataset(path, "hdf5", "paul15", {**options, "orientation": "cells_x_genes"})
    with pytest.raises(DataError, match="has no dataset"):
        readers.read_dataset(path, "hdf5", "paul15", {**options, "matrix": "counts"})


# ------------------------------------------------------------------------------------------
# several files, label joins
# ------------------------------------------------------------------------------------------


def _part(cells, shift=0):
    return ad.AnnData(
        sp.csr_matrix(COUNTS[: len(cells)] + shift),
        obs=pd.DataFrame(index=cells),
        var=pd.DataFrame(index=GENES),
    )


def test_concat_and_join_with_repeated_barcodes(tmp_path):
    # both runs carry AAAC-1: the first label row for it goes to run a, the second to run b
    a, b = _part(["AAAC-1", "AAAG-1"]), _part(["CCCT-1", "AAAC-1", "TTTT-1"], shift=1)
    a.obs["batch"], b.obs["batch"] = "a", "b"
    merged = readers.concat_parts([("a", a), ("b", b)], "pbmc")
    assert list(merged.obs_names) == ["a_AAAC-1", "a_AAAG-1", "b_CCCT-1", "b_AAAC-1", "b_TTTT-1"]
    table = pd.DataFrame(
        {"cell_type": ["T", "B", "Mono", "NK", "gone"]},
        index=pd.Index(["AAAC-1", "AAAG-1", "CCCT-1", "AAAC-1", "ZZZZ-1"]),
    )
    out = readers.join_labels(merged, table, "pbmc", min_fraction=0.5)
    assert list(out.obs_names) == ["a_AAAC-1", "a_AAAG-1", "b_CCCT-1", "b_AAAC-1"]  # TTTT-1 dropped
    assert list(out.obs["cell_type"]) == ["T", "B", "Mono", "NK"]
    assert list(out.obs["batch"]) == ["a", "a", "b", "b"]
    with pytest.raises(DataError, match=r"only 0 of 5 cells have a label"):
        readers.join_labels(merged, table.set_axis(["x", "y", "z", "w", "v"]), "pbmc")


def test_labels_table_tsv(tmp_path):
    path = _write(
        tmp_path / "labels.tsv.gz",
        "barcodes\tcluster\tcell_type\n"
        + "".join(f"{c}\t{i}\t{lab}\n" for i, (c, lab) in enumerate(zip(CELLS, LABELS))),
        gz=True,
    )
    table = readers.read_labels(
        path, "table", "d", {"barcode_column": "barcodes", "columns": {"label": "cell_type"}}
    )
    assert list(table.index) == CELLS and list(table["label"]) == LABELS
    with pytest.raises(DataError, match="no column 'barcode'"):
        readers.read_labels(path, "table", "d", {"barcode_column": "barcode"})


@pytest.mark.parametrize("protocol", [2, 4])
def test_scvi_pbmc_pickle(tmp_path, protocol):
    meta = {
        "barcodes": pd.DataFrame({"x": range(5)}, index=pd.Index(CELLS + ["CCCC-11"])),
        "clusters": np.array([0, 1, 2, 3, 0]),
        "list_clusters": np.array(["T", "B", "Mono", "NK"]),
        "design": pd.DataFrame(np.zeros((5, 2))),
    }
    path = tmp_path / "pbmc_metadata.pickle"
    path.write_bytes(pickle.dumps(meta, protocol=protocol))
    table = readers.read_labels(path, "scvi_pbmc_pickle", "pbmc12k", {"column": "cell_type"})
    assert list(table.index) == CELLS + ["CCCC-11"]
    assert list(table["cell_type"]) == LABELS + ["T"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"barcodes": _RunsCode()}, protocol=4))
    with pytest.raises(DataError, match=r"refusing to load (posix|os)\.system"):
        readers.read_labels(path, "scvi_pbmc_pickle", "pbmc12k")


def test_infer_format_and_unknown(tmp_path):
    assert readers.infer_format("x.h5ad") == "h5ad"
    assert readers.infer_format("x_filtered_gene_bc_matrices.tar.gz") == "10x_mtx"
    assert readers.infer_format("counts.tsv.gz") == "tsv"
    with pytest.raises(ConfigError, match="cannot tell the format"):
        readers.infer_format("x.loom")
