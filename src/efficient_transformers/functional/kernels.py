"""Feature maps and linear attention (kernelised attention, survey section 3.2 "KR").

Linear attention replaces softmax(q kᵀ) v by φ(q) (φ(k)ᵀ v) / φ(q) (φ(k)ᵀ 1)
(Katharopoulos et al. 2020, arXiv:2006.16236, eq. 4-6). Three forms of the same definition:

- `linear_attention`: parallel, non-causal, O(N·m·d).
- `causal_linear_attention`: chunked causal form. Inside a chunk of C positions an explicit
  lower-triangular (C × C) product; across chunks an exclusive prefix sum of the per-chunk
  (m × (d+1)) states. Memory O(N·C + N/C·m·d); never an N × m × d cumulative tensor.
- `linear_attention_step`: the recurrent form (Katharopoulos et al. section 3.4, the RNN with
  S_i = S_{i-1} + φ(k_i) v_iᵀ, z_i = z_{i-1} + φ(k_i)), one token at a time, for decode.
- `projected_elu_linear_attention`: the qkv projection, φ = elu + 1 and the parallel or chunked
  form in one autograd node that saves φ(q), φ(k), v only (the layer's fast path; the forms above
  are its reference in the tests).

The denominator rides along as an extra column of ones appended to v, so numerator and
denominator come out of the same matmul: the state is (m, d+1), its last column is z.

Feature maps:
- `elu_feature_map`: elu(x) + 1 (Katharopoulos et al. section 3.2.1).
- FAVOR+ (Choromanski et al. 2021, arXiv:2009.14794, section 2.3, Lemma 1): positive random
  features φ(x) = exp(ωᵀx − |x|²/2) / √m with ω drawn from orthogonal blocks
  (`orthogonal_gaussian`, section 2.4), estimating the softmax kernel exp(qᵀk).
- `relu_feature_map`: generalized attention with f = ReLU (section 2.2 / appendix).

Shapes: features (B, H, N, m), values (B, H, N, d). Features must be non-negative; positions
whose key features are zero (padding) contribute nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .blocks import pad_to_multiple

DEFAULT_CHUNK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype linear attention runs in: at least float32 (sums over N overflow fp16)."""
    return torch.promote_types(dtype, torch.float32)


KEEP_BF16: bool | None = None  # None: automatic (`keeps_bf16`); True / False: forced (tests)


def keeps_bf16(x: torch.Tensor) -> bool:
    """True where a kernelised layer's forward computes in bf16, not `compute_dtype`: bf16 input
    on CUDA (or anywhere, with KEEP_BF16 True). There the layers are bound by memory bandwidth and
    float32 features and sums move twice the bytes: by the operator count of a forward + backward
    (`bench/traffic.py`, N = 16384, H100 prices) linear_transformer 1.13 -> 0.77 ms, causal
    4.32 -> 1.29, performer 2.57 -> 1.49, causal 4.33 -> 2.45. bf16 cannot overflow (float32's
    exponent range) and GEMMs accumulate in float32. Measured against float64: causal
    linear_transformer's output is off by 0.39% at N = 8k and 64k (bf16 FlashAttention: 0.35%),
    performer's by 0.6% (causal 1.1%) of its own float64 value at N = 4096, next to FAVOR+'s 22%
    (32%) from softmax attention there. Decode keeps float32 state: a bf16 running sum would drop
    small updates."""
    if x.dtype != torch.bfloat16:
        return False
    return x.is_cuda if KEEP_BF16 is None else KEEP_BF16


def normaliser_ok(den: torch.Tensor) -> torch.Tensor:
    """Where a linear-attention normaliser can be divided by: above the square root of the
    smallest normal number, so that its square (in the division's gradient) is normal too. Below
    it (rows with nothing to attend to, or FAVOR+ at attention logits of thousands, whose
    features overlap by less than 1e-19) the row is not divided: its output is the numerator,
    at most 1e-19 max |v|, with finite gradients, where dividing gave inf·0 = NaN ones."""
    return den > torch.finfo(den.dtype).tiny ** 0.5


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator where `normaliser_ok`, else the numerator (about 0)."""
    ok = normaliser_ok(denominator)
    return numerator / torch.where(ok, denominator, torch.ones_like(denominator))


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """(..., N, d) -> (..., N, d+1): a column of ones appended, for the denominator."""
    return F.pad(v, (0, 1), value=1.0)


# ------------------------------------------------------------------------------ feature maps
def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020, section 3.2.1)."""
    return F.elu(x) + 1.0


