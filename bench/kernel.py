"""Sigmoid-attention kernel lab: the timing table with kernel variants, config sweeps, rounds.

Run on a CUDA machine:

    python bench/kernel.py --out DIR              # GPU checks + variant sweep + full table
    python bench/kernel.py --out DIR --no-sweep   # GPU checks + full table only

Prints a table and writes ``DIR/<date>_<gpu>.csv`` and ``.md`` (date, GPU, torch and triton
versions in the header; ``_sweep.csv`` beside them). The timing core (cases, implementations,
TFLOPS, the CSV) is the package's :mod:`sigmoid_sc.attention.benchmark`, which the pipeline's
kernel-benchmark stage (:mod:`sigmoid_sc.kernel_benchmark`) runs, and the real cell-length
pools are the package's (``sigmoid_sc/data/lengths_*.txt``: pbmc3k, Baron). This script adds
the lab's extras: a four-times-longer Baron set, kernel variants beside
``ours`` (pointer loads, the exact sigmoid in the backward: the launchers' explicit options,
one fixed config each), a sweep of variants x launch configs with rounds, compile-warming
workers, and GPU correctness checks through bench/check_kernel.py.

``--warm-jobs J`` first compiles every Triton kernel in J subprocesses (all autotune configs;
their timings are thrown away), so the timed pass reuses the on-disk cache: compile time, not
GPU time, dominates a cold start.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # a checkout without installing the package
sys.path.insert(0, str(HERE))  # the benches' shared modules

import check_kernel  # noqa: E402
from launch_args import parse_configs  # noqa: E402

from sigmoid_sc.attention import benchmark as core  # noqa: E402
from sigmoid_sc.attention import triton_sigmoid as ts  # noqa: E402
from sigmoid_sc.kernel_benchmark import length_pool  # noqa: E402

HEAD_DIMS = core.HEAD_DIMS  # hd128 first: the headline targets
SWEEP_DENSE = "dense N=8192"
DEVICE = "cuda"  # bench/ncu_target.py's CPU mode sets "cpu" (Triton interpreter)


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------


def real_lengths(name: str, scale: int = 1) -> np.ndarray:
    """Cells drawn without replacement (seed 0) from the package's length pool ``name``
    (``sigmoid_sc/data/lengths_<name>.txt``), each length times ``scale``, until ~65K tokens."""
    pool = length_pool(name)[1] * scale
    return core.sample_lengths(pool, core.VARLEN_TOKENS, seed=0)


VARLEN_SETS = (("pbmc3k", "pbmc3k", 1), ("baron", "Baron", 1), ("baron", "Baron x4", 4))


def workloads(quick: bool, only: str = "", head_dims=HEAD_DIMS) -> list[core.Case]:
    """The table's cases.

    ``only``: a comma list restricting the cases, dense sizes by N and variable-length sets by
    label (``"8192,16384,pbmc3k"``), each as ``hd:case`` to name one head dim (``"64:8192"``).
    """
    wanted = [w for w in only.split(",") if w]

    def keep(d, label):
        return not wanted or str(label) in wanted or f"{d}:{label}" in wanted

    out = []
    for d in head_dims:
        for n in core.DENSE_N if not quick else core.DENSE_N[::3]:
            if keep(d, n):
                out += core.make_cases((d,), (n,))
        for name, label, scale in VARLEN_SETS:
            if (quick and label != "pbmc3k") or not keep(d, label):
                continue
            out += core.make_cases((d,), (), {label: real_lengths(name, scale)}, seed=0)
    return out


def Inputs(lengths, head_dim, dtype=torch.bfloat16, seed=0, heads=None):
    """The core's inputs on this script's device."""
    return core.Inputs(lengths, head_dim, dtype=dtype, device=DEVICE, seed=seed, heads=heads)


# ---------------------------------------------------------------------------------------------
# our kernel with explicit launch options and configs (variants, sweep)
# ---------------------------------------------------------------------------------------------


class _OursExplicit(torch.autograd.Function):
    """The kernels with explicit options and configs, outside the custom op:
    ``spec = {"fwd": {...}, "bwd": {...}, "config": ..., "bwd_config": ...}``, the first two
    keyword options of ``launch_fwd`` / ``launch_bwd`` (``use_tma``, ``sig_mode``)."""

    @staticmethod
    def forward(ctx, q, k, v, seq, spec):
        o = ts.launch_fwd(q, k, v, *seq, False, config=spec.get("config"), **spec.get("fwd", {}))
        ctx.save_for_backward(q, k, v)
        ctx.seq, ctx.spec = seq, spec
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        spec = ctx.spec
        dq, dk, dv = ts.launch_bwd(do, q, k, v, *ctx.seq, False, config=spec.get("bwd_config"),
                                   **spec.get("bwd", {}))  # fmt: skip
        return dq, dk, dv, None, None


def ours_explicit(inp, spec: dict):
    """``(fwd, [q, k, v, dO])`` of our kernel with ``spec`` (:class:`_OursExplicit`), on the
    packed rows (dense cases too: one layout, one ZERO_FILL, whatever the case)."""
    seqs = inp.batch
    seq = (*seqs.kernel_sequences, seqs.log_length_bias, inp.head_dim**-0.5, inp.max_seqlen)
    return (lambda q, k, v: _OursExplicit.apply(q, k, v, seq, spec)), [
        inp.q, inp.k, inp.v, inp.do,
    ]  # fmt: skip


# Kernel variants timed beside `ours` in the table, one fixed launch config each (the first,
# measured best, of the kernel's own lists, so a variant differs from `ours` by its options
# only): pointer loads both ways or in the backward, the exact sigmoid in the backward.
OURS_VARIANTS = {
    "ours+notma": {"fwd": {"use_tma": False}, "bwd": {"use_tma": False}},
    "ours+bwdptr": {"bwd": {"use_tma": False}},
    "ours+bwdexact": {"bwd": {"sig_mode": ts.SIG_EXACT}},
}


def impl_ours_variant(inp, dense: bool, name: str):
    d = inp.head_dim
    spec = {**OURS_VARIANTS[name], "config": ts._FWD_CONFIGS[d][0],
            "bwd_config": ts._BWD_CONFIGS[d][0]}  # fmt: skip
    return ours_explicit(inp, spec)


IMPLS = {
    **core.IMPLS,
    **{
        name: (lambda inp, dense, name=name: impl_ours_variant(inp, dense, name))
        for name in OURS_VARIANTS
    },
}
DENSE_IMPLS = ("ours", *OURS_VARIANTS, *core.DENSE_IMPLS[1:])
VARLEN_IMPLS = ("ours", *OURS_VARIANTS, *core.VARLEN_IMPLS[1:])


# ---------------------------------------------------------------------------------------------
# variant sweep (kernel options x launch configs), for bench/NOTES.md
# ---------------------------------------------------------------------------------------------

# the launchers' options per variant: the production choice (TMA, tanh for 16-bit inputs)
# against pointer loads and the exact sigmoid; the same names for both stages
VARIANTS = {
    "tanh+tma": {},
    "tanh ptr": {"use_tma": False},
    "exact+tma": {"sig_mode": ts.SIG_EXACT},
}
FWD_VARIANTS = BWD_VARIANTS = VARIANTS


# the sweep explores more forward configs than the kernel autotunes over, pipelined (5th entry)
# or not: BLOCK_M = 64 at 4 warps (two programs an SM) and 32-key blocks among them
SWEEP_FWD_CONFIGS = {
    **ts._FWD_CONFIGS,
    128: [(128, 64, 8, 3, True), (128, 64, 8, 3, False), (128, 64, 8, 2, True),
          (128, 64, 8, 4, True), (128, 128, 8, 2, True), (128, 64, 4, 2, False),
          (128, 128, 8, 3, False), (64, 64, 4, 3, False),
          # 32-key blocks: two programs an SM by registers and shared memory, pipelined or not
          (128, 32, 8, 3, True), (128, 32, 8, 4, False), (128, 32, 4, 3, False),
          (128, 32, 4, 2, False), (64, 32, 4, 3, False)],
    64: [*ts._FWD_CONFIGS[64], (128, 64, 4, 3, True), (128, 128, 8, 3, True),
         (64, 64, 4, 3, False)],
}  # fmt: skip


# ... and more backward configs than it autotunes over: 0-spill BLOCK_M=32 tiles, 4 warps
SWEEP_BWD_CONFIGS = {
    **ts._BWD_CONFIGS,
    128: [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 4), (32, 128, 8, 2), (32, 128, 8, 3),
          (32, 128, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (128, 64, 8, 2)],
    64: [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4),
         (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 2), (64, 128, 4, 3), (32, 64, 4, 3),
         (128, 64, 8, 3), (128, 128, 8, 2)],
}  # fmt: skip


def override_sweep_configs(text: str, head_dims) -> None:
    """``--sweep-configs``: ``"fwd128:128x64x8x3x1,128x32x8x3x1;bwd:64x128x8x3"`` replaces the
    sweep's config lists of that stage (and head dim; none: every head dim of the run)."""
    for part in filter(None, text.split(";")):
        stage, _, items = part.partition(":")
        table = {"fwd": SWEEP_FWD_CONFIGS, "bwd": SWEEP_BWD_CONFIGS}.get(stage[:3])
        if table is None or not (stage[3:] == "" or stage[3:].isdigit()):
            raise ValueError(f"{stage!r} is not fwd, bwd, fwd<head dim> or bwd<head dim>")
        configs = parse_configs(items, stage[:3])
        if not configs:
            raise ValueError(f"{part!r} names no config")
        for d in [int(stage[3:])] if stage[3:] else head_dims:
            table[d] = configs


