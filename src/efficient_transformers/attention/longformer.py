"""`longformer`: sliding window + dilation + global attention (Beltagy et al. 2020, arXiv:2004.05150).

Section 3.1 ("Attention Pattern"):
- sliding window: each token attends to `window` positions on each side (the paper's w/2), only
  the past ones when causal (section 4, autoregressive LM);
- dilated sliding window: gaps of `dilation` (an int, or one value per head: "different dilation
  configurations per head");
- global attention: the first `num_global` tokens, or a per-call `global_mask` (B, N), attend to
  every position and every position attends to them; "Linear Projections for Global Attention":
  global queries use their own Qg, Kg, Vg (initialised as copies of Qs, Ks, Vs); the sliding window
  (including the scores of the global keys seen by other tokens) uses Qs, Ks, Vs.

Causal variant (not in the paper, whose global attention is bidirectional): a global token only
sees the past (j <= i) and is seen by the tokens after it, so nothing leaks from the future.
Decode keeps the last `window · max(dilation)` sliding keys/values plus the keys/values of the
global positions: the state is bounded, it does not grow with the length.

CPU path: blocked attention over gathered key blocks of a window (dilation handled by a residue
class permutation), global keys appended to every block, global rows dense (O(N · G)); see
functional/global_local.py. CUDA: FlexAttention for the window where functional/flex.py applies,
the first `num_global` tokens' keys merged in by log-sum-exp (inside FlexAttention every query
block would visit the global key block, and in the backward that block is one thread block
walking all N/128 query blocks); a per-call `global_mask` takes the blocked path. On both
paths the global rows fold Kg and Vg into the global queries (`global_rows`): O(G·N·dim), no
projection of every token to Kg, Vg.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional.folded_cross import key_folded_attention
from ..functional.global_cuda import flex_or_none, merge_global_keys
from ..functional.global_local import (
    DilatedWindow, LongformerPattern, dense_rows, dilation_groups, gather_global,
    grouped_dilated_attention, local_block_size, longformer_attention,
)
from ..registry import register
from .base import Attention, check_positive_int

DENSE_DECODE_MAX = 64  # decode chunks up to this many tokens use a small dense mask


@register("longformer")
class LongformerAttention(Attention):
    small_options = {"window": 3, "dilation": [1, 2], "num_global": 2}

    def __init__(self, dim: int, heads: int, causal: bool = False, window: int = 256,
                 dilation: int | list[int] = 1, num_global: int = 1):
        super().__init__(dim, heads, causal)
        self.window = check_positive_int("window", window)
        self.num_global = check_positive_int("num_global", num_global, minimum=0)
        if isinstance(dilation, (list, tuple)):
            if len(dilation) != heads:
                raise ValueError(f"dilation: expected an integer or a list of {heads} integers "
                                 f"(one per head), got {list(dilation)}")
            dilations = tuple(check_positive_int("dilation", d) for d in dilation)
        else:
            dilations = (check_positive_int("dilation", dilation),) * heads
        self.dilation, self.dilations = dilation, dilations
        self.block = local_block_size(window)
        self.to_qkv = nn.Linear(dim, 3 * dim)          # Qs, Ks, Vs
        self.to_q_global = nn.Linear(dim, dim)         # Qg
        self.to_kv_global = nn.Linear(dim, 2 * dim)    # Kg, Vg
        with torch.no_grad():                          # paper: Qg, Kg, Vg start as Qs, Ks, Vs
            self.to_q_global.weight.copy_(self.to_qkv.weight[:dim])
            self.to_q_global.bias.copy_(self.to_qkv.bias[:dim])
            self.to_kv_global.weight.copy_(self.to_qkv.weight[dim:])
            self.to_kv_global.bias.copy_(self.to_qkv.bias[dim:])
        self.to_out = nn.Linear(dim, dim)

    # ---------------------------------------------------------------------------- projections
    def sliding_qkv(self, x):
        """(B, N, dim) -> qs, ks, vs (B, H, N, d)"""
        return self.split_projection(self.to_qkv(x), 3)

    def global_kv(self, x):
        return self.split_projection(self.to_kv_global(x), 2)

    # -------------------------------------------------------------------------------- forward
    def forward(self, x, mask=None, global_mask=None):
        """x (B, N, dim), mask (B, N) bool (True = real), global_mask (B, N) bool (True = global;
        default: the first `num_global` positions)."""
        self.check_input(x, mask)
        if global_mask is not None:
            b, n, _ = x.shape
            if not isinstance(global_mask, torch.Tensor) or global_mask.dtype != torch.bool:
                raise TypeError(f"global_mask: expected a bool tensor of shape ({b}, {n}) "
                                f"(True = global token), got "
                                f"{getattr(global_mask, 'dtype', type(global_mask).__name__)}")
            if tuple(global_mask.shape) != (b, n):
                raise ValueError(f"global_mask: expected shape ({b}, {n}), "
                                 f"got {tuple(global_mask.shape)}")
        self.aux_loss = None
        return self.attend(x, mask, global_mask)

    def attend(self, x, mask, global_mask=None):
        b, n, _ = x.shape
        qs, ks, vs = self.sliding_qkv(x)
        if global_mask is None:
            out = self._flex(qs, ks, vs, mask)
            if out is not None:
                return self._finish_flex(x, out, mask)
            is_global = (torch.arange(n, device=x.device) < self.num_global).expand(b, n)
            count = self.num_global  # a bound known on the host
        else:
            is_global, count = global_mask, None
        if mask is not None:
            is_global = is_global & mask
        index, valid = gather_global(is_global, count)                          # (B, G)
        rows = self.global_rows(x, index, mask) if index.shape[1] else None
        out = longformer_attention(qs, ks, vs, None, None, None, index, valid, self.window,
                                   self.dilations, self.causal, mask, self.block, rows=rows)
        return self.to_out(self.merge_heads(out))

    def global_rows(self, x, index, mask):
        """The global queries' outputs (B, H, G, d): Qg at the positions `index` (B, G) against
        Kg, Vg of every real token (causal: j <= its position), with the key and value
        projections folded into the queries (`folded_cross.key_folded_attention`): O(G·N·dim)
        instead of projecting all N tokens to Kg, Vg, (N, 2·dim) × dim multiply-adds."""
        b, n, _ = x.shape
        xg = x.gather(1, index[..., None].expand(b, index.shape[1], self.dim))
        allowed = None
        if self.causal:
            allowed = torch.arange(n, device=x.device)[None, None, :] <= index[..., None]
        wk, wv = self.to_kv_global.weight.chunk(2)
        bv = None if self.to_kv_global.bias is None else self.to_kv_global.bias.chunk(2)[1]
        rows = key_folded_attention(self.to_q_global(xg), x, self.heads, wk, wv, bv, mask,
                                    allowed)                                    # (B, G, H·d)
        return self.split_heads(rows)

    def pattern(self, n: int):
        """The whole mask (window and the first `num_global` tokens' rows and columns) when
        every head has one dilation, else None."""
        if len(set(self.dilations)) != 1:
            return None
        return LongformerPattern(self.window, self.dilations[0], self.num_global, self.causal)

    def _flex(self, qs, ks, vs, mask):
        """The sliding window through FlexAttention (one call per dilation group), the global
        keys merged in by log-sum-exp (`merge_global_keys`); or None where FlexAttention does
        not apply. The global rows are left to `_finish_flex`."""
        from ..functional.flex import use_flex
        if not use_flex(qs):
            return None
        g = min(self.num_global, qs.shape[2])
        groups, inverse = dilation_groups(self.dilations, qs.device)
        outs, lses = [], []
        for dil, heads in groups:
            pattern = LongformerPattern(self.window, dil, self.num_global, self.causal,
                                        global_rows=False, global_cols=False)
            part = (qs, ks, vs) if heads is None else tuple(t.index_select(1, heads)
                                                            for t in (qs, ks, vs))
            out = flex_or_none(*part, pattern, mask, return_lse=bool(g))
            if out is None:
                return None
            out, lse = out if g else (out, None)
            outs.append(out)
            lses.append(lse)
        out, lse = outs[0], lses[0]
        if inverse is not None:   # back to head order: one gather (its backward one index_add)
            out = torch.cat(outs, dim=1).index_select(1, inverse)
            lse = torch.cat(lses, dim=1).index_select(1, inverse) if g else None
        if not g:
            return out
        return merge_global_keys(out, lse, qs, ks, vs, g, mask, self.causal)

    def _finish_flex(self, x, out, mask):
        g = min(self.num_global, x.shape[1])
        if g:
            index = torch.arange(g, device=x.device).expand(x.shape[0], g)
            out = torch.cat([self.global_rows(x, index, mask), out[:, :, g:]], dim=2)
        return self.to_out(self.merge_heads(out))

    # --------------------------------------------------------------------------------- decode
    def decode_step(self, x_new, state):
        """State: "length", the last window·max(dilation) sliding keys/values ("k", "v"), and for
        the global positions (< num_global) their sliding ("gk", "gv") and global ("gkg",
        "gvg") keys/values. Bounded: (window · max(dilation) + 3 · num_global) · dim per batch."""
        b, t, _ = x_new.shape
        qs, ks, vs = self.sliding_qkv(x_new)                                    # (B, H, T, d)
        if state is None:
            empty = qs.new_zeros(b, self.heads, 0, self.head_dim)
            state = {"length": 0, "k": empty, "v": empty, "gk": empty, "gv": empty,
                     "gkg": empty, "gvg": empty}
        p, g = state["length"], self.num_global
        n_glob = max(0, min(g, p + t) - p)                                      # new global tokens
        gk = torch.cat([state["gk"], ks[:, :, :n_glob]], dim=2)
        gv = torch.cat([state["gv"], vs[:, :, :n_glob]], dim=2)
        gkg, gvg = state["gkg"], state["gvg"]
        if n_glob:
            kg_new, vg_new = self.global_kv(x_new[:, :n_glob])
            gkg, gvg = torch.cat([gkg, kg_new], dim=2), torch.cat([gvg, vg_new], dim=2)
        ck, cv = torch.cat([state["k"], ks], dim=2), torch.cat([state["v"], vs], dim=2)
        cached = state["k"].shape[2]
        kpos = torch.arange(p - cached, p + t, device=x_new.device)             # (L + T,)
        qpos = torch.arange(p, p + t, device=x_new.device)
        gpos = torch.arange(gk.shape[2], device=x_new.device)
        if t <= DENSE_DECODE_MAX:
            dil = torch.tensor(self.dilations, device=x_new.device)[:, None, None]
            local = DilatedWindow(self.window, dil, True).allows(qpos[:, None], kpos[None, :])
            local = local & (kpos >= g)                                         # (H, T, L + T)
            glob = (gpos[None, :] <= qpos[:, None]).expand(self.heads, t, -1)   # (H, T, G)
            out = dense_rows(qs, torch.cat([gk, ck], 2), torch.cat([gv, cv], 2),
                             torch.cat([glob, local], -1)[None])
        else:  # a long chunk: the blocked path over [cache; chunk], cache queries discarded
            q_all = torch.cat([qs.new_zeros(b, self.heads, cached, self.head_dim), qs], dim=2)
            extra = (gpos[None, :] <= kpos[:, None])[None, None].expand(b, 1, -1, -1)
            local_keys = (kpos >= g)[None].expand(b, -1)
            out = grouped_dilated_attention(
                q_all, ck, cv, self.window, self.dilations, True, local_keys, self.block,
                gk if gk.shape[2] else None, gv if gk.shape[2] else None,
                extra if gk.shape[2] else None)[:, :, cached:]
        if n_glob:  # the new global tokens: Qg against the Kg, Vg of every global position so far
            qg = self.split_heads(self.to_q_global(x_new[:, :n_glob]))
            allowed = gpos[None, :] <= qpos[:n_glob, None]
            out = torch.cat([dense_rows(qg, gkg, gvg, allowed[None, None]), out[:, :, n_glob:]], 2)
        keep = self.window * max(self.dilations)
        new_state = {"length": p + t, "k": ck[:, :, -keep:], "v": cv[:, :, -keep:],
                     "gk": gk, "gv": gv, "gkg": gkg, "gvg": gvg}
        return self.to_out(self.merge_heads(out)), new_state

    def extra_repr(self):
        return (f"{super().extra_repr()}, window={self.window}, dilation={self.dilation}, "
                f"num_global={self.num_global}")
