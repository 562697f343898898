"""Registers, spills and shared memory of the sigmoid-attention kernels, without a GPU.

Compiles each kernel of ``sigmoid_sc.attention.triton_sigmoid`` for Hopper (sm_90a) with the
installed Triton, exactly as a launch would specialise it (pointers and strides divisible by
16, the launch config's warps and stages), and reads the cubin's resource usage with the
``cuobjdump`` that ships inside Triton's wheel. Also counts, in the TTGIR, the asynchronous
copies (pointer loads that Triton's pipeliner turned into multi-stage prefetches), TMA loads
and warpgroup MMAs: a loop whose loads are not pipelined shows ``async`` 0.

    python bench/register_report.py                      # every kernel, the autotune configs
    python bench/register_report.py --kernels dkdv --head-dims 128 --configs 32x128x8x3
    python bench/register_report.py --options use_tma=0    # the pointer-load paths

Indicative only: the GPU machine may run another Triton version than this one (the header
prints both what compiled and the target); ``STACK`` bytes are the per-thread local memory
(register spills), the number to watch. Without the divisibility hints a compile looks much
worse than a launch (no vectorised or asynchronous loads, more spills): bench/NOTES.md's first
register table was made that way.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # a checkout without installing the package

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))  # the benches' shared modules
from launch_args import parse_configs, parse_options  # noqa: E402

from sigmoid_sc.attention import triton_sigmoid as ts  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = {
    "fwd": (ts._attn_fwd, ts._FWD_CONFIGS),
    "dkdv": (ts._attn_bwd_dkdv, ts._BWD_CONFIGS),
}
_INT_ARGS = ("pad_rows", "seqlen_bucket", "rows_bucket")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _cuobjdump() -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise SystemExit(f"register_report: no cuobjdump at {path} (Triton's NVIDIA backend)")
    return str(path)


def signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Argument types and the divisibility hints a launch on contiguous [T, H, D] tensors gets.

    The host tensor descriptors (``QDesc``...) are typed with their block shapes when the
    kernel reads through TMA; otherwise the launch passes None, a constant (in ``constexprs``).
    """
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("Desc"):
            rows = constexprs[ts._DESC_ROWS[name]]
            sig[name] = f"tensordesc<{dtype}[{rows}, {constexprs['HEAD_DIM']}]>"
            continue
        elif name in ("SeqStart", "SeqLen", "SeqOrder"):
            sig[name] = "*i32"
        elif name in ("Bias", "DQ"):  # dq: the fp32 buffer the atomics add into
            sig[name] = "*fp32"
        elif name[0].isupper():
            sig[name] = f"*{dtype}"
        elif name.startswith("stride") or name in _INT_ARGS:
            sig[name] = "i32"
        elif name in ("qk_scale_u", "scale"):
            sig[name] = "fp32"
        else:
            raise KeyError(f"register_report: no type for argument {name!r} of {fn.__name__}")
        if sig[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def report(kind: str, head_dim: int, config: tuple, options: dict, dtype: str = "bf16") -> dict:
    """Compile one kernel at one (BLOCK_M, BLOCK_N, warps, stages) with the launchers' keyword
    ``options`` (``use_tma``, ``sig_mode``; absent: the launchers' defaults); return its
    resource use."""
    fn, _ = KERNELS[kind]
    bm, bn, warps, stages, *pipeline = config  # the forward's: a fifth entry, PIPELINE
    use_tma = bool(options.get("use_tma", True))
    # the launch wrappers' own choice (fp32 inputs get the exact form unless told otherwise)
    sig_mode = ts._sig_mode(_TORCH_DTYPES[dtype], options.get("sig_mode"))
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": bm, "BLOCK_N": bn, "SIG_MODE": sig_mode,
                  "IN_PREC": ts._in_prec(_TORCH_DTYPES[dtype])}  # fmt: skip
    if kind == "fwd":
        constexprs.update(USE_TMA=use_tma, ZERO_FILL=False, PIPELINE=bool(pipeline and pipeline[0]))
        if not use_tma:
            constexprs.update(QDesc=None, KDesc=None, VDesc=None)
    else:
        constexprs.update(ZERO_FILL=False, USE_TMA=use_tma)
        if not use_tma:
            constexprs.update(QDesc=None, DODesc=None)
    sig, attrs = signature(fn, dtype, constexprs)
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    compiled = triton.compile(
        src, target=TARGET, options={"num_warps": warps, "num_stages": stages}
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
        ).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in usage:
        raise RuntimeError(f"register_report: cannot read cuobjdump's output:\n{text}")
    ttgir = compiled.asm["ttgir"]
    return {
        "kernel": kind,
        "hd": head_dim,
        "config": "x".join(str(int(x)) for x in config),
        "registers": int(usage["REG"]),
        "spill_bytes": int(usage["STACK"]),
        "shared_kib": compiled.metadata.shared // 1024,
        "async": ttgir.count("async_copy_global_to_local"),
        "tma": ttgir.count("async_tma_copy"),
        "wgmma": ttgir.count("warp_group_dot "),
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="fwd,dkdv")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument(
        "--configs",
        default="",
        help="BMxBNxWARPSxSTAGES[xPIPELINE],...; default: the autotune lists",
    )
    ap.add_argument("--options", default="", help="kernel options, e.g. use_tma=0,sig_mode=0")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    args = ap.parse_args(argv)
    try:
        options = parse_options(args.options)
    except ValueError as exc:
        raise SystemExit(f"--options: {exc}") from None
    try:
        configs = parse_configs(args.configs)
    except ValueError as exc:
        raise SystemExit(f"--configs: {exc}, e.g. 64x128x8x2") from None
    shown = options or "the launchers' defaults"
    print(
        f"triton {triton.__version__}, target sm_{TARGET.arch}a, options {shown}, dtype {args.dtype}"
    )
    print("| kernel | hd | config | registers | spill B | shared KiB | async | tma | wgmma |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for kind in filter(None, args.kernels.split(",")):
        if kind not in KERNELS:
            raise SystemExit(f"--kernels: {kind!r} is not one of {sorted(KERNELS)}")
        for d in (int(x) for x in args.head_dims.split(",")):
            for config in configs or KERNELS[kind][1][d]:
                r = report(kind, d, config, options, args.dtype)
                rows.append(r)
                print(f"| {r['kernel']} | {r['hd']} | {r['config']} | {r['registers']} | "
                      f"{r['spill_bytes']} | {r['shared_kib']} | {r['async']} | {r['tma']} | "
                      f"{r['wgmma']} |", flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    main()
