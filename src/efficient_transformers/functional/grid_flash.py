"""Attention over a union of lines of a 2-D grid, one FlashAttention call per piece.

The sequence (B, H, N, d), N = R·C, lies on a grid of R rows of C positions in raster order. A
*part* is attention along one axis of the grid (axis 1: within the query's row, axis 0: within
its column) with a rule along that axis (`axial.axis_relation`'s names, plus "not_before",
key >= query) and, along rows, an offset: query row r against key row r + offset. The parts of
`axial.axial_parts` are such parts (the previous row: axis 1, offset −1), and so is the Sparse
Transformer's strided pattern on the (N / l, l) grid.

Each rule is one or two *pieces*, each a FlashAttention call on square problems (n × n for lines
of n positions, batched over the lines): all keys; causal after slicing `gap` positions off
(key <= query − gap: q[gap:] against k[:n − gap]); or the same on the reversed axis (key >=
query + gap). One softmax over the union: the pieces' (out, lse) merge by log-sum-exp. Backward:
the gradient of softmax attention over a union, restricted to one piece's keys, is what that
piece's FlashAttention backward computes when it is handed the union's output and lse in place
of its own (it recomputes P = exp(s − lse) and uses D = rowsum(dO ∘ O)), so the pieces'
gradients add up. Saved: q, k, v, out, lse; nothing (lines, n, n) is kept, and on CUDA nothing
of that size is written either (on the CPU the flash kernel works in tiles as well).

`uses_grid_flash(q)` says where callers take it: on CUDA, where FlashAttention runs (bf16 /
fp16, head dim a multiple of 8 up to 256) and the explicit line path writes every (n × n) score
block several times over (axial and the strided Sparse Transformer at 64k bf16: 45 and 71 GiB
read + written per forward + backward by `bench/traffic.py`'s count). Not on the CPU, where
its flash kernel is not reliably faster on such short lines than the explicit path (2 threads,
fp32, N = 4k and 16k, forward + backward of the attention alone: 0.7–1.2× its time for the
sparse pattern, 0.8–1.6× for axial); `GRID_FLASH` forces it there (tests, the traffic
estimate). No key mask: callers with padding keep their masked path. Gradients of the pieces
add up in the input's dtype, as autograd adds up a tensor's uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .merge import merge_into_, stat_dtype

# rule along the axis -> pieces (direction, gap): "before" keeps key <= query − gap,
# "after" key >= query + gap, "all" every key
RULE_PIECES = {
    "all": (("all", 0),),
    "causal": (("before", 0),),
    "before": (("before", 1),),
    "far_before": (("before", 2),),
    "not_before": (("after", 0),),
    "other": (("before", 1), ("after", 1)),
    "far": (("before", 2), ("after", 2)),
}


@dataclass(frozen=True)
class Piece:
    axis: int        # 1: within rows, 0: within columns
    offset: int      # key line = query line + offset
    direction: str   # "all", "before" or "after"
    gap: int


def grid_pieces(parts) -> list[Piece]:
    """[(axis, rule, offset), ...] -> the FlashAttention pieces that cover them."""
    return [Piece(axis, offset, direction, gap)
            for axis, rule, offset in parts for direction, gap in RULE_PIECES[rule]]


GRID_FLASH: bool | None = None  # None: automatic (`uses_grid_flash`); True / False: forced


def grid_flash_available(q: torch.Tensor) -> bool:
    """True where `grid_flash_attention` can run for q (B, H, N, d): the CPU flash kernel takes
    every float dtype; CUDA's FlashAttention bf16 / fp16 with d a multiple of 8, at most 256,
    on an Ampere or newer GPU (compute capability 8.0)."""
    if not q.is_floating_point():
        return False
    if q.device.type == "cpu":
        return True
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 256
            and _cuda_flash(q.device))


_CUDA_FLASH: dict[int, bool] = {}  # device index -> FlashAttention runs there (asked once)


def _cuda_flash(device: torch.device) -> bool:
    """FlashAttention built in and the GPU Ampere or newer; asked once per device, so that a
    compiled caller reads a constant instead of calling into the driver."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _CUDA_FLASH:
        _CUDA_FLASH[index] = (torch.backends.cuda.is_flash_attention_available()
                              and torch.cuda.get_device_capability(index) >= (8, 0))
    return _CUDA_FLASH[index]


def uses_grid_flash(q: torch.Tensor, key_mask: torch.Tensor | None = None) -> bool:
    """True where a caller should take `grid_flash_attention` for q (B, H, N, d): no key mask,
    the kernel available, and on CUDA (or `GRID_FLASH` forced on)."""
    wanted = q.is_cuda if GRID_FLASH is None else GRID_FLASH
    return wanted and key_mask is None and grid_flash_available(q)


