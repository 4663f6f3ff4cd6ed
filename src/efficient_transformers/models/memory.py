"""Language models with segment-level recurrence: `transformer_xl` (Dai et al. 2019,
arXiv:1901.02860, section 3.2) and `compressive_transformer` (Rae et al. 2020, arXiv:1911.05507,
Algorithm 1).

They train on long token streams one segment per call with the memory carried across batches:

    memory = None
    for tokens in StreamBatches(stream, batch_size=8, segment_len=128):   # rows stay contiguous
        out = model(tokens, labels=tokens, memory=memory)
        out.loss.backward(); opt.step(); opt.zero_grad()
        memory = out.memory                                               # detached states

and evaluate over streams longer than any training segment (`stream_loss`, or one call over the
whole stream: the layers cut it into segments themselves). `generate` continues a prompt with the
memory as the decode state. Positions are relative only (positions="none"). Tasks "classify" and
"match" use the generic models of models/transformer.py around the same attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..attention.base import check_positive_int
from ..registry import register_model
from .transformer import (
    LanguageModel, ModelOutput, TaskModel, build_generic_model, check_layer_states, check_mask,
    check_sampling, check_tokens, next_token_loss, sample_next,
)


@dataclass
class MemoryOutput(ModelOutput):
    memory: dict[str, Any] | None = None  # {"length": tokens seen, "layers": per-layer states}


class MemoryLanguageModel(LanguageModel):
    """Causal LM whose layers keep a memory; `memory` in, `out.memory` out (no gradient in it)."""

    def __init__(self, generic: LanguageModel):
        TaskModel.__init__(self, generic.config)
        self.encoder, self.head, self.vocab_size = generic.encoder, generic.head, generic.vocab_size

    def check_memory(self, memory: Any, batch: int, argument: str = "memory") -> None:
        check_layer_states(memory, len(self.encoder.blocks), argument)
        if memory is None:
            return
        layer = memory["layers"][0]   # depth >= 1 layer states (check_layer_states)
        if not isinstance(layer, dict) or "mem" not in layer:
            raise TypeError(f"{argument}: expected the {argument} of a {self.config['name']} "
                            f"model, its layers' states hold no 'mem'")
        rows = layer["mem"].shape[0]
        if rows != batch:
            raise ValueError(f"{argument}: holds {rows} streams, tokens have batch {batch}")

    def run(self, tokens, mask, memory):
        """tokens (B, N) after `memory` -> hidden (B, N, dim), new memory."""
        x = self.encoder.embed_tokens(tokens)
        states = memory["layers"] if memory else [None] * len(self.encoder.blocks)
        new_states = []
        for block, state in zip(self.encoder.blocks, states):
            y, state = block.attention.process(block.norm1(x), mask, state)
            x = x + block.drop(y)
            x = x + block.drop(block.mlp(block.norm2(x)))
            new_states.append(state)
        length = (memory["length"] if memory else 0) + tokens.shape[1]
        return self.encoder.norm(x), {"length": length, "layers": new_states}

    def forward(self, tokens, mask=None, labels=None, memory=None) -> MemoryOutput:
        check_tokens(tokens, self.vocab_size, self.encoder.max_len, labels=labels,
                     num_labels=self.vocab_size, labels_per="token")
        check_mask(mask, tuple(tokens.shape))
        self.check_memory(memory, tokens.shape[0])
        hidden, memory = self.run(tokens, mask, memory)
        logits = self.head(hidden)
        out = self.finish(logits, hidden, next_token_loss(logits, labels, mask))
        return MemoryOutput(**vars(out), memory=memory)

    def decode(self, tokens, state=None):
        """Incremental forward with the memory as state: tokens (B, T) -> logits, state."""
        check_tokens(tokens, self.vocab_size, self.encoder.max_len)
        self.check_memory(state, tokens.shape[0], argument="state")
        return self.decode_unchecked(tokens, state)

    def decode_unchecked(self, tokens, state):
        hidden, state = self.run(tokens, None, state)
        return self.head(hidden), state

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 memory: dict[str, Any] | None = None) -> torch.Tensor:
        """Continue `prompt` (B, T) after `memory` (e.g. the stream read so far): greedy when
        temperature == 0. No length limit: the memory is bounded. Returns (B, T + max_new_tokens)."""
        check_sampling(prompt, max_new_tokens, temperature, top_k, self.vocab_size,
                       self.encoder.max_len)
        self.check_memory(memory, prompt.shape[0])
        was_training = self.training
        self.eval()
        out = prompt
        logits, state = self.decode_unchecked(prompt, memory)
        for step in range(max_new_tokens):
            next_token = sample_next(logits[:, -1].float(), temperature, top_k, generator)
            out = torch.cat([out, next_token], dim=1)
            if step + 1 < max_new_tokens:
                logits, state = self.decode_unchecked(next_token, state)
        self.train(was_training)
        return out


@register_model("transformer_xl")
@register_model("compressive_transformer")
def build_memory_model(name: str, task: str = "lm", *, positions: str = "none", **kwargs) -> TaskModel:
    """The generic model with relative positions only; for task "lm" the memory LM around it."""
    model = build_generic_model(name, task=task, positions=positions, **kwargs)
    if task != "lm":
        return model
    if positions != "none":
        raise ValueError(f"positions: a {name} language model uses relative positions only "
                         f"and reads unbounded streams; expected 'none', got {positions!r}")
    return MemoryLanguageModel(model)


class StreamBatches:
    """Cut a long stream into `batch_size` contiguous rows and yield (B, segment_len) pieces in
    order, so row b of every batch continues row b of the previous one (Transformer-XL's ordered
    LM iterator). A final shorter piece is yielded unless `drop_last`."""

    def __init__(self, stream: torch.Tensor, batch_size: int, segment_len: int, drop_last: bool = False):
        if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
            raise ValueError(f"stream: expected a 1-D token tensor, got "
                             f"{getattr(stream, 'shape', type(stream).__name__)}")
        check_positive_int("batch_size", batch_size)
        check_positive_int("segment_len", segment_len)
        per_row = stream.shape[0] // batch_size
        if per_row < 1:
            raise ValueError(f"stream: {stream.shape[0]} tokens cannot fill batch_size={batch_size} rows")
        self.rows = stream[: per_row * batch_size].view(batch_size, per_row)
        self.segment_len, self.drop_last = segment_len, drop_last

    def __len__(self) -> int:
        n, L = self.rows.shape[1], self.segment_len
        return n // L if self.drop_last else -(-n // L)

    def __iter__(self):
        for i in range(len(self)):
            yield self.rows[:, i * self.segment_len: (i + 1) * self.segment_len]


@torch.no_grad()
def stream_loss(model: MemoryLanguageModel, stream: torch.Tensor, chunk_len: int,
                memory: dict[str, Any] | None = None, reset_memory: bool = False,
                positions: torch.Tensor | None = None):
    """Mean next-token NLL over a (B, T) stream read in chunks of `chunk_len` with the memory
    carried (every prediction counted, chunk boundaries included); `reset_memory` forgets the
    memory before each chunk (the "without memory" baseline). `positions` (B, T) bool selects
    which target tokens count (default all but the first). Returns (loss, memory)."""
    check_positive_int("chunk_len", chunk_len)
    was_training = model.training
    model.eval()
    total, count, last = 0.0, 0, None
    for i in range(0, stream.shape[1], chunk_len):
        chunk = stream[:, i: i + chunk_len]
        out = model(chunk, memory=None if reset_memory else memory)
        logits = out.logits.float()
        if last is not None and not reset_memory:
            logits_all, targets = torch.cat([last, logits[:, :-1]], 1), chunk
            sel = slice(i, i + chunk.shape[1])
        else:
            logits_all, targets = logits[:, :-1], chunk[:, 1:]
            sel = slice(i + 1, i + chunk.shape[1])
        nll = F.cross_entropy(logits_all.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="none").view(targets.shape)
        keep = torch.ones_like(targets, dtype=torch.bool) if positions is None else positions[:, sel]
        total += float(nll[keep].sum())
        count += int(keep.sum())
        memory, last = out.memory, logits[:, -1:]
    model.train(was_training)
    return total / max(count, 1), memory
