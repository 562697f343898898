"""``sigmoid-sc <stage> ...``: one sub-command per pipeline stage.

Each stage module defines ``register(subparsers)``, which adds its sub-command and sets
``func`` to a callable taking the parsed ``argparse.Namespace``. Modules are imported only when
listed here, so a sub-command's heavy imports (torch, scanpy, jax) stay out of the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

#: sub-command -> the module that registers it; lets a stage import only its own module
COMMAND_MODULES = {
    "download": "sigmoid_sc.download",
    "prepare": "sigmoid_sc.prepare",
    "tokenize": "sigmoid_sc.tokenize",
    "train": "sigmoid_sc.train",
    "embed": "sigmoid_sc.embed",
    "pca": "sigmoid_sc.pca",
    "evaluate": "sigmoid_sc.evaluate",
    "aggregate": "sigmoid_sc.aggregate",
    "figures": "sigmoid_sc.figures",
    "stress-test": "sigmoid_sc.stress_test",
    "stability-sweep": "sigmoid_sc.stability_sweep",
    "jacobian": "sigmoid_sc.jacobian",
    "kernel-benchmark": "sigmoid_sc.kernel_benchmark",
    "training-speed": "sigmoid_sc.training_speed",
    "experiment-figures": "sigmoid_sc.experiment_figures",
    "holdout": "sigmoid_sc.holdout",  # the pretraining protocol's stages
    "vocabulary": "sigmoid_sc.vocabulary",
    "corpus": "sigmoid_sc.corpus",
    "match-rates": "sigmoid_sc.match_rates",
    "protocols": "sigmoid_sc.protocols",
}
#: every stage module, once, in pipeline order
STAGE_MODULES = tuple(dict.fromkeys(COMMAND_MODULES.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every stage, or, given a known ``command``, of that stage alone.

    Importing one stage module only keeps torch out of the stages that do not train (a few
    seconds per workflow job).
    """
    parser = argparse.ArgumentParser(prog="sigmoid-sc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = STAGE_MODULES
    if command in COMMAND_MODULES:
        modules = (COMMAND_MODULES[command],)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not a stage not written yet
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"sigmoid-sc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
