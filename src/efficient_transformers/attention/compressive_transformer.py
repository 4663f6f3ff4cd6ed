"""`compressive_transformer`: Transformer-XL plus a compressed memory (Rae et al. 2020,
arXiv:1911.05507).

Section 3.1 and Algorithm 1: each layer keeps a FIFO memory of `mem_len` hidden inputs and a
compressed memory of `cmem_len` slots; states evicted from the memory are compressed at
`compression_rate` c by f_c (`compression`: "conv", "max", "mean", "dilated_conv",
"most_used"; functional/compress.py) into the compressed memory, whose oldest slots are dropped.
Queries attend to [compressed memory; memory; current segment] with the Transformer-XL relative
scores, a compressed slot counting as one position before the memory (distances in slots).
Section 3.2: the compression network is trained only by the attention-reconstruction loss
(stop-gradient on its inputs, reported as `self.aux_loss`); the main loss never reaches it and
nothing reaches the cached states.

Definition (extends transformer_xl.py's): with E(s) = max(0, s·L - M) the positions evicted
before segment s starts (L = segment_len, M = mem_len, both multiples of c), group g covers
positions [g·c, (g+1)·c); segment s also sees the compressed groups E(s)/c - cmem_len ..
E(s)/c - 1. The loss for the eviction at the end of segment s compares attention of segment s
over the evicted states [s·L - M, (s+1)·L - M) with attention over their compressions.
"most_used" keeps the state of each group with the highest average attention it received
(over heads and the real queries that saw it, current segment and memory); since usage depends
on earlier attention, that mode runs segment by segment (a loop over segments).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..functional.compress import (
    COMPRESSIONS, PARAMETRIC, attention_reconstruction_loss, compress, make_compressor,
)
from ..registry import register
from .base import check_choice, check_positive_int
from .transformer_xl import TransformerXLAttention, _heads


@register("compressive_transformer")
class CompressiveAttention(TransformerXLAttention):
    small_options = {"segment_len": 8, "mem_len": 4, "cmem_len": 3, "compression_rate": 2}

    def __init__(self, dim: int, heads: int, causal: bool = False, segment_len: int = 256,
                 mem_len: int = 256, cmem_len: int = 256, compression_rate: int = 4,
                 compression: str = "conv", eval_mem_len: int | None = None):
        super().__init__(dim, heads, causal, segment_len, mem_len, eval_mem_len)
        self.cmem_len = check_positive_int("cmem_len", cmem_len, minimum=0)
        c = self.compression_rate = check_positive_int("compression_rate", compression_rate)
        self.compression = check_choice("compression", compression, COMPRESSIONS)
        for argument, value in (("segment_len", segment_len), ("mem_len", mem_len),
                                ("eval_mem_len", eval_mem_len)):
            if value is not None and value % c:
                raise ValueError(f"{argument}: expected a multiple of compression_rate={c}, "
                                 f"got {value}")
        if compression == "dilated_conv" and (c < 2 or c & (c - 1)):
            raise ValueError(f"compression_rate: 'dilated_conv' needs a power of two >= 2, got {c}")
        self.compressor = make_compressor(compression, dim, c)

    @property
    def needs_usage(self) -> bool:
        return self.compression == "most_used" and self.cmem_len > 0

    def process(self, x, mask=None, state=None):
        """As transformer_xl's; "most_used" runs one segment at a time (usage is sequential)."""
        if not self.needs_usage:
            return self._process(x, mask, state)
        L, outs, i = self.segment_len, [], 0
        while i < x.shape[1]:
            start = int(state["length"]) if state else 0
            j = min(x.shape[1], i + L - start % L)
            y, state = self._process(x[:, i:j], None if mask is None else mask[:, i:j], state)
            outs.append(y)
            i = j
        self.aux_loss = None
        return torch.cat(outs, 1), state

    # ------------------------------------------------------------------------------ groups
    def evicted(self, length: int) -> int:
        """Positions evicted from the memory once `length` tokens were seen: E in the docstring."""
        return max(0, (length // self.segment_len) * self.segment_len - self.memory_len)

    def new_groups(self, ctx, usage=None):
        """Compress the groups evicted during this call: slots (B, G, D) keep their gradient
        into the compressor (inputs detached); also stored on ctx for the state and the loss."""
        c = self.compression_rate
        st = ctx.state
        g_hi = int(st["groups"]) if st else 0
        g_new = max(g_hi, self.evicted(ctx.end) // c)
        pos = (g_hi + torch.arange(g_new - g_hi, device=ctx.z.device))[:, None] * c \
            + torch.arange(c, device=ctx.z.device)                              # (G, c)
        zi = pos - ctx.p0
        ok = zi >= 0
        zi = zi.clamp(0, ctx.z.shape[1] - 1)
        states = ctx.z.detach()[:, zi]                                         # (B, G, c, D)
        valid = ctx.zmask[:, zi] & ok
        group_usage = None if usage is None else usage[:, zi]
        slots, slot_valid = compress(self.compression, states, valid, self.compressor, group_usage)
        ctx.g_hi, ctx.g_new, ctx.slots, ctx.slot_valid = g_hi, g_new, slots, slot_valid
        ctx.group_states, ctx.group_valid = states, valid

    def compressed_keys(self, ctx, wk, wv):
        if self.cmem_len == 0:
            return None
        st, c, dev = ctx.state, self.compression_rate, ctx.z.device
        old = st["cmem"].to(ctx.z.dtype) if st else ctx.z.new_zeros(ctx.z.shape[0], 0, self.dim)
        old_valid = st["cmem_mask"] if st else ctx.zmask.new_zeros(ctx.z.shape[0], 0)
        if self.needs_usage:  # one segment per call: it only sees groups compressed before it
            g_hi = int(st["groups"]) if st else 0
            slots, slot_valid = old, old_valid
        else:
            self.new_groups(ctx)
            g_hi = ctx.g_hi
            slots = torch.cat([old, ctx.slots.detach()], 1)
            slot_valid = torch.cat([old_valid, ctx.slot_valid], 1)
        g_lo = g_hi - old.shape[1]                                              # group of slot 0
        ends = torch.clamp(ctx.seg0 - self.memory_len, min=0) // c              # (S,) E(s)/c
        # slots before group max(0, g_lo) never exist: the windows are cut to what the last
        # segment can see (the same keys, at the cost of them)
        last_seg0 = (ctx.end - 1) // self.segment_len * self.segment_len
        last_end = max(0, last_seg0 - self.memory_len) // c
        n_slots = self.cmem_len
        if n_slots > last_end - max(0, g_lo):  # a branch, not min(): see transformer_xl's M
            n_slots = max(0, last_end - max(0, g_lo))
        g = ends[:, None] - n_slots + torch.arange(n_slots, device=dev)       # (S, Cm)
        si = g - g_lo
        ok = (g >= 0) & (si >= 0) & (si < slots.shape[1])
        si = si.clamp(0, max(slots.shape[1] - 1, 0))
        if slots.shape[1] == 0:
            slots = ctx.z.new_zeros(ctx.z.shape[0], 1, self.dim)
            slot_valid = ctx.zmask.new_zeros(ctx.z.shape[0], 1)
        kv = F.linear(slots, torch.cat([wk, wv], 0))[:, si]                     # (B, S, Cm, 2D)
        ck, cv = (_heads(t, self.heads) for t in kv.chunk(2, -1))
        return ck, cv, slot_valid[:, si] & ok

    def compressed_state(self, ctx, keep: int) -> dict[str, Any]:
        if self.cmem_len == 0:
            return {}
        st = ctx.state
        usage = None
        if self.needs_usage:
            usage = self.update_usage(ctx)
            self.new_groups(ctx, usage=usage[0] / usage[1].clamp_min(1.0))
        elif torch.is_grad_enabled() and self.compression in PARAMETRIC and ctx.g_new > ctx.g_hi:
            self.aux_loss = self.reconstruction_loss(ctx)
        old = st["cmem"] if st else ctx.z.new_zeros(ctx.z.shape[0], 0, self.dim)
        old_valid = st["cmem_mask"] if st else ctx.zmask.new_zeros(ctx.z.shape[0], 0)
        cmem = torch.cat([old.to(ctx.z.dtype), ctx.slots.detach()], 1)[:, -self.cmem_len:]
        cmask = torch.cat([old_valid, ctx.slot_valid], 1)[:, -self.cmem_len:]
        out = {"cmem": cmem, "cmem_mask": cmask, "groups": ctx.g_new}
        if usage is not None:
            out["usage"], out["seen"] = usage[0][:, keep:], usage[1][:, keep:]
        return out

    # ------------------------------------------------------------------- most-used, loss
    def update_usage(self, ctx):
        """Add this call's attention to each buffered state: (sum (B, Z), count (B, Z))."""
        st, z = ctx.state, ctx.z
        k0 = z.shape[1] - ctx.end + ctx.start
        total = torch.zeros(z.shape[:2], dtype=torch.float64, device=z.device)
        count = torch.zeros_like(total)
        if st and "usage" in st:
            total[:, :k0], count[:, :k0] = st["usage"], st["seen"]
        n_cm = ctx.n_cm
        rows = (ctx.qvalid[None] & ctx.xmask[:, ctx.qi])[:, :, :, None]         # (B, S, R, 1)
        probs = ctx.probs.detach()[..., n_cm:].sum(1) * rows                    # (B, S, R, W)
        seen = ctx.allowed[..., n_cm:] & rows & ctx.key_in[None, :, None, :]
        idx = ctx.zi.reshape(-1)
        total.index_add_(1, idx, probs.sum(2).reshape(z.shape[0], -1).to(total.dtype))
        count.index_add_(1, idx, seen.sum(2).reshape(z.shape[0], -1).to(total.dtype))
        return total, count

    def reconstruction_loss(self, ctx) -> torch.Tensor:
        """Rae et al. Algorithm 2 for every segment that completed in this call."""
        L, M, c, dev = self.segment_len, self.memory_len, self.compression_rate, ctx.z.device
        # segments ending here: s < end // L, so (s + 1)·L <= end for each
        done = torch.arange(ctx.start // L, ctx.end // L, device=dev)
        gpe = L // c                                                     # groups per eviction
        g = ((done + 1) * L - M)[:, None] // c - gpe + torch.arange(gpe, device=dev)  # (E, gpe)
        gi = g - ctx.g_hi
        ok = (g >= 0) & (gi >= 0) & (gi < ctx.slots.shape[1])
        gi = gi.clamp(0, max(ctx.slots.shape[1] - 1, 0))
        slots, slot_valid = ctx.slots[:, gi], ctx.slot_valid[:, gi] & ok      # (B, E, gpe, ...)
        old = ctx.group_states[:, gi].flatten(2, 3)                           # (B, E, L, D)
        old_valid = (ctx.group_valid[:, gi] & ok[..., None]).flatten(2, 3)
        hi = (done * L)[:, None] + torch.arange(L, device=dev) - ctx.p0
        h_ok = hi >= 0
        hi = hi.clamp(0, ctx.z.shape[1] - 1)
        h, h_valid = ctx.z[:, hi], ctx.zmask[:, hi] & h_ok
        wq, wk, wv = self.to_qkv.weight.chunk(3, dim=0)
        return attention_reconstruction_loss(h, h_valid, old, old_valid, slots, slot_valid,
                                             wq, wk, wv, self.heads)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, cmem_len={self.cmem_len}, "
                f"compression_rate={self.compression_rate}, compression={self.compression!r}")
