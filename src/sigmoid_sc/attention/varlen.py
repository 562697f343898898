"""Sequence metadata of one packed batch, built once and shared by every attention layer.

A packed batch is described by ``cu_seqlens`` (int32 ``[B + 1]``, on the tokens' device),
``max_seqlen`` (the longest sequence, a host int) and ``total`` (the number of tokens, a host
int). Every attention backend derives something from them: the Triton kernel its sequence
starts, lengths, launch order and per-sequence bias; the padded softmax path each token's row
in the padded layout and the key mask; the encoder each token's rank in its cell.
:class:`VarlenBatch` computes each of these on first use and keeps it, so an encoder that
builds one per forward pass and hands it to every layer computes each once a batch instead
of once a layer. Nothing here reads a device value on the host: no device sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .reference import cell_and_rank


def _lazy(make: Callable[[VarlenBatch], Any]) -> property:
    """A property computed on first use and kept in the batch's ``_cache`` (a plain dict, not
    ``functools.cached_property``, whose lock in Python 3.11 torch.compile cannot trace)."""
    name = make.__name__

    def get(self: VarlenBatch) -> Any:
        if name not in self._cache:
            self._cache[name] = make(self)
        return self._cache[name]

    return property(get, doc=make.__doc__)


class VarlenBatch:
    """``cu_seqlens``, ``max_seqlen`` and ``total`` of a packed batch, plus what the attention
    backends derive from them, each computed lazily once (see the module docstring).

    ``cu_seqlens`` must be an int32 ``[B + 1]`` tensor, 0 first, strictly increasing, ``total``
    last (checked only by :meth:`check_values`, which reads it on the host); ``max_seqlen`` at
    least the longest sequence's length.
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, total: int):
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
            got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens)
            raise ValueError(f"cu_seqlens must be an int32 tensor, got {got}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be 1-D with B+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}"
            )
        for name, value in (("max_seqlen", max_seqlen), ("total", total)):
            if isinstance(value, torch.Tensor) or isinstance(value, bool):
                raise ValueError(
                    f"{name} must be a host int (reading a device tensor would stall the GPU), "
                    f"got {type(value).__name__}"
                )
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = int(max_seqlen)
        self.total = int(total)
        self.batch_size = cu_seqlens.numel() - 1
        self.device = cu_seqlens.device
        self._checked = False
        self._cache: dict[str, Any] = {}

    @classmethod
    def of(cls, cu_seqlens, max_seqlen: int | None, total: int) -> VarlenBatch:
        """``cu_seqlens`` itself when it already is a :class:`VarlenBatch` (then ``max_seqlen``
        must be None or the batch's, and ``total`` its own); else a new one."""
        if isinstance(cu_seqlens, VarlenBatch):
            if max_seqlen is not None and int(max_seqlen) != cu_seqlens.max_seqlen:
                raise ValueError(
                    f"max_seqlen={max_seqlen} given beside a VarlenBatch of max_seqlen "
                    f"{cu_seqlens.max_seqlen}"
                )
            if total != cu_seqlens.total:
                raise ValueError(
                    f"the tokens hold {total} rows, the VarlenBatch {cu_seqlens.total}"
                )
            return cu_seqlens
        if max_seqlen is None:
            raise ValueError("max_seqlen is needed beside a cu_seqlens tensor")
        return cls(cu_seqlens, max_seqlen, total)

    def check_values(self) -> None:
        """Check ``cu_seqlens``' values against ``total`` and ``max_seqlen`` (reads them on the
        host: one device sync on CUDA, once per batch). ValueError naming what is wrong."""
        if self._checked:
            return
        cu = self.cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if cu[0] != 0 or cu[-1] != self.total:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at total_tokens={self.total}, "
                f"got {cu[0]}..{cu[-1]}"
            )
        if min(lengths) <= 0:
            raise ValueError(
                "cu_seqlens must be strictly increasing (every sequence at least one token)"
            )
        if self.max_seqlen < max(lengths):
            raise ValueError(
                f"max_seqlen={self.max_seqlen} is below the longest sequence ({max(lengths)})"
            )
        self._checked = True

    # -- shared ------------------------------------------------------------------------------

    @_lazy
    def lengths(self) -> torch.Tensor:
        """Each sequence's length, int32 ``[B]``."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).contiguous()

    @_lazy
    def cells_and_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's sequence and its position in it, two int64 ``[total]``."""
        return cell_and_rank(self.cu_seqlens, self.total)

    @property
    def rank(self) -> torch.Tensor:
        """Each token's position in its sequence, int64 ``[total]`` (the encoder's position)."""
        return self.cells_and_ranks[1]

    # -- the padded layout (reference paths, SDPA on the padded batch) -------------------------

    @_lazy
    def padded_rows(self) -> torch.Tensor:
        """Each token's row in the ``[B * max_seqlen]`` padded layout, int64 ``[total]``."""
        cells, rank = self.cells_and_ranks
        return cells * self.max_seqlen + rank

    @_lazy
    def key_mask(self) -> torch.Tensor:
        """bool ``[B, max_seqlen]``: True where a padded position holds a token."""
        positions = torch.arange(self.max_seqlen, device=self.device)
        return positions[None, :] < self.lengths.long()[:, None]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[total, ...]`` -> ``[B, max_seqlen, ...]``, zeros at padded positions."""
        rows = self.batch_size * self.max_seqlen
        out = x.new_zeros((rows, *x.shape[1:])).index_copy(0, self.padded_rows, x)
        return out.view(self.batch_size, self.max_seqlen, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, max_seqlen, ...]`` -> ``[total, ...]``: the real tokens, in packed order."""
        return x.reshape(self.batch_size * self.max_seqlen, *x.shape[2:])[self.padded_rows]

    # -- the Triton kernel --------------------------------------------------------------------

    @_lazy
    def kernel_sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(seq_start, seq_len, seq_order)``, int32 ``[B]`` each: where each sequence starts,
        its length, and the sequences longest first (the kernel's launch order)."""
        seq_start = self.cu_seqlens[:-1].contiguous()
        seq_order = torch.argsort(self.lengths, descending=True, stable=True).to(torch.int32)
        return seq_start, self.lengths, seq_order

    @_lazy
    def log_length_bias(self) -> torch.Tensor:
        """Sigmoid attention's default per-sequence bias ``-log(n_i)``, float32 ``[B]``."""
        return -torch.log(self.lengths.to(torch.float32))

    # -- other softmax paths ------------------------------------------------------------------

    @_lazy
    def offsets(self) -> torch.Tensor:
        """``cu_seqlens`` as int64, the offsets of nested jagged tensors."""
        return self.cu_seqlens.to(torch.int64)

    @_lazy
    def flex_block_mask(self):
        """FlexAttention's document mask of this batch (a token attends within its sequence)."""
        from . import flex_document_mask

        return flex_document_mask(self.cu_seqlens, self.total, cells=self.cells_and_ranks[0])

    def __repr__(self) -> str:
        return (
            f"VarlenBatch(B={self.batch_size}, max_seqlen={self.max_seqlen}, "
            f"total={self.total}, device={self.device})"
        )