def sweep_jobs(cases, stages=("fwd", "bwd"), variants=None, rounds=1):
    """Flat list of (round, case index, stage, variant, config): sliceable across workers.
    ``variants``: names to keep (None: all). ``rounds``: each case's jobs that many times, the
    rounds interleaved (variant A, B, ..., A, B, ...), so that a drift of the GPU's clocks
    during the sweep spreads over every variant instead of favouring the first."""
    jobs = []
    keep = (lambda name: True) if not variants else (lambda name: name in variants)
    for ci, case in enumerate(cases):
        d = case.head_dim
        case_jobs = []
        for name in filter(keep, FWD_VARIANTS if "fwd" in stages else ()):
            for cfg in SWEEP_FWD_CONFIGS[d]:
                case_jobs.append((ci, "fwd", name, cfg))
        for name in filter(keep, BWD_VARIANTS if "bwd" in stages else ()):
            for cfg in SWEEP_BWD_CONFIGS[d]:
                case_jobs.append((ci, "bwd", name, cfg))
        # a case's rounds together: its inputs and reference are built once
        jobs += [(r, *job) for r in range(rounds) for job in case_jobs]
    return jobs


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sweep(results: list, cases, jobs, with_reference: bool = True, deadline: float = math.inf):
    """Time each kernel variant with an explicit launch config; errors vs an fp32 reference.

    Jobs after ``deadline`` (a time.time() value) are skipped: the table needs the rest."""
    cache = {}
    for rnd, ci, stage, name, cfg in jobs:
        if time.time() > deadline:
            log(f"sweep: deadline reached, {len(jobs)} jobs planned, skipping the rest")
            break
        case = cases[ci]
        d = case.head_dim
        if ci not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            inp = Inputs(case.lengths, d)
            # per-sequence fp32 reference: a padded [B, H, N, N] one needs ~60 GB for pbmc3k
            if with_reference:
                f32 = [t.float() for t in (inp.q, inp.k, inp.v, inp.do)]
                seqs = inp.batch
                start, length, _ = seqs.kernel_sequences
                args = (start, length, seqs.log_length_bias, inp.head_dim**-0.5)
                r = ts._torch_fwd(*f32[:3], *args)
                rg = ts._torch_bwd(f32[3], *f32[:3], *args)
                del f32
            else:  # compile-warm pass: no reference, errors reported as nan
                r, rg = inp.q, (inp.q, inp.k, inp.v)
            cache[ci] = (inp, r, rg)
        inp, ref, ref_grads = cache[ci]
        f = core.flops_fwd(case.lengths, d)
        opts = VARIANTS[name]
        if stage == "fwd":
            spec = {"fwd": opts, "config": cfg}
        else:
            spec = {"fwd": opts, "bwd": opts, "config": ts._FWD_CONFIGS[d][0], "bwd_config": cfg}
        try:
            fwd, tensors = ours_explicit(inp, spec)
            if stage == "fwd":
                with torch.no_grad():
                    err = rel(fwd(*tensors[:3]), ref)
                    ms = core.bench_ms(lambda: fwd(*tensors[:3]), DEVICE)  # noqa: B023
                tf = f / ms / 1e9
            else:
                leaves = [t.detach().requires_grad_() for t in tensors[:3]]
                out = fwd(*leaves)
                grads = torch.autograd.grad(out, leaves, tensors[3], retain_graph=True)
                err = max(rel(g, x) for g, x in zip(grads, ref_grads))
                ms = core.bench_ms(
                    lambda: torch.autograd.grad(out, leaves, tensors[3], retain_graph=True),  # noqa: B023
                    DEVICE,
                )
                tf = 2.5 * f / ms / 1e9
            msg = f"{tf:7.1f} TFLOPS  err {err:.2e}"
            results.append(dict(case=case.name, hd=d, stage=stage, variant=name, config=str(cfg),
                                ms=ms, tflops=tf, err=err, round=rnd))  # fmt: skip
        except Exception as e:  # a variant that fails to compile is a finding, not a crash
            msg = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
        log(f"sweep {case.name:26s} hd{d} {stage} {name:10s} {cfg} {msg}")
    cache.clear()
    torch.cuda.empty_cache()


