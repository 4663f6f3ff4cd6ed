"""Attention over a union of key sets: each part returns (out, lse), parts merge exactly.

A query whose keys come from several disjoint parts (a local block and a strided column, a row and
a column, raw keys and compressed slots) gets ONE softmax over the union when each part is computed
with its own normaliser and the parts are merged by their log-sum-exp:

    out = Σ_p exp(lse_p − lse) · out_p,   lse = log Σ_p exp(lse_p)

This is the "merged" head of the Sparse Transformer (Child et al. 2019, section 4.3) computed
blockwise. Everything here is differentiable through lse as well as out (the CPU flash kernel's
logsumexp is not, hence the explicit softmax). Empty rows: out 0, lse −inf, finite gradients.

Shapes: q (..., N, d), k and v (..., M, d), allowed bool broadcastable to (..., N, M);
out (..., N, d) in the dtype of v, lse (..., N) in float32 (float64 for float64 input).
"""

from __future__ import annotations

import math

import torch

from .amp import autocast_free
from .backward import first_order_only


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are kept in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_with_lse(scores: torch.Tensor):
    """scores (..., M) with −inf where masked -> (probabilities (..., M), lse (...,))."""
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    total = e.sum(dim=-1, keepdim=True)
    tiny = torch.finfo(total.dtype).tiny
    p = e / total.clamp_min(tiny)
    lse = torch.where(total > 0, torch.log(total.clamp_min(tiny)) + row_max,
                      torch.full_like(total, float("-inf")))
    return p, lse.squeeze(-1)


def masked_softmax_(scores: torch.Tensor, blocked: torch.Tensor | None = None):
    """In place, no autograd: scores (..., M) in a stat dtype, −inf where `blocked` (bool,
    broadcastable) -> (probabilities (..., M) in scores' storage, lse (...,)). Empty rows:
    probabilities 0, lse −inf."""
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = scores.sub_(row_max).exp_()
    total = p.sum(dim=-1, keepdim=True)
    p = p.div_(total.clamp_min(torch.finfo(total.dtype).tiny))
    lse = torch.where(total > 0, torch.log(total) + row_max,
                      torch.full_like(total, float("-inf"))).squeeze(-1)
    return p, lse


def output_shift(d_out: torch.Tensor, out: torch.Tensor, d_lse: torch.Tensor | None,
                 stat: torch.dtype) -> torch.Tensor:
    """rowsum(dO ∘ O) − dlse (..., N, 1) in `stat`: what the softmax backward subtracts from dP."""
    shift = (d_out.to(stat) * out.to(stat)).sum(dim=-1, keepdim=True)
    return shift if d_lse is None else shift - d_lse.to(stat)[..., None]


def softmax_grad_(d_p: torch.Tensor, p: torch.Tensor, shift: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """In place in d_p: the gradient of the scaled scores, d_s = P ∘ (dP − shift) · scale, where
    dP = dO vᵀ (..., N, M) and shift = rowsum(dO ∘ O) − dlse (..., N, 1)."""
    d_p.sub_(shift).mul_(p)
    return d_p if scale == 1.0 else d_p.mul_(scale)


@autocast_free
class _AttentionWithLse(torch.autograd.Function):
    """softmax(q kᵀ · scale | allowed) v and its lse, with a hand-written backward that keeps
    only the probabilities (one (..., N, M) tensor) and takes the lse gradient into account:
    dS = P ∘ (dO vᵀ − rowsum(dO ∘ O) + dlse)."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, scale):
        stat = stat_dtype(q.dtype)
        # the scale on q (..., N, d), not on the scores (..., N, M): one pass less over them
        scores = torch.matmul(q * scale, k.transpose(-1, -2)).to(stat)            # (..., N, M)
        p, lse = masked_softmax_(scores, None if allowed is None else ~allowed)
        out = torch.matmul(p.to(v.dtype), v)
        ctx.save_for_backward(q, k, v, p, out)
        ctx.scale = scale
        return out, lse

    @staticmethod
    @first_order_only
    def backward(ctx, d_out, d_lse):
        q, k, v, p, out = ctx.saved_tensors
        stat = p.dtype
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_p = torch.matmul(d_out, v.transpose(-1, -2)).to(stat)                    # (..., N, M)
        d_s = softmax_grad_(d_p, p, output_shift(d_out, out, d_lse, stat), 1.0).to(q.dtype)
        d_q = torch.matmul(d_s, k).mul_(ctx.scale)           # the scale on (..., N|M, d) again
        d_k = torch.matmul(d_s.transpose(-1, -2), q).mul_(ctx.scale)
        d_v = torch.matmul(p.to(v.dtype).transpose(-1, -2), d_out)
        return d_q, d_k, d_v, None, None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       allowed: torch.Tensor | None = None, scale: float | None = None):
    """softmax(q kᵀ · scale, restricted to `allowed`) v, and the row log-sum-exp of the scores.
    k and v are broadcast to q's leading dimensions."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    q = q.expand(*lead, *q.shape[-2:])
    k = k.expand(*lead, *k.shape[-2:])
    v = v.expand(*lead, *v.shape[-2:])
    return _AttentionWithLse.apply(q, k, v, allowed, scale)


def attention_with_lse_reference(q, k, v, allowed=None, scale=None):
    """The same through autograd (for tests of the hand-written backward)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)).to(stat_dtype(q.dtype)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    p, lse = softmax_with_lse(scores)
    return torch.matmul(p.to(v.dtype), v), lse


def merge_attention_parts(parts):
    """[(out (..., N, d), lse (..., N)), ...] over disjoint key sets -> (out, lse) of their union."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])                    # (P, ..., N)
    top = lses.amax(dim=0).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lses - top)                                  # (P, ..., N), 0 for empty
    total = weights.sum(dim=0)
    tiny = torch.finfo(total.dtype).tiny
    out = sum(w[..., None] * o.to(w.dtype) for w, (o, _) in zip(weights.unbind(0), parts))
    out = out / total.clamp_min(tiny)[..., None]
    lse = torch.where(total > 0, torch.log(total.clamp_min(tiny)) + top,
                      torch.full_like(total, float("-inf")))
    return out.to(parts[0][0].dtype), lse


def merge_pair(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
               lse_b: torch.Tensor) -> torch.Tensor:
    """Two parts over disjoint key sets, (out (..., N, d), lse (..., N)) each -> the out of
    their union, as one interpolation in out's dtype: out_b + σ(lse_a − lse_b) (out_a − out_b).
    `merge_attention_parts` for two parts without its float32 passes over (..., N, d); the
    union's lse is not returned. A row empty in both parts gets out_b, with finite gradients."""
    diff = lse_a - lse_b                                       # −inf − (−inf) = nan: both empty
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("-inf")), diff)
    return torch.lerp(out_b, out_a, torch.sigmoid(diff).to(out_a.dtype)[..., None])
