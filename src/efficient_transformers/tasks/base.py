"""What every task shares: examples, splits, deterministic data order, batching.

An example is a dict of numpy arrays / ints:
- classify: {"tokens": (n,) int64, "label": int}                       n <= seq_len
- match:    {"tokens": [(n1,), (n2,)] int64, "label": int}             a pair of texts
- lm:       {"tokens": (n,) int64, "labels": (n,) int64 with -100 where nothing is scored}

Data order is a pure function of (seed, global example index), so a resumed run and every
shard of a distributed run see exactly the examples an uninterrupted single-process run sees:
- a generated split draws example i from `rng(seed, split, i)`;
- a file split reads example `permutation(seed, epoch)[i % n]` with epoch = i // n.
At step s with global batch B, the global indices are s*B .. s*B+B-1; rank r of W takes the
contiguous slice r*B/W .. (r+1)*B/W - 1 (`shard_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..attention.base import check_positive_int

PAD = 0
IGNORE_INDEX = -100
SPLIT_SALT = {"train": 0, "eval": 1, "test": 2}


class MissingDataError(FileNotFoundError):
    """The official files of a task are not where the user said (or no --data was given)."""


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that draws example `index` of a generated split: independent of any other."""
    return np.random.default_rng([int(seed), SPLIT_SALT[split], int(index)])


class Split:
    """A sequence of examples addressable by a global index (which may exceed its size)."""

    size: int | None  # None = unbounded (generated training data)

    def get(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        if self.size is None:
            raise TypeError("an unbounded generated split has no length")
        return self.size


class GeneratedSplit(Split):
    """Example i = make(rng(seed, split, i)); `size` None for an endless training stream.

    With a `size` and `pool=True` (a fixed training set, as LRA's 96k ListOps examples) a global
    index i reads pool example `permutation(seed, epoch)[i % size]`, generated once and cached."""

    def __init__(self, make: Callable[[np.random.Generator], dict], seed: int, split: str,
                 size: int | None, pool: bool = False):
        self.make, self.seed, self.split, self.size = make, seed, split, size
        self.order = Order(size, seed, shuffle=True) if pool and size else None
        self.cache: dict[int, dict] = {}

    def get(self, index: int) -> dict[str, Any]:
        if self.order is None:
            return self.make(example_rng(self.seed, self.split, index))
        index = self.order.position(index)
        if index not in self.cache:
            self.cache[index] = self.make(example_rng(self.seed, self.split, index))
        return self.cache[index]


def generated_splits(make: Callable[[np.random.Generator], dict], seed: int,
                     eval_examples: Any, train_examples: Any) -> dict[str, GeneratedSplit]:
    """A generated task's splits: eval and test of `eval_examples` each; train endless, or a
    fixed pool of `train_examples` (None: endless)."""
    check_positive_int("eval_examples", eval_examples)
    if train_examples is not None:
        check_positive_int("train_examples", train_examples)
    splits = {s: GeneratedSplit(make, seed, s, eval_examples) for s in ("eval", "test")}
    splits["train"] = GeneratedSplit(make, seed, "train", train_examples, pool=bool(train_examples))
    return splits


class Order:
    """Global index -> position in a split of `size`: epoch = i // size, then a permutation
    seeded by (seed, epoch) when shuffling, else i % size."""

    def __init__(self, size: int, seed: int, shuffle: bool):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def position(self, index: int) -> int:
        epoch, offset = divmod(int(index), self.size)
        if not self.shuffle:
            return offset
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([int(self.seed), epoch]).permutation(self.size))
        return int(self._perm[1][offset])


class ListSplit(Split):
    """Examples held in memory (read from files), in a seeded shuffle per epoch when `shuffle`
    (training; also evaluation splits stored sorted by class, so that a capped evaluation
    reads a uniform subset), else in file order."""

    def __init__(self, examples: Sequence[dict], seed: int = 0, shuffle: bool = False):
        if not examples:
            raise MissingDataError("the split has no examples; check the files under --data")
        self.examples, self.size = examples, len(examples)
        self.order = Order(self.size, seed, shuffle)

    def get(self, index: int) -> dict[str, Any]:
        return self.examples[self.order.position(index)]


@dataclass
class TaskData:
    """A task ready to train on: its splits and the model head it needs."""

    name: str
    model_task: str          # "lm", "classify" or "match" (the build_model task)
    vocab_size: int
    num_classes: int
    seq_len: int
    train: Split
    eval: Split
    test: Split
    chance: float            # accuracy of the best constant guess (majority class) where known
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        """Labels read from files are class ids of this task: a corrupt or foreign file fails
        here, naming the split, not at some training step."""
        if self.model_task == "lm":
            return
        for name in ("train", "eval", "test"):
            split = getattr(self, name)
            if isinstance(split, ListSplit):
                bad = next((e["label"] for e in split.examples
                            if not 0 <= e["label"] < self.num_classes), None)
                if bad is not None:
                    raise ValueError(f"data: the {self.name} {name} split has label {bad!r}; "
                                     f"expected class ids in [0, {self.num_classes})")


def shard_indices(step: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """Global example indices rank `rank` trains on at `step` (global batch `batch_size`)."""
    if batch_size % world:
        raise ValueError(f"batch_size: the global batch {batch_size} must be a multiple of the "
                         f"number of processes {world}")
    local = batch_size // world
    start = step * batch_size + rank * local
    return range(start, start + local)


def _pad(seqs: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)[:length]
        tokens[i, : len(s)] = torch.from_numpy(s)
        mask[i, : len(s)] = True
    return tokens, mask


def collate(examples: list[dict], model_task: str, seq_len: int) -> dict[str, torch.Tensor | None]:
    """Examples -> {"tokens", "mask", "labels"} padded to `seq_len` (fixed shapes: the same
    computation whatever the batch holds, which keeps sharded and resumed runs exact).
    mask is None when every row is full length."""
    if model_task == "match":
        firsts, mask1 = _pad([e["tokens"][0] for e in examples], seq_len)
        seconds, mask2 = _pad([e["tokens"][1] for e in examples], seq_len)
        tokens, mask = torch.stack([firsts, seconds], 1), torch.stack([mask1, mask2], 1)  # (B, 2, N)
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    elif model_task == "lm":
        tokens, mask = _pad([e["tokens"] for e in examples], seq_len)
        labels = torch.full((len(examples), seq_len), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            lab = np.asarray(e["labels"], dtype=np.int64)[:seq_len]
            labels[i, : len(lab)] = torch.from_numpy(lab)
    else:
        tokens, mask = _pad([e["tokens"] for e in examples], seq_len)
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return {"tokens": tokens, "mask": None if bool(mask.all()) else mask, "labels": labels}


def byte_tokens(text: bytes, limit: int) -> np.ndarray:
    """Byte-level tokens: byte b -> b + 1 (0 is padding), truncated to `limit` (vocab 257)."""
    return np.frombuffer(text[:limit], dtype=np.uint8).astype(np.int64) + 1


def majority_rate(labels: Sequence[int]) -> float:
    if len(labels) == 0:
        return 0.0
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return float(counts.max() / counts.sum())
