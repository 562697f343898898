"""The experiments' workflow side: sigmoid-sc training-speed --smoke, the kernel figure and tables,
and the experiments rules in Snakemake (dry runs of the embedded default; every experiment rule
on a copy of the session's shared run of tests/configs/tiny.yaml, tests/conftest_workflow.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest_workflow import TINY_CONFIG, copy_run, job_counts, output_of, snakemake

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = False
try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    pass


def run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------------------------
# sigmoid-sc training-speed


def test_train_speed_smoke_writes_its_table(tmp_path):
    csv, md = tmp_path / "speed.csv", tmp_path / "speed.md"
    process = run(
        [sys.executable, "-m", "sigmoid_sc.cli", "training-speed", "--smoke",
         "--out-csv", str(csv), "--out-md", str(md)],
        tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    table = pd.read_csv(csv)
    assert set(table["workload"].str.split().str[0]) == {"fixed", "real"}
    assert set(table["head_dim"]) == {8, 16}
    timed = table[table["step_ms_median"].notna()]
    assert {"sigmoid_ours", "softmax_varlen", "softmax_sdpa_padded"} <= set(timed["impl"])
    assert (timed["step_ms_median"] > 0).all()
    assert np.allclose(timed["tokens_per_s"], timed["tokens"] / (timed["step_ms_median"] / 1000))
    assert (timed["n_params"].astype(int) > 0).all()
    # the fastest softmax of each setting has speed-up exactly 1; nothing softmax is faster
    for _, part in timed.groupby(["workload", "head_dim"]):
        softmax = part[part["attention"] == "softmax"]
        assert softmax["speedup_vs_best_softmax"].max() == pytest.approx(1.0)
    cuda_only = table[table["impl"] == "softmax_sdpa_cudnn"]
    assert cuda_only["step_ms_median"].isna().all()
    assert cuda_only["note"].str.contains("needs CUDA").all()
    real = table[table["workload"].str.startswith("real")].iloc[0]
    fixed = table[table["workload"].str.startswith("fixed")].iloc[0]
    assert real["n_cells"] > fixed["n_cells"]  # real lengths: more, shorter cells
    assert "| sigmoid_ours |" in md.read_text()


def test_train_speed_takes_the_config_section_and_the_command_line_wins(tmp_path):
    from sigmoid_sc.training_speed import add_arguments, settle

    parser = __import__("argparse").ArgumentParser()
    add_arguments(parser)
    section = json.dumps({"n_layers": 3, "d_models": [256], "workloads": ["real"]})
    args = settle(parser.parse_args(
        ["--params-json", section, "--d-models", "512", "--out-csv", "c", "--out-md", "m"]
    ))  # fmt: skip
    assert (args.n_layers, args.d_models, args.workloads) == (3, [512], ["real"])
    assert (args.head_dims, args.repeats, args.smoke) == ([64, 128], 20, False)  # the schema's


@pytest.mark.skipif(HAS_CUDA, reason="the skip path is for machines without CUDA")
def test_train_speed_without_cuda_writes_a_table_saying_so(tmp_path):
    csv, md = tmp_path / "speed.csv", tmp_path / "speed.md"
    process = run(
        [sys.executable, "-m", "sigmoid_sc.cli", "training-speed", "--out-csv", str(csv),
         "--out-md", str(md)],
        tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    table = pd.read_csv(csv)
    assert table["status"].tolist() == ["skipped"] and "CUDA" in table["reason"][0]
    assert "Skipped: no CUDA GPU" in md.read_text()


# --------------------------------------------------------------------------------------------
# kernel figure and tables


def kernel_rows() -> list[dict]:
    rows = []
    for hd in (64, 128):
        for n in (1024, 4096, 16384):
            for impl, tf in (("ours", 400), ("triton_sigmoid", 380), ("sdpa_cudnn", 450),
                             ("sdpa_flash", 300)):  # fmt: skip
                rows.append(dict(case=f"dense N={n}", hd=hd, impl=impl, fwd_tflops=tf + n / 1024,
                                 bwd_tflops=tf * 0.8, fwdbwd_tflops=tf * 0.85, fwd_ms=1.0,
                                 bwd_ms=2.0, fwdbwd_ms=3.0, note=""))  # fmt: skip
        for impl in ("ours", "njt_flash", "flex_docmask"):
            rows.append(dict(case="pbmc3k (median 820, max 2455)", hd=hd, impl=impl,
                             fwd_tflops=200.0, bwd_tflops=150.0, fwdbwd_tflops=160.0, fwd_ms=1.0,
                             bwd_ms=2.0, fwdbwd_ms=3.0, note=""))  # fmt: skip
    rows.append(dict(case="dense N=16384", hd=64, impl="naive", fwd_tflops="", bwd_tflops="",
                     fwdbwd_tflops="", fwd_ms="", bwd_ms="", fwdbwd_ms="", note="OOM"))  # fmt: skip
    return rows


@pytest.fixture
def kernel_csv(tmp_path) -> Path:
    """A CSV in bench/kernel.py's format, written by its own writer when the file is present."""
    header = {"date": "2026-11-29 09:00 UTC", "gpu": "NVIDIA H200", "torch": "2.11.0",
              "triton": "3.6.0", "triton_sigmoid": "0.1.2", "cuda": "12.8"}  # fmt: skip
    out = tmp_path / "bench"
    script = ROOT / "bench" / "kernel.py"
    if script.is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_kernel", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.write_outputs(out, header, kernel_rows(), [], [])
        return next(p for p in out.glob("*.csv") if not p.name.endswith("_sweep.csv"))
    out.mkdir()
    path = out / "2026-11-29_h200.csv"
    with open(path, "w") as fh:
        fh.write("# " + ", ".join(f"{k}={v}" for k, v in header.items()) + "\n")
        pd.DataFrame(kernel_rows()).to_csv(fh, index=False)
    return path


