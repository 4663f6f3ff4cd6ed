"""Big Bird ITC (Zaheer et al. 2020, section 2 / appendix D): the block pattern, the blocked path
against the naive oracle (values and gradients, float64), limits, seeding, the model."""

from __future__ import annotations

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.functional.global_local import BigBirdPattern, bigbird_attention
from efficient_transformers.functional.patterns import dense_pattern_mask
from helpers import (
    assert_classifier_trains, assert_values_and_gradients_match,
    max_abs_diff, random_mask, small_attention,
)




def block_adjacency(pattern: BigBirdPattern) -> torch.Tensor:
    return pattern.tables()[1]


def test_pattern_has_sliding_random_and_global_blocks():
    pattern = BigBirdPattern(block=4, n_blocks=20, num_random=3, num_global=2, seed=1)
    adj = block_adjacency(pattern)
    assert adj[:2].all() and adj[:, :2].all()                    # global rows and columns
    for a in range(2, 20):
        sliding = {b for b in (a - 1, a, a + 1) if 0 <= b < 20}
        seen = set(adj[a].nonzero().flatten().tolist())
        assert sliding | {0, 1} <= seen
        assert len(seen - sliding - {0, 1}) == 3                 # exactly r random blocks
    # key blocks hold every allowed key of the non-global rows
    blocks = pattern.key_blocks(20, 4)
    assert blocks.shape[1] == 3 + 3 + 2
    for a in range(2, 20):
        assert set(blocks[a][blocks[a] >= 0].tolist()) == set(adj[a].nonzero().flatten().tolist())
    dense = dense_pattern_mask(pattern, 80)
    assert torch.equal(dense, adj.repeat_interleave(4, 0).repeat_interleave(4, 1))


def test_random_blocks_are_seeded():
    a = BigBirdPattern(4, 30, 3, 1, seed=5).tables()[0]
    b = BigBirdPattern(4, 30, 3, 1, seed=5).tables()[0]
    c = BigBirdPattern(4, 30, 3, 1, seed=6).tables()[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    l1 = et.build_attention("bigbird", dim=16, heads=2)
    torch.manual_seed(0)
    l2 = et.build_attention("bigbird", dim=16, heads=2)
    l3 = et.build_attention("bigbird", dim=16, heads=2)
    assert int(l1.random_seed) == int(l2.random_seed) != int(l3.random_seed)
    assert "random_seed" in l1.state_dict()  # saved with the weights


def test_random_blocks_do_not_depend_on_the_batch():
    attn = small_attention("bigbird")
    x = torch.randn(3, 37, 16, dtype=torch.float64)
    full = attn(x)
    for i in range(3):
        assert max_abs_diff(attn(x[i:i + 1]), full[i:i + 1]) < 1e-12


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n,block,r,g", [(37, 4, 2, 1), (50, 5, 1, 2), (23, 3, 3, 0), (9, 4, 2, 1)])
def test_blocked_path_equals_oracle(padded, n, block, r, g):
    b, h, d = 2, 2, 4
    q, k, v = rand(b, h, n, d), rand(b, h, n, d), rand(b, h, n, d)
    key_mask = random_mask(b, n) if padded else None
    fast = bigbird_attention(q, k, v, block, r, g, seed=3, key_mask=key_mask)
    pattern = BigBirdPattern(block, -(-n // block), r, g, 3)
    allowed = dense_pattern_mask(pattern, n)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    slow = naive_attention(q, k, v, allowed)
    real = torch.ones(b, n, dtype=torch.bool) if key_mask is None else key_mask
    assert_values_and_gradients_match(fast, slow, (q, k, v), real[:, None, :, None], tol=1e-12)


@pytest.mark.parametrize("n,block,r,g", [(16, 4, 2, 0), (20, 32, 1, 1), (30, 5, 3, 1), (12, 4, 0, 3)])
def test_blocks_covering_everything_is_full_attention(n, block, r, g):
    # n_blocks <= 3 + r + g, or the global blocks hold the whole sequence
    q, k, v = rand(2, 2, n, 4), rand(2, 2, n, 4), rand(2, 2, n, 4)
    mask = random_mask(2, n)
    fast = bigbird_attention(q, k, v, block, r, g, seed=0, key_mask=mask)
    slow = naive_attention(q, k, v, mask[:, None, None, :])
    sel = mask[:, None, :, None].expand_as(fast)
    assert max_abs_diff(fast[sel], slow[sel]) < 1e-12


def test_options_are_checked():
    with pytest.raises(ValueError, match="block_size"):
        et.build_attention("bigbird", dim=16, heads=2, block_size=0)
    with pytest.raises(ValueError, match="num_random_blocks"):
        et.build_attention("bigbird", dim=16, heads=2, num_random_blocks=-1)
    with pytest.raises(ValueError, match="causal"):
        et.build_attention("bigbird", dim=16, heads=2, causal=True)


def test_model_trains(one_thread):
    assert_classifier_trains("bigbird", block_size=4, num_random_blocks=2, num_global=1)


@pytest.mark.gpu
def test_cuda_path_equals_cpu_path():
    attn = small_attention("bigbird", dtype=torch.float32, block_size=16)
    x = torch.randn(2, 300, 16)
    mask = random_mask(2, 300)
    ref = attn(x, mask)
    out = attn.cuda()(x.cuda(), mask.cuda()).cpu()
    assert max_abs_diff(out[mask], ref[mask]) < 1e-4
