"""Verified HTTP downloads for ``source: url`` datasets.

A download never lies: every file is streamed to a temporary ``.part`` file beside its cache
path, with retries and exponential back-off; a dropped connection is resumed with an HTTP
``Range`` request when the server allows it (``206 Partial Content``) and restarted otherwise.
Only when the whole body is in hand is it verified -- the announced and expected size, the
sha256, and that it parses as its format (HDF5 signature, gzip CRC, tar index, Matrix Market
header, ...) -- and then renamed into place. An HTML page, an empty body, an HTTP 202 (figshare's
``ndownloader`` answers scripts so), a truncated body or a wrong checksum is an error for that
address, and the next address of the entry is tried (``url`` first, then ``mirrors``).

Checksums not written in the config are recorded on first download in a lock file next to the
config (``configs/paper.yaml`` -> ``configs/paper.lock.yaml``), which the user commits; every
later download is verified against it. ``require_checksum`` refuses files with no known sha256.

Entry keys read here (a dataset of the config with ``source: url``):

- one file: ``url`` (a string or a list), ``mirrors``, ``sha256``, ``size`` (bytes), ``format``,
  ``reader`` (options of the format's reader, see :mod:`sigmoid_sc.readers`);
- several files read and concatenated (e.g. two 10x runs): ``files``, a list of mappings with
  ``name`` and the keys above, plus ``batch`` (the value written to ``obs[batch_key]``);
- labels kept in a separate table (e.g. scvi-tools' PBMC labels): ``obs``, a mapping with the
  keys above plus ``join`` options (see :func:`sigmoid_sc.readers.join_labels`);
- download behaviour: ``retries`` (per address, default 3), ``timeout_s`` (default 60),
  ``backoff_s`` (first back-off, doubled each retry, default 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import logging
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, DataError, DownloadError
from .io import atomic_path
from .runtime import log_to_stderr

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
# small enough that a dropped connection loses little (the unfinished chunk is fetched again)
CHUNK_BYTES = 1 << 16
MAX_REDIRECTS = 10
DEFAULT_CACHE_DIR = "results/.cache/downloads"
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_BACKOFF_S = 1.0

# cache file suffix per format; the reader picks the format from the entry, not the suffix
FORMAT_SUFFIX = {
    "h5ad": ".h5ad",
    "10x_h5": ".h5",
    "hdf5": ".h5",
    "10x_mtx": ".mtx.bundle",
    "text": ".txt",
    "csv": ".csv",
    "tsv": ".tsv",
    "txt": ".txt",
    "table": ".table",
    "scvi_pbmc_pickle": ".pickle",
}
HDF5_FORMATS = {"h5ad", "10x_h5", "hdf5"}


# ------------------------------------------------------------------------------------------
# what to fetch
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RemoteFile:
    """One file of a dataset: where it lives, what it must hash to, how to read it.

    ``key`` (``"<dataset>/<part>"``) names it in the lock file and in messages.
    """

    dataset: str
    part: str
    urls: list[str]
    format: str
    sha256: str | None = None
    size: int | None = None  # bytes
    reader: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch: str | None = None
    join: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.part}"


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _remote_file(dataset: str, part: str, spec: dict[str, Any]) -> RemoteFile:
    urls = _as_list(spec.get("url")) + _as_list(spec.get("mirrors"))
    sha = spec.get("sha256")
    return RemoteFile(
        dataset=dataset,
        part=part,
        urls=list(dict.fromkeys(urls)),  # keep order, drop repeats
        format=spec["format"],
        sha256=sha.lower() if sha else None,
        size=spec.get("size"),
        reader=dict(spec.get("reader") or {}),
        batch=None if spec.get("batch") is None else str(spec["batch"]),
        join=dict(spec.get("join") or {}),
    )


def plan_files(dataset: str, entry: dict[str, Any]) -> tuple[list[RemoteFile], RemoteFile | None]:
    """The data files and the optional labels file of a url entry, in reading order.

    ``entry`` is validated (:func:`sigmoid_sc.config.dataset`): addresses, formats, checksums,
    file names and reader options are as the schema and the readers want them.
    """
    files = entry.get("files")
    if files:
        data = [_remote_file(dataset, f["name"], f) for f in files]
    else:
        data = [_remote_file(dataset, "data", entry)]
    obs = entry.get("obs")
    labels = _remote_file(dataset, obs.get("name", "labels"), obs) if obs is not None else None
    return data, labels


# ------------------------------------------------------------------------------------------
# the lock file
# ------------------------------------------------------------------------------------------

LOCK_HEADER = """\
# sha256 and size (bytes) of every file the config beside this one downloads, recorded by
# `sigmoid-sc download` on first download and verified on every later one. Commit this file.
# If an upstream file changed on purpose, delete its entry and download again.
"""


def _is_sha256(value) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(c in "0123456789abcdefABCDEF" for c in value)
    )


def lockfile_for(configfile: str | os.PathLike) -> Path:
    """The lock file that belongs to a config file: ``paper.yaml`` -> ``paper.lock.yaml``."""
    path = Path(configfile)
    return path.with_name(f"{path.stem}.lock.yaml")


class LockFile:
    """Checksums recorded on first download, keyed ``"<dataset>/<part>"``.

    Layout (YAML, keys sorted, one file per entry so a new download is a small diff)::

        files:
          pancreas/data:
            sha256: 3f2a...
            size: 123456789
            url: https://figshare.com/ndownloader/files/24539828

    Writers take an exclusive ``flock`` on the lock file's folder (parallel download jobs
    record into the same file), re-read, update and replace the file atomically.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> dict[str, dict[str, Any]]:
        import yaml

        if not self.path.exists():
            return {}
        try:
            doc = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"lock file {str(self.path)!r} is not valid YAML: {exc}") from exc
        files = doc.get("files") if isinstance(doc, dict) else None
        if files is None:
            return {}
        if not isinstance(files, dict):
            raise ConfigError(f"lock file {str(self.path)!r}: 'files' must be a mapping")
        return files

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry of ``key``, checked: a damaged entry must not pass as "unknown"."""
        entry = self.read().get(key)
        if entry is None:
            return None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not _is_sha256(sha) or not isinstance(entry.get("size"), int):
            raise DownloadError(
                f"lock file {str(self.path)!r}: entry {key!r} is damaged (needs a 64-hex-digit "
                f"sha256 and an integer size, got {entry!r}); restore it from version control, "
                "or delete it to record the file again"
            )
        return {**entry, "sha256": sha.lower()}

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def record(self, key: str, sha256: str, size: int, url: str) -> None:
        import yaml

        with self._exclusive():
            files = self.read()
            files[key] = {"sha256": sha256, "size": int(size), "url": url}
            body = yaml.safe_dump(
                {"files": dict(sorted(files.items()))}, sort_keys=True, default_flow_style=False
            )
            with atomic_path(self.path) as tmp:
                tmp.write_text(LOCK_HEADER + body)


# ------------------------------------------------------------------------------------------
# streaming one address
# ------------------------------------------------------------------------------------------


class _Transient(Exception):
    """Worth retrying the same address (dropped connection, timeout, 5xx, truncated body)."""


class _Permanent(Exception):
    """This address will not give the file (4xx, 202, HTML, empty, wrong checksum or format)."""


def _looks_like_html(head: bytes) -> bool:
    text = head[:1024].lstrip().lower()
    return (
        text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text[:256]
    )


def _content_range_start(value: str | None) -> int | None:
    # "bytes 500-999/1000" -> 500
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


@dataclasses.dataclass
class _Stats:
    """What happened on the wire (tests and logs read it)."""

    attempts: int = 0
    resumed_from: list[int] = dataclasses.field(default_factory=list)
    restarts: int = 0


def _fetch_once(
    session,
    url: str,
    part_path: Path,
    label: str,
    timeout_s: float,
    expected_size: int | None,
    size_origin: str,
    stats: _Stats,
) -> None:
    """One HTTP request; appends to ``part_path`` (resuming) or rewrites it."""
    import requests

    have = part_path.stat().st_size if part_path.exists() else 0
    headers = {
        # the bytes as stored: a transparently decompressed body would not match size or sha256
        "Accept-Encoding": "identity",
        # requests' own agent first: some hosts (exampledata.scverse.org) refuse unknown ones
        "User-Agent": f"{requests.utils.default_user_agent()} sigmoid-sc/{__version__}",
    }
    if have:
        headers["Range"] = f"bytes={have}-"
    stats.attempts += 1
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout_s)
    except requests.TooManyRedirects as exc:
        raise _Permanent(f"more than {MAX_REDIRECTS} redirects") from exc
    except requests.exceptions.InvalidURL as exc:
        raise _Permanent(f"invalid address ({exc})") from exc
    except requests.RequestException as exc:
        raise _Transient(f"connection failed ({type(exc).__name__}: {exc})") from exc

    with response:
        status = response.status_code
        reason = response.reason or ""
        if status == 416 and have:
            # the partial file does not fit the remote one (changed upstream?): start again
            part_path.unlink(missing_ok=True)
            stats.restarts += 1
            raise _Transient("HTTP 416: the server refused to resume; restarting from byte 0")
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status} {reason}".strip())
        if status >= 400:
            raise _Permanent(f"HTTP {status} {reason}".strip())
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if status not in (200, 206):
            body = "an empty body" if length in (0, None) else f"a {length}-byte body"
            hint = (
                " (figshare's ndownloader answers scripts so; the mirrors are tried next)"
                if status == 202
                else ""
            )
            raise _Permanent(f"HTTP {status} {reason} with {body} instead of the file{hint}")
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                part_path.unlink(missing_ok=True)
                stats.restarts += 1
                raise _Transient(
                    f"HTTP 206 for byte {start} when byte {have} was asked; restarting from byte 0"
                )
            stats.resumed_from.append(have)
            log.info("%s: resuming %s at byte %d", label, url, have)
        elif have:
            # 200 to a Range request: the server cannot resume, the body is the whole file
            log.info("%s: %s does not resume (HTTP 200 to a Range request); restarting", label, url)
            stats.restarts += 1
            have = 0
        content_type = response.headers.get("Content-Type", "").lower()
        if "text/html" in content_type:
            raise _Permanent(
                f"the server sent an HTML page (Content-Type: {content_type}) instead of the file "
                "(an error, login or cookie-consent page?)"
            )
        if status == 200 and length == 0:
            raise _Permanent("HTTP 200 with an empty body (Content-Length: 0)")
        total = have + length if length is not None else expected_size
        if expected_size is not None and total != expected_size:
            # refuse before moving gigabytes: this address serves another file (or version)
            raise _Permanent(
                f"the server announces {total} bytes, expected {expected_size} ({size_origin})"
            )
        received = 0
        mode = "ab" if have else "wb"
        with open(part_path, mode) as fh, _progress(label, total, have) as bar:
            try:
                # the bytes as sent: never transparently decoded, so size and sha256 are the file's
                for chunk in response.raw.stream(CHUNK_BYTES, decode_content=False):
                    if not chunk:
                        continue
                    if received == 0 and have == 0 and _looks_like_html(chunk):
                        raise _Permanent(
                            "the server sent an HTML page (or an XML error) instead of the file "
                            "(an error, login or cookie-consent page?)"
                        )
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except _Permanent:
                raise
            except Exception as exc:  # requests/urllib3 wrap a dropped connection many ways
                fh.flush()
                raise _Transient(
                    f"truncated body: the connection dropped after {have + received} of "
                    f"{total if total is not None else '?'} bytes ({type(exc).__name__})"
                ) from exc
    if have + received == 0:
        raise _Permanent(f"HTTP {status} with an empty body")
    if length is not None and received != length:
        raise _Transient(f"truncated body: received {have + received} of {have + length} bytes")


@contextlib.contextmanager
def _progress(label: str, total: int | None, initial: int):
    from tqdm import tqdm

    # a byte counter on stderr; in a Snakemake log (not a terminal) update every few seconds
    bar = tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 5.0,
        leave=True,
    )
    try:
        yield bar
    finally:
        bar.close()


def _fetch_with_retries(
    session,
    url: str,
    part_path: Path,
    label: str,
    *,
    retries: int,
    timeout_s: float,
    backoff_s: float,
    expected_size: int | None,
    size_origin: str,
    stats: _Stats,
) -> None:
    failures = 0
    while True:
        try:
            _fetch_once(
                session, url, part_path, label, timeout_s, expected_size, size_origin, stats
            )
            return
        except _Transient as exc:
            failures += 1
            if failures > retries:
                raise _Permanent(f"{exc}; gave up after {failures} attempts") from exc
            delay = backoff_s * 2 ** (failures - 1)
            log.warning(
                "%s: %s: %s; retry %d/%d in %.1f s", label, url, exc, failures, retries, delay
            )
            time.sleep(delay)


# ------------------------------------------------------------------------------------------
# verification
# ------------------------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _gzip_intact(path: Path) -> None:
    # reading to the end checks every member's CRC-32 and length
    with gzip.open(path, "rb") as fh:
        while fh.read(CHUNK_BYTES):
            pass


def check_format(path: str | os.PathLike, fmt: str) -> None:
    """Raise ``ValueError`` saying why ``path`` does not parse as ``fmt``.

    Checks are structural and cheap next to the download: HDF5 signature and an h5py open;
    the whole gzip stream (CRC); a tar index read to its end (a bundle of any format; a 10x one
    must hold a matrix.mtx); a Matrix Market header; a pickle that ends in its STOP opcode;
    text that is not HTML and has a separator on its first line.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head:
        raise ValueError("the file is empty")
    if _looks_like_html(head):
        raise ValueError("the file is an HTML page")
    if fmt in HDF5_FORMATS and head.startswith(HDF5_SIGNATURE):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                list(f.keys())
        except OSError as exc:
            raise ValueError(f"HDF5 file does not open ({exc})") from exc
        return
    if head.startswith(GZIP_MAGIC):
        try:
            _gzip_intact(path)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ValueError(f"gzip stream is corrupt or truncated ({exc})") from exc
    if tarfile.is_tarfile(path):  # a bundle: its member is checked when it is read
        try:
            with tarfile.open(path, "r:*") as tf:
                names = tf.getnames()  # reads the archive to its end
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"tar archive is corrupt or truncated ({exc})") from exc
        if fmt == "10x_mtx" and not any(
            Path(n).name in ("matrix.mtx", "matrix.mtx.gz") for n in names
        ):
            raise ValueError("tar archive holds no matrix.mtx(.gz)")
        return
    if fmt in HDF5_FORMATS:
        raise ValueError("no HDF5 signature at byte 0 (not an HDF5/h5ad file, nor a tar of one)")
    text_head = gzip.open(path, "rb").read(4096) if head.startswith(GZIP_MAGIC) else head
    if fmt == "10x_mtx":
        if not text_head.startswith(b"%%MatrixMarket"):
            raise ValueError("no '%%MatrixMarket' header (not a Matrix Market file or tar of one)")
        return
    if fmt == "scvi_pbmc_pickle":
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
        if last != b".":  # every pickle protocol ends in the STOP opcode
            raise ValueError("not a complete pickle (no STOP opcode at the end)")
        return
    # text matrices and label tables
    try:
        first_line = text_head.split(b"\n", 1)[0].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8 text") from exc
    if not any(sep in first_line for sep in ("\t", ",", ";", " ")):
        raise ValueError("first line has no column separator (not a table)")


