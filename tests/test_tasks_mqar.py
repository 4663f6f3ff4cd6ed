"""MQAR (Zoology): layout, labels only at the answers, configuration checks."""

import numpy as np
import pytest
import torch

import efficient_transformers as et
from efficient_transformers.tasks import collate, load_task
from efficient_transformers.train.trainer import count_correct


def test_layout_and_labels():
    task = load_task("mqar", seq_len=64, seed=0, vocab_size=32, pairs=6)
    assert task.model_task == "lm" and task.vocab_size == 32
    for i in range(20):
        ex = task.train.get(i)
        tokens, labels = ex["tokens"], ex["labels"]
        assert tokens.shape == labels.shape == (64,)
        keys, values = tokens[0:12:2], tokens[1:12:2]
        assert len(set(keys.tolist())) == 6 and np.all((keys >= 1) & (keys < 16))
        assert np.all(values >= 16) and np.all(values < 32)
        answer = dict(zip(keys.tolist(), values.tolist()))
        scored = np.flatnonzero(labels != -100)
        assert len(scored) == 6 and np.all(scored >= 13)
        for p in scored:  # the token before each answer is a key, the label is its value
            assert tokens[p - 1] in answer and labels[p] == answer[tokens[p - 1]] == tokens[p]
        assert sorted(tokens[scored - 1].tolist()) == sorted(keys.tolist())  # each key asked once


def test_accuracy_counts_only_answer_positions():
    task = load_task("mqar", seq_len=32, seed=0, vocab_size=16, pairs=3)
    batch = collate([task.train.get(i) for i in range(4)], "lm", 32)
    labels = batch["labels"]
    perfect = torch.full((4, 32, 16), -1e9)
    # logits at i predict labels[i + 1]
    for b in range(4):
        for i in range(31):
            if labels[b, i + 1] != -100:
                perfect[b, i, labels[b, i + 1]] = 0
    assert count_correct(perfect, labels, "lm") == (12, 12)
    model = et.build_model("transformer", task="lm", vocab_size=16, dim=16, depth=1, heads=2, max_len=32)
    out = model(batch["tokens"], labels=batch["labels"])
    assert torch.isfinite(out.loss)


def test_bad_configurations():
    with pytest.raises(ValueError, match="pairs"):
        load_task("mqar", seq_len=64, vocab_size=16, pairs=8)
    with pytest.raises(ValueError, match="length"):
        load_task("mqar", seq_len=10, vocab_size=64, pairs=4)
    with pytest.raises(ValueError, match="vocab_size"):
        load_task("mqar", seq_len=64, vocab_size=7, pairs=2)
