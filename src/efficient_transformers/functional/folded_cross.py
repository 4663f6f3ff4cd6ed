"""Multi-head cross-attention with one side's projections folded into the other side's GEMMs.

Multihead(X, Y, Y) with Nq query rows X and M key/value rows Y (both width `dim`, H heads of
width d, scale s = d^-1/2) is, per head h,

    out = Σ_h softmax(s (X Wq_hᵀ + bq_h)(Y Wk_hᵀ + bk_h)ᵀ) (Y Wv_hᵀ + bv_h) Wo_hᵀ + bo.

When one side has few rows, re-associating the products gives the same result with fewer,
larger GEMMs (no per-head (·, d) matmuls over the long side):

- `query_folded_attention` (few keys, M small): the q and output projections are absorbed into
  the keys and values. Scores = X A + c with A_h = s Wq_hᵀ K_hᵀ (dim × M) and c_h = s K_h bq_h;
  output = [P_1 … P_H] Bmat + bo with Bmat_h = V_h Wo_hᵀ (M × dim).
- `key_folded_attention` (few queries, Nq small): the k and v projections are absorbed into the
  queries. Scores_h = (s q_h Wk_h) Yᵀ (+ s q_h·bk_h, constant along the keys, which softmax
  ignores exactly, so it is dropped: bk gets a zero gradient, as it does by definition);
  P_h (Y Wv_hᵀ + bv_h) = (P_h Y) Wv_hᵀ + bv_h as each row of P_h sums to 1.

`fold_choice` picks the form with the fewest multiply-adds (a folded form on a tie). Padded
keys (key_mask False) are excluded; a batch row with no real key attends to all keys (it has no
real output to protect), as in `set_transformer.cross_attention`.
"""

from __future__ import annotations

import torch

QUERIES, KEYS = "queries", "keys"


def real_or_all(key_mask: torch.Tensor) -> torch.Tensor:
    """(B, M) bool, True = real key -> the keys each batch row may attend to: its real keys, or
    all of them where it has none."""
    return key_mask | ~key_mask.any(dim=-1, keepdim=True)


def cross_flops(n_queries: int, n_keys: int, dim: int, heads: int) -> dict[str | None, int]:
    """Multiply-adds of Multihead(X, Y, Y) per batch element, by form (None = unfolded), with
    Nq = `n_queries`, M = `n_keys`, all widths `dim` (the softmax and biases not counted)."""
    nq, m, n = n_queries, n_keys, dim
    attend = nq * m * heads * n  # one (Nq × dim × H·M) GEMM: scores or output of a folded form
    return {
        None: 2 * nq * n * n + 2 * m * n * n + 2 * nq * m * n,  # q, out; k, v; QKᵀ, PV
        QUERIES: 4 * m * n * n + 2 * attend,    # k, v, A, Bmat; scores, output
        KEYS: 4 * nq * n * n + 2 * attend,      # q, A', G Wv, out; scores, G
    }


def fold_choice(n_queries: int, n_keys: int, dim: int, heads: int,
                folded: bool | None = None) -> str | None:
    """Which form to compute: `QUERIES`, `KEYS` or None (unfolded). `folded` None: the cheapest
    by `cross_flops` (a folded form on a tie); True: the cheaper folded form; False: None."""
    if folded is not None and not isinstance(folded, bool):
        raise ValueError(f"folded: expected None, True or False, got {folded!r}")
    if folded is False:
        return None
    flops = cross_flops(n_queries, n_keys, dim, heads)
    if folded:
        del flops[None]
    return min(flops, key=lambda form: (flops[form], form is None))


def heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, R, H·d) -> (H, B·R, d): one matrix per head for a batched matmul over heads."""
    b, r, _ = t.shape
    return t.view(b, r, heads, -1).permute(2, 0, 1, 3).reshape(heads, b * r, -1)


def rows_by_head(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(H, B·R, c) -> (B, H·R, c), row h·R + j of batch b = row b·R + j of head h (a view
    when B = 1)."""
    h, br, c = t.shape
    return t.view(h, batch, br // batch, c).transpose(0, 1).reshape(batch, -1, c)


def query_folded_attention(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           wq: torch.Tensor, bq: torch.Tensor | None,
                           wo: torch.Tensor, bo: torch.Tensor | None,
                           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multihead(X, Y, Y) for few keys. x (B, N, dim) unprojected queries; k, v (B, M, H·d)
    projected keys and values; wq (H·d, dim), bq (H·d,) the query projection; wo (dim_out, H·d),
    bo (dim_out,) the output projection; key_mask (B, M), True = real. -> (B, N, dim_out)."""
    b, m, hd = k.shape
    h, d, n = heads, hd // heads, x.shape[1]
    k = heads_first(k, h) * d ** -0.5                                   # (H, B·M, d), scaled
    a = rows_by_head(torch.bmm(k, wq.view(h, d, -1)), b)               # (B, H·M, dim) = Aᵀ
    if bq is None:
        c = k.new_zeros(b, 1, h * m)
    else:
        c = rows_by_head(torch.bmm(k, bq.view(h, d, 1)), b).view(b, 1, h * m)  # (B, 1, H·M)
    if key_mask is not None:
        allowed = real_or_all(key_mask).repeat(1, h)                    # (B, H·M)
        c = c.masked_fill(~allowed[:, None], float("-inf"))
    scores = torch.baddbmm(c, x, a.transpose(1, 2))                     # (B, N, H·M)
    probs = scores.view(b, n, h, m).softmax(dim=-1).view(b, n, h * m)   # per head over M keys
    del scores
    # Bmat_h = V_h Wo_hᵀ, with wo viewed as (dim_out, H, d) -> (H, d, dim_out)
    wo_t = wo.view(wo.shape[0], h, d).permute(1, 2, 0)
    bmat = rows_by_head(torch.bmm(heads_first(v, h), wo_t), b)          # (B, H·M, dim_out)
    if bo is None:
        return torch.bmm(probs, bmat)
    return torch.baddbmm(bo, probs, bmat)                               # (B, N, dim_out)


def key_folded_attention(q: torch.Tensor, y: torch.Tensor, heads: int, wk: torch.Tensor,
                         wv: torch.Tensor, bv: torch.Tensor | None,
                         key_mask: torch.Tensor | None = None,
                         allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Multihead(X, Y, Y) for few queries, before the output projection. q (B, Nq, H·d)
    projected queries; y (B, M, dim) unprojected keys/values; wk, wv (H·d, dim), bv (H·d,) the
    key and value projections (the key bias drops out of softmax); key_mask (B, M), True = real;
    allowed (B|1, Nq, M) bool, the keys each query may see besides (Longformer's causal global
    rows), a query with none left seeing every key (its output is not meant to be used).
    -> (B, Nq, H·d), the heads' outputs merged."""
    b, nq, hd = q.shape
    h, d, dim = heads, hd // heads, y.shape[2]
    q = heads_first(q, h) * d ** -0.5                                   # (H, B·Nq, d), scaled
    a = rows_by_head(torch.bmm(q, wk.view(h, d, dim)), b)              # (B, H·Nq, dim) = A'ᵀ
    yt = y.transpose(1, 2)                                              # (B, dim, M), a view
    if allowed is not None:
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, :]
        allowed = real_or_all(allowed).expand(b, nq, -1).repeat(1, h, 1)  # (B, H·Nq, M)
    elif key_mask is not None:
        allowed = real_or_all(key_mask)[:, None]                           # (B, 1, M)
    if allowed is None:
        scores = torch.bmm(a, yt)                                       # (B, H·Nq, M)
    else:
        bias = torch.zeros(allowed.shape, dtype=a.dtype, device=a.device)
        bias = bias.masked_fill(~allowed, float("-inf"))
        scores = torch.baddbmm(bias, a, yt)
    probs = scores.softmax(dim=-1)                                      # over the M keys
    del scores
    g = torch.bmm(probs, y)                # (B, H·Nq, dim): probability-weighted means of Y rows
    g = g.view(b, h, nq, dim).transpose(0, 1).reshape(h, b * nq, dim)  # (H, B·Nq, dim)
    wv_t = wv.view(h, d, dim).transpose(1, 2)                           # (H, dim, d)
    # the bias inside the matmul: under autocast it is cast with it, as in nn.Linear
    out = torch.bmm(g, wv_t) if bv is None else torch.baddbmm(bv.view(h, 1, d), g, wv_t)
    return out.view(h, b, nq, d).permute(1, 2, 0, 3).reshape(b, nq, hd)
