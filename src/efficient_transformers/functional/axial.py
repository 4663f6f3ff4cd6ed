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

from .amp import autocast_free
from .backward import first_order_only
from .blocks import pad_mask_to_multiple, pad_to_multiple
from .merge import (
    attention_with_lse, masked_softmax_, merge_attention_parts, output_shift, softmax_grad_,
    stat_dtype,
)
from .scratch import Scratch


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


def axial_parts(shape: tuple[int, ...], causal: bool) -> list[tuple[int, str, bool]]:
    """The key sets of `axial_attention`, disjoint, as (axis, rule along it, previous_row).
    Non-causal: the last axis (the row) including the query, every other axis of size > 1 without
    the query's own coordinate. Causal: the row up to the query, strictly earlier coordinates along
    the other axes (two or more rows back along the rows-above axis), and the whole previous row
    (previous_row: query row r against key row r − 1 of the same plane)."""
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
            parts.append((axis, rule, False))
    if causal and len(shape) >= 2 and shape[-2] > 1:
        parts.append((last, "all", True))
    return parts


def _on_grid(q, k, v, shape, key_mask):
    """q, k, v (B, H, N, d) padded to the grid -> (q, k, v, grid shape, key mask (B, total) or
    None when every key is real)."""
    bsz, _, n, _ = q.shape
    shape = grid_shape(n, shape)
    total = math.prod(shape)
    mask = None
    if key_mask is not None or total > n:
        mask = pad_mask_to_multiple(key_mask, n, total, bsz, device=q.device)     # (B, total)
    q, k, v = (pad_to_multiple(t, total)[0] for t in (q, k, v))
    return q, k, v, shape, mask


FOLD_HEADS: bool | None = None   # None: automatic (`folds_heads`); True / False: forced (tests)


def folds_heads(q: torch.Tensor) -> bool:
    """True where `axial_attention` runs all heads at once (heads folded into the batch) rather
    than head by head: on CUDA. Head by head keeps the CPU's temporaries one head large (cache,
    memory); on a GPU each head's loop costs host time: a forward + backward of the default
    layer (8 heads) is 2109 aten calls head by head and 397 folded (causal: 3044 and 560;
    counted on the CPU), at eager PyTorch's ~18 µs per call (`bench/traffic.py`) a host floor
    of about 38 ms against 7."""
    return q.is_cuda if FOLD_HEADS is None else FOLD_HEADS


def axial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: tuple[int, ...],
                    causal: bool, key_mask: torch.Tensor | None = None, scale: float | None = None):
    """Axial attention with one softmax over the union of the query's lines (functional form of
    `patterns.Axial`), each key counted once: the key sets of `axial_parts`. Any N: the grid's
    leading axis is padded. -> out (B, H, N, d), lse (B, H, N), both differentiable.
    One autograd node (`_AxialAttention`), head by head or, where `folds_heads`, over the heads
    folded into the batch; `axial_attention_reference` is the same through autograd, part by
    part."""
    bsz, heads, n, d = q.shape
    q, k, v, shape, mask = _on_grid(q, k, v, shape, key_mask)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    total = q.shape[2]
    folded = heads > 1 and folds_heads(q)
    if folded:   # (B, H, N', d) -> (B·H, 1, N', d): one "head" per batch entry
        q, k, v = (t.reshape(bsz * heads, 1, total, d) for t in (q, k, v))
        if mask is not None:
            mask = mask[:, None].expand(bsz, heads, total).reshape(bsz * heads, total)
    out, lse = _AxialAttention.apply(q, k, v, shape, causal, mask, scale)
    if folded:
        out, lse = out.view(bsz, heads, total, d), lse.view(bsz, heads, total)
    return out[:, :, :n], lse[:, :, :n]


def axial_attention_reference(q, k, v, shape, causal, key_mask=None, scale=None):
    """`axial_attention` as attention_with_lse per part (`axis_attention`,
    `previous_row_attention`) merged by `merge_attention_parts` (for tests)."""
    bsz, _, n, _ = q.shape
    q, k, v, shape, mask = _on_grid(q, k, v, shape, key_mask)
    if mask is None:
        mask = torch.ones(bsz, q.shape[2], dtype=torch.bool, device=q.device)
    parts = [previous_row_attention(q, k, v, shape, mask, scale) if previous_row else
             axis_attention(q, k, v, shape, axis, axis_relation(shape[axis], rule, q.device), mask,
                            scale)
             for axis, rule, previous_row in axial_parts(shape, causal)]
    out, lse = merge_attention_parts(parts)
    return out[:, :, :n], lse[:, :, :n]


