"""Multi-query associative recall (MQAR), Zoology (Arora et al. 2023, sec. 3 / appendix E).

A sequence of `length` tokens starts with `pairs` key-value pairs `k1 v1 k2 v2 ...` (keys drawn
without replacement from the first half of the vocabulary, values from the second half); the rest
holds every key once more, in a random order, at random even offsets, each followed by its value;
other positions are 0 (padding-like filler, still attended to). A language model reads the whole
sequence causally and is scored only where it must recall: the value after each queried key.

Labels are -100 everywhere except at those value positions (LanguageModel shifts internally:
the logits at the query key predict labels[i + 1], the value). Accuracy counts only those.
"""

from __future__ import annotations

import numpy as np

from ..attention.base import check_positive_int
from .base import IGNORE_INDEX, TaskData, generated_splits


def check_config(vocab_size: int, pairs: int, length: int) -> None:
    check_positive_int("vocab_size", vocab_size)
    check_positive_int("pairs", pairs)
    if vocab_size < 4 or vocab_size % 2:
        raise ValueError(f"vocab_size: expected an even number >= 4, got {vocab_size}")
    if not 1 <= pairs < vocab_size // 2:
        raise ValueError(f"pairs: expected 1 <= pairs < vocab_size/2 = {vocab_size // 2} "
                         f"(keys are distinct, token 0 is filler), got {pairs}")
    if length < 4 * pairs:
        raise ValueError(f"length: expected >= 4 * pairs = {4 * pairs} (context plus one query "
                         f"slot per key), got {length}")


def make_example(rng: np.random.Generator, vocab_size: int, pairs: int, length: int) -> dict:
    """-> {"tokens": (length,), "labels": (length,)}"""
    half = vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=pairs, replace=False)
    values = rng.integers(half, vocab_size, size=pairs)
    tokens = np.zeros(length, dtype=np.int64)
    labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
    tokens[0: 2 * pairs: 2], tokens[1: 2 * pairs: 2] = keys, values
    slots = (length - 2 * pairs) // 2                      # query slots: (key, value) position pairs
    chosen = np.sort(rng.choice(slots, size=pairs, replace=False))
    order = rng.permutation(pairs)
    positions = 2 * pairs + 2 * chosen                     # where each queried key goes
    tokens[positions], tokens[positions + 1] = keys[order], values[order]
    labels[positions + 1] = values[order]
    return {"tokens": tokens, "labels": labels}


def load(data: str | None, seq_len: int, seed: int, vocab_size: int = 8192, pairs: int = 16,
         eval_examples: int = 1000,
         train_examples: int | None = None) -> TaskData:
    if data is not None:
        raise ValueError("data: mqar is generated; it reads no files (drop --data)")
    check_config(vocab_size, pairs, seq_len)

    def make(rng):
        return make_example(rng, vocab_size, pairs, seq_len)

    splits = generated_splits(make, seed, eval_examples, train_examples)
    # Without reading the context the best guess is any value: 1 / (vocab_size / 2); a model that
    # has learnt "answer with some value from the context" but not which one gets 1 / pairs.
    return TaskData(name="mqar", model_task="lm", vocab_size=vocab_size, num_classes=vocab_size,
                    seq_len=seq_len, train=splits["train"], eval=splits["eval"], test=splits["test"],
                    chance=1.0 / pairs,
                    info={"generated": True, "vocab_size": vocab_size, "pairs": pairs})
