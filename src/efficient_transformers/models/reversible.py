"""The `reformer` model: reversible residual layers and chunked feed-forward around LSH attention.

Kitaev et al. 2020 (arXiv:2001.04451), section 3 "Reversible Transformer" (RevNet, Gomez et al.
2017): the activations are split in two halves (here both start as the embedding) and each layer maps
    y1 = x1 + Attention(LN(x2)),    y2 = x2 + FeedForward(LN(y1)),
which is inverted exactly by x2 = y2 - FeedForward(LN(y1)), x1 = y1 - Attention(LN(x2)). Training
keeps only the last layer's output: `ReversibleStack` recomputes each layer's input in backward,
so activation memory does not grow with depth. Section 3 "Chunking": the feed-forward runs over
`ff_chunks` pieces of the sequence. The output is LayerNorm((y1 + y2) / 2).

Decode runs the same layers forward with the attention's exact decode (reversibility only matters
for training). The task heads are the generic ones of `models/transformer.py`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from typing import Any

import torch
from torch import nn

from ..attention.reformer import length_buckets
from ..functional.backward import first_order_only
from ..registry import attention_spec, build_attention, register_model
from .transformer import (
    Classifier, DualEncoder, Encoder, FeedForward, LanguageModel, TaskModel,
    check_model_arguments,
)


class ChunkedFeedForward(nn.Module):
    """LN then the MLP applied to `chunks` pieces of the sequence (section 3, "Chunking")."""

    def __init__(self, dim: int, hidden: int, dropout: float, chunks: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, hidden, dropout)
        self.chunks = chunks

    def forward(self, x):
        x = self.norm(x)
        if self.chunks == 1 or x.shape[1] < 2:
            return self.mlp(x)
        return torch.cat([self.mlp(piece) for piece in x.chunk(self.chunks, dim=1)], dim=1)


class ReversibleBlock(nn.Module):
    """f = Attention(LN(.)), g = ChunkedFeedForward; y1 = x1 + f(x2), y2 = x2 + g(y1)."""

    def __init__(self, attention: nn.Module, dim: int, mlp_dim: int, dropout: float, ff_chunks: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = attention
        self.ff = ChunkedFeedForward(dim, mlp_dim, dropout, ff_chunks)
        self.drop = nn.Dropout(dropout)

    def f(self, x2, mask):
        return self.drop(self.attention(self.norm(x2), mask))

    def g(self, y1):
        return self.drop(self.ff(y1))

    def forward(self, x1, x2, mask=None):
        y1 = x1 + self.f(x2, mask)
        return y1, x2 + self.g(y1)

    def decode(self, x1, x2, state=None):
        a, state = self.attention.decode(self.norm(x2), state)
        y1 = x1 + self.drop(a)
        return y1, x2 + self.g(y1), state


class _RngState:
    """The RNG state at a point of the forward, replayed when the layer is recomputed (dropout)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    @contextmanager
    def replay(self):
        """Run the enclosed code with the RNG as it was; the outer RNG is restored afterwards."""
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


class _AutocastState:
    """Autocast as it was in the forward (on the input's device and the CPU), replayed when the
    blocks are recomputed: backward runs after the autocast region, and a block recomputed in
    another precision would not invert the forward's."""

    def __init__(self, device: torch.device):
        self.settings = {kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                         for kind in {device.type, "cpu"}}

    @contextmanager
    def replay(self):
        with ExitStack() as stack:
            for kind, (enabled, dtype) in self.settings.items():
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            yield


def _recompute(fn, inp, rng: _RngState, autocast: _AutocastState, upstream, params,
               grads: dict):
    """Recompute out = fn(inp) as in the forward; accumulate the parameter gradients of
    <upstream, out> into grads and return (out, gradient w.r.t. inp)."""
    with torch.enable_grad(), rng.replay(), autocast.replay():
        inp = inp.detach().requires_grad_()
        out = fn(inp)
        d = torch.autograd.grad(out, [inp] + params, upstream, allow_unused=True)
    _accumulate(grads, params, d[1:])
    return out.detach(), d[0]


class _ReversibleFunction(torch.autograd.Function):
    """Runs the blocks without storing activations; backward inverts them one block at a time."""

    @staticmethod
    def forward(ctx, x1, x2, blocks, mask, *params):
        ctx.blocks, ctx.mask, ctx.n_params = blocks, mask, len(params)
        ctx.autocast = _AutocastState(x1.device)
        ctx.rng = []
        with torch.no_grad():
            for block in blocks:
                rng_f = _RngState(x1.device)
                y1 = x1 + block.f(x2, mask)
                rng_g = _RngState(x1.device)
                x2 = x2 + block.g(y1)
                x1 = y1
                ctx.rng.append((rng_f, rng_g))
        ctx.save_for_backward(x1.detach(), x2.detach())
        return x1, x2

    @staticmethod
    @first_order_only   # its recompute takes first-order gradients of the blocks
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        grads: dict[int, torch.Tensor] = {}
        for block, (rng_f, rng_g) in zip(reversed(ctx.blocks), reversed(ctx.rng)):
            params = [p for p in block.parameters() if p.requires_grad]
            gy1, d_y1 = _recompute(block.g, y1, rng_g, ctx.autocast, dy2, params, grads)
            x2, dy1 = y2 - gy1, dy1 + d_y1                                  # x2 = y2 - g(y1)
            fx2, d_x2 = _recompute(lambda t: block.f(t, ctx.mask), x2, rng_f, ctx.autocast, dy1,
                                   params, grads)
            x1, dy2 = y1 - fx2, dy2 + d_x2                                  # x1 = y1 - f(x2)
            y1, y2 = x1, x2
        all_params = [p for block in ctx.blocks for p in block.parameters() if p.requires_grad]
        return (dy1, dy2, None, None, *[grads.get(id(p)) for p in all_params])


