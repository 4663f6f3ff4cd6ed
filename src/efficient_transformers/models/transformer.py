"""Pre-LayerNorm transformer blocks around any registered attention, and the three task heads.

- `LanguageModel` (task "lm"): causal, next-token loss, `generate` through the attention's decode.
- `Classifier` (task "classify"): CLS or mean pooling, cross-entropy over `num_classes`.
- `DualEncoder` (task "match"): one encoder for both texts of a pair; the LRA retrieval head
  classifies [u, v, u*v, u-v] of the two pooled embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.base import check_choice, check_number, check_positive_int
from ..registry import attention_spec, build_attention
from .pretrained import PretrainedMixin

TASKS = ("lm", "classify", "match")
POSITIONS = ("learned", "sinusoidal", "none")
POOLINGS = ("cls", "mean")
IGNORE_INDEX = -100
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass
class ModelOutput:
    logits: torch.Tensor                   # (B, N, vocab) for lm, (B, classes) otherwise
    loss: torch.Tensor | None = None       # task loss + aux_loss, when labels are given
    aux_loss: torch.Tensor | None = None   # sum of the losses the attention layers reported
    hidden: torch.Tensor | None = None     # (B, N, dim) final hidden states


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, attention: nn.Module, dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = attention
        self.mlp = FeedForward(dim, mlp_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        x = x + self.drop(self.attention(self.norm1(x), mask))
        return x + self.drop(self.mlp(self.norm2(x)))

    def decode(self, x, state=None):
        y, state = self.attention.decode(self.norm1(x), state)
        x = x + self.drop(y)
        return x + self.drop(self.mlp(self.norm2(x))), state


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed sinusoidal positions (Vaswani et al. 2017, section 3.5)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return table


class Positions(nn.Module):
    def __init__(self, kind: str, max_len: int, dim: int):
        super().__init__()
        self.kind, self.max_len = kind, max_len
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        elif kind == "sinusoidal":
            self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)
        else:
            self.table = None

    def forward(self, n: int, offset: int = 0):
        """(n, dim) positions offset..offset+n-1, or 0 when positions are off."""
        if self.table is None:
            return 0.0
        return self.table[offset: offset + n]


class Encoder(nn.Module):
    """Token embedding + positions + `depth` blocks of attention `name` + final LayerNorm."""

    def __init__(self, name: str, *, vocab_size: int, dim: int, depth: int, heads: int,
                 max_len: int, causal: bool, mlp_dim: int, dropout: float, positions: str,
                 options: dict[str, Any]):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.positions = Positions(positions, max_len, dim)
        self.drop = nn.Dropout(dropout)
        if "max_len" in attention_spec(name).options and "max_len" not in options:
            options = {**options, "max_len": max_len}
        self.blocks = nn.ModuleList(
            Block(build_attention(name, dim=dim, heads=heads, causal=causal, **options),
                  dim, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def embed_tokens(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.drop(self.embed(tokens) + self.positions(tokens.shape[1], offset))

    def run_blocks(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, tokens, mask=None):
        return self.run_blocks(self.embed_tokens(tokens), mask)

    def decode(self, tokens, states):
        """tokens (B, T) after states["length"] earlier tokens -> hidden (B, T, dim), new states."""
        offset = states["length"] if states else 0
        x = self.embed_tokens(tokens, offset)
        layer_states = states["layers"] if states else [None] * len(self.blocks)
        new_states = []
        for block, state in zip(self.blocks, layer_states):
            x, state = block.decode(x, state)
            new_states.append(state)
        return self.norm(x), {"length": offset + tokens.shape[1], "layers": new_states}


def check_tokens(tokens: Any, vocab_size: int, max_len: int, argument: str = "tokens",
                 ndim: int = 2, labels: Any = None, num_labels: int = 0,
                 labels_per: str = "example") -> None:
    """Token ids (dtype, shape, max_len, range) and, when given, `labels`: integer ids, one per
    example or per token (`labels_per`), in [0, num_labels) or -100 (ignored). One read of the
    device for both ranges: an id out of range would end in a device-side assert there."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"{argument}: expected an integer tensor, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.dim() != ndim or tokens.shape[-1] < 1:
        raise ValueError(f"{argument}: expected {ndim} dimensions ending in length, "
                         f"got shape {tuple(tokens.shape)}")
    if tokens.shape[-1] > max_len:
        raise ValueError(f"{argument}: length {tokens.shape[-1]} exceeds max_len={max_len}")
    ranges = [(argument, tokens, vocab_size)]
    if labels is not None:
        check_labels(labels, tuple(tokens.shape[:ndim if labels_per == "token" else 1]))
        ranges.append(("labels", labels, num_labels))
    check_id_ranges(ranges)


