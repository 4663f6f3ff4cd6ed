"""Attention along one axis of a sequence laid out as an N-D grid in raster order.

A sequence of N positions with inner axes (s1, ..., sk) is viewed as (B, H, s0, s1, ..., sk, d),
s0 = ceil(N / (s1 ... sk)) (padded). Attention along axis a runs for every line of the grid at
once: one batched matmul of (s_a × s_a) scores per line, memory O(N · s_a), never N × N.

- Axial Transformer (Ho et al. 2019, section 3): one part per axis, merged into one softmax.
- Sparse Transformer strided pattern (Child et al. 2019, section 4.2): the "every stride-th
  position" component is column attention over the (N / stride, stride) view.

Each part returns (out (B, H, N, d), lse (B, H, N)) for `merge.merge_attention_parts`.
"""

from __future__ import annotations

import math

import torch

from .blocks import pad_mask_to_multiple, pad_to_multiple
from .merge import attention_with_lse, merge_attention_parts


def grid_shape(n: int, shape=None) -> tuple[int, ...]:
    """The grid a length-n sequence is laid on: `shape` with its leading axis grown to cover n, or,
    with shape None, the nearest square covering n: width ceil(sqrt(n)), height ceil(n / width)."""
    if shape is None:
        width = max(1, math.isqrt(n - 1) + 1) if n > 1 else 1
        return (-(-n // width), width)
    inner = math.prod(shape[1:])
    return (max(shape[0], -(-n // inner)),) + tuple(shape[1:])


def axis_relation(size: int, rule: str, device=None) -> torch.Tensor:
    """(size, size) bool over coordinates along one axis, [query, key]: "all", "causal" (j <= i),
    "before" (j < i), "other" (j != i), "far" (|i - j| >= 2), "far_before" (i - j >= 2)."""
    i = torch.arange(size, device=device)[:, None]
    j = torch.arange(size, device=device)[None, :]
    rules = {"all": lambda: torch.ones(size, size, dtype=torch.bool, device=device),
             "causal": lambda: j <= i, "before": lambda: j < i, "other": lambda: j != i,
             "far": lambda: (i - j).abs() >= 2, "far_before": lambda: i - j >= 2}
    return rules[rule]()


def axis_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: tuple[int, ...],
                   axis: int, relation: torch.Tensor, key_mask: torch.Tensor,
                   scale: float | None = None):
    """Attention along `axis` of the grid `shape` (prod(shape) = N): query and key share every
    other coordinate; `relation` (s_a, s_a) bool selects keys along the axis; key_mask (B, N).
    q, k, v (B, H, N, d) -> out (B, H, N, d), lse (B, H, N)."""
    bsz, h, n, d = q.shape
    dim = 2 + axis

    def lines(t):  # (B, H, N, d) -> (B, H, ..., s_a, d) with the axis second to last
        return t.view(bsz, h, *shape, d).movedim(dim, -2)

    real = key_mask.view(bsz, *shape).movedim(1 + axis, -1)                        # (B, ..., s_a)
    allowed = relation & real[:, None, ..., None, :]                               # (B, 1, ..., s_a, s_a)
    out, lse = attention_with_lse(lines(q), lines(k), lines(v), allowed, scale=scale)
    out = out.movedim(-2, dim).reshape(bsz, h, n, d)
    lse = lse.movedim(-1, dim).reshape(bsz, h, n)
    return out, lse


def axial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: tuple[int, ...],
                    causal: bool, key_mask: torch.Tensor | None = None, scale: float | None = None):
    """Axial attention with one softmax over the union of the query's lines (functional form of
    `patterns.Axial`), each key counted once. Non-causal: the last axis (the row) including the
    query, every other axis without the query's own coordinate. Causal: the row up to the query,
    strictly earlier coordinates along the other axes, and the whole previous row (the rows-above
    axis then skips that row). Any N: the grid's leading axis is padded.
    -> out (B, H, N, d), lse (B, H, N)."""
    bsz, h, n, d = q.shape
    shape = grid_shape(n, shape)
    total = math.prod(shape)
    mask = pad_mask_to_multiple(key_mask, n, total, bsz, device=q.device)         # (B, total)
    q, k, v = (pad_to_multiple(t, total)[0] for t in (q, k, v))
    last = len(shape) - 1
    parts = []
    for axis, size in enumerate(shape):
        if axis == last:
            rule = "causal" if causal else "all"
        elif causal:
            rule = "far_before" if axis == last - 1 else "before"
        else:
            rule = "other"
        if axis == last or size > 1:
            parts.append(axis_attention(q, k, v, shape, axis, axis_relation(size, rule, q.device),
                                        mask, scale))
    if causal and len(shape) >= 2 and shape[-2] > 1:
        parts.append(previous_row_attention(q, k, v, shape, mask, scale))
    out, lse = merge_attention_parts(parts)
    return out[:, :, :n], lse[:, :, :n]


def previous_row_attention(q, k, v, shape, mask, scale=None):
    """Every query attends to the whole previous row (second-to-last coordinate one less, other
    coordinates equal): row attention against the keys shifted down by one row."""
    bsz, h, total, d = q.shape
    width = shape[-1]
    pos = torch.arange(total, device=q.device)
    has_row_above = torch.div(pos, width, rounding_mode="floor") % shape[-2] >= 1     # (total,)
    shifted_mask = torch.nn.functional.pad(mask, (width, 0), value=False)[:, :total] & has_row_above
    k_above, v_above = (torch.nn.functional.pad(t, (0, 0, width, 0))[:, :, :total] for t in (k, v))
    return axis_attention(q, k_above, v_above, shape, len(shape) - 1,
                          axis_relation(width, "all", q.device), shifted_mask, scale)


def strided_column_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int,
                             rule: str, key_mask: torch.Tensor | None = None,
                             scale: float | None = None):
    """Keys j with (i - j) mod stride = 0, selected along the column by `rule` (see
    `axis_relation`): column attention over the (N / stride, stride) view. -> out, lse."""
    bsz, h, n, d = q.shape
    mask = pad_mask_to_multiple(key_mask, n, stride, bsz, device=q.device)
    q, k, v = (pad_to_multiple(t, stride)[0] for t in (q, k, v))
    rows = q.shape[2] // stride
    out, lse = axis_attention(q, k, v, (rows, stride), 0, axis_relation(rows, rule, q.device),
                              mask, scale)
    return out[:, :, :n], lse[:, :, :n]
