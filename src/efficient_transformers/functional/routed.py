"""CPU fast path of the Routing Transformer's balanced (non-causal) routing heads: one autograd
node from the (B, N, 3·H·d) projection to the heads' outputs and the commitment loss.

Same definition as the composition it replaces (`unit.unit_vectors`, `kmeans.commitment_loss`,
`kmeans.routed_attention`): query i's output is the mean over the clusters that selected it of
softmax(q_i K_cᵀ / sqrt(d)) V_c over the real keys of cluster c (0 where no cluster chose it),
and the loss is the commitment term ||x̂ - μ(x̂)||² of the routed unit vectors.

The routing decisions (unit vectors, centroid scores, top-k members, nearest centroids) carry
no gradient, so the caller takes them without autograd; this node is then the only
differentiable reader of the projection and writes its gradient in one buffer (no per-part
gradients for autograd to concatenate and add). Forward: one `index_select` of [q·scale | k | v]
rows into cluster order, two batched matmuls with an in-place softmax, one `index_add_` of the
cluster outputs into the (B, N, Hr, d) layout (merging heads afterwards is a view). Backward:
the attention gradient overwrites the gathered rows, one `index_add_` returns them to the
projection's layout, and the commitment gradient is added in closed form:
d x̂ = d_loss · commitment · w / Σw · (x̂ − μ), then the unit-vector backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .amp import autocast_free
from .backward import first_order_only, single_backward
from .dense import softmax_
from .kmeans import assigned_centroids, commitment_loss
from .merge import output_shift, softmax_grad_
from .unit import unit_vectors_grad


@dataclass
class Commitment:
    """What the commitment term needs, taken without gradient, for the query and key vectors:
    units [(x̂ (B, Hr, N, d), |x| clamped (B, Hr, N, 1), clamped (B, Hr, N, 1))] per side,
    assign [the nearest centroid's index (B, Hr, N)] per side, the centroids
    (Hr, C, d), real (B, N) and the weight of the term."""
    units: list
    assign: list
    centroids: torch.Tensor
    real: torch.Tensor
    weight: float

    def loss(self) -> torch.Tensor:
        """weight · mean over the two sides of `commitment_loss`."""
        total = sum(commitment_loss(u[0], a, self.centroids, self.real)
                    for u, a in zip(self.units, self.assign))
        return self.weight * total / len(self.units)

    def grads(self, d_loss: torch.Tensor) -> list[torch.Tensor]:
        """-> the gradient of each side's projected vectors x (B, Hr, N, d)."""
        hr = self.centroids.shape[0]
        w = self.real.to(self.centroids.dtype)                              # (B, N)
        # d ||x̂ - μ||² = 2 (x̂ - μ), averaged over the real tokens and heads, then the sides
        coef = 2.0 * d_loss * self.weight / len(self.units) / (w.sum() * hr).clamp_min(1.0)
        out = []
        for (x_hat, norm, clamped), index in zip(self.units, self.assign):
            mu = assigned_centroids(self.centroids, index)
            d_hat = (x_hat - mu).mul_(w[:, None, :, None] * coef)           # (B, Hr, N, d)
            out.append(unit_vectors_grad(d_hat, x_hat, norm, clamped))
        return out


def _row_ids(members: torch.Tensor, n: int, stride: int, first: torch.Tensor) -> torch.Tensor:
    """members (B, Hr, C, S) token indices -> row numbers (B, Hr, C·S) in a table of rows of d:
    row = (b·N + token)·stride + first[h]."""
    b, hr = members.shape[:2]
    tokens = members.reshape(b, hr, -1) + torch.arange(b, device=members.device)[:, None, None] * n
    return tokens * stride + first[None, :, None]


@autocast_free
class _RoutedHeads(torch.autograd.Function):
    """qkv (B, N, 3·H·d) contiguous [q | k | v, heads inside]; routed heads h0 .. h0 + Hr - 1;
    q_members, k_members (B, Hr, C, S); blocked (B·Hr·C, 1, S) bool (padded key) or None;
    commitment: a `Commitment` or None -> out (B, Hr, N, d) (a view of a (B, N, Hr, d) tensor)
    and the commitment loss (a scalar, 0 without one)."""

    @staticmethod
    def forward(ctx, qkv, heads, h0, q_members, k_members, blocked, commitment):
        ctx.set_materialize_grads(False)
        b, n, width = qkv.shape
        d = width // (3 * heads)
        hr, c, s = q_members.shape[1:]
        r = b * hr * c
        first = torch.arange(h0, h0 + hr, device=qkv.device)
        q_rows = _row_ids(q_members, n, 3 * heads, first)                  # (B, Hr, C·S)
        k_rows = _row_ids(k_members, n, 3 * heads, first)
        table_ids = torch.stack([q_rows, k_rows + heads, k_rows + 2 * heads]).flatten()
        rows = qkv.view(-1, d).index_select(0, table_ids).view(3, r, s, d)  # [q, k, v] by cluster
        qs, ks, vs = rows.unbind(0)
        qs.mul_(1.0 / math.sqrt(d))
        p = torch.bmm(qs, ks.transpose(1, 2))                              # (R, S, S) scores
        if blocked is not None:
            p.masked_fill_(blocked, float("-inf"))
        softmax_(p)                                                         # in place
        per_cluster = torch.bmm(p, vs)                                      # (R, S, d)
        # rows of the (B, N, Hr, d) output; 1 / (clusters that chose each query), 1 if none
        out_ids = _row_ids(q_members, n, hr, torch.arange(hr, device=qkv.device)).flatten()
        inv = torch.bincount(out_ids, minlength=b * n * hr).to(qkv.dtype).clamp_(min=1.0)
        inv.reciprocal_()                                                   # (B·N·Hr,)
        out = qkv.new_zeros(b * n * hr, d).index_add_(0, out_ids, per_cluster.view(-1, d))
        out.mul_(inv[:, None])
        ctx.save_for_backward(rows, p, per_cluster, table_ids, out_ids, inv)
        ctx.shape, ctx.commitment = (b, n, heads, h0, hr), commitment
        loss = commitment.loss() if commitment is not None else qkv.new_zeros(())
        return out.view(b, n, hr, d).transpose(1, 2), loss

    @staticmethod
    @first_order_only
    @single_backward("use the layer's unfused path: `layer.fused_cpu = False`")
    def backward(ctx, d_out, d_loss):
        rows, p, per_cluster, table_ids, out_ids, inv = ctx.saved_tensors
        b, n, heads, h0, hr = ctx.shape
        _, r, s, d = rows.shape
        d_qkv = rows.new_zeros(b, n, 3, heads, d)
        if d_out is not None:
            qs, ks, vs = rows.unbind(0)
            # each cluster output's gradient: d_out at its queries over their counts
            d_rows = d_out.transpose(1, 2).reshape(b * n * hr, d)
            d_pc = d_rows.index_select(0, out_ids).mul_(inv[out_ids, None]).view(r, s, d)
            d_p = torch.bmm(d_pc, vs.transpose(1, 2))                       # (R, S, S)
            shift = output_shift(d_pc, per_cluster, None, p.dtype)
            torch.bmm(p.transpose(1, 2), d_pc, out=vs)                      # vs := d_vs
            d_s = softmax_grad_(d_p, p, shift, 1.0)                         # d scores, in place
            d_qs = torch.bmm(d_s, ks, out=d_pc)                             # d (q·scale)
            torch.bmm(d_s.transpose(1, 2), qs, out=ks)                      # ks := d_ks
            qs.copy_(d_qs).mul_(1.0 / math.sqrt(d))                         # qs := d_qs
            d_qkv.view(-1, d).index_add_(0, table_ids, rows.view(-1, d))
        if d_loss is not None and ctx.commitment is not None:
            for part, grad in enumerate(ctx.commitment.grads(d_loss)):
                d_qkv[:, :, part, h0:h0 + hr].add_(grad.transpose(1, 2))
        return d_qkv.view(b, n, -1), None, None, None, None, None, None


def routed_heads(qkv: torch.Tensor, heads: int, h0: int, q_members: torch.Tensor,
                 k_members: torch.Tensor, real: torch.Tensor,
                 commitment: Commitment | None = None):
    """The routed heads h0.. of the projection qkv (B, N, 3·H·d) -> (out (B, Hr, N, d), the
    commitment loss (0 without `commitment`)), as one autograd node (see the module docstring).
    real (B, N) bool, True = real token, or None when every token is real (decided on the host);
    members (B, Hr, C, S) from `balanced_members`."""
    b, n, _ = qkv.shape
    hr, c, s = q_members.shape[1:]
    blocked = None
    if real is not None:
        key_real = real[:, None, :].expand(b, hr, n).gather(2, k_members.reshape(b, hr, -1))
        key_real = key_real.view(b * hr * c, 1, s)
        key_real = key_real | ~key_real.any(dim=-1, keepdim=True)  # no empty rows
        blocked = ~key_real
    return _RoutedHeads.apply(qkv.contiguous(), heads, h0, q_members, k_members, blocked,
                              commitment)
