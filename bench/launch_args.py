"""Command-line words of the kernel benches: kernel options and launch-config lists.

``--options use_tma=0,sig_mode=0`` -> keyword arguments of the kernel's launchers
(``triton_sigmoid.launch_fwd`` / ``launch_bwd``); ``--configs 128x64x8x3x1,64x128x8x3`` ->
launch config tuples. Shared by bench/kernel.py, bench/ncu_target.py and
bench/register_report.py; the package never parses these.
"""

from __future__ import annotations

#: the launchers' keyword options and what they mean
KERNEL_OPTIONS = {
    "use_tma": "1: TMA loads where the GPU and the inputs allow (default); 0: pointer loads",
    "sig_mode": "0: the exact sigmoid; 1: the one-MUFU-op tanh form (default for 16-bit inputs)",
}


def parse_options(text: str) -> dict:
    """``"use_tma=0,sig_mode=1"`` -> ``{"use_tma": 0, "sig_mode": 1}``; an unknown key or a
    value that is not an integer raises ValueError naming it."""
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in KERNEL_OPTIONS:
            raise ValueError(f"unknown kernel option {key!r} (known: {sorted(KERNEL_OPTIONS)})")
        try:
            options[key] = int(value)
        except ValueError:
            raise ValueError(f"kernel option {key!r} needs an integer, got {value!r}") from None
    return options


_CONFIG_SHAPES = {
    "fwd": ((5,), "BLOCK_MxBLOCK_NxWARPSxSTAGESxPIPELINE"),
    "bwd": ((4,), "BLOCK_MxBLOCK_NxWARPSxSTAGES"),
    None: ((4, 5), "BLOCK_MxBLOCK_NxWARPSxSTAGES[xPIPELINE]"),
}


def parse_configs(text: str, kind: str | None = None) -> list[tuple[int, ...]]:
    """``"128x64x8x3x1,128x32x8x3x1"`` -> launch config tuples: a forward config
    (``kind="fwd"``) has the fifth entry PIPELINE, a backward one does not (``None``: either);
    anything else raises ValueError naming the entry."""
    lengths, shape = _CONFIG_SHAPES[kind]
    configs = []
    for item in filter(None, text.split(",")):
        try:
            config = tuple(int(x) for x in item.split("x"))
        except ValueError:
            raise ValueError(f"{item!r}: each config is {shape}, integers") from None
        if len(config) not in lengths:
            raise ValueError(f"{item!r}: each {kind + ' ' if kind else ''}config is {shape}")
        configs.append(config)
    return configs
