"""Compressive Transformer memory compression (Rae et al. 2020, arXiv:1911.05507).

Section 3.1: states evicted from the memory are mapped by a compression function
f_c: R^{n_s × d} -> R^{⌊n_s / c⌋ × d} at compression rate c. The paper compares max pooling,
mean pooling (kernel and stride c), a 1-D convolution (kernel and stride c), dilated
convolutions, and "most-used" (memories sorted by the average attention they received, the
most-used kept). Here every function maps each aligned group of c consecutive states to one
slot; "most-used" keeps the most-used state of each group (the paper keeps the most-used n_s/c of
the whole evicted block), and the dilated convolution is a stack of kernel-2 convolutions with
dilations 1, 2, 4, ..., c/2 read at the group's last position (c a power of two).
Padded states (valid False) never change a slot: pooling and "most-used" skip them, the
convolutions see zeros in their place; a group with no real state is an invalid slot.

Section 3.2 and Algorithm 2: the compression network is trained by the attention-reconstruction
loss ||attn(h, old_mem) - attn(h, f_c(old_mem))||², content-based attention with the layer's own
query/key/value maps, every input (h, old_mem, the attention weights) under stop-gradient, so the
loss reaches the compression parameters only.

Shapes: states (B, G, c, D), valid (B, G, c) bool -> slots (B, G, D), slot_valid (B, G).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dense import masked_softmax

COMPRESSIONS = ("conv", "max", "mean", "dilated_conv", "most_used")
PARAMETRIC = ("conv", "dilated_conv")


def max_pool(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    masked = states.masked_fill(~valid[..., None], float("-inf")).amax(dim=2)
    return torch.where(valid.any(dim=2)[..., None], masked, torch.zeros_like(masked))


def mean_pool(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid[..., None].to(states.dtype)
    return (states * w).sum(dim=2) / w.sum(dim=2).clamp_min(1.0)


def most_used(states: torch.Tensor, valid: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """The state of each group with the largest `usage` (B, G, c) among its real states."""
    score = usage.masked_fill(~valid, float("-inf"))
    pick = score.argmax(dim=2)  # (B, G)
    chosen = states.gather(2, pick[..., None, None].expand(-1, -1, 1, states.shape[-1]))[:, :, 0]
    return torch.where(valid.any(dim=2)[..., None], chosen, torch.zeros_like(chosen))


def conv_compress(states: torch.Tensor, valid: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
    """Convolutions over each group of c states (zeros where padded) down to one slot."""
    b, g, c, d = states.shape
    h = (states * valid[..., None].to(states.dtype)).reshape(b * g, c, d).transpose(1, 2)
    for i, conv in enumerate(layers):
        h = conv(h) if i == 0 else conv(F.relu(h))
    return h[..., -1].reshape(b, g, d)  # (B*G, D, 1) after the last layer


def make_compressor(kind: str, dim: int, rate: int) -> nn.ModuleList:
    """The trainable layers of `kind` (empty for the parameter-free functions)."""
    if kind == "conv":
        return nn.ModuleList([nn.Conv1d(dim, dim, kernel_size=rate, stride=rate)])
    if kind == "dilated_conv":
        levels = int(math.log2(rate))
        return nn.ModuleList([nn.Conv1d(dim, dim, kernel_size=2, dilation=2 ** i)
                              for i in range(levels)])
    return nn.ModuleList()


def compress(kind: str, states: torch.Tensor, valid: torch.Tensor, layers: nn.ModuleList,
             usage: torch.Tensor | None = None):
    """f_c on groups: (B, G, c, D) -> (slots (B, G, D), slot_valid (B, G))."""
    if kind == "max":
        slots = max_pool(states, valid)
    elif kind == "mean":
        slots = mean_pool(states, valid)
    elif kind == "most_used":
        if usage is None:
            raise ValueError("usage: 'most_used' compression needs the attention usage of each state")
        slots = most_used(states, valid, usage)
    else:
        slots = conv_compress(states, valid, layers)
    return slots, valid.any(dim=2)


def content_attention(h: torch.Tensor, mem: torch.Tensor, mem_valid: torch.Tensor,
                      wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, heads: int):
    """softmax((h Wq)(m Wk)ᵀ/√d)(m Wv) per head: h (B, E, R, D), mem (B, E, M, D) -> (B, E, R, D)."""
    def split(t):  # (B, E, n, D) -> (B, E, H, n, d)
        return t.unflatten(-1, (heads, -1)).transpose(-2, -3)
    q, k, v = split(F.linear(h, wq)), split(F.linear(mem, wk)), split(F.linear(mem, wv))
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.matmul(masked_softmax(scores, mem_valid[:, :, None, None, :]), v)
    return out.transpose(-2, -3).flatten(-2)


def attention_reconstruction_loss(h, h_valid, old, old_valid, slots, slot_valid,
                                  wq, wk, wv, heads: int) -> torch.Tensor:
    """Rae et al. Algorithm 2: mean over real query rows of ||attn(h, old) - attn(h, f_c(old))||².

    h (B, E, R, D) the segment whose arrival evicted `old` (B, E, M, D); slots (B, E, M/c, D) the
    compressed `old` (the only input that keeps its gradient); weights are detached here.
    """
    h, old = h.detach(), old.detach()
    wq, wk, wv = wq.detach(), wk.detach(), wv.detach()
    target = content_attention(h, old, old_valid, wq, wk, wv, heads)
    approx = content_attention(h, slots, slot_valid, wq, wk, wv, heads)
    rows = (h_valid & old_valid.any(dim=-1, keepdim=True))[..., None].to(h.dtype)  # (B, E, R, 1)
    denom = (rows.sum() * h.shape[-1]).clamp_min(1.0)
    return ((target - approx).square() * rows).sum() / denom
