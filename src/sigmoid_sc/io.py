"""Atomic outputs: nothing half-written ever stands under an output's name.

Every writer goes through :func:`atomic_path`: it hands out a temporary name in the same folder
(same file system, so the final ``os.replace`` is atomic) and renames it into place only when the
block finishes without an exception; on an exception the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path``.

    ``suffix`` defaults to the target's own (some writers pick the format from it).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=suffix or "".join(target.suffixes)
    )
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; outputs get the permissions any new file would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_h5ad(path: str | os.PathLike, adata) -> None:
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")


def write_npz(path: str | os.PathLike, **arrays) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        import numpy as np

        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def write_csv(path: str | os.PathLike, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_table(path: str | os.PathLike, required: tuple[str, ...], what: str = "table"):
    """Read a CSV that a stage wrote; a DataError naming the file if it is unreadable, lacks one
    of the ``required`` columns, or has no rows."""
    import pandas as pd

    from .errors import DataError

    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: {what} lacks column(s) {', '.join(missing)}")
    if frame.empty:
        raise DataError(f"{path}: {what} has no rows")
    return frame
