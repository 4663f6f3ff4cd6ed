"""`etc`: ETC global-local attention (Ainslie et al. 2020, arXiv:2004.08483).

Section 2, "Global-Local Attention": two inputs, a long input x (B, N, dim) and a global input
of G tokens; attention is split into four pieces, g2g, g2l, l2g and l2l. l2l is restricted to a
radius `window` (|i - j| <= window); the other three are unrestricted. Section 2, "Relative
Position Encoding": relative positions j - i are clipped to [-max_distance, max_distance]; here
each label is a learned per-head bias on the attention score (in l2l and, among the global
tokens, in g2g) rather than the paper's learned key vectors (Shaw et al. 2018): the same labels,
a scalar per head. Section 2, "Structured Inputs": with a token-to-global mapping (`segment_ids`),
g2l is hard-masked (a global token sees only the long tokens of its segment) and l2g gets a
learned per-head bias for "my own global token" vs another one.
Global and long inputs have separate Q/K/V and output projections here.

The global input: `num_global` learned tokens of the layer (`learned_globals=True`, so the layer
drops into any model), or the caller's `global_tokens` (B, G, dim). `forward` returns only the
long outputs (B, N, dim); the updated global states (B, G, dim) of the last call are kept in
`self.global_states`, and `forward_with_globals` returns both. `build_model("etc")`
(`models/etc.py`) carries the global states from layer to layer, as the paper's two input
sequences: its layers have `learned_globals=False` (no per-layer tokens left unused) and one set of
`num_global` tokens enters the first layer.

Encoder only (survey Table 1: no decode); `causal=True` is refused.
CPU path (and with segment ids): the long queries' window blocks with the global keys appended
(one softmax, relative biases as an additive mask), the G global rows dense over G + N keys:
O(N · (window + G) + G · (G + N)). CUDA path without segment ids (`global_cuda.etc_flex_or_none`):
the window through FlexAttention with the relative bias as a score_mod (read from copies of the
table that spread the backward's atomic adds: `global_cuda.relative_score_mod`), the global keys
merged in by log-sum-exp as one FlashAttention call, and (without padding) the global rows' g2g
part explicit, merged with their g2l part run as FlashAttention over chunks of the long keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional.global_local import etc_attention, local_block_size
from ..registry import register
from .base import Attention, check_positive_int


@register("etc")
class ETCAttention(Attention):
    small_options = {"window": 3, "num_global": 3, "max_distance": 4}
    forward_outputs = ("aux_loss", "global_states")

    def __init__(self, dim: int, heads: int, causal: bool = False, window: int = 84,
                 num_global: int = 8, max_distance: int = 12, learned_globals: bool = True):
        super().__init__(dim, heads, causal)
        self.window = check_positive_int("window", window)
        self.num_global = check_positive_int("num_global", num_global)
        self.max_distance = check_positive_int("max_distance", max_distance)
        if not isinstance(learned_globals, bool):
            raise ValueError(f"learned_globals: expected True or False, got {learned_globals!r}")
        self.block = local_block_size(window)
        self.global_tokens = (nn.Parameter(torch.randn(num_global, dim) * 0.02)
                              if learned_globals else None)
        self.to_qkv_long = nn.Linear(dim, 3 * dim)
        self.to_qkv_global = nn.Linear(dim, 3 * dim)
        self.to_out_long = nn.Linear(dim, dim)
        self.to_out_global = nn.Linear(dim, dim)
        self.l2l_bias = nn.Parameter(torch.zeros(heads, 2 * max_distance + 1))
        self.g2g_bias = nn.Parameter(torch.zeros(heads, 2 * max_distance + 1))
        self.l2g_bias = nn.Parameter(torch.zeros(heads, 2))  # [other segment, own segment]
        self.global_states: torch.Tensor | None = None

    def check_globals(self, x, global_tokens, segment_ids):
        b, n, _ = x.shape
        g = self.num_global
        if global_tokens is None and self.global_tokens is None:
            raise ValueError(f"global_tokens: this layer has no learned global tokens "
                             f"(learned_globals=False); pass global_tokens of shape ({b}, G, {self.dim})")
        if global_tokens is not None:
            if not isinstance(global_tokens, torch.Tensor) or not global_tokens.is_floating_point():
                raise TypeError(f"global_tokens: expected a float tensor of shape ({b}, G, "
                                f"{self.dim}), got {getattr(global_tokens, 'dtype', type(global_tokens).__name__)}")
            if global_tokens.dim() != 3 or global_tokens.shape[0] != b or global_tokens.shape[2] != self.dim \
                    or global_tokens.shape[1] < 1:
                raise ValueError(f"global_tokens: expected shape ({b}, G >= 1, {self.dim}), "
                                 f"got {tuple(global_tokens.shape)}")
            g = global_tokens.shape[1]
        if segment_ids is not None:
            if not isinstance(segment_ids, torch.Tensor) or segment_ids.is_floating_point() \
                    or segment_ids.dtype == torch.bool:
                raise TypeError(f"segment_ids: expected an integer tensor of shape ({b}, {n}), got "
                                f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)}")
            if tuple(segment_ids.shape) != (b, n):
                raise ValueError(f"segment_ids: expected shape ({b}, {n}), got {tuple(segment_ids.shape)}")
            if segment_ids.numel() and (int(segment_ids.min()) < -1 or int(segment_ids.max()) >= g):
                raise ValueError(f"segment_ids: expected values in [-1, {g}) (the global token of each "
                                 f"long token, -1 = none), got [{int(segment_ids.min())}, "
                                 f"{int(segment_ids.max())}]")

    def forward_with_globals(self, x, mask=None, global_tokens=None, segment_ids=None):
        """x (B, N, dim) -> (long outputs (B, N, dim), global outputs (B, G, dim))."""
        self.check_input(x, mask)
        self.check_globals(x, global_tokens, segment_ids)
        self.aux_loss = None
        b = x.shape[0]
        if global_tokens is None:
            global_tokens = self.global_tokens.to(x.dtype).expand(b, -1, -1)
        ql, kl, vl = self.split_projection(self.to_qkv_long(x), 3)
        qg, kg, vg = self.split_projection(self.to_qkv_global(global_tokens), 3)
        long_out, glob_out = etc_attention(ql, kl, vl, qg, kg, vg, self.window, self.block,
                                           self.l2l_bias, self.g2g_bias, mask, segment_ids,
                                           self.l2g_bias)
        long_out = self.to_out_long(self.merge_heads(long_out))
        self.global_states = self.to_out_global(self.merge_heads(glob_out))
        return long_out, self.global_states

    def forward(self, x, mask=None, global_tokens=None, segment_ids=None):
        """The long outputs (B, N, dim); the global ones are left in `self.global_states`."""
        return self.forward_with_globals(x, mask, global_tokens, segment_ids)[0]

    def attend(self, x, mask):
        return self.forward_with_globals(x, mask)[0]

    def extra_repr(self):
        return (f"{super().extra_repr()}, window={self.window}, num_global={self.num_global}, "
                f"max_distance={self.max_distance}, learned_globals={self.global_tokens is not None}")
