"""A structured generator of ``tokens.npz`` files for the model and training tests.

Cells belong to one of a few types; each type ranks the genes by its own fixed preference plus
noise, so the genes at masked ranks are predictable from the rest of the cell (the loss can
fall well below ``log(vocab_size)``). The file follows docs/ARCHITECTURE.md: ``input_ids``
(gene ``g`` has token id ``g + 3``), ``offsets``, ``split``, ``obs_names``, ``vocab_size``,
``max_len`` and the special ids ``pad_id=0``, ``mask_id=1``, ``cls_id=2``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_SPECIAL = 3
#: the model and training settings of the tests that train on these tokens (a few seconds)
TINY_MODEL = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "dropout": 0.0}
TINY_TRAIN = {
    "steps": 12,
    "batch_tokens": 320,
    "lr": 3.0e-3,
    "warmup_steps": 3,
    "eval_every": 5,
    "checkpoint_every": 4,
}


def sections(model: dict, train: dict):
    """The model and train sections as the train stage takes them (schema defaults filled)."""
    from sigmoid_sc import config

    return config.section("model", model), config.section("train", train)


def make_tokens(
    path: str | Path,
    n_cells: int = 120,
    n_genes: int = 50,
    n_types: int = 3,
    min_len: int = 8,
    max_len: int = 32,
    noise: float = 0.3,
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    preference = rng.normal(size=(n_types, n_genes)) * 2.0
    cell_type = rng.integers(n_types, size=n_cells)
    lengths = rng.integers(min_len, max_len + 1, size=n_cells)
    ids = []
    for t, n in zip(cell_type, lengths):
        score = preference[t] + noise * rng.normal(size=n_genes)
        ids.append(np.argsort(-score)[:n] + N_SPECIAL)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    split = np.array(["train"] * n_cells, dtype="<U5")
    split[rng.permutation(n_cells)[: n_cells // 5]] = "val"
    split[np.flatnonzero(split == "train")[: n_cells // 6]] = "test"
    path = Path(path)
    np.savez(
        path,
        input_ids=np.concatenate(ids).astype(np.int32),
        offsets=offsets,
        split=split,
        obs_names=np.array([f"cell{i}" for i in range(n_cells)]),
        cell_type=cell_type,
        vocab_size=np.int64(n_genes + N_SPECIAL),
        max_len=np.int64(max_len),
        pad_id=np.int64(0),
        mask_id=np.int64(1),
        cls_id=np.int64(2),
    )
    return path
