"""``sigmoid-sc training-speed``: its variants, its FLOP count, and a smoke run on the CPU (through
bench/train_step_before.py, the stage with the step before token budgets added as a variant)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest_tokens import make_tokens

from sigmoid_sc.errors import ConfigError
from sigmoid_sc.training_speed import Variant, model_flops, parse_variant

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BEFORE = ROOT / "bench" / "train_step_before.py"


@pytest.fixture(scope="module")
def before():
    """bench/train_step_before.py as a module."""
    spec = importlib.util.spec_from_file_location("train_step_before", BEFORE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_variants_parse_and_bad_ones_are_named(before):
    assert parse_variant("tokens@1,4") == Variant("tokens", jobs=(1, 4))
    assert parse_variant("tokens:65536+compile@2") == Variant(
        "tokens:65536+compile", batch_tokens=65536, compile=True, jobs=(2,)
    )
    for bad in ("tokens:x", "cells:64", "tokens@0", "tokens@a", "today:64"):
        with pytest.raises(ConfigError, match="variant"):
            parse_variant(bad)
    # the bench adds the step before token budgets and passes the stage's variants through
    assert before.parse_variant("today:64@1,4") == before.Today("today:64", 64, (1, 4))
    assert before.parse_variant("tokens@2") == Variant("tokens", jobs=(2,))
    for bad in ("today", "today:0", "today:64+compile", "today:64@0", "tokens:x"):
        with pytest.raises(ConfigError, match="variant"):
            before.parse_variant(bad)


def test_model_flops_by_hand():
    model = {"n_layers": 2, "d_model": 8, "n_heads": 2, "d_ff": 32}
    # two cells of 3 and 5 tokens, 2 masked, 10 genes
    dense = 6 * 2 * (4 * 64 + 2 * 8 * 32) * 8  # 6 x matmul weights x tokens
    attention = 3.5 * 2 * 4 * (9 + 25) * 8  # 3.5 x layers x 4 sum(n^2) d
    head = 6 * 8 * 10 * 2  # 6 d V M
    assert model_flops(model, 10, 8, 34, 2) == dense + attention + head


def test_today_cells_are_the_fixed_count_batches_of_before(before):
    cells = np.arange(10, 60)
    steps = [before.today_cells(cells, 16, 0, t) for t in range(4)]
    assert all(s.size == 16 for s in steps)
    assert len(set(np.concatenate(steps[:3]).tolist())) == 48  # 3 batches an epoch, 2 left out
    assert not np.array_equal(steps[0], steps[3])


def test_smoke_run_on_the_cpu_writes_its_table(tmp_path):
    """The stage's variants, one and two jobs, beside the bench's step before token budgets
    (listed first: the "vs first" baseline)."""
    tokens = make_tokens(tmp_path / "tokens.npz", n_cells=160)
    csv, md_path = tmp_path / "speed.csv", tmp_path / "speed.md"
    cli = [
        sys.executable, str(BEFORE), "--smoke", "--tokens-npz", str(tokens),
        "--out-csv", str(csv), "--out-md", str(md_path), "--attentions", "sigmoid",
        "--variants", "today:8", "tokens:256@1,2", "--repeats", "3", "--warmup", "1",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(csv)
    assert table[["variant", "jobs"]].values.tolist() == [
        ["today:8", 1], ["tokens:256", 1], ["tokens:256", 2],
    ]  # fmt: skip
    assert table.note.isna().all(), table.note.tolist()
    assert (table.tokens_per_s_job > 0).all() and (table.step_ms > 0).all()
    today, budget = table.iloc[0], table.iloc[1:]
    assert today.cells_per_step == 8 and today.speedup_vs_first == 1.0
    assert budget.iloc[0].speedup_vs_first > 0 and np.isnan(budget.iloc[1].speedup_vs_first)
    assert (budget.tokens_per_step <= 256).all() and (budget.tokens_per_step > 256 - 32).all()
    # two jobs together: the aggregate is at least each one's rate
    assert table.iloc[2].tokens_per_s_total >= table.iloc[2].tokens_per_s_job
    md = md_path.read_text()
    assert md in done.stdout and "| 2x32 | sigmoid | tokens:256 | 2 |" in md


def test_without_cuda_it_says_so(tmp_path):
    tokens = make_tokens(tmp_path / "tokens.npz")
    cli = [sys.executable, "-m", "sigmoid_sc.cli", "training-speed", "--compare", "variants",
           "--tokens-npz", str(tokens), "--out-csv", str(tmp_path / "o.csv"),
           "--out-md", str(tmp_path / "o.md")]  # fmt: skip
    done = subprocess.run(
        cli, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "CUDA" in done.stderr


# --- what the two comparisons share, and the paper kernel's rebinding -------------------------


def test_the_clock_times_every_step_and_sees_a_non_finite_loss():
    import torch

    from sigmoid_sc.training_speed import time_steps

    seen, calls = [], []

    def step(t):
        seen.append(t)
        return torch.tensor(float("nan") if t == 4 else 1.0)

    timing = time_steps(step, 2, 3, torch.device("cpu"), before_timed=lambda: calls.append(1))
    assert seen == [0, 1, 2, 3, 4] and calls == [1]
    assert len(timing.warmup_ms) == 2 and len(timing.step_ms) == 3
    assert all(t >= 0 for t in timing.warmup_ms + timing.step_ms)
    assert timing.wall_s >= sum(timing.step_ms) / 1000 * 0.5 and not timing.finite


def test_implementations_rows_count_flops_with_the_shared_model(tmp_path):
    csv, md = tmp_path / "impl.csv", tmp_path / "impl.md"
    cli = [
        sys.executable, "-m", "sigmoid_sc.cli", "training-speed", "--smoke", "--workloads",
        "fixed", "--impls", "sigmoid_ours", "--peak-tflops", "1", "--out-csv", str(csv),
        "--out-md", str(md),
    ]  # fmt: skip
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(csv)
    assert len(table) == 2 and table.note.isna().all()  # smoke: head dims 8 and 16
    for _, r in table.iterrows():
        # smoke: 2 x 32, MLP 4x, vocabulary 200, fixed 64 x 2 tokens; masked tokens unknown
        # here but at least one a cell and at most all: MFU between the two bounds
        model = {"n_layers": 2, "d_model": 32, "d_ff": 128}
        seconds = r.step_ms_median / 1000
        low = model_flops(model, 200, 128, 2 * 64**2, 2) / seconds / 1e12
        high = model_flops(model, 200, 128, 2 * 64**2, 128) / seconds / 1e12
        assert low <= r.mfu <= high
    assert "| MFU |" in md.read_text()


def test_options_of_the_other_comparison_are_refused(tmp_path):
    from sigmoid_sc.cli import main

    out = ["--out-csv", str(tmp_path / "a.csv"), "--out-md", str(tmp_path / "a.md")]
    assert main(["training-speed", "--variants", "tokens@1", *out]) == 2
    assert main(["training-speed", "--compare", "variants", "--impls", "sigmoid_ours",
                 "--tokens-npz", "x.npz", *out]) == 2  # fmt: skip
    assert main(["training-speed", "--compare", "variants", *out]) == 2  # no --tokens-npz
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dense", [True, False])
def test_the_paper_kernel_rebinding_reads_the_encoders_varlen_batch(monkeypatch, dense):
    """The encoder hands every layer a VarlenBatch; the paper kernel's stand-in (our padded
    reference behind the package's two entry points) must give the model's own output."""
    import types

    import torch

    from sigmoid_sc.attention import sigmoid_attention_padded_reference
    from sigmoid_sc.model import Encoder, ModelConfig
    from sigmoid_sc.training_speed import _paper_sigmoid, model_attention

    def dense_kernel(q, k, v):
        lengths = torch.full((q.shape[0],), q.shape[1], dtype=torch.int32)
        return sigmoid_attention_padded_reference(q, k, v, lengths)

    def padded_kernel(q, k, v, seq_lens_k, seq_lens_q):
        assert torch.equal(seq_lens_k, seq_lens_q)
        return sigmoid_attention_padded_reference(q, k, v, seq_lens_k)

    fake = types.SimpleNamespace(
        sigmoid_attention=dense_kernel, sigmoid_attention_padded=padded_kernel
    )
    monkeypatch.setitem(sys.modules, "triton_sigmoid", fake)
    torch.manual_seed(0)
    model = Encoder(ModelConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, vocab_size=50,
                                max_len=16, attention="sigmoid")).eval()  # fmt: skip
    lengths = [8, 8, 8] if dense else [3, 8, 5]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    ids = torch.randint(3, 50, (int(cu[-1]),))
    with torch.no_grad():
        expected = model(ids, cu, max(lengths))
        with model_attention(_paper_sigmoid(dense)):
            got = model(ids, cu, max(lengths))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