def _verify(
    rf: RemoteFile,
    part_path: Path,
    expected_sha: str | None,
    sha_origin: str,
    expected_size: int | None,
    size_origin: str,
) -> tuple[str, int]:
    size = part_path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise _Permanent(f"size {size} bytes, expected {expected_size} ({size_origin})")
    try:
        check_format(part_path, rf.format)
    except ValueError as exc:
        raise _Permanent(f"does not parse as {rf.format}: {exc}") from exc
    sha = sha256_of(part_path)
    if expected_sha is not None and sha != expected_sha:
        raise _Permanent(f"sha256 mismatch: got {sha}, expected {expected_sha} ({sha_origin})")
    return sha, size


# ------------------------------------------------------------------------------------------
# one verified file
# ------------------------------------------------------------------------------------------


def _session():
    import requests

    session = requests.Session()
    session.max_redirects = MAX_REDIRECTS
    session.trust_env = True  # honour HTTPS_PROXY and friends on clusters
    return session


def expected_sha256(rf: RemoteFile, lock: LockFile | None) -> tuple[str | None, str]:
    """The sha256 ``rf`` must have and where it comes from: the config first, then the lock."""
    if rf.sha256:
        return rf.sha256, "sha256 in the config"
    locked = lock.get(rf.key) if lock is not None else None
    if locked:
        return locked["sha256"], f"lock file {lock.path}"
    return None, ""


