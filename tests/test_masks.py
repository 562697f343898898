"""The masks of the masked-gene objective: what the model sees at each training step.

The tests read what the encoder is given (its ``forward`` is wrapped), so they hold whatever
code draws the masks. On tokens where every cell is the same gene list, every training batch
packs to the same ids whatever cells it holds: two steps' inputs then differ only by their
masks, and the masks are compared position by position. They must change with the step and
with the seed and be equal for softmax and sigmoid (the two kinds see the same training data).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sigmoid_sc import config
from sigmoid_sc.model import Encoder
from sigmoid_sc.tokens import choose_masked
from sigmoid_sc.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "dropout": 0.0}
STEPS = 4
TRAIN = {
    "steps": STEPS,
    "batch_tokens": 8 * 24,  # CELLS_PER_STEP cells a step
    "lr": 1.0e-3,
    "warmup_steps": 1,
    "eval_every": 100,
    "checkpoint_every": 100,
    "mask_prob": 0.3,
}
GENES = 24  # every cell: genes 0 .. 23 in that order (token ids 3 .. 26)
CELLS_PER_STEP = 8
MASK_ID = 1


@pytest.fixture(scope="module")
def uniform_tokens(tmp_path_factory):
    """40 identical cells (24 train, 8 val, 8 test): any batch of 8 packs to the same ids."""
    n_cells = 40
    split = np.array(["train"] * 24 + ["val"] * 8 + ["test"] * 8)
    path = tmp_path_factory.mktemp("uniform") / "tokens.npz"
    np.savez(
        path,
        input_ids=np.tile(np.arange(GENES) + 3, n_cells).astype(np.int32),
        offsets=np.arange(n_cells + 1, dtype=np.int64) * GENES,
        split=split,
        obs_names=np.array([f"c{i}" for i in range(n_cells)]),
        vocab_size=np.int64(GENES + 3),
        max_len=np.int64(GENES),
        pad_id=np.int64(0),
        mask_id=np.int64(MASK_ID),
        cls_id=np.int64(2),
    )
    return path


@pytest.fixture
def seen_inputs(monkeypatch):
    """Every input_ids tensor the encoder gets while training (not in validation passes)."""
    seen: list[torch.Tensor] = []
    forward = Encoder.forward

    def recording(self, input_ids, *args, **kwargs):
        if self.training:
            seen.append(input_ids.detach().clone())
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Encoder, "forward", recording)
    return seen


def training_inputs(seen, tokens, out_dir, attention="sigmoid", seed=0) -> list[np.ndarray]:
    seen.clear()
    train(
        "uniform", tokens, attention, seed, config.section("model", MODEL),
        config.section("train", TRAIN), "cpu", out_dir,
    )  # fmt: skip
    assert len(seen) == STEPS
    return [ids.numpy() for ids in seen]


def test_model_sees_mask_id_exactly_at_masked_positions(uniform_tokens, seen_inputs, tmp_path):
    truth = np.tile(np.arange(GENES) + 3, CELLS_PER_STEP)
    steps = training_inputs(seen_inputs, uniform_tokens, tmp_path)
    for ids in steps:
        masked = ids == MASK_ID
        assert ids.shape == truth.shape
        # every other position shows its true gene; masked ones show only the mask id
        np.testing.assert_array_equal(ids[~masked], truth[~masked])
        per_cell = masked.reshape(CELLS_PER_STEP, GENES).sum(axis=1)
        assert (per_cell >= 1).all()
    # the configured mask_prob (0.3): 768 tokens, sd of the share about 0.017
    share = np.mean([ids == MASK_ID for ids in steps])
    assert 0.24 < share < 0.36, share


def test_masks_change_with_the_step(uniform_tokens, seen_inputs, tmp_path):
    masks = [ids == MASK_ID for ids in training_inputs(seen_inputs, uniform_tokens, tmp_path)]
    for a in range(STEPS):
        for b in range(a + 1, STEPS):
            assert not np.array_equal(masks[a], masks[b]), f"steps {a} and {b}: same mask"


def test_masks_change_with_the_seed(uniform_tokens, seen_inputs, tmp_path):
    seed0 = training_inputs(seen_inputs, uniform_tokens, tmp_path / "s0", seed=0)
    seed1 = training_inputs(seen_inputs, uniform_tokens, tmp_path / "s1", seed=1)
    for step, (a, b) in enumerate(zip(seed0, seed1)):
        assert not np.array_equal(a == MASK_ID, b == MASK_ID), f"step {step}: seed ignored"


def test_masks_are_the_same_for_both_attention_kinds(uniform_tokens, seen_inputs, tmp_path):
    softmax = training_inputs(seen_inputs, uniform_tokens, tmp_path / "a", attention="softmax")
    sigmoid = training_inputs(seen_inputs, uniform_tokens, tmp_path / "b", attention="sigmoid")
    for a, b in zip(softmax, sigmoid):
        np.testing.assert_array_equal(a, b)


def test_a_rerun_draws_the_same_masks(uniform_tokens, seen_inputs, tmp_path):
    first = training_inputs(seen_inputs, uniform_tokens, tmp_path / "a", seed=2)
    again = training_inputs(seen_inputs, uniform_tokens, tmp_path / "b", seed=2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_choose_masked_follows_its_generator():
    cu = np.array([0, 5, 40, 41, 100], dtype=np.int32)
    a = choose_masked(cu, 0.2, np.random.default_rng([7, 1, 3]))
    b = choose_masked(cu, 0.2, np.random.default_rng([7, 1, 3]))
    c = choose_masked(cu, 0.2, np.random.default_rng([7, 1, 4]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (np.add.reduceat(a, cu[:-1]) >= 1).all() and a[40]  # one-token cell: masked
