"""The ETC model (Ainslie et al. 2020, arXiv:2004.08483, section 2): two input sequences, a long
one (the tokens) and a global one of `num_global` learned tokens, both carried through every
layer. Each layer's global-local attention (`attention/etc.py`) updates both; the pre-LayerNorm
residual blocks and their feed-forward network are shared by the two sequences (our choice: one
set of block weights per layer). The task heads read the long sequence, as for every mechanism.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention.base import ForwardOutputs
from ..registry import attention_spec, register_model
from .transformer import Encoder, TaskModel, build_generic_model


class GlobalLocalEncoder(ForwardOutputs, Encoder):
    """The generic Encoder whose blocks also carry the global states (B, G, dim): the first
    layer reads `global_tokens`, each later one the states the previous one left."""

    forward_outputs = ("global_states",)

    def __init__(self, name: str, *, dim: int, options: dict[str, Any], **kwargs):
        super().__init__(name, dim=dim, options={**options, "learned_globals": False}, **kwargs)
        num_global = options.get("num_global", attention_spec(name).options["num_global"])
        self.global_tokens = nn.Parameter(torch.randn(num_global, dim) * 0.02)
        self.global_states: torch.Tensor | None = None

    def run_blocks(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        g = self.global_tokens.to(x.dtype).expand(x.shape[0], -1, -1)        # (B, G, dim)
        for block in self.blocks:
            long_out, glob_out = block.attention.forward_with_globals(
                block.norm1(x), mask, global_tokens=block.norm1(g))
            x, g = x + block.drop(long_out), g + block.drop(glob_out)
            x = x + block.drop(block.mlp(block.norm2(x)))
            g = g + block.drop(block.mlp(block.norm2(g)))
        self.global_states = self.norm(g)
        return self.norm(x)


@register_model("etc")
def build_etc_model(name: str, task: str = "lm", **kwargs) -> TaskModel:
    """The generic model's arguments; the encoder carries the global tokens (module doc)."""
    if "learned_globals" in kwargs:
        raise ValueError("learned_globals: the ETC model carries one set of global tokens "
                         "through its layers; the option is for a standalone layer")
    return build_generic_model(name, task, encoder_class=GlobalLocalEncoder, **kwargs)
