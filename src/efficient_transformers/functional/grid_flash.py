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
query + gap). One softmax over the union: the pieces' (out, lse) merge by log-sum-exp, the
union's lse first (small), then out = Σ_p exp(lse_p − lse) out_p, one pass per piece into a
float32 sum (the pieces' outputs live until then: one (B, H, N, d) tensor each). Backward:
the gradient of softmax attention over a union, restricted to one piece's keys, is what that
piece's FlashAttention backward computes when it is handed the union's output and lse in place
of its own (it recomputes P = exp(s − lse) and uses D = rowsum(dO ∘ O)), so the pieces'
gradients add up. Saved: q, k, v, out, lse; nothing (lines, n, n) is kept, and on CUDA nothing
of that size is written either (on the CPU the flash kernel works in tiles as well).

A reversed piece ("after") costs a reversed copy of q, k, v, out and lse, forward and backward
(28 copies for the non-causal strided union: 3 of its 15 GiB at 64k bf16 by `bench/traffic.py`).
So a column rule that leaves out only keys the row parts have ("other": the query's own
position; "far": also the same column one row up and down) runs as the whole column instead,
one piece, not reversed (`shared_form`, `SHARED_KEYS`). A neighbouring row's part then leaves
that column out where its rule has such a form ("causal" -> "before", "not_before" -> "after",
still one piece); a key left in two parts (the query's own position) is *shared*, and its second
count is taken out afterwards: key i + δ for each shared offset δ. The non-causal strided union
becomes 4 pieces, one reversed, one shared offset (was 5 and 2); non-causal axial 2 pieces, none
reversed (was 3 and 1). With lse₂ the union's log-sum-exp with the shared keys twice and
w_δ = exp(s_{i,i+δ} − lse₂), the union's is lse = lse₂ + log(1 − Σ w_δ); Σ w_δ <= 1/2 (each
shared key is also in the sum once more), so nothing cancels badly. The output is then summed
with the union's weights, the second counts subtracted: out = Σ_p exp(lse_p − lse) out_p −
Σ_δ exp(s_δ − lse) v_{i+δ}. The backward subtracts each shared pair's second gradient,
from P_{i,i+δ} = exp(s − lse): dv_j −= P dO_i, dq_i −= scale·dS k_j, dk_j −= scale·dS q_i,
dS = P (dO_i·v_j − rowsum(dO_i ∘ out_i)). The scores s_{i,i+δ} are row dot products, multiplied
in the input's dtype and summed in float32 (in bf16 the products are rounded, as the output is).

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

from .amp import autocast_free
from .backward import first_order_only
from .flash import flash_available, flash_backward, flash_forward
from .merge import stat_dtype

# rule along the axis -> pieces (direction, gap): "before" keeps key <= query − gap,
# "after" key >= query + gap, "all" every key
RULE_PIECES = {
    "all": (("all", 0),),
    "causal": (("before", 0),),
    "before": (("before", 1),),
    "far_before": (("before", 2),),
    "not_before": (("after", 0),),
    "after": (("after", 1),),
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


# a column rule -> the row offsets of the keys it leaves out that "all" would add
COLUMN_EXCLUDES = {"other": (0,), "far": (-1, 0, 1)}
HAS_OWN_COLUMN = ("all", "causal", "not_before")   # row rules that keep key column == query's
WITHOUT_OWN_COLUMN = {"causal": "before", "not_before": "after"}   # the same, that column left
SHARED_KEYS = True   # False: every rule as its own pieces (the reference of the shared form)


def shared_form(parts, columns: int):
    """[(axis, rule, offset), ...] disjoint -> (parts, shared key offsets), the same union with
    fewer pieces: each column rule of COLUMN_EXCLUDES whose left-out keys (row offset Δ, same
    column) all lie in row parts becomes "all"; a neighbouring row's part then leaves that column
    out (one piece either way) where its rule has such a form, else the key is shared (in two
    parts) and its sequence offset Δ·C listed."""
    if not SHARED_KEYS:
        return list(parts), ()
    rows = {offset: rule for axis, rule, offset in parts if axis == 1}
    rewritten, shared = {}, []
    for axis, rule, offset in parts:
        excluded = COLUMN_EXCLUDES.get(rule, ()) if axis == 0 and offset == 0 else ()
        if not excluded or any(rows.get(delta) not in HAS_OWN_COLUMN for delta in excluded):
            continue
        rewritten[(axis, rule, offset)] = (0, "all", 0)
        for delta in excluded:
            if delta and rows[delta] in WITHOUT_OWN_COLUMN:
                rewritten[(1, rows[delta], delta)] = (1, WITHOUT_OWN_COLUMN[rows[delta]], delta)
            else:
                shared.append(delta * columns)
    return [rewritten.get(part, part) for part in parts], tuple(sorted(set(shared)))


GRID_FLASH: bool | None = None  # None: automatic (`uses_grid_flash`); True / False: forced


def uses_grid_flash(q: torch.Tensor, key_mask: torch.Tensor | None = None) -> bool:
    """True where a caller should take `grid_flash_attention` for q (B, H, N, d): no key mask,
    the kernel available, and on CUDA (or `GRID_FLASH` forced on)."""
    wanted = q.is_cuda if GRID_FLASH is None else GRID_FLASH
    return wanted and key_mask is None and flash_available(q)


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


def _ordered(pieces, grid):
    """The pieces with at least one line and one position, those that cover every position
    first (no offset, no gap: the merge and the gradients start from them without a pass)."""
    live = [p for p in pieces
            if grid[p.axis] - p.gap > 0 and grid[1 - p.axis] - abs(p.offset) > 0]
    return sorted(live, key=lambda p: p.offset != 0 or p.gap != 0)


def _covers_all(piece: Piece) -> bool:
    return piece.offset == 0 and piece.gap == 0


def _shared_pairs(n: int, shared):
    """(δ, a, b) per shared offset: queries a <= i < b have the key i + δ."""
    return [(delta, max(0, -delta), min(n, n - delta)) for delta in shared
            if max(0, -delta) < min(n, n - delta)]


def _row_dots(x: torch.Tensor, y: torch.Tensor, stat) -> torch.Tensor:
    """(B, H, n, e) twice -> rowwise dot products (B, H, n) in `stat`."""
    return torch.mul(x, y).sum(-1, dtype=stat)


def _shared_scores(q, k, pairs, scale, stat) -> list[torch.Tensor]:
    """The shared pairs' scores s_{i,i+δ} (B, H, b − a) per pair, in `stat`."""
    return [_row_dots(q[:, :, a:b], k[:, :, a + delta:b + delta], stat).mul_(scale)
            for delta, a, b in pairs]


def _count_shared_once_(lse, pairs, scores) -> None:
    """In place: lse (B, H, N) of the union with each shared key twice -> of the union:
    lse + log(1 − Σ_δ exp(s_δ − lse)), the sum at most 1/2."""
    removed = torch.zeros_like(lse)                                   # Σ_δ w_δ  (B, H, N)
    for (delta, a, b), s in zip(pairs, scores):
        removed[:, :, a:b].add_(torch.exp(s - lse[:, :, a:b]))
    lse.add_(removed.neg_().log1p_())


def _remove_shared_grads_(grads, d_out, q, k, v, out, lse, pairs, scores, scale) -> None:
    """In place in grads (dq, dk, dv): take out the second count of each shared pair."""
    d_q, d_k, d_v = grads
    stat = lse.dtype
    shift = _row_dots(d_out, out, stat)                               # rowsum(dO ∘ O) (B, H, N)
    for (delta, a, b), s in zip(pairs, scores):
        rows, keys = slice(a, b), slice(a + delta, b + delta)
        p = torch.exp(s - lse[:, :, rows])                            # P_{i,i+δ} (B, H, b − a)
        d_v[:, :, keys].addcmul_(d_out[:, :, rows], p[..., None], value=-1.0)
        d_s = (_row_dots(d_out[:, :, rows], v[:, :, keys], stat) - shift[:, :, rows]).mul_(p)
        d_s = d_s.mul_(scale)[..., None]
        d_q[:, :, rows].addcmul_(k[:, :, keys], d_s, value=-1.0)
        d_k[:, :, keys].addcmul_(q[:, :, rows], d_s, value=-1.0)


def _grid_order(lines: torch.Tensor, axis: int, shape) -> torch.Tensor:
    """A whole-grid piece's tensor (B·H, lines, n, e) along `axis` -> (B, H, N, e) in grid order
    (a view for rows where the kernel wrote it dense, else a copy)."""
    return (lines if axis == 1 else lines.transpose(1, 2)).reshape(shape)


@autocast_free
class _GridFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, grid, pieces, shared, scale):
        stat = stat_dtype(q.dtype)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=stat, device=q.device)  # (B, H, N)
        q_axes, k_axes, v_axes = (_axes(t, grid) for t in (q, k, v))
        lse_axes = _axes(lse[..., None], grid)
        auxes, parts = [], []
        for piece in pieces:   # every piece first: the union's lse, then one weight per piece
            part, part_lse, aux = flash_forward(
                _lines(q_axes, piece, "q"), _lines(k_axes, piece, "k"),
                _lines(v_axes, piece, "k"), piece.direction != "all", scale)
            auxes.append(aux)
            part, part_lse = _flipped(part, piece), _flipped(part_lse[..., None], piece)
            acc_lse = _region(lse_axes, piece, "q")
            acc_lse.copy_(torch.logaddexp(acc_lse, part_lse))
            parts.append((part, part_lse))
        ctx.pairs = _shared_pairs(q.shape[2], shared)
        ctx.shared_scores = _shared_scores(q, k, ctx.pairs, scale, stat)
        _count_shared_once_(lse, ctx.pairs, ctx.shared_scores)
        # out = Σ_p exp(lse_p − lse) out_p − Σ_δ exp(s_δ − lse) v_{i+δ}: one pass per piece
        first_full = _covers_all(pieces[0])   # then it starts the sum: no zeros to fill
        out = (torch.empty if first_full else torch.zeros)(q.shape, dtype=stat,
                                                             device=q.device)  # (B, H, N, d)
        out_axes = _axes(out, grid)
        for index, (piece, (part, part_lse)) in enumerate(zip(pieces, parts)):
            acc = _region(out_axes, piece, "q")
            weight = torch.exp(part_lse - _region(lse_axes, piece, "q"))
            if index == 0 and first_full:
                torch.mul(part, weight, out=acc)
            else:
                acc.addcmul_(part, weight)   # each query of the piece has a key here
        del parts
        for (delta, a, b), s in zip(ctx.pairs, ctx.shared_scores):
            out[:, :, a:b].addcmul_(v[:, :, a + delta:b + delta],
                                    torch.exp(s - lse[:, :, a:b])[..., None], value=-1.0)
        out = out.to(q.dtype)
        ctx.grid, ctx.pieces, ctx.scale, ctx.auxes = grid, pieces, scale, auxes
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @first_order_only
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grid, pieces = ctx.grid, ctx.pieces
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        # the pieces' gradients add up in the input's dtype, as autograd adds a tensor's uses;
        # a first piece that covers every position starts the sums with its own gradients
        grads = None if _covers_all(pieces[0]) else [torch.zeros_like(t) for t in (q, k, v)]
        inputs = [_axes(t, grid) for t in (d_out, q, k, v, out, lse[..., None])]
        for piece, aux in zip(pieces, ctx.auxes):
            d_out_l, q_l, k_l, v_l, out_l, lse_l = (
                _lines(axes, piece, role) for axes, role in zip(inputs, "qqkkqq"))
            piece_grads = flash_backward(d_out_l, q_l, k_l, v_l, out_l,
                                          lse_l[..., 0].contiguous(),   # FA2 reads it dense
                                          piece.direction != "all", ctx.scale, aux)
            if grads is None:
                grads = [_grid_order(g, piece.axis, t.shape)
                         for g, t in zip(piece_grads, (q, k, v))]
                continue
            for t, g, role in zip(grads, piece_grads, "qkk"):
                _region(_axes(t, grid), piece, role).add_(_flipped(g, piece))
        if ctx.pairs:
            _remove_shared_grads_(grads, d_out, q, k, v, out, lse, ctx.pairs, ctx.shared_scores,
                                  ctx.scale)
        return (*grads, None, None, None, None)


def grid_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, parts,
                         scale: float | None = None):
    """One softmax over the union of `parts` [(axis, rule, offset), ...] on the (R, C) grid,
    R·C = N, the parts disjoint. q, k, v (B, H, N, d) -> out (B, H, N, d), lse (B, H, N); only
    out is differentiable. Queries without keys: out 0, lse −inf."""
    if math.prod(grid) != q.shape[2] or len(grid) != 2:
        raise ValueError(f"grid: expected (rows, columns) covering N={q.shape[2]}, got {grid}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    parts, shared = shared_form(parts, grid[1])
    pieces = _ordered(grid_pieces(parts), grid)
    if not pieces:   # no query has a key
        return q.mul(0.0), q.new_full(q.shape[:3], float("-inf"), dtype=stat_dtype(q.dtype))
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _GridFlash.apply(q, k, v, tuple(grid), pieces, shared, scale)
