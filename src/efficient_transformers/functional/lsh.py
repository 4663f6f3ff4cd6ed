"""Angular LSH attention with shared query-key (Kitaev et al. 2020, arXiv:2001.04451, section 2).

Pure tensor code: hashing, the chunked fast path and the dense definitions used as the oracle and
for decode. Shapes: qk, v (B, H, N, d); buckets (B, H, R, N) with R hash rounds.

Definitions (the sets P_i of the paper, section 2 "LSH attention" and "Multi-round LSH attention"):
- hash (section 2, "Locality sensitive hashing"): h(x) = argmax([xR ; -xR]) for a random
  rotation R of shape (d, b/2), one per round. Padded tokens get the extra bucket `b` so that they
  sort after every real token whatever their values (they never change a real token's chunk).
- keys are the normalised queries, k_j = q_j / |q_j| (section 2, "shared-QK").
- in round r the tokens are sorted by (bucket, position) and cut into chunks of m tokens.
  Non-causal (the paper): i sees j when both share the round-r bucket and j sits in i's chunk or in
  the chunk before it (no wrap-around from the first chunk to the last).
  Causal (our variant, see `causal_allowed_rounds`): i sees j < i when both share the round-r
  bucket and j is among the m most recent earlier tokens of that bucket.
- a token never attends to itself unless its union over rounds is empty (section 2, "Causal
  masking for shared-QK attention"); then it attends to itself alone.
- rounds are combined by the union of their sets, every pair counted once: the per-round softmax
  outputs are weighted by exp(lse_r - logsumexp_r lse_r) and a pair already seen in an earlier
  round is masked in later ones. This equals the paper's "subtract log N_ij" (eq. in "Multi-round
  LSH attention") exactly: both give the softmax over the union.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .amp import autocast_free
from .backward import first_order_only
from .blocks import at_most
from .dense import naive_attention, softmax_
from .merge import output_shift, softmax_grad_
from .unit import unit_vectors


# ------------------------------------------------------------------------------ hashing
def bucket_factors(n_buckets: int | tuple[int, ...]) -> tuple[int, ...]:
    """An int (one rotation per round, the paper) or a tuple of factors (a factorised hash)
    -> the factors."""
    return tuple(n_buckets) if isinstance(n_buckets, (tuple, list)) else (n_buckets,)


def total_buckets(n_buckets: int | tuple[int, ...]) -> int:
    """The number of bucket ids: the int, or the product of the factors."""
    return math.prod(bucket_factors(n_buckets))


def factorized(n_buckets: int) -> tuple[int, int]:
    """Two even factors (b1, b2), b1 about sqrt(b), whose product is b or a little more
    (at most b + 2·sqrt(b)): 1024 -> (32, 32)."""
    b1 = 2 * max(1, round(math.sqrt(n_buckets) / 2))
    return b1, 2 * -(-n_buckets // (2 * b1))


def random_rotations(heads: int, n_hashes: int, head_dim: int,
                     n_buckets: int | tuple[int, ...],
                     generator: torch.Generator | None = None, device=None,
                     dtype=torch.float32) -> torch.Tensor:
    """(H, R, d, b/2) Gaussian rotations (section 2: "a random matrix R of size [d_k, b/2]");
    factorised, the factors' rotations side by side: (H, R, d, b1/2 + b2/2 + ...)."""
    width = sum(max(f // 2, 1) for f in bucket_factors(n_buckets))
    rot = torch.randn(heads, n_hashes, head_dim, width, generator=generator, dtype=torch.float32)
    return rot.to(device=device, dtype=dtype)


HASH_BLOCK_ELEMENTS = 1 << 24  # projections held at once while hashing (64 MiB in float32)
# on CUDA, 256 MiB: at 64k tokens and 1024 buckets, 16 blocks for the 4 rounds instead of 64 (the
# host launches ~10 kernels per block: 64 blocks were ~600 launches, more host time than GPU time)
CUDA_HASH_BLOCK_ELEMENTS = 1 << 26
BIG_HASH_BLOCKS = None  # None: CUDA_HASH_BLOCK_ELEMENTS on CUDA; True/False force it (cuda_paths)


def _argmax_both_signs(proj: torch.Tensor) -> torch.Tensor:
    """proj (..., w) -> argmax([proj; -proj]) (..., ) in [0, 2w), without the concatenation."""
    top, low = proj.max(dim=-1), proj.min(dim=-1)
    return torch.where(top.values >= -low.values, top.indices, low.indices + proj.shape[-1])


def lsh_buckets(qk: torch.Tensor, rotations: torch.Tensor, n_buckets: int | tuple[int, ...],
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """qk (B, H, N, d), rotations (H, R, d, w) -> buckets (B, H, R, N) in [0, b]; b = padding.

    h(x) = argmax([xR; -xR]) per round. Factorised (n_buckets a tuple (b1, b2, ...), as the
    authors' Trax code offers): one such hash per factor, h = h1 + b1·h2 + ...,
    so b1·b2 buckets cost b1/2 + b2/2 projections per token instead of b1·b2/2.
    One block of tokens at a time, every round in one matmul: with b ~ N / bucket_size the
    projections (B, H, N, R, w) grow as N², while a block holds at most HASH_BLOCK_ELEMENTS."""
    b_, h, n, _ = qk.shape
    r, width = rotations.shape[1], rotations.shape[-1]
    factors, total = bucket_factors(n_buckets), total_buckets(n_buckets)
    buckets = torch.zeros(b_, h, r, n, dtype=torch.long, device=qk.device)
    if total > 1:
        work = torch.promote_types(qk.dtype, torch.float32)
        x = qk.detach().to(work)
        rot = rotations.to(work).permute(0, 2, 1, 3).reshape(h, -1, r * width)  # (H, d, R·w)
        big = qk.is_cuda if BIG_HASH_BLOCKS is None else BIG_HASH_BLOCKS
        budget = CUDA_HASH_BLOCK_ELEMENTS if big else HASH_BLOCK_ELEMENTS
        rows = max(1, budget // (b_ * h * r * width))
        for start in range(0, n, rows):
            proj = torch.matmul(x[:, :, start:start + rows], rot).unflatten(-1, (r, width))
            bucket, offset, radix = None, 0, 1     # proj (B, H, n', R, w)
            for f in factors:
                half = f // 2
                ids = _argmax_both_signs(proj[..., offset:offset + half])  # (B, H, n', R)
                bucket = ids if bucket is None else bucket + ids * radix
                offset, radix = offset + half, radix * f
            buckets[..., start:start + rows] = bucket.transpose(-1, -2)
    if key_mask is not None:
        buckets = buckets.masked_fill(~key_mask[:, None, None, :], total)
    return buckets


def chunk_for(length: int, bucket_size: int) -> int:
    """The chunk `length` tokens are padded to a multiple of and cut into: `bucket_size`, or the
    next power of two >= length when smaller. A chunk at or beyond the length holds every token
    (non-causal: one chunk; causal: a band over every earlier token), so both give the same sets,
    at a cost that stops growing with bucket_size; powers of two bound the distinct padded lengths
    (compiled shapes) of short inputs to about log2(bucket_size). A loop of comparisons, not
    `bit_length`: a symbolic length under torch.compile supports those."""
    chunk = 1
    while chunk < length and chunk < bucket_size:
        chunk *= 2
    return at_most(chunk, bucket_size)


def sort_by_bucket(buckets: torch.Tensor) -> torch.Tensor:
    """buckets (..., P) -> the permutation (..., P) ordering positions by (bucket, position)."""
    positions = torch.arange(buckets.shape[-1], device=buckets.device)
    return (buckets * buckets.shape[-1] + positions).sort(dim=-1).indices  # stable by construction


# ------------------------------------------------------------------------ the fast path
def _look_back(t: torch.Tensor) -> torch.Tensor:
    """(..., C, c, x) -> (..., C, 2c, x): each chunk after its predecessor (the last for chunk 0)."""
    c = t.shape[-2]
    out = t.new_empty(*t.shape[:-2], 2 * c, t.shape[-1])
    out[..., c:, :] = t
    out[..., 1:, :c, :] = t[..., :-1, :, :]
    out[..., 0, :c, :] = t[..., -1, :, :]
    return out


def _windows(rows: torch.Tensor, chunk: int, start: int, width: int) -> torch.Tensor:
    """rows ((M + 1)·c, w), one chunk of padding first -> the (M, 2c, width) view of columns
    [start, start + width) where window m holds chunks m - 1 and m (no copy: windows overlap)."""
    return rows[:, start:start + width].unfold(0, 2 * chunk, chunk).transpose(1, 2)


@autocast_free
class _ChunkWindowAttention(torch.autograd.Function):
    """Softmax attention of each sorted chunk's queries over (previous chunk, own chunk), except
    where `blocked`.

    rows ((M + 1)·c, 2d + e): [q, k, v] of M = B·H·R·C sorted chunks of c rows after one chunk of
    padding (the "previous chunk" of the very first; any other chunk's predecessor is the row
    order's previous chunk, and the caller blocks whatever crosses a round). blocked (M, c, 2c).
    Returns out (M, c, e) and the log-sum-exp of each row (M, c). The key and value windows are
    overlapping views (no copy); saved for backward: rows, the weights (M, c, 2c) and out.
    Backward: dS = W * (dW - rowsum(dO * O) + dlse) (the row sum of W * dW equals dO · O), in
    place; window gradients are folded back half by half (`_window_grad`). A row with nothing
    allowed comes out uniform with lse = finfo.min + log(2c); the caller marks it empty.
    """

    @staticmethod
    def forward(ctx, rows, blocked, d):
        c = blocked.shape[-2]
        e = rows.shape[-1] - 2 * d
        q = rows[c:, :d].unflatten(0, (-1, c))                                # (M, c, d)
        weights = torch.matmul(q, _windows(rows, c, d, d).transpose(-1, -2))  # (M, c, 2c)
        weights.masked_fill_(blocked, torch.finfo(weights.dtype).min)
        row_max = weights.amax(dim=-1)
        softmax_(weights)  # in place: no second (M, c, 2c) tensor
        # lse = s_j - log w_j for any j; at the row maximum w_j >= 1/(2c), so this is exact
        lse = row_max - torch.log(weights.amax(dim=-1))
        out = torch.matmul(weights, _windows(rows, c, 2 * d, e))              # (M, c, e)
        ctx.save_for_backward(rows, weights, out)
        ctx.d = d
        return out, lse

    @staticmethod
    @first_order_only
    def backward(ctx, g_out, g_lse):
        rows, weights, out = ctx.saved_tensors
        d, c = ctx.d, weights.shape[-2]
        e = rows.shape[-1] - 2 * d
        q = rows[c:, :d].unflatten(0, (-1, c))
        g_rows = torch.empty_like(rows)
        g_rows[:c] = 0
        g_q, g_k, g_v = (g_rows[c:, a:b].unflatten(0, (-1, c))
                         for a, b in ((0, d), (d, 2 * d), (2 * d, 2 * d + e)))
        _window_grad(weights, g_out, out=g_v)
        g_scores = torch.matmul(g_out, _windows(rows, c, 2 * d, e).transpose(-1, -2))
        softmax_grad_(g_scores, weights, output_shift(g_out, out, g_lse, weights.dtype), 1.0)
        g_q.copy_(torch.matmul(g_scores, _windows(rows, c, d, d)))
        _window_grad(g_scores, q, out=g_k)
        return g_rows, None, None


def _window_grad(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (M, c, x) = the gradient of the chunks under the window view: the window of chunk m
    holds chunks m - 1 and m, so with G = aᵀ b per window (a (M, c, 2c), b (M, c, x)),
    out[m] = G[m, c:] + G[m + 1, :c], computed half by half (no (M, 2c, x) tensor).
    Products go to fresh tensors: a matmul into a strided `out` runs one small GEMM per batch."""
    c = out.shape[-2]
    out.copy_(torch.matmul(a[..., c:].transpose(-1, -2), b))
    out[:-1] += torch.matmul(a[1:, :, :c].transpose(-1, -2), b[1:])


@autocast_free
class _SortRounds(torch.autograd.Function):
    """x (B·P·H, w) -> its rows in every round's sorted order after `pad` zero rows,
    (pad + B·H·R·P, w).

    `to_sorted` (B·H·R·P,) picks, for each sorted slot, the source row; `bags` (B·P·H, R) is the
    inverse: for each row, the slots holding it in the R rounds.
    Backward is `_UnsortRounds` and the other way round: the two are adjoint.
    """

    @staticmethod
    def forward(ctx, x, to_sorted, bags, pad=0):
        ctx.save_for_backward(to_sorted, bags)
        ctx.pad = pad
        if not pad:
            return x.index_select(0, to_sorted)
        out = x.new_empty(pad + to_sorted.numel(), x.shape[-1])
        out[:pad] = 0
        torch.index_select(x, 0, to_sorted, out=out[pad:])
        return out

    @staticmethod
    def backward(ctx, g):
        g = g[ctx.pad:]
        return _UnsortRounds.apply(g, *ctx.saved_tensors), None, None, None


@autocast_free
class _UnsortRounds(torch.autograd.Function):
    """y (B·H·R·P, w) in sorted order -> (B·P·H, w): each row's slots of all rounds summed, one
    `embedding_bag` (a gather and a sum per row in one kernel; no scatter-add, no atomics)."""

    @staticmethod
    def forward(ctx, y, to_sorted, bags):
        ctx.save_for_backward(to_sorted, bags)
        return F.embedding_bag(bags, y, mode="sum")

    @staticmethod
    def backward(ctx, g):
        return _SortRounds.apply(g, *ctx.saved_tensors), None, None


@autocast_free
class _MergeRounds(torch.autograd.Function):
    """The rounds' outputs y (B·H·R·P, e) in sorted order, weighted by w (B, H, R, P) (per round
    and position) and summed per position -> (B·P·H, e) rows: one `embedding_bag` with per-slot
    weights. Backward: each row's gradient gathered to its slots (g_s), the weights' gradient
    as the row dot y · g_s, y's as w · g_s.

    to_sorted (B·H·R·P,): slot -> row; bags (B·P·H, R): row -> its slots; to_slot (B·H·R·P,):
    (b, h, r, p) -> slot; from_slot: slot -> (b, h, r, p)."""

    @staticmethod
    def forward(ctx, y, w, to_sorted, bags, to_slot, from_slot):
        ctx.save_for_backward(y, w, to_sorted, to_slot, from_slot)
        per_slot = w.permute(0, 3, 1, 2).reshape(bags.shape)        # (B·P·H, R), like bags
        return F.embedding_bag(bags, y, per_sample_weights=per_slot, mode="sum")

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        y, w, to_sorted, to_slot, from_slot = ctx.saved_tensors
        g_s = g.index_select(0, to_sorted)                          # (B·H·R·P, e)
        g_w = torch.linalg.vecdot(y, g_s).index_select(0, to_slot).view(w.shape)
        g_s.mul_(w.reshape(-1).index_select(0, from_slot)[:, None])
        return g_s, g_w, None, None, None, None


@autocast_free
class _Permute(torch.autograd.Function):
    """Rows x[index] for a permutation `index` whose inverse is `inverse` (backward: a gather)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


def _static_mask(n_chunks: int, chunk: int, causal: bool, device) -> torch.Tensor:
    """(C, c, 2c) bool, True where the window position may be attended (before bucket checks).

    Window key t < c is token t of the previous chunk, t >= c token t - c of the own chunk.
    Causal: key rank = query rank - (c + a - t); allowed when that distance is in [1, c].
    Non-causal: everything but the query itself. The first chunk has no previous chunk.
    """
    a = torch.arange(chunk, device=device)[:, None]
    t = torch.arange(2 * chunk, device=device)[None, :]
    band = (t >= a) & (t < a + chunk) if causal else (t != a + chunk)
    first = torch.arange(n_chunks, device=device)[:, None, None] > 0
    return band[None] & (first | (t >= chunk)[None])


def round_locations(buckets, rank, chunk, causal, n_buckets):
    """Where each token sits in each round, as one integer per (token, round) such that "i and
    j are a pair of round s" is lo <= loc_s(i) - loc_s(j) <= hi.

    buckets, rank (B, H, R, P) -> (loc (B, H, R, P) in the smallest integer dtype that holds it,
    (lo, hi)). Non-causal: loc = bucket · (C + 2) + chunk, a pair when the chunks differ by 0 or 1
    (the query's own chunk or the one before, same bucket). Causal: loc = bucket · (P + c + 1) +
    rank, a pair when the ranks differ by 1 to c (one of the c most recent earlier tokens of the
    bucket). Bucket ids are at most n_buckets (the padding bucket)."""
    p = buckets.shape[-1]
    if causal:
        big, loc, window = p + chunk + 1, rank, (1, chunk)
    else:
        big, loc, window = p // chunk + 2, torch.div(rank, chunk, rounding_mode="floor"), (0, 1)
    top = (n_buckets + 1) * big
    kind = torch.int16 if top < 2 ** 15 else torch.int32 if top < 2 ** 31 else torch.int64
    return (buckets * big + loc).to(kind), window


def _blocked_pairs(rounds: "RoundSort", chunk, causal, n_buckets):
    """(B, H, R, C, c, 2c) bool: True where a query may not use a window key in that round —
    another bucket, outside the static window, or a pair already attended in an earlier round
    (each pair counted once). Bucket ids are at most n_buckets (the padding bucket)."""
    b_, h, r, p = rounds.buckets.shape
    c, n_chunks = chunk, p // chunk
    dev = rounds.buckets.device
    b_q = rounds.sorted_buckets().to(torch.int32).view(b_, h, r, n_chunks, c)
    blocked = b_q[..., :, None] != _look_back(b_q[..., None])[..., None, :, 0]
    blocked |= ~_static_mask(n_chunks, c, causal, dev)
    if r == 1:
        return blocked
    loc, _ = rounds.sorted_locations(c, causal, n_buckets)                   # all rounds' locs
    loc_q = loc.view(b_, h, r, n_chunks, c, r)
    loc_k = _look_back(loc_q)
    shift = c.bit_length() - 1 if causal and c & (c - 1) == 0 else None
    for s in range(r - 1):  # rounds s before the current round
        dist = loc_q[:, :, s + 1:, ..., s, None] - loc_k[:, :, s + 1:, ..., None, :, s]
        if not causal:
            dist >>= 1
            seen = dist == 0  # dist in {0, 1}
        elif shift is not None:
            dist -= 1
            dist >>= shift
            seen = dist == 0  # dist in [1, c], c a power of two
        else:
            seen = (dist >= 1) & (dist <= c)
        blocked[:, :, s + 1:] |= seen
    return blocked


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, P, w) -> (B·P·H, w): one row per (b, position, head), the layout of the (B, P, H·w)
    projection that `split_heads` viewed (no copy for such a view)."""
    return t.transpose(1, 2).reshape(-1, t.shape[-1])


def from_token_rows(rows: torch.Tensor, b_: int, h: int, p: int) -> torch.Tensor:
    """(B·P·H, w) -> the (B, H, P, w) view (`token_rows` inverted)."""
    return rows.view(b_, p, h, -1).transpose(1, 2)


class RoundSort:
    """The sorted order of every round and its bookkeeping, from buckets (B, H, R, P).

    Rows are `token_rows`: (b, position, head). Slots are (b, h, r, sorted index).
    order (B, H, R, P): positions by (bucket, position) per round; rank: its inverse;
    flat (B·H·R·P,): slot -> row; bags (B·P·H, R): row -> its slot in each round; to_slot:
    (b, h, r, position) -> its slot; from_slot: slot -> (b, h, r, position)."""

    def __init__(self, buckets: torch.Tensor):
        b_, h, r, p = buckets.shape
        dev = buckets.device
        self.buckets = buckets
        positions = torch.arange(p, device=dev)
        self.order = sort_by_bucket(buckets)
        self.rank = torch.empty_like(self.order).scatter_(-1, self.order,
                                                          positions.expand_as(self.order))
        row0 = (torch.arange(b_, device=dev).view(b_, 1, 1, 1) * (p * h)
                + torch.arange(h, device=dev).view(1, h, 1, 1))     # row of (b, 0, h)
        self.flat = (self.order * h + row0).reshape(-1)
        bh = torch.arange(b_ * h, device=dev).view(b_, h, 1, 1) * (r * p)
        slot0 = bh + torch.arange(r, device=dev).view(1, 1, r, 1) * p  # a round's first slot
        to_slot = self.rank + slot0                                     # (B, H, R, P)
        self.to_slot = to_slot.reshape(-1)
        self.bags = to_slot.permute(0, 3, 1, 2).reshape(-1, r)          # (B·P·H, R)
        self.from_slot = (self.order + slot0).reshape(-1)

    def sorted_buckets(self) -> torch.Tensor:
        """(B, H, R, P): each round's bucket ids in its sorted order."""
        return self.buckets.gather(-1, self.order)

    def sorted_locations(self, chunk: int, causal: bool, n_buckets: int):
        """(the location in every round of the token at each sorted slot (B, H, R, P, R),
        (lo, hi)): `round_locations` read in each round's sorted order."""
        b_, h, r, p = self.buckets.shape
        loc, window = round_locations(self.buckets, self.rank, chunk, causal, n_buckets)
        loc = loc.permute(0, 3, 1, 2).reshape(-1, r).index_select(0, self.flat)
        return loc.view(b_, h, r, p, r), window

    def sorted_rows(self, x: torch.Tensor, pad: int = 0) -> torch.Tensor:
        """x (B·P·H, w) `token_rows` -> (pad + B·H·R·P, w): every round's sorted order after
        `pad` zero rows."""
        return _SortRounds.apply(x, self.flat, self.bags, pad)

    def merge_rounds(self, out_s: torch.Tensor, lse_s: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
        """The rounds' outputs out_s (B·H·R·P, e) and log-sum-exps lse_s (B·H·R·P,) in sorted
        order (-inf where a round's set is empty) -> (B, H, P, e): weighted by
        softmax_r(lse_r) per position; a position whose union is empty gets its own value v
        (B, H, P, e)."""
        b_, h, r, p = self.buckets.shape
        lse = _Permute.apply(lse_s, self.to_slot, self.from_slot).view(b_, h, r, p)
        lse = lse.to(torch.promote_types(lse.dtype, torch.float32))
        any_set = torch.isfinite(lse).any(dim=2, keepdim=True)  # (B, H, 1, P)
        round_w = torch.softmax(torch.where(any_set, lse, 0.0), dim=2).to(out_s.dtype)
        combined = _MergeRounds.apply(out_s, round_w, self.flat, self.bags, self.to_slot,
                                      self.from_slot)                      # (B·P·H, e)
        any_row = any_set.permute(0, 3, 1, 2).reshape(-1, 1)               # (B·P·H, 1)
        out = torch.where(any_row, combined, token_rows(v))  # an empty union: its own value
        return from_token_rows(out, b_, h, p)


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, chunk: int,
                  causal: bool, scale: float | None = None,
                  n_buckets: int | None = None) -> torch.Tensor:
    """Chunked multi-round shared-QK LSH attention; O(R·N·2c) memory, no N×N tensor.

    qk (B, H, P, d), v (B, H, P, e), buckets (B, H, R, P) with P a multiple of `chunk`, ids in
    [0, n_buckets] (n_buckets: the padding bucket). Without n_buckets the ids' maximum is read
    from the device (on CUDA the host waits for it).
    Returns (B, H, P, e) = softmax over the union of the rounds' sets (module docstring).
    """
    b_, h, p, d = qk.shape
    e = v.shape[-1]
    c = chunk
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rounds = RoundSort(buckets)

    # one gather of [q·scale, k = q/|q|, v] into sorted order, after one chunk of padding
    rows_in = torch.cat([t.transpose(1, 2) for t in (qk * scale, unit_vectors(qk), v)], dim=-1)
    packed = rounds.sorted_rows(rows_in.flatten(0, 2), pad=c)   # rows_in (B, P, H, 2d + e)
    if n_buckets is None:
        n_buckets = int(buckets.max())
    blocked = _blocked_pairs(rounds, c, causal, n_buckets)
    out_s, lse_s = _ChunkWindowAttention.apply(packed, blocked.flatten(0, 3), d)  # (M, c, e)
    del blocked
    lse_s = lse_s.masked_fill(lse_s < torch.finfo(lse_s.dtype).min / 2, float("-inf"))
    return rounds.merge_rounds(out_s.reshape(-1, e), lse_s.reshape(-1), v)


# ------------------------------------------------------------- dense definitions (oracle)
def causal_allowed_rounds(q_buckets: torch.Tensor, k_buckets: torch.Tensor, chunk: int,
                          offset: int = 0) -> torch.Tensor:
    """Causal per-round sets, from the definition: (B, H, R, T, M) bool.

    q_buckets (B, H, R, T) at positions offset..offset+T-1, k_buckets (B, H, R, M) at 0..M-1.
    Query i sees key j when j < i, both share the bucket and at most `chunk` tokens of that
    bucket lie in [j, i) (j is one of the `chunk` most recent earlier tokens of its bucket).
    Padded keys carry the padding bucket, so real queries never see or count them.
    """
    t, m = q_buckets.shape[-1], k_buckets.shape[-1]
    i = torch.arange(t, device=q_buckets.device)[:, None] + offset
    j = torch.arange(m, device=q_buckets.device)[None, :]
    same = (q_buckets[..., :, None] == k_buckets[..., None, :]) & (j < i)
    recent = same.flip(-1).cumsum(-1, dtype=torch.int32).flip(-1)  # same-bucket keys in [j, i)
    return same & (recent <= chunk)


def chunked_allowed_rounds(buckets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Non-causal per-round sets of the paper, from the definition: (B, H, R, N, N) bool.

    rank_r(i) = #{j : (b_j, j) < (b_i, i)} (sorted position), chunk_r(i) = rank // chunk;
    i sees j != i when they share the bucket and chunk_r(i) - chunk_r(j) is 0 or 1.
    """
    n = buckets.shape[-1]
    pos = torch.arange(n, device=buckets.device)
    before = (buckets[..., None, :] < buckets[..., :, None]) | (
        (buckets[..., None, :] == buckets[..., :, None]) & (pos[None, :] < pos[:, None]))
    rank = before.sum(-1)  # (B, H, R, N)
    ch = torch.div(rank, chunk, rounding_mode="floor")
    dist = ch[..., :, None] - ch[..., None, :]
    same = buckets[..., :, None] == buckets[..., None, :]
    return same & ((dist == 0) | (dist == 1)) & (pos[:, None] != pos[None, :])


def union_with_self(per_round: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(B, H, R, T, M) -> (B, H, T, M): union over rounds; an empty row attends to itself."""
    allowed = per_round.any(dim=2)
    t, m = allowed.shape[-2:]
    own = (torch.arange(m, device=allowed.device)[None, :]
           == torch.arange(t, device=allowed.device)[:, None] + offset)
    return allowed | (own & ~allowed.any(dim=-1, keepdim=True))


def naive_lsh_attention(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, chunk: int,
                        causal: bool, scale: float | None = None) -> torch.Tensor:
    """The oracle: dense shared-QK attention restricted to the union of the rounds' sets."""
    if causal:
        per_round = causal_allowed_rounds(buckets, buckets, chunk)
    else:
        per_round = chunked_allowed_rounds(buckets, chunk)
    return naive_attention(qk, F.normalize(qk, dim=-1), v, union_with_self(per_round), scale)