def median_over_rounds(sweep_rows):
    """One row per (case, stage, variant, config): the median TFLOPS over the sweep's rounds
    (``--sweep-rounds``; the same config's spread between rounds is the noise to beat) and the
    largest error."""
    groups: dict = {}
    for r in sweep_rows:
        groups.setdefault((r["case"], r["hd"], r["stage"], r["variant"], r["config"]), []).append(r)
    out = []
    for rows in groups.values():
        tf = sorted(r["tflops"] for r in rows)
        out.append({**rows[0], "tflops": float(np.median(tf)), "err": max(r["err"] for r in rows),
                    "rounds": len(rows), "spread": tf[-1] - tf[0]})  # fmt: skip
    return out


def sweep_summary(sweep_rows):
    best = {}
    for r in median_over_rounds(sweep_rows):
        key = (r["case"], r["hd"], r["stage"], r["variant"])
        if key not in best or r["tflops"] > best[key]["tflops"]:
            best[key] = r
    lines = ["best config per variant:"]
    for (case, hd, stage, variant), r in sorted(best.items()):
        lines.append(
            f"  {case:26s} hd{hd:<3d} {stage} {variant:10s} {r['tflops']:6.1f} TFLOPS err {r['err']:.1e} {r['config']}"
            + (f" (median of {r['rounds']}, spread {r['spread']:.1f})" if r["rounds"] > 1 else "")
        )
    return lines


