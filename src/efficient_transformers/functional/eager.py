"""`outside_graphs`: code that torch.compile must run eagerly, without importing torch._dynamo;
`outside_inference_mode` and `kept_tensor`: tensors kept from one call to the next."""

from __future__ import annotations

import functools
import sys

import torch


def outside_graphs(fn):
    """`fn` runs eagerly where torch.compile traces its caller (a graph break there): for what
    cannot be in a graph (a torch.Generator) or should not be (a Python counter would compile
    the caller again at every call). `torch.compiler.disable` is applied at the first call made
    once torch._dynamo is loaded, not at import: importing it costs about a second, and while
    it is not loaded nothing is being compiled."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


def outside_inference_mode(fn):
    """`fn` makes tensors kept from one call to the next (a cache entry, a buffer). Made under
    torch.inference_mode they would be inference tensors, which a later call with autograd
    cannot save for backward ("Inference tensors cannot be saved for backward"), so `fn` runs
    with inference mode off and gradients still off."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)   # (dynamo cannot ask about inference mode)
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return call


def kept_tensor(t: torch.Tensor) -> torch.Tensor:
    """t, to be kept across calls: itself, or a normal copy where it is an inference tensor
    (see `outside_inference_mode`)."""
    if torch.compiler.is_compiling() or not t.is_inference():   # (dynamo cannot ask)
        return t
    return outside_inference_mode(torch.clone)(t)
