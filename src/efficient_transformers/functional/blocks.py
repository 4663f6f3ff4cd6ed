"""Pad / chunk helpers shared by the block methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_length(n: int, multiple: int) -> int:
    """How many positions to append so that n becomes a multiple of `multiple`."""
    return (-n) % multiple


def pad_to_multiple(t: torch.Tensor, multiple: int, dim: int = -2, value: float = 0.0):
    """Pad axis `dim` of t at the end to a multiple of `multiple`. Returns (padded, pad)."""
    pad = pad_length(t.shape[dim], multiple)
    if pad == 0:
        return t, 0
    dim = dim % t.dim()
    spec = [0, 0] * (t.dim() - dim - 1) + [0, pad]
    return F.pad(t, spec, value=value), pad


def pad_mask_to_multiple(mask: torch.Tensor | None, n: int, multiple: int, batch: int,
                         device=None) -> torch.Tensor:
    """(B, N) key mask (or None = all real) -> (B, N + pad) with the appended positions False."""
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    padded, _ = pad_to_multiple(mask, multiple, dim=-1, value=False)
    return padded