# ---------------------------------------------------------------------------------------------
# main table and outputs
# ---------------------------------------------------------------------------------------------


def run_table(cases, impls_filter=None, timed=True, on_case=None, deadline=math.inf):
    return core.run_table(
        cases, impls_filter or None, registry=IMPLS, dense_impls=DENSE_IMPLS,
        varlen_impls=VARLEN_IMPLS, device=DEVICE, timed=timed, on_case=on_case,
        deadline=deadline, log=log,
    )  # fmt: skip


def write_outputs(out_dir: Path, header: dict, rows: list, checks: list, sweep_rows: list):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{header['date'][:10]}_{core.device_slug(header['gpu'])}"
    core.write_table(out_dir / f"{stem}.csv", header, rows)
    if sweep_rows:
        import csv

        with open(out_dir / f"{stem}_sweep.csv", "w", newline="") as fh:
            fh.write("# " + ", ".join(f"{k}={v}" for k, v in header.items()) + "\n")
            w = csv.DictWriter(fh, fieldnames=list(sweep_rows[0].keys()))
            w.writeheader()
            w.writerows(sweep_rows)
    lines = [f"# Sigmoid-attention kernel benchmark, {header['date']}", "",
             ", ".join(f"{k}: {v}" for k, v in header.items()), "",
             "TFLOPS forward / backward / forward+backward (bf16, non-causal, hidden 2048; "
             "FLOPs from sum n_i^2; backward = 2.5x forward).", "",
             "| case | hd | impl | fwd | bwd | fwd+bwd | note |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        f = lambda x: f"{x:.0f}" if isinstance(x, float) else "-"  # noqa: E731
        lines.append(f"| {r['case']} | {r['hd']} | {r['impl']} | {f(r['fwd_tflops'])} | {f(r['bwd_tflops'])} "
                     f"| {f(r['fwdbwd_tflops'])} | {r['note']} |")  # fmt: skip
    lines += [
        "",
        "GPU correctness (relative error vs a float64 reference, bench/check_kernel.py):",
        "",
        "```",
        *checks,
        "```",
        "",
    ]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))


def gpu_checks(checks: list, dtypes, head_dims) -> bool:
    """bench/check_kernel.py on the mixed-length batch (both layouts, default and given bias
    and scale); its table lines go to ``checks``."""
    if not dtypes:
        return True
    return check_kernel.run_checks(
        dtypes, head_dims, long_lengths=(), jobs=4, lines=checks, log=log
    )


