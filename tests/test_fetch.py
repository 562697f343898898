"""Verified downloads (sigmoid_sc.fetch), against a loopback HTTP server the tests start.

The server (127.0.0.1, a free port, a thread per test module) serves a good h5ad and every way
a download goes wrong: 404, 202 with an empty body (figshare's answer to scripts), an HTML page,
a truncated body, a wrong checksum, redirects (and a redirect loop), and a connection dropped
half-way with and without Range support. Unit tests call :func:`fetch_file` directly; the
workflow tests run the real ``download`` rule through ``snakemake`` in a temporary folder and
check each dataset's outcome, the error text in its log, and that no ``raw.h5ad`` stands after
a failure. Nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import shutil
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from conftest_workflow import snakemake

from sigmoid_sc import fetch as dl
from sigmoid_sc.errors import DownloadError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# the loopback server
# ------------------------------------------------------------------------------------------


def _h5ad_bytes(tmp: Path, n_cells: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # dense-ish counts, stored uncompressed: a file of several chunks, so a drop is mid-file
    counts = rng.poisson(2.0, size=(n_cells, 40)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{i % 3}" for i in range(n_cells)]),
            "batch": pd.Categorical([f"b{i % 2}" for i in range(n_cells)]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(
        sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(40)])
    )
    path = tmp / f"src_{seed}.h5ad"
    adata.write_h5ad(path)
    return path.read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(
        self,
        status: int,
        body: bytes,
        content_type="application/octet-stream",
        length: int | None = None,
        extra: dict | None = None,
    ):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _drop(self, body: bytes, status=200, extra=None):
        """Announce the whole body, send half of it, close the connection."""
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:DROP_AT])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)

    def _serve_ranged(self, body: bytes):
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self._send(
                206,
                body[start:],
                extra={
                    "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                    "Accept-Ranges": "bytes",
                },
            )
        else:
            self._send(200, body, extra={"Accept-Ranges": "bytes"})

    def do_GET(self):  # noqa: N802 - the http.server API
        srv = self.server
        path = self.path.split("?")[0]
        with srv.lock:
            srv.requests.append((path, self.headers.get("Range")))
            n_seen = sum(1 for p, _ in srv.requests if p == path)
        good, other = srv.good, srv.other
        if path == "/good.h5ad":
            self._serve_ranged(good)
        elif path == "/other.h5ad":  # a valid h5ad, but not the one the checksum names
            self._send(200, other)
        elif path == "/missing.h5ad":
            self._send(404, b"not found", content_type="text/plain")
        elif path.startswith("/ndownloader/"):  # figshare's answer to scripts
            self._send(202, b"")
        elif path == "/login.h5ad":
            page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
            self._send(200, page, content_type="text/html; charset=utf-8")
        elif path == "/sneaky-html.h5ad":  # HTML with a binary content type
            self._send(200, b"\n<html><body>cookie wall</body></html>")
        elif path == "/empty.h5ad":
            self._send(200, b"")
        elif path == "/truncated.h5ad":  # always cut short, no Range support
            self._drop(good)
        elif path == "/redirect.h5ad":
            self._send(302, b"", extra={"Location": "/hop.h5ad"})
        elif path == "/hop.h5ad":
            self._send(301, b"", extra={"Location": "/good.h5ad"})
        elif path == "/loop.h5ad":
            self._send(302, b"", extra={"Location": "/loop.h5ad"})
        # stateful routes count requests per full path: each test uses its own /<route>/<name>
        elif path.startswith("/drop/"):  # first answer dropped half-way, later ones resume
            if n_seen == 1:
                self._drop(good, extra={"Accept-Ranges": "bytes"})
            else:
                self._serve_ranged(good)
        elif path.startswith("/drop-norange/"):  # dropped once, then ignores Range (200 whole file)
            if n_seen == 1:
                self._drop(good)
            else:
                self._send(200, good)
        elif path.startswith("/flaky/"):  # 503 twice, then fine
            if n_seen <= 2:
                self._send(503, b"busy", content_type="text/plain")
            else:
                self._send(200, good)
        elif path == "/labels.tsv":
            self._send(200, srv.labels)
        elif path.startswith("/files/") and path[7:] in srv.files:  # files a test puts there
            self._send(200, srv.files[path[7:]])
        else:
            self._send(404, b"no such path", content_type="text/plain")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, good: bytes, other: bytes, labels: bytes):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.good, self.other, self.labels = good, other, labels
        self.requests: list[tuple[str, str | None]] = []
        self.files: dict[str, bytes] = {}
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def requests_for(self, path: str) -> list[str | None]:
        with self.lock:
            return [r for p, r in self.requests if p == path]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    good = _h5ad_bytes(tmp, 1500, seed=0)
    other = _h5ad_bytes(tmp, 1500, seed=1)
    labels = "barcode\tcell_type\n" + "".join(f"cell_{i}\tT{i % 4}\n" for i in range(1500))
    srv = _Server(good, other, labels.encode())
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rf(server, *paths, sha=None, size=None, fmt="h5ad", name="ds", part="data"):
    return dl.RemoteFile(
        dataset=name,
        part=part,
        urls=[server.base + p for p in paths],
        format=fmt,
        sha256=sha,
        size=size,
    )


DROP_AT = 2 * dl.CHUNK_BYTES  # where dropped connections break: a whole number of chunks
FAST = {"retries": 2, "timeout_s": 5.0, "backoff_s": 0.01}


# ------------------------------------------------------------------------------------------
# unit tests: one file
# ------------------------------------------------------------------------------------------


def test_good_file_is_verified_and_cached(server, tmp_path):
    rf = _rf(server, "/good.h5ad", sha=_sha(server.good), size=len(server.good))
    path = dl.fetch_file(rf, tmp_path, **FAST)
    assert path.read_bytes() == server.good
    assert not list(tmp_path.rglob("*.part"))
    n = len(server.requests_for("/good.h5ad"))
    assert dl.fetch_file(rf, tmp_path, **FAST) == path  # verified cache hit: no request
    assert len(server.requests_for("/good.h5ad")) == n


@pytest.mark.parametrize(
    "path, message",
    [
        ("/missing.h5ad", "HTTP 404"),
        ("/ndownloader/files/24539828", "HTTP 202"),
        ("/login.h5ad", "HTML page"),
        ("/sneaky-html.h5ad", "HTML page"),
        ("/empty.h5ad", "empty body"),
        ("/truncated.h5ad", f"truncated body: the connection dropped after {DROP_AT} of"),
        ("/loop.h5ad", "redirects"),
    ],
)
def test_bad_answers_fail_naming_dataset_address_and_cause(server, tmp_path, path, message):
    rf = _rf(server, path, name="pancreas")
    with pytest.raises(DownloadError) as err:
        dl.fetch_file(rf, tmp_path, **FAST)
    text = str(err.value)
    assert "'pancreas'" in text and server.base + path in text and message in text
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing left behind


def test_truncated_body_is_retried_then_given_up(server, tmp_path):
    before = len(server.requests_for("/truncated.h5ad"))
    with pytest.raises(DownloadError, match=r"truncated body.*gave up after 3 attempts"):
        dl.fetch_file(_rf(server, "/truncated.h5ad"), tmp_path, **FAST)
    assert len(server.requests_for("/truncated.h5ad")) - before == 3


def test_wrong_checksum_fails(server, tmp_path):
    rf = _rf(server, "/other.h5ad", sha=_sha(server.good), name="lung")
    with pytest.raises(DownloadError, match=r"sha256 mismatch: got [0-9a-f]{64}, expected"):
        dl.fetch_file(rf, tmp_path, **FAST)
    assert not list(tmp_path.rglob("*.h5ad*"))


def test_wrong_size_fails(server, tmp_path):
    rf = _rf(server, "/good.h5ad", size=len(server.good) + 1)
    with pytest.raises(DownloadError, match=rf"announces {len(server.good)} bytes, expected"):
        dl.fetch_file(rf, tmp_path, **FAST)


def test_redirects_are_followed(server, tmp_path):
    path = dl.fetch_file(_rf(server, "/redirect.h5ad", sha=_sha(server.good)), tmp_path, **FAST)
    assert path.read_bytes() == server.good


def test_dropped_connection_resumes_with_range(server, tmp_path):
    stats = dl._Stats()
    path = dl.fetch_file(
        _rf(server, "/drop/unit.h5ad", sha=_sha(server.good)), tmp_path, stats=stats, **FAST
    )
    assert path.read_bytes() == server.good
    ranges = server.requests_for("/drop/unit.h5ad")
    assert ranges == [None, f"bytes={DROP_AT}-"]
    assert stats.resumed_from == [DROP_AT] and stats.restarts == 0


def test_dropped_connection_restarts_when_range_is_ignored(server, tmp_path):
    stats = dl._Stats()
    path = dl.fetch_file(_rf(server, "/drop-norange/unit.h5ad"), tmp_path, stats=stats, **FAST)
    assert path.read_bytes() == server.good
    assert stats.restarts == 1 and stats.resumed_from == []


def test_server_errors_back_off_and_retry(server, tmp_path):
    path = dl.fetch_file(_rf(server, "/flaky/unit.h5ad"), tmp_path, **FAST)
    assert path.read_bytes() == server.good


def test_mirror_fallback_after_202(server, tmp_path):
    rf = _rf(server, "/ndownloader/files/1", "/missing.h5ad", "/good.h5ad")
    assert dl.fetch_file(rf, tmp_path, **FAST).read_bytes() == server.good


def test_format_check_rejects_non_hdf5(server, tmp_path):
    rf = _rf(server, "/labels.tsv", fmt="h5ad")
    with pytest.raises(DownloadError, match="no HDF5 signature"):
        dl.fetch_file(rf, tmp_path, **FAST)


def test_lock_records_then_enforces(server, tmp_path):
    lock = dl.LockFile(tmp_path / "cfg.lock.yaml")
    rf = _rf(server, "/good.h5ad", name="pbmc")
    dl.fetch_file(rf, tmp_path / "cache", lock, **FAST)
    entry = yaml.safe_load(lock.path.read_text())["files"]["pbmc/data"]
    assert entry == {"sha256": _sha(server.good), "size": len(server.good), "url": rf.urls[0]}
    # the same entry now pointing at a different file fails against the lock
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(
        DownloadError, match=r"(sha256 mismatch|announces \d+ bytes, expected \d+).*lock file"
    ):
        dl.fetch_file(_rf(server, "/other.h5ad", name="pbmc"), tmp_path / "cache", lock, **FAST)


def test_require_checksum_refuses_unknown(server, tmp_path):
    lock = dl.LockFile(tmp_path / "cfg.lock.yaml")
    before = len(server.requests_for("/good.h5ad"))
    with pytest.raises(DownloadError, match="no known sha256"):
        dl.fetch_file(_rf(server, "/good.h5ad"), tmp_path, lock, require_checksum=True, **FAST)
    assert len(server.requests_for("/good.h5ad")) == before  # refused before any request
    ok = _rf(server, "/good.h5ad", sha=_sha(server.good))
    assert dl.fetch_file(ok, tmp_path, lock, require_checksum=True, **FAST).exists()


def test_lock_file_stays_sorted_and_complete(tmp_path):
    lock = dl.LockFile(tmp_path / "x.lock.yaml")
    threads = [
        threading.Thread(target=lock.record, args=(f"ds{i}/data", f"{i:064x}", i, f"https://h/{i}"))
        for i in (5, 1, 3, 2, 4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = lock.path.read_text()
    assert text.startswith("# sha256")
    keys = list(yaml.safe_load(text)["files"])
    assert keys == sorted(keys) and len(keys) == 5
    assert dl.lockfile_for("configs/paper.yaml") == Path("configs/paper.lock.yaml")


def test_fetch_url_dataset_with_labels_join(server, tmp_path):
    entry = {
        "source": "url",
        "url": server.base + "/good.h5ad",
        "format": "h5ad",
        "label_key": "fine_type",
        "batch_key": "batch",
        "obs": {
            "url": server.base + "/labels.tsv",
            "format": "table",
            "reader": {"columns": {"fine_type": "cell_type"}},
        },
        **FAST,
    }
    adata = dl.fetch_url_dataset("pbmc", entry, tmp_path / "cache", tmp_path / "c.lock.yaml", False)
    assert adata.n_obs == 1500 and "fine_type" in adata.obs and "batch" in adata.obs
    assert adata.obs.loc["cell_5", "fine_type"] == "T1"
    locked = yaml.safe_load((tmp_path / "c.lock.yaml").read_text())["files"]
    assert set(locked) == {"pbmc/data", "pbmc/labels"}


def _tenx_tar(tmp: Path, name: str, cells: list[str], counts: np.ndarray) -> bytes:
    """A Cell Ranger 2 filtered_gene_bc_matrices tar.gz (genes x cells matrix.mtx)."""
    import io
    import tarfile

    import scipy.io

    folder = tmp / name / "filtered_gene_bc_matrices" / "GRCh38"
    folder.mkdir(parents=True)
    scipy.io.mmwrite(
        folder / "matrix.mtx", sp.coo_matrix(counts.T.astype(np.int64)), field="integer"
    )
    (folder / "genes.tsv").write_text(
        "".join(f"ENSG{j:05d}\tG{j}\n" for j in range(counts.shape[1]))
    )
    (folder / "barcodes.tsv").write_text("".join(c + "\n" for c in cells))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder.parent, arcname="filtered_gene_bc_matrices")
    return buf.getvalue()


def test_fetch_url_dataset_pbmc_shape(server, tmp_path):
    """Two 10x runs sharing a barcode + scvi-tools' label pickle, as configs/paper.yaml's pbmc12k."""
    import pickle

    rng = np.random.default_rng(0)
    cells8k = ["AAAC-1", "AAAG-1", "CCCT-1", "GGGA-1"]
    cells4k = ["AAAC-1", "TTTA-1", "TTTC-1"]  # AAAC-1 in both runs
    server.files["pbmc8k.tar.gz"] = _tenx_tar(tmp_path, "8k", cells8k, rng.poisson(2, (4, 6)))
    server.files["pbmc4k.tar.gz"] = _tenx_tar(tmp_path, "4k", cells4k, rng.poisson(2, (3, 6)))
    meta = {
        # TTTC-1 has no label: dropped; the -11 barcode has no cell: ignored
        "barcodes": pd.DataFrame(index=pd.Index(cells8k + ["AAAC-1", "TTTA-1", "XXXX-11"])),
        "clusters": np.array([0, 1, 2, 0, 1, 2, 0]),
        "list_clusters": np.array(["T", "B", "NK"]),
    }
    server.files["meta.pickle"] = pickle.dumps(meta, protocol=2)
    base = server.base + "/files/"
    entry = {
        "source": "url",
        "files": [
            {
                "name": "pbmc8k",
                "batch": "pbmc8k",
                "url": base + "pbmc8k.tar.gz",
                "format": "10x_mtx",
                "reader": {"var_names": "gene_ids"},
            },
            {
                "name": "pbmc4k",
                "batch": "pbmc4k",
                "url": [server.base + "/ndownloader/files/9", base + "pbmc4k.tar.gz"],
                "format": "10x_mtx",
                "reader": {"var_names": "gene_ids"},
            },
        ],
        "obs": {
            "url": base + "meta.pickle",
            "format": "scvi_pbmc_pickle",
            "reader": {"column": "cell_type"},
            "join": {"key_column": "barcode", "min_fraction": 0.8},
        },
        "label_key": "cell_type",
        "batch_key": "batch",
        **FAST,
    }
    adata = dl.fetch_url_dataset(
        "pbmc12k", entry, tmp_path / "cache", tmp_path / "p.lock.yaml", False
    )
    assert list(adata.obs_names) == [
        "pbmc8k_AAAC-1",
        "pbmc8k_AAAG-1",
        "pbmc8k_CCCT-1",
        "pbmc8k_GGGA-1",
        "pbmc4k_AAAC-1",
        "pbmc4k_TTTA-1",
    ]
    assert list(adata.obs["cell_type"]) == ["T", "B", "NK", "T", "B", "NK"]
    assert list(adata.obs["batch"]) == ["pbmc8k"] * 4 + ["pbmc4k"] * 2
    assert list(adata.var_names) == [f"ENSG{j:05d}" for j in range(6)]
    locked = yaml.safe_load((tmp_path / "p.lock.yaml").read_text())["files"]
    assert set(locked) == {"pbmc12k/pbmc8k", "pbmc12k/pbmc4k", "pbmc12k/labels"}


@pytest.mark.parametrize(
    "fmt, payload, message",
    [
        ("10x_mtx", b"%%MatrixMarket matrix coordinate integer general\n1 1 1\n1 1 3\n", None),
        ("10x_mtx", b"1 1 1\n1 1 3\n", "MatrixMarket"),
        ("text", __import__("gzip").compress(b"a\tb\n1\t2\n")[:-6], "gzip stream is corrupt"),
        (
            "scvi_pbmc_pickle",
            __import__("pickle").dumps({"a": 1}, protocol=2)[:-1],
            "not a complete pickle",
        ),
        ("scvi_pbmc_pickle", __import__("pickle").dumps({"a": 1}, protocol=0), None),
        ("h5ad", b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "HDF5 file does not open"),
        ("text", b"", "empty"),
    ],
)
def test_check_format(tmp_path, fmt, payload, message):
    path = tmp_path / "f"
    path.write_bytes(payload)
    if message is None:
        dl.check_format(path, fmt)
    else:
        with pytest.raises(ValueError, match=message):
            dl.check_format(path, fmt)


def test_check_format_truncated_tar(tmp_path):
    good = _tenx_tar(tmp_path, "x", ["A-1", "B-1"], np.ones((2, 3)))
    path = tmp_path / "t.tar.gz"
    path.write_bytes(good)
    dl.check_format(path, "10x_mtx")
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        dl.check_format(path, "10x_mtx")


# ------------------------------------------------------------------------------------------
# through the real Snakemake rule
# ------------------------------------------------------------------------------------------


def _run_snakemake(workdir: Path, configfile: Path, targets: list[str], *extra: str):
    return snakemake(
        workdir, "--cores", "2", "--keep-going", "--nocolor", *extra, *targets,
        configfile=configfile, timeout=300,
    )  # fmt: skip


def _log(workdir: Path, dataset: str) -> str:
    logs = list(workdir.glob(f"results/logs/**/download*{dataset}*")) + list(
        workdir.glob(f"results/logs/download/{dataset}*")
    )
    return "\n".join(p.read_text() for p in logs)


def _url_entry(server, path, **extra):
    return {
        "source": "url",
        "url": server.base + path,
        "format": "h5ad",
        "label_key": "cell_type",
        "batch_key": "batch",
        **FAST,
        **extra,
    }


def _write_config(tmp: Path, datasets: dict, download: dict | None = None) -> Path:
    config = {"datasets": datasets}
    if download:
        config["download"] = download
    path = tmp / "test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


needs_workflow = pytest.mark.skipif(
    not (REPO / "Snakefile").exists() or importlib.util.find_spec("snakemake") is None,
    reason="workflow not in place",
)


@needs_workflow
def test_download_rule_handles_every_failure(server, tmp_path):
    good_sha = _sha(server.good)
    datasets = {
        "good": _url_entry(server, "/good.h5ad", sha256=good_sha, size=len(server.good)),
        "notfound": _url_entry(server, "/missing.h5ad"),
        "accepted": _url_entry(server, "/ndownloader/files/24539828"),
        "html": _url_entry(server, "/login.h5ad"),
        "truncated": _url_entry(server, "/truncated.h5ad"),
        "wrongsum": _url_entry(server, "/other.h5ad", sha256=good_sha),
        "redirect": _url_entry(server, "/redirect.h5ad", sha256=good_sha),
        "dropped": _url_entry(server, "/drop/rule.h5ad", sha256=good_sha),
    }
    config = _write_config(tmp_path, datasets)
    targets = [f"results/{name}/raw.h5ad" for name in datasets]
    proc = _run_snakemake(tmp_path, config, targets)
    assert proc.returncode != 0, proc.stderr[-3000:]

    expect_fail = {
        "notfound": "HTTP 404",
        "accepted": "HTTP 202",
        "html": "HTML page",
        "truncated": "truncated body",
        "wrongsum": "sha256 mismatch",
    }
    for name in datasets:
        raw = tmp_path / "results" / name / "raw.h5ad"
        if name in expect_fail:
            assert not raw.exists(), name
            log = _log(tmp_path, name)
            assert f"dataset '{name}'" in log, (name, log[-2000:], proc.stderr[-2000:])
            assert datasets[name]["url"] in log and expect_fail[name] in log, (name, log[-2000:])
            assert "Traceback" not in log, log[-2000:]
        else:
            assert raw.exists(), (name, _log(tmp_path, name)[-2000:], proc.stderr[-3000:])
            adata = ad.read_h5ad(raw)
            assert adata.shape == (1500, 40) and set(adata.obs["cell_type"]) == {
                "type_0",
                "type_1",
                "type_2",
            }
    # the dropped connection was resumed with a Range request, not restarted, and the log says so
    assert server.requests_for("/drop/rule.h5ad") == [None, f"bytes={DROP_AT}-"]
    assert f"resuming {server.base}/drop/rule.h5ad at byte {DROP_AT}" in _log(tmp_path, "dropped")
    assert "recorded sha256" in _log(tmp_path, "good")
    # nothing partial anywhere under results/
    assert not [p for p in (tmp_path / "results").rglob("*.part")]
    # the lock beside the config records the files downloaded without a configured checksum
    lock = yaml.safe_load((tmp_path / "test.lock.yaml").read_text())["files"]
    assert set(lock) == {"good/data", "redirect/data", "dropped/data"}
    assert all(v["sha256"] == good_sha for v in lock.values())


@needs_workflow
def test_download_rule_mirror_fallback_and_data_dir(server, tmp_path):
    entry = _url_entry(
        server,
        "/ndownloader/files/42",
        mirrors=[server.base + "/missing.h5ad", server.base + "/good.h5ad"],
    )
    # a path entry is read from data_dir (relative to the working directory)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "local.h5ad").write_bytes(server.other)
    local = {"source": "path", "path": "local.h5ad", "label_key": "cell_type", "batch_key": "batch"}
    config = _write_config(tmp_path, {"mirrored": entry, "local": local})
    text = config.read_text()
    config.write_text("data_dir: data\n" + text)
    proc = _run_snakemake(tmp_path, config, ["results/mirrored/raw.h5ad", "results/local/raw.h5ad"])
    assert proc.returncode == 0, _log(tmp_path, "mirrored")[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "results/mirrored/raw.h5ad").exists()
    assert ad.read_h5ad(tmp_path / "results/local/raw.h5ad").shape == (1500, 40)
    log = _log(tmp_path, "mirrored")
    assert "HTTP 202" in log and "HTTP 404" in log  # both bad addresses were tried first
    lock = yaml.safe_load((tmp_path / "test.lock.yaml").read_text())["files"]
    assert lock["mirrored/data"]["url"] == server.base + "/good.h5ad"


@needs_workflow
def test_download_rule_lock_then_tamper_then_require(server, tmp_path):
    datasets = {name: _url_entry(server, "/good.h5ad") for name in ("tampered", "damaged")}
    config = _write_config(tmp_path, datasets, download={"cache_dir": "cache"})
    proc = _run_snakemake(tmp_path, config, [f"results/{n}/raw.h5ad" for n in datasets])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lockfile = tmp_path / "test.lock.yaml"
    recorded = yaml.safe_load(lockfile.read_text())["files"]
    assert {k: v["sha256"] for k, v in recorded.items()} == {
        "damaged/data": _sha(server.good),
        "tampered/data": _sha(server.good),
    }

    # tampered: another valid checksum, which neither the cached copy nor a new download has;
    # damaged: YAML reads 000... as an int -- an error, not "unknown, record it again";
    # unknown: a new dataset whose checksum is known nowhere, refused under require_checksum
    lines = lockfile.read_text().splitlines()
    at = {
        n: next(i for i, line in enumerate(lines) if line.startswith(f"  {n}/data:"))
        for n in datasets
    }
    for name, fake in (("tampered", "f" * 64), ("damaged", "0" * 64)):
        i = next(j for j in range(at[name], len(lines)) if "sha256:" in lines[j])
        lines[i] = f"    sha256: {fake}"
    lockfile.write_text("\n".join(lines) + "\n")
    for name in datasets:
        (tmp_path / f"results/{name}/raw.h5ad").unlink()
    datasets["unknown"] = _url_entry(server, "/good.h5ad")
    config = _write_config(
        tmp_path, datasets, download={"cache_dir": "cache", "require_checksum": True}
    )
    before = len(server.requests_for("/good.h5ad"))
    proc = _run_snakemake(tmp_path, config, [f"results/{n}/raw.h5ad" for n in datasets])
    assert proc.returncode != 0
    for name in datasets:
        assert not (tmp_path / f"results/{name}/raw.h5ad").exists(), name
    log = _log(tmp_path, "tampered")
    assert "sha256 mismatch" in log and "f" * 64 in log and "lock file" in log, log[-2000:]
    assert "is damaged" in _log(tmp_path, "damaged"), _log(tmp_path, "damaged")[-2000:]
    assert "no known sha256" in _log(tmp_path, "unknown"), _log(tmp_path, "unknown")[-2000:]
    # only the tampered entry reached the server (its cached copy failed the new checksum);
    # the damaged and the unknown ones were refused before any byte moved
    assert len(server.requests_for("/good.h5ad")) - before == 1


def test_bad_reader_option_fails_before_any_download(server, tmp_path, capsys):
    from sigmoid_sc import cli

    entry = {
        "source": "url",
        "url": server.base + "/good.h5ad",
        "format": "h5ad",
        "reader": {"layers": "counts"},
        "label_key": "cell_type",
        **FAST,
    }
    before = len(server.requests_for("/good.h5ad"))
    out = tmp_path / "raw.h5ad"
    code = cli.main(
        ["download", "--dataset", "typo", "--entry-json", json.dumps(entry), "--out", str(out)]
    )
    assert code == 2 and not out.exists()
    message = capsys.readouterr().err
    assert "datasets.typo.reader: unknown reader option(s) layers" in message, message
    assert len(server.requests_for("/good.h5ad")) == before


def test_paper_config_entries_are_complete_offline():
    """Every url entry of configs/paper.yaml validates (schema, reader options) and plans, so a
    typo fails here and not after a multi-gigabyte download on the GPU machine."""
    from sigmoid_sc import config

    paper = config.load(REPO / "configs/paper.yaml").raw
    assert len(paper["datasets"]) == 6
    for name, entry in paper["datasets"].items():
        assert entry["source"] == "url", name
        for key in ("label_key", "organism", "citation", "licence"):
            assert entry.get(key), (name, key)
        data_files, _ = dl.plan_files(name, entry)
        for rf in data_files:
            assert all(u.startswith("https://") or u.startswith("http://") for u in rf.urls)
    # the figshare files carry the two other figshare addresses as mirrors
    for name in ("pancreas", "immune_human", "lung_atlas"):
        urls = dl.plan_files(name, paper["datasets"][name])[0][0].urls
        file_id = urls[0].rsplit("/", 1)[1]
        assert urls == [
            f"https://figshare.com/ndownloader/files/{file_id}",
            f"https://ndownloader.figshare.com/files/{file_id}",
            f"https://api.figshare.com/v2/file/download/{file_id}",
        ]


@needs_workflow
def test_paper_config_dry_run_lists_six_branches():
    paper = yaml.safe_load((REPO / "configs/paper.yaml").read_text())
    assert len(paper["datasets"]) == 6
    proc = snakemake(
        REPO, "-n", "--nolock", "--nocolor", configfile=REPO / "configs/paper.yaml", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = proc.stdout + proc.stderr
    for name in paper["datasets"]:
        assert f"results/{name}/raw.h5ad" in out, name
        assert f"results/{name}/metrics.csv" in out, name
