"""The trainer: schedule, checkpoint format (no pickle), exact resume (in process and after
SIGKILL), metrics, and the command line."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import STATE_CHANGES_OFTEN

import efficient_transformers as et
from efficient_transformers.cli import main
from efficient_transformers.io import load_tensors
from efficient_transformers.registry import attention_class
from efficient_transformers.train import TrainConfig, lr_at, read_metrics, train
from efficient_transformers.train import checkpoint as ckpt

TINY = dict(task="listops", model="transformer", steps=6, batch_size=4, seq_len=32, lr=3e-3,
            warmup=2, eval_every=3, save_every=2, log_every=1, eval_examples=8,
            model_kwargs=dict(dim=16, depth=1, heads=2, mlp_dim=32),
            task_options=dict(min_length=5, max_length=32, max_depth=4, max_args=4))


def tiny(out, **changes):
    return TrainConfig(out=str(out), **{**TINY, **changes})


def same_tensors(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule():
    cfg = TrainConfig(task="listops", model="transformer", out="x", steps=100, lr=1.0, warmup=10)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.0)
    cfg.schedule = "rsqrt"
    assert lr_at(9, cfg) == pytest.approx(1 / 10 ** 0.5) and lr_at(399, cfg) == pytest.approx(1 / 20)


def test_resume_in_process_is_exact_and_files_are_plain(tmp_path):
    straight = train(tiny(tmp_path / "a"), progress=False)
    assert train(tiny(tmp_path / "b"), progress=False, stop_after=2) is None
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_position"]["next_example"] == 8 and "rng" in state
    resumed = train(tiny(tmp_path / "b"), resume=True, progress=False)
    a, b = tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint"
    assert sorted(p.name for p in a.iterdir()) == ["model.safetensors", "optimizer.json",
                                                   "optimizer.safetensors", "trainer_state.json"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert same_tensors(load_tensors(a / name), load_tensors(b / name))
    assert resumed["accuracy"] == straight["accuracy"]
    # metrics: the resumed run's log equals the straight run's, step by step
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")
    rows = read_metrics(tmp_path / "a")
    assert [r["step"] for r in rows if r["split"] == "eval"] == [3, 6]
    assert all("accuracy" in r and "loss" in r for r in rows if r["split"] == "eval")
    # the final model loads with et.load_pretrained
    model = et.load_pretrained(tmp_path / "a" / "model")
    assert same_tensors(model.state_dict(), load_tensors(a / "model.safetensors"))


@pytest.mark.parametrize("name", et.list_models())
def test_resume_is_exact_for_every_model(name, tmp_path):
    """Stop after step 2 and resume: the same weights and buffers as a straight run, with the
    layers' own state (performer's redraw count, routing's centroids) and tuple options."""
    options = {**attention_class(name).small_options, **STATE_CHANGES_OFTEN.get(name, {})}
    options.pop("max_len", None)  # the trainer's max_len is seq_len
    config = lambda out: tiny(out, model=name, options=dict(options),
                              model_kwargs=dict(dim=16, depth=2, heads=2, mlp_dim=32))
    train(config(tmp_path / "a"), progress=False)
    assert train(config(tmp_path / "b"), progress=False, stop_after=2) is None
    train(config(tmp_path / "b"), resume=True, progress=False)
    a, b = (load_tensors(tmp_path / run / "checkpoint" / "model.safetensors") for run in "ab")
    assert same_tensors(a, b)


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_to_files(opt)
    json.dumps(meta)  # JSON-able
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    other.load_state_dict(ckpt.optimizer_from_files(tensors, json.loads(json.dumps(meta))))
    again, _ = ckpt.optimizer_to_files(other)
    assert same_tensors(tensors, again) and other.param_groups[0]["lr"] == 0.1