def minimal(out_dir: Path, header: dict):
    """A short validation run: hd128 only, bf16 checks, dense N=8K and pbmc3k against SDPA /
    NJT (hd128's kernels have one or three configs: a handful of compiles)."""
    t0 = time.time()
    checks: list = []
    ok = gpu_checks(checks, ["bf16"], [128])
    log(f"GPU correctness: {'OK' if ok else 'FAILED'} ({time.time() - t0:.0f} s)")
    cases = workloads(False, "128:8192,128:pbmc3k", (128,))
    rows = run_table(cases, ["ours", "sdpa_cudnn", "sdpa_flash", "njt_flash"],
                     on_case=lambda rows: write_outputs(out_dir, header, rows, checks, []))  # fmt: skip
    write_outputs(out_dir, header, rows, checks, [])
    log(f"elapsed {time.time() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------
# compile-warming workers
# ---------------------------------------------------------------------------------------------


def warm_ours(cases, i: int, n: int) -> None:
    """Compile slice ``i`` of ``n`` of our kernels' autotune configs by explicit launches, for
    both layouts (packed and padded: ZERO_FILL differs) of each head dim: the on-disk cache then
    holds every config the timed pass autotunes over. The kernel module is left as it is."""
    for d in sorted({c.head_dim for c in cases}):
        inp = Inputs([257, 64], d)
        seqs = inp.batch
        seq = (*seqs.kernel_sequences, seqs.log_length_bias, d**-0.5, inp.max_seqlen)
        for zero_fill in (False, True):
            for cfg in ts._FWD_CONFIGS[d][i::n]:
                ts.launch_fwd(inp.q, inp.k, inp.v, *seq, zero_fill, config=cfg)
            for cfg in ts._BWD_CONFIGS[d][i::n]:
                ts.launch_bwd(inp.do, inp.q, inp.k, inp.v, *seq, zero_fill, config=cfg)
    torch.cuda.synchronize()


def slice_triton_sigmoid_configs(i: int, n: int) -> None:
    """In a warm worker only: keep every n-th autotune config of the triton-sigmoid package
    (a comparison, not ours), so the workers compile disjoint slices of it."""
    try:
        import triton_sigmoid  # noqa: F401
        from triton.runtime.autotuner import Autotuner
    except (ImportError, RuntimeError):  # not installed, or no CUDA device (it checks on import)
        return
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("triton_sigmoid"):
            for obj in list(vars(mod).values()):
                if isinstance(obj, Autotuner):
                    obj.configs = obj.configs[i::n]


def warm(jobs: int, passthrough: list, deadline: float = math.inf):
    """Compile every kernel (all autotune configs) in ``jobs`` subprocesses, untimed.

    Stops at ``deadline`` (a time.time() value): warming is an optimisation, and a run whose
    warm phase outlasted its device call measured nothing.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--warm-part", f"{i}/{jobs}", *passthrough],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for i in range(jobs)
    ]
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()) if deadline < math.inf else None)
        except subprocess.TimeoutExpired:
            log("warm compile pass: deadline reached, stopping the warm processes")
            for q in procs:
                q.kill()
            break


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--quick", action="store_true", help="two dense sizes and pbmc3k only")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--impls", default="", help="comma list to restrict the table")
    ap.add_argument("--warm-jobs", type=int, default=0)
    ap.add_argument("--warm-part", default="")
    ap.add_argument(
        "--time-limit", type=float, default=math.inf, help="seconds; later table cases are skipped"
    )
    ap.add_argument("--minimal", action="store_true", help="hd128 only, one config per kernel")
    ap.add_argument("--cases", default="", help="e.g. 8192,16384,64:8192,pbmc3k (see workloads)")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument(
        "--check-dtypes",
        default="bf16,fp16",
        help="GPU correctness checks to run first (bench/check_kernel.py, the mixed batch); "
        "'' for none",
    )
    ap.add_argument("--sweep-stages", default="fwd,bwd", help="stages the sweep times")
    ap.add_argument("--sweep-rounds", type=int, default=1, help="times each sweep job, interleaved")
    ap.add_argument("--sweep-configs", default="", help="fwd[HD]:BMxBNxWxS[xP],...;bwd[HD]:BMxBNxWxS,"
                    "... (default: SWEEP_FWD_CONFIGS / SWEEP_BWD_CONFIGS)")  # fmt: skip
    ap.add_argument(
        "--sweep-variants",
        default="",
        help=f"comma list of sweep variants to keep, of {sorted(VARIANTS)} (default: all)",
    )
    ap.add_argument("--warm-limit", type=float, default=math.inf, help="seconds for --warm-jobs")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernel.py needs a CUDA GPU")
    impls_filter = [s for s in args.impls.split(",") if s]
    unknown_impls = set(impls_filter) - set(IMPLS)
    if unknown_impls:
        sys.exit(f"--impls: unknown {sorted(unknown_impls)} (known: {sorted(IMPLS)})")
    head_dims = tuple(int(d) for d in args.head_dims.split(","))
    cases = workloads(args.quick, args.cases, head_dims)
    sweep_cases = [c for c in cases if c.name == SWEEP_DENSE or c.name.startswith("pbmc3k")]
    stages = tuple(x for x in args.sweep_stages.split(",") if x)
    variants = [x for x in args.sweep_variants.split(",") if x]
    unknown = set(stages) - {"fwd", "bwd"} | set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"--sweep-stages/--sweep-variants: unknown {sorted(unknown)}")
    try:
        override_sweep_configs(args.sweep_configs, head_dims)
    except ValueError as exc:
        sys.exit(f"--sweep-configs: {exc}")
    jobs = [] if args.no_sweep else sweep_jobs(sweep_cases, stages, variants, args.sweep_rounds)
    check_dtypes = [x for x in args.check_dtypes.split(",") if x]
    if args.warm_part:  # child: compile a slice of every task, results thrown away
        i, n = map(int, args.warm_part.split("/"))
        sweep([], sweep_cases, [j for j in jobs if j[0] == 0][i::n], with_reference=False)
        if not args.no_table:
            warm_ours(cases, i, n)
            slice_triton_sigmoid_configs(i, n)
            # each fixed-config variant is compiled by one worker only; `ours` by warm_ours
            others = {v for j, v in enumerate(OURS_VARIANTS) if j % n != i} | {"ours"}
            run_table(cases, [x for x in impls_filter or IMPLS if x not in others], timed=False)
        return
    header = core.env_header(DEVICE)
    log("env:", header)
    t_start = time.time()
    if args.minimal:
        return minimal(args.out, header)
    if args.warm_jobs:
        passthrough = [
            a
            for a in (argv if argv is not None else sys.argv[1:])
            if a.startswith("--") and a in ("--quick", "--no-sweep", "--no-table")
        ] + [
            f"--impls={args.impls}",
            f"--cases={args.cases}",
            f"--head-dims={args.head_dims}",
            f"--sweep-stages={args.sweep_stages}",
            f"--sweep-variants={args.sweep_variants}",
            f"--sweep-configs={args.sweep_configs}",
        ]  # fmt: skip  (workers compile the same kernel variants)
        # at most half of the time limit: the timed table needs the rest
        limit = min(args.time_limit / 2, args.warm_limit)
        warm(args.warm_jobs, passthrough, deadline=t_start + limit)
        log(f"warm compile pass: {time.time() - t_start:.0f} s")
    checks: list = []
    ok = gpu_checks(checks, check_dtypes, head_dims)
    log("GPU correctness:", "OK" if ok else "FAILED", f"({time.time() - t_start:.0f} s)")
    sweep_rows: list = []
    if jobs:
        t0 = time.time()
        # the sweep gets up to 60% of the time limit from the start; the table the rest
        sweep(sweep_rows, sweep_cases, jobs, deadline=t_start + 0.6 * args.time_limit)
        summary = sweep_summary(sweep_rows)
        log("\n".join(summary))
        checks += summary
        log(f"sweep: {time.time() - t0:.0f} s")
    write_outputs(args.out, header, [], checks, sweep_rows)
    rows = (
        []
        if args.no_table
        else run_table(
            cases,
            impls_filter,
            on_case=lambda rows: write_outputs(args.out, header, rows, checks, sweep_rows),
            deadline=t_start + args.time_limit,
        )
    )
    write_outputs(args.out, header, rows, checks, sweep_rows)
    # what the autotuner chose for `ours`: key = (length bucket[, rows bucket], dtype entries)
    for line in ts.autotuned_configs():
        log(f"autotuned {line}")
    log(f"total {time.time() - t_start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
