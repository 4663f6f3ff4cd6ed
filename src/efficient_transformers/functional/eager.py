"""`outside_graphs`: code that torch.compile must run eagerly, without importing torch._dynamo."""

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
