"""FAVOR+ features in one autograd node: the fast path of `kernels.softmax_feature_map` and
`kernels.softmax_key_features` (their references; the tests compare values and gradients).

Every FAVOR+ feature is φ = exp(p + b − c − ½ ln m), p = ωᵀx d^-¼ (B, H, N, m), b a per-row bias
(−|x|²/(2√d) for keys, none for queries), c a per-row or per-head stabiliser taken from the
forward values without gradient (it cancels, or is carried as a log-scale). The eager form runs
five passes over the (N × m) tensor forward (matmul, shift, exp, 1/√m, the key bias) and as many
backward; this node writes p once, shifts and exponentiates it in place and saves only φ, whose
gradient is dp + db = dφ·φ: backward is one product and one matmul against [ω | 1], which gives
the gradients of x (d columns) and of b (the last column) together. The bias's own gradient
(through |x|²) stays with autograd. Without a gradient to compute (decode steps, inference) the
same function runs without the node, whose bookkeeping costs more than a one-token step.
"""

from __future__ import annotations

import math

import torch

from .amp import autocast_free
from .kernels import LOG_SCALE_FLOOR


def _favor_exp(x, w, bias, stabiliser: str):
    """No autograd: exp(x wᵀ + bias − c − ½ ln m) written into the product's storage.
    x (B, H, N, d), w (m, d), bias (B, H, N, 1) or None; stabiliser "row" (c per row: queries,
    causal keys' μ) or "head" (c per (b, h): non-causal keys). Returns (φ (B, H, N, m), c).
    Padded rows (bias −inf) give φ 0 and c = LOG_SCALE_FLOOR, never a maximum."""
    phi = torch.matmul(x, w.T)                                     # p (B, H, N, m)
    c = phi.amax(dim=-1, keepdim=True)                             # (B, H, N, 1)
    if bias is not None:
        c = c + bias
        if stabiliser == "head":
            c = c.amax(dim=-2, keepdim=True)                       # (B, H, 1, 1)
        c = c.clamp_min(LOG_SCALE_FLOOR)
    shift = c + 0.5 * math.log(w.shape[0])
    if bias is None:
        phi.sub_(shift)
    else:
        phi.add_(bias - shift)
    return phi.exp_(), c


@autocast_free
class _FavorExp(torch.autograd.Function):
    """`_favor_exp` with its gradient: φ's is dp + db = dφ·φ (c has none)."""

    @staticmethod
    def forward(ctx, x, w, bias, stabiliser: str):
        phi, c = _favor_exp(x, w, bias, stabiliser)
        ctx.save_for_backward(x, w, phi)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(c)
        return phi, c

    @staticmethod
    def backward(ctx, grad_phi, _grad_c):
        x, w, phi = ctx.saved_tensors
        g = grad_phi * phi                                         # d(p + b)  (B, H, N, m)
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            d = w.shape[1]
            both = torch.matmul(g, torch.cat([w, w.new_ones(w.shape[0], 1)], dim=1))
            grad_x = both[..., :d]                                 # (B, H, N, d)
            grad_bias = both[..., d:] if ctx.has_bias else None    # (B, H, N, 1)
        if ctx.needs_input_grad[1]:
            grad_w = torch.matmul(g.flatten(0, -2).T, x.flatten(0, -2))
        return grad_x, grad_w, grad_bias, None


def _features(x, w, bias, stabiliser):
    """Through the autograd node when a gradient is wanted, else directly (decode steps)."""
    wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w, bias))
    return (_FavorExp.apply if wanted else _favor_exp)(x, w, bias, stabiliser)


def _scaled_omega(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """ω d^-¼ in x's dtype: p = ωᵀx d^-¼ without a pass over x."""
    return omega.to(x.dtype) * x.shape[-1] ** -0.25


def _key_bias(x: torch.Tensor, key_mask) -> torch.Tensor:
    """−|k'|²/2 per key (B, H, N, 1), −inf at padded keys (their features are exactly 0)."""
    bias = -0.5 * x.square().sum(dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    if key_mask is not None:
        bias = bias.masked_fill(~key_mask[:, None, :, None], float("-inf"))
    return bias


def fused_softmax_feature_map(x: torch.Tensor, omega: torch.Tensor, is_query: bool,
                              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.softmax_feature_map` (same values, same gradients) in one node."""
    bias = None if is_query else _key_bias(x, key_mask)
    phi, _ = _features(x, _scaled_omega(x, omega), bias, "row" if is_query else "head")
    return phi


def fused_softmax_key_features(x: torch.Tensor, omega: torch.Tensor,
                               key_mask: torch.Tensor | None = None):
    """`kernels.softmax_key_features` (same values, same gradients) in one node:
    (ψ (B, H, N, m), log-scale μ (B, H, N))."""
    psi, mu = _features(x, _scaled_omega(x, omega), _key_bias(x, key_mask), "row")
    return psi, mu[..., 0]
