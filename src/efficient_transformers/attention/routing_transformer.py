"""`routing_transformer`: content-based sparse attention by online k-means (Roy et al. 2021).

Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing
Transformers", TACL 2021, arXiv:2003.05997, section 4 ("Routing Attention"):
- queries and keys are normalised to the unit sphere and routed to the nearest of `num_clusters`
  centroids per head, shared by queries and keys; a query attends only inside its cluster;
- the centroids are buffers updated by an exponential moving average (`decay`) of the vectors
  assigned to them (online mini-batch k-means), in training only, AFTER the routing of the
  current call has been computed (the forward never depends on its own update). The recompute
  of activation checkpointing (torch.utils.checkpoint) updates nothing and routes with the
  centroids of the layer's last forward: those of the forward it recomputes, unless the layer
  ran again before that backward;
- a commitment loss ||x - mu(x)||^2 (weight `commitment`) is reported as `self.aux_loss`;
- the paper mixes local-attention heads with routing heads: the first `local_heads` heads attend
  to a sliding window of `window` tokens, the others route (default: half of the heads).

Non-causal form (the paper's balanced implementation): each cluster takes its top-k closest
queries and its top-k closest keys, k = ceil(N / num_clusters), and attention runs inside each
cluster (C batched k x k blocks, O(N k) = O(N^1.5) for C = sqrt(N)); a query selected by several
clusters averages their outputs, a query selected by none gets 0 from the routing heads. Padded
tokens rank last, so they never displace a real token.

On CPU (float32/64) the non-causal routing heads run as one autograd node (functional/routed.py:
attention in each cluster, the average and the commitment loss, with a hand-written backward;
the routing decisions carry no gradient); elsewhere as the composition (`unit_vectors`,
`routed_attention`: gather, SDPA, scatter; `commitment_loss`). Tests compare the two. On CUDA
the local heads are one FlexAttention call and the k-means step sums by `index_add_`.

Causal form (differs from the paper): balanced top-k over the whole sequence lets future tokens
change which past tokens a query sees, so the causal variant does not balance. Each token is
routed once, by the nearest centroid to normalise(q_hat + k_hat), and a query attends to the most
recent `window` tokens of its own cluster up to and including itself (all earlier tokens of the
cluster when the cluster holds fewer). Computed by sorting tokens by (cluster, position) and a
blocked sliding window over that order, O(N window); padded tokens go to an extra cluster of
their own. Decode keeps the keys, values, clusters and per-cluster ranks of past tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.kmeans import (
    balanced_members, centroid_scores, commitment_loss, ema_centroids, group_ranks,
    grouped_window_attention, nearest_centroid, permute, routed_attention, sort_by_group,
    unpermute,
)
from ..functional.eager import kept_tensor
from ..functional.global_cuda import flex_or_none
from ..functional.global_local import DilatedWindow
from ..functional.routed import Commitment, routed_heads
from ..functional.unit import unit_parts, unit_vectors
from ..registry import register
from .base import Attention, check_number, check_positive_int, recomputing


@register("routing_transformer")
class RoutingAttention(Attention):
    small_options = {"num_clusters": 3, "window": 4, "local_heads": 1}
    fused_cpu = True  # see `uses_fused_routing`

    def __init__(self, dim: int, heads: int, causal: bool = False, num_clusters: int = 32,
                 window: int = 128, local_heads: int | None = None, decay: float = 0.999,
                 commitment: float = 1e-4):
        super().__init__(dim, heads, causal)
        check_positive_int("num_clusters", num_clusters)
        check_positive_int("window", window)
        if local_heads is None:
            local_heads = heads // 2
        if isinstance(local_heads, bool) or not isinstance(local_heads, int) or not 0 <= local_heads <= heads:
            raise ValueError(f"local_heads: expected an integer in [0, heads={heads}], got {local_heads!r}")
        check_number("decay", decay, 0.0, 1.0)
        check_number("commitment", commitment, 0.0)
        self.num_clusters, self.window, self.local_heads = num_clusters, window, local_heads
        self.routing_heads = heads - local_heads
        self.decay, self.commitment = float(decay), float(commitment)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        init = F.normalize(torch.randn(self.routing_heads, num_clusters, self.head_dim), dim=-1)
        self.register_buffer("centroids", init)  # (H_routing, C, d), unit norm
        self.routed_with: torch.Tensor | None = None  # the centroids of the last forward

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_clusters={self.num_clusters}, window={self.window}, "
                f"local_heads={self.local_heads}")

    def qkv(self, x):
        """(B, N, dim) -> q, k, v each (B, H, N, d)"""
        return self.split_projection(self.to_qkv(x), 3)

    # ------------------------------------------------------------------------ routing
    def route_vectors(self, q, k):
        """Unit vectors used for routing: (q_hat, k_hat), or the shared one when causal."""
        q_hat, k_hat = unit_vectors(q), unit_vectors(k)
        if self.causal:
            return F.normalize(q_hat + k_hat, dim=-1), None
        return q_hat, k_hat

    def display_order(self, x):
        """x (1, N, dim) -> (N,): positions sorted by (nearest centroid, position) for the first
        routing head (of the routing vector: q_hat, or the shared one when causal); the identity
        when every head is local."""
        if not self.routing_heads:
            return torch.arange(x.shape[1], device=x.device)
        q, k, _ = self.qkv(x)
        hl = self.local_heads
        r, _ = self.route_vectors(q[:, hl:], k[:, hl:])
        return sort_by_group(nearest_centroid(r, self.centroids.detach()))[0, 0]

    def routing_centroids(self) -> torch.Tensor:
        """(Hr, C, d) centroids this forward routes with: the current ones, or in a recompute
        (activation checkpointing) those the last forward routed with."""
        if recomputing() and self.routed_with is not None:
            return self.routed_with
        mu = self.centroids.detach()
        self.routed_with = mu if self.training else None
        return mu

    def learn(self, vectors, scores, real, mu):
        """Commitment loss for the routed vectors and, in training, the EMA step (after routing).

        vectors: unit vectors (B, Hr, N, d); scores: their centroid scores (B, Hr, N, C);
        mu: the centroids routed with (Hr, C, d)."""
        assign = [s.argmax(dim=-1) for s in scores]   # (B, Hr, N) each
        loss = sum(commitment_loss(x, a, mu, real) for x, a in zip(vectors, assign)) / len(vectors)
        self.aux_loss = self.commitment * loss
        self.ema_step(vectors, assign, real, mu)

    def ema_step(self, vectors, assign, real, mu):
        """In training, move the centroids mu towards the vectors assigned to them (after
        routing); not in a recompute, whose forward took the step."""
        if self.training and not recomputing():
            new = mu
            for x, a in zip(vectors, assign):
                new = ema_centroids(new, x, a, real, self.decay)
            # a new tensor (the graph of this call keeps the old one), never an inference one
            self.centroids = kept_tensor(new)

    def fused_routing(self, qkv, q, k, real, mask):
        """CPU fast path of the non-causal routing heads (functional/routed.py): the routing
        decisions without autograd, then one node for attention and commitment loss."""
        mu = self.routing_centroids()
        with torch.no_grad():
            units = [unit_parts(t) for t in (q, k)]        # (x̂, |x|, clamped) per side
            scores, members = self.balanced_routing([u[0] for u in units], real, mu)
            assign = [sc.argmax(dim=-1) for sc in scores]
        commitment = Commitment(units, assign, mu, real, self.commitment)
        out, self.aux_loss = routed_heads(qkv, self.heads, self.local_heads, *members, mask,
                                          commitment)
        self.ema_step([u[0] for u in units], assign, real, mu)
        return out

    def routing(self, q, k, v, mask):
        """Routing heads: q, k, v (B, Hr, N, d), mask (B, N) or None -> (B, Hr, N, d). Without a
        mask every token is real (known on the host: nothing masked, nothing weighted)."""
        real = mask
        mu = self.routing_centroids()
        if self.causal:
            r, _ = self.route_vectors(q, k)
            scores = centroid_scores(r, mu)
            assign = scores.argmax(dim=-1)  # (B, Hr, N)
            self.learn([r], [scores], real, mu)
            group = assign if real is None else \
                torch.where(real[:, None, :], assign, self.num_clusters)     # padded: own group
            order = sort_by_group(group)
            real_h = None if mask is None else permute(real[:, None, :].expand_as(group), order)
            qs, ks, vs = (permute(t, order) for t in (q, k, v))
            out = grouped_window_attention(qs, ks, vs, permute(group, order), real_h,
                                           self.window, causal=True)
            return unpermute(out, order)
        q_hat, k_hat = self.route_vectors(q, k)
        scores, members = self.balanced_routing([q_hat, k_hat], real, mu)
        self.learn([q_hat, k_hat], scores, real, mu)
        return routed_attention(q, k, v, *members, mask)

    def balanced_routing(self, vectors, real, mu):
        """Non-causal: unit vectors (B, Hr, N, d) per side and centroids mu (Hr, C, d) -> their
        centroid scores (B, Hr, N, C) and the balanced cluster members (B, Hr, C, k),
        k = ceil(N / C)."""
        n = vectors[0].shape[2]
        size = min(n, math.ceil(n / self.num_clusters))
        scores = [centroid_scores(x, mu) for x in vectors]
        return scores, [balanced_members(sc, size, real) for sc in scores]

    def uses_fused_routing(self, qkv) -> bool:
        """The non-causal routing heads take the fused CPU node (float32/64), unless
        `fused_cpu` is switched off (tests compare the two). The fused node's graph takes one
        backward pass (it reuses its saved tensors), the unfused one several."""
        return (self.fused_cpu and not self.causal and self.routing_heads > 0
                and qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.float64))

    def local(self, q, k, v, mask):
        """Local heads: sliding window of `window` tokens. (B, Hl, N, d) -> (B, Hl, N, d).
        FlexAttention where it applies (CUDA), else blocks of the window with their
        neighbours."""
        pattern = DilatedWindow(self.window - 1, 1, self.causal)    # |i - j| < window
        out = flex_or_none(q, k, v, pattern, mask)
        if out is None:
            out = grouped_window_attention(q, k, v, None, mask, self.window, self.causal)
        return out

    def attend(self, x, mask):
        b, n, _ = x.shape
        qkv = self.to_qkv(x)                                    # (B, N, 3·dim)
        q, k, v = self.split_projection(qkv, 3)
        hl = self.local_heads
        # (local heads, routing heads) of each, by split: its backward writes one gradient
        # tensor, where two slices' would each write a zero-filled full one and then add them
        (ql, qr), (kl, kr), (vl, vr) = (t.split([hl, self.routing_heads], dim=1)
                                        for t in (q, k, v))
        outs = []
        if hl:
            outs.append(self.local(ql, kl, vl, mask))
        if self.uses_fused_routing(qkv):
            real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
            outs.append(self.fused_routing(qkv, qr, kr, real, mask))
        elif self.routing_heads:
            outs.append(self.routing(qr, kr, vr, mask))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.to_out(self.merge_heads(out))

    # ------------------------------------------------------------------------- decode
    def decode_step(self, x_new, state):
        b, t, _ = x_new.shape
        q, k, v = self.qkv(x_new)
        hl, c = self.local_heads, self.num_clusters
        if self.routing_heads:
            r, _ = self.route_vectors(q[:, hl:], k[:, hl:])
            group = nearest_centroid(r, self.centroids.detach())  # (B, Hr, T)
            ranks, counts = group_ranks(group, c, None if state is None else state["counts"])
        if state is None:
            # the prompt: one fast causal forward (no mask), then the cache
            y = self.attend(x_new, None)
            self.aux_loss = None
            cache_k, cache_v = k, v
            groups, all_ranks = (group, ranks) if self.routing_heads else (None, None)
            start = 0
        else:
            start = state["length"]
            cache_k = torch.cat([state["k"], k], dim=2)
            cache_v = torch.cat([state["v"], v], dim=2)
            groups = all_ranks = None
            if self.routing_heads:
                groups = torch.cat([state["group"], group], dim=2)
                all_ranks = torch.cat([state["rank"], ranks], dim=2)
            y = self.decode_against_cache(q, cache_k, cache_v, groups, all_ranks, start)
        new_state = {"length": start + t, "k": cache_k, "v": cache_v}
        if self.routing_heads:
            new_state.update(group=groups, rank=all_ranks, counts=counts)
        return y, new_state

    def decode_against_cache(self, q, k, v, groups, ranks, start):
        """New queries q (B, H, T, d) at positions start.. against every cached key (B, H, M, d)."""
        t, m = q.shape[2], k.shape[2]
        i = torch.arange(t, device=q.device)[:, None] + start
        j = torch.arange(m, device=q.device)[None, :]
        past = j <= i  # (T, M)
        hl = self.local_heads
        masks = []
        if hl:
            local = past & (i - j < self.window)
            masks.append(local.expand(q.shape[0], hl, t, m))
        if self.routing_heads:
            gq, rq = groups[:, :, start:], ranks[:, :, start:]
            same = gq[..., :, None] == groups[..., None, :]
            recent = (rq[..., :, None] - ranks[..., None, :]) < self.window
            masks.append(past & same & recent)
        allowed = torch.cat(masks, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.to_out(self.merge_heads(out))