class _LinePart:
    """One part of the union for one head: lines (B, L..., s, ·) along `axis` of the grid — for
    the previous-row part, query row r against key row r − 1 of the flattened rows (B, R, w, ·) —
    and the keys it blocks: None, (s, s), or (B·L, s, s) bool. `index` names its scratch."""

    def __init__(self, index, shape, axis, rule, previous_row, key_mask, bsz, device):
        self.index, self.shape, self.axis, self.previous_row = index, shape, axis, previous_row
        self.size = s = shape[axis]
        relation = axis_relation(s, rule, device)                               # (s, s)
        real = None if key_mask is None else self.view(key_mask[..., None], "k")[..., 0]
        if previous_row:  # row r - 1 is above row r unless r starts a plane (3-D and up)
            rows = torch.arange(1, math.prod(shape[:-1]), device=device)
            above = (rows % shape[-2] != 0)[None, :, None]                      # (1, R-1, 1)
            real = above if real is None else real & above
        if real is None:
            self.blocked = None if rule == "all" else ~relation
        else:
            allowed = relation & real[..., None, :]                             # (B, L..., s, s)
            self.blocked = ~allowed.expand(bsz, *allowed.shape[1:]).reshape(-1, s, s)

    def view(self, t: torch.Tensor, role: str) -> torch.Tensor:
        """t (B, N, r) in position order -> its lines (B, L..., s, r), a view; role "q" or "k"."""
        b, r = t.shape[0], t.shape[-1]
        if self.previous_row:
            rows = t.view(b, -1, self.size, r)
            return rows[:, 1:] if role == "q" else rows[:, :-1]
        return t.view(b, *self.shape, r).movedim(1 + self.axis, -2)

    def lines(self, t: torch.Tensor, role: str, scratch: Scratch | None = None,
              name: str = "") -> torch.Tensor:
        """(B, N, r) -> (B·L, s, r) for bmm: a view where the line dimensions flatten (2-D
        grids, B = 1: bmm takes the strided lines as they are), else a copy (into scratch when
        given)."""
        view = self.view(t, role)
        shape = (-1, self.size, t.shape[-1])
        if _leading_dims_merge(view, view.dim() - 2):
            return view.view(shape)
        if scratch is None:
            return view.reshape(shape)
        return scratch(name, *view.shape).copy_(view).view(shape)

    def put_(self, dest: torch.Tensor, lines: torch.Tensor, role: str, add: bool = True) -> None:
        """dest (B, N, r) += lines (B·L, s, r) (add False: =), back in position order."""
        view = self.view(dest, role)
        (view.add_ if add else view.copy_)(lines.view(view.shape))

    def scores(self, ql, kl, stat, scratch: Scratch) -> torch.Tensor:
        """(B·L, s, s) scores of the already scaled query lines in `stat`, −inf where blocked."""
        out = torch.bmm(ql, kl.transpose(1, 2), out=scratch("scores", *ql.shape[:2], self.size))
        out = out.to(stat)
        return out if self.blocked is None else out.masked_fill_(self.blocked, float("-inf"))

    def attend(self, q, k, v, scratch: Scratch):
        """q (scaled), k, v (B, N, d) contiguous -> (out (B, N, d), lse (B, N)) of this part, in
        position order; queries without a line here: out 0, lse −inf."""
        b, n, d = q.shape
        kl = self.lines(k, "k", scratch, "k_lines")
        p, lse = masked_softmax_(self.scores(self.lines(q, "q", scratch, "q_lines"), kl,
                                             stat_dtype(q.dtype), scratch))     # (B·L, s, s)
        out_lines = torch.bmm(p.to(v.dtype), self.lines(v, "k", scratch, "v_lines"),
                              out=scratch(f"out{self.index}", *kl.shape))
        if not self.previous_row and self.axis == len(self.shape) - 1:
            return out_lines.view(b, n, d), lse.view(b, n)
        out = scratch(f"out{self.index}_positions", b, n, d).zero_()
        lse_out = lse.new_full((b, n, 1), float("-inf"))
        self.put_(out, out_lines, "q", add=False)
        self.put_(lse_out, lse, "q", add=False)
        return out, lse_out[..., 0]

    def backward_(self, q, k, v, d_out, lse, shift, d_q, d_k, d_v, scratch: Scratch):
        """Adds this part's share of the gradients to d_q / scale, d_k, d_v (B, N, d), given the
        scaled q, k, v, d_out (B, N, d) contiguous, the union's lse (B, N) (0 where −inf) and
        shift = rowsum(dO ∘ O) − dlse (B, N, 1)."""
        stat = lse.dtype
        ql, kl = self.lines(q, "q", scratch, "q_lines"), self.lines(k, "k", scratch, "k_lines")
        vl, gl = self.lines(v, "k", scratch, "v_lines"), self.lines(d_out, "q", scratch, "g_lines")
        p = self.scores(ql, kl, stat, scratch)
        p = p.sub_(self.lines(lse[..., None], "q")).exp_()           # the union's probabilities
        d_s = torch.bmm(gl, vl.transpose(1, 2), out=scratch("d_s", *p.shape)).to(stat)
        d_s = softmax_grad_(d_s, p, self.lines(shift, "q"), 1.0).to(q.dtype)
        for dest, a, bb, role in ((d_q, d_s, kl, "q"), (d_k, d_s.transpose(1, 2), ql, "k"),
                                  (d_v, p.to(v.dtype).transpose(1, 2), gl, "k")):
            self.put_(dest, torch.bmm(a, bb, out=scratch("d_lines", *kl.shape)), role)


