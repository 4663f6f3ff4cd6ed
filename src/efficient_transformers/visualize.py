"""Which keys each query attends to: an N × N picture for any registered mechanism.

The map is the influence of input position j on output position i, |∂y_i / ∂x_j| (Frobenius norm
over the feature axes), normalised per row. It is exact about *which* positions are reachable —
so for a fixed pattern it is the pattern itself, for a learnable one the pattern realised on this
input (buckets, clusters, sorted blocks), and for low-rank and kernel methods the effective dense
dependence — and it shows *how strongly* each key is used. Computed densely: display only, small N.
One blind spot: keys reached through a detached cache (Transformer-XL's and the Compressive
Transformer's memory of earlier segments) carry no gradient, so they do not show.
"""

from __future__ import annotations

import math

import torch

from .registry import attention_class, build_attention


def influence_map(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (N, dim) -> (N, N): row i = how much each input position moves output position i."""
    fn = lambda inp: attn(inp[None])[0]
    try:
        jac = torch.autograd.functional.jacobian(fn, x, vectorize=True)  # (N, dim, N, dim)
    except RuntimeError:  # an op without a batching rule (custom autograd nodes)
        jac = jacobian_by_copies(attn, x)
    influence = jac.square().sum(dim=(1, 3)).sqrt()                              # (N, N)
    return influence / influence.amax(dim=1, keepdim=True).clamp_min(1e-30)


def jacobian_by_copies(attn: torch.nn.Module, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """x (N, dim) -> ∂attn(x) / ∂x (N, dim, N, dim) with one backward pass per `chunk` output
    elements: x repeated along the batch, each copy's upstream gradient one output element.
    Exact because batch rows are independent; unlike a backward pass per element with
    retain_graph, it suits the nodes that free or overwrite what they saved (fused_linear,
    routed)."""
    n, dim = x.shape
    outputs = n * dim
    rows = []
    for start in range(0, outputs, chunk):
        picked = torch.arange(start, min(start + chunk, outputs), device=x.device)   # (c,)
        copies = x.detach().expand(len(picked), n, dim).clone().requires_grad_()    # (c, N, dim)
        y = attn(copies)
        upstream = torch.zeros(len(picked), outputs, dtype=y.dtype, device=y.device)
        upstream[torch.arange(len(picked)), picked] = 1.0
        (grad,) = torch.autograd.grad(y, copies, upstream.view_as(y))
        rows.append(grad)                                                            # (c, N, dim)
    return torch.cat(rows).view(n, dim, n, dim)


def mechanism_map(name: str, length: int = 40, causal: bool = False, dim: int = 32, heads: int = 2,
                  seed: int = 0, **options) -> torch.Tensor:
    """The influence map of mechanism `name` at `length` on a random input (float64, eval mode)."""
    torch.manual_seed(seed)
    merged = {**attention_class(name).small_options, **options}
    attn = build_attention(name, dim=dim, heads=heads, causal=causal, **merged).double().eval()
    x = torch.randn(length, dim, dtype=torch.float64)
    return influence_map(attn, x)


def grid_shape(count: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


def sorted_view(name: str, length: int = 40, causal: bool = False, dim: int = 32, heads: int = 2,
                seed: int = 0, **options) -> torch.Tensor | None:
    """For learnable patterns: a permutation (N,) that groups positions by bucket / cluster /
    sorted block, from the mechanism's `display_order(x)` if it has one; else None."""
    torch.manual_seed(seed)
    merged = {**attention_class(name).small_options, **options}
    attn = build_attention(name, dim=dim, heads=heads, causal=causal, **merged).double().eval()
    if not hasattr(attn, "display_order"):
        return None
    x = torch.randn(length, dim, dtype=torch.float64)
    with torch.no_grad():
        return attn.display_order(x[None])
