"""Rules of the custom autograd nodes' backward passes.

- `first_order_only`: a backward written for speed (in-place buffers, no graph) gives exact
  first-order gradients but is not itself differentiable. `create_graph=True` through it (a
  gradient penalty, a Hessian-vector product, MAML) is refused with a clear error: otherwise the
  second-order terms through the node are silently missing (torch's `once_differentiable` only
  raises where the incoming gradients themselves require grad).
- `single_backward`: a backward that reuses its saved tensors as gradient buffers (the fused CPU
  nodes, for memory) can run once per forward; a second pass through the same graph
  (`retain_graph=True`, `torch.autograd.functional.jacobian`) is refused with a clear error
  instead of autograd's "modified by an inplace operation".
"""

from __future__ import annotations

import functools

import torch


def node_name(ctx) -> str:
    """"_RoutedHeadsBackward" -> "_RoutedHeads"."""
    return type(ctx).__name__.removesuffix("Backward")


def first_order_only(backward):
    """Decorator for a custom node's backward (see the module docstring). Inside a backward,
    grad mode is on exactly when the caller asked for create_graph=True."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{node_name(ctx)}: no double backward (create_graph=True) through this "
                f"efficient_transformers node: its backward gives first-order gradients only")
        return backward(ctx, *grads)

    return run


def single_backward(switch: str):
    """Decorator factory for a custom node's backward that overwrites its saved tensors (see the
    module docstring). `switch`: how a user turns the node off, named in the error."""

    def decorate(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if getattr(ctx, "backward_done", False):
                raise RuntimeError(
                    f"{node_name(ctx)}: a second backward through the same graph "
                    f"(retain_graph=True): this node reuses its saved tensors as gradient "
                    f"buffers, so its graph takes one backward pass; run the forward again, or "
                    f"{switch}")
            ctx.backward_done = True
            return backward(ctx, *grads)

        return run

    return decorate
