"""What every stage does when it starts: logging to the job's log, JSON arguments, threads, device.

Nothing here imports torch at module level: stages that never train (prepare, evaluate,
aggregate, figures) import this module without paying for it.
"""

from __future__ import annotations

import json
import logging
import os

from .errors import ConfigError


def log_to_stderr() -> None:
    """Send this package's INFO messages to stderr (the job's log) when nothing else is set up."""
    pkg = logging.getLogger("sigmoid_sc")
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False  # JAX adds a root handler later: no line twice


def parse_json_arg(text: str, what: str) -> dict:
    """Parse a ``--*-json`` argument into a dict, raising ConfigError on bad JSON."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: not valid JSON ({exc})") from exc
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def set_threads() -> None:
    """Use the job's thread count (Snakemake sets OMP_NUM_THREADS to the rule's threads)."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def resolve_device(name: str):
    """``cpu`` | ``cuda`` | ``auto`` (CUDA when available) -> a ``torch.device``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available; use cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu, cuda or auto, not {name!r}")
    return torch.device(name)
