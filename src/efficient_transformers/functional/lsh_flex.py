"""The CUDA path of LSH attention (`functional/lsh.py`): every round's chunks as one FlexAttention
call, the pair rules evaluated inside the kernel.

The chunked path materialises, per round, the scores of each sorted chunk against (previous
chunk, own chunk) and a (c, 2c) mask built from bucket ids and earlier rounds' locations: at 64k
tokens with 4 rounds, tens of GiB moved per forward + backward. Here the rounds are extra heads
(B, H·R, P, d) of sorted rows, a BlockMask names the key blocks a query block can reach, and a
mask_mod tells, per (query slot, key slot), what `_blocked_pairs` tells: same bucket, inside the
static window (non-causal: own or previous chunk, not itself; causal: 1 to c slots back), and
not already a pair of an earlier round. FlexAttention returns each round's output and
log-sum-exp, and the rounds merge as in the chunked path (`RoundSort.merge_rounds`); its
backward takes the gradient through both.

Tables the mask_mod reads (padded to whole blocks so that no lookup reads past the end):
buckets in sorted order (B, H·R, P') and, for rounds s < R - 1, every sorted slot's location in
round s (B, H·R, P', R - 1) (`RoundSort.sorted_locations`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .flex import flex_callable, flex_with_lse
from .lsh import RoundSort, token_rows
from .unit import unit_vectors

BLOCK_SIZE = 128  # FlexAttention's sparse block (query and key)
FORCE = None  # tests: a flex_attention callable (its eager reference) reformer uses on any device


def chunk_block_mask(p: int, chunk: int, causal: bool, mask_mod, block: int, device):
    """BlockMask over P sorted slots in blocks of `block`: query block m lists the key blocks
    from the one holding its first query's earliest key to the one holding its last query's
    latest key. Causal: slot i sees i - c to i - 1. Non-causal: slot i sees its own chunk and
    the one before, (floor(i / c) - 1)·c to (floor(i / c) + 1)·c - 1 (a chunk may straddle
    blocks, so the span may reach into the next block)."""
    from torch.nn.attention.flex_attention import BlockMask

    n_blocks = -(-p // block)
    m = torch.arange(n_blocks, device=device)
    first_q, last_q = m * block, ((m + 1) * block).clamp_max(p) - 1
    if causal:
        first_k, last_k = first_q - chunk, last_q - 1
    else:
        first_k = (torch.div(first_q, chunk, rounding_mode="floor") - 1) * chunk
        last_k = (torch.div(last_q, chunk, rounding_mode="floor") + 1) * chunk - 1
    first = torch.div(first_k.clamp_min(0), block, rounding_mode="floor")
    last = torch.div(last_k.clamp(0, p - 1), block, rounding_mode="floor")
    count = (last - first + 1).to(torch.int32)                               # (nb,)
    indices = (first[:, None] + m[None, :]).clamp_max(n_blocks - 1).to(torch.int32)  # (nb, nb)
    return BlockMask.from_kv_blocks(count[None, None], indices[None, None], BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(p, p))


def _pair_mask_mod(sorted_buckets, locations, rounds: int, chunk: int, causal: bool, window):
    """mask_mod(b, hr, i, j) over sorted slots of head·round hr (see the module docstring)."""
    lo, hi = window

    def mask_mod(b, hr, i, j):
        allowed = sorted_buckets[b, hr, i] == sorted_buckets[b, hr, j]
        if causal:
            allowed = allowed & (i - j >= 1) & (i - j <= chunk)
        else:
            gap = i // chunk - j // chunk
            allowed = allowed & (gap >= 0) & (gap <= 1) & (i != j)
        r = hr % rounds
        for s in range(rounds - 1):
            dist = locations[b, hr, i, s] - locations[b, hr, j, s]
            allowed = allowed & ~((r > s) & (dist >= lo) & (dist <= hi))
        return allowed

    return mask_mod


def lsh_attention_flex(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, chunk: int,
                       causal: bool, n_buckets: int, scale: float | None = None,
                       block: int = BLOCK_SIZE, flex=None) -> torch.Tensor:
    """`lsh_attention` through FlexAttention: the same arguments and result (B, H, P, e).

    flex: the flex_attention callable (default: `functional.flex`'s compiled one; tests pass
    FlexAttention's eager reference, dense scores, which also runs on the CPU)."""
    b_, h, p, d = qk.shape
    e = v.shape[-1]
    r = buckets.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rounds = RoundSort(buckets)

    # q, k = q/|q| and v in every round's sorted order: (B, H·R, P, ·), rounds as heads. Three
    # gathers, not one of [q, k, v]: their gradients come back apart, and a packed gather's
    # backward would first concatenate them
    q_s, k_s, v_s = (rounds.sorted_rows(token_rows(t)).view(b_, h * r, p, -1)
                     for t in (qk, unit_vectors(qk), v))

    pad = (-p) % block
    sorted_buckets = rounds.sorted_buckets().view(b_, h * r, p)
    sorted_buckets = F.pad(sorted_buckets, (0, pad), value=-1)              # (B, H·R, P')
    locations, window = rounds.sorted_locations(chunk, causal, n_buckets)
    if r > 1:
        locations = locations.view(b_, h * r, p, r)[..., :r - 1]
        locations = F.pad(locations, (0, 0, 0, pad))                        # (B, H·R, P', R-1)
        if locations.dtype == torch.int16:
            locations = locations.int()
    mask_mod = _pair_mask_mod(sorted_buckets, locations, r, chunk, causal, window)
    block_mask = chunk_block_mask(p, chunk, causal, mask_mod, block, qk.device)
    flex = flex_callable() if flex is None else flex
    out_s, lse_s = flex_with_lse(flex, q_s, k_s, v_s, block_mask, scale)
    return rounds.merge_rounds(out_s.reshape(-1, e), lse_s.reshape(-1), v)
