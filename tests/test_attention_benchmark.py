"""sigmoid_sc.attention.benchmark, the timing core of the kernel-benchmark stage, on the CPU:
tiny cases under Triton's interpreter (fp32), the CSV it writes, its FLOP count and cases."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from sigmoid_sc.attention import benchmark as core


def read_table(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    header = dict(part.split("=", 1) for part in lines[0][2:].split(", "))
    rows = list(csv.DictReader(lines[1:]))
    return header, rows


def test_benchmark_writes_the_table(tmp_path):
    out = tmp_path / "kernel.csv"
    rows = core.benchmark_attention(
        out, cell_lengths={"tiny": [5, 17, 40, 3]}, head_dims=(32,), dense_n=(32,),
        impls=["ours", "naive", "sdpa_cudnn", "njt_efficient"], dtype=torch.float32,
        device="cpu", hidden=64, dense_tokens=64, varlen_tokens=60, log=lambda *a: None,
    )  # fmt: skip
    header, table = read_table(out)
    assert header["gpu"] == "cpu" and header["dtype"] == "float32" and "torch" in header
    assert list(table[0]) == list(core.COLUMNS)
    assert len(table) == len(rows)
    by = {(r["case"], r["impl"]): r for r in table}
    varlen_case = next(c for c, _ in by if c.startswith("tiny"))
    assert set(by) == {("dense N=32", "ours"), ("dense N=32", "naive"),
                       ("dense N=32", "sdpa_cudnn"), (varlen_case, "ours"),
                       (varlen_case, "njt_efficient")}  # fmt: skip
    # naive runs only dense cases; sdpa only dense; ours both
    for key in [("dense N=32", "ours"), ("dense N=32", "naive"), (varlen_case, "ours")]:
        row = by[key]
        assert row["note"] == "", row
        lengths = (32, 32) if key[0].startswith("dense") else None
        for stage, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
            tflops, ms = float(row[f"{stage}_tflops"]), float(row[f"{stage}_ms"])
            assert tflops > 0 and ms > 0 and math.isfinite(tflops)
            if lengths:
                assert tflops == pytest.approx(factor * core.flops_fwd(lengths, 32, 64) / ms / 1e9)
    # a backend this machine lacks (cuDNN on a CPU) is a row with the reason, not a crash
    assert by[("dense N=32", "sdpa_cudnn")]["fwd_tflops"] == ""
    assert by[("dense N=32", "sdpa_cudnn")]["note"] != ""


def test_flops_cases_and_lengths():
    # 2 heads of 32 (hidden 64), two sequences of 32: 4 * H * D * sum(n^2)
    assert core.flops_fwd([32, 32], 32, 64) == 4 * 2 * 32 * 2 * 32**2
    pool = np.array([5, 17, 40, 3, 9])
    drawn = core.sample_lengths(pool, tokens=30, seed=0)
    assert drawn.sum() >= 30 and set(drawn) <= set(pool)
    assert (drawn == core.sample_lengths(pool, tokens=30, seed=0)).all()  # seeded
    assert core.sample_lengths(pool, tokens=10**6).sum() == pool.sum()  # the pool runs out
    with pytest.raises(ValueError, match="positive"):
        core.sample_lengths([4, 0])
    cases = core.make_cases((128, 64), (1024, 8192), {"cells": pool}, dense_tokens=16384)
    assert [(c.name.split(" (")[0], c.head_dim, c.dense) for c in cases] == [
        ("dense N=1024", 128, True), ("dense N=8192", 128, True), ("cells", 128, False),
        ("dense N=1024", 64, True), ("dense N=8192", 64, True), ("cells", 64, False),
    ]  # fmt: skip
    assert cases[0].lengths == (1024,) * 16 and cases[1].lengths == (8192,) * 2
    assert core.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert core.device_slug("NVIDIA H200") == "h200" and core.device_slug("cpu") == "cpu"


def test_lengths_from_a_tokens_file_or_a_list(tmp_path):
    np.savez(tmp_path / "tokens.npz", offsets=np.array([0, 4, 9, 30]))
    assert core.read_lengths(tmp_path / "tokens.npz").tolist() == [4, 5, 21]
    (tmp_path / "lengths.txt").write_text("# genes per cell\n781\n1352\n")
    assert core.read_lengths(tmp_path / "lengths.txt").tolist() == [781, 1352]


def test_unknown_implementation_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown implementation"):
        core.benchmark_attention(tmp_path / "k.csv", impls=["ours", "flash3"], device="cpu")
