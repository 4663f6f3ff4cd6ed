"""ListOps: the generator follows the LRA specification; the reader reads the release TSVs."""

import csv
import statistics

import numpy as np
import pytest

from efficient_transformers.tasks import MissingDataError, collate, load_task
from efficient_transformers.tasks import listops
from efficient_transformers.tasks.base import example_rng

OPS = {"[MIN": min, "[MAX": max, "[MED": lambda v: int(statistics.median(v)),
       "[SM": lambda v: sum(v) % 10}


def value_and_shape(ids):
    """Evaluate a tokenised expression (prefix, X closes) independently of the generator:
    -> (value, maximum nesting depth, maximum argument count)."""
    words = [listops.VOCAB[i] for i in ids]
    stack, depth, args, result = [], 0, 0, None
    for w in words:
        if w in OPS:
            stack.append((w, []))
            depth = max(depth, len(stack))
        elif w == "X":
            op, values = stack.pop()
            args = max(args, len(values))
            v = OPS[op](values)
            if stack:
                stack[-1][1].append(v)
            else:
                result = v
        else:
            if stack:
                stack[-1][1].append(int(w))
            else:
                result = int(w)
    assert not stack
    return result, depth, args


def test_generated_values_lengths_and_shape():
    task = load_task("listops", seq_len=200, seed=3, min_length=20, max_length=200, max_depth=6,
                     max_args=7, eval_examples=50)
    assert task.vocab_size == len(listops.VOCAB) and task.num_classes == 10
    labels = []
    for i in range(60):
        ex = task.train.get(i)
        value, depth, args = value_and_shape(ex["tokens"])
        assert value == ex["label"]
        assert 20 <= len(ex["tokens"]) <= 200
        assert depth <= 6 - 1 and 2 <= args <= 7  # operators only above the maximum depth
        labels.append(ex["label"])
    assert len(set(labels)) >= 5  # all kinds of answers, not one constant


def test_lra_defaults_generate_long_expressions():
    ex = listops.make_example(example_rng(0, "train", 0), 500, 2000)
    assert 500 <= len(ex["tokens"]) <= 2000
    assert value_and_shape(ex["tokens"])[0] == ex["label"]
    assert value_and_shape(ex["tokens"])[1] <= 9


def test_operators_definition():
    assert listops.apply("[MED", [1, 2]) == 1 and listops.apply("[MED", [3, 1, 2]) == 2
    assert listops.apply("[SM", [9, 8, 7]) == 4
    assert listops.apply("[MIN", [4, 2, 9]) == 2 and listops.apply("[MAX", [4, 2, 9]) == 9


def test_examples_depend_only_on_seed_and_index():
    small = dict(seq_len=100, min_length=10, max_depth=5, eval_examples=20)
    a, b, c = (load_task("listops", seed=s, **small) for s in (1, 1, 2))
    assert np.array_equal(a.train.get(7)["tokens"], b.train.get(7)["tokens"])
    assert [len(a.train.get(i)["tokens"]) for i in range(8)] != [len(c.train.get(i)["tokens"]) for i in range(8)]
    assert not np.array_equal(a.train.get(0)["tokens"], a.eval.get(0)["tokens"])


def test_tokenisation_follows_lra():
    # parentheses dropped, "]" becomes X
    ids = listops.tokenize("( ( ( [MAX 2 ) 9 ) ] )")
    assert [listops.VOCAB[i] for i in ids] == ["[MAX", "2", "9", "X"]
    tree = ("[SM", [3, ("[MIN", [4, 5]), 8])
    text = listops.to_string(tree)
    assert text.count("(") == text.count(")")
    assert [listops.VOCAB[i] for i in listops.tokenize(text)] == ["[SM", "3", "[MIN", "4", "5", "X", "8", "X"]
    with pytest.raises(ValueError, match="unknown ListOps token"):
        listops.tokenize("( [FOO 1 ] )")


def write_release(folder, rows_per_split=5):
    rng = example_rng(9, "train", 0)
    expected = {}
    for split in ("train", "val", "test"):
        rows = []
        for _ in range(rows_per_split):
            tree, _ = listops.generate_tree(__import__("random").Random(int(rng.integers(1 << 30))), 1, 4, 4)
            rows.append((listops.to_string(tree), listops.evaluate(tree)))
        with open(folder / f"basic_{split}.tsv", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["Source", "Target"])
            w.writerows(rows)
        expected[split] = rows
    return expected


def test_reader(tmp_path):
    expected = write_release(tmp_path)
    task = load_task("listops", data=str(tmp_path), seq_len=300, seed=0)
    assert len(task.train) == 5 and len(task.eval) == 5 and len(task.test) == 5
    got = sorted((list(task.train.get(i)["tokens"]), task.train.get(i)["label"]) for i in range(5))
    want = sorted((list(listops.tokenize(s)), t) for s, t in expected["train"])
    assert got == want
    for i in range(5):  # eval and test keep file order
        src, target = expected["test"][i]
        assert task.test.get(i)["label"] == target
        assert value_and_shape(task.test.get(i)["tokens"])[0] == target
    batch = collate([task.train.get(i) for i in range(4)], "classify", 300)
    assert batch["tokens"].shape == (4, 300) and batch["labels"].shape == (4,)


def test_reader_errors(tmp_path):
    with pytest.raises(MissingDataError, match="basic_train.tsv"):
        load_task("listops", data=str(tmp_path), seq_len=100)
    for split in ("train", "val", "test"):
        (tmp_path / f"basic_{split}.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="Source"):
        load_task("listops", data=str(tmp_path), seq_len=100)
    # a malformed row names its file and line; a label outside the 10 classes names its split
    write_release(tmp_path)
    good = (tmp_path / "basic_train.tsv").read_text()
    for extra, message in (("( [MAX 2 3 ] )\n", r"basic_train.tsv, line 7: expected 'Source<TAB>Target'"),
                           ("( [MAX 2 3 ] )\tx\n", r"basic_train.tsv, line 7: invalid literal"),
                           ("( [FOO 2 3 ] )\t1\n", r"basic_train.tsv, line 7: source: unknown ListOps token"),
                           ("( [MAX 2 3 ] )\t11\n", r"the listops train split has label 11; expected class ids in \[0, 10\)")):
        (tmp_path / "basic_train.tsv").write_text(good + extra)
        with pytest.raises(ValueError, match=message):
            load_task("listops", data=str(tmp_path), seq_len=300)
