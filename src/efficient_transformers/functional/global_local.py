"""Local windows plus global tokens: the patterns of Longformer, Big Bird (ITC) and ETC.

Global tokens (attend everywhere / are attended from everywhere) do not fit a local block
layout. Two pieces handle them, both without an N × N tensor:
- global *keys* seen by every local query are appended to each query block's window of keys
  (`blocked_window_attention`: the windows are an overlapping view of K and V, copied once
  together with the extra keys), so the local keys and the global keys share ONE softmax per
  query (the same result as merging two partial softmaxes by log-sum-exp, but through one
  `scaled_dot_product_attention` call, FlashAttention's CPU kernel included);
- global *queries* attend to all N keys densely: O(N · g) (`dense_rows`).

Dilation (Longformer section 3.1, "Dilated Sliding Window"): a window of `window` positions at a
stride of `dilation` is a plain window of `window` positions inside each residue class
i mod dilation. The CPU path permutes the sequence into its residue classes and runs the plain
window there, so a dilated window costs the same as an undilated one (no gathered blocks that
are (d-1)/d masked out).

Shapes: q, k, v (B, H, N, d); key masks (B, N) bool, True = real token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .blocks import at_most, pad_mask_to_multiple, pad_to_multiple
from .eager import outside_graphs, outside_inference_mode
from .merge import attention_with_lse, stat_dtype
from .patterns import LocalWindow, Pattern, unique_blocks, window_reach

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------ patterns
@dataclass(frozen=True)
class DilatedWindow(Pattern):
    """Longformer's (dilated) sliding window (section 3.1): j = i + t·dilation, |t| <= window
    (causal: 0 <= t ... only the past, i - j = t·dilation with 0 <= t <= window)."""

    window: int
    dilation: int = 1
    causal: bool = False

    def allows(self, i, j):
        diff = i - j
        ok = (diff % self.dilation == 0) & (diff.abs() <= self.window * self.dilation)
        return ok & (diff >= 0) if self.causal else ok

    def key_blocks(self, n_blocks, block, device=None):
        return LocalWindow(self.window * self.dilation, self.causal).key_blocks(n_blocks, block, device)


@dataclass(frozen=True)
class LongformerPattern(Pattern):
    """Dilated window plus the first `num_global` positions global (section 3.1): a global token
    attends to every position and every position attends to it; causal keeps only j <= i.
    (The global rows use their own projections in the layer; this predicate says which pairs
    interact, for pictures and tests.) The layer's FlexAttention mask has `global_rows=False` and
    `global_cols=False`: the layer computes the global rows densely and merges the global keys
    in itself (`global_cuda.global_rows`, `global_cuda.merge_global_keys`). Inside
    FlexAttention a full row is a query block that walks every key block, and a global key
    block is walked by every query block in the backward: one thread block doing N/128 steps
    while the rest of the GPU waits."""

    window: int
    dilation: int = 1
    num_global: int = 0
    causal: bool = False
    global_rows: bool = True
    global_cols: bool = True

    def allows(self, i, j):
        ok = DilatedWindow(self.window, self.dilation, self.causal).allows(i, j)
        if not self.global_cols:  # the layer merges the global keys in (global_cuda)
            ok = ok & (j >= self.num_global)
        glob = (j < self.num_global) if self.global_cols else None
        if self.global_rows:
            glob = (i < self.num_global) if glob is None else glob | (i < self.num_global)
        if glob is None:
            return ok
        if self.causal:
            glob = glob & (j <= i)
        return ok | glob

    def key_blocks(self, n_blocks, block, device=None):
        """Key blocks of the non-global query rows (the global rows see every block: the layer
        computes them densely, O(N · num_global))."""
        local = DilatedWindow(self.window, self.dilation, self.causal).key_blocks(n_blocks, block, device)
        g = math.ceil(self.num_global / block)
        glob = torch.arange(g, device=device).expand(n_blocks, g)
        return unique_blocks(torch.cat([local, glob], dim=-1), n_blocks)


_BIGBIRD_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # the last 64 drawn


@outside_graphs  # a torch.Generator cannot be made inside torch.compile
@outside_inference_mode  # a cache entry, read by later calls with autograd
def _draw_bigbird_tables(key: tuple) -> None:
    if len(_BIGBIRD_TABLES) >= 64:
        del _BIGBIRD_TABLES[next(iter(_BIGBIRD_TABLES))]
    _BIGBIRD_TABLES[key] = _bigbird_tables(*key)


def _bigbird_tables(seed: int, n_blocks: int, num_random: int, num_global: int, device: str):
    """(random key blocks (nb, r) long with -1 = none, block adjacency (nb, nb) bool)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_blocks, n_blocks, generator=gen)                   # (nb, nb), tiny
    qb = torch.arange(n_blocks)[:, None]
    kb = torch.arange(n_blocks)[None, :]
    sliding = (qb - kb).abs() <= 1
    glob = (qb < num_global) | (kb < num_global)
    scores = scores.masked_fill(sliding | glob, 2.0)                         # not a random candidate
    r = min(num_random, n_blocks)
    values, rand = scores.topk(r, dim=-1, largest=False) if r else (scores[:, :0], scores[:, :0].long())
    rand = rand.masked_fill(values >= 2.0, -1)                               # fewer candidates than r
    adjacency = sliding | glob
    adjacency[qb.expand_as(rand)[rand >= 0], rand[rand >= 0]] = True
    return rand.to(device), adjacency.to(device)


