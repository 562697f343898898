"""A bidirectional transformer encoder over packed single-cell tokens.

Tokens of all cells in a batch are concatenated (``input_ids [T]``) and ``cu_seqlens``
(int32 ``[B + 1]``) marks where each cell starts, as in FlashAttention's varlen API, so no
compute is spent on padding. A cell's tokens are its expressed genes in rank-value order; the
position embedding is the rank within the cell (0 = the highest-expressed gene).

The softmax and sigmoid models differ in exactly one place: the ``kind`` string that
:class:`SelfAttention` passes to :func:`sigmoid_sc.attention.attention_varlen` (which also adds
sigmoid's per-cell bias ``-log(n_i)``). Parameters, their order and their initialisation do
not depend on the kind, so the same seed gives the same initial weights for both.

With ``cls_token`` on, the encoder prepends one CLS token (``CLS_ID``, tokenize's ``cls_id``)
to every cell inside :meth:`Encoder.forward`, on the device: gene token ``i`` of cell ``c`` moves
to packed position ``i + c + 1``, the CLS token of cell ``c`` sits at ``cu_seqlens[c] + c``, and
the rank positions shift by one (CLS takes position 0, so ``pos_emb`` has ``max_len + 1`` rows).
The blocks run on the longer packed sequence (sigmoid's bias is then ``-log(n_i + 1)``); the
forward still returns the gene tokens' states in the caller's order, so the masked-gene loss
and the training loop do not change, and ``return_cls=True`` adds the CLS states ``[B, d]``.
With ``cls_token`` off the model is exactly the plain encoder.

The masked-gene head is tied to the token embedding (GPT-2 / BERT style): the logit of gene
``g`` is the dot product of the final hidden state with ``g``'s input embedding. Tying halves
the parameters that scale with the vocabulary and is what the reference models of the field do.

Architecture switches (``ModelConfig``), applied the same way to both attention kinds; the
defaults are the pipeline's model, exactly (same modules, parameters, initialisation and forward):

- ``norm="pre"`` (default): ``x = x + f(LN(x))`` per sublayer, a final LayerNorm (GPT-2).
  ``norm="post"``: ``x = LN(x + f(x))`` per sublayer, a LayerNorm on the embeddings and no final
  one (BERT / Geneformer). Both have ``2 * n_layers + 1`` LayerNorms, so the same parameter
  count; the residual projections keep the ``1/sqrt(2 * n_layers)`` initialisation in both, so
  only the placement of the norms differs.
- ``qk_norm=True``: a LayerNorm over the head dimension of every head's q and of every head's k
  before the dot product (Dehghani et al. 2023; Wortsman et al. 2023), shared by the heads of a
  layer: ``+ 4 * head_dim`` parameters per layer. Under CUDA autocast LayerNorm returns fp32;
  the normed q and k go back to v's dtype, since the kernels take one dtype.
- ``layer_scale=g`` (a float; None = off): each sublayer's output is multiplied by a learned
  per-channel vector initialised to ``g`` before it joins the residual stream (CaiT):
  ``+ 2 * d_model`` parameters per layer.

Parameter count, with ``d = d_model``, ``f = d_ff``, ``L = n_layers``, ``V = vocab_size``,
``P = max_len + cls_token``, ``D = d / n_heads`` (:func:`count_parameters_formula`)::

    V*d + P*d + L*(4*d*d + 4*d + 2*d*f + f + d + 4*d) + 2*d     (pre or post)
    + L * 4 * D                                                  (qk_norm)
    + L * 2 * d                                                  (layer_scale)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import ATTENTION_KINDS, VarlenBatch, attention_varlen
from .attention.reference import cell_index

#: the CLS token's id (tokenize's ``cls_id``; token ids 0-2 are pad, mask, cls)
CLS_ID = 2
#: the placements of the LayerNorms (``ModelConfig.norm``)
NORMS = ("pre", "post")


@dataclass
class ModelConfig:
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.0
    vocab_size: int = 0  # token ids are 0 .. vocab_size - 1 (specials included), from tokens.npz
    max_len: int = 256  # the longest cell in tokens (rank positions 0 .. max_len - 1)
    attention: str = "sigmoid"  # "softmax" | "sigmoid"
    # one CLS token per cell, prepended inside forward (off: records written before it existed)
    cls_token: bool = False
    norm: str = "pre"  # "pre" (GPT-2) | "post" (BERT / Geneformer), see the module docstring
    qk_norm: bool = False  # LayerNorm over each head's q and k
    layer_scale: float | None = None  # LayerScale's initial value; None: off

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, not {self.attention!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {self.norm!r}")
        if self.layer_scale is not None and not self.layer_scale > 0:
            raise ValueError(f"layer_scale must be > 0 or None, not {self.layer_scale!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.attention = config.attention  # the only difference between the two models
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.proj.residual_out = True  # scaled init, see Encoder._init_weights
        self.dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # over the head dim, shared by the heads
            self.q_norm = nn.LayerNorm(config.d_model // config.n_heads)
            self.k_norm = nn.LayerNorm(config.d_model // config.n_heads)

    def forward(self, x: torch.Tensor, cu_seqlens, max_seqlen: int | None = None) -> torch.Tensor:
        """x: ``[T, d_model]`` packed tokens -> ``[T, d_model]``; attention stays within a cell.
        ``cu_seqlens``: the batch's :class:`VarlenBatch` (or int32 ``[B + 1]`` and ``max_seqlen``)."""
        total, d_model = x.shape
        q, k, v = self.qkv(x).view(total, 3, self.n_heads, d_model // self.n_heads).unbind(1)
        if self.qk_norm:  # autocast runs LayerNorm in fp32: back to v's dtype for the kernel
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        # cu_seqlens come from the packer (sigmoid_sc.train.pack), valid by construction: no
        # host-side value check (a device sync) in every layer of every step
        y = attention_varlen(self.attention, q, k, v, cu_seqlens, max_seqlen, validate=False)
        return self.dropout(self.proj(y.reshape(total, d_model)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.proj = nn.Linear(config.d_ff, config.d_model)
        self.proj.residual_out = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class LayerScale(nn.Module):
    """A learned per-channel gain on a sublayer's output (CaiT), initialised to ``value``."""

    def __init__(self, d_model: int, value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d_model,), float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class EmbeddingNorm(nn.Module):
    """Post-LN's embedding LayerNorm, then dropout (BERT); replaces the encoder's ``drop``."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ln(x))


class Block(nn.Module):
    """One layer: ``norm="pre"``: ``x + f(LN(x))``; ``norm="post"``: ``LN(x + f(x))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.post = config.norm == "post"
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        scale = config.layer_scale
        self.ls_1 = nn.Identity() if scale is None else LayerScale(config.d_model, scale)
        self.ls_2 = nn.Identity() if scale is None else LayerScale(config.d_model, scale)

    def forward(self, x: torch.Tensor, cu_seqlens, max_seqlen: int | None = None) -> torch.Tensor:
        if self.post:
            x = self.ln_1(x + self.ls_1(self.attn(x, cu_seqlens, max_seqlen)))
            return self.ln_2(x + self.ls_2(self.mlp(x)))
        x = x + self.ls_1(self.attn(self.ln_1(x), cu_seqlens, max_seqlen))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        # rank within the cell; a CLS token takes rank 0 and shifts the genes' ranks by one
        self.pos_emb = nn.Embedding(config.max_len + int(config.cls_token), config.d_model)
        self.drop = nn.Dropout(config.dropout)
        if config.norm == "post":  # BERT: LayerNorm on the embeddings, none at the end
            self.drop = EmbeddingNorm(config.d_model, config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model) if config.norm == "pre" else nn.Identity()
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections that write into the residual stream are
        # scaled by 1/sqrt(2 * n_layers) so its variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_out", False):
                std /= math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        return_cls: bool = False,
    ):
        """Hidden states of packed tokens.

        input_ids: int ``[T]``; cu_seqlens: int32 ``[B + 1]`` with ``cu_seqlens[-1] == T``;
        max_seqlen: the longest cell (an int, so the GPU never has to be asked).
        Returns float ``[T, d_model]`` after the final layer norm (pre-LN; post-LN: the last
        block's, which ends in one): the states of the gene tokens
        given, in their order (a CLS token, when the model has one, is not among them).
        ``return_cls=True`` (models with ``cls_token`` only) returns ``(genes, cls)``, ``cls``
        the CLS tokens' final states ``[B, d_model]``.
        """
        if return_cls and not self.config.cls_token:
            raise ValueError("return_cls=True needs a model built with cls_token=True")
        if self.config.cls_token:
            # the CLS step extends cu_seqlens first; the batch below describes the longer one
            input_ids, cu_seqlens, genes, cls = with_cls_tokens(input_ids, cu_seqlens, CLS_ID)
            max_seqlen += 1
        # the batch's sequence metadata, built once here and shared by every layer
        batch = VarlenBatch(cu_seqlens, max_seqlen, input_ids.shape[0])
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(batch.rank))
        for block in self.blocks:
            x = block(x, batch)
        x = self.ln_f(x)
        if not self.config.cls_token:
            return x
        return (x[genes], x[cls]) if return_cls else x[genes]

    def gene_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d_model]`` -> ``[..., vocab_size]``, the head tied to the token embedding."""
        return hidden @ self.tok_emb.weight.t()


def with_cls_tokens(
    input_ids: torch.Tensor, cu_seqlens: torch.Tensor, cls_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepend one ``cls_id`` token to every packed cell, on the device (no host sync).

    Returns ``(ids, cu, genes, cls)``: the longer packed ids ``[T + B]`` and their
    ``cu_seqlens`` (``cu + arange(B + 1)``), the new positions of the given tokens ``[T]``
    (token ``i`` of cell ``c`` -> ``i + c + 1``) and of the CLS tokens ``[B]``
    (``cu[c] + c``).
    """
    total, batch = input_ids.shape[0], cu_seqlens.shape[0] - 1
    steps = torch.arange(batch + 1, device=cu_seqlens.device)
    genes = torch.arange(total, device=input_ids.device) + cell_index(cu_seqlens, total) + 1
    cls = cu_seqlens[:-1].long() + steps[:-1]
    ids = input_ids.new_full((total + batch,), cls_id).scatter(0, genes, input_ids)
    return ids, cu_seqlens + steps.to(cu_seqlens.dtype), genes, cls


def count_parameters_formula(config: ModelConfig) -> int:
    """The encoder's parameter count from its config (the formula of the module docstring)."""
    d, f, L = config.d_model, config.d_ff, config.n_layers
    head_dim = d // config.n_heads
    per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # qkv, proj, fc, proj, 2 LN
    per_layer += 4 * head_dim if config.qk_norm else 0
    per_layer += 2 * d if config.layer_scale is not None else 0
    positions = config.max_len + int(config.cls_token)
    return config.vocab_size * d + positions * d + L * per_layer + 2 * d


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean of each cell's token states: ``[T, d]`` -> ``[B, d]`` cell embeddings (float32)."""
    total, d_model = hidden.shape
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float32)
    sums = hidden.new_zeros((lengths.numel(), d_model), dtype=torch.float32)
    sums.index_add_(0, cell_index(cu_seqlens, total), hidden.float())
    return sums / lengths.clamp_min(1.0)[:, None]
