"""LRA Image (Tay et al. 2020, sec. 3.4): CIFAR-10 as grayscale sequences of 1024 intensities.

Reads the CIFAR-10 *binary* release (`cifar-10-batches-bin/`: `data_batch_1.bin` ... `_5.bin`,
`test_batch.bin`; each record is 1 label byte then 3072 pixel bytes, the red, green and blue 32x32
planes in raster order). No pickle. Grayscale as tf.image.rgb_to_grayscale, which LRA uses:
0.2989 R + 0.5870 G + 0.1140 B, truncated to an integer 0..255 (the token; vocabulary 256).
Pass the folder holding the .bin files or the one holding `cifar-10-batches-bin/`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import ListSplit, MissingDataError, TaskData, majority_rate

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
RECORD = 1 + 3 * 1024
GRAY = np.array([0.2989, 0.5870, 0.1140])


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> pixels (n, 1024) int64 grayscale, labels (n,)"""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % RECORD:
        raise ValueError(f"data: {path} is not a CIFAR-10 binary batch "
                         f"(size {raw.size} is not a multiple of {RECORD})")
    raw = raw.reshape(-1, RECORD)
    rgb = raw[:, 1:].reshape(-1, 3, 1024).astype(np.float64)           # (n, 3, 1024)
    gray = np.einsum("c,ncp->np", GRAY, rgb).astype(np.int64).clip(0, 255)
    return gray, raw[:, 0].astype(np.int64)


def examples(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        pixels, labels = read_batch(path)
        out.extend({"tokens": p, "label": int(y)} for p, y in zip(pixels, labels))
    return out


def load(data: str | None, seq_len: int, seed: int) -> TaskData:
    hint = ("extract the CIFAR-10 binary version (cifar-10-binary.tar.gz) and pass --data FOLDER "
            "where FOLDER/cifar-10-batches-bin/data_batch_1.bin ... test_batch.bin")
    if data is None:
        raise MissingDataError(f"data: the image task reads CIFAR-10; {hint}")
    folder = Path(data)
    root = next((r for r in (folder, folder / "cifar-10-batches-bin")
                 if all((r / f).is_file() for f in TRAIN_FILES + [TEST_FILE])), None)
    if root is None:
        raise MissingDataError(f"data: {folder} lacks the CIFAR-10 binary batches; {hint}")
    if seq_len < 1024:
        raise ValueError(f"seq_len: the image task needs 1024 (32x32 pixels), got {seq_len}")
    train, test = examples([root / f for f in TRAIN_FILES]), examples([root / TEST_FILE])
    return TaskData(name="image", model_task="classify", vocab_size=256, num_classes=10,
                    seq_len=seq_len, train=ListSplit(train, seed, shuffle=True),
                    eval=ListSplit(test, seed=0, shuffle=True), test=ListSplit(test, seed=0, shuffle=True),
                    chance=majority_rate([e["label"] for e in test]),
                    info={"source": str(root), "shape": [32, 32]})
