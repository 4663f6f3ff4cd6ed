"""Direct FlashAttention calls that keep the row log-sum-exp, and a union merge built on them.

`flash_forward` / `flash_backward` call the aten flash kernels themselves (CUDA's FlashAttention,
or the CPU flash kernel), so a caller gets each call's lse and can hand a backward call the
output and lse of a *union* of key sets: the gradient of one softmax over a union, restricted to
one part's keys, is what that part's backward computes when given the union's out and lse (it
recomputes P = exp(s − lse) and uses D = rowsum(dO ∘ O)). `functional.grid_flash` is built on
that, and so is `merge_flash_keys`.

`merge_flash_keys(out_a, lse_a, q, k, v)`: a part A (out_a, lse_a, both differentiable, from
FlexAttention, say) merged by log-sum-exp with every query's attention to a few keys k, v run as
one FlashAttention call. The explicit form (`merge.attention_with_lse` + `merge.merge_pair`)
writes the (N × g) scores and probabilities several times over, forward and backward (bigbird's
128 global keys at 64k bf16: about 3.5 GiB by `bench/traffic.py`'s count). Backward: the flash
call's keys get their gradients from its backward handed the union's out and lse; A gets
d out_a = a·dO and d lse_a = a·rowsum(dO ∘ (out_a − out)), a = exp(lse_a − lse), the chain rule
through out = a·out_a + (1 − a)·out_g, so A's own backward gives its keys their union gradient.

`flash_rows(q, k, v)`: a few query rows (B, H, G, d) against all N keys. One fused call would give
the G rows, one query block, to one thread block per head, walking all N keys alone; here the
keys are split into chunks of about `ROW_CHUNK` that become extra heads (a view of k and v), each
chunk one thread block, and the chunks' (out, lse) merge by log-sum-exp (B·H·chunks·G rows:
small). Backward: each chunk's backward is handed the merged out and lse; dq sums over chunks.

Both are one node (`_FlashKeysMerged`): part A where given, the keys in chunks where asked
(`chunked=True`); ETC's global rows take both (their g2g part as A, every long token chunked).
No mask in any: callers with padding or a causal rule keep the explicit forms.
`uses_flash_keys(q)`: on CUDA where FlashAttention runs (`FLASH_KEYS` forces it, tests on the
CPU).
"""

from __future__ import annotations

import math

import torch

from .amp import autocast_free
from .backward import first_order_only
from .merge import stat_dtype

FLASH_KEYS: bool | None = None  # None: automatic (`uses_flash_keys`); True / False: forced

_CUDA_FLASH: dict[int, bool] = {}  # device index -> FlashAttention runs there (asked once)


