"""Data order and sharding: a pure function of (seed, step); shards tile the global batch."""

import pytest
import torch

from efficient_transformers.tasks import collate, load_task, shard_indices
from efficient_transformers.tasks.base import ListSplit, byte_tokens


def test_shards_tile_the_global_batch():
    assert list(shard_indices(3, 8)) == list(range(24, 32))
    parts = [list(shard_indices(3, 8, rank, 4)) for rank in range(4)]
    assert sum(parts, []) == list(range(24, 32))
    with pytest.raises(ValueError, match="batch_size"):
        shard_indices(0, 6, 0, 4)


def test_file_order_is_a_seeded_permutation_per_epoch():
    split = ListSplit([{"tokens": [i], "label": 0} for i in range(10)], seed=5, shuffle=True)
    epoch0 = [split.get(i)["tokens"][0] for i in range(10)]
    epoch1 = [split.get(i)["tokens"][0] for i in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    again = ListSplit(split.examples, seed=5, shuffle=True)
    assert [again.get(i)["tokens"][0] for i in (13, 2, 19)] == [epoch1[3], epoch0[2], epoch1[9]]


def test_collate_pads_and_masks():
    ex = [{"tokens": byte_tokens(b"ab", 10), "label": 1}, {"tokens": byte_tokens(b"abcdef", 4), "label": 0}]
    batch = collate(ex, "classify", 5)
    assert batch["tokens"].tolist() == [[98, 99, 0, 0, 0], [98, 99, 100, 101, 0]]
    assert batch["mask"].tolist() == [[True, True, False, False, False], [True] * 4 + [False]]
    full = collate([{"tokens": [1, 2], "label": 0}], "classify", 2)
    assert full["mask"] is None
    pair = collate([{"tokens": [[1], [2, 3]], "label": 1}], "match", 3)
    assert pair["tokens"].shape == (1, 2, 3) and pair["mask"][0, 1].tolist() == [True, True, False]
    assert pair["labels"].dtype == torch.long


@pytest.mark.parametrize("task,options,message", [
    ("mqar", {"pairs": 2.5}, "pairs: expected an integer"),
    ("mqar", {"eval_examples": 0}, "eval_examples: expected an integer >= 1"),
    ("listops", {"max_args": 1}, "max_args: expected an integer >= 2"),
    ("listops", {"train_examples": -1}, "train_examples: expected an integer >= 1"),
    ("pathfinder", {"curvature": float("nan")}, "curvature: expected a finite number"),
    ("pathfinder", {"distractors": -1}, "distractors: expected an integer >= 0"),
])
def test_generated_task_options_are_checked_when_loaded(task, options, message):
    """(these failed inside numpy or random without naming the option, or made empty splits)"""
    with pytest.raises(ValueError, match=message):
        load_task(task, None, seq_len=1024 if task == "pathfinder" else 64, seed=0, **options)
