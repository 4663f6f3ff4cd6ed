"""LRA Text (Tay et al. 2020, sec. 3.2): IMDb sentiment (Maas et al. 2011) at byte level.

Reads the `aclImdb/{train,test}/{pos,neg}/*.txt` folders of the IMDb release (pass either the
folder holding `aclImdb/` or `aclImdb/` itself). Each review is its raw bytes (byte b -> token
b + 1, 0 is padding, vocabulary 257) truncated to seq_len (LRA base config: 1000; the paper
quotes 4K). Labels: neg 0, pos 1. As in LRA, the test set is the evaluation set.
"""

from __future__ import annotations

from pathlib import Path

from .base import ListSplit, MissingDataError, TaskData, byte_tokens, majority_rate

LABELS = {"neg": 0, "pos": 1}


def find_root(data: str) -> Path:
    folder = Path(data)
    for root in (folder, folder / "aclImdb"):
        if all((root / s / c).is_dir() for s in ("train", "test") for c in LABELS):
            return root
    raise MissingDataError(
        f"data: {folder} has no aclImdb/{{train,test}}/{{pos,neg}}/ folders; extract the IMDb "
        f"release aclImdb_v1.tar.gz (Maas et al. 2011) so that {folder}/aclImdb/train/pos/*.txt exist")


def read_split(root: Path, split: str, seq_len: int) -> list[dict]:
    examples = []
    for name, label in LABELS.items():
        for path in sorted((root / split / name).glob("*.txt")):
            examples.append({"tokens": byte_tokens(path.read_bytes(), seq_len), "label": label})
    return examples


def load(data: str | None, seq_len: int, seed: int) -> TaskData:
    if data is None:
        raise MissingDataError(
            "data: the text task reads the IMDb reviews; download aclImdb_v1.tar.gz (Maas et al. "
            "2011), extract it and pass --data FOLDER where FOLDER/aclImdb/{train,test}/{pos,neg}/*.txt")
    root = find_root(data)
    train, test = read_split(root, "train", seq_len), read_split(root, "test", seq_len)
    return TaskData(name="text", model_task="classify", vocab_size=257, num_classes=2,
                    seq_len=seq_len, train=ListSplit(train, seed, shuffle=True),
                    eval=ListSplit(test, seed=0, shuffle=True), test=ListSplit(test, seed=0, shuffle=True),
                    chance=majority_rate([e["label"] for e in test]), info={"source": str(root)})
