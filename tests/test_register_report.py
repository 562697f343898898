"""bench/register_report.py: the kernels compiled for sm_90a here, without a GPU.

Run in a subprocess without TRITON_INTERPRET (conftest.py sets it for the kernel tests; the
interpreter replaces the JIT functions this script compiles). Each compile takes a few seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "register_report.py"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

pytestmark = pytest.mark.skipif(
    not CUOBJDUMP.is_file(), reason=f"this Triton ships no cuobjdump ({CUOBJDUMP})"
)


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_report_reads_registers_spills_and_pipelining():
    """hd64's dk/dv kernel as launched, on pointer loads: pipelined (async copies), warpgroup
    MMAs, no spills; turning the atomic dq off leaves fewer MMAs (dq is the dq kernel's then)."""
    atomic = run("--kernels", "dkdv", "--head-dims", "64", "--configs", "64x128x8x2",
                 "--options", "bwd_tma=0")  # fmt: skip
    two = run("--kernels", "dkdv", "--head-dims", "64", "--configs", "64x128x8x2",
              "--options", "atomic_dq=0,bwd_tma=0")  # fmt: skip
    rows = []
    for process in (atomic, two):
        assert process.returncode == 0, process.stderr[-3000:]
        row = re.search(r"^\| dkdv \| 64 \| 64x128x8x2 \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$",
                        process.stdout, re.M)  # fmt: skip
        assert row, process.stdout
        rows.append([int(x) for x in row.groups()])
    (regs, spill, shared, asyncs, tma, wgmma), two_kernel = rows
    assert 0 < regs <= 255 and spill == 0 and shared > 0
    assert asyncs > 0 and tma == 0 and wgmma > 0
    assert two_kernel[5] < wgmma


def test_tma_paths_compile_for_hopper():
    """The TMA paths (forward q/k/v, backward q/dO; the interpreter runs their host
    descriptors, not Hopper's copies) compile for sm_90a and their loop loads become TMA
    copies (no async copies)."""
    process = run("--kernels", "fwd,dkdv", "--head-dims", "128", "--configs", "64x128x8x2",
                  "--options", "use_tma=1,bwd_tma=1")  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    rows = re.findall(r"^\| (fwd|dkdv) \| 128 \| 64x128x8x2 \| (\d+) \| (\d+) \| \d+ \| (\d+) \| (\d+) \|",
                      process.stdout, re.M)  # fmt: skip
    assert {r[0] for r in rows} == {"fwd", "dkdv"}, process.stdout
    for kind, regs, spill, asyncs, tma in rows:
        assert int(tma) > 0 and int(asyncs) == 0, (kind, process.stdout)
        assert 0 < int(regs) <= 255 and int(spill) >= 0


def test_bad_arguments_are_named():
    process = run("--kernels", "dkdv", "--configs", "64x128x8")
    assert process.returncode != 0 and "BLOCK_MxBLOCK_NxWARPSxSTAGES" in process.stderr
    process = run("--kernels", "bwd")
    assert process.returncode != 0 and "'bwd' is not one of" in process.stderr
    process = run("--options", "use_tmaa=1")
    assert process.returncode != 0 and "unknown kernel option 'use_tmaa'" in process.stderr


def test_pipelined_forward_compiles_with_tma():
    """The hand-pipelined forward (S of block j+1 before the sigmoid of block j) on TMA loads:
    compiles for sm_90a, loop loads as TMA copies, every dot a warpgroup MMA: the first S
    before the loop, S and P v in it, the last P v after it, the partial block's two."""
    process = run("--kernels", "fwd", "--head-dims", "128", "--configs", "128x64x8x3x1")
    assert process.returncode == 0, process.stderr[-3000:]
    row = re.search(r"^\| fwd \| 128 \| 128x64x8x3x1 \| (\d+) \| (\d+) \| \d+ \| (\d+) \| (\d+) \| (\d+) \|$",
                    process.stdout, re.M)  # fmt: skip
    assert row, process.stdout
    regs, spill, asyncs, tma, wgmma = map(int, row.groups())
    assert asyncs == 0 and tma > 0 and wgmma == 6 and 0 < regs <= 255, process.stdout