def refuse_unknown_checksum(rf: RemoteFile, lock: LockFile | None) -> None:
    where = (
        f"nor in lock file {str(lock.path)!r}" if lock is not None else "and no lock file is used"
    )
    raise DownloadError(
        f"dataset {rf.dataset!r}: file {rf.part!r} ({rf.urls[0]}) has no known sha256 -- "
        f"not in the config {where}; download.require_checksum refuses it. Add 'sha256:' to "
        "the entry, or run once without require_checksum to record it in the lock file."
    )


def fetch_file(
    rf: RemoteFile,
    cache_dir: str | os.PathLike,
    lock: LockFile | None = None,
    require_checksum: bool = False,
    *,
    retries: int = DEFAULT_RETRIES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    backoff_s: float = DEFAULT_BACKOFF_S,
    stats: _Stats | None = None,
) -> Path:
    """Download ``rf`` into the cache (or reuse a verified copy) and return its path.

    The expected sha256 comes from the config (``rf.sha256``) or else the lock file; with
    neither, ``require_checksum`` refuses the file, otherwise the sha256 and size of the first
    verified download are recorded in the lock. Raises :class:`DownloadError` naming the
    dataset, every address tried and what was wrong with each.
    """
    stats = stats if stats is not None else _Stats()
    locked = lock.get(rf.key) if lock is not None else None
    expected_sha, sha_origin = expected_sha256(rf, lock)
    if expected_sha is None and require_checksum:
        refuse_unknown_checksum(rf, lock)
    if rf.size is not None:
        expected_size, size_origin = rf.size, "size in the config"
    elif locked and locked.get("size") is not None and expected_sha == locked.get("sha256"):
        expected_size, size_origin = int(locked["size"]), f"lock file {lock.path}"
    else:
        expected_size, size_origin = None, ""

    target = Path(cache_dir) / rf.dataset / f"{rf.part}{FORMAT_SUFFIX[rf.format]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    label = rf.key

    # a cached copy counts only when a known checksum vouches for it
    if target.exists() and expected_sha is not None:
        if sha256_of(target) == expected_sha:
            log.info("%s: using verified cached copy %s", label, target)
            return target
        log.warning("%s: cached copy %s does not match sha256; downloading again", label, target)
        target.unlink()

    part_path = target.with_name(target.name + ".part")
    part_path.unlink(missing_ok=True)  # a stale part of an earlier run: its origin is unknown
    failures: list[str] = []
    session = _session()
    try:
        for url in rf.urls:
            try:
                _fetch_with_retries(
                    session,
                    url,
                    part_path,
                    label,
                    retries=retries,
                    timeout_s=timeout_s,
                    backoff_s=backoff_s,
                    expected_size=expected_size,
                    size_origin=size_origin,
                    stats=stats,
                )
                sha, size = _verify(
                    rf, part_path, expected_sha, sha_origin, expected_size, size_origin
                )
            except _Permanent as exc:
                failures.append(f"{url}: {exc}")
                log.warning("%s: %s: %s", label, url, exc)
                part_path.unlink(missing_ok=True)
                continue
            os.replace(part_path, target)
            log.info("%s: downloaded %s (%d bytes, sha256 %s)", label, url, size, sha)
            if lock is not None and (locked is None or locked.get("sha256") != sha):
                try:
                    lock.record(rf.key, sha, size, url)
                except OSError as exc:
                    raise DownloadError(
                        f"dataset {rf.dataset!r}: downloaded and verified {rf.part!r}, but cannot "
                        f"record its sha256 in lock file {str(lock.path)!r} ({exc}); set "
                        "download.lockfile to a writable path"
                    ) from exc
                log.info("%s: recorded sha256 %s in %s", label, sha, lock.path)
            return target
    finally:
        part_path.unlink(missing_ok=True)
        session.close()
    tried = "; ".join(failures)
    raise DownloadError(
        f"dataset {rf.dataset!r}: could not download file {rf.part!r} from any of its "
        f"{len(rf.urls)} address(es): {tried}"
    )


