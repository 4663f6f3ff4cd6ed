"""The CUDA path of the global-token mechanisms (longformer, bigbird, etc): FlexAttention for
the window and random blocks, the global tokens kept out of it. Inside FlexAttention a global
row is one query block walking every key block, and in the backward a global key block is walked
by every query block: one thread block doing N/128 steps while the rest of the GPU waits. So the
global keys are merged in by log-sum-exp (`merge_global_keys`, one FlashAttention call where
nothing is masked) and the global rows are computed apart (`global_rows`: FlashAttention over
chunks of the keys, or explicit matmuls). The blocked forms they replace are in `global_local`.
"""

from __future__ import annotations

import math
import weakref

import torch

from .eager import outside_graphs
from .flash import flash_rows, merge_flash_keys, uses_flash_keys
from .global_local import DilatedWindow, dense_rows, relative_bias
from .merge import attention_with_lse, merge_pair, softmax_with_lse, stat_dtype
from .patterns import Pattern

_SCORE_MODS: dict[int, tuple] = {}   # id(table) -> (weak ref to table, score_mod, [its copies])
# FlexAttention's backward adds each (query, key) pair's score gradient into the captured table
# with an atomic add. Clamped at ±R, most pairs of a window share the two end entries (at
# window 84, R = 12: 144 of a query's 169 keys), so one table would take millions of atomic adds
# on 2·H addresses. The score_mod reads a copy chosen by (query % 64, key % 8) instead: 512
# copies per entry, about 16 adds per address per 64 × 128 tile.
BIAS_COPIES = (64, 8)


def relative_score_mod(table: torch.Tensor):
    """FlexAttention score_mod adding ETC's relative bias table (H, 2R+1) at clamp(j − i, −R, R)
    + R. It reads `BIAS_COPIES` copies of the table (Q, K, H, 2R+1; at least float32), made
    afresh from `table` at each call (their gradients sum back into it); `release_copies` drops
    them after the FlexAttention call (which keeps what its backward needs). One function per
    table object (the compiled kernel guards on the function; a captured parameter keeps its
    identity through `.to()` and optimiser steps; a deep copy of the layer gets its own); the
    copies change from call to call inside a holder the function reads (same shape: no
    recompiling). The cache holds the table weakly: its entry goes when the table does."""
    entry = _SCORE_MODS.get(id(table))
    if entry is None or entry[0]() is not table:
        entry = _new_score_mod(table)
    work = torch.promote_types(table.dtype, torch.float32)  # bf16 tables: float32 adds
    entry[2][0] = table.to(work).view(1, 1, *table.shape).repeat(*BIAS_COPIES, 1, 1)
    return entry[1]


@outside_graphs  # weakref.finalize cannot be traced; the first call per table only
def _new_score_mod(table: torch.Tensor) -> tuple:
    """The cache entry of `relative_score_mod` for a table not seen before."""
    radius = (table.shape[-1] - 1) // 2
    rows, cols = BIAS_COPIES
    copies: list = [None]

    def score_mod(score, b, h, q_idx, kv_idx):
        offset = (kv_idx - q_idx).clamp(-radius, radius) + radius
        return score + copies[0][q_idx % rows, kv_idx % cols, h, offset].to(score.dtype)

    ref = weakref.ref(table)
    entry = _SCORE_MODS[id(table)] = (ref, score_mod, copies)
    weakref.finalize(table, _forget_score_mod, id(table), ref)
    return entry


def release_copies(table: torch.Tensor) -> None:
    """Drop the copies `relative_score_mod(table)` made (they reach the table through autograd,
    so a cache holding them would keep a deleted layer's table alive)."""
    entry = _SCORE_MODS.get(id(table))
    if entry is not None and entry[0]() is table:
        entry[2][0] = None


def _forget_score_mod(key: int, ref) -> None:
    if key in _SCORE_MODS and _SCORE_MODS[key][0] is ref:
        del _SCORE_MODS[key]


