"""`cuda_paths`: the code paths a layer takes on CUDA, forced on the CPU for a block."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def cuda_paths():
    """Inside the block every layer takes the paths that the device picks on CUDA (bf16 kernels
    kept in bf16, axial heads folded into the batch, grid lines as FlashAttention calls, k-means
    sums by index), whatever device it runs on; the previous
    switches come back afterwards. For tests and the traffic estimate (`bench/traffic.py`) on the
    CPU. FlexAttention, which has no backward on the CPU, is not switched."""
    from . import axial, grid_flash, kernels, kmeans

    saved = kernels.KEEP_BF16, axial.FOLD_HEADS, grid_flash.GRID_FLASH, kmeans.EMA_BY_INDEX
    kernels.KEEP_BF16, axial.FOLD_HEADS, grid_flash.GRID_FLASH, kmeans.EMA_BY_INDEX = \
        True, True, True, True
    try:
        yield
    finally:
        kernels.KEEP_BF16, axial.FOLD_HEADS, grid_flash.GRID_FLASH, kmeans.EMA_BY_INDEX = saved
