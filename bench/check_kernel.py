"""Correctness of the sigmoid-attention kernel on the GPU, against a float64 reference.

    python bench/check_kernel.py                # the full check on a CUDA GPU
    python bench/check_kernel.py --smoke        # CPU, Triton's interpreter, fp32, tiny sizes

Cases: one packed batch of lengths 1, 17, 127, 128, 129 and 1,000 (shuffled), and single
sequences of 8K and 16K tokens; head dims 64 and 128; bf16 and fp16. Each case runs in both
layouts (``varlen``: packed tokens through ``sigmoid_attention_varlen``; ``padded``:
``[B, N, H, D]`` through ``sigmoid_attention_padded``, NaN in every padded input row, which the
kernel must never read, and zeros expected at padded output and gradient rows) and with two
parameter sets (``default``: bias ``-log(n_i)``, scale ``1/sqrt(D)``; ``given``: a bias per
sequence, a float for single sequences, and scale ``1.5/sqrt(D)``). The forward ``o`` and
``dq, dk, dv`` are compared with float64 values computed per sequence and head from the same
rounded inputs (on the device). Error = ``|x - ref| / |ref|`` (Frobenius norms, real rows).

Prints a table, one row per dtype x head dim x case, the largest error of each output over
layouts and parameter sets, and a line for every failed check; exits 1 if any check fails
(error above the dtype's tolerance, a NaN or inf anywhere, padding not zero). ``--jobs J`` runs
the dtype x head-dim combinations in J processes (compiles dominate a cold run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # a checkout without installing the package

MIXED = (1, 17, 127, 128, 129, 1000)
LONG = (8192, 16384)
HEAD_DIMS = (64, 128)
DTYPES = ("bf16", "fp16")
HEADS = 4
#: largest relative error accepted, by input dtype: P is rounded to the input dtype before
#: ``P v`` (bf16: 2^-9, fp16: 2^-12 relative), and 16-bit inputs get the tanh sigmoid; the
#: errors of the GPU checks in bench/NOTES.md sit several times below these; fp32 (exact
#: sigmoid, IEEE dots) is at fp32 rounding
TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-4}
SMOKE = {"mixed": (1, 17, 40), "long": (96,), "head_dims": (64,), "dtypes": ("fp32",),
         "heads": 2}  # fmt: skip
OUTPUTS = ("o", "dq", "dk", "dv")
SEED = 20261206


def _torch():
    import torch

    return torch


def dtype_of(name: str):
    torch = _torch()
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# ---------------------------------------------------------------------------------------------
# inputs and the float64 reference
# ---------------------------------------------------------------------------------------------


def make_inputs(lengths, head_dim, heads, dtype, device, seed):
    """Packed q, k, v, dO ``[total, H, D]`` in ``dtype`` and int32 ``cu_seqlens``."""
    torch = _torch()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    q, k, v, do = (
        torch.randn(total, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        for _ in range(4)
    )
    cu = torch.tensor([0, *_cumsum(lengths)], dtype=torch.int32, device=device)
    return q, k, v, do, cu


def _cumsum(lengths):
    out, total = [], 0
    for n in lengths:
        total += n
        out.append(total)
    return out


def reference(q, k, v, do, lengths, scale, biases):
    """float64 ``(o, dq, dk, dv)`` from the formulas, one sequence and head at a time:
    ``P = sigmoid(q k^T scale + b)``, ``o = P v``, ``dv = P^T dO``,
    ``dS = P (1 - P) (dO v^T) scale``, ``dq = dS k``, ``dk = dS^T q``."""
    torch = _torch()
    outs = [torch.zeros(q.shape, dtype=torch.float64, device=q.device) for _ in range(4)]
    start = 0
    for n, b in zip(lengths, biases):
        rows = slice(start, start + n)
        for h in range(q.shape[1]):
            qi, ki, vi, doi = (t[rows, h].double() for t in (q, k, v, do))
            p = torch.sigmoid(qi @ ki.T * scale + b)
            outs[0][rows, h] = p @ vi
            outs[3][rows, h] = p.T @ doi
            ds = p * (1 - p) * (doi @ vi.T) * scale
            del p
            outs[1][rows, h] = ds @ ki
            outs[2][rows, h] = ds.T @ qi
            del ds
        start += n
    return outs


def rel(x, ref) -> float:
    denom = ref.norm().item()
    return (x.double() - ref).norm().item() / denom if denom > 0 else (x.double().norm().item())


# ---------------------------------------------------------------------------------------------
# the kernel in both layouts
# ---------------------------------------------------------------------------------------------


def run_varlen(q, k, v, do, cu, max_seqlen, scale, bias):
    torch = _torch()
    from sigmoid_sc.attention import sigmoid_attention_varlen

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = sigmoid_attention_varlen(*leaves, cu, max_seqlen, scale=scale, bias=bias)
    grads = torch.autograd.grad(out, leaves, do)
    return [out.detach(), *grads], True


def run_padded(q, k, v, do, cu, lengths, n_max, scale, bias):
    """The padded layout: NaN in every padded input row; returns the real rows (packed order)
    and whether every padded output and gradient row is exactly zero."""
    torch = _torch()
    from sigmoid_sc.attention import VarlenBatch, sigmoid_attention_padded

    seqs = VarlenBatch(cu, n_max, q.shape[0])
    valid = seqs.key_mask
    padded = []
    for t in (q, k, v, do):
        p = seqs.pad(t)
        p[~valid] = float("nan")  # a kernel that reads padding returns NaN
        padded.append(p)
    leaves = [t.requires_grad_() for t in padded[:3]]
    lens = torch.tensor(lengths, dtype=torch.int32, device=q.device)
    out = sigmoid_attention_padded(*leaves, lens, scale=scale, bias=bias)
    grads = torch.autograd.grad(out, leaves, padded[3])
    results = [out.detach(), *grads]
    pad_zero = all(bool((r[~valid] == 0).all()) for r in results)
    return [seqs.unpad(r) for r in results], pad_zero


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def cases(mixed, long_lengths):
    """(name, lengths) of the run: the mixed batch (shuffled, seeded), then each long one."""
    import random

    order = list(mixed)
    random.Random(SEED).shuffle(order)
    out = [(f"mixed {min(mixed)}..{max(mixed)} x{len(mixed)}", tuple(order))] if mixed else []
    return out + [(f"single {n}", (n,)) for n in long_lengths]


def check_combo(dtype_name, head_dim, mixed, long_lengths, heads, device) -> list[dict]:
    """Every case x layout x parameter set of one dtype and head dim: a result dict each."""
    torch = _torch()
    dtype, tol = dtype_of(dtype_name), TOLERANCE[dtype_name]
    results = []
    for ci, (name, lengths) in enumerate(cases(mixed, long_lengths)):
        seed = SEED + 1000 * ci + head_dim + {"bf16": 1, "fp16": 2, "fp32": 3}[dtype_name]
        q, k, v, do, cu = make_inputs(lengths, head_dim, heads, dtype, device, seed)
        max_seqlen = max(lengths)
        n_max = max_seqlen + (7 if len(lengths) > 1 else 0)
        given_bias = (
            torch.linspace(-2.0, 0.5, len(lengths), device=device) if len(lengths) > 1 else -3.0
        )
        params = {
            "default": (None, None),
            "given": (1.5 / math.sqrt(head_dim), given_bias),
        }
        for pname, (scale, bias) in params.items():
            s = scale if scale is not None else 1.0 / math.sqrt(head_dim)
            if bias is None:
                biases = [-math.log(n) for n in lengths]
            elif isinstance(bias, float):
                biases = [bias] * len(lengths)
            else:
                biases = bias.tolist()
            # the reference's float64 values of the bias are those the kernel gets in fp32
            biases = [float(torch.tensor(b, dtype=torch.float32)) for b in biases]
            ref = reference(q, k, v, do, lengths, s, biases)
            for layout in ("varlen", "padded"):
                if layout == "varlen":
                    got, pad_zero = run_varlen(q, k, v, do, cu, max_seqlen, scale, bias)
                else:
                    got, pad_zero = run_padded(q, k, v, do, cu, lengths, n_max, scale, bias)
                errors = {o: rel(g, r) for o, g, r in zip(OUTPUTS, got, ref)}
                finite = all(bool(torch.isfinite(g).all()) for g in got)
                ok = finite and pad_zero and all(e <= tol for e in errors.values())
                results.append(dict(dtype=dtype_name, hd=head_dim, case=name, layout=layout,
                                    params=pname, finite=finite, pad_zero=pad_zero, ok=ok,
                                    tol=tol, seed=seed, **errors))  # fmt: skip
                del got
            del ref
        del q, k, v, do
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def table(results) -> list[str]:
    """One line per dtype x head dim x case: the largest error of each output over layouts and
    parameter sets; then a line per failed check."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["dtype"], r["hd"], r["case"]), []).append(r)
    lines = [f"{'dtype':5s} {'hd':>3s}  {'case':24s} " + " ".join(f"{o:>8s}" for o in OUTPUTS)
             + f"  {'tol':>7s}  checks"]  # fmt: skip
    for (dtype, hd, case), rows in groups.items():
        worst = {o: max(r[o] for r in rows) for o in OUTPUTS}
        passed = sum(r["ok"] for r in rows)
        lines.append(f"{dtype:5s} {hd:3d}  {case:24s} " + " ".join(f"{worst[o]:8.1e}" for o in OUTPUTS)
                     + f"  {rows[0]['tol']:7.0e}  {passed}/{len(rows)} "
                     + ("OK" if passed == len(rows) else "FAIL"))  # fmt: skip
    for r in results:
        if not r["ok"]:
            why = [f"{o} {r[o]:.2e} > {r['tol']:.0e}" for o in OUTPUTS if not r[o] <= r["tol"]]
            why += [] if r["finite"] else ["NaN or inf in the outputs"]
            why += [] if r["pad_zero"] else ["padded rows not zero"]
            lines.append(f"FAIL {r['dtype']} hd{r['hd']} {r['case']} {r['layout']} "
                         f"{r['params']} (seed {r['seed']}): {'; '.join(why)}")  # fmt: skip
    return lines


