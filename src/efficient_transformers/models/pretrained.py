"""save_pretrained / load_pretrained: safetensors weights plus a JSON config, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_write_json, load_tensors, read_json, save_tensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class PretrainedMixin:
    """A model that remembers the `build_model` arguments it was made with (`self.config`)."""

    config: dict[str, Any]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # weights first: a config without weights is never left behind as a loadable checkpoint
        save_tensors(path / WEIGHTS_FILE, self.state_dict(),
                     metadata={"format": "efficient-transformers", "version": str(FORMAT_VERSION)})
        atomic_write_json(path / CONFIG_FILE, {"format_version": FORMAT_VERSION, **self.config})


def load_state_strict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load tensors into model, raising ValueError that names every mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if own[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match the model built from its config: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}, shapes {shapes[:8]}")
    model.load_state_dict(tensors, strict=True)


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from `path/config.json` and load `path/model.safetensors` into it."""
    from ..registry import build_model

    path = Path(path)
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / file).is_file():
            raise FileNotFoundError(f"path: {path} has no {file}; expected a save_pretrained folder")
    config = read_json(path / CONFIG_FILE)
    version = config.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"path: {path / CONFIG_FILE} has format_version {version!r}, "
                         f"expected {FORMAT_VERSION}")
    try:
        model = build_model(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"path: {path / CONFIG_FILE} does not describe a buildable model: {err}") from err
    load_state_strict(model, load_tensors(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE))
    return model.to(device)
