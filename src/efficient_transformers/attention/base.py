"""The base class every attention mechanism derives from: input checks, head split, decode entry."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import AttentionSpec


def check_positive_int(argument: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_number(argument: str, value: Any, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = True) -> float:
    """A finite real number (not a bool) in the interval from `low` to `high`, each end closed
    unless `low_open` / `high_open`; returned as a float."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                    if math.isfinite(high) else f"{'>' if low_open else '>='} {low:g}")
        kind = "in " if math.isfinite(high) else ""
        raise ValueError(f"{argument}: expected a finite number {kind}{interval}, got {value!r}")
    return float(value)


def check_choice(argument: str, value: Any, choices) -> Any:
    if value not in choices:
        raise ValueError(f"{argument}: expected one of {list(choices)}, got {value!r}")
    return value


def state_nbytes(state: Any) -> int:
    """Bytes held by the tensors of a decode state (dicts, lists, tuples and dataclasses walked)."""
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    if is_dataclass(state):
        return sum(state_nbytes(getattr(state, f.name)) for f in fields(state))
    return 0


def recomputing() -> bool:
    """True when a forward runs inside a backward pass: the recompute of activation checkpointing
    (torch.utils.checkpoint, either kind) or of the reversible layers. A layer whose training
    forward changes its own state (performer's redraw, routing's k-means step) then changes
    nothing and uses the state its forward used, or the recompute would differ from the forward
    and the gradients would be those of another computation. Inside torch.compile: False (a
    compiled checkpoint recomputes in its graph, without running the module again)."""
    if torch.compiler.is_compiling():
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside a backward pass
    return task is not None and task() != -1


def _reread_buffer_ints(module: "Attention", incompatible_keys) -> None:
    """After load_state_dict: read the cached buffer ints again (eagerly, before any compile)."""
    for name in list(module._buffer_ints):
        module.buffer_int(name)


class ForwardOutputs:
    """For a module that leaves outputs of its last forward on itself (`aux_loss`,
    `global_states`), named in `forward_outputs`: they are not its state, so its copies
    (copy.deepcopy, as EMA weights and torch.optim.swa_utils take them; pickle) leave them out.
    A tensor that is still part of a graph would make deepcopy fail."""

    forward_outputs: ClassVar[tuple[str, ...]] = ()

    def __getstate__(self):
        state = super().__getstate__()
        for name in self.forward_outputs:
            if name in state:
                state[name] = None
        return state


