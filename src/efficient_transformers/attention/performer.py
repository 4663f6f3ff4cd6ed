"""`performer`: Choromanski et al. 2021, "Rethinking Attention with Performers" (arXiv:2009.14794).

FAVOR+ (section 2): softmax attention exp(qᵀk/√d) estimated with m = `features` positive random
features φ(x) = exp(ωᵀx − |x|²/2)/√m (Lemma 1) whose ω come in orthogonal blocks (section 2.4).
`kernel="relu"` is generalized attention with f = ReLU (section 2.2). Linear attention then runs in
the parallel form (non-causal) or the chunked prefix-sum form (causal, section 2.5's prefix sums
computed chunk by chunk: no N × m × d cumulative tensor); decode is the constant-memory recurrence.

Random features: drawn at construction from torch's RNG (torch.manual_seed reproduces them) and
kept in the `omega` buffer (saved with the model, as is the count of calls since the last redraw,
`redraw_calls`). In training mode they are redrawn every `redraw_interval` forward calls
(0 = never), as the paper recommends; eval mode never redraws, and decode never redraws (the
state depends on the features). The recompute of activation checkpointing
(torch.utils.checkpoint) is not a call: it keeps the features in use, which are those its
forward used unless the layer ran again, and redrew, before that backward.

Exponent stabilisation (bf16/fp16 safe, strictly causal): queries and non-causal keys by a max
that cancels (`functional.kernels.softmax_feature_map`); causal keys each by their own max,
carried as a log-scale and weighed against the running max of the keys so far
(`softmax_key_features`, `causal_linear_attention(key_log_scale=...)`), so no key's features
depend on a later key and no key of large norm underflows. Features and sums are computed in
float32 or wider, except for bf16 input on CUDA, where they stay bf16
(`functional.kernels.keeps_bf16`: half the bytes; its rounding is small next to FAVOR+'s own
error); decode state is float32 always. The layer computes the features in one autograd node each
(`functional.favor`, exp written in place, φ the only saved tensor); the functions above are
its reference.
"""

from __future__ import annotations

import torch

from ..functional.eager import outside_graphs
from ..functional.favor import fused_softmax_feature_map, fused_softmax_key_features
from ..functional.kernels import orthogonal_gaussian, relu_feature_map
from ..registry import register
from .base import check_choice, check_positive_int, recomputing
from .linear_transformer import KernelAttention

KERNELS = ("softmax", "relu")


def _store_redraw_calls(module: "PerformerAttention", prefix, keep_vars) -> None:
    module.redraw_calls.fill_(module.calls_since_redraw)


def _read_redraw_calls(module: "PerformerAttention", incompatible_keys) -> None:
    module.calls_since_redraw = int(module.redraw_calls)


@register("performer")
class PerformerAttention(KernelAttention):
    """Options: `features` (m random features per head), `kernel` ("softmax" FAVOR+ or "relu"),
    `redraw_interval` (training forward calls between redraws; 0 = never), `chunk_size` (causal
    form; 128 measured fastest on CPU for m = 256 at N = 4096, speed only)."""

    small_options = {"features": 32, "chunk_size": 8}

    def __init__(self, dim: int, heads: int, causal: bool = False, features: int = 256,
                 kernel: str = "softmax", redraw_interval: int = 1000,
                 chunk_size: int = 128):
        super().__init__(dim, heads, causal, chunk_size)
        self.features = check_positive_int("features", features)
        self.kernel = check_choice("kernel", kernel, KERNELS)
        self.redraw_interval = check_positive_int("redraw_interval", redraw_interval, minimum=0)
        self.register_buffer("omega", orthogonal_gaussian(features, self.head_dim))
        self.calls_since_redraw = 0
        # the count in state_dict too (written when one is taken, read back on load), so that a
        # resumed run redraws at the same steps; the int above is the one in use
        self.register_buffer("redraw_calls", torch.zeros((), dtype=torch.long))
        self.register_state_dict_pre_hook(_store_redraw_calls)
        self.register_load_state_dict_post_hook(_read_redraw_calls)

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw new random features from torch's RNG (in place, same device and dtype)."""
        self.omega.copy_(orthogonal_gaussian(self.features, self.head_dim, device=self.omega.device))
        self.calls_since_redraw = 0

    @outside_graphs
    def count_call(self) -> None:
        """Redraw every `redraw_interval` training calls. Outside torch.compile: a changing int
        in the graph would compile the layer again at every call. A recompute (activation
        checkpointing) is not a call: it keeps the features its forward used."""
        if self.training and self.redraw_interval and not recomputing():
            if self.calls_since_redraw >= self.redraw_interval:
                self.redraw()
            self.calls_since_redraw += 1

    def attend(self, x, mask):
        self.count_call()
        return super().attend(x, mask)

    def feature_maps(self, q, k, key_mask):
        omega = self.omega.to(q.dtype)
        if self.kernel == "relu":
            return relu_feature_map(q, omega), relu_feature_map(k, omega), None
        phi_q = fused_softmax_feature_map(q, omega, is_query=True)
        if self.causal:  # each key stabilised by itself, weighed against the running max
            return (phi_q,) + fused_softmax_key_features(k, omega, key_mask)
        return phi_q, fused_softmax_feature_map(k, omega, is_query=False, key_mask=key_mask), None

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", features={self.features}, kernel={self.kernel!r}, "
                f"redraw_interval={self.redraw_interval}")
