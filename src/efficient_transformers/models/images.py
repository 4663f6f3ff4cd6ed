"""The Image Transformer model (Parmar et al. 2018, section 3): images of 8-bit intensities as
token sequences in raster order (vocabulary 256), generated pixel by pixel.

`build_model("image_transformer", shape=(H, W), ...)` is the generic pre-LN model with
vocab_size 256 and max_len H·W by default (channels: use W = width · channels, as the paper's
raster order over channels does); `images_to_tokens` / `tokens_to_images` convert. For
classify / match the pooling defaults to "mean": a CLS token in front would shift the raster
positions that the 2-D pattern relies on.
"""

from __future__ import annotations

import math

import torch

from ..registry import register_model
from .transformer import TaskModel, build_generic_model

INTENSITIES = 256


def images_to_tokens(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, H, W, C) intensities 0..255 -> (B, N) long tokens in raster order."""
    if images.dim() not in (3, 4):
        raise ValueError(f"images: expected (B, H, W) or (B, H, W, C), got {tuple(images.shape)}")
    tokens = images.reshape(images.shape[0], -1).long()
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= INTENSITIES):
        raise ValueError("images: expected intensities in [0, 255]")
    return tokens


def tokens_to_images(tokens: torch.Tensor, shape) -> torch.Tensor:
    """(B, H·W) tokens -> (B, H, W) (or (B, *shape))."""
    return tokens.reshape(tokens.shape[0], *shape)


@register_model("image_transformer")
def build_image_model(name: str, task: str = "lm", *, vocab_size: int = INTENSITIES,
                      max_len: int | None = None, shape=None, pooling: str | None = None,
                      **kwargs) -> TaskModel:
    """The generic model with image defaults; `shape` also goes to the attention layers."""
    if max_len is None:
        max_len = math.prod(shape) if isinstance(shape, (tuple, list)) and shape else 1024
    if pooling is None:
        pooling = "mean"
    options = dict(kwargs)
    if shape is not None:
        options["shape"] = tuple(shape) if isinstance(shape, list) else shape
    return build_generic_model(name, task, vocab_size=vocab_size, max_len=max_len, pooling=pooling,
                               **options)