def orthogonal_gaussian(m: int, d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(m, d) random features ω: stacked orthogonal blocks (QR of Gaussian d × d matrices) with
    row norms drawn from the chi(d) distribution of Gaussian vectors, so each row is marginally
    N(0, I_d) while rows within a block are exactly orthogonal (Choromanski et al. section 2.4).
    Draws from torch's global RNG: torch.manual_seed reproduces it."""
    gaussian = torch.randn(math.ceil(m / d), d, d, device=device, dtype=torch.float32)
    q, r = torch.linalg.qr(gaussian)                       # batched over blocks
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # sign fix: Haar, unbiased
    omega = q.transpose(-1, -2).reshape(-1, d)[:m]          # rows orthonormal within a block
    norms = torch.randn(m, d, device=device, dtype=torch.float32).norm(dim=1, keepdim=True)
    return (omega * norms).to(dtype)


def _favor_exponents(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """ωᵀx' (B, H, N, m) with x' = x d^-¼, so that exp(qᵀk/√d) = exp(q'ᵀk')."""
    return torch.matmul(x * x.shape[-1] ** -0.25, omega.T.to(x.dtype))


def softmax_feature_map(x: torch.Tensor, omega: torch.Tensor, is_query: bool,
                        key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """FAVOR+ positive features of x (B, H, N, d) -> (B, H, N, m), for the kernel exp(qᵀk / √d).

    The exponent is stabilised by subtracting a constant that cancels in the attention ratio:
    - queries: a per-position max over features of ωᵀq (scales φ(q_i) by c_i, which cancels
      between numerator and denominator of row i; the |q|²/2 term cancels the same way and is
      dropped). Strictly causal.
    - keys (non-causal use): one max over every real key and feature (per batch and head);
      padded keys (key_mask False) get exactly zero features before the max, so padding never
      moves it. Causal keys take `softmax_key_features`: a max over later keys would leak them.
    Stabilisers are detached (they cancel, so their gradient is zero anyway).
    """
    m = omega.shape[0]
    proj = _favor_exponents(x, omega)                # (B, H, N, m)
    if is_query:
        shift = proj.amax(dim=-1, keepdim=True).detach()
        return torch.exp(proj - shift) * m ** -0.5
    proj = _key_exponents(proj, x, key_mask)
    shift = proj.amax(dim=(-1, -2), keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return torch.exp(proj - shift) * m ** -0.5


def _key_exponents(proj: torch.Tensor, x: torch.Tensor, key_mask) -> torch.Tensor:
    """ωᵀk' − |k'|²/2, −inf at padded keys (exp gives 0 with a zero, not NaN, gradient)."""
    proj = proj - 0.5 * x.square().sum(dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    if key_mask is not None:
        proj = proj.masked_fill(~key_mask[:, None, :, None], float("-inf"))
    return proj


LOG_SCALE_FLOOR = -1e30  # the log-scale of keys that carry nothing (padding): never a maximum


def softmax_key_features(x: torch.Tensor, omega: torch.Tensor,
                         key_mask: torch.Tensor | None = None):
    """FAVOR+ key features for causal attention, each key stabilised by itself:
    x (B, H, N, d) -> (ψ (B, H, N, m), log-scale μ (B, H, N)) with φ(k_j) = exp(μ_j) ψ_j,
    μ_j = max over features of ωᵀk_j' − |k_j'|²/2 (detached), so max ψ_j = 1/√m for every key.

    No shared constant: a key's features never depend on another key (strictly causal) and never
    underflow because of one. The forms with `key_log_scale` (`causal_linear_attention`,
    `linear_attention_step`) weigh keys by exp(μ_j − s_i), s_i the running max of μ up to query i,
    which is at most 1: exact for any spread of key norms that float32 exp can express relative to
    the running max. Padded keys: ψ = 0, μ = LOG_SCALE_FLOOR.
    """
    m = omega.shape[0]
    proj = _key_exponents(_favor_exponents(x, omega), x, key_mask)          # (B, H, N, m)
    log_scale = proj.amax(dim=-1).detach().clamp_min(LOG_SCALE_FLOOR)       # (B, H, N), -inf: floor
    return torch.exp(proj - log_scale[..., None]) * m ** -0.5, log_scale


def relu_feature_map(x: torch.Tensor, omega: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Generalized attention with f = ReLU: φ(x) = (relu(ωᵀx d^-¼) + eps) / √m
    (Choromanski et al. section 2.2; eps keeps every denominator positive)."""
    d, m = x.shape[-1], omega.shape[0]
    proj = torch.matmul(x * d ** -0.25, omega.T.to(x.dtype))
    return (F.relu(proj) + eps) * m ** -0.5


def mask_features(phi_k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the key features of padded positions: key_mask (B, N), True = real."""
    if key_mask is None:
        return phi_k
    return torch.where(key_mask[:, None, :, None], phi_k, torch.zeros_like(phi_k))


# ------------------------------------------------------------------------- the three forms
def linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Parallel non-causal form: (B,H,N,m), (B,H,M,m), (B,H,M,d) -> (B,H,N,d)."""
    kv = torch.matmul(phi_k.transpose(-1, -2), with_ones(v))   # (B, H, m, d+1)
    out = torch.matmul(phi_q, kv)                              # (B, H, N, d+1)
    return safe_divide(out[..., :-1], out[..., -1:])


def causal_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                            chunk_size: int = DEFAULT_CHUNK, state=None,
                            return_state: bool = False, key_log_scale: torch.Tensor | None = None):
    """Chunked causal form: output i = Σ_{j≤i} (φq_i·φk_j) v_j / Σ_{j≤i} φq_i·φk_j.

    phi_q, phi_k (B, H, N, m), v (B, H, N, d); `state` (B, H, m, d+1): Σ φ(k) [v, 1] over tokens
    before this call (decode), or None. Returns out (B, H, N, d) [, new state (B, H, m, d+1)].
    key_log_scale (B, H, N): the keys' features are exp(μ_j) phi_k_j (`softmax_key_features`);
    then the state is a pair (S (B, H, m, d+1), r (B, H)) holding Σ exp(μ_j − r) phi_k_j [v_j, 1]
    with r the largest μ so far (`_scaled_causal_parts`).
    """
    n, d = v.shape[-2], v.shape[-1]
    c = max(1, min(chunk_size, n))
    vv = with_ones(v)
    q, _ = pad_to_multiple(phi_q, c)    # padded keys have zero features: they add nothing
    k, _ = pad_to_multiple(phi_k, c)
    vv, _ = pad_to_multiple(vv, c)
    b, h, npad, m = q.shape
    nc = npad // c
    q = q.view(b, h, nc, c, m)
    k = k.view(b, h, nc, c, m)
    vv = vv.view(b, h, nc, c, d + 1)
    tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    if key_log_scale is not None:
        out, final = _scaled_causal_parts(q, k, vv, key_log_scale, tril, state)
    else:
        # inside chunks: explicit causal product                             (B, H, nc, C, C)
        scores = torch.matmul(q, k.transpose(-1, -2))
        out = torch.matmul(scores.masked_fill(~tril, 0.0), vv)             # (B, H, nc, C, d+1)
        # across chunks: exclusive prefix sum of per-chunk states           (B, H, nc, m, d+1)
        chunk_states = torch.matmul(k.transpose(-1, -2), vv)
        inclusive = chunk_states.cumsum(dim=2)
        prefix = inclusive - chunk_states
        if state is not None:
            prefix = prefix + state[:, :, None].to(prefix.dtype)
        out = out + torch.matmul(q, prefix)
        final = inclusive[:, :, -1] if state is None else inclusive[:, :, -1] + state.to(inclusive.dtype)
    out = out.reshape(b, h, npad, d + 1)[:, :, :n]
    result = safe_divide(out[..., :-1], out[..., -1:])
    return (result, final) if return_state else result


def _scaled_causal_parts(q, k, vv, log_scale, tril, state):
    """The chunked causal sums with key log-scales μ (B, H, N), every term relative to a running
    max so that no weight exceeds 1 and the largest key so far weighs exactly 1.

    q, k (B, H, nc, C, m), vv (B, H, nc, C, d+1); state None or (S, r). Query i divides its row
    by exp(s_i), s_i = max(r, μ_0..μ_i) (cummax: causal). Inside a chunk the weight of key j is
    (φq_i·ψ_j) exp(μ_j − s_i); across chunks each chunk's state U_c = Σ_{j∈c} exp(μ_j − t_c) ψ_j
    [v_j, 1] is taken at its own max t_c, the prefix before chunk c at r_c = max(r, t_0..t_{c−1})
    through the (nc × nc) weights exp(t_c' − r_c), c' < c, and reaches query i as exp(r_c − s_i).
    Returns (out (B, H, nc, C, d+1) in the rows' scales, final state (S, r))."""
    b, h, nc, c, _ = q.shape
    mu = log_scale.to(q.dtype)
    mu = torch.nn.functional.pad(mu, (0, nc * c - mu.shape[-1]), value=LOG_SCALE_FLOOR)
    r0 = None if state is None else state[1].to(q.dtype)                     # (B, H)
    s = torch.cummax(mu, dim=-1).values                                      # (B, H, Np)
    if r0 is not None:
        s = torch.maximum(s, r0[..., None])
    mu, s = mu.view(b, h, nc, c), s.view(b, h, nc, c)
    # inside chunks: weights exp(μ_j − s_i) for j ≤ i                        (B, H, nc, C, C)
    rel = (mu[..., None, :] - s[..., :, None]).masked_fill(~tril, float("-inf"))
    out = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * rel.exp(), vv)
    # across chunks
    top = mu.amax(dim=-1)                                                    # t_c (B, H, nc)
    key_weights = (mu - top[..., None]).exp()[..., None]                     # (B, H, nc, C, 1)
    chunk_states = torch.matmul(k.transpose(-1, -2), vv * key_weights)      # on d+1, not m
    floor = torch.full_like(top[..., :1], LOG_SCALE_FLOOR) if r0 is None else r0[..., None]
    ref = torch.cat([floor, torch.cummax(top, dim=-1).values[..., :-1]], dim=-1)   # r_c
    ref = torch.maximum(ref, floor)
    before = torch.ones(nc, nc, dtype=torch.bool, device=q.device).tril(-1)
    weights = (top[..., None, :] - ref[..., :, None]).masked_fill(~before, float("-inf")).exp()
    prefix = torch.matmul(weights, chunk_states.flatten(-2)).view_as(chunk_states)  # (B, H, nc, m, d+1)
    last = torch.maximum(top.amax(dim=-1), floor[..., 0])                    # final r (B, H)
    final = torch.matmul((top - last[..., None]).exp()[..., None, :], chunk_states.flatten(-2))
    final = final.view_as(chunk_states[:, :, 0])
    if r0 is not None:
        prefix = prefix + (r0[..., None] - ref).exp()[..., None, None] * state[0][:, :, None].to(q.dtype)
        final = final + (r0 - last).exp()[..., None, None] * state[0].to(q.dtype)
    out = out + torch.matmul(q, prefix) * (ref[..., None] - s).exp()[..., None]
    return out, (final, last)


def linear_attention_step(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                          state=None, key_log_scale: torch.Tensor | None = None):
    """Recurrent form, one token: phi_q, phi_k (B, H, 1, m), v (B, H, 1, d), state (B, H, m, d+1)
    -> (out (B, H, 1, d), new state). The state's size does not depend on the length seen.
    key_log_scale (B, H, 1): the key's features are exp(μ) phi_k; the state is then (S, r), S
    relative to r, the largest μ so far (see `causal_linear_attention`)."""
    if key_log_scale is None:
        update = torch.matmul(phi_k.transpose(-1, -2), with_ones(v))  # (B, H, m, d+1)
        state = update if state is None else state + update
        out = torch.matmul(phi_q, state)
        return safe_divide(out[..., :-1], out[..., -1:]), state
    # S' = e^(r_old − r) S + e^(μ − r) φ_kᵀ [v, 1], the key's factor on its m features
    mu = key_log_scale[..., 0].to(phi_k.dtype)                        # (B, H)
    r = mu if state is None else torch.maximum(state[1].to(mu.dtype), mu)
    scaled_k = phi_k * (mu - r).exp()[..., None, None]
    s = torch.matmul(scaled_k.transpose(-1, -2), with_ones(v))
    if state is not None:
        s = s.add_(state[0] * (state[1] - r).exp()[..., None, None])
    out = torch.matmul(phi_q, s)
    return safe_divide(out[..., :-1], out[..., -1:]), (s, r)


def recurrent_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                               state=None, key_log_scale: torch.Tensor | None = None):
    """The RNN over a whole sequence, token by token (reference for tests and short decodes)."""
    outs = []
    for i in range(v.shape[-2]):
        scale = None if key_log_scale is None else key_log_scale[..., i:i + 1]
        y, state = linear_attention_step(phi_q[..., i:i + 1, :], phi_k[..., i:i + 1, :],
                                         v[..., i:i + 1, :], state, scale)
        outs.append(y)
    return torch.cat(outs, dim=-2), state


def naive_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                           allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Oracle: the (N × M) matrix φ(q)φ(k)ᵀ, restricted to `allowed`, row-normalised, times v."""
    a = torch.matmul(phi_q, phi_k.transpose(-1, -2))
    if allowed is not None:
        a = a.masked_fill(~allowed, 0.0)
    return safe_divide(torch.matmul(a, v), a.sum(dim=-1, keepdim=True))
