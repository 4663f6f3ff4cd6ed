"""Data order and sharding: a pure function of (seed, step); shards tile the global batch."""

import pytest
import torch

from efficient_transformers.tasks import collate, shard_indices
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
