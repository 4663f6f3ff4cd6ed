"""Online spherical k-means routing and the two sparse attentions the Routing Transformer uses.

Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing
Transformers" (TACL 2021, arXiv:2003.05997), section 4 ("Routing Attention"): queries and keys are
normalised, routed to the nearest of C centroids shared by queries and keys, and attend only inside
their cluster; the centroids follow an exponential moving average of the vectors assigned to them
(mini-batch k-means), and a commitment term keeps the vectors close to their centroid.

Pure tensor code. Shapes: q, k, v (B, H, N, d); centroids (H, C, d); `real` (B, N) bool, True =
real token. Nothing here builds an N x N tensor; `*_allowed` builders (tests only) do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- k-means pieces
def centroid_scores(x_hat: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x_hat (B, H, N, d) unit vectors, centroids (H, C, d) -> cosine scores (B, H, N, C).
    One broadcast matmul (an einsum costs about twice the aten calls: host time on a GPU)."""
    return torch.matmul(x_hat, centroids.to(x_hat.dtype).transpose(-1, -2))


def nearest_centroid(x_hat: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, H, N) long: index of the closest centroid (spherical k-means)."""
    return centroid_scores(x_hat, centroids).argmax(dim=-1)


def balanced_members(scores: torch.Tensor, size: int, real: torch.Tensor | None) -> torch.Tensor:
    """Balanced routing: each cluster takes the `size` tokens closest to its centroid.

    scores (B, H, N, C), real (B, N) or None (no padding) -> token indices (B, H, C, size).
    Padded tokens rank below every real token, so they never displace a real one (their values
    cannot change membership).
    """
    s = scores.transpose(-1, -2)
    if real is not None:
        s = s.masked_fill(~real[:, None, None, :], float("-inf"))
    return s.topk(size, dim=-1, sorted=False).indices


def centroid_rows(assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """assign (B, H, N) cluster indices -> rows (B, H, N) of the centroids as an (H·C, d) table."""
    h = assign.shape[1]
    return assign + torch.arange(0, h * clusters, clusters, device=assign.device)[:, None]


EMA_BY_INDEX: bool | None = None  # None: `ema_centroids` sums by index on CUDA; True / False: forced


def ema_centroids(centroids: torch.Tensor, x_hat: torch.Tensor, assign: torch.Tensor,
                  real: torch.Tensor | None, decay: float,
                  by_index: bool | None = None) -> torch.Tensor:
    """One online k-means step (paper eq. for mu <- decay mu + (1 - decay) mean of its members).

    centroids (H, C, d); x_hat (B, H, N, d); assign (B, H, N); real (B, N), or None when every
    token is real (no weighting pass). Clusters that received no real token keep their
    centroid. Returns new unit-norm centroids (H, C, d), no gradient.
    The members' sums: by_index (default on CUDA) adds each token into its cluster's row
    (`index_add_`, atomic on CUDA); otherwise a weighted one-hot (B, H, N, C) and one batched
    matmul per head (on the CPU an index_add into H·C rows serialises; on CUDA the one-hot is
    256 MiB of float32 per side at 64k tokens and 256 clusters).
    """
    h, c, d = centroids.shape
    b, _, n = assign.shape
    dtype = centroids.dtype
    x = x_hat.detach().to(dtype)
    if by_index is None:
        by_index = x.is_cuda if EMA_BY_INDEX is None else EMA_BY_INDEX
    if by_index:
        rows = centroid_rows(assign, c).reshape(-1)                          # (B·H·N,)
        vectors = x.reshape(-1, d)                                            # (B·H·N, d)
        if real is None:   # (bincount's length depends on the data: no graph under compile)
            weight = x.new_ones(1, 1).expand(rows.shape[0], 1)               # (B·H·N, 1)
        else:
            weight = real[:, None, :].to(dtype).expand(b, h, n).reshape(-1, 1)  # (B·H·N, 1)
            vectors = vectors * weight
        counts = x.new_zeros(h * c, 1).index_add_(0, rows, weight).view(h, c, 1)
        sums = x.new_zeros(h * c, d).index_add_(0, rows, vectors).view(h, c, d)
    else:
        weight = (torch.ones((), dtype=dtype, device=centroids.device) if real is None
                  else real[:, None, :, None].to(dtype)).expand(b, h, n, 1)
        members = torch.zeros(b, h, n, c, dtype=dtype, device=centroids.device)
        members.scatter_(-1, assign[..., None], weight)
        sums = torch.einsum("bhnc,bhnd->hcd", members, x)                   # (H, C, d)
        counts = members.sum(dim=(0, 2))[..., None]                         # (H, C, 1)
    mean = sums / counts.clamp_min(1.0)
    moved = decay * centroids + (1.0 - decay) * mean
    return F.normalize(torch.where(counts > 0, moved, centroids), dim=-1)


def assigned_centroids(centroids: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """centroids (H, C, d), assign (B, H, N) -> each token's centroid (B, H, N, d), one gather."""
    h, c, d = centroids.shape
    rows = centroid_rows(assign, c).reshape(-1)
    return centroids.reshape(h * c, d).index_select(0, rows).view(*assign.shape, d)


