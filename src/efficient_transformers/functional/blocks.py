"""Pad / chunk helpers and the block-sparse attention primitive shared by the pattern methods.

A fixed pattern is a `Pattern` (functional/patterns.py): an elementwise predicate `allows(i, j)`
plus, for a block size b, the list of key blocks each query block may touch. The CPU path gathers
those key blocks and runs `scaled_dot_product_attention` per query block with the predicate as a
mask: memory O(N · K · b) for K key blocks per query block, never N × N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def at_most(value: int, bound: int) -> int:
    """min(value, bound) as a branch: under torch.compile's dynamic shapes the comparison becomes
    a guard, where a symbolic min() of a length failed Inductor's lowering (torch 2.13)."""
    return bound if value > bound else value


def pad_length(n: int, multiple: int) -> int:
    """How many positions to append so that n becomes a multiple of `multiple`."""
    return (-n) % multiple


def pad_to_multiple(t: torch.Tensor, multiple: int, dim: int = -2, value: float = 0.0):
    """Pad axis `dim` of t at the end to a multiple of `multiple`. Returns (padded, pad)."""
    pad = pad_length(t.shape[dim], multiple)
    if pad == 0:
        return t, 0
    dim = dim % t.dim()
    spec = [0, 0] * (t.dim() - dim - 1) + [0, pad]
    return F.pad(t, spec, value=value), pad


def pad_mask_to_multiple(mask: torch.Tensor | None, n: int, multiple: int, batch: int,
                         device=None) -> torch.Tensor:
    """(B, N) key mask (or None = all real) -> (B, N + pad) with the appended positions False."""
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    padded, _ = pad_to_multiple(mask, multiple, dim=-1, value=False)
    return padded


def key_positions(key_blocks: torch.Tensor, block: int) -> torch.Tensor:
    """(..., nq, K) key-block ids -> (..., nq, K*b) key positions (block id -1 gives negatives)."""
    offsets = torch.arange(block, device=key_blocks.device)
    return (key_blocks[..., None] * block + offsets).flatten(-2)


def gather_key_blocks(t: torch.Tensor, key_blocks: torch.Tensor, block: int) -> torch.Tensor:
    """t (B, H, N, d) -> (B, H, nq, K*b, d): for each query block, its key blocks side by side.
    key_blocks is (nq, K) or (H, nq, K); entries < 0 gather block 0 (mask them out)."""
    b, h, n, d = t.shape
    blocks = t.view(b, h, n // block, block, d)
    index = key_blocks.clamp_min(0)
    if index.dim() == 2:
        out = blocks[:, :, index]                                   # (B, H, nq, K, b, d)
    else:
        heads = torch.arange(h, device=t.device)[:, None, None]
        out = blocks[:, heads, index]                               # (B, H, nq, K, b, d)
    return out.flatten(3, 4)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_blocks: torch.Tensor, allowed: torch.Tensor, block: int,
                           scale: float | None = None) -> torch.Tensor:
    """Attention of each query block to its gathered key blocks.

    q, k, v: (B, H, N, d) with N a multiple of `block`; key_blocks: (nq, K) or (H, nq, K);
    allowed: bool, broadcastable to (B, H, nq, b, K*b). Returns (B, H, N, d). A query row with
    nothing allowed gives 0 on CPU; callers keep every real query's row non-empty.
    """
    bsz, h, n, d = q.shape
    nq = n // block
    kg = gather_key_blocks(k, key_blocks, block)                    # (B, H, nq, K*b, d)
    vg = gather_key_blocks(v, key_blocks, block)
    qb = q.reshape(bsz, h * nq, block, d)
    m = kg.shape[-2]
    allowed = allowed.expand(bsz, h, nq, block, m).reshape(bsz, h * nq, block, m)
    out = F.scaled_dot_product_attention(qb, kg.reshape(bsz, h * nq, m, d),
                                         vg.reshape(bsz, h * nq, m, d), attn_mask=allowed,
                                         scale=scale)
    return out.reshape(bsz, h, n, d)
