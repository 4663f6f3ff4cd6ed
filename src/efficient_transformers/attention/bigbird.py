"""`bigbird`: Big Bird ITC block-sparse attention (Zaheer et al. 2020, arXiv:2007.14062).

Section 2 (the generalised attention: r random keys, w sliding keys, g global keys) in the
block form of appendix D, the ITC variant ("internal transformer construction": existing tokens
are made global): with blocks of `block_size`, each query block sees 3 sliding blocks (itself and
its two neighbours), `num_random_blocks` random blocks and the first `num_global` blocks; the first
`num_global` query blocks attend to everything.

Random blocks: a seed is drawn from torch's RNG at construction and stored as a buffer
(`random_seed`, saved with the weights). For a sequence of n blocks the random blocks are drawn
from that seed alone, among the existing blocks that are neither sliding nor global: fixed per
layer, reproducible, the same for every batch element and every call. A sequence whose blocks are
all covered (n_blocks <= 3 + r + g, or shorter than the global blocks) gets full attention.

Encoder only: the survey lists Big Bird as not decodable, so `causal=True` is refused.
CPU path: gathered key blocks (3 + r + g per query block) and dense global rows, O(N · b · (3 + r
+ 2g)); CUDA: FlexAttention for the sliding and random blocks (functional/flex.py) where it
applies, the global blocks' keys merged in by log-sum-exp and their rows by explicit matmuls
(inside FlexAttention either would leave one thread block walking all N/128 blocks).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..functional.global_cuda import flex_or_none, global_rows, merge_global_keys
from ..functional.global_local import BigBirdPattern, bigbird_attention
from ..registry import register
from .base import Attention, check_positive_int


@register("bigbird")
class BigBirdAttention(Attention):
    small_options = {"block_size": 4, "num_random_blocks": 2, "num_global": 1}

    def __init__(self, dim: int, heads: int, causal: bool = False, block_size: int = 64,
                 num_random_blocks: int = 3, num_global: int = 2):
        super().__init__(dim, heads, causal)
        self.block_size = check_positive_int("block_size", block_size)
        self.num_random_blocks = check_positive_int("num_random_blocks", num_random_blocks, minimum=0)
        self.num_global = check_positive_int("num_global", num_global, minimum=0)
        self.register_buffer("random_seed", torch.randint(0, 2**31 - 1, ()))
        self.buffer_int("random_seed")  # read once here: torch.compile uses this value
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def pattern(self, n: int) -> BigBirdPattern:
        """The layer's pattern for a sequence of n tokens (tests and pictures use it too)."""
        return BigBirdPattern(self.block_size, -(-n // self.block_size), self.num_random_blocks,
                              self.num_global, self.buffer_int("random_seed"))

    def attend(self, x, mask):
        q, k, v = self.split_projection(self.to_qkv(x), 3)
        pattern = self.pattern(x.shape[1])
        pattern.tables(q.device)  # drawn before any compiled FlexAttention mask_mod reads them
        out = self._flex(q, k, v, pattern, mask)
        if out is None:
            out = bigbird_attention(q, k, v, self.block_size, self.num_random_blocks,
                                    self.num_global, self.buffer_int("random_seed"), mask)
        return self.to_out(self.merge_heads(out))

    def _flex(self, q, k, v, pattern, mask):
        """CUDA: sliding and random blocks through FlexAttention, the global tokens' keys merged
        in by log-sum-exp and their rows by explicit matmuls (`global_rows`,
        `merge_global_keys`); or None where FlexAttention does not apply."""
        g = min(self.num_global * self.block_size, q.shape[2])
        if not g:
            return flex_or_none(q, k, v, pattern, mask)
        local = dataclasses.replace(pattern, global_rows=False, global_cols=False)
        out = flex_or_none(q, k, v, local, mask, return_lse=True)
        if out is None:
            return None
        out = merge_global_keys(*out, q, k, v, g, mask)
        return torch.cat([global_rows(q[:, :, :g], k, v, mask), out[:, :, g:]], dim=2)

    def extra_repr(self):
        return (f"{super().extra_repr()}, block_size={self.block_size}, "
                f"num_random_blocks={self.num_random_blocks}, num_global={self.num_global}")