def test_kernel_figure_and_tables_from_a_bench_csv(kernel_csv, tmp_path):
    from sigmoid_sc.cli import main

    out = {k: tmp_path / f"kernel.{k}" for k in ("png", "pdf", "csv", "md")}
    status = main(
        ["experiment-figures", "kernel", "--csv", str(kernel_csv), "--png", str(out["png"]),
         "--pdf", str(out["pdf"]), "--table-csv", str(out["csv"]), "--table-md", str(out["md"])]
    )  # fmt: skip
    assert status == 0
    table = pd.read_csv(out["csv"])
    assert len(table) == len(kernel_rows())
    assert (table["gpu"] == "NVIDIA H200").all() and (table["torch"].astype(str) == "2.11.0").all()
    ours = table[
        (table["impl"] == "ours") & (table["case"] == "dense N=4096") & (table["hd"] == 64)
    ]
    assert ours["fwd_tflops"].tolist() == [404.0]
    md = out["md"].read_text()
    assert "| dense N=4096 | 64 | ours | 404 | 320 | 340 |  |" in md
    assert "| dense N=16384 | 64 | naive | - | - | - | OOM |" in md
    assert "515" in md and "361" in md and "440" in md
    assert out["png"].read_bytes()[:4] == b"\x89PNG" and out["pdf"].read_bytes()[:4] == b"%PDF"


