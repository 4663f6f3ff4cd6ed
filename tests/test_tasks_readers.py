"""Readers of the official files (text, retrieval, image, pathfinder) on small files written here
in the release layouts, and the messages when files are missing."""

import struct
import zlib

import numpy as np
import pytest

from efficient_transformers.tasks import MissingDataError, collate, load_task


def test_text_imdb(tmp_path):
    root = tmp_path / "aclImdb"
    reviews = {("train", "pos"): [b"great film", b"loved it"], ("train", "neg"): [b"bad \xc3\xa9"],
               ("test", "pos"): [b"fine"], ("test", "neg"): [b"awful", b"dull"]}
    for (split, kind), texts in reviews.items():
        (root / split / kind).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / split / kind / f"{i}_7.txt").write_bytes(text)
    task = load_task("text", data=str(tmp_path), seq_len=6, seed=0)
    assert task.model_task == "classify" and task.vocab_size == 257 and task.num_classes == 2
    assert len(task.train) == 3 and len(task.test) == 3
    got = sorted((bytes((task.train.get(i)["tokens"] - 1).astype(np.uint8)), task.train.get(i)["label"])
                 for i in range(3))
    assert got == [(b"bad \xc3\xa9", 0), (b"great ", 1), (b"loved ", 1)]  # bytes, truncated to 6
    assert load_task("text", data=str(root), seq_len=6).test.size == 3   # aclImdb/ itself works too
    with pytest.raises(MissingDataError, match="aclImdb"):
        load_task("text", seq_len=8)
    with pytest.raises(MissingDataError, match="aclImdb"):
        load_task("text", data=str(tmp_path / "nowhere"), seq_len=8)


def test_retrieval_aan(tmp_path):
    rows = {"train": [("1", "a1", "b1", "first text", "second"), ("0", "a2", "b2", "x", "yz")],
            "eval": [("1.0", "a3", "b3", "p", "q")], "test": [("0", "a4", "b4", "tt", "uu")]}
    for split, lines in rows.items():
        text = "".join("\t".join(r) + "\n" for r in lines)
        (tmp_path / f"new_aan_pairs.{split}.tsv").write_text(text)
    task = load_task("retrieval", data=str(tmp_path), seq_len=5, seed=0)
    assert task.model_task == "match" and len(task.train) == 2 and task.eval.get(0)["label"] == 1
    ex = sorted((task.train.get(i) for i in range(2)), key=lambda e: e["label"])[1]
    assert bytes((ex["tokens"][0] - 1).astype(np.uint8)) == b"first"
    assert bytes((ex["tokens"][1] - 1).astype(np.uint8)) == b"secon"
    batch = collate([task.train.get(0), task.train.get(1)], "match", 5)
    assert batch["tokens"].shape == (2, 2, 5) and batch["mask"].shape == (2, 2, 5)
    with pytest.raises(MissingDataError, match="new_aan_pairs.train.tsv"):
        load_task("retrieval", seq_len=8)
    (tmp_path / "new_aan_pairs.eval.tsv").write_text("3\ta\tb\tc\td\n")   # not a class id
    with pytest.raises(ValueError, match=r"the retrieval eval split has label 3"):
        load_task("retrieval", data=str(tmp_path), seq_len=8)
    (tmp_path / "new_aan_pairs.test.tsv").unlink()
    with pytest.raises(MissingDataError, match="new_aan_pairs.test.tsv"):
        load_task("retrieval", data=str(tmp_path), seq_len=8)


def cifar_record(label, r, g, b):
    planes = [np.full(1024, v, dtype=np.uint8) for v in (r, g, b)]
    planes[0][5] = 255  # one bright red pixel at index 5
    return bytes([label]) + b"".join(p.tobytes() for p in planes)


def test_image_cifar_binary(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    for i in range(1, 6):
        (root / f"data_batch_{i}.bin").write_bytes(cifar_record(i, 10, 20, 30) + cifar_record(9, 0, 0, 0))
    (root / "test_batch.bin").write_bytes(cifar_record(3, 100, 100, 100))
    task = load_task("image", data=str(tmp_path), seq_len=1024, seed=0)
    assert len(task.train) == 10 and len(task.test) == 1 and task.num_classes == 10
    ex = task.test.get(0)
    assert ex["label"] == 3 and ex["tokens"].shape == (1024,)
    # grayscale = int(0.2989 R + 0.5870 G + 0.1140 B): 99.99 -> 99; red pixel 5: 0.2989*255+69.99
    assert ex["tokens"][0] == 99 and ex["tokens"][5] == int(0.2989 * 255 + 0.5870 * 100 + 0.1140 * 100)
    labels = sorted(task.train.get(i)["label"] for i in range(10))
    assert labels == [1, 2, 3, 4, 5, 9, 9, 9, 9, 9]
    (root / "test_batch.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a CIFAR-10 binary batch"):
        load_task("image", data=str(tmp_path), seq_len=1024)
    with pytest.raises(MissingDataError, match="cifar-10-batches-bin"):
        load_task("image", seq_len=1024)


def png_gray(pixels: np.ndarray) -> bytes:
    """A minimal 8-bit grayscale PNG writer (so the test does not rely on the reader's library)."""
    h, w = pixels.shape
    raw = b"".join(b"\x00" + pixels[r].astype(np.uint8).tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("as_npy", [False, True])
def test_pathfinder_release(tmp_path, as_npy):
    (tmp_path / "imgs" / "0").mkdir(parents=True)
    rows = []
    for i in range(10):
        pixels = np.full((32, 32), i, dtype=np.uint8)
        (tmp_path / "imgs" / "0" / f"sample_{i}.png").write_bytes(png_gray(pixels))
        rows.append(["imgs/0", f"sample_{i}.png", "0", str(i % 2), "1.0", "2"])
    (tmp_path / "metadata").mkdir()
    meta = tmp_path / "metadata" / "0.npy"
    if as_npy:
        np.save(meta, np.array(rows))
    else:  # the release's metadata "npy" files are text
        meta.write_text("".join(" ".join(r) + "\n" for r in rows))
    task = load_task("pathfinder", data=str(tmp_path), seq_len=1024, seed=0)
    assert len(task.train) == 8 and len(task.eval) == 1 and len(task.test) == 1
    test = task.test.get(0)
    assert test["tokens"].shape == (1024,) and np.all(test["tokens"] == 9) and test["label"] == 1
    seen = sorted((int(task.train.get(i)["tokens"][0]), task.train.get(i)["label"]) for i in range(8))
    assert seen == [(i, i % 2) for i in range(8)]
    with pytest.raises(MissingDataError, match="imgs/ and metadata/"):
        load_task("pathfinder", data=str(tmp_path / "imgs"), seq_len=1024)
    if not as_npy:   # a label that is not an integer names its file and line; one of 2: its split
        for label, message in (("x", r"0.npy, line 3: label 'x' is not an integer"),
                               ("2", r"the pathfinder \w+ split has label 2")):
            rows[2][3] = label
            meta.write_text("".join(" ".join(r) + "\n" for r in rows))
            with pytest.raises(ValueError, match=message):
                load_task("pathfinder", data=str(tmp_path), seq_len=1024)
