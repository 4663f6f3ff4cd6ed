"""`transformer`: the dense O(N²) baseline (Vaswani et al. 2017, section 3.2).

Fast path: `scaled_dot_product_attention` (FlashAttention on CUDA). Decode keeps a KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional.dense import sdpa_attention
from ..functional.patterns import cached_decode
from ..registry import register
from .base import Attention


@register("transformer")
class DenseAttention(Attention):
    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__(dim, heads, causal)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def qkv(self, x: torch.Tensor):
        """(B, N, dim) -> q, k, v each (B, H, N, d)"""
        return self.split_projection(self.to_qkv(x), 3)

    def attend(self, x, mask):
        q, k, v = self.qkv(x)
        out = sdpa_attention(q, k, v, causal=self.causal, key_mask=mask)
        return self.to_out(self.merge_heads(out))

    def decode_step(self, x_new, state):
        q, k, v = self.qkv(x_new)  # (B, H, T, d)
        if state is not None:
            k = torch.cat([state["k"], k], dim=2)
            v = torch.cat([state["v"], v], dim=2)
        length = k.shape[2]
        out = sdpa_attention(q, k, v, causal=True, offset=length - q.shape[2])
        return self.to_out(self.merge_heads(out)), {"k": k, "v": v, "length": length}


class PatternAttention(DenseAttention):
    """A dense layer's projections around a sparse `core(q, k, v, mask)` (B, H, N, d) ->
    (B, H, N, d); decode with a KV cache restricted to the mechanism's patterns."""

    def core(self, q, k, v, mask=None):
        raise NotImplementedError

    def attend(self, x, mask):
        q, k, v = self.qkv(x)
        return self.to_out(self.merge_heads(self.core(q, k, v, mask)))

    def pattern_decode(self, x_new, state, patterns):
        """One decode step against the cache, each new query restricted to `patterns`
        (`functional.patterns.cached_decode`)."""
        q, k, v = self.qkv(x_new)
        out, state = cached_decode(q, k, v, state, patterns, self.core)
        return self.to_out(self.merge_heads(out)), state