def check_labels(labels: Any, shape: tuple[int, ...]) -> None:
    """None, or integer ids of `shape` (their range: `check_id_ranges`)."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.dtype not in INTEGER_DTYPES \
            or tuple(labels.shape) != shape:
        raise ValueError(f"labels: expected an integer tensor of shape {shape}, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")


def check_id_ranges(items: list[tuple[str, torch.Tensor, int]]) -> None:
    """(argument, ids, upper) each: every id in [0, upper), where "labels" may also be -100
    (ignored). One read of the device for all."""
    items = [(name, ids.masked_fill(ids == IGNORE_INDEX, 0) if name == "labels" else ids, upper)
             for name, ids, upper in items if ids.numel()]
    if not items:
        return
    bounds = torch.stack([torch.stack(torch.aminmax(ids)).long() for _, ids, _ in items]).tolist()
    for (name, _, upper), (low, high) in zip(items, bounds):
        if low < 0 or high >= upper:
            what = "token ids" if name != "labels" else "label ids (or -100, ignored)"
            raise ValueError(f"{name}: {what} must lie in [0, {upper}), got [{low}, {high}]")


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor | None,
                    mask: torch.Tensor | None) -> torch.Tensor | None:
    """Position i predicts labels[i + 1]; labels -100 and padded positions are not scored."""
    if labels is None:
        return None
    targets = labels[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(~mask[:, 1:], IGNORE_INDEX)
    return scored_cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))


def scored_cross_entropy(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean cross-entropy (float32 at least) over the targets that are not -100; 0, not NaN,
    where none is scored (a batch of padding alone), so that no NaN reaches the weights."""
    if targets is None:
        return None
    targets = targets.long()
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp_min(1)


def check_layer_states(state: Any, depth: int, argument: str = "state") -> None:
    """A language model's decode state (or memory): None, or the dict a previous call returned,
    with "length" and one state per layer (each layer checks its own, and the batch)."""
    if state is None:
        return
    if not isinstance(state, dict) or "layers" not in state or "length" not in state:
        raise TypeError(f"{argument}: expected None or the {argument} a previous call returned "
                        f"(a dict with 'length' and 'layers'), got {type(state).__name__}")
    if len(state["layers"]) != depth:
        raise ValueError(f"{argument}: expected {depth} layer states, got {len(state['layers'])}")


def check_mask(mask: Any, shape: tuple[int, ...], argument: str = "mask") -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{argument}: expected a bool tensor of shape {shape}, "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{argument}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")


def collect_aux_loss(module: nn.Module) -> torch.Tensor | None:
    """Sum of `aux_loss` over every attention layer that reported one in the last forward."""
    losses = [m.aux_loss for m in module.modules()
              if getattr(m, "aux_loss", None) is not None and m is not module]
    return torch.stack([l.float() for l in losses]).sum() if losses else None


def add_aux(loss: torch.Tensor | None, aux: torch.Tensor | None):
    if loss is None or aux is None:
        return loss
    return loss + aux


