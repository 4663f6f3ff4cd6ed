"""Shared test helpers: build any registered attention at a small size."""

from __future__ import annotations

import torch

import efficient_transformers as et
from efficient_transformers.registry import attention_class

DIM, HEADS = 16, 2


def small_attention(name: str, causal: bool = False, dtype=torch.float64, seed: int = 0,
                    dim: int = DIM, heads: int = HEADS, **options):
    """The mechanism with its `small_options` (several blocks / buckets at N ~ 8..64), in eval mode."""
    torch.manual_seed(seed)
    merged = {**attention_class(name).small_options, **options}
    attn = et.build_attention(name, dim=dim, heads=heads, causal=causal, **merged)
    return attn.to(dtype).eval()


def random_mask(batch: int, n: int, generator=None) -> torch.Tensor:
    """(B, N) bool with about a third padded, position 0 of row 0 and the last of row 1 padded."""
    mask = torch.rand(batch, n, generator=generator) > 0.33
    mask[0, 0] = False
    mask[-1, -1] = False
    mask[:, n // 2] = True  # every row keeps real tokens
    return mask


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