@pytest.mark.skipif(HAS_CUDA, reason="the fallback path is for machines without CUDA")
def test_kernel_benchmark_without_gpu_renders_the_fallback_or_says_skipped(kernel_csv, tmp_path):
    from sigmoid_sc.cli import main

    def outputs(stem):
        return ["--png", str(tmp_path / f"{stem}.png"), "--pdf", str(tmp_path / f"{stem}.pdf"),
                "--table-csv", str(tmp_path / f"{stem}.csv"),
                "--table-md", str(tmp_path / f"{stem}.md")]  # fmt: skip

    assert main(["kernel-benchmark", "--fallback-csv", str(kernel_csv), *outputs("fb")]) == 0
    assert "not rerun here (no CUDA GPU" in (tmp_path / "fb.md").read_text()
    assert len(pd.read_csv(tmp_path / "fb.csv")) == len(kernel_rows())
    assert main(["kernel-benchmark", *outputs("skip")]) == 0
    assert pd.read_csv(tmp_path / "skip.csv")["status"].tolist() == ["skipped"]
    assert (tmp_path / "skip.png").read_bytes()[:4] == b"\x89PNG"
    # the section's fallback_csv (as the rule passes it) is rendered the same way
    section = json.dumps({"fallback_csv": str(kernel_csv)})
    assert main(["kernel-benchmark", "--params-json", section, *outputs("section")]) == 0
    assert "not rerun here (no CUDA GPU" in (tmp_path / "section.md").read_text()


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU run needs Triton's interpreter"
)
def test_kernel_benchmark_times_the_cores_cases_from_its_config_section(tmp_path):
    """--device cpu: the section's cases timed by sigmoid_sc.attention.benchmark (a shipped
    length pool and a file of lengths), the figure and tables rendered from the core's CSV."""
    from sigmoid_sc.cli import main
    from sigmoid_sc.kernel_benchmark import length_pool

    lengths = tmp_path / "mine.txt"
    lengths.write_text("5\n17\n40\n3\n")
    section = {
        "head_dims": [32], "dense_n": [32], "cell_lengths": [str(lengths)],
        "impls": ["ours", "naive", "njt_efficient"], "hidden": 64, "dense_tokens": 64,
        "varlen_tokens": 60,
    }  # fmt: skip
    out = {k: tmp_path / f"kernel.{k}" for k in ("png", "pdf", "csv", "md")}
    argv = ["kernel-benchmark", "--device", "cpu", "--params-json", json.dumps(section),
            "--raw-csv", str(tmp_path / "raw" / "kernel_raw.csv"), "--png", str(out["png"]),
            "--pdf", str(out["pdf"]), "--table-csv", str(out["csv"]),
            "--table-md", str(out["md"])]  # fmt: skip
    assert main(argv) == 0
    table = pd.read_csv(out["csv"])
    cases = dict.fromkeys(table["case"])
    assert list(cases)[0] == "dense N=32" and list(cases)[1].startswith("mine (median ")
    assert sorted(zip(table["case"].str.split(" ").str[0], table["impl"])) == [
        ("dense", "naive"), ("dense", "ours"), ("mine", "njt_efficient"), ("mine", "ours"),
    ]  # fmt: skip
    ours = table[table["impl"] == "ours"]
    assert (ours["fwd_tflops"] > 0).all() and ours["note"].isna().all()
    assert (table["gpu"] == "cpu").all() and (table["hd"] == 32).all()
    assert "| dense N=32 | 32 | ours |" in out["md"].read_text()
    assert (tmp_path / "raw" / "kernel_raw.csv").read_text().startswith("# date=")
    assert out["png"].read_bytes()[:4] == b"\x89PNG" and out["pdf"].read_bytes()[:4] == b"%PDF"

    # the shipped pools are named by their names; a name that is neither a pool nor a file
    # is refused naming the key, before anything is timed
    label, pool = length_pool("pbmc3k")
    assert label == "pbmc3k" and len(pool) > 1000 and (pool > 0).all()
    bad = json.dumps({**section, "cell_lengths": ["pbmc4k"]})
    assert main([*argv[:4], bad, *argv[5:]]) == 2
    # a width the head dim does not divide is refused by the config
    assert main([*argv[:4], json.dumps({**section, "hidden": 48, "head_dims": [32]}),
                 *argv[5:]]) == 2  # fmt: skip


# --------------------------------------------------------------------------------------------
# the rules in Snakemake


def test_embedded_default_schedules_the_cpu_experiments(tmp_path):
    process = snakemake(tmp_path, "--dry-run", "--quiet", "rules", configfile=None)
    assert process.returncode == 0, output_of(process)
    listing = output_of(process)
    for rule in ("stress_test", "jacobian"):
        assert f"\n{rule} " in listing, listing
    for rule in ("kernel_benchmark", "training_speed"):  # GPU experiments: off by default
        assert f"\n{rule} " not in listing


def test_a_bad_jacobian_dataset_is_named_before_any_job(tmp_path):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["experiments"]["jacobian"]["dataset"] = "no_such_dataset"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    process = snakemake(tmp_path, "--dry-run", configfile=bad)
    assert process.returncode != 0
    assert "experiments.jacobian.dataset 'no_such_dataset'" in output_of(process)
    assert not (tmp_path / "results").exists()


