"""The download cache trusts a file only while a known sha256 vouches for it (sigmoid_sc.fetch).

A loopback HTTP server (127.0.0.1, a free port) serves one small table and counts requests.
A cached copy that still hashes to the expected sha256 (from the config or the lock file) is
used without a request; one that was changed since is downloaded again, or refused when the
server's copy does not match either; a cached copy that no checksum vouches for is downloaded
again. Nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest
import yaml

from sigmoid_sc import fetch
from sigmoid_sc.errors import DownloadError

GOOD = b"gene\tcount\n" + b"".join(b"g%d\t%d\n" % (i, i * 7 % 13) for i in range(200))
TAMPERED = GOOD.replace(b"g5\t9", b"g5\t8")  # one count changed: same size, same format
FAST = {"retries": 1, "timeout_s": 5.0, "backoff_s": 0.01}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - the http.server API
        self.server.requests.append(self.path)
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", "text/tab-separated-values")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.body, srv.requests = GOOD, []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remote(server, with_sha: bool = True) -> fetch.RemoteFile:
    port = server.server_address[1]
    return fetch.RemoteFile(
        dataset="ds",
        part="table",
        urls=[f"http://127.0.0.1:{port}/table.tsv"],
        format="tsv",
        sha256=sha(GOOD) if with_sha else None,
    )


def cache_a_copy(server, cache, lock=None, with_sha=True):
    """A first, verified download; returns the cached path and the request count after it."""
    path = fetch.fetch_file(remote(server, with_sha), cache, lock, **FAST)
    assert path.read_bytes() == GOOD and len(server.requests) == 1
    return path


def test_a_verified_cached_copy_is_used_without_a_request(server, tmp_path):
    path = cache_a_copy(server, tmp_path)
    assert fetch.fetch_file(remote(server), tmp_path, **FAST) == path
    assert len(server.requests) == 1


def test_a_tampered_cached_copy_is_downloaded_again(server, tmp_path):
    path = cache_a_copy(server, tmp_path)
    path.write_bytes(TAMPERED)
    assert fetch.fetch_file(remote(server), tmp_path, **FAST) == path
    assert path.read_bytes() == GOOD
    assert len(server.requests) == 2


def test_a_tampered_cached_copy_checked_against_the_lock_file(server, tmp_path):
    """No sha256 in the config: the lock file's, recorded by the first download, vouches."""
    lock = fetch.LockFile(tmp_path / "data.lock.yaml")
    path = cache_a_copy(server, tmp_path / "cache", lock, with_sha=False)
    recorded = yaml.safe_load(lock.path.read_text())
    # vouched for by the lock: used as it is
    assert fetch.fetch_file(remote(server, with_sha=False), tmp_path / "cache", lock, **FAST)
    assert len(server.requests) == 1
    path.write_bytes(TAMPERED)
    assert fetch.fetch_file(remote(server, with_sha=False), tmp_path / "cache", lock, **FAST)
    assert path.read_bytes() == GOOD and len(server.requests) == 2
    assert yaml.safe_load(lock.path.read_text()) == recorded  # the lock still names GOOD


def test_a_tampered_cached_copy_is_refused_when_the_server_has_no_good_one(server, tmp_path):
    path = cache_a_copy(server, tmp_path)
    path.write_bytes(TAMPERED)
    server.body = TAMPERED  # the server now serves the changed file too
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch.fetch_file(remote(server), tmp_path, **FAST)
    assert not path.exists(), "the tampered copy was left in the cache"
    assert not list(tmp_path.rglob("*.part"))


def test_a_cached_copy_without_a_known_checksum_is_not_trusted(server, tmp_path):
    """No sha256 in the config and no lock: a file already in the cache is fetched again."""
    path = cache_a_copy(server, tmp_path, with_sha=False)
    path.write_bytes(TAMPERED)
    assert fetch.fetch_file(remote(server, with_sha=False), tmp_path, **FAST) == path
    assert path.read_bytes() == GOOD and len(server.requests) == 2