def _accumulate(grads: dict, params, values) -> None:
    for p, g in zip(params, values):
        if g is not None:
            grads[id(p)] = g if id(p) not in grads else grads[id(p)] + g


class ReversibleEncoder(Encoder):
    """The generic Encoder's embedding, positions and final norm around reversible blocks."""

    def __init__(self, name: str, *, vocab_size: int, dim: int, depth: int, heads: int,
                 max_len: int, causal: bool, mlp_dim: int, dropout: float, positions: str,
                 reversible: bool, ff_chunks: int, options: dict[str, Any]):
        super().__init__(name, vocab_size=vocab_size, dim=dim, depth=0, heads=heads,
                         max_len=max_len, causal=causal, mlp_dim=mlp_dim, dropout=dropout,
                         positions=positions, options=options)
        self.reversible = reversible
        self.blocks = nn.ModuleList(
            ReversibleBlock(build_attention(name, dim=dim, heads=heads, causal=causal, **options),
                            dim, mlp_dim, dropout, ff_chunks) for _ in range(depth))

    def run_blocks(self, x, mask, reversible: bool | None = None):
        """x (B, N, dim) -> LN((y1 + y2) / 2); reversible backward when training with grad."""
        reversible = self.reversible if reversible is None else reversible
        x1 = x2 = x
        params = [p for p in self.blocks.parameters() if p.requires_grad]
        if reversible and torch.is_grad_enabled() and (x.requires_grad or params):
            x1, x2 = _ReversibleFunction.apply(x1, x2, list(self.blocks), mask, *params)
        else:
            for block in self.blocks:
                x1, x2 = block(x1, x2, mask)
        return self.norm((x1 + x2) / 2)

    def decode(self, tokens, states):
        offset = states["length"] if states else 0
        x1 = x2 = self.embed_tokens(tokens, offset)
        layer_states = states["layers"] if states else [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, layer_states):
            x1, x2, state = block.decode(x1, x2, state)
            new_states.append(state)
        hidden = self.norm((x1 + x2) / 2)
        return hidden, {"length": offset + tokens.shape[1], "layers": new_states}


@register_model("reformer")
def build_reformer_model(name: str, task: str = "lm", *, vocab_size: int = 256,
                         num_classes: int = 2, dim: int = 128, depth: int = 2, heads: int = 4,
                         max_len: int = 1024, mlp_dim: int | None = None, dropout: float = 0.0,
                         positions: str = "learned", pooling: str = "cls", reversible: bool = True,
                         ff_chunks: int = 1, **options) -> TaskModel:
    """The Reformer: reversible blocks of LSH attention and chunked feed-forward.

    Same arguments as `build_generic_model` plus `reversible` (recompute activations in backward)
    and `ff_chunks` (feed-forward over that many sequence pieces); `options` go to the attention.
    """
    check_model_arguments(task=task, positions=positions, pooling=pooling, vocab_size=vocab_size,
                          num_classes=num_classes, dim=dim, depth=depth, heads=heads,
                          max_len=max_len, ff_chunks=ff_chunks, mlp_dim=mlp_dim, dropout=dropout)
    if not isinstance(reversible, bool):
        raise ValueError(f"reversible: expected True or False, got {reversible!r}")
    spec = attention_spec(name)
    if task == "lm" and options.get("n_buckets") is None:
        # causal layers cannot size their buckets from N (decode grows it): size them from max_len
        options["n_buckets"] = length_buckets(max_len, options.get("bucket_size",
                                                                   spec.options["bucket_size"]))
    config = dict(name=name, task=task, vocab_size=vocab_size, num_classes=num_classes, dim=dim,
                  depth=depth, heads=heads, max_len=max_len, mlp_dim=mlp_dim, dropout=dropout,
                  positions=positions, pooling=pooling, reversible=reversible,
                  ff_chunks=ff_chunks, **options)
    mlp_dim = mlp_dim or 4 * dim
    extra = 1 if (task != "lm" and pooling == "cls") else 0  # the CLS token takes a position
    encoder = ReversibleEncoder(name, vocab_size=vocab_size, dim=dim, depth=depth, heads=heads,
                                max_len=max_len + extra, causal=(task == "lm"), mlp_dim=mlp_dim,
                                dropout=dropout, positions=positions, reversible=reversible,
                                ff_chunks=ff_chunks, options=options)
    if task == "lm":
        return LanguageModel(config, encoder, vocab_size, dim)
    if task == "classify":
        return Classifier(config, encoder, pooling, dim, num_classes, vocab_size, max_len)
    return DualEncoder(config, encoder, pooling, dim, num_classes, vocab_size, max_len, dropout)
