"""Unit vectors, x / max(|x|, eps) (`F.normalize(x, dim=-1)`), with a two-pass backward.

Autograd through `F.normalize` takes the norm's and the division's gradients apart: about a
dozen passes over (..., d) tensors. Shared by routing (k-means on unit vectors) and reformer
(shared-QK keys are the unit queries)."""

from __future__ import annotations

import torch

from .amp import autocast_free
from .backward import first_order_only


def unit_parts(x: torch.Tensor, eps: float = 1e-12):
    """x (..., d) -> (x̂ = x / max(|x|, eps), max(|x|, eps) (..., 1), |x| < eps (..., 1)):
    `F.normalize(x, dim=-1)` and what its backward needs."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    clamped = norm < eps  # there the divisor is the constant eps
    norm = norm.clamp_min_(eps)
    return x / norm, norm, clamped


def unit_vectors_grad(g, x_hat, norm, clamped) -> torch.Tensor:
    """Gradient through x̂ = x / max(|x|, eps) in two passes: (g - x̂ (x̂ · g)) / |x| where
    |x| >= eps, g / eps elsewhere."""
    along = torch.linalg.vecdot(x_hat, g, dim=-1)[..., None].masked_fill_(clamped, 0.0)
    return torch.addcmul(g, x_hat, along, value=-1.0).div_(norm)


@autocast_free
class _UnitVectors(torch.autograd.Function):
    """`F.normalize(x, dim=-1)` with the two-pass backward of `unit_vectors_grad`."""

    @staticmethod
    def forward(ctx, x, eps):
        x_hat, norm, clamped = unit_parts(x, eps)
        ctx.save_for_backward(x_hat, norm, clamped)
        return x_hat

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        return unit_vectors_grad(g, *ctx.saved_tensors), None


def unit_vectors(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(..., d) -> the same vectors scaled to unit norm, exactly `F.normalize(x, dim=-1, eps)`."""
    return _UnitVectors.apply(x, eps)