class TaskModel(PretrainedMixin, nn.Module):
    """Common parts: config for save_pretrained, aux loss collection."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config

    def finish(self, logits, hidden, task_loss) -> ModelOutput:
        aux = collect_aux_loss(self)
        return ModelOutput(logits=logits, loss=add_aux(task_loss, aux), aux_loss=aux, hidden=hidden)


class LanguageModel(TaskModel):
    """Causal LM. `labels` are the input tokens (B, N); position i is trained to predict i + 1.
    Labels equal to -100 and positions where `mask` is False are ignored."""

    def __init__(self, config, encoder: Encoder, vocab_size: int, dim: int):
        super().__init__(config)
        self.encoder = encoder
        self.vocab_size = vocab_size
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens, mask=None, labels=None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size, self.encoder.max_len, labels=labels,
                     num_labels=self.vocab_size, labels_per="token")
        check_mask(mask, tuple(tokens.shape))
        hidden = self.encoder(tokens, mask)
        logits = self.head(hidden)
        return self.finish(logits, hidden, next_token_loss(logits, labels, mask))

    def decode(self, tokens, state=None):
        """Incremental forward: tokens (B, T) -> logits (B, T, vocab), state for the next call."""
        check_layer_states(state, len(self.encoder.blocks))
        check_tokens(tokens, self.vocab_size, self.encoder.max_len)
        seen = state["length"] if state else 0
        if seen + tokens.shape[1] > self.encoder.max_len:
            raise ValueError(f"tokens: {seen} decoded + {tokens.shape[1]} new exceed "
                             f"max_len={self.encoder.max_len}")
        return self.decode_unchecked(tokens, state)

    def decode_unchecked(self, tokens, state):
        """`decode` without its checks (generate checks once; a check reads the device)."""
        hidden, state = self.encoder.decode(tokens, state)
        return self.head(hidden), state

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue `prompt` (B, T): greedy when temperature == 0, else sampled (optionally top-k).
        Returns (B, T + max_new_tokens)."""
        check_sampling(prompt, max_new_tokens, temperature, top_k, self.vocab_size,
                       self.encoder.max_len)
        if prompt.shape[1] + max_new_tokens > self.encoder.max_len:
            raise ValueError(f"max_new_tokens: prompt length {prompt.shape[1]} + {max_new_tokens} "
                             f"exceeds max_len={self.encoder.max_len}")
        was_training = self.training
        self.eval()
        out = prompt
        logits, state = self.decode_unchecked(prompt, None)
        for _ in range(max_new_tokens):
            next_token = sample_next(logits[:, -1].float(), temperature, top_k, generator)
            out = torch.cat([out, next_token], dim=1)
            if out.shape[1] == prompt.shape[1] + max_new_tokens:
                break
            logits, state = self.decode_unchecked(next_token, state)
        self.train(was_training)
        return out