def etc_flex_or_none(ql, kl, vl, qg, kg, vg, window: int, l2l_bias, g2g_bias, key_mask, scale):
    """ETC without segment ids where FlexAttention applies (CUDA): (long out, global out or
    None), else None. Long queries: the window (|i − j| <= window, relative bias as a score_mod)
    through FlexAttention, the G global keys merged in by log-sum-exp (one flash call,
    `flash.merge_flash_keys`). Global rows without a key mask: g2g (G × G, relative bias)
    explicit, merged with every long key as chunked flash calls; with one, None: the caller's
    dense rows."""
    if not flex_applies(ql):   # before the score_mod: its table copies are for FlexAttention only
        return None
    try:
        out = flex_or_none(ql, kl, vl, DilatedWindow(window), key_mask, return_lse=True,
                           score_mod=relative_score_mod(l2l_bias))
    finally:
        release_copies(l2l_bias)
    if out is None:
        return None
    long_out = merge_keys(*out, ql, kg, vg, scale=scale)   # l2g: every global key, no bias
    if key_mask is not None or not uses_flash_keys(qg):
        return long_out, None
    g = qg.shape[2]
    scale = 1.0 / math.sqrt(qg.shape[-1]) if scale is None else scale
    scores = (torch.matmul(qg * scale, kg.transpose(-1, -2)).to(stat_dtype(qg.dtype))
              + relative_bias(g2g_bias, g, g, device=qg.device))               # (B, H, G, G)
    p, lse = softmax_with_lse(scores)
    g2g = torch.matmul(p.to(vg.dtype), vg)
    return long_out, merge_flash_keys(g2g, lse, qg, kl, vl, scale, chunked=True)


def flex_applies(q) -> bool:
    """Whether `flex_or_none` runs FlexAttention for q (B, H, N, d): `flex.use_flex` where
    functional/flex.py imports."""
    try:
        from .flex import use_flex
    except ImportError:
        return False
    return use_flex(q)


def flex_or_none(q, k, v, pattern: Pattern, key_mask=None, return_lse: bool = False,
                 score_mod=None):
    """FlexAttention through functional/flex.py (`flex_pattern_attention`) where `use_flex(q)`
    says it applies (CUDA), else None so the caller takes the blocked path. The one place the
    global-token mechanisms (and routing's local heads) call FlexAttention."""
    if not flex_applies(q):
        return None
    from .flex import flex_pattern_attention

    return flex_pattern_attention(q, k, v, pattern, key_mask, return_lse=return_lse,
                                  score_mod=score_mod)


def _global_allowed(n_q: int, n_k: int, key_mask, causal: bool, device):
    """(B|1, 1, n_q, n_k) bool or None: keys 0..n_k-1 where real and (causal) j <= i, for the
    queries at positions 0..n_q-1."""
    allowed = None if key_mask is None else key_mask[:, None, None, :n_k]
    if causal:
        i = torch.arange(n_q, device=device)[:, None]
        past = torch.arange(n_k, device=device)[None, :] <= i
        allowed = past if allowed is None else allowed & past
    return allowed


def global_rows(q_rows, k, v, key_mask=None, causal: bool = False) -> torch.Tensor:
    """The first g queries q_rows (B, H, g, d) against every real key (B, H, N, d) (causal:
    j <= i) -> (B, H, g, d), by `dense_rows`, or without a mask or causal rule on CUDA by
    `flash.flash_rows` (the keys in chunks as extra heads)."""
    allowed = _global_allowed(q_rows.shape[2], k.shape[2], key_mask, causal, q_rows.device)
    if allowed is None and uses_flash_keys(q_rows):
        return flash_rows(q_rows, k, v)
    if allowed is None:
        allowed = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=k.device)
    return dense_rows(q_rows, k, v, allowed)


def merge_keys(out, lse, q, k, v, allowed=None, scale: float | None = None) -> torch.Tensor:
    """A part (out (B, H, N, d), lse (B, H, N)) merged by log-sum-exp with every query's
    attention to the few keys k, v (B, H, g, d) where `allowed` (None: all) -> (B, H, N, d):
    one softmax over the union. Nothing masked, on CUDA: one FlashAttention call
    (`flash.merge_flash_keys`); else explicit, O(N · g)."""
    if allowed is None and uses_flash_keys(q):
        return merge_flash_keys(out, lse, q, k, v, scale)
    return merge_pair(out, lse, *attention_with_lse(q, k, v, allowed, scale))


def merge_global_keys(out, lse, q, k, v, g: int, key_mask=None, causal: bool = False):
    """FlexAttention's (out (B, H, N, d), lse (B, H, N)) over a pattern without the global
    columns, merged with every query's attention to the first g keys of k, v (B, H, N, d)
    (causal: j <= i) by `merge_keys` -> (B, H, N, d)."""
    allowed = _global_allowed(q.shape[2], g, key_mask, causal, q.device)
    return merge_keys(out, lse, q, k[:, :, :g], v[:, :, :g], allowed)
