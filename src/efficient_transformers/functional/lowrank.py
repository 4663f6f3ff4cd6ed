"""Low-rank pieces: Linformer's length projections and the Synthesizer's synthesized weights.

- `project_length`: Linformer (Wang et al. 2020, arXiv:2006.04768, section 4, eq. 7): keys and
  values (n × d) are projected along the length by E, F (k × n) to (k × d). Inputs shorter than the
  projection's n use its leading columns; padded positions are zeroed first, so they add nothing.
- `tile_product`: the factorized Dense Synthesizer (Tay et al. 2021, arXiv:2005.00743,
  section 3.3): C = H_A(A) ⊙ H_B(B) with A ∈ R^a repeated b times and B ∈ R^b repeated a times.
- `synthesized_attention`: softmax of given logits, restricted to `allowed`, times v.
"""

from __future__ import annotations

import torch

from .dense import masked_softmax


def project_length(t: torch.Tensor, proj: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """t (B, H, N, d), proj (k, L) or (H, k, L) with L >= N -> (B, H, k, d) = proj[..., :N] @ t.

    key_mask (B, N), True = real: padded rows of t are zeroed before projecting."""
    n = t.shape[-2]
    if key_mask is not None:
        t = torch.where(key_mask[:, None, :, None], t, torch.zeros_like(t))
    e = proj[..., :n].to(t.dtype)
    if e.dim() == 3:
        e = e[None]  # (1, H, k, N)
    return torch.matmul(e, t)


def tile_product(a: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    """a (..., p), b (..., q) with p·q >= length -> (..., length):
    c[i·q + j] = a[i] · b[j] (A tiled along B and B along A), truncated to `length`."""
    c = a[..., :, None] * b[..., None, :]       # (..., p, q)
    return c.flatten(-2)[..., :length]


def synthesized_attention(logits: torch.Tensor, v: torch.Tensor,
                          allowed: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, H, N, M) (synthesized and/or dot-product), v (B, H, M, d) -> (B, H, N, d).
    Rows with no allowed key give 0."""
    return torch.matmul(masked_softmax(logits, allowed), v)
