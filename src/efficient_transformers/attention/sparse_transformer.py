"""`sparse_transformer`: factorized attention of the Sparse Transformer (Child et al. 2019, §4).

Two patterns of stride l (§4.2), A(1) ∪ A(2):
- "strided": A(1) = the previous l positions (|i - j| <= l non-causal), A(2) = {j : (i - j) mod l
  = 0}: l + 1 local keys plus N / l column keys, about 2·sqrt(N) at l = sqrt(N).
- "fixed": A(1) = own block of l, A(2) = the last c = `summary_size` positions of every block.
Combined across heads (§4.3) by `combine`: "merged" (every head attends to the union, one
softmax) or "split" (the first half of the heads A(1), the other half A(2)). The paper's third
option, alternating patterns between layers, is a model choice (one layer per pattern).
Non-causal use (not in the paper, a generative model) applies the patterns in both directions.

Every device, never N × N: A(1) is `block_sparse_attention` over gathered blocks; the strided
A(2) is column attention over the (N / l, l) view (`functional.axial`), the fixed A(2) attends to
the gathered summary positions (N · c·N/l scores). Merged heads combine the parts by their
log-sum-exp (`functional.merge`), each key counted once: the column part skips the keys within l
of the query (|row difference| >= 2), the summary part skips the query's own block.
On CUDA without padding, the strided pattern with N a multiple of l runs on the (N / l, l) grid
as FlashAttention calls (`functional.grid_flash`): A(1) is the query's row (causal: up to the
query) and the neighbouring rows' halves within l, A(2) the column, merged by log-sum-exp; no
score block is written to memory. FlexAttention with the same pattern stays available
(`functional.flex.FORCE_FLEX`), but A(2) touches every key block, so it skips nothing
(`use_flex(q, block_sparse=False)`). Decode: a KV cache (the column needs every earlier row),
exact.
"""

from __future__ import annotations

import torch

from ..functional.axial import strided_column_attention
from ..functional.blocks import at_most, pad_mask_to_multiple, pad_to_multiple
from ..functional.flex import flex_pattern_attention, use_flex
from ..functional.grid_flash import grid_flash_attention, uses_grid_flash
from ..functional.merge import attention_with_lse, merge_attention_parts
from ..functional.patterns import (BlockLocal, Fixed, LocalWindow, Strided,
                                   pattern_attention, pattern_attention_with_lse)
from ..registry import register
from .base import check_choice, check_positive_int
from .transformer import PatternAttention


def summary_attention(q, k, v, stride: int, summary: int, causal: bool, skip_own_block: bool,
                      key_mask=None):
    """Queries against the last `summary` positions of every block of `stride` (fixed A(2)).
    skip_own_block: leave out the query's own block (counted by A(1)); causal: key <= query.
    q, k, v (B, H, N, d) -> out (B, H, N, d), lse (B, H, N)."""
    bsz, h, n, d = q.shape
    mask = pad_mask_to_multiple(key_mask, n, stride, bsz, device=q.device)
    k, v = (pad_to_multiple(t, stride)[0] for t in (k, v))
    nb = k.shape[2] // stride

    def summaries(t):  # (B, H, Np, d) -> (B, H, nb*c, d)
        return t.view(bsz, h, nb, stride, d)[:, :, :, stride - summary:].reshape(bsz, h, nb * summary, d)

    pos = (torch.arange(nb, device=q.device)[:, None] * stride
           + torch.arange(stride - summary, stride, device=q.device)).flatten()   # (nb*c,)
    i = torch.arange(n, device=q.device)[:, None]
    allowed = torch.ones(n, pos.numel(), dtype=torch.bool, device=q.device)
    if skip_own_block:
        allowed = allowed & (torch.div(pos, stride, rounding_mode="floor")
                             != torch.div(i, stride, rounding_mode="floor"))
    if causal:
        allowed = allowed & (pos <= i)
    allowed = allowed & mask[:, pos][:, None, None, :]                             # (B, 1, N, nb*c)
    return attention_with_lse(q, summaries(k), summaries(v), allowed)


def strided_grid_parts(causal: bool, part: str) -> list[tuple[int, str, int]]:
    """The strided pattern's `part` ("union", "local" or "column") as line parts of the
    (N / l, l) grid for `grid_flash_attention`: (axis, rule along it, row offset). Local,
    |i − j| <= l (causal 0 <= i − j <= l): the query's row, the previous row's positions at or
    after the query's column, and (non-causal) the next row's at or before it. Column: the whole
    column, or for the union the rows two or more away (the nearer ones are local)."""
    local = [(1, "causal" if causal else "all", 0), (1, "not_before", -1)]
    if not causal:
        local.append((1, "causal", 1))
    if part == "local":
        return local
    if part == "column":
        return [(0, "causal" if causal else "all", 0)]
    return local + [(0, "far_before" if causal else "far", 0)]


