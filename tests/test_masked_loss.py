"""The masked-gene loss hides the answer: a model that copies its input must not score well.

:class:`CopyModel` predicts, at every position, the token it is given there (a huge logit on
its input id). If the loss showed the model the true genes at the masked positions, this model
would reach a loss near zero; the loss corrupts them to ``mask_id`` first, so the model
predicts ``mask_id`` (never a target) and its loss is about ``SCALE``. The same holds for the
validation loss and for the DDP wrapper, which both go through the same function.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sigmoid_sc.tokens import Tokens, choose_masked, masked_gene_loss, validation_loss

VOCAB = 30
MASK_ID = 1
SCALE = 40.0  # the copy model's logit margin: loss ~ SCALE when it cannot see the answer


class CopyModel(torch.nn.Module):
    """Hidden state = one-hot of the input token; gene logits = SCALE x that one-hot."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, cu_seqlens, max_seqlen):
        self.seen.append(input_ids.clone())
        return F.one_hot(input_ids, VOCAB).float()

    def gene_logits(self, hidden):
        return SCALE * hidden


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, size=6)
    cu = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = rng.integers(3, VOCAB, size=int(cu[-1]))
    masked = choose_masked(cu, 0.25, rng)
    return torch.from_numpy(ids), torch.from_numpy(cu), int(lengths.max()), torch.from_numpy(masked)


def test_the_copy_model_scores_near_zero_when_it_sees_the_answer():
    """The control: shown the true ids, this model's cross-entropy is ~0 (so the tests below
    fail if the loss ever shows it the answer)."""
    ids, _, _, masked = batch()
    logits = CopyModel().gene_logits(F.one_hot(ids, VOCAB).float())[masked]
    assert F.cross_entropy(logits, ids[masked]).item() < 1e-6


def test_masked_positions_are_hidden_from_the_model():
    ids, cu, max_len, masked = batch()
    model = CopyModel()
    loss = masked_gene_loss(model, ids, cu, max_len, masked, MASK_ID)
    (given,) = model.seen
    assert torch.equal(given[masked], torch.full_like(ids[masked], MASK_ID))
    assert torch.equal(given[~masked], ids[~masked])  # the rest of the cell is shown as is
    assert loss.item() > SCALE - 1  # it predicted the mask id at every masked position


def test_sum_reduction_is_the_mean_times_the_masked_count():
    ids, cu, max_len, masked = batch(1)
    mean = masked_gene_loss(CopyModel(), ids, cu, max_len, masked, MASK_ID)
    total = masked_gene_loss(CopyModel(), ids, cu, max_len, masked, MASK_ID, reduction="sum")
    assert total.item() > SCALE
    assert torch.isclose(total, mean * int(masked.sum()))


def test_validation_loss_hides_them_too():
    rng = np.random.default_rng(3)
    lengths = rng.integers(4, 10, size=12)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = Tokens(
        input_ids=rng.integers(3, VOCAB, size=int(offsets[-1])),
        offsets=offsets,
        split=np.array(["val"] * lengths.size),
        obs_names=np.array([str(i) for i in range(lengths.size)]),
        vocab_size=VOCAB,
        max_len=int(lengths.max()),
        pad_id=0,
        mask_id=MASK_ID,
        cls_id=2,
    )
    model = CopyModel()
    loss = validation_loss(model, tokens, tokens.cells("val"), 0.2, 10, torch.device("cpu"))
    assert loss > SCALE - 1
    assert all((given == MASK_ID).any() for given in model.seen)  # every chunk had masks
