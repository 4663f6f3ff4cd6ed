"""Tasks: the Long Range Arena (Tay et al. 2020) and multi-query associative recall.

`load_task(name, data=None, seq_len=..., seed=0, **options) -> TaskData` (see tasks/base.py).
Generated tasks (listops, pathfinder, mqar) need no files; the readers take the folder of the
official files and never download anything.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import MissingDataError, TaskData, collate, shard_indices

# name -> module in this package providing load(data, seq_len, seed, **options)
TASKS = {
    "listops": "listops", "text": "text", "retrieval": "retrieval", "image": "image",
    "pathfinder": "pathfinder", "mqar": "mqar",
}
GENERATED = ("listops", "pathfinder", "mqar")


def list_tasks() -> list[str]:
    return list(TASKS)


def load_task(name: str, data: str | None = None, seq_len: int = 512, seed: int = 0,
              **options: Any) -> TaskData:
    if name not in TASKS:
        raise ValueError(f"task: expected one of {list(TASKS)}, got {name!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: expected a positive integer, got {seq_len!r}")
    module = importlib.import_module(f"{__name__}.{TASKS[name]}")
    return module.load(data, seq_len, seed, **options)


__all__ = ["GENERATED", "MissingDataError", "TASKS", "TaskData", "collate", "list_tasks",
           "load_task", "shard_indices"]