def commitment_loss(x_hat: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor,
                    real: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens and heads of ||x_hat - mu(x_hat)||^2 with the centroids held fixed.

    x_hat (B, H, N, d); assign (B, H, N) the winning centroid's index; centroids (H, C, d);
    real (B, N) or None (every token real) -> scalar. The distance to the gathered centroid
    (B, H, N, d): its backward is elementwise, where the winning score's (through the max over
    the (B, H, N, C) scores) would scatter into a (B, H, N, C) tensor and multiply it back."""
    dtype = torch.promote_types(x_hat.dtype, torch.float32)  # fp16/bf16 -> fp32
    mu = assigned_centroids(centroids.detach().to(dtype), assign)
    err = (x_hat.to(dtype) - mu).square().sum(-1)  # (B, H, N)
    if real is None:
        return err.mean()
    weight = real[:, None, :].to(dtype).expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


# ------------------------------------------------------------------- attention fast paths
def _gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, H, N, d), index (B, H, C, k) -> (B, H*C, k, d)."""
    b, h, c, k = index.shape
    flat = index.reshape(b, h, c * k, 1).expand(-1, -1, -1, t.shape[-1])
    return t.gather(2, flat).view(b, h * c, k, t.shape[-1])


def routed_attention(q, k, v, q_members, k_members, real):
    """Non-causal routing attention with balanced clusters.

    q_members, k_members (B, H, C, size) token indices; real (B, N) bool, or None when every
    token is real (decided on the host: nothing waits for the device). Query i's output is the mean
    over the clusters that selected it of softmax(q_i K_c^T / sqrt(d)) V_c over the real keys of
    cluster c; a query no cluster selected gets 0. -> (B, H, N, d).
    """
    b, h, n, d = q.shape
    c, size = q_members.shape[-2:]
    qs, ks, vs = (_gather_tokens(t, i) for t, i in ((q, q_members), (k, k_members), (v, k_members)))
    key_real = None
    if real is not None:
        key_real = real[:, None, :].expand(b, h, n).gather(2, k_members.reshape(b, h, -1))
        key_real = key_real.view(b, h * c, 1, size)
        key_real = key_real | ~key_real.any(dim=-1, keepdim=True)  # fully padded: no empty rows
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=key_real)  # (B, H*C, size, d)
    flat = q_members.reshape(b, h, c * size)
    total = torch.zeros_like(q).scatter_add(2, flat[..., None].expand(-1, -1, -1, d),
                                            out.reshape(b, h, c * size, d))
    count = torch.zeros(b, h, n, dtype=q.dtype, device=q.device).scatter_add(
        2, flat, torch.ones_like(flat, dtype=q.dtype))
    return total / count.clamp_min(1.0)[..., None]


def _neighbours(t: torch.Tensor, block_dim: int, after: bool, fill) -> torch.Tensor:
    """Concatenate the previous block (and the next one when `after`) with each block.

    t has blocks on axis `block_dim` and the within-block axis right after it.
    """
    nb = t.shape[block_dim]
    pad = [0, 0] * (t.dim() - block_dim - 1) + [1, 1]
    padded = F.pad(t, pad, value=fill)
    parts = [padded.narrow(block_dim, 0, nb), t]
    if after:
        parts.append(padded.narrow(block_dim, 2, nb))
    return torch.cat(parts, dim=block_dim + 1)


def block_sdpa(q, k, v, allowed=None):
    """SDPA over blocks: q (B, H, R, s, d), k and v (B, H, R, c, d), allowed None or a bool mask
    broadcastable as (B or 1, H or 1, R, s, c) -> (B, H, R, s, d).

    Heads go to the leading axis, so a mask shared by the heads is never copied per head
    (SDPA turns a bool mask into a float one of the mask's own shape)."""
    b, h, r, s, d = q.shape
    c = k.shape[-2]
    q4, k4, v4 = (t.transpose(0, 1).reshape(h, b * r, t.shape[-2], d) for t in (q, k, v))
    if allowed is not None:
        allowed = allowed.expand(b, allowed.shape[1], r, s, c).transpose(0, 1)
        allowed = allowed.reshape(allowed.shape[0], b * r, s, c)
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=allowed)
    return out.view(h, b, r, s, d).transpose(0, 1)