# ------------------------------------------------------------------------------------------
# the whole dataset
# ------------------------------------------------------------------------------------------


def fetch_url_dataset(
    name: str,
    entry: dict[str, Any],
    cache_dir: str | os.PathLike | None,
    lockfile: str | os.PathLike | None,
    require_checksum: bool,
):
    """Download, verify and read one ``source: url`` dataset into a single AnnData.

    Returns an AnnData with raw counts in ``X`` (cells x genes), genes as ``var_names``, the
    label in ``obs[entry["label_key"]]`` and, when ``batch_key`` is set, the batch in
    ``obs[batch_key]`` (taken from the file, or from each part's ``batch`` value when the
    entry lists several ``files``). ``entry`` is validated (:func:`sigmoid_sc.config.dataset`).
    Raises :class:`DownloadError` for a failed or unverified download, :class:`DataError` for
    unusable contents.
    """
    from . import readers

    log_to_stderr()
    cache_dir = Path(cache_dir) if cache_dir else Path(DEFAULT_CACHE_DIR)
    lock = LockFile(lockfile) if lockfile else None
    data_files, labels_file = plan_files(name, entry)
    knobs = {
        "retries": int(entry.get("retries", DEFAULT_RETRIES)),
        "timeout_s": float(entry.get("timeout_s", DEFAULT_TIMEOUT_S)),
        "backoff_s": float(entry.get("backoff_s", DEFAULT_BACKOFF_S)),
    }
    # refuse unknown checksums before any byte of any file moves
    if require_checksum:
        for rf in data_files + ([labels_file] if labels_file else []):
            if expected_sha256(rf, lock)[0] is None:
                refuse_unknown_checksum(rf, lock)
    label_key = entry.get("label_key")
    batch_key = entry.get("batch_key") or None

    parts = []
    for rf in data_files:
        path = fetch_file(rf, cache_dir, lock, require_checksum, **knobs)
        adata = readers.read_dataset(path, rf.format, dataset=name, options=rf.reader)
        if rf.batch is not None:  # the config checked that the entry has a batch_key
            adata.obs[batch_key] = rf.batch
        parts.append((rf.part, adata))
    adata = readers.concat_parts(parts, dataset=name)

    if labels_file is not None:
        path = fetch_file(labels_file, cache_dir, lock, require_checksum, **knobs)
        table = readers.read_labels(
            path, labels_file.format, dataset=name, options=labels_file.reader
        )
        adata = readers.join_labels(adata, table, dataset=name, **labels_file.join)

    for key, what in ((label_key, "label_key"), (batch_key, "batch_key")):
        if key and key not in adata.obs:
            raise DataError(
                f"dataset {name!r}: {what} {key!r} is not a column of the downloaded data; "
                f"columns: {', '.join(map(str, adata.obs.columns)) or '(none)'}"
            )
    return adata