def check_sampling(prompt, max_new_tokens, temperature, top_k, vocab_size: int,
                   max_len: int) -> None:
    """The arguments of `generate`, before any compute."""
    check_positive_int("max_new_tokens", max_new_tokens, minimum=0)
    check_tokens(prompt, vocab_size, max_len, argument="prompt")
    check_number("temperature", temperature, 0.0)
    if top_k is not None:
        check_positive_int("top_k", top_k)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token (B, 1)."""
    if temperature < torch.finfo(logits.dtype).tiny:   # 0, or as good as 0 in logits' dtype
        return logits.argmax(dim=-1, keepdim=True)
    # the max first: at a tiny temperature the scaled logits overflow to inf (inf - inf = NaN),
    # a shifted row only underflows, towards greedy
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


class Pooler(nn.Module):
    """Sequence -> vector: a learned CLS token prepended (pooling "cls") or the masked mean."""

    def __init__(self, pooling: str, dim: int):
        super().__init__()
        self.pooling = pooling
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pooling == "cls" else None

    def encode(self, encoder: Encoder, tokens, mask):
        x = encoder.embed_tokens(tokens)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        hidden = encoder.run_blocks(x, mask)
        if self.cls is not None:
            return hidden[:, 0], hidden
        if mask is None:
            return hidden.mean(dim=1), hidden
        weights = mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0), hidden


class Classifier(TaskModel):
    def __init__(self, config, encoder: Encoder, pooling: str, dim: int, num_classes: int,
                 vocab_size: int, max_tokens: int):
        super().__init__(config)
        self.encoder, self.pooler = encoder, Pooler(pooling, dim)
        self.head = nn.Linear(dim, num_classes)
        self.vocab_size, self.max_tokens, self.num_classes = vocab_size, max_tokens, num_classes

    def forward(self, tokens, mask=None, labels=None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size, self.max_tokens, labels=labels,
                     num_labels=self.num_classes)
        check_mask(mask, tuple(tokens.shape))
        pooled, hidden = self.pooler.encode(self.encoder, tokens, mask)
        logits = self.head(pooled)
        return self.finish(logits, hidden, scored_cross_entropy(logits, labels))


class DualEncoder(TaskModel):
    """tokens (B, 2, N): a pair of texts, both encoded by one encoder; mask (B, 2, N)."""

    def __init__(self, config, encoder: Encoder, pooling: str, dim: int, num_classes: int,
                 vocab_size: int, max_tokens: int, dropout: float):
        super().__init__(config)
        self.encoder, self.pooler = encoder, Pooler(pooling, dim)
        self.head = nn.Sequential(nn.Linear(4 * dim, dim), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(dim, num_classes))
        self.vocab_size, self.max_tokens, self.num_classes = vocab_size, max_tokens, num_classes

    def forward(self, tokens, mask=None, labels=None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size, self.max_tokens, ndim=3, labels=labels,
                     num_labels=self.num_classes)
        if tokens.shape[1] != 2:
            raise ValueError(f"tokens: expected shape (batch, 2, length) for a pair, got {tuple(tokens.shape)}")
        check_mask(mask, tuple(tokens.shape))
        b, _, n = tokens.shape
        both = tokens.reshape(2 * b, n)  # rows: pair 0 text 1, pair 0 text 2, ...
        both_mask = None if mask is None else mask.reshape(2 * b, n)
        pooled, hidden = self.pooler.encode(self.encoder, both, both_mask)
        u, v = pooled.view(b, 2, -1).unbind(dim=1)
        logits = self.head(torch.cat([u, v, u * v, u - v], dim=-1))
        return self.finish(logits, hidden, scored_cross_entropy(logits, labels))


MAX_LEN = 1024  # the models' default max_len


def check_model_arguments(task: str, positions: str, pooling: str, dropout: Any,
                          mlp_dim: Any, tasks=TASKS, poolings=POOLINGS, **sizes) -> None:
    """The arguments every model builder shares; `sizes` are positive integers (vocab_size,
    dim, depth, ...)."""
    check_choice("task", task, tasks)
    check_choice("positions", positions, POSITIONS)
    check_choice("pooling", pooling, poolings)
    for argument, value in sizes.items():
        check_positive_int(argument, value)
    if mlp_dim is not None:
        check_positive_int("mlp_dim", mlp_dim)
    check_number("dropout", dropout, 0.0, 1.0)


def build_generic_model(name: str, task: str = "lm", *, vocab_size: int = 256,
                        num_classes: int = 2, dim: int = 128, depth: int = 2, heads: int = 4,
                        max_len: int = MAX_LEN, mlp_dim: int | None = None, dropout: float = 0.0,
                        positions: str = "learned", pooling: str = "cls",
                        encoder_class: type[Encoder] | None = None, **options) -> TaskModel:
    """The default model for attention `name`; `options` go to the attention layers.
    `encoder_class`: an `Encoder` subclass for mechanism-specific models (not saved in the
    config: their registered builder passes it again)."""
    check_model_arguments(task=task, positions=positions, pooling=pooling, vocab_size=vocab_size,
                          num_classes=num_classes, dim=dim, depth=depth, heads=heads,
                          max_len=max_len, mlp_dim=mlp_dim, dropout=dropout)
    if task == "lm" and not attention_spec(name).decode:
        raise ValueError(f"task: 'lm' needs a mechanism that decodes; {name!r} does not "
                         f"(survey Table 1); use task='classify' or 'match'")
    config = dict(name=name, task=task, vocab_size=vocab_size, num_classes=num_classes, dim=dim,
                  depth=depth, heads=heads, max_len=max_len, mlp_dim=mlp_dim, dropout=dropout,
                  positions=positions, pooling=pooling, **options)
    mlp_dim = mlp_dim or 4 * dim
    extra = 1 if (task != "lm" and pooling == "cls") else 0  # the CLS token takes a position
    encoder = (encoder_class or Encoder)(
        name, vocab_size=vocab_size, dim=dim, depth=depth, heads=heads, max_len=max_len + extra,
        causal=(task == "lm"), mlp_dim=mlp_dim, dropout=dropout, positions=positions,
        options=options)
    if task == "lm":
        return LanguageModel(config, encoder, vocab_size, dim)
    if task == "classify":
        return Classifier(config, encoder, pooling, dim, num_classes, vocab_size, max_len)
    return DualEncoder(config, encoder, pooling, dim, num_classes, vocab_size, max_len, dropout)