@dataclass(frozen=True)
class BigBirdPattern(Pattern):
    """Big Bird ITC (Zaheer et al. 2020, section 2 and appendix D, block form): with blocks of
    `block` positions, query block a sees key blocks a-1, a, a+1 (sliding), `num_random` random
    blocks (drawn once from `seed` for this number of blocks, among the blocks that are neither
    sliding nor global), and the first `num_global` blocks; the first `num_global` query blocks
    see everything. The whole pattern is a (n_blocks, n_blocks) block adjacency matrix.
    The layer's FlexAttention mask drops the global rows and columns (`global_rows`,
    `global_cols`: see `LongformerPattern`)."""

    block: int
    n_blocks: int
    num_random: int
    num_global: int
    seed: int
    global_rows: bool = True   # False: the global query blocks see nothing (the layer's rows)
    global_cols: bool = True   # False: nothing sees the global key blocks (merged in by the layer)

    def tables(self, device=None):
        """(random blocks (nb, r), adjacency (nb, nb)) on `device`, drawn from the seed alone
        once (a cache shared by the patterns: under torch.compile a hit is a graph constant)."""
        device = str(torch.device("cpu") if device is None else torch.device(device))
        key = (self.seed, self.n_blocks, self.num_random, self.num_global, device)
        if key not in _BIGBIRD_TABLES:
            _draw_bigbird_tables(key)
        return _BIGBIRD_TABLES[key]

    def allows(self, i, j):
        _, adjacency = self.tables(i.device)
        ok = adjacency[i // self.block, j // self.block]
        if not self.global_cols:
            ok = ok & (j // self.block >= self.num_global)
        if not self.global_rows:
            ok = ok & (i // self.block >= self.num_global)
        return ok

    def key_blocks(self, n_blocks, block, device=None):
        if (n_blocks, block) != (self.n_blocks, self.block):
            raise ValueError(f"n_blocks: this pattern was drawn for {self.n_blocks} blocks of "
                             f"{self.block}, got {n_blocks} blocks of {block}")
        rand, _ = self.tables(device)
        qb = torch.arange(n_blocks, device=device)[:, None]
        sliding = qb + torch.arange(-1, 2, device=device)
        glob = torch.arange(min(self.num_global, n_blocks), device=device).expand(n_blocks, -1)
        return unique_blocks(torch.cat([sliding, rand, glob], dim=-1), n_blocks)


# ------------------------------------------------------------------------------ core compute
EXPLICIT_ROWS: bool | None = None   # `dense_rows`' form; None: explicit on CUDA (cuda_paths)


def dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
               scale: float | None = None, explicit: bool | None = None) -> torch.Tensor:
    """A few query rows against all keys: q (B, H, G, d), k, v (B, H, M, d), allowed bool
    (B|1, 1|H, G, M) or a float additive mask. Rows with nothing allowed are opened up (their
    output must be discarded by the caller). O(G · M). On CUDA by explicit matmuls: a fused
    attention kernel gives the G rows, one query block, to one thread block per head, which
    then walks all M keys alone while the rest of the GPU waits; a bool mask through
    `merge.attention_with_lse` (only the probabilities saved), a float one through autograd
    (its gradient reaches the mask, e.g. ETC's learned biases). On the CPU through
    `scaled_dot_product_attention`, whose kernels keep no (G, M) scores. `explicit` forces
    either (None: `EXPLICIT_ROWS`, or where that is None, explicit on CUDA). Without any mask
    `flash.flash_rows` does better on CUDA (`global_cuda.global_rows` takes it)."""
    if allowed.dtype == torch.bool:
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    if explicit is None:
        explicit = q.is_cuda if EXPLICIT_ROWS is None else EXPLICIT_ROWS
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    if allowed.dtype == torch.bool:
        return attention_with_lse(q, k, v, allowed, scale)[0]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).to(stat_dtype(q.dtype)) + allowed
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def window_view(t: torch.Tensor, block: int, lo: int, hi: int, dim: int = 2) -> torch.Tensor:
    """Overlapping windows without a copy: axis `dim` (length Np = nq·b) of t becomes
    (nq, (lo + 1 + hi)·b) at the end of the shape for dim = 1 (masks (B, Np) -> (B, nq, Kb)),
    or (B, H, Np, d) -> (B, nq, H, Kb, d) for dim = 2: query block a gets the key blocks
    a - lo .. a + hi, zeros (False) outside the sequence."""
    span = (lo + 1 + hi) * block
    pad = [0, 0] * (t.dim() - dim - 1) + [lo * block, hi * block]
    windows = F.pad(t, pad).unfold(dim, span, block)
    return windows if dim == 1 else windows.permute(0, 2, 1, 4, 3)


def blocked_window_attention(q, k, v, block: int, lo: int, hi: int, allowed,
                             extra_k=None, extra_v=None, extra_allowed=None,
                             scale: float | None = None) -> torch.Tensor:
    """The CPU workhorse: each query block attends to the key blocks a - lo .. a + hi (an
    overlapping view, no gather) plus E extra keys, in one `scaled_dot_product_attention` call.

    q, k, v (B, H, Np, d), Np = nq·block. allowed: (B|1, nq, 1|H, b, Kb) bool or float (additive).
    extra_k / extra_v: (B, nq|1, H, E, d) (shared by every query block when the nq axis is 1),
    or tuples of such pieces (concatenated along E, in one copy with the window views);
    extra_allowed: (B|1, nq, 1|H, b, E), bool or float like `allowed`. Returns (B, H, Np, d).
    Memory O(N · (Kb + E)) per head; the mask is shared by the heads where it can be.
    """
    bsz, h, n_padded, d = q.shape
    nq = n_padded // block
    keys, values = window_view(k, block, lo, hi), window_view(v, block, lo, hi)  # (B, nq, H, Kb, d)
    if extra_k is not None:  # one copy of everything: the window views and the extra pieces
        pieces_k = extra_k if isinstance(extra_k, (list, tuple)) else [extra_k]
        pieces_v = extra_v if isinstance(extra_v, (list, tuple)) else [extra_v]
        keys = torch.cat([keys] + [t.expand(bsz, nq, h, t.shape[3], d) for t in pieces_k], dim=3)
        values = torch.cat([values] + [t.expand(bsz, nq, h, t.shape[3], d) for t in pieces_v], dim=3)
        if allowed.dtype != extra_allowed.dtype:  # one float, one bool
            allowed, extra_allowed = (m if m.is_floating_point() else
                                      torch.where(m, 0.0, NEG_INF).to(q.dtype)
                                      for m in (allowed, extra_allowed))
        hm = max(allowed.shape[2], extra_allowed.shape[2])
        allowed = torch.cat([allowed.expand(-1, nq, hm, -1, -1),
                             extra_allowed.expand(allowed.shape[0], nq, hm, -1, -1)], dim=-1)
    m = keys.shape[3]
    allowed = allowed.expand(bsz, nq, allowed.shape[2], block, m).reshape(bsz * nq, -1, block, m)
    qb = q.view(bsz, h, nq, block, d).transpose(1, 2).reshape(bsz * nq, h, block, d)
    out = F.scaled_dot_product_attention(qb, keys.reshape(bsz * nq, h, m, d),
                                         values.reshape(bsz * nq, h, m, d), attn_mask=allowed,
                                         scale=scale)
    return out.view(bsz, nq, h, block, d).transpose(1, 2).reshape(bsz, h, n_padded, d)


def local_attention_with_extras(q, k, v, window: int, causal: bool, key_mask, block: int,
                                extra_k=None, extra_v=None, extra_allowed=None,
                                rel_bias=None, scale: float | None = None) -> torch.Tensor:
    """Sliding window |i - j| <= window (causal: 0 <= i - j <= window) over keys where `key_mask`,
    plus G extra keys shared by every query, in one softmax per query.

    q, k, v (B, H, N, d); key_mask (B, N) or None; extra_k/extra_v (B, H, G, d);
    extra_allowed (B, 1|H, N, G) bool, or float (additive: 0 / -inf plus any bias);
    rel_bias: None or (H, 2·R + 1) float, added to the local score of (i, j) at
    clamp(j - i, -R, R) + R (ETC's relative position labels, section 2). Returns (B, H, N, d).
    A query at a position where key_mask is False sees its whole window (output meaningless,
    never empty). A window of N - 1 or more is the whole sequence: it runs as window N - 1 with
    blocks of at most `local_block_size(N)` (a wider one costs no more).
    Memory O(N · (min(window, N) + block + G)).
    """
    bsz, h, n, d = q.shape
    if window >= n - 1:  # |i - j| <= N - 1 already: the same attention, cost bounded by N
        window, block = n - 1, at_most(block, local_block_size(n))
    mask = pad_mask_to_multiple(key_mask, n, block, bsz, device=q.device)      # (B, Np)
    q, k, v = (pad_to_multiple(t, block)[0] for t in (q, k, v))
    n_padded = mask.shape[1]
    nq = n_padded // block
    reach = window_reach(window, block, nq)
    lo, hi = reach, 0 if causal else reach
    pos = torch.arange(n_padded, device=q.device).view(nq, block)
    q_pos = pos[:, :, None]                                                   # (nq, b, 1)
    k_pos = (torch.arange(nq, device=q.device)[:, None, None] - lo) * block + \
        torch.arange((lo + 1 + hi) * block, device=q.device)                # (nq, 1, Kb)
    diff = q_pos - k_pos                                                      # (nq, b, Kb)
    ok = (diff <= window) & (diff >= 0 if causal else diff >= -window) & (k_pos >= 0) & (k_pos < n_padded)
    real_key = window_view(mask, block, lo, hi, dim=1)                        # (B, nq, Kb)
    allowed = ok[None] & real_key[:, :, None, :]                              # (B, nq, b, Kb)
    allowed = (allowed | ~mask.view(bsz, nq, block, 1))[:, :, None]           # (B, nq, 1, b, Kb)
    if rel_bias is not None:
        radius = (rel_bias.shape[-1] - 1) // 2
        # j - i depends only on the offsets within the block and window: one (b, Kb) table for
        # every block, so the lookup's backward sums over H·b·Kb scores, not over N·Kb per head
        bias = rel_bias.to(q.dtype)[:, (-diff[0]).clamp(-radius, radius) + radius]  # (H, b, Kb)
        allowed = torch.where(allowed, bias[None, None],
                              torch.full((), NEG_INF, dtype=q.dtype, device=q.device))
    if extra_k is not None:
        value = True if extra_allowed.dtype == torch.bool else 0.0
        ea, _ = pad_to_multiple(extra_allowed, block, dim=2, value=value)     # (B, ., Np, G)
        g = ea.shape[-1]
        extra_allowed = ea.view(ea.shape[0], ea.shape[1], nq, block, g).transpose(1, 2)
        extra_k, extra_v = extra_k[:, None], extra_v[:, None]                 # (B, 1, H, G, d)
    out = blocked_window_attention(q, k, v, block, lo, hi, allowed, extra_k, extra_v,
                                   extra_allowed, scale=scale)
    return out[:, :, :n]


def _to_classes(t: torch.Tensor, dilation: int) -> torch.Tensor:
    """(B, X, Np, ...) with Np = m·dilation -> (B·dilation, X, m, ...): position c·dil + r goes to
    residue class r, index c."""
    b, x, n_padded = t.shape[:3]
    rest = t.shape[3:]
    t = t.reshape(b, x, n_padded // dilation, dilation, *rest).movedim(3, 1)
    return t.reshape(b * dilation, x, n_padded // dilation, *rest)


def _from_classes(t: torch.Tensor, dilation: int) -> torch.Tensor:
    """Inverse of `_to_classes`."""
    bd, x, m = t.shape[:3]
    rest = t.shape[3:]
    t = t.reshape(bd // dilation, dilation, x, m, *rest).movedim(1, 3)
    return t.reshape(bd // dilation, x, m * dilation, *rest)


def dilated_local_attention(q, k, v, window: int, dilation: int, causal: bool, key_mask,
                            block: int, extra_k=None, extra_v=None, extra_allowed=None,
                            scale: float | None = None) -> torch.Tensor:
    """`local_attention_with_extras` with the `DilatedWindow(window, dilation, causal)` pattern,
    computed as a plain window inside each residue class mod `dilation`. Same arguments.
    A dilation of N or more leaves each query only itself: it runs as dilation N (N classes of
    one position), so a larger one costs no more."""
    dilation = at_most(dilation, q.shape[2])  # |i - j| < N <= dilation: only j = i either way
    if dilation == 1:
        return local_attention_with_extras(q, k, v, window, causal, key_mask, block,
                                           extra_k, extra_v, extra_allowed, scale=scale)
    bsz, h, n, d = q.shape
    key_mask = pad_mask_to_multiple(key_mask, n, dilation, bsz, device=q.device)  # (B, Np)
    q, k, v = (pad_to_multiple(t, dilation)[0] for t in (q, k, v))
    mask = _to_classes(key_mask[:, None], dilation)[:, 0]                     # (B·dil, m)
    if extra_k is not None:
        extra_allowed, _ = pad_to_multiple(extra_allowed, dilation, dim=2, value=True)
        extra_allowed = _to_classes(extra_allowed, dilation)                  # (B·dil, ., m, G)
        extra_k = extra_k.repeat_interleave(dilation, dim=0)
        extra_v = extra_v.repeat_interleave(dilation, dim=0)
    out = local_attention_with_extras(
        _to_classes(q, dilation), _to_classes(k, dilation), _to_classes(v, dilation), window,
        causal, mask, block, extra_k, extra_v, extra_allowed, scale=scale)
    return _from_classes(out, dilation)[:, :, :n]


# ---------------------------------------------------------------------------------- longformer
def local_block_size(window: int, target: int = 128) -> int:
    """Query block for a window of `window` positions each side: about `target`, dividing the
    window evenly so the windows waste little and are copied few times (256 -> 128, 84 -> 84, 3 -> 3)."""
    return max(1, math.ceil(window / math.ceil(window / target)))


def gather_global(is_global: torch.Tensor, count: int | None = None):
    """(B, N) bool -> (index (B, G) long of the global positions in order, valid (B, G) bool).

    G = `count` when the caller knows a bound on every row's count (nothing then waits for the
    device), else the largest count in the batch (0 when there is none). The invalid slots of a
    row point at distinct non-global positions."""
    if count is None:
        count = int(is_global.sum(dim=1).max()) if is_global.numel() else 0
    g = min(count, is_global.shape[1])
    order = torch.sort((~is_global).to(torch.int8), dim=1, stable=True).indices[:, :g]  # globals first
    return order, is_global.gather(1, order)


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, H, N, d), index (B, G) -> (B, H, G, d)."""
    b, h, _, d = t.shape
    return t.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))


_DILATION_GROUPS: dict = {}


def dilation_groups(dilations, device):
    """Heads grouped by dilation: ([(dilation, its heads as an index tensor)], the inverse of
    the groups' head order), or ([(dilation, None)], None) when every head has the same one.
    Made once per (dilations, device): no host-to-device copy in a step, which a CUDA graph
    could not capture."""
    key = (tuple(dilations), str(device))
    if key not in _DILATION_GROUPS:
        _DILATION_GROUPS[key] = _make_dilation_groups(tuple(dilations), device)
    return _DILATION_GROUPS[key]


@outside_inference_mode  # a cache entry: later calls with autograd index with it
def _make_dilation_groups(dilations: tuple, device):
    dils = sorted(set(dilations))
    if len(dils) == 1:
        return [(dils[0], None)], None
    heads = [[i for i, x in enumerate(dilations) if x == d] for d in dils]
    order = torch.tensor([i for group in heads for i in group], device=device)
    return [(d, torch.tensor(h, device=device)) for d, h in zip(dils, heads)], torch.argsort(order)


def grouped_dilated_attention(q, k, v, window: int, dilations, causal: bool, key_mask, block: int,
                              extra_k=None, extra_v=None, extra_allowed=None,
                              scale: float | None = None) -> torch.Tensor:
    """`dilated_local_attention` with one dilation per head (len(dilations) == H): the heads are
    grouped by dilation value (a handful of groups, `dilation_groups`) and each group runs once."""
    groups, inverse = dilation_groups(dilations, q.device)
    if inverse is None:
        return dilated_local_attention(q, k, v, window, groups[0][0], causal, key_mask, block,
                                       extra_k, extra_v, extra_allowed, scale=scale)
    outs = []
    for dil, sel in groups:
        ek = None if extra_k is None else extra_k[:, sel]
        ev = None if extra_v is None else extra_v[:, sel]
        ea = extra_allowed if extra_allowed is None or extra_allowed.shape[1] == 1 else extra_allowed[:, sel]
        outs.append(dilated_local_attention(q[:, sel], k[:, sel], v[:, sel], window, dil, causal,
                                            key_mask, block, ek, ev, ea, scale=scale))
    return torch.cat(outs, dim=1)[:, inverse]


def longformer_attention(qs, ks, vs, qg_rows, kg, vg, index, valid, window: int,
                         dilations, causal: bool, key_mask, block: int,
                         scale: float | None = None, rows=None) -> torch.Tensor:
    """Longformer attention (Beltagy et al. 2020, section 3.1), all projections given.

    qs/ks/vs (B, H, N, d): the sliding-window projections; kg/vg (B, H, N, d): the global ones;
    index/valid (B, G): the global positions (`gather_global` of a (B, N) mask that is already
    False at padding); qg_rows (B, H, G, d): the global queries at those positions; or, instead
    of qg_rows, kg and vg, the global rows' outputs `rows` (B, H, G, d) computed by the caller
    (the layer folds Kg, Vg into the queries). dilations: one per head.
    - a non-global query i attends, with qs·ks and vs, to the keys j in its dilated window that are
      not global, plus every global key j (causal: j <= i): one softmax;
    - a global query i attends with qg·kg and vg to every real key (causal: j <= i).
    Returns (B, H, N, d). Memory O(N · (window + block + G)) plus O(N · G) for the global rows.
    """
    bsz, h, n, d = qs.shape
    real = torch.ones(bsz, n, dtype=torch.bool, device=qs.device) if key_mask is None else key_mask
    pos = torch.arange(n, device=qs.device)
    g = index.shape[1]
    if g == 0:
        return grouped_dilated_attention(qs, ks, vs, window, dilations, causal, key_mask, block,
                                         scale=scale)
    is_global = torch.zeros(bsz, n, dtype=torch.bool, device=qs.device).scatter(1, index, valid)
    extra_ok = valid[:, None, None, :].expand(bsz, 1, n, g)                   # (B, 1, N, G)
    if causal:
        extra_ok = extra_ok & (index[:, None, None, :] <= pos[None, None, :, None])
    out = grouped_dilated_attention(qs, ks, vs, window, dilations, causal, real & ~is_global,
                                    block, take_rows(ks, index), take_rows(vs, index), extra_ok,
                                    scale=scale)
    # global rows: their own projections, every (earlier) real key
    glob = rows
    if glob is None:
        allowed = real[:, None, None, :].expand(bsz, 1, g, n)                 # (B, 1, G, N)
        if causal:
            allowed = allowed & (pos[None, None, None, :] <= index[:, None, :, None])
        glob = dense_rows(qg_rows, kg, vg, allowed, scale=scale)              # (B, H, G, d)
    glob = torch.where(valid[:, None, :, None], glob, take_rows(out, index))
    return out.scatter(2, index[:, None, :, None].expand_as(glob), glob)


def longformer_dense_allowed(is_global: torch.Tensor, window: int, dilation: int, causal: bool,
                             key_mask=None):
    """The oracle's two (B, 1, N, N) masks: (local rows: window minus global keys, plus global
    keys; global rows: everything real). Tests only: materialises N × N."""
    b, n = is_global.shape
    i = torch.arange(n, device=is_global.device)
    win = DilatedWindow(window, dilation, causal).allows(i[:, None], i[None, :])
    glob_key = is_global[:, None, None, :]
    local = (win & ~glob_key) | glob_key
    full = torch.ones(n, n, dtype=torch.bool, device=is_global.device)
    if causal:
        causal_mask = i[None, :] <= i[:, None]
        local, full = local & causal_mask, full & causal_mask
    real = torch.ones(b, n, dtype=torch.bool) if key_mask is None else key_mask
    real = real[:, None, None, :]
    return local & real, full[None, None] & real


# ------------------------------------------------------------------------------------- big bird
def bigbird_attention(q, k, v, block: int, num_random: int, num_global: int, seed: int,
                      key_mask=None, scale: float | None = None) -> torch.Tensor:
    """Big Bird ITC block-sparse attention (Zaheer et al. 2020, section 2 / appendix D).

    q, k, v (B, H, N, d), any N (padded to blocks; random blocks drawn among the existing ones).
    Each non-global query block attends to its 3 sliding blocks (an overlapping view), its r
    random blocks (gathered) and the g global blocks (shared), minus repeats, in one softmax;
    the first g query blocks attend densely to every key: O(N · b · (3 + r + 2g)).
    The same definition as `BigBirdPattern(block, n_blocks, num_random, num_global, seed)`.
    """
    bsz, h, n, d = q.shape
    n_blocks = -(-n // block)
    n_glob = min(num_global * block, n)
    real = torch.ones(bsz, n, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    head = None
    if n_glob:
        head = dense_rows(q[:, :, :n_glob], k, v, real[:, None, None, :], scale=scale)
        if n_glob == n:
            return head
    rand, _ = BigBirdPattern(block, n_blocks, num_random, num_global, seed).tables(q.device)
    mask = pad_mask_to_multiple(key_mask, n, block, bsz, device=q.device)      # (B, Np)
    q, k, v = (pad_to_multiple(t, block)[0] for t in (q, k, v))
    nb = n_blocks
    qb = torch.arange(nb, device=q.device)
    # sliding: blocks a-1, a, a+1 where they exist
    exists = (qb[:, None] + torch.arange(-1, 2, device=q.device) >= 0) & \
        (qb[:, None] + torch.arange(-1, 2, device=q.device) < nb)             # (nq, 3)
    sliding = exists.repeat_interleave(block, -1)[None] & window_view(mask, block, 1, 1, dim=1)
    # random blocks (gathered) then global blocks (shared), as extra keys of each query block
    g = min(num_global, nb)
    blocks_k = k.view(bsz, h, nb, block, d)
    blocks_v = v.view(bsz, h, nb, block, d)
    idx = rand.clamp_min(0)
    rk = blocks_k[:, :, idx].permute(0, 2, 1, 3, 4, 5).flatten(3, 4)
    rv = blocks_v[:, :, idx].permute(0, 2, 1, 3, 4, 5).flatten(3, 4)
    mask_blocks = mask.view(bsz, nb, block)
    rand_ok = ((rand >= 0)[None, :, :, None] & mask_blocks[:, idx]).flatten(2)   # (B, nq, r·b)
    gk = k[:, None, :, :g * block]                                            # (B, 1, H, g·b, d)
    gv = v[:, None, :, :g * block]
    glob_ok = ((qb[:, None] - torch.arange(g, device=q.device)).abs() > 1)    # not also sliding
    glob_ok = glob_ok.repeat_interleave(block, -1)[None] & mask[:, None, :g * block]  # (B, nq, g·b)
    extra_k, extra_v = (rk, gk), (rv, gv)
    pad_query = ~mask.view(bsz, nb, block, 1)
    allowed = (sliding[:, :, None, :] | pad_query)[:, :, None]                # (B, nq, 1, b, 3b)
    extra_ok = torch.cat([rand_ok, glob_ok], -1)[:, :, None, None, :] & ~pad_query[:, :, None]
    extra_ok = extra_ok.expand(bsz, nb, 1, block, -1)
    out = blocked_window_attention(q, k, v, block, 1, 1, allowed, extra_k, extra_v, extra_ok,
                                   scale=scale)[:, :, n_glob:n]
    return out if head is None else torch.cat([head, out], dim=2)


# ------------------------------------------------------------------------------------------ etc
def relative_bias(table: torch.Tensor, n_q: int, n_k: int, device=None) -> torch.Tensor:
    """(H, 2R+1) -> (H, n_q, n_k) bias at clamp(j - i, -R, R) (small sets / tests only)."""
    radius = (table.shape[-1] - 1) // 2
    rel = torch.arange(n_k, device=device)[None, :] - torch.arange(n_q, device=device)[:, None]
    return table[:, rel.clamp(-radius, radius) + radius]


def etc_attention(ql, kl, vl, qg, kg, vg, window: int, block: int, l2l_bias, g2g_bias,
                  key_mask=None, segment_ids=None, l2g_bias=None, scale: float | None = None):
    """ETC global-local attention (Ainslie et al. 2020, section 2: global-local attention, structured inputs).

    Long input ql/kl/vl (B, H, N, d), global input qg/kg/vg (B, H, G, d).
    - l2l: |i - j| <= window, plus a per-head bias l2l_bias (H, 2R+1) at the clipped relative
      position; l2g: every global token (with segment_ids: bias l2g_bias (H, 2) for "my own global
      token" (index 1) or another (index 0)). One softmax over both.
    - g2g: every global token, bias g2g_bias (H, 2R+1) at the clipped relative position;
      g2l: every real long token (with segment_ids (B, N): only those of its own segment, the
      paper's hard mask). One softmax over both.
    Returns (long (B, H, N, d), global (B, H, G, d)).
    """
    bsz, h, n, d = ql.shape
    g = qg.shape[2]
    if segment_ids is None:
        from .global_cuda import etc_flex_or_none   # (that module builds on this one)

        flexed = etc_flex_or_none(ql, kl, vl, qg, kg, vg, window, l2l_bias, g2g_bias, key_mask,
                                  scale)
        if flexed is not None and flexed[1] is not None:
            return flexed
    else:
        flexed = None
    real = torch.ones(bsz, n, dtype=torch.bool, device=ql.device) if key_mask is None else key_mask
    own = None
    if flexed is not None:
        long_out = flexed[0]
    else:
        extra = torch.zeros(bsz, 1, n, g, dtype=ql.dtype, device=ql.device)  # l2g additive mask
        if segment_ids is not None:
            own = segment_ids[:, :, None] == torch.arange(g, device=ql.device)    # (B, N, G)
            extra = l2g_bias.to(ql.dtype)[None, :, None, :].expand(bsz, h, 1, 2)
            extra = torch.where(own[:, None], extra[..., 1:], extra[..., :1])  # (B, H, N, G)
        long_out = local_attention_with_extras(ql, kl, vl, window, False, key_mask, block,
                                               kg, vg, extra, rel_bias=l2l_bias, scale=scale)
    # global rows: [g2g | g2l] in one softmax
    g2g = relative_bias(g2g_bias, g, g, device=ql.device).to(ql.dtype)[None].expand(bsz, h, g, g)
    g2l_ok = real[:, None, None, :].expand(bsz, 1, g, n)
    if own is not None:
        g2l_ok = g2l_ok & own.transpose(1, 2)[:, None]
    g2l = torch.where(g2l_ok, 0.0, NEG_INF).to(ql.dtype).expand(bsz, h, g, n)
    glob_out = dense_rows(qg, torch.cat([kg, kl], 2), torch.cat([vg, vl], 2),
                          torch.cat([g2g, g2l], -1), scale=scale)
    return long_out, glob_out


def etc_dense_bias(n: int, g: int, window: int, l2l_bias, g2g_bias, key_mask=None,
                   segment_ids=None, l2g_bias=None, batch: int = 1):
    """The oracle's additive mask (B, H, G+N, G+N) over the sequence [global; long]
    (tests only: materialises N × N)."""
    h = l2l_bias.shape[0]
    total = torch.full((batch, h, g + n, g + n), NEG_INF, dtype=l2l_bias.dtype)
    real = torch.ones(batch, n, dtype=torch.bool) if key_mask is None else key_mask
    i = torch.arange(n)
    l2l = relative_bias(l2l_bias, n, n).expand(batch, h, n, n)
    l2l_ok = ((i[:, None] - i[None, :]).abs() <= window)[None, None] & real[:, None, None, :]
    total[:, :, g:, g:] = torch.where(l2l_ok, l2l, NEG_INF)
    total[:, :, :g, :g] = relative_bias(g2g_bias, g, g)
    g2l_ok = real[:, None, None, :].expand(batch, 1, g, n)
    l2g = torch.zeros(batch, h, n, g, dtype=l2l_bias.dtype)
    if segment_ids is not None:
        own = segment_ids[:, :, None] == torch.arange(g)
        g2l_ok = g2l_ok & own.transpose(1, 2)[:, None]
        l2g = torch.where(own[:, None], l2g_bias[None, :, None, 1:], l2g_bias[None, :, None, :1])
    total[:, :, :g, g:] = torch.where(g2l_ok, 0.0, NEG_INF)
    total[:, :, g:, :g] = l2g
    return total
