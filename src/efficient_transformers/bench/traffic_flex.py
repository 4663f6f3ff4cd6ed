"""FlexAttention in the traffic estimate (`profile --traffic --as-cuda`): priced, not run.

On the CPU FlexAttention has no backward, and its reference would materialise N × N scores. So
in the estimate every FlexAttention call goes to a stand-in that returns uninitialised tensors
of the right shapes (allocations move nothing) and charges the counter (`traffic.OperatorTraffic`)
what the kernel would move and compute, from the key blocks each query block visits:
- forward: q, out and lse once, and for each visited (query block, key block) tile that key
  block's K and V rows; 4 flops per (query, key) pair and head dimension;
- backward: q, k, v, out, dO and lse read and dq, dk, dv written once, the K and V tiles read
  twice (the dq pass and the dk / dv pass); 2.5 times the forward's flops.
Mask and score functions are not priced, except through the calibration below. A pattern's
visited blocks come from its `key_blocks`
at FlexAttention's block size (at the pattern's own block size where it has one), so no N × N
mask is built; a real BlockMask (reformer's, built from block indices) is read as it is.

Calibrated on the H100 run of 2026-11-27 (docs/benchmarks.md), from the reference `flex_window`
(projections and one FlexAttention call, ±256 window) against its estimate here: at 64k it took
3.48 ms where full speed gives 2.55, so its FlexAttention calls (0.3 TFLOP forward + backward,
0.97 ms at the peak) took about 1.9 ms: about a third of the peak flop rate
(FLEX_PEAK_FRACTION, applied to the flops of both passes); at 1k it took 2.11 ms where 82 aten
calls at 18 µs give 1.48, so each call (forward, backward) costs about 0.3 ms more host time than
a dispatch (FLEX_HOST_S: the compiled function's guards and wrappers). One reference, so the
FlexAttention layers' estimates carry its error; `image_transformer`, also measured then, is the
check (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .traffic import OperatorTraffic

FLEX_PEAK_FRACTION = 0.32  # FlexAttention's flop rate / the peak, H100 2026-11-27 (see above)
FLEX_HOST_S = 3e-4         # host time per FlexAttention call beyond one dispatch (see above)


@dataclass
class BlockCounts:
    """What the stand-in reads from a block mask: key blocks per query block (B|1, H|1, nq)."""

    kv_num_blocks: torch.Tensor
    BLOCK_SIZE: tuple[int, int]
    full_kv_num_blocks: torch.Tensor | None = None


_COUNTS: dict = {}


def pattern_counts(pattern, n: int, device, key_mask=None, block_size: int = 128) -> BlockCounts:
    """`functional.flex.pattern_block_mask`'s stand-in: the pattern's key blocks per query block
    (padding ignored: it removes no block of a real query); cached per pattern and length, as
    the block masks are."""
    key = (pattern, n, str(device), block_size)
    if key not in _COUNTS:
        _COUNTS[key] = _pattern_counts(pattern, n, device, block_size)
    return _COUNTS[key]


def _pattern_counts(pattern, n: int, device, block_size: int) -> BlockCounts:
    try:
        size = block_size
        ids = pattern.key_blocks(-(-n // size), size, device)
    except ValueError:   # a pattern drawn for its own block size (Big Bird)
        size = pattern.block
        ids = pattern.key_blocks(-(-n // size), size, device)
    return BlockCounts((ids >= 0).sum(-1)[None, None], (size, size))


def _visits(block_mask, q, k) -> tuple[float, float]:
    """(query-key pairs computed, K / V rows loaded) over all batch elements and heads."""
    counts = block_mask.kv_num_blocks
    if getattr(block_mask, "full_kv_num_blocks", None) is not None:
        counts = counts + block_mask.full_kv_num_blocks
    size_q, size_k = block_mask.BLOCK_SIZE
    lines = q.shape[0] * q.shape[1]                      # (batch, head) pairs of the call
    per_line = counts.sum().item() / (counts.shape[0] * counts.shape[1])
    rows = lines * per_line * size_k                     # key rows loaded, once per query block
    return rows * min(size_q, q.shape[2]), rows


class _PricedFlex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pairs, key_rows):
        elt = q.element_size()
        d, e = q.shape[-1], v.shape[-1]
        ctx.pairs, ctx.key_rows = pairs, key_rows
        ctx.shapes = (q.shape, k.shape, v.shape)
        n_q = q.numel() // d                                      # query rows
        once = (n_q * d + n_q * e) * elt + n_q * 4                # q, out; lse in float32
        OperatorTraffic.charge("flex_attention (priced)", once + key_rows * (d + e) * elt,
                               4 * pairs * d, FLEX_PEAK_FRACTION, FLEX_HOST_S)
        out = q.new_empty(*q.shape[:-1], e)
        return out, q.new_empty(q.shape[:-1], dtype=torch.float32)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        (q_shape, k_shape, v_shape), elt = ctx.shapes, d_out.element_size()
        d, e = q_shape[-1], v_shape[-1]
        n_q = d_out.numel() // e                                  # query rows
        # q, k, v read and dq, dk, dv written; out and dO read; lse (float32) read
        tensors = 2 * (n_q * d + k_shape.numel() + v_shape.numel()) + 2 * n_q * e
        OperatorTraffic.charge("flex_attention_backward (priced)",
                               tensors * elt + n_q * 4 + 2 * ctx.key_rows * (d + e) * elt,
                               2.5 * 4 * ctx.pairs * d, FLEX_PEAK_FRACTION, FLEX_HOST_S)
        return (d_out.new_empty(q_shape), d_out.new_empty(k_shape), d_out.new_empty(v_shape),
                None, None)


class _Aux:
    def __init__(self, lse):
        self.lse = lse


def priced_flex(q, k, v, block_mask=None, scale=None, return_lse=False, return_aux=None,
                **unused):
    """flex_attention's signature, priced instead of run (see the module docstring)."""
    pairs, key_rows = _visits(block_mask, q, k)
    out, lse = _PricedFlex.apply(q, k, v, pairs, key_rows)
    if return_lse:
        return out, lse
    return (out, _Aux(lse)) if return_aux is not None else out


@contextlib.contextmanager
def priced_flex_paths():
    """Inside the block the layers take FlexAttention where they would on CUDA, and every call
    is priced by `priced_flex`; the switches come back afterwards."""
    from ..functional import flex, lsh_flex

    saved = (flex.FORCE_FLEX, flex._compiled_flex, flex.pattern_block_mask, lsh_flex.FORCE)
    flex.FORCE_FLEX, flex._compiled_flex = "cuda", lambda: priced_flex
    flex.pattern_block_mask, lsh_flex.FORCE = pattern_counts, priced_flex
    try:
        yield
    finally:
        flex.FORCE_FLEX, flex._compiled_flex, flex.pattern_block_mask, lsh_flex.FORCE = saved
