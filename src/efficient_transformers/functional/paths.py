"""`cuda_paths`: the code paths a layer takes on CUDA, forced on the CPU for a block."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def cuda_paths():
    """Inside the block every layer takes the paths that the device picks on CUDA (bf16 kernels
    kept in bf16, axial heads folded into the batch, grid lines and global keys as FlashAttention
    calls, k-means sums by index, the few global rows by explicit matmuls, LSH hashing in CUDA's
    larger blocks), whatever device it runs on; the previous switches come back afterwards.
    For tests and the traffic estimate (`bench/traffic.py`) on the CPU. FlexAttention, which
    has no backward on the CPU, is not switched."""
    from . import axial, flash, global_local, grid_flash, kernels, kmeans, lsh

    switches = [(kernels, "KEEP_BF16"), (axial, "FOLD_HEADS"), (grid_flash, "GRID_FLASH"),
                (kmeans, "EMA_BY_INDEX"), (flash, "FLASH_KEYS"), (global_local, "EXPLICIT_ROWS"),
                (lsh, "BIG_HASH_BLOCKS")]
    saved = [getattr(module, name) for module, name in switches]
    for module, name in switches:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(switches, saved):
            setattr(module, name, value)