def grouped_window_attention(q, k, v, group, real, window: int, causal: bool):
    """Sliding-window attention in a given order, restricted to equal `group` ids.

    q, k, v (B, H, L, d) already in the order that defines the window; group (B, H, L) long or
    None (one group); real (B, L) or (B, H, L) bool (key is a real token) or None (all real).
    Item s sees item t when group[s] == group[t], real[t] or s == t, and 0 <= s - t < window
    (causal) or |s - t| < window (non-causal). Computed on blocks of min(window, L) items that
    look at their neighbour blocks: scores (B, H, L / w, w, 2w or 3w), never L x L.
    -> (B, H, L, d) in the same order.
    """
    b, h, n, d = q.shape
    w = min(window, n)
    pad = (-n) % w
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        if group is not None:
            group = F.pad(group, (0, pad), value=-1)
        if real is None:
            real = torch.ones(b, n, dtype=torch.bool, device=q.device)
        real = F.pad(real, (0, pad), value=False)
    nb = (n + pad) // w
    after = not causal
    qb = q.reshape(b, h, nb, w, d)
    kb = _neighbours(k.reshape(b, h, nb, w, d), 2, after, 0.0)  # (B, H, nb, cw, d)
    vb = _neighbours(v.reshape(b, h, nb, w, d), 2, after, 0.0)
    pos = torch.arange(n + pad, device=q.device).view(nb, w)
    kpos = _neighbours(pos, 0, after, -(n + pad + window + 1))  # (nb, cw); fill is never near
    dist = pos[:, :, None] - kpos[:, None, :]  # (nb, w, cw)
    allowed = (dist >= 0) & (dist < window) if causal else dist.abs() < window
    if real is not None:
        real = real if real.dim() == 3 else real[:, None]  # (B, H or 1, L)
        rk = _neighbours(real.reshape(real.shape[0], real.shape[1], nb, w), 2, after, False)
        allowed = allowed & (rk[..., None, :] | (dist == 0))  # (B, H|1, nb, w, cw)
    if group is not None:
        gq = group.reshape(b, h, nb, w)
        gk = _neighbours(gq, 2, after, -2)
        allowed = allowed & (gq[..., :, None] == gk[..., None, :])
    if allowed.dim() == 3:
        allowed = allowed[None, None]
    return block_sdpa(qb, kb, vb, allowed).reshape(b, h, nb * w, d)[:, :, :n]


def sort_by_group(group: torch.Tensor) -> torch.Tensor:
    """(B, H, N) group ids -> permutation (B, H, N) ordering tokens by (group, position)."""
    return torch.sort(group, dim=-1, stable=True).indices


def permute(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t (B, H, N, ...) reordered along N by order (B, H, N)."""
    index = order.reshape(*order.shape, *([1] * (t.dim() - 3))).expand_as(t)
    return t.gather(2, index)


def unpermute(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute`: out[..., order[s], :] = t[..., s, :]."""
    index = order.reshape(*order.shape, *([1] * (t.dim() - 3))).expand_as(t)
    return torch.zeros_like(t).scatter(2, index, t)


def group_ranks(group: torch.Tensor, num_groups: int, start: torch.Tensor | None = None):
    """Rank of each token among the earlier tokens of its group (decode bookkeeping).

    group (B, H, T); start (B, H, G) counts before this chunk -> (ranks (B, H, T), counts (B, H, G)).
    """
    # (B, H, T, G); F.one_hot would read the ids' range from the device first
    onehot = (group[..., None] == torch.arange(num_groups, device=group.device)).long()
    before = onehot.cumsum(dim=2) - onehot
    if start is not None:
        before = before + start[:, :, None, :]
    ranks = (before * onehot).sum(-1)
    counts = onehot.sum(2) + (0 if start is None else start)
    return ranks, counts


# ------------------------------------------------------------ dense definitions (tests only)
def balanced_allowed(scores: torch.Tensor, size: int, real: torch.Tensor) -> torch.Tensor:
    """Membership (B, H, C, N) bool of the balanced top-`size` routing, from ranks (no topk):
    token j belongs to cluster c when fewer than `size` real tokens score strictly higher."""
    s = scores.transpose(-1, -2).masked_fill(~real[:, None, None, :], float("-inf"))  # (B,H,C,N)
    higher = (s[..., None, :] > s[..., :, None]).sum(-1)  # (B, H, C, N): count of better tokens
    return higher < size


def window_allowed(n: int, window: int, causal: bool, device=None) -> torch.Tensor:
    """(N, N) bool: the sliding window of the local heads."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return ((i - j >= 0) & (i - j < window)) if causal else ((i - j).abs() < window)
