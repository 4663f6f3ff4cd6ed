"""`transformer_xl`: segment-level recurrence with relative positions (Dai et al. 2019,
arXiv:1901.02860).

Section 3.2: the sequence is cut into segments of `segment_len`; each layer's segment attends to
its own hidden inputs plus a memory of the `mem_len` hidden inputs before it, under stop-gradient
(no backpropagation into the memory). Section 3.3: positions enter only through the relative
scores (q_i + u)·k_j + (q_i + v)·W_R R_{i-j} (functional/relative.py, with appendix B's shift).
Evaluation may use a longer memory than training (section 3.2, "during evaluation ... M"):
`eval_mem_len` replaces `mem_len` in eval mode, or set the attribute `mem_len` directly.

Definition used by `forward`, `decode` and the memory models alike (one code path, `process`):
the query at absolute position i, in segment s = i // segment_len, sees the keys at positions
j with s·segment_len - mem_len <= j, and
  - causal=True: j <= i (its own segment causally + the memory);
  - causal=False: j < (s + 1)·segment_len (its whole segment both ways + the memory of earlier
    segments; nothing of later segments). Not in the paper, which is causal only.
Keys of earlier segments are computed from detached inputs, exactly as if each segment were run
with the previous ones as a cached memory, so `forward` over a long input equals running it
segment by segment, and `decode` (state = the memory plus the current partial segment, a buffer
of at most mem_len + segment_len inputs) equals the causal forward for any chunk sizes. Keys where
`mask` is False are excluded everywhere, in the memory too. Cost per segment:
segment_len · (mem_len + segment_len), so O(N · (M + L)) for N tokens (survey: O(N²) at M ~ N).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.relative import relative_shift, shift_distances, sinusoid_relative
from ..registry import register
from .base import Attention, check_positive_int


class SegmentContext:
    """The quantities of one `_process` call, read by the compressive subclass (shapes there)."""

    def __init__(self, **values):
        self.add(**values)

    def add(self, **values) -> None:
        for name, value in values.items():
            setattr(self, name, value)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, W, H*d) -> (B, H, S, W, d)"""
    return t.unflatten(-1, (heads, -1)).permute(0, 3, 1, 2, 4)


