"""The benchmark scripts' own logic, on the CPU: bench/kernel.py's sweep bookkeeping (rounds,
medians, config overrides) and bench/ncu_target.py's launches under Triton's interpreter.
The GPU timings themselves are bench/kernel.py's job on the lent H200, not a test's."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_kernel():
    spec = importlib.util.spec_from_file_location("bench_kernel", ROOT / "bench" / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = [("dense N=8192", 128, None, True), ("pbmc3k (median 852, max 1981)", 128, None, False)]


def test_sweep_rounds_are_interleaved_within_each_case(bench_kernel):
    one = bench_kernel.sweep_jobs(CASES, ("fwd",), ["tanh+tma", "probe:no-sigmoid"])
    three = bench_kernel.sweep_jobs(CASES, ("fwd",), ["tanh+tma", "probe:no-sigmoid"], rounds=3)
    assert len(three) == 3 * len(one) and all(job[0] == 0 for job in one)
    per_case = len(one) // 2
    # case 0's three rounds first (its inputs are built once), each round the whole job list
    assert [job[1] for job in three[: 3 * per_case]] == [0] * (3 * per_case)
    assert [job[0] for job in three[: 3 * per_case]] == [
        r for r in range(3) for _ in range(per_case)
    ]
    assert [job[1:] for job in three[:per_case]] == [job[1:] for job in one[:per_case]]
    assert [job[1:] for job in three[per_case : 2 * per_case]] == [
        job[1:] for job in one[:per_case]
    ]


def test_median_over_rounds_summarises_each_config(bench_kernel):
    row = dict(case="dense N=8192", hd=128, stage="fwd", variant="tanh+tma", ms=1.0)
    rows = [
        {**row, "config": "a", "tflops": t, "err": e, "round": i}
        for i, (t, e) in enumerate([(600.0, 1e-3), (560.0, 3e-3), (610.0, 2e-3)])
    ] + [{**row, "config": "b", "tflops": 590.0, "err": 1e-3, "round": 0}]
    summary = {r["config"]: r for r in bench_kernel.median_over_rounds(rows)}
    assert summary["a"]["tflops"] == 600.0 and summary["a"]["spread"] == 50.0
    assert summary["a"]["err"] == 3e-3 and summary["a"]["rounds"] == 3
    assert summary["b"]["rounds"] == 1
    # the best config is chosen on medians: a (600) beats b (590) though b beats a's 560 round
    lines = bench_kernel.sweep_summary(rows)
    assert any("600.0 TFLOPS" in line and "median of 3, spread 50.0" in line for line in lines)


def test_sweep_configs_override_and_bad_input(bench_kernel, monkeypatch):
    monkeypatch.setattr(bench_kernel, "SWEEP_FWD_CONFIGS", {128: [], 64: []})
    monkeypatch.setattr(bench_kernel, "SWEEP_BWD_CONFIGS", {128: [], 64: []})
    bench_kernel.override_sweep_configs(
        "fwd128:128x64x8x3x1,128x32x8x3x1;bwd:64x128x8x3", (128, 64)
    )
    assert bench_kernel.SWEEP_FWD_CONFIGS == {128: [(128, 64, 8, 3, 1), (128, 32, 8, 3, 1)], 64: []}
    assert bench_kernel.SWEEP_BWD_CONFIGS == {128: [(64, 128, 8, 3)], 64: [(64, 128, 8, 3)]}
    for bad, message in [
        ("fwd:128x64x8x3", "each fwd config is BLOCK_MxBLOCK_NxWARPSxSTAGESxPIPELINE"),
        ("bwd128:64x128x8", "each bwd config is BLOCK_MxBLOCK_NxWARPSxSTAGES"),
        ("dq:64x64x4x3", "is not fwd, bwd"),
        ("fwd:128x64xeightx3x1", "each config is"),
    ]:
        with pytest.raises(ValueError, match=message):
            bench_kernel.override_sweep_configs(bad, (128,))


@pytest.mark.parametrize(
    "kernel, config", [("fwd", "32x16x4x1x1"), ("bwd", "32x16x4x1")], ids=["fwd", "bwd"]
)
def test_ncu_target_launches_its_kernel(kernel, config):
    """The profiling target runs one explicit config (here under the interpreter, fp32)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "ncu_target.py"), "--kernel", kernel,
           "--head-dim", "64", "--case", "lengths:40,17", "--config", config, "--launches", "2",
           "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"2 launches of {kernel} hd64 lengths [40, 17]" in done.stdout
    assert "output finite: True" in done.stdout


def test_ncu_target_rejects_a_config_of_the_wrong_kernel():
    cmd = [sys.executable, str(ROOT / "bench" / "ncu_target.py"), "--kernel", "fwd",
           "--config", "64x128x8x3", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert (
        done.returncode != 0
        and "each fwd config is BLOCK_MxBLOCK_NxWARPSxSTAGESxPIPELINE" in done.stderr
    )
