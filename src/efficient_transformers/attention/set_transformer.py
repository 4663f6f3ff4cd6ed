"""`set_transformer`: Lee et al. 2019, "Set Transformer" (arXiv:1810.00825).

Building blocks (section 3.1-3.2), used by the set model in models/sets.py:
- MAB(X, Y) = LN(H + rFF(H)), H = LN(X + Multihead(X, Y, Y))   (eq. 6-7)
- SAB(X) = MAB(X, X)                                              (eq. 8)
- ISAB_m(X) = MAB(X, H), H = MAB(I, X) with m inducing points I   (eq. 9-10), O(N·m)
- PMA_k(Z) = MAB(S, rFF(Z)) with k learned seeds S                (eq. 11)

The registered attention layer is ISAB's attention for a pre-LN transformer block (which brings
its own residual and feed-forward): y = Multihead(X, H, H) with H = MAB(I, X), so the layer costs
O(N·m) with m = `num_inducing` and never forms an N × N tensor. Padded elements (mask False) are
excluded as keys from MAB(I, X), so they never change the outputs of real elements; the layer is
permutation-equivariant. No decode (survey Table 1).

Both of the layer's attentions have one short side (m rows), so `MultiheadAttention` folds that
side's projections into the long side's GEMMs (functional/folded_cross.py) where a FLOP count
says it is less work: the same function, with `MultiheadAttention.unfolded` as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.folded_cross import (KEYS, QUERIES, fold_choice, key_folded_attention,
                                       query_folded_attention, real_or_all)
from ..registry import register
from .base import Attention, check_positive_int


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, N, d) attends to k, v (B, H, M, d); key_mask (B, M), True = real key.
    A batch row with no real key attends to all keys (it has no real output to protect)."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    allowed = real_or_all(key_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :])


class MultiheadAttention(nn.Module):
    """Multihead(X, Y, Y): X (B, N, dim) queries, Y (B, M, dim) keys and values.

    With few keys (ISAB's Multihead(X, H, H)) or few queries (MAB(I, X) inside it) the forward
    folds the projections of one side into the other side's GEMMs (functional/folded_cross.py):
    the same function with fewer multiply-adds, chosen by `fold_choice`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def split(self, t):  # (B, N, H*d) -> (B, H, N, d)
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x, y, key_mask=None, folded: bool | None = None):
        """key_mask (B, M), True = real key. `folded`: None picks the form with the fewest
        multiply-adds, True the cheaper folded form, False the unfolded reference."""
        form = fold_choice(x.shape[1], y.shape[1], x.shape[2], self.heads, folded)
        if form is None:
            return self.unfolded(x, y, key_mask)
        if form == QUERIES:  # few keys: q and output projections absorbed into k and v
            k, v = self.to_kv(y).chunk(2, dim=-1)                          # (B, M, dim) each
            return query_folded_attention(x, k, v, self.heads, self.to_q.weight, self.to_q.bias,
                                          self.to_out.weight, self.to_out.bias, key_mask)
        assert form == KEYS  # few queries: k and v projections absorbed into q
        wk, wv = self.to_kv.weight.chunk(2)
        bv = None if self.to_kv.bias is None else self.to_kv.bias.chunk(2)[1]
        out = key_folded_attention(self.to_q(x), y, self.heads, wk, wv, bv, key_mask)
        return self.to_out(out)                                             # (B, N, dim)

    def unfolded(self, x, y, key_mask=None):
        """The reference form: project q, k, v, attend per head, project the merged heads."""
        q = self.split(self.to_q(x))
        k, v = [self.split(t) for t in self.to_kv(y).chunk(2, dim=-1)]
        out = cross_attention(q, k, v, key_mask)
        return self.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MAB(nn.Module):
    """Multihead attention block MAB(X, Y) (eq. 6-7); `layer_norm=False` drops both LNs."""

    def __init__(self, dim: int, heads: int, hidden: int | None = None, layer_norm: bool = True):
        super().__init__()
        self.attention = MultiheadAttention(dim, heads)
        hidden = hidden or dim
        self.rff = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm1 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if layer_norm else nn.Identity()

    def forward(self, x, y, key_mask=None):
        h = self.norm1(x + self.attention(x, y, key_mask))
        return self.norm2(h + self.rff(h))


class InducingPoints(nn.Module):
    """H = MAB(I, X): m learned inducing points summarise the set X (B, N, dim) -> (B, m, dim)."""

    def __init__(self, dim: int, heads: int, num_inducing: int, hidden: int | None = None,
                 layer_norm: bool = True):
        super().__init__()
        self.points = nn.Parameter(torch.randn(1, num_inducing, dim) * dim ** -0.5)
        self.mab = MAB(dim, heads, hidden, layer_norm)

    def forward(self, x, key_mask=None):
        points = self.points.expand(x.shape[0], -1, -1).to(x.dtype)
        return self.mab(points, x, key_mask)


@register("set_transformer")
class InducedSetAttention(Attention):
    """Options: `num_inducing` (m inducing points), `layer_norm` (inside MAB(I, X))."""

    small_options = {"num_inducing": 4}

    def __init__(self, dim: int, heads: int, causal: bool = False, num_inducing: int = 64,
                 layer_norm: bool = True):
        super().__init__(dim, heads, causal)
        self.num_inducing = check_positive_int("num_inducing", num_inducing)
        if not isinstance(layer_norm, bool):
            raise ValueError(f"layer_norm: expected True or False, got {layer_norm!r}")
        self.inducing = InducingPoints(dim, heads, num_inducing, layer_norm=layer_norm)
        self.attention = MultiheadAttention(dim, heads)

    def attend(self, x, mask):
        summary = self.inducing(x, mask)      # (B, m, dim), padded elements excluded
        return self.attention(x, summary)     # (B, N, dim), O(N·m)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_inducing={self.num_inducing}"
