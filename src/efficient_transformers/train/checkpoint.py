"""Checkpoints without pickle, replaced atomically as a whole.

DIR/checkpoint/
  model.safetensors      the model's state_dict
  optimizer.safetensors  every tensor of the optimizer state ("state.<param index>.<name>")
  optimizer.json         the rest of the optimizer state (param_groups, non-tensor entries)
  trainer_state.json     step, RNG states (base64 of torch's byte tensors), data position, ...

A new checkpoint is written into a fresh sibling folder (each file fsynced), then swapped in:
checkpoint -> checkpoint.old, new -> checkpoint, checkpoint.old removed. A kill between the two
renames leaves only checkpoint.old, which `find_checkpoint` then uses; a kill before leaves the
previous checkpoint untouched. So some complete checkpoint always exists once one was written.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_json, load_tensors, read_json, save_tensors

NAME = "checkpoint"
STATE_FILE = "trainer_state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entries in meta["plain_state"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_to_json(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def rng_from_json(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def save_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write DIR/checkpoint/ atomically (see the module docstring). Returns its path."""
    out = Path(out)
    final, old = out / NAME, out / f"{NAME}.old"
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", dir=out))
    save_tensors(tmp / "model.safetensors", model.state_dict())
    tensors, meta = optimizer_to_files(optimizer)
    save_tensors(tmp / "optimizer.safetensors", tensors)
    atomic_write_json(tmp / "optimizer.json", meta)
    atomic_write_json(tmp / STATE_FILE, state)  # written last: its presence marks completeness
    _fsync_dir(tmp)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint under `out` (DIR/checkpoint, or checkpoint.old after a kill
    between the two renames), or None."""
    for name in (NAME, f"{NAME}.old"):
        path = Path(out) / name
        if (path / STATE_FILE).is_file():
            return path
    return None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """-> (model tensors, optimizer state_dict, trainer state)"""
    path = Path(path)
    model = load_tensors(path / "model.safetensors")
    optimizer = optimizer_from_files(load_tensors(path / "optimizer.safetensors"),
                                     read_json(path / "optimizer.json"))
    return model, optimizer, read_json(path / STATE_FILE)


def clean_stale(out: Path) -> None:
    """Remove half-written checkpoint folders a killed run left behind."""
    for path in Path(out).glob(f".{NAME}.*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
