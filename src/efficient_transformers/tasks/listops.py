"""ListOps (Nangia & Bowman 2018) as specified by the Long Range Arena (Tay et al. 2020, sec. 3.1).

Expressions of MIN, MAX, MED (median) and SM (sum modulo 10) over the digits 0-9, nested at most
`max_depth` (10) deep with 2..`max_args` (10) arguments per operator, kept when their length (in
tokens) lies in [min_length, max_length] (LRA: 500-2000). The target is the value, 10 classes.

The generator follows the LRA release's recipe: a node is an operator with probability 0.25
(always a value at the maximum depth), else a uniformly drawn digit; each example is drawn from
its own seeded generator (see tasks/base.py), retrying until its length is in range.

Release files: basic_{train,val,test}.tsv with header `Source\tTarget`, Source like
`( ( [MAX 2 ) 9 ) ]`. LRA tokenisation: drop the parentheses, `]` becomes `X`, split on spaces.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import numpy as np

from ..attention.base import check_positive_int
from .base import ListSplit, MissingDataError, TaskData, generated_splits, majority_rate

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25  # probability that a node below the maximum depth is an operator
# LRA vocabulary: 0 = padding, then digits, operators and the closing bracket ("X" after tokenising)
VOCAB = ["<pad>"] + [str(d) for d in range(10)] + list(OPERATORS) + ["X"]
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
FILES = {"train": "basic_train.tsv", "eval": "basic_val.tsv", "test": "basic_test.tsv"}


def apply(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))  # the LRA definition: floor of the middle mean, as int
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"op: expected one of {OPERATORS}, got {op!r}")


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    """-> (tree, length): tree is an int or (op, [subtrees]); length counts its tokens."""
    if depth < max_depth and rng.random() < VALUE_P:
        n_args = rng.randint(2, max_args)
        children, length = [], 2  # the operator and the closing bracket
        for _ in range(n_args):
            child, child_len = generate_tree(rng, depth + 1, max_depth, max_args)
            children.append(child)
            length += child_len
        return (rng.choice(OPERATORS), children), length
    return rng.randrange(10), 1


def evaluate(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    return apply(op, [evaluate(c) for c in children])


def to_string(tree) -> str:
    """The release's bracketed form: `( ( ( [MAX 2 ) 9 ) ] )` nests each argument to the left."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    text = f"( {op} {to_string(children[0])} )"
    for child in children[1:]:
        text = f"( {text} {to_string(child)} )"
    return f"( {text} {END} )"


def tokenize(source: str) -> np.ndarray:
    """LRA tokenisation: parentheses dropped, `]` -> `X`, whitespace split, mapped to ids."""
    out = []
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        tok = "X" if tok == END else tok
        if tok not in TOKEN_ID:
            raise ValueError(f"source: unknown ListOps token {tok!r}; expected one of {VOCAB[1:]}")
        out.append(TOKEN_ID[tok])
    return np.asarray(out, dtype=np.int64)


def make_example(rng: np.random.Generator, min_length: int, max_length: int, max_depth: int = 10,
                 max_args: int = 10, max_tries: int = 100_000) -> dict:
    """One expression with length in range, drawn from a Python RNG seeded by `rng` (scalar draws
    are ~10x cheaper there than in numpy)."""
    rng = random.Random(int(rng.integers(2**62)))
    for _ in range(max_tries):
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if min_length <= length <= max_length:
            return {"tokens": tokenize(to_string(tree)), "label": evaluate(tree), "source": tree}
    raise ValueError(f"min_length/max_length: no expression of length in [{min_length}, "
                     f"{max_length}] in {max_tries} tries (max_depth={max_depth}, max_args={max_args})")


def read_tsv(path: Path, seq_len: int) -> list[dict]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or [c.strip() for c in rows[0][:2]] != ["Source", "Target"]:
        raise ValueError(f"data: {path} should start with the header 'Source\\tTarget'")
    examples = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not row[0]:
            continue
        try:
            if len(row) < 2:
                raise ValueError(f"expected 'Source<TAB>Target', got {len(row)} field")
            examples.append({"tokens": tokenize(row[0])[:seq_len], "label": int(row[1])})
        except ValueError as err:
            raise ValueError(f"data: {path}, line {line}: {err}") from None
    return examples


def load(data: str | None, seq_len: int, seed: int, min_length: int | None = None,
         max_length: int | None = None, max_depth: int = 10, max_args: int = 10,
         eval_examples: int = 2000, train_examples: int | None = None) -> TaskData:
    """Generated when `data` is None (lengths in [min_length, max_length], default seq_len/4 ..
    seq_len), else read from the release TSVs in the folder `data`."""
    common = dict(name="listops", model_task="classify", vocab_size=len(VOCAB), num_classes=10,
                  seq_len=seq_len)
    if data is not None:
        folder = Path(data)
        missing = [f for f in FILES.values() if not (folder / f).is_file()]
        if missing:
            raise MissingDataError(
                f"data: {folder} lacks {missing}; put the LRA release's listops files "
                f"(lra_release/listops-1000/basic_train.tsv, basic_val.tsv, basic_test.tsv) there")
        splits = {k: read_tsv(folder / f, seq_len) for k, f in FILES.items()}
        return TaskData(**common, train=ListSplit(splits["train"], seed, shuffle=True),
                        eval=ListSplit(splits["eval"]), test=ListSplit(splits["test"]),
                        chance=majority_rate([e["label"] for e in splits["test"]]),
                        info={"source": str(folder)})
    check_positive_int("max_depth", max_depth)
    check_positive_int("max_args", max_args, minimum=2)   # an operator takes 2 to max_args
    max_length = min(max_length or seq_len, seq_len)
    min_length = min_length if min_length is not None else max(1, max_length // 4)
    if not 1 <= min_length <= max_length:
        raise ValueError(f"min_length: expected 1 <= min_length <= max_length={max_length}, got {min_length}")

    def make(rng):
        return make_example(rng, min_length, max_length, max_depth, max_args)

    splits = generated_splits(make, seed, eval_examples, train_examples)
    test_labels = [splits["test"].get(i)["label"] for i in range(min(eval_examples, 200))]
    return TaskData(**common, train=splits["train"], eval=splits["eval"], test=splits["test"],
                    chance=majority_rate(test_labels),
                    info={"generated": True, "min_length": min_length, "max_length": max_length,
                          "max_depth": max_depth, "max_args": max_args})