@register("sparse_transformer")
class SparseTransformerAttention(PatternAttention):
    small_options = {"pattern": "strided", "stride": 4, "summary_size": 2}

    def __init__(self, dim: int, heads: int, causal: bool = False, pattern: str = "strided",
                 stride: int = 64, summary_size: int = 8, combine: str = "merged"):
        super().__init__(dim, heads, causal)
        self.pattern = check_choice("pattern", pattern, ("strided", "fixed"))
        self.stride = check_positive_int("stride", stride)
        self.summary_size = check_positive_int("summary_size", summary_size)
        self.combine = check_choice("combine", combine, ("merged", "split"))
        if self.summary_size > self.stride:
            raise ValueError(f"summary_size: expected at most stride={stride}, got {summary_size}")
        if combine == "split" and (heads < 2 or heads % 2):
            raise ValueError(f"combine: 'split' gives half the heads to each pattern and needs an "
                             f"even number of heads, got heads={heads}")

    def patterns(self):
        """The causal-aware patterns per head group: [union] (merged) or [A(1), A(2)] (split)."""
        if self.pattern == "strided":
            parts = ("union",) if self.combine == "merged" else ("local", "column")
            return [Strided(self.stride, self.causal, p) for p in parts]
        parts = ("union",) if self.combine == "merged" else ("block", "summary")
        return [Fixed(self.stride, self.summary_size, self.causal, p) for p in parts]

    def single_pattern(self, n: int):
        """The one mask of every head (merged heads: the union), or None when the heads are
        split between two patterns. (`pattern` is the option's name here.)"""
        patterns = self.patterns()
        return patterns[0] if len(patterns) == 1 else None

    def compute_stride(self, n: int) -> int:
        """The stride the block path computes N positions with. A stride beyond the sequence
        means the same pattern as the smallest such stride (strided: N, one row; fixed: N +
        summary_size, so that summary positions past the sequence stay past it), at the cost of
        N, not of the stride."""
        beyond = n if self.pattern == "strided" else n + self.summary_size
        return at_most(self.stride, beyond)

    def core(self, q, k, v, mask=None):
        """q, k, v (B, H, N, d) -> (B, H, N, d)"""
        if use_flex(q, block_sparse=False):
            patterns = self.patterns()
            h = q.shape[1] // len(patterns)
            return torch.cat([flex_pattern_attention(q[:, g * h:(g + 1) * h], k[:, g * h:(g + 1) * h],
                                                     v[:, g * h:(g + 1) * h], p, mask)
                              for g, p in enumerate(patterns)], dim=1)
        if self.pattern == "strided" and q.shape[2] % self.stride == 0 and uses_grid_flash(q, mask):
            return self.strided_on_grid(q, k, v)
        l, causal = self.compute_stride(q.shape[2]), self.causal
        if self.combine == "merged":
            if self.pattern == "strided":
                local = pattern_attention_with_lse(q, k, v, LocalWindow(l, causal), l, mask)
                column = strided_column_attention(q, k, v, l, "far_before" if causal else "far", mask)
                return merge_attention_parts([local, column])[0]
            block = pattern_attention_with_lse(q, k, v, BlockLocal(l, causal), l, mask)
            summary = summary_attention(q, k, v, l, self.summary_size, causal, True, mask)
            return merge_attention_parts([block, summary])[0]
        h = q.shape[1] // 2
        (q1, q2), (k1, k2), (v1, v2) = (t.split(h, dim=1) for t in (q, k, v))
        if self.pattern == "strided":
            first = pattern_attention(q1, k1, v1, LocalWindow(l, causal), l, mask)
            second = strided_column_attention(q2, k2, v2, l, "causal" if causal else "all", mask)[0]
        else:
            first = pattern_attention(q1, k1, v1, BlockLocal(l, causal), l, mask)
            second = summary_attention(q2, k2, v2, l, self.summary_size, causal, False, mask)[0]
        return torch.cat([first, second], dim=1)

    def strided_on_grid(self, q, k, v):
        """The strided pattern by `grid_flash_attention`, N a multiple of l, no padding.
        q, k, v (B, H, N, d) -> (B, H, N, d)"""
        grid = (q.shape[2] // self.stride, self.stride)
        if self.combine == "merged":
            return grid_flash_attention(q, k, v, grid, strided_grid_parts(self.causal, "union"))[0]
        h = q.shape[1] // 2
        return torch.cat([grid_flash_attention(q[:, g], k[:, g], v[:, g], grid,
                                               strided_grid_parts(self.causal, part))[0]
                          for g, part in ((slice(None, h), "local"), (slice(h, None), "column"))],
                         dim=1)

    def decode_step(self, x_new, state):
        return self.pattern_decode(x_new, state, self.patterns())

    def extra_repr(self):
        return (f"{super().extra_repr()}, pattern={self.pattern!r}, stride={self.stride}, "
                f"summary_size={self.summary_size}, combine={self.combine!r}")