def _axes(t: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """t (B, H, N, e) -> its lines along each axis, views: (B·H, C, R, e) the columns (axis 0),
    (B·H, R, C, e) the rows (axis 1). Taken once per tensor, not per piece: every call is host
    time on a GPU."""
    rows = t.view(-1, *grid, t.shape[-1])
    return rows.transpose(1, 2), rows


def _region(axes, piece: Piece, role: str) -> torch.Tensor:
    """A tensor's `_axes` -> the positions of the piece's query ("q") or key ("k") lines as a
    view (B·H, lines, n, e), in grid order: rows paired by the offset, the gap sliced off the end
    that the direction leaves without keys (queries) or without queries (keys)."""
    t = axes[piece.axis]
    lines, n, gap = t.shape[1], t.shape[2], piece.gap
    if piece.offset:   # (slices only where they cut)
        early, late = max(-piece.offset, 0), max(piece.offset, 0)
        t = t[:, early:lines - late] if role == "q" else t[:, late:lines - early]
    if not gap:
        return t
    first = (role == "q") == (piece.direction == "before")   # keep the last n − gap positions
    return t[:, :, gap:] if first else t[:, :, :n - gap]


def _flipped(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """Lines (B·H, lines, n, ·) reversed along n for "after" pieces (key >= query + gap then
    reads key <= query − gap), else as they are; its own inverse: grid order <-> kernel order."""
    return t.flip(2) if piece.direction == "after" else t


def _lines(axes, piece: Piece, role: str) -> torch.Tensor:
    """The piece's lines as its kernel call takes them. A view unless reversed: the kernels take
    strided lines."""
    return _flipped(_region(axes, piece, role), piece)


def _flash_forward(q, k, v, causal: bool, scale: float):
    """-> (out, lse, what the CUDA backward needs)"""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = \
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                                scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                         scale=scale)
    return out, lse, None


def _flash_backward(d_out, q, k, v, out, lse, causal: bool, scale: float, aux):
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            d_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset,
            scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out, q, k, v, out, lse, 0.0, causal, scale=scale)


def _ordered(pieces, grid):
    """The pieces with at least one line and one position, those that cover every position
    first (no offset, no gap: the merge and the gradients start from them without a pass)."""
    live = [p for p in pieces
            if grid[p.axis] - p.gap > 0 and grid[1 - p.axis] - abs(p.offset) > 0]
    return sorted(live, key=lambda p: p.offset != 0 or p.gap != 0)


def _covers_all(piece: Piece) -> bool:
    return piece.offset == 0 and piece.gap == 0


class _GridFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, grid, pieces, scale):
        stat = stat_dtype(q.dtype)
        first_full = _covers_all(pieces[0])   # then it starts the merge: no zeros to fill
        out = (torch.empty if first_full else torch.zeros)(q.shape, dtype=stat,
                                                             device=q.device)  # (B, H, N, d)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=stat, device=q.device)  # (B, H, N)
        q_axes, k_axes, v_axes = (_axes(t, grid) for t in (q, k, v))
        out_axes, lse_axes = _axes(out, grid), _axes(lse[..., None], grid)
        auxes = []
        for index, piece in enumerate(pieces):
            part, part_lse, aux = _flash_forward(
                _lines(q_axes, piece, "q"), _lines(k_axes, piece, "k"),
                _lines(v_axes, piece, "k"), piece.direction != "all", scale)
            auxes.append(aux)
            acc, acc_lse = _region(out_axes, piece, "q"), _region(lse_axes, piece, "q")
            part, part_lse = _flipped(part, piece), _flipped(part_lse[..., None], piece)
            if index == 0 and first_full:
                acc.copy_(part)
                acc_lse.copy_(part_lse)
                continue
            merge_into_(acc, acc_lse, part, part_lse)   # each query of the piece has a key here
        out = out.to(q.dtype)
        ctx.grid, ctx.pieces, ctx.scale, ctx.auxes = grid, pieces, scale, auxes
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grid, pieces = ctx.grid, ctx.pieces
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        # the pieces' gradients add up in the input's dtype, as autograd adds a tensor's uses
        first_full = _covers_all(pieces[0])
        grads = [(torch.empty if first_full else torch.zeros)(t.shape, dtype=t.dtype,
                                                              device=t.device) for t in (q, k, v)]
        inputs = [_axes(t, grid) for t in (d_out, q, k, v, out, lse[..., None])]
        grad_axes = [_axes(t, grid) for t in grads]
        for index, (piece, aux) in enumerate(zip(pieces, ctx.auxes)):
            d_out_l, q_l, k_l, v_l, out_l, lse_l = (
                _lines(axes, piece, role) for axes, role in zip(inputs, "qqkkqq"))
            piece_grads = _flash_backward(d_out_l, q_l, k_l, v_l, out_l,
                                          lse_l[..., 0].contiguous(),   # FA2 reads it dense
                                          piece.direction != "all", ctx.scale, aux)
            for axes, g, role in zip(grad_axes, piece_grads, "qkk"):
                region, g = _region(axes, piece, role), _flipped(g, piece)
                if index == 0 and first_full:
                    region.copy_(g)
                else:
                    region.add_(g)
        return (*grads, None, None, None)


def grid_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, parts,
                         scale: float | None = None):
    """One softmax over the union of `parts` [(axis, rule, offset), ...] on the (R, C) grid,
    R·C = N, the parts disjoint. q, k, v (B, H, N, d) -> out (B, H, N, d), lse (B, H, N); only
    out is differentiable. Queries without keys: out 0, lse −inf."""
    if math.prod(grid) != q.shape[2] or len(grid) != 2:
        raise ValueError(f"grid: expected (rows, columns) covering N={q.shape[2]}, got {grid}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pieces = _ordered(grid_pieces(parts), grid)
    if not pieces:   # no query has a key
        return q.mul(0.0), q.new_full(q.shape[:3], float("-inf"), dtype=stat_dtype(q.dtype))
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _GridFlash.apply(q, k, v, tuple(grid), pieces, scale)
