"""The Set Transformer model (Lee et al. 2019, arXiv:1810.00825, section 3.3):
Encoder = ISAB_m × depth, Decoder = rFF(SAB(PMA_k(Z))), then a task head.

Input: a set of tokens (B, N) (integer ids, like the generic models) or of float vectors
(B, N, input_dim) when built with `input_dim`; `mask` (B, N), True = real element. By default no
positions are added (`positions="none"`: sets have no order), so the classifier is
permutation-invariant; "learned"/"sinusoidal" add them for sequence tasks (LRA), giving that up.
Pooling: "pma" (default) and "cls" both pool with PMA_k (k learned seed queries attending to the
set, the set analogue of a CLS token) followed by SAB; "mean" takes the masked mean of the
encoder outputs instead. Padded elements are never keys, so they do not change the outputs. Tasks: "classify" and "match" (a pair of sets,
(B, 2, N), the LRA retrieval head); no "lm" (the survey: no decode).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention.base import check_positive_int
from ..attention.set_transformer import MAB, InducingPoints
from ..registry import register_model
from .transformer import (
    Positions, TaskModel, check_id_ranges, check_labels, check_mask, check_model_arguments,
    check_tokens, scored_cross_entropy,
)

TASKS = ("classify", "match")
POOLINGS = ("pma", "cls", "mean")


class ISAB(nn.Module):
    """ISAB_m(X) = MAB(X, MAB(I, X)) (eq. 9-10): (B, N, dim) -> (B, N, dim), O(N·m)."""

    def __init__(self, dim, heads, num_inducing, hidden, layer_norm):
        super().__init__()
        self.inducing = InducingPoints(dim, heads, num_inducing, hidden, layer_norm)
        self.mab = MAB(dim, heads, hidden, layer_norm)

    def forward(self, x, mask=None):
        return self.mab(x, self.inducing(x, mask))


class SAB(nn.Module):
    """SAB(X) = MAB(X, X) (eq. 8), O(N²): used on the k pooled seeds only."""

    def __init__(self, dim, heads, hidden, layer_norm):
        super().__init__()
        self.mab = MAB(dim, heads, hidden, layer_norm)

    def forward(self, x, mask=None):
        return self.mab(x, x, mask)


class PMA(nn.Module):
    """PMA_k(Z) = MAB(S, rFF(Z)) (eq. 11): (B, N, dim) -> (B, k, dim) with k learned seeds."""

    def __init__(self, dim, heads, num_seeds, hidden, layer_norm):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(1, num_seeds, dim) * dim ** -0.5)
        self.rff = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.mab = MAB(dim, heads, hidden, layer_norm)

    def forward(self, z, mask=None):
        seeds = self.seeds.expand(z.shape[0], -1, -1).to(z.dtype)
        return self.mab(seeds, self.rff(z), mask)


class SetEncoder(nn.Module):
    """Elements -> one vector per set: embed, ISAB × depth, PMA_k, SAB, mean over the k seeds."""

    def __init__(self, *, vocab_size, input_dim, dim, depth, heads, num_inducing, num_seeds,
                 hidden, layer_norm, dropout, positions, pooling, max_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.project = nn.Linear(input_dim, dim) if input_dim else None
        self.positions = Positions(positions, max_len, dim)
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(ISAB(dim, heads, num_inducing, hidden, layer_norm)
                                    for _ in range(depth))
        self.pool = PMA(dim, heads, num_seeds, hidden, layer_norm)
        self.sab = SAB(dim, heads, hidden, layer_norm)

    def forward(self, x, mask=None):
        """x (B, N) ids or (B, N, input_dim) floats -> pooled (B, dim), hidden (B, N, dim)."""
        h = self.embed(x) if self.project is None or not x.is_floating_point() else self.project(x)
        h = self.drop(h + self.positions(h.shape[1]))
        for block in self.blocks:
            h = block(h, mask)
        if self.pooling == "mean":
            w = torch.ones_like(h[..., :1]) if mask is None else mask[..., None].to(h.dtype)
            return (h * w).sum(1) / w.sum(1).clamp_min(1.0), h
        pooled = self.sab(self.pool(h, mask))        # (B, k, dim)
        return pooled.mean(dim=1), h


class SetTransformer(TaskModel):
    def __init__(self, config: dict[str, Any], encoder: SetEncoder, task: str, dim: int,
                 num_classes: int, vocab_size: int, input_dim: int | None, max_len: int,
                 dropout: float):
        super().__init__(config)
        self.encoder, self.task = encoder, task
        self.vocab_size, self.input_dim, self.max_len = vocab_size, input_dim, max_len
        self.num_classes = num_classes
        if task == "classify":
            self.head = nn.Linear(dim, num_classes)
        else:
            self.head = nn.Sequential(nn.Linear(4 * dim, dim), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(dim, num_classes))

    def check_input(self, x, ndim: int, labels) -> None:
        """Token ids or float vectors, and the labels (one read of the device for both ranges)."""
        if isinstance(x, torch.Tensor) and x.is_floating_point() and self.input_dim:
            if x.dim() != ndim + 1 or x.shape[-1] != self.input_dim or x.shape[-2] < 1:
                raise ValueError(f"x: expected float vectors of shape (batch, {'2, ' if ndim == 3 else ''}"
                                 f"size, {self.input_dim}), got {tuple(x.shape)}")
            if x.shape[-2] > self.max_len:
                raise ValueError(f"x: set size {x.shape[-2]} exceeds max_len={self.max_len}")
            check_labels(labels, tuple(x.shape[:1]))
            check_id_ranges([] if labels is None else [("labels", labels, self.num_classes)])
            return
        check_tokens(x, self.vocab_size, self.max_len, argument="tokens", ndim=ndim,
                     labels=labels, num_labels=self.num_classes)

    def forward(self, tokens, mask=None, labels=None):
        """tokens: (B, N) ids or (B, N, input_dim) floats; task "match": (B, 2, N[, input_dim])."""
        ndim = 2 if self.task == "classify" else 3
        self.check_input(tokens, ndim, labels)
        shape = tuple(tokens.shape[:ndim])
        check_mask(mask, shape)
        if self.task == "classify":
            pooled, hidden = self.encoder(tokens, mask)
            logits = self.head(pooled)
        else:
            if shape[1] != 2:
                raise ValueError(f"tokens: expected (batch, 2, size) for a pair, got {tuple(tokens.shape)}")
            b, n = shape[0], shape[2]
            both = tokens.reshape(2 * b, n, *tokens.shape[3:])
            pooled, hidden = self.encoder(both, None if mask is None else mask.reshape(2 * b, n))
            u, v = pooled.view(b, 2, -1).unbind(dim=1)
            logits = self.head(torch.cat([u, v, u * v, u - v], dim=-1))
        return self.finish(logits, hidden, scored_cross_entropy(logits, labels))


@register_model("set_transformer")
def build_set_transformer(name: str, task: str = "classify", *, vocab_size: int = 256,
                          num_classes: int = 2, dim: int = 128, depth: int = 2, heads: int = 4,
                          max_len: int = 1024, mlp_dim: int | None = None, dropout: float = 0.0,
                          num_inducing: int = 64, num_seeds: int = 1, layer_norm: bool = True,
                          input_dim: int | None = None, positions: str = "none",
                          pooling: str = "pma") -> SetTransformer:
    """Set Transformer for "classify" (or "match"); `max_len` is the largest set size."""
    if task == "lm":
        raise ValueError("task: 'lm' needs a mechanism that decodes; 'set_transformer' does not "
                         "(survey Table 1); use task='classify' or 'match'")
    check_model_arguments(task=task, positions=positions, pooling=pooling, tasks=TASKS,
                          poolings=POOLINGS, vocab_size=vocab_size, num_classes=num_classes,
                          dim=dim, depth=depth, heads=heads, max_len=max_len,
                          num_inducing=num_inducing, num_seeds=num_seeds, mlp_dim=mlp_dim,
                          dropout=dropout)
    if dim % heads:
        raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
    if input_dim is not None:
        check_positive_int("input_dim", input_dim)
    if not isinstance(layer_norm, bool):
        raise ValueError(f"layer_norm: expected True or False, got {layer_norm!r}")
    config = dict(name=name, task=task, vocab_size=vocab_size, num_classes=num_classes, dim=dim,
                  depth=depth, heads=heads, max_len=max_len, mlp_dim=mlp_dim, dropout=dropout,
                  num_inducing=num_inducing, num_seeds=num_seeds, layer_norm=layer_norm,
                  input_dim=input_dim, positions=positions, pooling=pooling)
    encoder = SetEncoder(vocab_size=vocab_size, input_dim=input_dim, dim=dim, depth=depth,
                         heads=heads, num_inducing=num_inducing, num_seeds=num_seeds,
                         hidden=mlp_dim or 4 * dim, layer_norm=layer_norm, dropout=dropout,
                         positions=positions, pooling=pooling, max_len=max_len)
    return SetTransformer(config, encoder, task, dim, num_classes, vocab_size, input_dim,
                          max_len, dropout)
