"""LRA Retrieval (Tay et al. 2020, sec. 3.3): ACL Anthology Network citation pairs, byte level.

Reads `new_aan_pairs.{train,eval,test}.tsv` of the LRA release (`lra_release/tsv_data/`): one pair a
line, tab-separated `label id1 id2 text1 text2` (a header line, if any, is skipped). Each text is
its UTF-8 bytes (byte b -> token b + 1, 0 is padding, vocabulary 257) truncated to seq_len (LRA:
4000 per document). A dual encoder (build_model task "match") reads tokens (B, 2, N).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from .base import ListSplit, MissingDataError, TaskData, byte_tokens, majority_rate

FILES = {"train": "new_aan_pairs.train.tsv", "eval": "new_aan_pairs.eval.tsv",
         "test": "new_aan_pairs.test.tsv"}


def read_tsv(path: Path, seq_len: int) -> list[dict]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 5:
                continue
            try:
                label = int(float(row[0]))
            except ValueError:  # the header line
                continue
            examples.append({"tokens": [byte_tokens(row[3].encode(), seq_len),
                                        byte_tokens(row[4].encode(), seq_len)],
                             "label": label})
    return examples


def load(data: str | None, seq_len: int, seed: int) -> TaskData:
    hint = ("put the LRA release's lra_release/tsv_data/new_aan_pairs.train.tsv, "
            "new_aan_pairs.eval.tsv and new_aan_pairs.test.tsv in one folder and pass it as --data")
    if data is None:
        raise MissingDataError(f"data: the retrieval task reads the ACL Anthology pairs; {hint}")
    folder = Path(data)
    missing = [f for f in FILES.values() if not (folder / f).is_file()]
    if missing:
        raise MissingDataError(f"data: {folder} lacks {missing}; {hint}")
    splits = {k: read_tsv(folder / f, seq_len) for k, f in FILES.items()}
    return TaskData(name="retrieval", model_task="match", vocab_size=257, num_classes=2,
                    seq_len=seq_len, train=ListSplit(splits["train"], seed, shuffle=True),
                    eval=ListSplit(splits["eval"], seed=0, shuffle=True),
                    test=ListSplit(splits["test"], seed=0, shuffle=True),
                    chance=majority_rate([e["label"] for e in splits["test"]]),
                    info={"source": str(folder)})
