"""`memory_compressed`: the attention layers of T-DMCA (Liu et al. 2018, "Generating Wikipedia by
Summarizing Long Sequences", section 4.2.4).

- kind "compressed" (memory-compressed attention): keys and values are reduced by a strided 1-D
  convolution, kernel = stride = `compression` (paper: 3), over the projected k and v of all
  heads; every query attends to the N / compression slots. Cost O(N · N / compression).
  `conv_groups` splits the convolution's channels into groups (`torch.nn.Conv1d`'s `groups`):
  1 (default) mixes every channel, as the paper's convolution over the projected keys does;
  `heads` compresses each head's keys with a kernel of its own, `heads` times fewer
  multiply-adds and weights (the setting of the `memory-compressed-attention` package). As the
  kernel covers each window of `compression` positions exactly once, the convolution is computed
  as one matmul per channel group over the windows' stacked positions (the Conv1d modules hold
  the weights): no transposes, and Inductor compiles it when the length changes between calls,
  where its convolution lowering failed (torch 2.13).
- kind "local": the sequence is split into blocks of `block_size` (paper: 256) and attention runs
  within each block independently. Cost O(N · block_size).
The paper's model alternates them (local, compressed, local, compressed, local):
`models/alternating.py` builds that stack for `build_model("memory_compressed")`.

Padding: padded positions' k and v are zeroed before the convolution (their values never reach a
slot), and a slot whose window holds no real token is left out. Causal (not spelled out in the
paper; designed to be strictly causal): query i sees the slots of the windows that end before its
own window starts (s < floor(i / compression)), plus the raw keys of its own window up to itself
(j in [compression · floor(i / compression), i]); the two parts share one softmax
(`functional.merge`). Decode is exact: the state holds the finished slots and the raw keys of the
unfinished window (compressed), or the current block (local).

CPU and CUDA: local = `block_sparse_attention` (FlexAttention on CUDA); compressed non-causal =
`scaled_dot_product_attention` over the slots; compressed causal = slots and own window with
their log-sum-exp merged (explicit matmuls, N × N / compression scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.blocks import pad_mask_to_multiple, pad_to_multiple
from ..functional.flex import flex_pattern_attention, use_flex
from ..functional.merge import attention_with_lse, merge_attention_parts
from ..functional.patterns import BlockLocal, cached_decode, pattern_attention, pattern_attention_with_lse
from ..registry import register
from .base import check_choice, check_positive_int
from .transformer import DenseAttention


@register("memory_compressed")
class MemoryCompressedAttention(DenseAttention):
    small_options = {"compression": 3, "block_size": 4}

    def __init__(self, dim: int, heads: int, causal: bool = False, kind: str = "compressed",
                 compression: int = 3, block_size: int = 256, conv_groups: int = 1):
        super().__init__(dim, heads, causal)
        self.kind = check_choice("kind", kind, ("compressed", "local"))
        self.compression = check_positive_int("compression", compression)
        self.block_size = check_positive_int("block_size", block_size)
        self.conv_groups = check_positive_int("conv_groups", conv_groups)
        if dim % conv_groups:
            raise ValueError(f"conv_groups: expected a divisor of dim={dim} (1, or heads={heads} "
                             f"for one kernel per head), got {conv_groups}")
        if self.kind == "compressed":
            self.compress_k, self.compress_v = (
                nn.Conv1d(dim, dim, compression, stride=compression, groups=conv_groups)
                for _ in range(2))

    # ------------------------------------------------------------------------ compressed
    def compress(self, k, v):
        """k, v (B, H, L, d), L a multiple of compression -> slots (B, H, L / compression, d)."""
        def conv(t, layer):
            x = self.merge_heads(t)                                            # (B, L, dim)
            b, n, dim = x.shape
            c, g = self.compression, self.conv_groups
            windows = x.view(b, n // c, c, g, dim // g)                        # (B, M, c, g, dim/g)
            kernel = layer.weight.view(g, dim // g, dim // g, c)               # (g, out, in, c)
            out = torch.einsum("bmjgi,goij->bmgo", windows, kernel).reshape(b, n // c, dim)
            # the bias in the matmul's dtype, as a convolution under autocast adds it
            return self.split_heads(out + layer.bias.to(out.dtype))            # (B, H, M, d)
        return conv(k, self.compress_k), conv(v, self.compress_v)

    def compressed_core(self, q, k, v, mask=None):
        bsz, _, n, _ = q.shape
        c = self.compression
        real = pad_mask_to_multiple(mask, n, c, bsz, device=q.device)            # (B, Np)
        kp, vp = pad_to_multiple(k, c)[0], pad_to_multiple(v, c)[0]             # tail zero-padded
        if mask is not None:  # padded tokens' k and v zeroed too
            keep = real[:, None, :, None].to(k.dtype)
            kp, vp = kp * keep, vp * keep
        ks, vs = self.compress(kp, vp)
        slot_real = real.view(bsz, -1, c).any(dim=-1)                           # (B, M)
        if not self.causal:
            if mask is None:  # every slot holds a real token (the last one at least its first)
                return F.scaled_dot_product_attention(q, ks, vs)
            allowed = slot_real | ~slot_real.any(dim=-1, keepdim=True)           # all-pad rows: any
            return F.scaled_dot_product_attention(q, ks, vs, attn_mask=allowed[:, None, None, :])
        window = torch.div(torch.arange(n, device=q.device), c, rounding_mode="floor")
        before = torch.arange(ks.shape[2], device=q.device)[None, :] < window[:, None]   # (N, M)
        slots = attention_with_lse(q, ks, vs, before & slot_real[:, None, None, :])
        own = pattern_attention_with_lse(q, k, v, BlockLocal(c, True), c, mask)
        return merge_attention_parts([slots, own])[0]

    def compressed_decode(self, q, k, v, state):
        c = self.compression
        t = q.shape[2]
        if state is None:
            out, start = self.compressed_core(q, k, v), 0
            raw_k, raw_v, ks, vs = k, v, None, None
        else:
            start = state["length"]
            raw_k, raw_v = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
            ks, vs = state["ks"], state["vs"]
        length = start + t
        raw_start = (start // c) * c                                             # raw covers [raw_start, length)
        done = (length // c) * c - raw_start                                     # raw positions in finished windows
        if done > 0:
            new_ks, new_vs = self.compress(raw_k[:, :, :done], raw_v[:, :, :done])
            ks = new_ks if ks is None else torch.cat([ks, new_ks], dim=2)
            vs = new_vs if vs is None else torch.cat([vs, new_vs], dim=2)
        if state is not None:
            pos = torch.arange(start, length, device=q.device)[:, None]         # (T, 1)
            raw_pos = torch.arange(raw_start, length, device=q.device)[None, :]
            own = (torch.div(raw_pos, c, rounding_mode="floor") == torch.div(pos, c, rounding_mode="floor"))
            parts = [attention_with_lse(q, raw_k, raw_v, own & (raw_pos <= pos))]
            if ks is not None:
                slot = torch.arange(ks.shape[2], device=q.device)[None, :]
                parts.append(attention_with_lse(q, ks, vs, slot < torch.div(pos, c, rounding_mode="floor")))
            out = merge_attention_parts(parts)[0]
        keep = max(done, 0)
        state = {"k": raw_k[:, :, keep:], "v": raw_v[:, :, keep:], "ks": ks, "vs": vs,
                 "length": length}
        return out, state

    # ----------------------------------------------------------------------------- local
    def local_core(self, q, k, v, mask=None):
        pattern = BlockLocal(self.block_size, self.causal)
        if use_flex(q):
            return flex_pattern_attention(q, k, v, pattern, mask)
        return pattern_attention(q, k, v, pattern, self.block_size, mask)

    # ---------------------------------------------------------------------------- public
    def attend(self, x, mask):
        q, k, v = self.qkv(x)
        core = self.compressed_core if self.kind == "compressed" else self.local_core
        return self.to_out(self.merge_heads(core(q, k, v, mask)))

    def decode_step(self, x_new, state):
        q, k, v = self.qkv(x_new)
        if self.kind == "compressed":
            out, state = self.compressed_decode(q, k, v, state)
        else:
            out, state = cached_decode(q, k, v, state, [BlockLocal(self.block_size, True)],
                                       self.local_core)
        return self.to_out(self.merge_heads(out)), state

    def extra_repr(self):
        return (f"{super().extra_repr()}, kind={self.kind!r}, compression={self.compression}, "
                f"block_size={self.block_size}, conv_groups={self.conv_groups}")
