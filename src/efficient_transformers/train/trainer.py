"""The trainer: AdamW with warm-up and decay, gradient clipping, bf16 autocast on CUDA, evaluation
every K steps, a progress bar, DIR/metrics.jsonl, atomic checkpoints and exact resume, and
DistributedDataParallel under torchrun.

Exactness: the examples of step s are a pure function of (seed, s) (tasks/base.py), the learning
rate a pure function of s, and the checkpoint holds the weights, the whole optimizer state and the
RNG states. So a run killed at any moment and resumed from its last checkpoint replays the same
steps on the same state and ends with the same weights, bit for bit on CPU.

DIR/
  run_config.json     what was asked (resume checks it matches)
  metrics.jsonl       {"step", "split": "train", "loss", "lr"} and {"step", "split": "eval",
                      "loss", "accuracy"}; on resume, lines after the checkpoint's step are dropped
  checkpoint/         see train/checkpoint.py
  model/              save_pretrained of the final model (et.load_pretrained reads it)
  result.json         final accuracies, chance level, time, parameter count
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..attention.base import check_number, check_positive_int
from ..io import atomic_write_json, read_json
from ..models.transformer import IGNORE_INDEX
from ..registry import build_model
from ..tasks import TaskData, collate, load_task, shard_indices
from . import checkpoint as ckpt
from .distributed import Dist, all_sum, barrier, setup, teardown

SCHEDULES = ("cosine", "rsqrt", "constant")


# build_model arguments the trainer takes from the task, not from the config
TASK_SETS = {"max_len": "max_len is seq_len", "task": "the task's kind of model",
             "vocab_size": "the task's vocabulary", "num_classes": "the task's labels"}


@dataclass
class TrainConfig:
    task: str
    model: str
    out: str
    data: str | None = None
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.01
    clip: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    eval_examples: int | None = None
    seed: int = 0
    device: str = "cpu"
    model_kwargs: dict[str, Any] = field(default_factory=dict)   # dim, depth, heads, ...
    options: dict[str, Any] = field(default_factory=dict)        # attention options
    task_options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "save_every", "log_every"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("warmup", self.warmup, minimum=0)
        check_positive_int("seed", self.seed, minimum=0)
        if self.eval_examples is not None:   # None: the whole split
            check_positive_int("eval_examples", self.eval_examples)
        check_number("lr", self.lr, 0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0.0)
        check_number("clip", self.clip, 0.0)   # 0: no clipping
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {list(SCHEDULES)}, got {self.schedule!r}")
        for where in ("model_kwargs", "options"):
            taken = sorted(set(getattr(self, where)) & set(TASK_SETS))
            if taken:
                raise ValueError(f"{where}: {taken} come from the task ({TASK_SETS[taken[0]]}); "
                                 f"remove them")
        both = sorted(set(self.model_kwargs) & set(self.options))
        if both:
            raise ValueError(f"options: {both} also given in model_kwargs; give each once")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' asked for but torch.cuda.is_available() is False")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update number step + 1: linear warm-up, then cosine decay to 0 at
    `steps`, or LRA's rsqrt decay (lr * min(1, s/warmup) / sqrt(max(s, warmup))), or constant."""
    s = step + 1
    warm = min(1.0, s / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "rsqrt":
        return cfg.lr * warm / math.sqrt(max(s, cfg.warmup, 1))
    if cfg.schedule == "constant":
        return cfg.lr * warm
    progress = min(1.0, max(0, s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------- RNG states
def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": ckpt.rng_to_json(torch.get_rng_state()),
             "python": json.loads(json.dumps(random.getstate())),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if device.type == "cuda":
        state["cuda"] = [ckpt.rng_to_json(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(ckpt.rng_from_json(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all([ckpt.rng_from_json(s) for s in state["cuda"]])


# ------------------------------------------------------------------------------------ metrics
class Metrics:
    """DIR/metrics.jsonl, one JSON object a line, flushed at once (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if record.get("step", 0) <= keep_until:
                    kept.append(line)
            path.write_text("".join(f"{line}\n" for line in kept))
        elif enabled and keep_until is None:
            path.write_text("")

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


def read_metrics(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]


# ------------------------------------------------------------------------------- the helpers
def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def count_correct(logits: torch.Tensor, labels: torch.Tensor, model_task: str) -> tuple[int, int]:
    """(correct, scored) predictions: every example for classify/match; for lm only the
    positions whose next-token label is not -100 (logits at i predict labels[i + 1])."""
    if model_task == "lm":
        targets = labels[:, 1:]
        valid = targets != IGNORE_INDEX
        right = (logits[:, :-1].argmax(-1) == targets) & valid
        return int(right.sum()), int(valid.sum())
    return int((logits.argmax(-1) == labels).sum()), int(labels.numel())


@torch.no_grad()
def evaluate(model, task: TaskData, split: str, cfg: TrainConfig, d: Dist,
             device: torch.device) -> dict[str, float]:
    """Accuracy and mean loss over the split (capped at eval_examples), sharded over ranks."""
    data = getattr(task, split)
    n = len(data) if cfg.eval_examples is None else min(len(data), cfg.eval_examples)
    local_batch = max(1, cfg.batch_size // d.world)
    mine = list(range(d.rank, n, d.world))
    was_training = model.training
    model.eval()
    correct = scored = loss_sum = batches = 0.0
    for start in range(0, len(mine), local_batch):
        batch = to_device(collate([data.get(i) for i in mine[start: start + local_batch]],
                                  task.model_task, task.seq_len), device)
        with autocast(device):
            out = model(batch["tokens"], mask=batch["mask"], labels=batch["labels"])
        c, s = count_correct(out.logits.float(), batch["labels"], task.model_task)
        correct, scored = correct + c, scored + s
        loss_sum, batches = loss_sum + float(out.loss) * s, batches + 1
    model.train(was_training)
    correct, scored, loss_sum = all_sum([correct, scored, loss_sum], d, device)
    return {"accuracy": correct / max(scored, 1), "loss": loss_sum / max(scored, 1),
            "examples": n}


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU (where exact resume is tested)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_model(cfg: TrainConfig, task: TaskData):
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, task=task.model_task, vocab_size=task.vocab_size,
                       num_classes=task.num_classes, max_len=task.seq_len,
                       **cfg.model_kwargs, **cfg.options)


def check_run_config(out: Path, cfg: TrainConfig, resuming: bool) -> None:
    path = out / "run_config.json"
    # as JSON reads it back (tuples become lists), so that a resume compares like with like
    mine = json.loads(json.dumps({k: v for k, v in asdict(cfg).items()
                                  if k not in ("device", "out")}))
    if resuming and path.exists():
        saved = read_json(path)
        changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if changed:
            raise ValueError(f"resume: {out} was trained with other settings ({', '.join(changed)}: "
                             f"{[saved.get(k) for k in changed]} vs now {[mine.get(k) for k in changed]})")
    else:
        atomic_write_json(path, mine)


# ---------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any] | None:
    """Train (or resume) one run; returns the result dict (also DIR/result.json on rank 0).
    `stop_after`: leave after the checkpoint of that step, as if the run were killed there
    (returns None); a later call with resume=True continues."""
    cfg.check()
    d = setup(cfg.device)
    try:
        return _train(cfg, resume, progress, d, stop_after)
    finally:
        teardown(d)


def _train(cfg: TrainConfig, resume: bool, progress: bool, d: Dist,
           stop_after: int | None) -> dict[str, Any] | None:
    device = torch.device("cuda", d.local_rank) if cfg.device == "cuda" else torch.device("cpu")
    out = Path(cfg.out)
    task = load_task(cfg.task, cfg.data, seq_len=cfg.seq_len, seed=cfg.seed, **cfg.task_options)
    shard_indices(0, cfg.batch_size, d.rank, d.world)  # checks the batch divides over ranks
    model = make_model(cfg, task).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases, norms: no weight decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)

    found = ckpt.find_checkpoint(out) if out.exists() else None
    if found is not None and not resume:
        raise ValueError(f"out: {out} already holds a checkpoint; pass --resume to continue it "
                         f"or choose another --out")
    state: dict[str, Any] = {"step": 0, "train_seconds": 0.0, "cpu_seconds": 0.0}
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(out)
        check_run_config(out, cfg, resuming=found is not None)
    barrier(d)
    if found is not None:
        weights, opt_state, state = ckpt.load_checkpoint(found)
        model.load_state_dict(weights)
        optimizer.load_state_dict(opt_state)
        set_rng_state(state["rng"], device)
    start = int(state["step"])
    metrics = Metrics(out / "metrics.jsonl", d.main, keep_until=start if found is not None else None)
    net = model
    if d.active:
        # some mechanisms leave parameters unused in a given mode (e.g. decode-only buffers)
        net = DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None,
                                      find_unused_parameters=True)
    model.train()

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and d.main),
               desc=f"{cfg.model} on {cfg.task}", dynamic_ncols=True)
    window_loss, window_steps, last_loss, final_eval = 0.0, 0, float("nan"), None
    clock, cpu_clock = time.perf_counter(), time.process_time()
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = shard_indices(step, cfg.batch_size, d.rank, d.world)
        batch = to_device(collate([task.train.get(i) for i in indices], task.model_task,
                                  task.seq_len), device)
        with autocast(device):
            output = net(batch["tokens"], mask=batch["mask"], labels=batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        done = step + 1
        window_loss, window_steps = window_loss + float(output.loss.detach()), window_steps + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            (total,) = all_sum([window_loss / window_steps], d, device)
            last_loss = total / d.world
            metrics.log({"step": done, "split": "train", "loss": last_loss, "lr": lr})
            bar.set_postfix(loss=f"{last_loss:.4f}")
            window_loss, window_steps = 0.0, 0
        if done % cfg.eval_every == 0 or done == cfg.steps:
            result = evaluate(model, task, "eval", cfg, d, device)
            metrics.log({"step": done, "split": "eval", "loss": result["loss"],
                         "accuracy": result["accuracy"]})
            bar.set_postfix(loss=f"{last_loss:.4f}", acc=f"{result['accuracy']:.3f}")
            final_eval = result if done == cfg.steps else None
        if done % cfg.save_every == 0 or done == cfg.steps:
            now, cpu_now = time.perf_counter(), time.process_time()
            state = {"step": done, "samples_seen": done * cfg.batch_size,
                     "data_position": {"next_example": done * cfg.batch_size, "seed": cfg.seed},
                     "train_seconds": float(state["train_seconds"]) + now - clock,
                     "cpu_seconds": float(state.get("cpu_seconds", 0.0)) + cpu_now - cpu_clock,
                     "rng": rng_state(device), "world_size": d.world}
            clock, cpu_clock = now, cpu_now
            if d.main:
                ckpt.save_checkpoint(out, model, optimizer, state)
            barrier(d)
        if stop_after is not None and done >= stop_after and done % cfg.save_every == 0:
            bar.close()
            return None
    bar.close()

    final_eval = final_eval or evaluate(model, task, "eval", cfg, d, device)
    final_test = evaluate(model, task, "test", cfg, d, device)
    result = {"task": cfg.task, "model": cfg.model, "steps": cfg.steps, "preset": cfg.preset,
              "seq_len": task.seq_len, "eval_accuracy": final_eval["accuracy"],
              "accuracy": final_test["accuracy"], "test_loss": final_test["loss"],
              "chance": task.chance, "train_seconds": state["train_seconds"],
              "cpu_seconds": state.get("cpu_seconds"),
              "parameters": sum(p.numel() for p in model.parameters()),
              "test_examples": final_test["examples"], "task_info": task.info}
    if d.main:
        model.save_pretrained(out / "model")
        atomic_write_json(out / "result.json", result)
    barrier(d)
    return result