class Attention(ForwardOutputs, nn.Module):
    """Multi-head self-attention over x (B, N, dim) with a key-padding `mask` (B, N), True = real.

    Subclasses implement `attend(x, mask) -> (B, N, dim)` and, where the survey says the model
    decodes, `decode_step(x_new, state) -> (y, state)`. `forward` and `decode` check the inputs
    first, so every mechanism refuses bad input the same way, before any compute.
    A mechanism may set `self.aux_loss` (a scalar tensor) in forward; models add it to the loss.
    """

    spec: ClassVar[AttentionSpec]
    forward_outputs = ("aux_loss",)
    # A small configuration that exercises the mechanism on sequences of 8..64 tokens
    # (several blocks, buckets or clusters); the contract test and the pattern gallery use it.
    small_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal: expected True or False, got {causal!r}")
        spec = getattr(type(self), "spec", None)
        if causal and spec is not None and not spec.decode:
            raise ValueError(f"causal: {spec.name!r} cannot be causal: the survey lists "
                             f"{spec.title} as not decodable (its attention mixes every position "
                             f"with every other)")
        self.dim, self.heads, self.causal = dim, heads, causal
        self.head_dim = dim // heads
        self.max_len: int | None = None  # a mechanism with a fixed maximum length sets it
        self.aux_loss: torch.Tensor | None = None
        self._buffer_ints: dict[str, tuple] = {}  # buffer_int's cache
        self.register_load_state_dict_post_hook(_reread_buffer_ints)

    # ----------------------------------------------------------------- helpers for subclasses
    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, H*d) -> (B, H, N, d)"""
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def split_projection(self, t: torch.Tensor, parts: int) -> list[torch.Tensor]:
        """(B, N, parts·H·d), e.g. a fused q, k, v projection -> `parts` views (B, H, N, d).
        By `unbind`, not `chunk`: backward stacks the parts' gradients in one pass whatever
        their layout, where chunk's cat first copies each gradient that arrives in
        (B, H, N, d) order back into (B, N, H·d)."""
        b, n, _ = t.shape
        return [p.transpose(1, 2) for p in t.view(b, n, parts, self.heads, -1).unbind(2)]

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, N, d) -> (B, N, H*d)"""
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    def buffer_int(self, name: str) -> int:
        """The int held by the one-element buffer `name` (a seed), read from its device only
        when the buffer changed: another tensor (`.to(device)`) or an in-place write
        (`load_state_dict`). A step on CUDA then never waits for the GPU to read a seed.
        Inside torch.compile: the value of the last read (the constructor reads it, and so does
        `load_state_dict`), a constant of the compiled graph."""
        seen = self._buffer_ints.get(name)
        if torch.compiler.is_compiling() and seen is not None:
            return seen[2]
        t = getattr(self, name)
        if seen is None or seen[0] is not t or seen[1] != t._version:
            seen = self._buffer_ints[name] = (t, t._version, int(t))
        return seen[2]

    # ------------------------------------------------------------------------------- checks
    def check_input(self, x: Any, mask: Any = None, offset: int = 0) -> None:
        """Refuse bad input with an exception naming the argument; `offset` = tokens seen before."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape (batch, length, {self.dim}), "
                            f"got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (batch, length, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        b, n, _ = x.shape
        if n < 1 or b < 1:
            raise ValueError(f"x: expected batch >= 1 and length >= 1, got {tuple(x.shape)}")
        if self.max_len is not None and offset + n > self.max_len:
            raise ValueError(f"x: length {offset + n} exceeds max_len={self.max_len} "
                             f"of this {self.spec.name} layer")
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask: expected a bool tensor of shape ({b}, {n}), "
                                f"got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask: expected dtype torch.bool (True = real token), "
                                f"got {mask.dtype}")
            if tuple(mask.shape) != (b, n):
                raise ValueError(f"mask: expected shape ({b}, {n}), got {tuple(mask.shape)}")

    # ------------------------------------------------------------------------------- public
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, mask)
        self.aux_loss = None
        return self.attend(x, mask)

    def decode(self, x_new: torch.Tensor, state: Any = None):
        """Continue a causal forward: x_new (B, T, dim) -> (y (B, T, dim), new state)."""
        if not self.spec.decode:
            raise ValueError(f"decode: {self.spec.name!r} does not decode (survey Table 1)")
        if not self.causal:
            raise ValueError("decode: build the layer with causal=True to decode")
        self.check_state(state, x_new)
        self.check_input(x_new, None, offset=self.decoded_length(state))
        y, new_state = self.decode_step(x_new, state)
        new_state.update(layer=self.spec.name, batch=x_new.shape[0])  # what check_state reads
        return y, new_state

    def check_state(self, state: Any, x_new: Any) -> None:
        """`state`: None, or the dict a decode of this kind of layer returned for as many
        sequences as x_new holds (refused before any compute, as bad input is)."""
        if state is None:
            return
        made_by = state.get("layer") if isinstance(state, dict) else None
        if made_by != self.spec.name:
            got = f"the state of a {made_by} layer" if made_by else type(state).__name__
            raise TypeError(f"state: expected None or the state a {self.spec.name} layer's "
                            f"decode returned, got {got}")
        if isinstance(x_new, torch.Tensor) and x_new.dim() == 3 and x_new.shape[0] != state["batch"]:
            raise ValueError(f"state: holds {state['batch']} sequences, x_new has batch "
                             f"{x_new.shape[0]}")

    # ------------------------------------------------------------------- for subclasses
    def attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def decode_step(self, x_new: torch.Tensor, state: Any):
        raise NotImplementedError

    def decoded_length(self, state: Any) -> int:
        """How many tokens a decode state has seen (for the max_len check). Override if needed."""
        if state is None:
            return 0
        if isinstance(state, dict) and "length" in state:
            return int(state["length"])
        return 0

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}"
