"""`linear_transformer`: Katharopoulos et al. 2020, "Transformers are RNNs" (arXiv:2006.16236).

Attention with the feature map φ(x) = elu(x) + 1 (section 3.2.1): softmax(q kᵀ) is replaced by
φ(q) φ(k)ᵀ, row-normalised (eq. 4-6). Non-causal: the parallel form, O(N·d²). Causal: the chunked
form of `functional.kernels.causal_linear_attention` (the paper's section 3.3 computes the causal
prefix sums with a custom CUDA kernel; chunking gives the same values with batched matmuls).
Decode: the RNN of section 3.4 with state S = Σ φ(k) vᵀ and z = Σ φ(k), of constant size.

Computation runs in at least float32 (the normaliser z sums N positive terms, which overflows
fp16), then casts back to the input dtype; bf16 input on CUDA computes in bf16 instead
(`functional.kernels.keeps_bf16`, below).

Forward (both forms) runs as `functional.fused_linear.projected_elu_linear_attention`: projection,
feature map and attention in one autograd node (non-causal: all heads at once with the output
projection absorbed, its backward runs once; causal: head by head, chunked, then `to_out`),
saving φ(q), φ(k), v only; decode uses the generic parts of `KernelAttention`. Forward hooks on
`to_qkv` and `to_out` do not fire on that path (their weights are read directly).

bf16 input on CUDA (`keeps_bf16`): `KernelAttention.attend` in bf16 instead, both forms over
all heads at once, unfused. The fused node suits the CPU (memory); on a GPU, bandwidth-bound,
the causal one's per-head loop and float32 inside move twice the bytes of the plain chunked
kernel (`bench/traffic.py`, forward + backward at N = 65536: 19.9 GiB and 10.2 ms estimated on an
H100, against 9.5 GiB and 4.3 ms for the `linear_chunked_causal` reference). Decode keeps
float32 state, so it matches this forward to bf16 precision.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional.amp import autocast_off
from ..functional.fused_linear import projected_elu_linear_attention
from ..functional.kernels import (
    DEFAULT_CHUNK, causal_linear_attention, compute_dtype, elu_feature_map, keeps_bf16,
    linear_attention, linear_attention_step, mask_features,
)
from ..registry import register
from .base import Attention, check_positive_int


class KernelAttention(Attention):
    """Shared parts of the kernelised attentions: projections, the three forms, decode.
    Subclasses define `feature_maps(q, k, key_mask) -> (phi_q, phi_k, key_log_scale)` on
    (B, H, N, d) tensors: the key features are exp(key_log_scale) phi_k, key_log_scale (B, H, N)
    or None (= 0)."""

    def __init__(self, dim: int, heads: int, causal: bool, chunk_size: int):
        super().__init__(dim, heads, causal)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def feature_maps(self, q, k, key_mask):
        raise NotImplementedError

    def qkv(self, x, dtype=None):
        """(B, N, dim) -> q, k, v (B, H, N, d) in `dtype`, by default the compute dtype
        (>= float32)."""
        dtype = dtype or compute_dtype(x.dtype)
        return [t.to(dtype) for t in self.split_projection(self.to_qkv(x), 3)]

    def attend(self, x, mask):
        q, k, v = self.qkv(x, x.dtype if keeps_bf16(x) else None)
        with autocast_off(x):  # the features and sums in the dtype chosen above
            phi_q, phi_k, log_scale = self.feature_maps(q, k, mask)
            phi_k = mask_features(phi_k, mask)
            if self.causal:
                out = causal_linear_attention(phi_q, phi_k, v, chunk_size=self.chunk_size,
                                              key_log_scale=log_scale)
            else:  # (non-causal feature maps give no log-scale)
                out = linear_attention(phi_q, phi_k, v)
        return self.to_out(self.merge_heads(out).to(x.dtype))

    def decode_step(self, x_new, state):
        q, k, v = self.qkv(x_new)
        kv = None if state is None else state["kv"]   # S, or (S, r) with key log-scales
        with autocast_off(x_new):
            phi_q, phi_k, log_scale = self.feature_maps(q, k, None)
            if x_new.shape[1] == 1:  # the RNN step of section 3.4
                out, kv = linear_attention_step(phi_q, phi_k, v, kv, log_scale)
            else:                    # a prompt: the chunked form continued from the state
                out, kv = causal_linear_attention(phi_q, phi_k, v, chunk_size=self.chunk_size,
                                                  state=kv, return_state=True,
                                                  key_log_scale=log_scale)
        length = (0 if state is None else state["length"]) + x_new.shape[1]
        return self.to_out(self.merge_heads(out).to(x_new.dtype)), {"kv": kv, "length": length}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size}"


@register("linear_transformer")
class LinearTransformerAttention(KernelAttention):
    """Options: `chunk_size` (positions per chunk of the causal form; speed only)."""

    small_options = {"chunk_size": 8}
    fused = True  # the fused node (below); False: `KernelAttention.attend`, whose graph takes
    #               several backward passes (retain_graph=True), as the fused node's cannot

    def __init__(self, dim: int, heads: int, causal: bool = False, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(dim, heads, causal, chunk_size)

    def feature_maps(self, q, k, key_mask):
        return elu_feature_map(q), elu_feature_map(k), None

    def attend(self, x, mask):
        if keeps_bf16(x) or torch.compiler.is_compiling() or not self.fused:
            # on CUDA: unfused in bf16 (see the module docstring); torch.compile fuses its own
            return super().attend(x, mask)
        # KernelAttention.attend fused into one autograd node (same values and gradients)
        return projected_elu_linear_attention(x, self.to_qkv.weight, self.to_qkv.bias,
                                              self.heads, self.causal, mask, self.chunk_size,
                                              self.to_out.weight, self.to_out.bias)