def test_refusals(tmp_path):
    train(tiny(tmp_path, steps=2), progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(tiny(tmp_path, steps=2), progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(tiny(tmp_path, steps=2, lr=1e-2), resume=True, progress=False)
    # numbers out of range, before any compute (these trained, or failed in numpy, before)
    for bad, message in (({"clip": -1.0}, "clip: expected a finite number >= 0"),
                         ({"weight_decay": float("nan")}, "weight_decay: expected a finite number"),
                         ({"lr": float("inf")}, "lr: expected a finite number > 0"),
                         ({"eval_examples": 0}, "eval_examples: expected an integer >= 1"),
                         ({"seed": -1}, "seed: expected an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            train(tiny(tmp_path / "x", **bad), progress=False)
    # build_model arguments that the task sets, or given twice, before any compute
    with pytest.raises(ValueError, match=r"options: \['max_len'\] come from the task"):
        train(tiny(tmp_path / "x", model="linformer", options={"max_len": 64}), progress=False)
    with pytest.raises(ValueError, match=r"options: \['dim'\] also given in model_kwargs"):
        train(tiny(tmp_path / "x", options={"dim": 32}), progress=False)
    assert not (tmp_path / "x").exists()
    # a kill between the two renames leaves checkpoint.old: still found
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"


def test_cli_messages(tmp_path, capsys):
    assert main(["train", "--task", "text", "--model", "transformer", "--out", str(tmp_path / "t")]) == 2
    assert "aclImdb" in capsys.readouterr().err
    args = ["train", "--task", "mqar", "--model", "transformer", "--out", str(tmp_path / "m"),
            "--steps", "1", "--seq-len", "16", "--batch-size", "2", "--dim", "16", "--heads", "2",
            "--depth", "1", "--task-option", "vocab_size=16", "--task-option", "pairs=2",
            "--eval-examples", "2", "--no-progress"]
    assert main(args + ["--option", "bogus=3"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["task"] == "mqar" and 0.0 <= out["accuracy"] <= 1.0


CLI = ["-m", "efficient_transformers", "train", "--task", "listops", "--model", "transformer",
       "--steps", "30", "--batch-size", "4", "--seq-len", "32", "--dim", "16", "--depth", "1",
       "--heads", "2", "--mlp-dim", "32", "--save-every", "3", "--eval-every", "20",
       "--eval-examples", "8", "--log-every", "1", "--lr", "3e-3", "--no-progress",
       "--task-option", "min_length=5", "--task-option", "max_length=32",
       "--task-option", "max_depth=4"]


def run_cli(out, *extra, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *CLI, "--out", str(out), *extra], env=env,
                          check=check, capture_output=True, timeout=300)


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same kernels, same bits
    try:
        assert main(CLI[2:] + ["--out", str(tmp_path / "straight")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *CLI, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = out / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state_file.exists():
            try:
                if json.loads(state_file.read_text())["step"] >= 6:
                    break
            except (json.JSONDecodeError, OSError):
                pass
        time.sleep(0.005)
    time.sleep(random.uniform(0, 0.05))   # anywhere between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state_file.read_text())["step"]
    assert killed_at < 30, "the run finished before it could be killed"
    run_cli(out, "--resume")
    a, b = tmp_path / "straight" / "checkpoint", out / "checkpoint"
    assert json.loads((b / "trainer_state.json").read_text())["step"] == 30
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert same_tensors(load_tensors(a / name), load_tensors(b / name))
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if r["split"] == "train"]
    assert losses(tmp_path / "straight") == losses(out)


@pytest.mark.gpu
def test_cuda_bf16_training(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = train(tiny(tmp_path, device="cuda", steps=4), progress=False)
    assert 0.0 <= result["accuracy"] <= 1.0
    rows = read_metrics(tmp_path)
    assert all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN


def test_presets_resolve():
    from efficient_transformers.train import resolve

    lra = resolve("listops", "lra", {"model": {"dim": None}})
    assert lra["model"] == dict(dim=512, depth=4, heads=8, mlp_dim=1024, pooling="cls")
    assert (lra["batch_size"], lra["steps"], lra["seq_len"]) == (32, 5000, 2000)
    mine = resolve("mqar", "small", {"steps": 7, "model": {"dim": 32}, "task_options": {"pairs": 2}})
    assert mine["steps"] == 7 and mine["model"]["dim"] == 32 and mine["model"]["depth"] == 2
    assert mine["task_options"] == {"vocab_size": 32, "pairs": 2}
    assert resolve("text", None, {"steps": 50})["warmup"] == 5
    # the image tasks default to their images' length (512 could not hold 32 x 32 pixels)
    assert resolve("pathfinder", None, {})["seq_len"] == resolve("image", None, {})["seq_len"] == 1024
    assert resolve("pathfinder", None, {"seq_len": 2048})["seq_len"] == 2048
    with pytest.raises(ValueError, match="preset"):
        resolve("text", "huge", {})
