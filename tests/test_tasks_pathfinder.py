"""The Pathfinder-style generator: geometry of the label, image format, sizes 32 and larger."""

import numpy as np
import pytest

from efficient_transformers.tasks import load_task
from efficient_transformers.tasks.base import example_rng
from efficient_transformers.tasks.pathfinder import make_scene, reflect, render


@pytest.mark.parametrize("size", [32, 64])
def test_scene_label_means_connected(size):
    labels = []
    for i in range(40):
        scene = make_scene(example_rng(0, "train", i), size=size)
        a, b, (p, q) = scene["a"], scene["b"], scene["dots"]
        ends_a = [tuple(a[0]), tuple(a[-1])]
        if scene["label"]:
            assert {tuple(p), tuple(q)} == set(ends_a)      # both dots end the same path
        else:
            assert tuple(p) in ends_a and tuple(q) in [tuple(b[0]), tuple(b[-1])]
        for path in (a, b, *scene["distractors"]):
            assert path.min() >= 0 and path.max() <= size - 1
            steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
            assert np.all(steps <= 1.0 + 1e-9)              # a continuous curve of unit steps
        image = render(scene)
        assert image.shape == (size, size) and set(np.unique(image)) <= {0, 160, 255}
        for dot in (p, q):
            r, c = np.rint(dot).astype(int)
            assert image[r, c] == 255
        labels.append(scene["label"])
    assert 10 <= sum(labels) <= 30                          # both classes, roughly balanced


def test_reflect_stays_inside():
    x = np.linspace(-100, 100, 1001)
    y = reflect(x, 32)
    assert y.min() >= 0 and y.max() <= 31
    assert np.allclose(reflect(np.array([5.0, 31.0, 33.0, -2.0]), 32), [5, 31, 29, 2])


def test_generated_task():
    task = load_task("pathfinder", seq_len=1024, seed=0, eval_examples=8)
    ex = task.train.get(3)
    assert task.model_task == "classify" and task.num_classes == 2 and task.vocab_size == 256
    assert ex["tokens"].shape == (1024,) and ex["label"] in (0, 1)
    assert np.array_equal(ex["tokens"], load_task("pathfinder", seq_len=1024, seed=0).train.get(3)["tokens"])
    big = load_task("pathfinder", seq_len=64 * 64, seed=0)
    assert big.train.get(0)["tokens"].shape == (4096,) and big.info["shape"] == [64, 64]
    with pytest.raises(ValueError, match="size"):
        load_task("pathfinder", seq_len=500)