def _cuda_flash(device: torch.device) -> bool:
    """FlashAttention built in and the GPU Ampere or newer; asked once per device, so that a
    compiled caller reads a constant instead of calling into the driver."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _CUDA_FLASH:
        _CUDA_FLASH[index] = (torch.backends.cuda.is_flash_attention_available()
                              and torch.cuda.get_device_capability(index) >= (8, 0))
    return _CUDA_FLASH[index]


def flash_available(q: torch.Tensor) -> bool:
    """True where the flash kernels can run for q (B, H, N, d): the CPU flash kernel takes every
    float dtype; CUDA's FlashAttention bf16 / fp16 with d a multiple of 8, at most 256, on an
    Ampere or newer GPU (compute capability 8.0)."""
    if not q.is_floating_point():
        return False
    if q.device.type == "cpu":
        return True
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 256
            and _cuda_flash(q.device))


def flash_forward(q, k, v, causal: bool, scale: float):
    """q (B, H, N, d), k, v (B, H, M, d) -> (out (B, H, N, d), lse (B, H, N) float32, what
    the CUDA backward needs)"""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = \
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                                scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                         scale=scale)
    return out, lse, None


def flash_backward(d_out, q, k, v, out, lse, causal: bool, scale: float, aux):
    """-> (dq, dk, dv); out and lse may be a union's (see the module's docstring)."""
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            d_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset,
            scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out, q, k, v, out, lse, 0.0, causal, scale=scale)


def uses_flash_keys(q: torch.Tensor) -> bool:
    """True where `merge_flash_keys` should replace the explicit merge for q (B, H, N, d)."""
    wanted = q.is_cuda if FLASH_KEYS is None else FLASH_KEYS
    return wanted and flash_available(q)


ROW_CHUNK = 2048   # keys per chunk where the keys are cut into chunks (`flash_rows`)


def row_chunks(n: int, target: int | None = None) -> int:
    """How many equal chunks n keys are cut into: the first divisor of n from ceil(n / target)
    up to 4× that, else 1 (one call, no split); target None: ROW_CHUNK."""
    want = max(1, -(-n // (ROW_CHUNK if target is None else target)))
    return next((c for c in range(want, 4 * want + 1) if n % c == 0), 1)


def _per_chunk(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """Rows (B, H, G, e) -> the same rows for every chunk, (B, H·chunks, G, e) (a small copy)."""
    if chunks == 1:
        return t
    b, h = t.shape[:2]
    return t.unsqueeze(2).expand(b, h, chunks, *t.shape[2:]).reshape(b, h * chunks, *t.shape[2:])


@autocast_free
class _FlashKeysMerged(torch.autograd.Function):
    """Every query against all of k, v as flash calls (the keys in `chunks` chunks as extra
    heads), merged by log-sum-exp with part A (out_a, lse_a) where given."""

    @staticmethod
    def forward(ctx, out_a, lse_a, q, k, v, scale, chunks):
        b, h, n_q, _ = q.shape
        if chunks > 1:
            k, v = (t.contiguous().view(b, h * chunks, -1, t.shape[-1]) for t in (k, v))
        q_c = _per_chunk(q, chunks)                                       # (B, H·c, N, d)
        out_g, lse_g, aux = flash_forward(q_c, k, v, False, scale)
        if chunks > 1:   # the chunks' union: (B, H, c, N) weights
            lse_c = lse_g.view(b, h, chunks, n_q)
            lse_g = torch.logsumexp(lse_c, dim=2)                         # (B, H, N)
            weights = torch.exp(lse_c - lse_g[:, :, None])[..., None].to(out_g.dtype)
            out_g = (out_g.view(b, h, chunks, n_q, -1) * weights).sum(2, dtype=lse_g.dtype)
            out_g = out_g.to(q.dtype)
        weight_a, lse = None, lse_g
        if out_a is not None:
            lse_a = lse_a.to(lse_g.dtype)
            lse = torch.logaddexp(lse_a, lse_g)                            # union (B, H, N)
            weight_a = torch.exp(lse_a - lse)                              # a, 0 if A is empty
            out_g = torch.lerp(out_g, out_a.to(out_g.dtype), weight_a.to(out_g.dtype)[..., None])
        ctx.save_for_backward(q_c, k, v, out_g, lse, out_a, weight_a)
        ctx.scale, ctx.aux, ctx.chunks = scale, aux, chunks
        ctx.lse_dtype = None if lse_a is None else lse_a.dtype
        return out_g

    @staticmethod
    @first_order_only
    def backward(ctx, d_out):
        q_c, k_c, v_c, out, lse, out_a, weight_a = ctx.saved_tensors
        chunks, b, h = ctx.chunks, out.shape[0], out.shape[1]
        d_out = d_out.contiguous()
        d_q, d_k, d_v = flash_backward(
            _per_chunk(d_out, chunks), q_c, k_c, v_c, _per_chunk(out, chunks),
            _per_chunk(lse[..., None], chunks)[..., 0].contiguous(), False, ctx.scale, ctx.aux)
        if chunks > 1:
            d_q = d_q.view(b, h, chunks, *out.shape[2:]).sum(2)          # (B, H, N, d)
            d_k, d_v = (g.reshape(b, h, -1, g.shape[-1]) for g in (d_k, d_v))
        d_out_a = d_lse_a = None
        if out_a is not None:
            d_out_a = d_out * weight_a.to(d_out.dtype)[..., None]        # (B, H, N, d)
            # products in the input's dtype, summed in float32 (B, H, N)
            d_lse_a = torch.mul(d_out_a, out_a - out).sum(-1, dtype=stat_dtype(out.dtype))
            d_out_a, d_lse_a = d_out_a.to(out_a.dtype), d_lse_a.to(ctx.lse_dtype)
        return d_out_a, d_lse_a, d_q, d_k, d_v, None, None


def merge_flash_keys(out_a: torch.Tensor | None, lse_a: torch.Tensor | None, q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     chunked: bool = False) -> torch.Tensor:
    """Part A (out_a (B, H, N, d), lse_a (B, H, N)) over keys disjoint from k, v (B, H, M, d),
    merged with every query's attention to all of k, v -> the union's out (B, H, N, d). A None:
    the attention to k, v alone. `chunked`: the M keys as chunks of about ROW_CHUNK (few
    queries, many keys: `flash_rows`)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    chunks = row_chunks(k.shape[2]) if chunked else 1
    return _FlashKeysMerged.apply(out_a, lse_a, q, k, v, scale, chunks)


def flash_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
    """A few query rows q (B, H, G, d) against every key of k, v (B, H, N, d), no mask ->
    (B, H, G, d): the keys in chunks that run as extra heads."""
    return merge_flash_keys(None, None, q, k, v, scale, chunked=True)