def test_jacobian_refuses_cls_models_before_any_job(tmp_path):
    """Its per-cell slices of the attention inputs assume gene tokens only."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["model"]["cls_token"] = True
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    process = snakemake(tmp_path, "--dry-run", configfile=bad)
    assert process.returncode != 0
    assert "model.cls_token: true" in output_of(process)
    assert not (tmp_path / "results").exists()


#: the experiments over tests/configs/tiny.yaml: tiny settings, every one enabled; the Jacobian
#: analysis needs models without a CLS token
EXPERIMENTS = {
    "stress_test": {
        "enabled": True, "n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32,
        "vocab_size": 100, "seq_len": 32, "max_steps": 6, "early_steps": 2, "warmup_steps": 2,
        "precision": "fp32", "logit_queries": 8,
    },
    "jacobian": {"enabled": True, "n_cells": 4, "check_rows": 1},
    "kernel_benchmark": {"enabled": True},
    "training_speed": {"enabled": True},
}  # fmt: skip


@pytest.mark.slow
def test_every_experiment_rule_runs_on_a_copy_of_the_shared_run(tiny_run, tmp_path):
    """The shared run's config with every experiment on and no CLS token: of the run's own jobs
    only the two trainings the Jacobian reads run again (their model changed), then the four
    experiment rules; their tables, figures, logs and report captions."""
    workdir = copy_run(tiny_run, tmp_path / "run")
    config = {**TINY_CONFIG, "experiments": EXPERIMENTS}
    config["model"] = {**TINY_CONFIG["model"], "cls_token": False}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    targets = [
        "results/figures/stress_test.png",
        "results/figures/jacobian.png",
        "results/tables/kernel.md",
        "results/tables/training_speed.md",
    ]
    process = snakemake(workdir, "--cores", "2", *targets, configfile=configfile)
    assert process.returncode == 0, output_of(process)[-4000:]
    counts = job_counts(output_of(process))
    assert counts == {"jacobian": 1, "kernel_benchmark": 1, "stress_test": 1, "train": 2,
                      "training_speed": 1, "total": 6}, counts  # fmt: skip
    results = workdir / "results"

    log = pd.read_csv(results / "tables" / "stress_test.csv")
    assert log.groupby("attention").size().to_dict() == {"sigmoid": 6, "softmax": 6}
    assert np.isfinite(log[["loss", "grad_norm", "max_attn_logit"]].to_numpy()).all()
    summary = json.loads((results / "tables" / "stress_test_summary.json").read_text())
    assert {a["stop_reason"] for a in summary["arms"].values()} == {"max_steps"}
    assert (results / "figures" / "stress_test.pdf").stat().st_size > 0

    jacobian = pd.read_csv(results / "tables" / "jacobian.csv")
    assert set(jacobian["attention"]) == {"softmax", "sigmoid"}
    first = next(iter(TINY_CONFIG["datasets"]))
    assert (jacobian["dataset"] == first).all() and (jacobian["n_cells"] == 4).all()
    sig = jacobian[jacobian["attention"] == "sigmoid"]
    assert (sig["offdiag_l1_share_mean"] == 0).all() and (sig["row_max_dpds_max"] <= 0.25).all()

    if not HAS_CUDA:  # the GPU experiments say they were skipped, and the run succeeds
        assert "Skipped" in (results / "tables" / "kernel.md").read_text()
        assert "Skipped" in (results / "tables" / "training_speed.md").read_text()
        assert (results / "figures" / "kernel_tflops.png").stat().st_size > 0
    for name in ("stress_test", "jacobian", "kernel_benchmark", "training_speed"):
        assert (results / "logs" / "experiments" / f"{name}.log").is_file()

    # the captions render (reStructuredText errors are printed, not raised, by Snakemake)
    report = snakemake(workdir, "--report", "report.html", *targets, configfile=configfile)
    assert report.returncode == 0, output_of(report)[-4000:]
    assert "ERROR/" not in output_of(report)
    html = (workdir / "report.html").read_text(errors="replace")
    assert "Stability stress test" in html and "Jacobian of the attention weights" in html
