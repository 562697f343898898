"""``sigmoid-sc kernel-benchmark``: the attention kernels' TFLOPS (claim e) as a figure and tables.

On a CUDA GPU it times every implementation of the package's timing core
(:func:`sigmoid_sc.attention.benchmark.benchmark_attention`) on the cases of the config's
``experiments.kernel_benchmark`` section (``--params-json``, as the ``kernel_benchmark`` rule
passes it): dense rows of each ``dense_n`` and real cell lengths (``cell_lengths``: pools of
genes per cell shipped with the package, ``sigmoid_sc/data/lengths_<name>.txt``, or files),
bf16, for each head dim. It then renders ``kernel_tflops.{png,pdf}`` and ``kernel.{csv,md}``
from the core's CSV (kept at ``--raw-csv`` when given: rewritten after every case, so a run cut
short keeps its rows).

Without a GPU it renders a committed CSV given with ``--fallback-csv`` (saying so), or writes a
note table and a figure that say the benchmark was skipped, and exits 0. ``--device cpu`` times
on the CPU instead (fp32; the Triton kernel under its interpreter, ``TRITON_INTERPRET=1``): for
tests with tiny settings, not a measurement.

bench/kernel.py is the lab's command line over the same core (kernel variants, launch-config
sweeps, GPU correctness checks).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from . import config
from .errors import ConfigError
from .experiment_figures import render_kernel, write_skipped
from .runtime import parse_json_arg

#: pools of expressed genes per cell of real datasets (pbmc3k, Baron pancreas), one a line
LENGTHS_DIR = Path(__file__).with_name("data")


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def packaged_lengths() -> list[str]:
    """The names of the length pools shipped with the package (``data/lengths_<name>.txt``)."""
    return sorted(p.stem.removeprefix("lengths_") for p in LENGTHS_DIR.glob("lengths_*.txt"))


def length_pool(source: str) -> tuple[str, object]:
    """``(label, per-cell lengths)`` of one ``cell_lengths`` entry: the name of a packaged pool
    (label: the name), else a file (a ``tokens.npz`` or text, one length a line; label: its
    stem)."""
    from .attention.benchmark import read_lengths

    packaged = LENGTHS_DIR / f"lengths_{source}.txt"
    path = packaged if packaged.is_file() else Path(source)
    if not path.is_file():
        raise ConfigError(
            f"experiments.kernel_benchmark.cell_lengths: {source!r} is neither a length pool of "
            f"the package ({', '.join(packaged_lengths())}) nor a file"
        )
    return (source if path == packaged else path.stem), read_lengths(path)


def run_benchmark(section: config.KernelBenchmark, raw_csv: Path, device: str) -> list[dict]:
    """The timing core on the section's cases, its CSV at ``raw_csv``; the rows."""
    import torch

    from .attention.benchmark import benchmark_attention

    pools = dict(length_pool(source) for source in section.cell_lengths)
    return benchmark_attention(
        raw_csv,
        cell_lengths=pools,
        head_dims=section.head_dims,
        dense_n=section.dense_n,
        impls=list(section.impls) if section.impls is not None else None,
        dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        device=device,
        hidden=section.hidden,
        dense_tokens=section.dense_tokens,
        varlen_tokens=section.varlen_tokens,
        time_limit=section.time_limit if section.time_limit is not None else math.inf,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )


def run_kernel_benchmark(args: argparse.Namespace) -> None:
    outputs = (args.png, args.pdf, args.table_csv, args.table_md)
    section = config.section(
        "experiments.kernel_benchmark", parse_json_arg(args.params_json, "--params-json")
    )
    fallback = args.fallback_csv if args.fallback_csv is not None else section.fallback_csv
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_available() else None
    if device is None:
        reason = "no CUDA GPU on this machine"
        if fallback and Path(fallback).is_file():
            source = f"not rerun here ({reason}): rendered from {fallback}"
            print(f"kernel-benchmark: {source}", file=sys.stderr)
            render_kernel(fallback, *outputs, source=source)
            return
        print(f"kernel-benchmark: skipped, {reason}", file=sys.stderr)
        write_skipped("Attention kernel benchmark", reason, *outputs)
        return
    if device == "cuda" and not cuda_available():
        raise ConfigError("kernel-benchmark --device cuda: CUDA is not available here")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "kernel-benchmark --device cpu runs the Triton kernel under its interpreter: "
            "set TRITON_INTERPRET=1"
        )
    with tempfile.TemporaryDirectory() as scratch:
        raw_csv = Path(args.raw_csv) if args.raw_csv else Path(scratch) / "kernel_raw.csv"
        raw_csv.parent.mkdir(parents=True, exist_ok=True)
        run_benchmark(section, raw_csv, device)
        render_kernel(raw_csv, *outputs, source=f"sigmoid-sc kernel-benchmark ({device})")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "kernel-benchmark",
        help="time the attention kernels on a CUDA GPU and render the TFLOPS figure and tables",
        description="Times the package's attention implementations when CUDA is present; "
        "otherwise renders --fallback-csv (a committed GPU result) or writes a note saying it "
        "was skipped.",
    )
    p.add_argument(
        "--params-json",
        default="",
        help="the config's experiments.kernel_benchmark section (JSON; default: the schema's)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: CUDA, else the fallback or a note; cpu: time on the CPU (fp32, Triton's "
        "interpreter; tests)",
    )
    p.add_argument(
        "--fallback-csv",
        default=None,
        help="a committed kernel-benchmark CSV rendered without CUDA (default: the section's)",
    )
    p.add_argument("--raw-csv", default=None, help="keep the timing core's CSV here")
    for name in ("png", "pdf", "table-csv", "table-md"):
        p.add_argument(f"--{name}", required=True)
    p.set_defaults(func=run_kernel_benchmark)