@register("transformer_xl")
class TransformerXLAttention(Attention):
    small_options = {"segment_len": 8, "mem_len": 5}

    def __init__(self, dim: int, heads: int, causal: bool = False, segment_len: int = 256,
                 mem_len: int = 256, eval_mem_len: int | None = None):
        super().__init__(dim, heads, causal)
        self.segment_len = check_positive_int("segment_len", segment_len)
        self.mem_len = check_positive_int("mem_len", mem_len, minimum=0)
        self.eval_mem_len = (None if eval_mem_len is None
                             else check_positive_int("eval_mem_len", eval_mem_len, minimum=0))
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_r = nn.Linear(dim, dim, bias=False)               # W_{k,R}
        self.u = nn.Parameter(torch.randn(heads, self.head_dim) * 0.02)
        self.v = nn.Parameter(torch.randn(heads, self.head_dim) * 0.02)
        self.to_out = nn.Linear(dim, dim)

    @property
    def memory_len(self) -> int:
        """The memory length in use: `eval_mem_len` in eval mode when given, else `mem_len`."""
        if not self.training and self.eval_mem_len is not None:
            return self.eval_mem_len
        return self.mem_len

    def relative_keys(self, distances: torch.Tensor, dtype) -> torch.Tensor:
        """(C,) distances -> (H, C, d) projected sinusoids W_R R_dist."""
        r = self.to_r(sinusoid_relative(distances, self.dim, dtype=dtype))
        return r.unflatten(-1, (self.heads, -1)).transpose(0, 1)

    # ------------------------------------------------------------------------ public entry
    def attend(self, x, mask):
        return self.process(x, mask, None)[0]

    def decode_step(self, x_new, state):
        return self.process(x_new, None, state)

    def process(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                state: dict[str, Any] | None = None):
        """x (B, N, dim) continuing `state` (None = start of a stream) -> (y, new state).

        state: "length" tokens seen, "mem" (B, K, dim) detached inputs at positions
        length-K..length-1 and "mem_mask" (B, K). Used by forward, decode and the memory models.
        """
        return self._process(x, mask, state)

    # --------------------------------------------------------------------------- the engine
    def _process(self, x, mask, state):
        self.aux_loss = None
        b, n, _ = x.shape
        dev = x.device
        L, M = self.segment_len, self.memory_len
        start = int(state["length"]) if state else 0
        end = start + n
        xmask = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=dev)
        mem = state["mem"].to(x.dtype) if state else x.new_zeros(b, 0, self.dim)
        mem_mask = state["mem_mask"] if state else xmask.new_zeros(b, 0)
        z, zmask = torch.cat([mem, x], 1), torch.cat([mem_mask, xmask], 1)  # (B, Z, D), (B, Z)
        p0, zlen = start - mem.shape[1], z.shape[1]

        s_first, s_last = start // L, (end - 1) // L
        S = s_last - s_first + 1
        # query rows: one partial segment exactly, or whole segments (slots outside x discarded)
        a0, R, wseg = (start - s_first * L, n, start - s_first * L + n) if S == 1 else (0, L, L)
        seg0 = (s_first + torch.arange(S, device=dev)) * L                    # (S,)
        # memory keys of the windows: positions before the buffer never exist, so a memory longer
        # than what precedes the last segment is cut to that (the same keys, at the cost of them;
        # a branch, not min(): under dynamic shapes a guard, where a symbolic min failed Inductor)
        if M > s_last * L - p0:
            M = max(0, s_last * L - p0)
        ctx = SegmentContext(z=z, zmask=zmask, p0=p0, start=start, end=end, S=S, R=R, a0=a0,
                             seg0=seg0, state=state, xmask=xmask)

        wq, wk, wv = self.to_qkv.weight.chunk(3, dim=0)
        wkv = torch.cat([wk, wv], 0)
        kv = F.linear(z, wkv)                                                 # (B, Z, 2D)
        t = torch.arange(M + wseg, device=dev)
        kpos = seg0[:, None] - M + t                                          # (S, M + wseg)
        zi = kpos - p0
        key_in = (zi >= 0) & (zi < zlen)
        zi = zi.clamp(0, zlen - 1)
        if S > 1 and torch.is_grad_enabled():  # earlier segments reach later ones detached
            kv_det = torch.cat([kv[:, : mem.shape[1]], F.linear(x.detach(), wkv)], 1)
            kv, zi = torch.cat([kv, kv_det], 1), zi + zlen * (t < M)
        k, v = (_heads(t_, self.heads) for t_ in kv[:, zi.reshape(-1)].unflatten(1, zi.shape).chunk(2, -1))
        key_real = key_in & zmask[:, (zi % zlen)]                            # (B, S, M + wseg)

        compressed = self.compressed_keys(ctx, wk, wv)  # (ck, cv, valid) or None
        n_cm = 0
        if compressed is not None:
            ck, cv, c_real = compressed
            n_cm = ck.shape[-2]
            k, v, key_real = torch.cat([ck, k], -2), torch.cat([cv, v], -2), torch.cat([c_real, key_real], -1)

        qx = F.linear(x, wq)                                                  # (B, N, D)
        qpos = seg0[:, None] + a0 + torch.arange(R, device=dev)               # (S, R)
        qi = (qpos - start).clamp(0, n - 1)
        q = _heads(qx[:, None] if S == 1 else qx[:, qi.reshape(-1)].unflatten(1, (S, R)),
                   self.heads)                                                # (B, H, S, R, d)

        # relative position term: row a (local a0 + a) vs key t sits at distance a0 + a + m_tot - t
        n_keys, m_tot = k.shape[-2], n_cm + M
        dist = shift_distances(R, n_keys, a0 + R - 1 + m_tot, device=dev)
        rk = self.relative_keys(dist, x.dtype)                                # (H, C, d)
        pos = torch.matmul(q + self.v[:, None, None, :].to(q.dtype), rk[None, :, None].transpose(-1, -2))
        bd = relative_shift(pos, n_keys)                                      # (B, H, S, R, W)

        local_k = torch.arange(n_keys, device=dev) - m_tot
        local_q = a0 + torch.arange(R, device=dev)
        diag = local_k[None, :] == local_q[:, None]                           # (R, W)
        allowed = key_real[:, :, None, :] | diag                              # (B, S, R, W)
        if self.causal:
            allowed = allowed & (local_k[None, :] <= local_q[:, None])
        scale = 1.0 / math.sqrt(self.head_dim)
        bias = (bd * scale).masked_fill(~allowed[:, None], float("-inf"))
        qu = q + self.u[:, None, None, :].to(q.dtype)
        probs = None
        if self.needs_usage:
            scores = torch.matmul(qu, k.transpose(-1, -2)) * scale + bias
            probs = scores.softmax(dim=-1)
            out = torch.matmul(probs, v)
        else:
            flat = lambda t_: t_.reshape(b, self.heads * S, *t_.shape[-2:])  # noqa: E731
            out = F.scaled_dot_product_attention(flat(qu), flat(k), flat(v), attn_mask=flat(bias))
        out = out.reshape(b, self.heads, S * R, self.head_dim).transpose(1, 2).reshape(b, S * R, self.dim)
        if S > 1:
            out = out[:, start - s_first * L: start - s_first * L + n]
        ctx.add(probs=probs, allowed=allowed, zi=zi % zlen, key_in=key_in, n_cm=n_cm,
                qvalid=(qpos >= start) & (qpos < end), qi=qi)

        keep = min(max(p0, max(0, (end // L) * L - self.memory_len)), end) - p0  # trim the buffer
        new_state = {"length": end, "mem": z[:, keep:].detach(), "mem_mask": zmask[:, keep:]}
        new_state.update(self.compressed_state(ctx, keep))
        return self.to_out(out), new_state

    # ------------------------------------------------- hooks for the compressive transformer
    needs_usage = False

    def compressed_keys(self, ctx, wk, wv):
        return None

    def compressed_state(self, ctx, keep: int) -> dict[str, Any]:
        return {}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, segment_len={self.segment_len}, mem_len={self.mem_len}, "
                f"eval_mem_len={self.eval_mem_len}")
