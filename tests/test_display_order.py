"""`display_order`: the permutation the pattern picture uses to group positions by bucket (Reformer),
cluster (Routing Transformer) or sorted block (Sinkhorn Transformer)."""

import pytest
import torch

from efficient_transformers.functional.kmeans import nearest_centroid
from efficient_transformers.functional.sinkhorn import hard_block_order
from efficient_transformers.visualize import sorted_view
from helpers import DIM, small_attention

N = 40


def assignment(name: str, attn, x: torch.Tensor) -> torch.Tensor:
    """The mechanism's own group of each position (N,): bucket, cluster or block."""
    if name == "reformer":
        return attn.hashed(x, None)[2][0, 0, 0, : x.shape[1]]  # head 0, first round
    if name == "routing_transformer":
        q, k, _ = attn.qkv(x)
        hl = attn.local_heads
        r, _ = attn.route_vectors(q[:, hl:], k[:, hl:])
        return nearest_centroid(r, attn.centroids)[0, 0]
    return torch.arange(x.shape[1]) // attn.block_size


def assert_grouped(order: torch.Tensor, group: torch.Tensor) -> None:
    """Each group occupies one contiguous run of the order, its positions in increasing order."""
    seq = group[order].tolist()
    runs = [g for i, g in enumerate(seq) if i == 0 or seq[i - 1] != g]
    assert len(runs) == len(set(runs)), f"a group is split: {seq}"
    for g in set(seq):
        members = order[group[order] == g]
        assert bool((members[1:] > members[:-1]).all())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [N, N - 3])
@pytest.mark.parametrize("name", ["reformer", "routing_transformer", "sinkhorn_transformer"])
def test_display_order_groups_positions(name, n, causal):
    attn = small_attention(name, causal=causal)
    x = torch.randn(1, n, DIM, dtype=torch.float64)
    with torch.no_grad():
        order = attn.display_order(x)
        group = assignment(name, attn, x)
    assert order.dtype == torch.long and order.shape == (n,)
    assert torch.equal(order.sort().values, torch.arange(n))  # a permutation of range(N)
    assert_grouped(order, group)
    if name != "sinkhorn_transformer":  # sorted by (bucket / cluster, position)
        assert bool((group[order].diff() >= 0).all())


def test_sinkhorn_order_follows_the_hard_sorted_blocks():
    attn = small_attention("sinkhorn_transformer")
    x = torch.randn(1, N, DIM, dtype=torch.float64)
    with torch.no_grad():
        order = attn.display_order(x)
        perm = attn.sort_matrix(x, None)[2][0, 0]
    s = attn.block_size
    assert torch.equal(order[::s] // s, hard_block_order(perm))
    assert int(order[0]) // s == int(perm[0].argmax())  # slot 0 takes its argmax block


def test_hard_block_order():
    sigma = torch.tensor([2, 0, 3, 1])
    hard = torch.eye(4, dtype=torch.float64)[sigma]  # slot i takes block sigma[i]
    assert torch.equal(hard_block_order(hard), sigma)
    soft = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.7, 0.1], [0.0, 0.4, 0.6]])  # block 0 picked by none
    assert torch.equal(hard_block_order(soft), torch.tensor([1, 2, 0]))


@pytest.mark.parametrize("name", ["reformer", "routing_transformer", "sinkhorn_transformer"])
def test_sorted_view(name):
    order = sorted_view(name)
    assert order is not None
    assert torch.equal(order.sort().values, torch.arange(40))
