"""The training step as it was before token budgets, timed beside the pipeline's own.

``sigmoid-sc training-speed --compare variants`` (every option and variant of it) with one more
variant, ``today:C``: the step before token budgets, emulated line by line: ``C`` cells a step
(one seeded permutation per epoch, the remainder dropped), ids and the boolean mask copied from
pageable memory, the loss indexing hidden states with the boolean mask on the device (two host
syncs a step). Listed first, it is the table's "vs first" baseline. Run on a CUDA machine:

    python bench/train_step_before.py --tokens-npz results/pbmc3k/tokens.npz \\
        --config configs/shared_data.yaml --variants today:64@1,4 tokens@1,4 \\
        tokens+compile@1 --out-csv steps.csv --out-md steps.md

``--smoke`` runs a tiny model on the CPU (tests). The record of 2026-12-06
(docs/records/2026-12-06_h100) measured with this step as ``today:64``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # a checkout without installing the package

from sigmoid_sc import training_speed as speed  # noqa: E402
from sigmoid_sc.errors import ConfigError, UserError  # noqa: E402


@dataclass(frozen=True)
class Today:
    name: str  # as given, e.g. "today:64"
    cells: int  # cells a step
    jobs: tuple[int, ...] = (1,)


def parse_variant(text: str) -> Today | speed.Variant:
    """``today:C[@K1,K2,...]``, or any variant of the stage."""
    spec, jobs = speed.parse_jobs(text)
    kind, _, number = spec.partition(":")
    if kind != "today":
        return speed.parse_variant(text)
    if number.isdigit() and int(number) > 0:
        return Today(spec, int(number), jobs)
    raise ConfigError(f"variant {text!r}: expected today:CELLS (no +compile), then @JOBS")


def today_cells(train_cells: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The cells of step ``step`` before token budgets: ``batch_size`` cells of a permutation
    seeded by ``(seed, epoch)``, ``len // batch_size`` batches an epoch."""
    batch_size = min(batch_size, train_cells.size)
    per_epoch = train_cells.size // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 0, epoch]).permutation(train_cells.size)
    return train_cells[order[index * batch_size : (index + 1) * batch_size]]


def today_loss(model, input_ids, cu_seqlens, max_seqlen, masked, mask_id):
    """The masked-gene loss before host-built batches: boolean indexing on the device."""
    import torch.nn.functional as F

    corrupted = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    hidden = model(corrupted, cu_seqlens, max_seqlen)
    logits = model.gene_logits(hidden[masked])
    return F.cross_entropy(logits.float(), input_ids[masked])


def today_step(job: speed.JobSetup, cells_per_step: int):
    """The step before token budgets, on the case's model, optimiser and data."""
    from sigmoid_sc.tokens import choose_masked, pack

    tokens, dev, cfg = job.tokens, job.device, job.train

    def step(t: int):
        cells = today_cells(job.train_cells, cells_per_step, job.seed, t)
        ids, cu, max_seqlen = pack(tokens, cells)
        masked = choose_masked(cu, cfg.mask_prob, np.random.default_rng([job.seed, 1, t]))
        ids_t = torch.from_numpy(ids).to(dev, non_blocking=True)
        cu_t = torch.from_numpy(cu).to(dev, non_blocking=True)
        masked_t = torch.from_numpy(masked).to(dev, non_blocking=True)
        with job.autocast():
            loss = today_loss(job.model, ids_t, cu_t, max_seqlen, masked_t, tokens.mask_id)
        job.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        job.optimizer.step()
        job.scheduler.step()
        job.stats.append(speed.batch_stats(cu, int(masked.sum())))
        return loss.detach()

    return step


def run_job(spec: dict, barrier=None) -> dict:
    """One case (in a process of its own): ``today:C`` here, the stage's variants there."""
    variant = parse_variant(spec["variant"])
    if not isinstance(variant, Today):
        return speed.run_job(spec, barrier)
    job = speed.setup_job(spec)
    return speed.measure_job(job, today_step(job, variant.cells), barrier)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    speed.add_arguments(parser)
    parser.set_defaults(compare="variants", variants=["today:64@1", "tokens@1"])
    args = parser.parse_args(argv)
    if args.compare != "variants":
        parser.error("this script times --compare variants (its default)")
    try:
        speed.run_training_speed(args, parse_variant, run_job)
    except UserError as exc:
        print(f"train_step_before: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
