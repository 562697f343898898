"""``sigmoid-sc kernel-benchmark``: the attention kernels' TFLOPS (claim e) as a figure and tables.

Runs ``bench/kernel.py`` when a CUDA GPU is present and renders ``kernel_tflops.{png,pdf}`` and
``kernel.{csv,md}`` from its CSV; without a GPU it renders a committed CSV given with
``--fallback-csv`` (saying so), or writes a note table and a figure that say the benchmark was
skipped, and exits 0.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import DataError
from .experiment_figures import render_kernel, write_skipped


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def newest_kernel_csv(folder: Path) -> Path:
    """The newest main-table CSV bench/kernel.py wrote into ``folder`` (not the sweep's)."""
    found = sorted(p for p in folder.glob("*.csv") if not p.name.endswith("_sweep.csv"))
    if not found:
        raise DataError(f"bench/kernel.py wrote no CSV into {folder}")
    return max(found, key=lambda p: p.stat().st_mtime)


def run_kernel_benchmark(args: argparse.Namespace) -> None:
    outputs = (args.png, args.pdf, args.table_csv, args.table_md)
    if not cuda_available() and not args.force:
        reason = "no CUDA GPU on this machine"
        if args.fallback_csv and Path(args.fallback_csv).is_file():
            source = f"not rerun here ({reason}): rendered from {args.fallback_csv}"
            print(f"kernel-benchmark: {source}", file=sys.stderr)
            render_kernel(args.fallback_csv, *outputs, source=source)
            return
        print(f"kernel-benchmark: skipped, {reason}", file=sys.stderr)
        write_skipped("Attention kernel benchmark", reason, *outputs)
        return
    script = Path(args.bench_script)
    if not script.is_file():
        raise DataError(f"kernel benchmark script {script} does not exist")
    keep = Path(args.keep_dir) if args.keep_dir else None
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = keep or Path(scratch)
        bench_args = shlex.split(args.bench_args)
        command = [sys.executable, str(script), "--out", str(out_dir), *bench_args]
        print("kernel-benchmark: " + " ".join(command), file=sys.stderr, flush=True)
        status = subprocess.run(command, check=False).returncode
        if status != 0:
            raise DataError(f"{script} exited with status {status} (its output is in the log)")
        csv_path = newest_kernel_csv(out_dir)
        render_kernel(csv_path, *outputs, source=f"bench/kernel.py {args.bench_args}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "kernel-benchmark",
        help="run bench/kernel.py on a CUDA GPU and render the TFLOPS figure and tables",
        description="Runs the kernel benchmark when CUDA is present; otherwise renders "
        "--fallback-csv (a committed GPU result) or writes a note saying it was skipped.",
    )
    p.add_argument("--bench-script", default="bench/kernel.py")
    p.add_argument(
        "--bench-args",
        default="--no-sweep",
        help="options for bench/kernel.py, one string (--bench-args='--no-sweep --quick')",
    )
    p.add_argument("--fallback-csv", default=None, help="a committed bench/kernel.py CSV")
    p.add_argument("--keep-dir", default=None, help="keep bench/kernel.py's raw outputs here")
    p.add_argument("--force", action="store_true", help="run even without CUDA (it will fail)")
    for name in ("png", "pdf", "table-csv", "table-md"):
        p.add_argument(f"--{name}", required=True)
    p.set_defaults(func=run_kernel_benchmark)
