"""The Image Transformer model (Parmar et al. 2018, section 3): images of 8-bit intensities as
token sequences in raster order (vocabulary 256), generated pixel by pixel.

`build_model("image_transformer", shape=(H, W), ...)` is the generic pre-LN model with
vocab_size 256 and max_len H·W by default (channels: use W = width · channels, as the paper's
raster order over channels does); `images_to_tokens` / `tokens_to_images` convert. For
classify / match the pooling defaults to "mean": a CLS token in front would shift the raster
positions that the 2-D pattern relies on.

A language model on a 2-D grid (`axial_transformer`, `image_transformer` with mode "2d") and no
`shape` lays every sequence on the grid of max_len (`functional.axial.grid_shape`): decoding
needs a grid fixed in advance, and training must use the same one (the layer alone, shape None,
takes each length's own square grid).
"""

from __future__ import annotations

import math

import torch

from ..attention.base import check_positive_int
from ..functional.axial import grid_shape
from ..registry import register_model
from .transformer import MAX_LEN, TaskModel, build_generic_model

INTENSITIES = 256


def images_to_tokens(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, H, W, C) intensities 0..255 -> (B, N) long tokens in raster order."""
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError(f"images: expected a tensor (B, H, W) or (B, H, W, C), got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if images.is_floating_point() and not torch.equal(images, images.round()):
        # .long() would truncate: images scaled to [0, 1] would all become token 0
        raise ValueError("images: expected whole intensities 0..255, got fractions (scale images "
                         "in [0, 1] by 255 and round them first)")
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
        max_len = math.prod(shape) if isinstance(shape, (tuple, list)) and shape else MAX_LEN
    if pooling is None:
        pooling = "mean"
    if kwargs.get("mode") == "2d":
        shape = fixed_grid(task, max_len, shape)
    options = dict(kwargs)
    if shape is not None:
        options["shape"] = tuple(shape) if isinstance(shape, list) else shape
    return build_generic_model(name, task, vocab_size=vocab_size, max_len=max_len, pooling=pooling,
                               **options)


def fixed_grid(task: str, max_len: int, shape):
    """`shape`, or for a language model without one max_len's grid."""
    if task != "lm" or shape is not None:
        return shape
    check_positive_int("max_len", max_len)
    return grid_shape(max_len)


@register_model("axial_transformer")
def build_axial_model(name: str, task: str = "lm", *, max_len: int = MAX_LEN, shape=None,
                      **kwargs) -> TaskModel:
    """The generic model; a language model without `shape` gets max_len's grid."""
    shape = fixed_grid(task, max_len, shape)
    if shape is not None:
        kwargs["shape"] = shape
    return build_generic_model(name, task, max_len=max_len, **kwargs)
