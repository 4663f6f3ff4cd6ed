"""Dense O(N²) attention: the naive oracle every test compares against, and the SDPA fast path.

Shapes: q (B, H, N, d), k and v (B, H, M, d). `allowed` is a bool tensor broadcastable to
(B, H, N, M), True where query i may attend to key j. A query with no allowed key gets 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_allowed(n_queries: int, n_keys: int, offset: int = 0, device=None) -> torch.Tensor:
    """(N, M) bool: query i (absolute position offset + i) sees key j iff j <= offset + i."""
    i = torch.arange(n_queries, device=device)[:, None] + offset
    j = torch.arange(n_keys, device=device)[None, :]
    return j <= i


def padding_allowed(key_mask: torch.Tensor) -> torch.Tensor:
    """(B, M) bool key mask -> (B, 1, 1, M), broadcastable over heads and queries."""
    return key_mask[:, None, None, :]


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis restricted to `allowed`; rows with nothing allowed give 0."""
    if allowed is None:
        return scores.softmax(dim=-1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, written over `scores` (no second tensor of its size: on CPU a
    fresh large tensor costs page faults as well as memory). Falls back to a new tensor where
    the in-place kernel is not available."""
    try:
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    except (AttributeError, RuntimeError, NotImplementedError):
        return scores.copy_(torch.softmax(scores, dim=-1))


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The oracle: softmax(q kᵀ · scale, restricted to `allowed`) v, materialising every score."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, N, M)
    return torch.matmul(masked_softmax(scores, allowed), v)


def dense_allowed(n: int, causal: bool, key_mask: torch.Tensor | None, device=None):
    """The allowed matrix of plain self-attention (None = everything), for the oracle."""
    allowed = causal_allowed(n, n, device=device) if causal else None
    if key_mask is not None:
        pad = padding_allowed(key_mask)
        allowed = pad if allowed is None else allowed & pad
    return allowed


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   key_mask: torch.Tensor | None = None, offset: int = 0,
                   scale: float | None = None) -> torch.Tensor:
    """Fast path through `scaled_dot_product_attention` (FlashAttention where it applies).

    key_mask (B, M): True = real key. `offset`: absolute position of the first query minus that of
    the first key, for causal decode against a cache (queries are the last N of M positions).
    Padded queries (where key_mask is False at their own position, self-attention only) are let see
    every key so no row is empty; their outputs are not meaningful. scale: None = 1/sqrt(d).
    """
    n, m = q.shape[-2], k.shape[-2]
    if key_mask is None:
        if not causal or n == 1 and offset == m - 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if offset == 0 and n == m:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        allowed = causal_allowed(n, m, offset=offset, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    allowed = padding_allowed(key_mask)  # (B, 1, 1, M)
    if causal:
        allowed = allowed & causal_allowed(n, m, offset=offset, device=q.device)
    if n == m:
        allowed = allowed | ~key_mask[:, None, :, None]  # padded queries see everything
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
