"""One sigmoid-attention kernel at one explicit launch config, launched a few times: the
program to run under Nsight Compute (``ncu``) for its hardware counters and stall samples.

    ncu --clock-control none --set full -k regex:_attn_fwd -s 2 -c 1 -o fwd \\
        python bench/ncu_target.py --kernel fwd --head-dim 128 --case 8192 --config 128x64x8x3x1

The inputs are bench/kernel.py's (hidden 2048, so H = 2048 / D; ``--case`` a dense N, a
variable-length set of bench/kernel.py such as ``pbmc3k``, or ``lengths:820,1981,17``), the
config is fixed (no autotuning: every launch is the same kernel), and ``--options`` takes the
launchers' keyword options (``use_tma=0``, ``sig_mode=0``; bench/launch_args.py). ``--kernel bwd`` launches the backward (its
dk/dv kernel is ``_attn_bwd_dkdv``). ``--device cpu`` runs the kernels under Triton's
interpreter (tests; give ``--dtype fp32`` there).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DTYPES = ("bf16", "fp16", "fp32")


def _bench_kernel():
    spec = importlib.util.spec_from_file_location("bench_kernel", HERE / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("fwd", "bwd"), default="fwd")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--case", default="8192", help="a dense N, pbmc3k, or lengths:N1,N2,...")
    ap.add_argument("--config", required=True, help="BMxBNxWARPSxSTAGES[xPIPELINE]")
    ap.add_argument("--options", default="", help="kernel options, e.g. use_tma=0,sig_mode=0")
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    import torch

    bk = _bench_kernel()
    bk.DEVICE = args.device
    ts = bk.ts
    from launch_args import parse_configs, parse_options  # bench/, on the path by now

    try:
        options = parse_options(args.options)
        configs = parse_configs(args.config, args.kernel)
    except ValueError as exc:
        sys.exit(f"ncu_target: {exc}")
    if len(configs) != 1:
        sys.exit(f"ncu_target: --config takes one config, got {args.config!r}")
    config = configs[0]
    if args.case.startswith("lengths:"):
        lengths = [int(x) for x in args.case.split(":", 1)[1].split(",") if x]
        label = f"lengths {lengths}"
    else:
        cases = bk.workloads(False, f"{args.head_dim}:{args.case}", (args.head_dim,))
        if not cases:
            sys.exit(f"ncu_target: no case {args.case!r} (a dense N of {bk.DENSE_N}, pbmc3k, "
                     "Baron or lengths:N1,N2,...)")  # fmt: skip
        label, lengths = cases[0].name, cases[0].lengths
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    inp = bk.Inputs(lengths, args.head_dim, dtype=dtype)
    seqs = inp.batch
    seq = (*seqs.kernel_sequences, seqs.log_length_bias, args.head_dim**-0.5, inp.max_seqlen, False)
    for _ in range(args.launches):
        if args.kernel == "fwd":
            out = ts.launch_fwd(inp.q, inp.k, inp.v, *seq, config=config, **options)
        else:
            out = ts.launch_bwd(inp.do, inp.q, inp.k, inp.v, *seq, config=config, **options)[0]
    if args.device != "cpu":
        torch.cuda.synchronize()
    finite = bool(torch.isfinite(out).all())
    print(f"ncu_target: {args.launches} launches of {args.kernel} hd{args.head_dim} {label} "
          f"{config}, output finite: {finite}")  # fmt: skip
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
