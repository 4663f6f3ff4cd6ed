"""Named scratch tensors for loops over heads or parts: allocated on first use, then reused.

On CPU a fresh large tensor is a fresh mapping whose page faults can cost more than the arithmetic
on it, and a loop that allocates its temporaries anew every iteration pays them again and again.
"""

from __future__ import annotations

import math

import torch


class Scratch:
    """scratch(name, *shape) -> a tensor of that shape (contents undefined) in `like`'s dtype and
    device, the same storage every call with that name and size."""

    def __init__(self, like: torch.Tensor):
        self.like, self.store = like, {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        t = self.store.get(name)
        if t is None or t.numel() != math.prod(shape):
            t = self.store[name] = self.like.new_empty(math.prod(shape))
        return t.view(shape)
