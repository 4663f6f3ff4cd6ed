"""`image_transformer`: local self-attention of the Image Transformer (Parmar et al. 2018, §3.2).

- mode "1d": the raster-order sequence is cut into query blocks of `block_size`; each block
  attends to itself and a memory flank of `window` positions before it (paper: query block l_q,
  memory l_m = l_q + flank); causal: masked to j <= i. Non-causal (encoder use, not in the
  paper's generator): the flank is on both sides.
- mode "2d": an image of `shape` (H, W) in raster order; rectangular query blocks of
  `query_shape` (hq, wq), memory = the block extended by `memory_flange` (hm, wm): hm rows above
  (and below when non-causal), wm columns left and right. Causal masking uses raster order (the
  paper generates block by block; here the sequence order is the generation order, so causal
  decode works pixel by pixel). shape None: the nearest square grid covering N
  (`functional.axial.grid_shape`), forward only; decode needs a fixed shape (a language model
  from `build_model` without `shape` takes max_len's grid).

Cost O(N · m), m = memory size per query block. CPU: `block_sparse_attention` over gathered
blocks (2-D: in block-raster order); CUDA: FlexAttention with the same pattern. Decode keeps the
keys any future query can still see: window + block_size positions (1d) or (hq + hm) rows (2d).
"""

from __future__ import annotations

import math
from typing import Any

from ..functional.axial import grid_shape
from ..functional.blocks import at_most
from ..functional.flex import flex_pattern_attention, use_flex
from ..functional.patterns import (ImageLocal1D, ImageLocal2D, image2d_attention,
                                   pattern_attention)
from ..registry import register
from .base import check_choice, check_positive_int
from .transformer import PatternAttention


def check_int_pair(argument: str, value: Any, minimum: int = 1) -> tuple[int, int]:
    """A pair of ints >= minimum (a JSON list is accepted) -> tuple."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{argument}: expected a pair of integers >= {minimum}, got {value!r}")
    for v in value:
        check_positive_int(argument, v, minimum)
    return (int(value[0]), int(value[1]))


def check_shape(value: Any, min_axes: int = 2, max_axes: int | None = None):
    """None or a sequence of positive ints (raster order, last axis fastest) -> tuple."""
    if value is None:
        return None
    too_many = max_axes is not None and isinstance(value, (tuple, list)) and len(value) > max_axes
    if not isinstance(value, (tuple, list)) or len(value) < min_axes or too_many:
        axes = f"{min_axes}" if max_axes == min_axes else f"at least {min_axes}"
        raise ValueError(f"shape: expected None or {axes} positive integers, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"shape: expected positive integers, got {value!r}")
    return tuple(int(v) for v in value)


@register("image_transformer")
class ImageTransformerAttention(PatternAttention):
    small_options = {"mode": "2d", "shape": (6, 7), "query_shape": (2, 3), "memory_flange": (2, 2)}

    def __init__(self, dim: int, heads: int, causal: bool = False, mode: str = "1d",
                 block_size: int = 128, window: int = 256, shape=None, query_shape=(8, 16),
                 memory_flange=(8, 16)):
        super().__init__(dim, heads, causal)
        self.mode = check_choice("mode", mode, ("1d", "2d"))
        self.block_size = check_positive_int("block_size", block_size)
        self.window = check_positive_int("window", window, minimum=0)
        self.shape = check_shape(shape, 2, 2)
        self.query_shape = check_int_pair("query_shape", query_shape)
        self.memory_flange = check_int_pair("memory_flange", memory_flange, minimum=0)
        if self.shape is not None:
            self.max_len = math.prod(self.shape)

    def pattern(self, n: int, fitted: bool = False):
        """The mask of a sequence of n positions. fitted: query blocks larger than the sequence
        shrink to it (the same mask on those n positions, at the cost of n; decode, whose
        sequence grows, keeps the declared sizes)."""
        if self.mode == "1d":
            block = at_most(self.block_size, n) if fitted else self.block_size
            return ImageLocal1D(block, self.window, self.causal)
        height, width = grid_shape(n, self.shape)
        query_shape = self.query_shape
        if fitted:
            rows = at_most(-(-n // width), height)
            query_shape = (at_most(query_shape[0], rows), at_most(query_shape[1], width))
        return ImageLocal2D(width, query_shape, self.memory_flange, self.causal)

    def core(self, q, k, v, mask=None):
        """q, k, v (B, H, N, d) -> (B, H, N, d)"""
        pattern = self.pattern(q.shape[2], fitted=True)
        if use_flex(q):
            return flex_pattern_attention(q, k, v, pattern, mask)
        if self.mode == "1d":
            return pattern_attention(q, k, v, pattern, pattern.block, mask)
        return image2d_attention(q, k, v, pattern, mask)

    def decode_step(self, x_new, state):
        if self.mode == "2d" and self.shape is None:
            raise ValueError("shape: decode in mode '2d' needs a fixed image shape (H, W); "
                             "shape=None derives the grid from the full length")
        return self.pattern_decode(x_new, state, [self.pattern(0)])

    def extra_repr(self):
        return (f"{super().extra_repr()}, mode={self.mode!r}, block_size={self.block_size}, "
                f"window={self.window}, shape={self.shape}, query_shape={self.query_shape}, "
                f"memory_flange={self.memory_flange}")
