"""Transformer-XL relative positional attention scores (Dai et al. 2019, arXiv:1901.02860).

Section 3.3 writes the score of query i against key j as

    A_ij = (q_i + u)·k_j  +  (q_i + v)·r_{i-j}          [terms (a)+(c) and (b)+(d)]

with k_j = W_{k,E} x_j, r_{i-j} = W_{k,R} R_{i-j}, R the sinusoid of the *relative* distance
i - j (no absolute positions anywhere), and u, v learned per-head biases. Appendix B computes
the position term for every (i, j) pair with one matmul against the R + M - 1 distinct distances
followed by a "relative shift" (a reshape that skews each row), instead of materialising an
embedding per pair. `relative_shift` is that shift; `naive_relative_scores` builds r_{i-j} for
every pair explicitly and is the reference the shift is tested against.

Shapes: q (..., R, d) query rows; k (..., W, d) keys; u, v broadcastable to q; rk (..., C, d)
projected relative embeddings with C = R + W - 1 (column c = distance d_top - c, descending).
"""

from __future__ import annotations

import math

import torch


def sinusoid_relative(distances: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    """(C,) distances (any sign) -> (C, dim) embeddings [sin(d·f), cos(d·f)] with the frequencies
    f_i = 10000^(-2i/dim) of Vaswani et al. 2017, section 3.5 (Transformer-XL section 3.3)."""
    half = (dim + 1) // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float64, device=distances.device)
                     * (-2.0 * math.log(10000.0) / dim))
    angles = distances.to(torch.float64)[:, None] * freq[None, :]  # (C, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :dim]
    return emb.to(dtype or torch.get_default_dtype())


def shift_distances(rows: int, n_keys: int, d_top: int, device=None) -> torch.Tensor:
    """The R + W - 1 distances `relative_shift` expects, descending from `d_top` (the distance of
    the last query row to key 0)."""
    return d_top - torch.arange(rows + n_keys - 1, device=device)


def relative_shift(pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(..., R, R + W - 1) -> (..., R, W) with out[a, t] = pos[a, R - 1 - a + t].

    pos[a, c] is query row a against distance d_top - c; row a and key t are at distance
    d_top - (R - 1 - a) - t, so out[a, t] is row a against its key t. The skew of Dai et al.,
    appendix B, as a view: in a contiguous pos, entry (a, R - 1 - a + t) lies R - 1 + a·(R + W - 2)
    + t elements in, so the rows are read with stride R + W - 2 from offset R - 1 (no two entries
    shared). No gather, no loop, no copy. (The paper's pad, flatten and slice produced index
    arithmetic that Inductor failed to compile once lengths became dynamic.)
    """
    rows, cols = pos.shape[-2], pos.shape[-1]
    if cols != rows + n_keys - 1:
        raise ValueError(f"pos: expected {rows + n_keys - 1} columns for {rows} rows and "
                         f"{n_keys} keys, got {cols}")
    pos = pos.contiguous()
    return pos.as_strided((*pos.shape[:-2], rows, n_keys), (*pos.stride()[:-2], cols - 1, 1),
                          pos.storage_offset() + rows - 1)


def relative_scores(q: torch.Tensor, k: torch.Tensor, rk: torch.Tensor, u: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
    """(q + u) kᵀ + shift((q + v) rkᵀ): (..., R, W), unscaled. rk as in `relative_shift`."""
    content = torch.matmul(q + u, k.transpose(-1, -2))
    position = relative_shift(torch.matmul(q + v, rk.transpose(-1, -2)), k.shape[-2])
    return content + position


def naive_relative_scores(q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                          q_pos: torch.Tensor, k_pos: torch.Tensor, embed) -> torch.Tensor:
    """The reference: A_ij = (q_i + u)·k_j + (q_i + v)·r(i - j), one embedding per pair.

    q (B, H, R, d), k (B, H, W, d), u and v (H, d); q_pos (R,), k_pos (W,) absolute positions;
    `embed(distances (P,)) -> (H, P, d)` the projected relative embedding. -> (B, H, R, W).
    """
    dist = (q_pos[:, None] - k_pos[None, :]).reshape(-1)  # (R * W,)
    r = embed(dist).reshape(q.shape[1], q_pos.shape[0], k_pos.shape[0], q.shape[-1])  # (H,R,W,d)
    content = torch.einsum("bhrd,bhwd->bhrw", q + u[:, None, :], k)
    position = torch.einsum("bhrd,hrwd->bhrw", q + v[:, None, :], r)
    return content + position