def _combo_in_subprocess(combo, mixed, long_lengths, heads, device, out_dir):
    dtype_name, head_dim = combo
    path = Path(out_dir) / f"{dtype_name}_{head_dim}.json"
    cmd = [sys.executable, __file__, "--worker", f"{dtype_name}:{head_dim}", "--json", str(path),
           "--mixed", ",".join(map(str, mixed)), "--long", ",".join(map(str, long_lengths)),
           "--heads", str(heads), "--device", device]  # fmt: skip
    return subprocess.Popen(cmd), path


def run_checks(dtypes=DTYPES, head_dims=HEAD_DIMS, mixed=MIXED, long_lengths=LONG, heads=HEADS,
               device="cuda", jobs=1, lines=None, log=print) -> bool:  # fmt: skip
    """Every check of ``dtypes`` x ``head_dims``; logs the table (and appends its lines to
    ``lines``); True when every check passed. ``jobs`` > 1: the combinations in that many
    processes at a time."""
    combos = [(d, hd) for d in dtypes for hd in head_dims]
    results: list = []
    t0 = time.time()
    if jobs > 1 and len(combos) > 1:
        with tempfile.TemporaryDirectory() as tmp:
            for start in range(0, len(combos), jobs):
                procs = [_combo_in_subprocess(c, mixed, long_lengths, heads, device, tmp)
                         for c in combos[start : start + jobs]]  # fmt: skip
                for (proc, path), combo in zip(procs, combos[start : start + jobs]):
                    if proc.wait() != 0 or not path.is_file():
                        results.append(dict(dtype=combo[0], hd=combo[1], case="(worker)",
                                            layout="-", params="-", finite=False, pad_zero=True,
                                            ok=False, tol=TOLERANCE[combo[0]], seed=SEED,
                                            **dict.fromkeys(OUTPUTS, math.nan)))  # fmt: skip
                        continue
                    results += json.loads(path.read_text())
    else:
        for dtype_name, head_dim in combos:
            results += check_combo(dtype_name, head_dim, mixed, long_lengths, heads, device)
    out = table(results)
    out.append(f"{len(results)} checks, {sum(r['ok'] for r in results)} passed, "
               f"{time.time() - t0:.0f} s")  # fmt: skip
    for line in out:
        log(line)
    if lines is not None:
        lines += out
    return bool(results) and all(r["ok"] for r in results)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU under Triton's interpreter: fp32, tiny sizes (tests)")  # fmt: skip
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="of bf16, fp16, fp32")
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    ap.add_argument("--mixed", default=",".join(map(str, MIXED)), help="lengths of the batch")
    ap.add_argument("--long", default=",".join(map(str, LONG)), help="single-sequence lengths")
    ap.add_argument("--heads", type=int, default=HEADS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=4, help="processes (dtype x head-dim combos)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
        dtypes, head_dims = SMOKE["dtypes"], SMOKE["head_dims"]
        mixed, long_lengths, heads, device, jobs = (
            SMOKE["mixed"], SMOKE["long"], SMOKE["heads"], "cpu", 1,
        )  # fmt: skip
    else:
        dtypes = tuple(x for x in args.dtypes.split(",") if x)
        head_dims, mixed, long_lengths = _ints(args.head_dims), _ints(args.mixed), _ints(args.long)
        heads, device, jobs = args.heads, args.device, args.jobs
        bad = set(dtypes) - set(TOLERANCE)
        if bad:
            sys.exit(f"check_kernel: --dtypes: unknown {sorted(bad)} (of {sorted(TOLERANCE)})")
    if args.worker:
        dtype_name, head_dim = args.worker.split(":")
        results = check_combo(dtype_name, int(head_dim), mixed, long_lengths, heads, device)
        Path(args.json).write_text(json.dumps(results))
        return 0
    torch = _torch()
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("check_kernel: no CUDA GPU here (--smoke runs on the CPU)")
    if device == "cuda":
        import triton

        print(f"check_kernel: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}, {heads} heads", flush=True)  # fmt: skip
    ok = run_checks(dtypes, head_dims, mixed, long_lengths, heads, device, jobs)
    print("check_kernel:", "OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
