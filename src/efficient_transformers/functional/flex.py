"""The CUDA path of the fixed patterns: FlexAttention with a BlockMask built from a `Pattern`.

`pattern.allows(i, j)` is the mask_mod; key padding is folded into it. BlockMasks are built with
`create_block_mask` (compiled on CUDA, so no dense N × N mask is ever made) and cached per
(pattern, length, device) when there is no padding mask; with a padding mask one is built per call
(it depends on the mask's values). `flex_attention` itself is compiled once and reused (one
compile per shape). Where FlexAttention cannot run, callers use the CPU block path: `use_flex`.

`FORCE_FLEX` overrides the choice (tests set it to run the compiled CPU forward; FlexAttention has
no CPU backward).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch

from .amp import outside_autocast

# None: automatic (CUDA and importable); True / False: forced; "cuda": decided as on CUDA on any
# device (the traffic estimate, `bench/traffic_flex.py`)
FORCE_FLEX: bool | str | None = None
BLOCK_SIZE = 128
MIN_HEAD_DIM = 16  # the CUDA FlexAttention kernel refuses smaller head dimensions ("NYI: E >= 16")


_FLEX_AVAILABLE: list[bool] = []  # filled once (not lru_cache: torch.compile warns on those)


def flex_available() -> bool:
    if not _FLEX_AVAILABLE:
        try:
            from torch.nn.attention.flex_attention import (  # noqa: F401
                create_block_mask, flex_attention,
            )
            _FLEX_AVAILABLE.append(True)
        except ImportError:
            _FLEX_AVAILABLE.append(False)
    return _FLEX_AVAILABLE[0]


def use_flex(q: torch.Tensor, block_sparse: bool = True) -> bool:
    """True where the FlexAttention path should run for q (B, H, N, d): on CUDA when it is
    importable and d >= MIN_HEAD_DIM. block_sparse=False: the pattern reaches into every key
    block (a key every stride-th position: axial columns, Sparse Transformer's strided and fixed
    patterns), so FlexAttention skips no block; on an H100 such layers ran slower than dense SDPA
    at every N (docs/benchmarks.md, CUDA run of 2026-11-27), and they take the line/block path
    unless FORCE_FLEX is True."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if q.is_cuda and q.shape[-1] < MIN_HEAD_DIM:
        return False
    if FORCE_FLEX == "cuda":
        return block_sparse and flex_available()
    if FORCE_FLEX is not None:
        return FORCE_FLEX and flex_available()
    return block_sparse and q.is_cuda and flex_available()


RECOMPILE_LIMIT = 64


@lru_cache(maxsize=None)
def _compiled_flex():
    """flex_attention compiled once; each (pattern, shape, grad mode) adds a cache entry, so the
    recompile limit (8 by default; past it dynamo silently runs the dense eager reference) is
    raised to RECOMPILE_LIMIT."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _build_block_mask(mask_mod, batch, n, device, block_size):
    from torch.nn.attention.flex_attention import create_block_mask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # _compile: no dense mask on CUDA
        return create_block_mask(mask_mod, batch, None, n, n, device=device,
                                 BLOCK_SIZE=block_size, _compile=torch.device(device).type == "cuda")


_MASKS: dict = {}
_CANONICAL: dict = {}


def canonical(pattern):
    """One instance per equal pattern: the compiled kernel guards on the objects its mask_mod
    closes over, so a fresh but equal pattern per call must not trigger a recompile."""
    return _CANONICAL.setdefault(pattern, pattern)


def pattern_mask_mod(pattern, key_mask: torch.Tensor | None = None):
    """The FlexAttention mask_mod of `pattern` (& key_mask[b, j], (B, N) bool, when given)."""
    pattern = canonical(pattern)
    if key_mask is None:
        def mask_mod(b, h, i, j):
            return pattern.allows(i, j)
    else:
        def mask_mod(b, h, i, j):
            return pattern.allows(i, j) & key_mask[b, j]
    return mask_mod


def pattern_block_mask(pattern, n: int, device, key_mask: torch.Tensor | None = None,
                       block_size: int = BLOCK_SIZE):
    """BlockMask of `pattern` (& key_mask[b, j]) for self-attention over n positions."""
    if key_mask is None:
        key = (pattern, n, str(device), block_size)
        if key not in _MASKS:
            _MASKS[key] = _build_block_mask(pattern_mask_mod(pattern), None, n, device, block_size)
        return _MASKS[key]
    # padded with False to whole blocks so the mask_mod never reads past the end
    key_mask = torch.nn.functional.pad(key_mask, (0, (-n) % block_size), value=False)
    return _build_block_mask(pattern_mask_mod(pattern, key_mask), key_mask.shape[0], n, device,
                             block_size)


def flex_pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern,
                           key_mask: torch.Tensor | None = None, scale: float | None = None,
                           block_size: int = BLOCK_SIZE, compiled: bool = True,
                           return_lse: bool = False, score_mod=None):
    """Attention restricted to `pattern` through FlexAttention: q, k, v (B, H, N, d) -> (B, H, N, d),
    and with return_lse its row log-sum-exp (B, H, N) too (−inf where a row has no key; the
    gradient flows through it). Rows with no allowed key (padded queries) give 0. `score_mod`:
    FlexAttention's (score, b, h, i, j) -> score, the same function object at every call (the
    compiled kernel guards on it). compiled=False runs FlexAttention's eager reference (dense
    scores: for tests of the mask only)."""
    mask = pattern_block_mask(pattern, q.shape[2], q.device, key_mask, block_size)
    flex = flex_callable(compiled)
    if return_lse:
        return flex_with_lse(flex, q, k, v, mask, scale, score_mod)
    return flex(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale)


def flex_callable(compiled: bool = True):
    """flex_attention as this module calls it: compiled once (`_compiled_flex`), bare inside a
    caller's torch.compile (which compiles it), or its eager reference (compiled=False)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        def eager(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return flex_attention(*args, **kwargs)
        return outside_autocast(eager)
    if torch.compiler.is_compiling():
        return flex_attention
    # autocast off: q, k, v already share a dtype (one projection, cast by autocast where it is
    # on) and the kernel keeps its own float32 statistics; under autocast the lowering of its
    # backward could meet mixed dtypes
    return outside_autocast(_compiled_flex())


def flex_with_lse(flex, q, k, v, block_mask, scale, score_mod=None):
    """(out, lse) of a FlexAttention call: `return_aux=AuxRequest(lse=True)` where torch has it
    (`return_lse` is deprecated there, and its warning costs a recompile), else return_lse."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                    return_lse=True)
    out, aux = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                    return_aux=AuxRequest(lse=True))
    return out, aux.lse