@autocast_free
class _AxialAttention(torch.autograd.Function):
    """q, k, v (B, H, N, d), N = prod(shape) -> out (B, H, N, d), lse (B, H, N): one softmax over
    the union of `axial_parts`, head by head and part by part, on contiguous copies of one head
    and `Scratch` temporaries (B·L, s, s). The scale multiplies each head's q (B, N, d) once,
    not every part's scores (B·L, s, s), and d_q once at the end. Saved: q, k, v, out and lse
    only; backward recomputes each part's probabilities from the union's lse,
    P = exp(s − lse), and dS = P ∘ (dO vᵀ − rowsum(dO ∘ O) + dlse). out is a view of a
    (B, N, H, d) tensor, so merging the heads after it costs no copy."""

    @staticmethod
    def forward(ctx, q, k, v, shape, causal, key_mask, scale):
        bsz, heads, n, d = q.shape
        parts = [_LinePart(i, shape, *part, key_mask, bsz, q.device)
                 for i, part in enumerate(axial_parts(shape, causal))]
        scratch = Scratch(q)
        out = q.new_empty(bsz, n, heads, d)
        lse = q.new_empty(bsz, heads, n, dtype=stat_dtype(q.dtype))
        for h in range(heads):
            qh, kh, vh = _head(h, scratch, q=q, k=k, v=v)
            qh = torch.mul(qh, scale, out=scratch("q_scaled", *qh.shape))
            out[:, :, h], lse[:, h] = merge_attention_parts(
                [part.attend(qh, kh, vh, scratch) for part in parts])
        ctx.parts, ctx.scale = parts, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.transpose(1, 2), lse

    @staticmethod
    @first_order_only
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        bsz, heads, n, d = q.shape
        scratch = Scratch(q)
        grads = [torch.zeros(bsz, n, heads, d, dtype=t.dtype, device=t.device) for t in (q, k, v)]
        safe_lse = lse.masked_fill(torch.isinf(lse), 0.0)        # rows without keys: P = 0
        if d_out is None:
            d_out = out.new_zeros(bsz, heads, n, d)
        for h in range(heads):
            qh, kh, vh, gh = _head(h, scratch, q=q, k=k, v=v, g=d_out)
            qh = torch.mul(qh, ctx.scale, out=scratch("q_scaled", *qh.shape))
            shift = output_shift(gh, out[:, :, h], None if d_lse is None else d_lse[:, h],
                                 lse.dtype)                                     # (B, N, 1)
            for part in ctx.parts:
                part.backward_(qh, kh, vh, gh, safe_lse[:, h], shift,
                               *(t[:, :, h] for t in grads), scratch)
            grads[0][:, :, h].mul_(ctx.scale)
        return tuple(t.transpose(1, 2) for t in grads) + (None, None, None, None)


def _leading_dims_merge(t: torch.Tensor, count: int) -> bool:
    """True where t's first `count` dims flatten into one by a view (no copy): each (size > 1)
    dim's stride is the next one's stride times its size."""
    dims = [(t.shape[i], t.stride(i)) for i in range(count) if t.shape[i] != 1]
    return all(stride == inner_stride * inner_size
               for (_, stride), (inner_size, inner_stride) in zip(dims, dims[1:]))


def _head(h: int, scratch: Scratch, **tensors):
    """Head h of each (B, H, N, d) tensor as a contiguous (B, N, d): the view itself where it is
    contiguous (one head), else a scratch copy."""
    views = [(name, t[:, h]) for name, t in tensors.items()]
    return [view if view.is_contiguous() else scratch(name, *view.shape).copy_(view)
            for name, view in views]


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
