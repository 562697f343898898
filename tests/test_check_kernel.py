"""bench/check_kernel.py, the GPU correctness check, in its CPU smoke mode (Triton's
interpreter, fp32, tiny sizes): it passes on the kernel, fails on a kernel with a wrong
gradient or non-zero padding, and its float64 reference is the reference attention's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sigmoid_sc.attention import triton_sigmoid as ts
from sigmoid_sc.attention.reference import sigmoid_attention_varlen_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check_kernel():
    spec = importlib.util.spec_from_file_location(
        "check_kernel", ROOT / "bench" / "check_kernel.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_passes_and_prints_the_table(check_kernel, capsys):
    assert check_kernel.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "fp32   64  mixed 1..40 x3" in out and "fp32   64  single 96" in out
    assert "8 checks, 8 passed" in out and out.rstrip().endswith("check_kernel: OK")


def test_a_wrong_gradient_fails(check_kernel, capsys, monkeypatch):
    launch_bwd = ts.launch_bwd

    def off_by_one_percent(*args, **kwargs):
        dq, dk, dv = launch_bwd(*args, **kwargs)
        return dq, dk * 1.01, dv

    monkeypatch.setattr(ts, "launch_bwd", off_by_one_percent)
    assert check_kernel.main(["--smoke"]) == 1
    out = capsys.readouterr().out
    assert "0/4 FAIL" in out and "check_kernel: FAILED" in out
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 8 and all("dk 1.00e-02 > 1e-04" in line for line in fails), out


def test_padding_that_is_not_zero_fails(check_kernel, capsys, monkeypatch):
    launch_fwd = ts.launch_fwd

    def writes_into_padding(q, *args, **kwargs):
        out = launch_fwd(q, *args, **kwargs)
        seq_len, max_seqlen, zero_fill = args[3], args[7], args[8]
        if zero_fill and int(seq_len[-1]) < max_seqlen:  # the padded layout's last row is padding
            out[-1] = 0.5
        return out

    monkeypatch.setattr(ts, "launch_fwd", writes_into_padding)
    assert check_kernel.main(["--smoke"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 2 and all("mixed 1..40 x3 padded" in line for line in fails), out
    assert all(line.endswith("padded rows not zero") for line in fails), out


@pytest.mark.parametrize("bias", [None, -1.5])
def test_float64_reference_is_the_reference_attention(check_kernel, bias):
    lengths = (5, 1, 23)
    q, k, v, do, cu = check_kernel.make_inputs(lengths, 32, 2, torch.float64, "cpu", seed=3)
    scale = 0.2
    biases = (
        [-torch.log(torch.tensor(float(n))).item() for n in lengths] if bias is None else [bias] * 3
    )
    ours = check_kernel.reference(q, k, v, do, lengths, scale, biases)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sigmoid_attention_varlen_reference(*leaves, cu, max(lengths), scale=scale, bias=bias)
    grads = torch.autograd.grad(out, leaves, do)
    for mine, theirs in zip(ours, [out, *grads]):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-6, atol=1e-9)
