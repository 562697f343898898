"""The benchmark scripts' own logic, on the CPU: bench/kernel.py's sweep bookkeeping (rounds,
medians, config overrides), the benches' option and config parsers (bench/launch_args.py),
bench/kernel.py's variants and bench/ncu_target.py's launches under Triton's interpreter.
The GPU timings themselves are bench/kernel.py's job on a GPU, not a test's."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from launch_args import parse_configs, parse_options  # noqa: E402


@pytest.fixture(scope="module")
def bench_kernel():
    spec = importlib.util.spec_from_file_location("bench_kernel", ROOT / "bench" / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases(bench_kernel):
    Case = bench_kernel.core.Case
    return [Case("dense N=8192", 128, (8192,), True),
            Case("pbmc3k (median 852, max 1981)", 128, (852, 1981), False)]  # fmt: skip


def test_sweep_rounds_are_interleaved_within_each_case(bench_kernel):
    one = bench_kernel.sweep_jobs(cases(bench_kernel), ("fwd",), ["tanh+tma", "tanh ptr"])
    three = bench_kernel.sweep_jobs(cases(bench_kernel), ("fwd",), ["tanh+tma", "tanh ptr"],
                                    rounds=3)  # fmt: skip
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


def test_parse_options_names_what_is_wrong():
    """The benches' --options: the launchers' keyword options with integer values, else a
    ValueError naming it (the removed experimental switches are unknown now)."""
    assert parse_options("use_tma=0,sig_mode=1") == {"use_tma": 0, "sig_mode": 1}
    assert parse_options("") == {}
    with pytest.raises(ValueError, match="unknown kernel option 'tma'"):
        parse_options("tma=1")
    with pytest.raises(ValueError, match="unknown kernel option 'atomic_dq'"):
        parse_options("atomic_dq=0")
    with pytest.raises(ValueError, match="'use_tma' needs an integer, got 'yes'"):
        parse_options("use_tma=yes")
    assert parse_configs("128x64x8x3x1,64x128x8x3") == [(128, 64, 8, 3, 1), (64, 128, 8, 3)]
    with pytest.raises(ValueError, match="each bwd config is BLOCK_MxBLOCK_NxWARPSxSTAGES"):
        parse_configs("128x64x8x3x1", "bwd")


def test_kernel_variants_differ_from_ours_by_their_options_only(bench_kernel, monkeypatch):
    """The table's variant rows: our kernel at its first configs with explicit launcher options,
    forward and gradients equal to the production path's (fp32 under the interpreter)."""
    monkeypatch.setattr(bench_kernel, "DEVICE", "cpu")
    inp = bench_kernel.Inputs([40, 17], 32, dtype=torch.float32, heads=2)
    leaves = [t.detach().requires_grad_() for t in (inp.q, inp.k, inp.v)]
    fwd, _ = bench_kernel.IMPLS["ours"](inp, False)
    out = fwd(*leaves)
    expected = [out, *torch.autograd.grad(out, leaves, inp.do)]
    for name in bench_kernel.OURS_VARIANTS:
        fwd, tensors = bench_kernel.IMPLS[name](inp, False)
        out = fwd(*leaves)
        got = [out, *torch.autograd.grad(out, leaves, tensors[3])]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "kernel, config", [("fwd", "32x16x4x1x1"), ("bwd", "32x16x4x1")], ids=["fwd", "bwd"]
)
def test_ncu_target_launches_its_kernel(kernel, config):
    """The profiling target runs one explicit config (here under the interpreter, fp32)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "ncu_target.py"), "--kernel", kernel,
           "--head-dim", "64", "--case", "lengths:40,17", "--config", config, "--launches", "2",
           "--device", "cpu", "--dtype", "fp32", "--options", "use_tma=0"]  # fmt: skip
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
