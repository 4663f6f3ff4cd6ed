"""Fixed attention patterns as pure functions, and attention through them.

A `Pattern` answers two questions:
- `allows(i, j)`: may query position i attend to key position j? (elementwise on broadcast
  integer tensors; the same function drives the dense oracle mask, the CPU block path and the
  FlexAttention `mask_mod`)
- `key_blocks(n_blocks, block)`: for each query block, which key blocks can hold an allowed key
  ((nq, K) or (H, nq, K) long, -1 = unused slot). This bounds the cost at O(N · K · b).

`pattern_attention` pads N to a block multiple, gathers the key blocks, and masks with
`allows(i, j) & key_mask[j]`. `dense_pattern_mask` (tests and pictures only) materialises N × N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blocks import (at_most, block_sparse_attention, key_positions, pad_mask_to_multiple,
                     pad_to_multiple)


class Pattern:
    """Base class; subclasses are frozen dataclasses (hashable: they key the mask caches)."""

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def key_blocks(self, n_blocks: int, block: int, device=None) -> torch.Tensor:
        raise NotImplementedError

    def earliest_key(self, length: int) -> int:
        """Causal decode: the first key position a query at or after `length` may see (0 = all)."""
        return 0


def unique_blocks(candidates: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(..., nq, K) candidate block ids -> same shape with out-of-range and repeated ids set to -1,
    so that no key block is gathered twice for one query block."""
    valid = (candidates >= 0) & (candidates < n_blocks)
    c = torch.where(valid, candidates, torch.full_like(candidates, -1))
    sorted_c, _ = c.sort(dim=-1)
    repeat = torch.zeros_like(sorted_c, dtype=torch.bool)
    repeat[..., 1:] = sorted_c[..., 1:] == sorted_c[..., :-1]
    return torch.where(repeat, torch.full_like(sorted_c, -1), sorted_c)


def window_reach(window: int, block: int, n_blocks: int) -> int:
    """Key blocks a window of `window` positions reaches on one side, at most the n_blocks - 1
    there are (a window beyond the sequence costs what the sequence allows)."""
    return at_most(math.ceil(window / block), n_blocks - 1)


@dataclass(frozen=True)
class LocalWindow(Pattern):
    """|i - j| <= window (causal: 0 <= i - j <= window)."""

    window: int
    causal: bool = False

    def allows(self, i, j):
        ok = (i - j).abs() <= self.window if not self.causal else (i - j >= 0) & (i - j <= self.window)
        return ok

    def key_blocks(self, n_blocks, block, device=None):
        reach = window_reach(self.window, block, n_blocks)
        q = torch.arange(n_blocks, device=device)[:, None]
        lo = -reach
        hi = 0 if self.causal else reach
        return unique_blocks(q + torch.arange(lo, hi + 1, device=device), n_blocks)

    def earliest_key(self, length):
        return max(0, length - self.window) if self.causal else 0


def dense_pattern_mask(pattern: Pattern, n: int, device=None) -> torch.Tensor:
    """(N, N) or (H, N, N) bool of `pattern` (tests and pictures only: materialises N × N)."""
    i = torch.arange(n, device=device)
    ok = pattern.allows(i[:, None], i[None, :])
    return ok.expand(*ok.shape[:-2], n, n)


def pattern_allowed(pattern: Pattern, key_blocks: torch.Tensor, block: int, n: int,
                    key_mask: torch.Tensor) -> torch.Tensor:
    """Mask for `block_sparse_attention`: (B, H|1, nq, b, K*b) bool.

    key_mask: (B, Np) with Np the padded length (False past n). Padded and unused key slots are
    excluded; a query that is itself padding may see its whole gathered window (keeps rows
    non-empty, its output is discarded).
    """
    n_padded = key_mask.shape[1]
    nq = n_padded // block
    q_pos = torch.arange(n_padded, device=key_mask.device).view(nq, block)      # (nq, b)
    k_pos = key_positions(key_blocks, block)                                     # (..., nq, K*b)
    slot_ok = (key_blocks >= 0).repeat_interleave(block, dim=-1)                 # (..., nq, K*b)
    ok = pattern.allows(q_pos[:, :, None], k_pos[..., None, :]) & slot_ok[..., None, :]
    if ok.dim() == 3:
        ok = ok[None]                                                            # (H|1, nq, b, K*b)
    real_key = key_mask[:, k_pos.clamp_min(0)]                                   # (B, ..., nq, K*b)
    if real_key.dim() == 3:
        real_key = real_key[:, None]
    allowed = ok[None] & real_key[:, :, :, None, :]                              # (B, H|1, nq, b, K*b)
    padded_query = ~key_mask.view(-1, 1, nq, block, 1)
    return allowed | padded_query


def pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                      block: int, key_mask: torch.Tensor | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """Attention restricted to `pattern`: q, k, v (B, H, N, d) -> (B, H, N, d), any N."""
    bsz, _, n, _ = q.shape
    if key_mask is None and n % block == 0:    # no padding at all: the pattern alone
        key_blocks = pattern.key_blocks(n // block, block, device=q.device)
        allowed = pattern_only_allowed(pattern, key_blocks, block)
        return block_sparse_attention(q, k, v, key_blocks, allowed, block, scale=scale)
    mask = pad_mask_to_multiple(key_mask, n, block, bsz, device=q.device)       # (B, Np)
    q, _ = pad_to_multiple(q, block)
    k, _ = pad_to_multiple(k, block)
    v, _ = pad_to_multiple(v, block)
    key_blocks = pattern.key_blocks(mask.shape[1] // block, block, device=q.device)
    allowed = pattern_allowed(pattern, key_blocks, block, n, mask)
    return block_sparse_attention(q, k, v, key_blocks, allowed, block, scale=scale)[:, :, :n]


def pattern_only_allowed(pattern: Pattern, key_blocks: torch.Tensor, block: int) -> torch.Tensor:
    """`pattern_allowed` without padding: (1, H|1, nq, b, K*b) bool, unused slots excluded."""
    nq = key_blocks.shape[-2]
    q_pos = torch.arange(nq * block, device=key_blocks.device).view(nq, block)
    k_pos = key_positions(key_blocks, block)
    slot_ok = (key_blocks >= 0).repeat_interleave(block, dim=-1)
    ok = pattern.allows(q_pos[:, :, None], k_pos[..., None, :]) & slot_ok[..., None, :]
    return ok[None] if ok.dim() == 4 else ok[None, None]


# ------------------------------------------------------------------------------------------
# More fixed patterns. Every `allows` includes causality (j <= i) when the pattern is causal,
# so the same predicate is the oracle mask, the CPU block mask, the decode mask and the
# FlexAttention mask_mod. `earliest_key(length)`: the first key position any query at or after
# `length` can see (what a causal decode must keep); 0 = everything.


@dataclass(frozen=True)
class BlockLocal(Pattern):
    """Attention within non-overlapping blocks of `block` (causal: j <= i inside the block).
    The local attention of Liu et al. 2018 (section 4.2.4) and the Sparse Transformer's fixed
    A(1) = {j : floor(j/l) = floor(i/l)} (Child et al. 2019, section 4.2)."""

    block: int
    causal: bool = False

    def allows(self, i, j):
        ok = torch.div(i, self.block, rounding_mode="floor") == torch.div(j, self.block, rounding_mode="floor")
        return ok & (j <= i) if self.causal else ok

    def key_blocks(self, n_blocks, block, device=None):
        if block != self.block:
            raise ValueError(f"block: BlockLocal({self.block}) needs block={self.block}, got {block}")
        return torch.arange(n_blocks, device=device)[:, None]

    def earliest_key(self, length):
        return (length // self.block) * self.block


@dataclass(frozen=True)
class ImageLocal1D(Pattern):
    """Local 1-D attention of the Image Transformer (Parmar et al. 2018, section 3.2): the
    sequence is cut into query blocks of `block`; block [s, s + block) attends to its own positions
    and a memory flank of `window` positions before it, [s - window, s + block). Causal: also
    j <= i. Non-causal (an encoder, not in the paper's generative model): the flank is on both
    sides, [s - window, s + block + window), so window >= N is full attention."""

    block: int
    window: int
    causal: bool = False

    def allows(self, i, j):
        start = torch.div(i, self.block, rounding_mode="floor") * self.block
        end = start + self.block + (0 if self.causal else self.window)
        ok = (j >= start - self.window) & (j < end)
        return ok & (j <= i) if self.causal else ok

    def key_blocks(self, n_blocks, block, device=None):
        if block != self.block:
            raise ValueError(f"block: ImageLocal1D({self.block}) needs block={self.block}, got {block}")
        reach = window_reach(self.window, block, n_blocks)
        q = torch.arange(n_blocks, device=device)[:, None]
        return unique_blocks(q + torch.arange(-reach, (0 if self.causal else reach) + 1, device=device),
                             n_blocks)

    def earliest_key(self, length):
        return max(0, (length // self.block) * self.block - self.window)


@dataclass(frozen=True)
class ImageLocal2D(Pattern):
    """Local 2-D attention of the Image Transformer (Parmar et al. 2018, section 3.2) over an image
    of width `width` in raster order: rectangular query blocks of `query_shape` (hq, wq); a block
    attends to its rectangle extended by the memory flange (hm, wm): hm rows above (causal) or
    above and below (non-causal), wm columns left and right. Causal: also j <= i in raster order
    (the paper orders pixels block by block; we keep plain raster order so that the sequence
    position is the generation order, and mask the memory block with it)."""

    width: int
    query_shape: tuple[int, int]
    memory_flange: tuple[int, int]
    causal: bool = False

    def allows_rc(self, r, c, r2, c2):
        hq, wq = self.query_shape
        hm, wm = self.memory_flange
        top = torch.div(r, hq, rounding_mode="floor") * hq
        left = torch.div(c, wq, rounding_mode="floor") * wq
        bottom = top + hq + (0 if self.causal else hm)
        return (r2 >= top - hm) & (r2 < bottom) & (c2 >= left - wm) & (c2 < left + wq + wm)

    def allows(self, i, j):
        w = self.width
        r, c = torch.div(i, w, rounding_mode="floor"), i % w
        r2, c2 = torch.div(j, w, rounding_mode="floor"), j % w
        ok = self.allows_rc(r, c, r2, c2)
        return ok & (j <= i) if self.causal else ok

    def earliest_key(self, length):
        hq, hm = self.query_shape[0], self.memory_flange[0]
        top = ((length // self.width) // hq) * hq
        return max(0, (top - hm) * self.width)


@dataclass(frozen=True)
class Strided(Pattern):
    """The Sparse Transformer's strided pattern (Child et al. 2019, section 4.2):
    A(1) = the previous `stride` positions (i - stride <= j <= i), A(2) = {j : (i - j) mod stride = 0}.
    `part`: "union" (merged head), "local" (A1) or "column" (A2). Non-causal: both directions."""

    stride: int
    causal: bool = False
    part: str = "union"

    def allows(self, i, j):
        local = (i - j).abs() <= self.stride
        column = (i - j) % self.stride == 0
        ok = {"union": local | column, "local": local, "column": column}[self.part]
        return ok & (j <= i) if self.causal else ok

    def earliest_key(self, length):
        return max(0, length - self.stride) if self.part == "local" else 0


@dataclass(frozen=True)
class Fixed(Pattern):
    """The Sparse Transformer's fixed pattern (Child et al. 2019, section 4.2):
    A(1) = {j : floor(j/l) = floor(i/l)} (own block), A(2) = {j : j mod l in [l - c, l)} (the last
    c = `summary` positions of every block), l = `stride`. `part`: "union", "block" or "summary"."""

    stride: int
    summary: int
    causal: bool = False
    part: str = "union"

    def allows(self, i, j):
        l = self.stride
        block = torch.div(i, l, rounding_mode="floor") == torch.div(j, l, rounding_mode="floor")
        summary = j % l >= l - self.summary
        ok = {"union": block | summary, "block": block, "summary": summary}[self.part]
        return ok & (j <= i) if self.causal else ok

    def earliest_key(self, length):
        return (length // self.stride) * self.stride if self.part == "block" else 0


@dataclass(frozen=True)
class Axial(Pattern):
    """Axial attention (Ho et al. 2019, sections 3 and 4) over an input of `shape` in raster order,
    all axes in one head: j is allowed iff it differs from i in at most one coordinate.

    Causal: also j <= i, i.e. the masked row (last axis) plus the earlier positions along every
    other axis (for 2-D: the column restricted to the rows above), and the whole previous row
    (second-to-last coordinate one less, any last coordinate): the counterpart of the paper's
    outer decoder, whose unmasked row attention over the rows above lets a pixel see the pixels
    above and to its right; without it no stack of layers would reach them. The leading axis
    may be longer than shape[0]."""

    shape: tuple[int, ...]
    causal: bool = False

    def coordinates(self, i):
        """Coordinates of raster positions, in axis order (the leading one unbounded)."""
        coords, stride = [], 1
        for size in reversed(self.shape[1:]):
            coords.append(torch.div(i, stride, rounding_mode="floor") % size)
            stride *= size
        coords.append(torch.div(i, stride, rounding_mode="floor"))
        return coords[::-1]

    def allows(self, i, j):
        ci, cj = self.coordinates(i), self.coordinates(j)
        differ = [(a != b).to(torch.int8) for a, b in zip(ci, cj)]
        ok = sum(differ) <= 1
        if not self.causal:
            return ok
        ok = ok & (j <= i)
        if len(self.shape) >= 2:
            previous_row = cj[-2] == ci[-2] - 1
            for axis in range(len(self.shape) - 2):
                previous_row = previous_row & (differ[axis] == 0)
            ok = ok | previous_row
        return ok


# ------------------------------------------------------------------------- parts and decode


def pattern_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               pattern: Pattern, block: int, key_mask: torch.Tensor | None = None,
                               scale: float | None = None):
    """`pattern_attention` that also returns the row log-sum-exp (B, H, N), for merging parts."""
    from .blocks import gather_key_blocks
    from .merge import attention_with_lse

    bsz, h, n, d = q.shape
    mask = pad_mask_to_multiple(key_mask, n, block, bsz, device=q.device)       # (B, Np)
    q, _ = pad_to_multiple(q, block)
    k, _ = pad_to_multiple(k, block)
    v, _ = pad_to_multiple(v, block)
    n_padded = q.shape[2]
    key_blocks = pattern.key_blocks(n_padded // block, block, device=q.device)
    allowed = pattern_allowed(pattern, key_blocks, block, n, mask)              # (B, H|1, nq, b, Kb)
    kg = gather_key_blocks(k, key_blocks, block)                                 # (B, H, nq, Kb, d)
    vg = gather_key_blocks(v, key_blocks, block)
    qb = q.view(bsz, h, n_padded // block, block, d)
    out, lse = attention_with_lse(qb, kg, vg, allowed, scale=scale)
    return out.reshape(bsz, h, n_padded, d)[:, :, :n], lse.reshape(bsz, h, n_padded)[:, :, :n]


def pattern_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                             q_start: int, k_start: int, scale: float | None = None,
                             chunk: int = 256) -> torch.Tensor:
    """Decode: new queries q (B, H, T, d) at positions q_start.. against cached keys k, v
    (B, H, M, d) at positions k_start.., masked by `pattern` (causal, so each row holds itself).
    Queries go in chunks so the mask stays (chunk, M)."""
    import torch.nn.functional as F

    k_pos = torch.arange(k.shape[2], device=q.device) + k_start
    outs = []
    for s in range(0, q.shape[2], chunk):
        q_pos = torch.arange(s, min(q.shape[2], s + chunk), device=q.device) + q_start
        allowed = pattern.allows(q_pos[:, None], k_pos[None, :])
        empty = ~allowed.any(dim=-1, keepdim=True)        # no key at all: output 0, as the forward
        out = F.scaled_dot_product_attention(q[:, :, s:s + chunk], k, v, attn_mask=allowed | empty,
                                             scale=scale)
        outs.append(out.masked_fill(empty, 0.0))
    return torch.cat(outs, dim=2)


def cached_decode(q, k, v, state, patterns, forward):
    """One causal decode step for a fixed-pattern mechanism with a trimmed KV cache.

    q, k, v (B, H, T, d) of the new tokens; `patterns`: one causal Pattern per equal group of
    heads; `forward(q, k, v)`: the causal forward path (used when there is no state yet, so a
    prompt costs what a forward costs). The state keeps keys from the earliest position any
    future query can see (min of the patterns' `earliest_key`). Returns (out, state)."""
    t = q.shape[2]
    if state is None:
        out, start, length = forward(q, k, v), 0, t
    else:
        k = torch.cat([state["k"], k], dim=2)
        v = torch.cat([state["v"], v], dim=2)
        start, length = state["start"], state["length"] + t
        groups = len(patterns)
        h = q.shape[1] // groups
        out = torch.cat([pattern_decode_attention(q[:, g * h:(g + 1) * h], k[:, g * h:(g + 1) * h],
                                                  v[:, g * h:(g + 1) * h], p, length - t, start)
                         for g, p in enumerate(patterns)], dim=1)
    keep = min(p.earliest_key(length) for p in patterns)
    k, v = k[:, :, keep - start:], v[:, :, keep - start:]
    return out, {"k": k, "v": v, "start": keep, "length": length}


def image2d_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: ImageLocal2D,
                      key_mask: torch.Tensor | None = None, scale: float | None = None):
    """Local 2-D attention (CPU path): q, k, v (B, H, N, d) in raster order over rows of
    `pattern.width` -> (B, H, N, d), any N.

    The sequence is laid on a grid padded to whole query blocks (rows to a multiple of hq, width
    to a multiple of wq), permuted into block-raster order so that each query rectangle is a
    contiguous block, then `block_sparse_attention` gathers the neighbouring rectangles that the
    memory flange reaches (3 x 3 blocks non-causal, the 2 x 3 above-and-beside causal for a flange
    no larger than the query block) and masks them with `pattern.allows_rc`."""
    from .blocks import block_sparse_attention

    bsz, h, n, d = q.shape
    w = pattern.width
    (hq, wq), (hm, wm) = pattern.query_shape, pattern.memory_flange
    rows = -(-n // w)
    n_br, n_bc = -(-rows // hq), -(-w // wq)
    block = hq * wq
    dev = q.device
    # cell t of the block-raster grid -> (row, column) and sequence index (n = an empty cell)
    t = torch.arange(n_br * n_bc * block, device=dev)
    bid, within = torch.div(t, block, rounding_mode="floor"), t % block
    r = torch.div(bid, n_bc, rounding_mode="floor") * hq + torch.div(within, wq, rounding_mode="floor")
    c = (bid % n_bc) * wq + within % wq
    seq = r * w + c
    real_cell = (c < w) & (seq < n)
    seq = torch.where(real_cell, seq, torch.full_like(seq, n))
    mask = torch.ones(bsz, n, dtype=torch.bool, device=dev) if key_mask is None else key_mask
    cell_mask = torch.cat([mask, mask.new_zeros(bsz, 1)], dim=1)[:, seq]           # (B, cells)

    def to_cells(x):  # (B, H, N, d) -> (B, H, cells, d); empty cells read a zero row
        return torch.cat([x, x.new_zeros(bsz, h, 1, d)], dim=2)[:, :, seq]

    # neighbouring blocks: rows -rr..0 (causal) or -rr..rr, columns -cr..cr; outside = -1
    rr, cr = window_reach(hm, hq, n_br), window_reach(wm, wq, n_bc)
    br = torch.arange(n_br, device=dev)[:, None, None, None]
    bc = torch.arange(n_bc, device=dev)[None, :, None, None]
    dr = torch.arange(-rr, (0 if pattern.causal else rr) + 1, device=dev)[None, None, :, None]
    dc = torch.arange(-cr, cr + 1, device=dev)[None, None, None, :]
    nr, nc = br + dr, bc + dc
    inside = (nr >= 0) & (nr < n_br) & (nc >= 0) & (nc < n_bc)
    key_blocks = torch.where(inside, nr * n_bc + nc, torch.full_like(nr, -1)).reshape(n_br * n_bc, -1)

    nq = n_br * n_bc
    k_cells = key_positions(key_blocks, block)                                     # (nq, K*b)
    slot = (key_blocks >= 0).repeat_interleave(block, dim=-1)
    kc = k_cells.clamp_min(0)
    qr, qc = r.view(nq, block, 1), c.view(nq, block, 1)
    ok = pattern.allows_rc(qr, qc, r[kc][:, None, :], c[kc][:, None, :]) & slot[:, None, :]
    if pattern.causal:
        ok = ok & (seq[kc][:, None, :] <= seq.view(nq, block, 1))
    allowed = ok[None, None] & cell_mask[:, kc][:, None, :, None, :]               # (B, 1, nq, b, Kb)
    allowed = allowed | ~cell_mask.view(bsz, 1, nq, block, 1)                      # empty rows: see all
    out = block_sparse_attention(to_cells(q), to_cells(k), to_cells(v), key_blocks, allowed, block,
                                 scale=scale)
    # back to raster order: position i sits in cell (r, c) of the grid
    pos = torch.arange(n, device=dev)
    pr, pc = torch.div(pos, w, rounding_mode="floor"), pos % w
    cell_of = ((torch.div(pr, hq, rounding_mode="floor") * n_bc + torch.div(pc, wq, rounding_mode="floor"))
               * block + (pr % hq) * wq + pc % wq)
    return out[:, :, cell_of]
