"""`linformer`: Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"
(arXiv:2006.04768).

Keys and values are projected along the length by learned E, F (k × max_len) before dot-product
attention (section 4, eq. 7): head = softmax(Q (E K)ᵀ / √d) (F V), O(N·k). Inputs shorter than
`max_len` use the leading N columns of E and F; padded keys and values are zeroed before the
projection, so they contribute nothing; longer inputs are refused.

Parameter sharing (section 4, "Additional Efficiency Techniques"), option `sharing`:
- "none": separate E_i, F_i per head;
- "headwise": one E and one F per layer, shared by all heads (the default);
- "key_value": additionally E = F, one matrix per layer;
- "layerwise": one matrix for keys and values of every head of every layer: within a layer this
  is "key_value"; `build_model("linformer", sharing="layerwise")` ties the matrices of all layers
  (`tie_layerwise`, applied by the model builder registered below).
No decode (survey Table 1): the projection mixes every position with every other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..functional.dense import sdpa_attention
from ..functional.lowrank import project_length
from ..registry import register, register_model
from .base import Attention, check_choice, check_positive_int

SHARING = ("none", "headwise", "key_value", "layerwise")


@register("linformer")
class LinformerAttention(Attention):
    """Options: `k` (projected length), `max_len` (columns of E, F), `sharing` (see module doc)."""

    small_options = {"k": 8, "max_len": 64}

    def __init__(self, dim: int, heads: int, causal: bool = False, k: int = 256,
                 max_len: int = 4096, sharing: str = "headwise"):
        super().__init__(dim, heads, causal)
        self.k = check_positive_int("k", k)
        self.max_len = check_positive_int("max_len", max_len)
        self.sharing = check_choice("sharing", sharing, SHARING)
        shape = (heads, k, max_len) if sharing == "none" else (k, max_len)
        std = 1.0 / math.sqrt(k)
        self.proj_k = nn.Parameter(torch.randn(shape) * std)
        self.proj_v = nn.Parameter(torch.randn(shape) * std) if sharing in ("none", "headwise") else None
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def attend(self, x, mask):
        q, k, v = self.split_projection(self.to_qkv(x), 3)  # (B, H, N, d)
        proj_v = self.proj_k if self.proj_v is None else self.proj_v
        k = project_length(k, self.proj_k, mask)   # (B, H, k, d)
        v = project_length(v, proj_v, mask)
        out = sdpa_attention(q, k, v)             # (B, H, N, d): no N × N tensor
        return self.to_out(self.merge_heads(out))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}, max_len={self.max_len}, sharing={self.sharing!r}"


def tie_layerwise(model: nn.Module) -> nn.Module:
    """Share one projection across all Linformer layers of `model` (the paper's layerwise sharing):
    every layer's `proj_k` becomes the first layer's Parameter."""
    layers = [m for m in model.modules() if isinstance(m, LinformerAttention)]
    for layer in layers[1:]:
        layer.proj_k = layers[0].proj_k
    return model


@register_model("linformer")
def build_linformer_model(name: str, task: str = "lm", **kwargs):
    """The generic model (models/transformer.py), with layerwise sharing tied across layers."""
    from ..models.transformer import build_generic_model

    model = build_generic_model(name, task=task, **kwargs)
    if kwargs.get("sharing") == "layerwise":
        tie_layerwise(model)
    return model
