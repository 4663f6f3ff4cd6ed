"""Autocast and the custom autograd nodes.

Autocast reaches the ops inside a custom node's forward (a matmul of float32 inputs comes out in
bfloat16) but not its backward, which the engine runs after the autocast region: the two then
disagree on dtypes. `autocast_free` turns autocast off inside a node's forward and backward, so
a node computes in the dtypes of its inputs, as it does without autocast; the callers hand it
inputs in the autocast dtype where autocast would have cast them (`cast_like_autocast`).
"""

from __future__ import annotations

import contextlib
import functools

import torch


def _device_type(args) -> str | None:
    return next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)


def outside_autocast(fn, skip: int = 0):
    """fn run with autocast off on the device of its first tensor argument after the first
    `skip` ones (a node's ctx)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = _device_type(args[skip:])
        if device is None or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return run


def autocast_free(node: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator for a torch.autograd.Function: forward and backward run with autocast
    off for the device of their first tensor argument."""
    for name in ("forward", "backward"):
        setattr(node, name, staticmethod(outside_autocast(getattr(node, name), skip=1)))
    return node


def autocast_off(t: torch.Tensor):
    """Context manager: autocast off on t's device, for code that picks its own dtypes (the
    kernelised attentions' float32 sums); nothing to enter where it is off already."""
    if not torch.is_autocast_enabled(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def cast_like_autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The floating tensors in the autocast dtype of their device when autocast is on there (as
    autocast casts a matmul's operands); unchanged otherwise. None stays None."""
    device = _device_type(tensors)
    if device is None or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
