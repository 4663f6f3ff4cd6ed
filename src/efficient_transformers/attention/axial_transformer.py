"""`axial_transformer`: axial attention (Ho et al. 2019, "Axial Attention in Multidimensional
Transformers", sections 3 and 4).

The sequence is an N-D input of `shape` (s0, ..., sk) in raster order (the last axis fastest);
attention runs along one axis at a time, and this layer attends along every axis at once with one
softmax over the union of the query's lines: the row (last axis) including itself, and each other
axis without the query's own row, so no key counts twice. Two such layers reach every position,
as the paper's row-then-column stack does.

Causal (the paper's autoregressive model, §4: masked row attention plus attention to the rows
above): the row up to and including the query, along every other axis only earlier coordinates
(for 2-D, the column restricted to the rows above), and the whole previous row. The last part
stands in for the paper's outer decoder (unmasked row attention over the rows above, then masked
column attention): without it no stack of layers would let a pixel see the pixels above and to
its right; with it two layers reach every earlier pixel. Unlike the paper's outer/inner decoder
pair this is one kind of layer, strictly causal in raster order, so decode runs pixel by pixel.

Any N <= prod(shape): the leading axis is padded. `shape` None: the nearest square grid covering N
(width ceil(sqrt(N)), `functional.axial.grid_shape`), forward only: decode needs a fixed shape
(a language model from `build_model` without `shape` takes max_len's grid).
Cost O(N · (s0 + ... + sk + s_k)) = O(N·sqrt(N)) for a square 2-D grid. Every device: one
autograd node (`functional.axial.axial_attention`) that runs batched matmuls per axis, merges
them by log-sum-exp (`functional.merge`) and saves no probabilities; head by head on the CPU,
all heads at once on CUDA (`functional.axial.folds_heads`: a fifth of the aten calls).
On CUDA, a 2-D grid that N fills exactly and no padding: each part is one or two FlashAttention
calls over the lines (`functional.grid_flash`), merged by log-sum-exp; no score block is
written to memory. FlexAttention with the `patterns.Axial` mask stays available
(`functional.flex.FORCE_FLEX`), but the columns touch every key block, so it skips nothing
(`use_flex(q, block_sparse=False)`).
Decode: a KV cache (columns reach every earlier row).
"""

from __future__ import annotations

import math

from ..functional.axial import axial_attention, axial_parts, grid_shape
from ..functional.flex import flex_pattern_attention, use_flex
from ..functional.grid_flash import grid_flash_attention, uses_grid_flash
from ..functional.patterns import Axial
from ..registry import register
from .image_transformer import check_shape
from .transformer import PatternAttention


@register("axial_transformer")
class AxialTransformerAttention(PatternAttention):
    small_options = {"shape": (5, 8)}

    def __init__(self, dim: int, heads: int, causal: bool = False, shape=None):
        super().__init__(dim, heads, causal)
        self.shape = check_shape(shape, 2)
        if self.shape is not None:
            self.max_len = math.prod(self.shape)

    def pattern(self, n: int) -> Axial:
        return Axial(grid_shape(n, self.shape), self.causal)

    def core(self, q, k, v, mask=None):
        """q, k, v (B, H, N, d) -> (B, H, N, d)"""
        n = q.shape[2]
        if use_flex(q, block_sparse=False):
            return flex_pattern_attention(q, k, v, self.pattern(n), mask)
        shape = grid_shape(n, self.shape)
        if len(shape) == 2 and math.prod(shape) == n and uses_grid_flash(q, mask):
            parts = [(axis, rule, -1 if previous_row else 0)
                     for axis, rule, previous_row in axial_parts(shape, self.causal)]
            return grid_flash_attention(q, k, v, shape, parts)[0]
        return axial_attention(q, k, v, shape, self.causal, mask)[0]

    def decode_step(self, x_new, state):
        if self.shape is None:
            raise ValueError("shape: decode needs a fixed shape; shape=None derives the grid "
                             "from the full length")
        return self.pattern_decode(x_new, state, [self.pattern(0)])

    def extra_repr(self):
        return f"{super().extra_repr()}, shape={self.shape}"
