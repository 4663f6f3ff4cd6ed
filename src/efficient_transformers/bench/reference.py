"""Reference kernels timed by the same harness, so every mechanism gets a ratio against them.

Each is one self-attention layer with the same projections as `transformer` (one fused qkv
Linear, one output Linear), so only the attention core differs:

- ``dense_sdpa``         `scaled_dot_product_attention` (FlashAttention on CUDA), full attention;
- ``dense_sdpa_causal``  the same with ``is_causal=True``;
- ``flex_window``        FlexAttention with a ±256 sliding-window BlockMask (``|i - j| <= 256``)
                         built by `create_block_mask` (no dense N×N mask), CUDA only: FlexAttention
                         has no backward on CPU, so the harness skips it there with a note;
- ``linear_chunked_causal``  causal linear attention (φ = elu + 1) in the plain-PyTorch chunked
                         form of ANCHORS.md's kernel table (chunk 128: matmuls inside chunks, an
                         exclusive prefix sum of per-chunk states across them), composed from
                         `kernels.causal_linear_attention` in the input dtype, unfused: what
                         `linear_transformer`'s causal form is held to on CUDA;
- ``flex_mask:NAME``     a bare FlexAttention call with the mask of the fixed-pattern mechanism
                         NAME (its `pattern(n)`, or `single_pattern(n)` where `pattern` names an
                         option, at its default options for that N, global rows
                         and columns included), CUDA only: the "same mask" a fixed pattern is
                         held to (one of SAME_MASK_MECHANISMS; not in a default run).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.kernels import causal_linear_attention, elu_feature_map

REFERENCES = ("dense_sdpa", "dense_sdpa_causal", "flex_window", "linear_chunked_causal")
SAME_MASK = "flex_mask:"   # + a mechanism of SAME_MASK_MECHANISMS
# the fixed-pattern mechanisms whose layer gives one mask for every head (`pattern(n)`)
SAME_MASK_MECHANISMS = ("image_transformer", "sparse_transformer", "axial_transformer",
                        "longformer", "bigbird")
FLEX_WINDOW = 256
LINEAR_CHUNK = 128  # ANCHORS.md: "causal linear attention, chunked (chunk 128), plain PyTorch"
CUDA_ONLY = {"flex_window": "CUDA only: FlexAttention has no backward on CPU"}


def same_mask_references() -> tuple[str, ...]:
    return tuple(SAME_MASK + name for name in SAME_MASK_MECHANISMS)


def is_reference(name: str) -> bool:
    return name in REFERENCES or name in same_mask_references()


def cuda_only_note(name: str) -> str | None:
    """Why a reference cannot run on the CPU, or None where it can."""
    if name.startswith(SAME_MASK):
        return CUDA_ONLY["flex_window"]
    return CUDA_ONLY.get(name)
# complexity label and exponent per reference, for the exponent verdicts
COMPLEXITY = {"dense_sdpa": ("O(N²)", 2.0), "dense_sdpa_causal": ("O(N²)", 2.0),
              "flex_window": ("O(N·w)", 1.0), "linear_chunked_causal": ("O(N)", 1.0)}
# the mechanisms a reference's ratio table shows (absent: every series of the run)
RATIO_SUBJECTS = {"linear_chunked_causal": ("linear_transformer", "performer")}


class _Projected(nn.Module):
    """qkv Linear -> core(q, k, v) with (B, H, N, d) -> out Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def core(self, q, k, v):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = self.core(q, k, v)  # (B, H, N, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class DenseSDPA(_Projected):
    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__(dim, heads)
        self.causal = causal

    def core(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=16)
def window_block_mask(n: int, window: int, device: str):
    """BlockMask of |i - j| <= window, compiled (never a dense N×N mask); cached per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= window) & (kv_idx - q_idx <= window)

    return create_block_mask(in_window, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device,
                             _compile=True)


class FlexWindow(_Projected):
    def __init__(self, dim: int, heads: int, window: int = FLEX_WINDOW):
        super().__init__(dim, heads)
        self.window = window

    def core(self, q, k, v):
        mask = window_block_mask(q.shape[-2], self.window, str(q.device))
        return _compiled_flex()(q, k, v, block_mask=mask)


class SameMaskFlex(_Projected):
    """FlexAttention with the mask of `mechanism` at length n (bare: no global tokens handled
    apart, no second path), the mechanism's projections' shapes."""

    def __init__(self, mechanism: str, dim: int, heads: int, n: int):
        super().__init__(dim, heads)
        import efficient_transformers as et

        from .config import length_options

        options = length_options(et.attention_spec(mechanism).options, n)
        layer = et.build_attention(mechanism, dim=dim, heads=heads, **options)
        self.pattern = getattr(layer, "single_pattern", layer.pattern)(n)
        if self.pattern is None:
            raise ValueError(f"reference: {SAME_MASK}{mechanism} has no single mask for every "
                             f"head at its default options")

    def core(self, q, k, v):
        from ..functional.flex import flex_pattern_attention

        if hasattr(self.pattern, "tables"):   # random blocks drawn before the compiled call
            self.pattern.tables(q.device)
        return flex_pattern_attention(q, k, v, self.pattern)


class LinearChunkedCausal(_Projected):
    def __init__(self, dim: int, heads: int, chunk: int = LINEAR_CHUNK):
        super().__init__(dim, heads)
        self.chunk = chunk

    def core(self, q, k, v):
        return causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v,
                                       chunk_size=self.chunk)


def build_reference(name: str, dim: int, heads: int, n: int | None = None) -> nn.Module:
    if name in same_mask_references():
        return SameMaskFlex(name[len(SAME_MASK):], dim, heads, n)
    if name == "dense_sdpa":
        return DenseSDPA(dim, heads)
    if name == "dense_sdpa_causal":
        return DenseSDPA(dim, heads, causal=True)
    if name == "flex_window":
        return FlexWindow(dim, heads)
    if name == "linear_chunked_causal":
        return LinearChunkedCausal(dim, heads)
    raise ValueError(f"reference: unknown {name!r}; expected one of "
                     f"{list(REFERENCES) + list(same_mask_references())}")
