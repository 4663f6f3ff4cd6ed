"""`synthesizer`: Tay et al. 2021, "Synthesizer: Rethinking Self-Attention in Transformer Models"
(arXiv:2005.00743).

Attention weights are synthesized instead of computed from query-key dot products (section 3):
- "dense" (section 3.1): B_i = W_2 relu(W_1 x_i + b_1) + b_2 ∈ R^ℓ, from token i alone;
- "random" (section 3.2): B = R ∈ R^{ℓ×ℓ}, input independent, trainable or fixed (`trainable`);
- "factorized_dense" (section 3.3): B_i = H_A(A_i) ⊙ H_B(B_i) with A_i ∈ R^a, B_i ∈ R^b, a·b ≥ ℓ,
  each tiled to length ℓ (`functional.lowrank.tile_product`);
- "factorized_random" (section 3.3): R = R_1 R_2ᵀ with R_1, R_2 ∈ R^{ℓ×k} (option `k`);
- mixtures (section 3.4), written with "+", e.g. "dense+vanilla", "random+vanilla",
  "dense+random": softmax(Σ α_c B_c) with learnable α (a softmax over per-component logits, so
  Σ α = 1); "vanilla" is scaled dot-product attention q kᵀ/√d.
Output: softmax(B) G(x) with G a linear value projection, per head. ℓ = `max_len`: a query at
position i uses columns 0..N-1 (the leading ones) of its synthesized row.

Causal: the synthesized weights are masked to j ≤ i before the softmax (the dense row of token i
depends on x_i only, the random rows on nothing). Decode is exact: a cache of values (and keys for
"vanilla") and, per new token, its synthesized row over the cached positions.
Cost: O(N·ℓ) weights, O(N²) as the survey says; random variants hold H·ℓ² parameters.

Fast path for the low-rank components (dense, factorized_random, vanilla, and mixtures of them):
each one's logits are a product of per-query and per-key features, dense H W_2ᵀ + b_2 = [H, 1]
[W_2, b_2]ᵀ (rank d + 1), factorized random R_1 R_2ᵀ, vanilla q kᵀ/√d; a mixture concatenates
the features, with α folded into the query side. So softmax(B) G(x) is one
`scaled_dot_product_attention` call (scale 1, features and values zero-padded to one width, a
multiple of 8): FlashAttention, O(N) memory, the causal half skipped. "random" and
"factorized_dense" are full rank in ℓ: their logits are materialised (`logits`, also the reference
for the fast path and the decode step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.dense import causal_allowed, dense_allowed, sdpa_attention
from ..functional.lowrank import synthesized_attention, tile_product
from ..registry import register
from .base import Attention, check_positive_int

COMPONENTS = ("dense", "random", "factorized_dense", "factorized_random", "vanilla")
LOW_RANK = frozenset({"dense", "factorized_random", "vanilla"})   # logits = query · key features
VARIANTS = ("dense", "random", "factorized_dense", "factorized_random", "dense+vanilla",
            "random+vanilla", "factorized_dense+vanilla", "factorized_random+vanilla",
            "dense+random", "dense+random+vanilla")  # documented examples; any "+" mix is valid


def parse_variant(variant) -> tuple[str, ...]:
    """'dense+vanilla' -> ('dense', 'vanilla'), validated."""
    if not isinstance(variant, str):
        raise ValueError(f"variant: expected a string such as one of {list(VARIANTS)}, got {variant!r}")
    parts = tuple(variant.split("+"))
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or len(set(parts)) != len(parts) or parts == ("vanilla",):
        raise ValueError(f"variant: expected components from {list(COMPONENTS)} joined by '+', "
                         f"each at most once and not 'vanilla' alone (that is 'transformer'), "
                         f"e.g. {list(VARIANTS)}; got {variant!r}")
    return parts


@register("synthesizer")
class SynthesizerAttention(Attention):
    """Options: `variant` (see module doc), `max_len` (ℓ), `k` (rank of "factorized_random"),
    `trainable` (False: the random matrices are a fixed buffer)."""

    small_options = {"variant": "dense+random+vanilla", "max_len": 64}

    def __init__(self, dim: int, heads: int, causal: bool = False, variant: str = "dense",
                 max_len: int = 4096, k: int = 8, trainable: bool = True):
        super().__init__(dim, heads, causal)
        self.components = parse_variant(variant)
        self.variant = variant
        self.max_len = check_positive_int("max_len", max_len)
        self.k = check_positive_int("k", k)
        if not isinstance(trainable, bool):
            raise ValueError(f"trainable: expected True or False, got {trainable!r}")
        self.trainable = trainable
        h, d, ell = heads, self.head_dim, max_len
        parts = self.components
        if "dense" in parts or "factorized_dense" in parts:
            self.hidden = nn.Linear(dim, dim)  # W_1, b_1 (heads split after it)
        if "dense" in parts:
            self.w_dense = nn.Parameter(torch.randn(h, d, ell) / math.sqrt(d))
            self.b_dense = nn.Parameter(torch.zeros(h, ell))
        if "factorized_dense" in parts:
            self.a = math.ceil(math.sqrt(ell))
            self.b = math.ceil(ell / self.a)
            self.w_fa = nn.Parameter(torch.randn(h, d, self.a) / math.sqrt(d))
            self.w_fb = nn.Parameter(torch.randn(h, d, self.b) / math.sqrt(d))
            self.b_fa = nn.Parameter(torch.zeros(h, self.a))
            self.b_fb = nn.Parameter(torch.ones(h, self.b))
        if "random" in parts:
            self.add_random("r", torch.randn(h, ell, ell))
        if "factorized_random" in parts:
            self.add_random("r1", torch.randn(h, ell, self.k) * self.k ** -0.25)
            self.add_random("r2", torch.randn(h, ell, self.k) * self.k ** -0.25)
        if "vanilla" in parts:
            self.to_qk = nn.Linear(dim, 2 * dim)
        self.mix = nn.Parameter(torch.zeros(len(parts))) if len(parts) > 1 else None
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def add_random(self, name: str, value: torch.Tensor) -> None:
        if self.trainable:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    # ------------------------------------------------------------------------------ logits
    def logits(self, x: torch.Tensor, offset: int, keys: torch.Tensor | None,
               n_keys: int) -> torch.Tensor:
        """Synthesized (and dot-product) logits of queries at positions offset..offset+T-1
        over key positions 0..n_keys-1: (B, H, T, n_keys). `keys` (B, H, n_keys, d) for vanilla."""
        b, t, _ = x.shape
        rows = slice(offset, offset + t)
        terms = []
        hidden = None
        if "dense" in self.components or "factorized_dense" in self.components:
            hidden = self.split_heads(torch.relu(self.hidden(x)))            # (B, H, T, d)
        for part in self.components:
            if part == "dense":
                w = self.w_dense[..., :n_keys]
                terms.append(torch.matmul(hidden, w) + self.b_dense[:, None, :n_keys])
            elif part == "factorized_dense":
                fa = torch.matmul(hidden, self.w_fa) + self.b_fa[:, None]    # (B, H, T, a)
                fb = torch.matmul(hidden, self.w_fb) + self.b_fb[:, None]    # (B, H, T, b)
                terms.append(tile_product(fa, fb, n_keys))
            elif part == "random":
                terms.append(self.r[:, rows, :n_keys].expand(b, -1, -1, -1))
            elif part == "factorized_random":
                r = torch.matmul(self.r1[:, rows], self.r2[:, :n_keys].transpose(-1, -2))
                terms.append(r.expand(b, -1, -1, -1))
            else:  # vanilla
                q = self.split_heads(self.to_qk(x)[..., : self.dim])
                terms.append(torch.matmul(q, keys.transpose(-1, -2)) / math.sqrt(self.head_dim))
        if self.mix is None:
            return terms[0].to(x.dtype)
        alpha = self.mix.softmax(dim=0)
        return sum(a * term for a, term in zip(alpha, terms)).to(x.dtype)

    def keys(self, x: torch.Tensor) -> torch.Tensor | None:
        if "vanilla" not in self.components:
            return None
        return self.split_heads(self.to_qk(x)[..., self.dim:])

    @property
    def low_rank(self) -> bool:
        """True where every component's logits factor into query and key features."""
        return LOW_RANK.issuperset(self.components)

    def features(self, x: torch.Tensor):
        """Query and key features of the low-rank components over positions 0..N-1,
        (B, H, N, f) each, with Σ over features = the mixed logits of `logits` (α on the query side):
        dense [H, 1]·[W_2, b_2], factorized random R_1·R_2, vanilla (q/√d)·k."""
        b, n, _ = x.shape
        h = self.heads
        alpha = None if self.mix is None else self.mix.softmax(dim=0)
        queries, keys = [], []
        for c, part in enumerate(self.components):
            if part == "dense":
                hidden = self.split_heads(torch.relu(self.hidden(x)))           # (B, H, N, d)
                qf = torch.cat([hidden, hidden.new_ones(b, h, n, 1)], dim=-1)    # (B, H, N, d+1)
                kf = torch.cat([self.w_dense[..., :n].transpose(-1, -2),
                                self.b_dense[:, :n, None]], dim=-1)              # (H, N, d+1)
            elif part == "factorized_random":
                qf, kf = self.r1[:, :n], self.r2[:, :n]                          # (H, N, k)
            else:  # vanilla
                q, k = self.to_qk(x).chunk(2, dim=-1)
                qf, kf = self.split_heads(q) / math.sqrt(self.head_dim), self.split_heads(k)
            if alpha is not None:
                qf = qf * alpha[c]
            queries.append(qf.to(x.dtype).expand(b, h, n, -1))
            keys.append(kf.to(x.dtype).expand(b, h, n, -1))
        return torch.cat(queries, dim=-1), torch.cat(keys, dim=-1)

    # ------------------------------------------------------------------------------ public
    def attend(self, x, mask):
        if self.low_rank:
            return self.attend_low_rank(x, mask)
        return self.attend_reference(x, mask)

    def attend_low_rank(self, x, mask):
        """One scaled_dot_product_attention call over the components' features (module doc)."""
        d = self.head_dim
        qf, kf = self.features(x)
        v = self.split_heads(self.to_v(x))                                       # (B, H, N, d)
        width = -(-max(qf.shape[-1], d) // 8) * 8
        qf, kf, v = (F.pad(t, (0, width - t.shape[-1])) for t in (qf, kf, v))
        out = sdpa_attention(qf, kf, v, self.causal, mask, scale=1.0)[..., :d]
        return self.to_out(self.merge_heads(out))

    def attend_reference(self, x, mask):
        """The synthesized logits materialised (B, H, N, N), masked, softmax, times G(x)."""
        n = x.shape[1]
        v = self.split_heads(self.to_v(x))
        logits = self.logits(x, 0, self.keys(x), n)
        allowed = dense_allowed(n, self.causal, mask, device=x.device)
        if mask is not None:  # padded queries see everything so no row is empty
            allowed = allowed | ~mask[:, None, :, None]
        out = synthesized_attention(logits, v, allowed)
        return self.to_out(self.merge_heads(out))

    def decode_step(self, x_new, state):
        offset = 0 if state is None else state["length"]
        v, keys = self.split_heads(self.to_v(x_new)), self.keys(x_new)
        if state is not None:
            v = torch.cat([state["v"], v], dim=2)
            if keys is not None:
                keys = torch.cat([state["k"], keys], dim=2)
        total = v.shape[2]
        logits = self.logits(x_new, offset, keys, total)
        allowed = causal_allowed(x_new.shape[1], total, offset=offset, device=x_new.device)
        out = synthesized_attention(logits, v, allowed)
        new_state = {"v": v, "length": total}
        if keys is not None:
            new_state["k"] = keys
        return self.to_out(self.merge_heads(out)), new_state

    def extra_repr(self) -> str:
        return super().extra_repr() + f", variant={self.variant!r}, max_len={self.max_len}"
