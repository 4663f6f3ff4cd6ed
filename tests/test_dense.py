"""The SDPA fast path against the naive oracle: values and gradients, float64."""

import pytest
import torch

from efficient_transformers.functional.dense import (
    causal_allowed, dense_allowed, masked_softmax, naive_attention, sdpa_attention, softmax_,
)
from helpers import assert_values_and_gradients_match, max_abs_diff, random_mask


def qkv(b=2, h=3, n=19, d=8, m=None):
    m = n if m is None else m
    q = torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, m, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, m, d, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_equals_oracle_values_and_gradients(causal, padded):
    q, k, v = qkv()
    mask = random_mask(2, 19) if padded else None
    fast = sdpa_attention(q, k, v, causal=causal, key_mask=mask)
    slow = naive_attention(q, k, v, dense_allowed(19, causal, mask))
    real = mask if mask is not None else torch.ones(2, 19, dtype=torch.bool)
    # compare at real query positions
    assert_values_and_gradients_match(fast, slow, (q, k, v), real[:, None, :, None], tol=1e-12)


def test_sdpa_with_offset_is_bottom_right_causal():
    q, k, v = qkv(n=4, m=11)
    fast = sdpa_attention(q, k, v, causal=True, offset=7)
    slow = naive_attention(q, k, v, causal_allowed(4, 11, offset=7))
    assert max_abs_diff(fast, slow) < 1e-12


def test_masked_softmax_empty_rows_are_zero_and_rows_sum_to_one():
    scores = torch.randn(3, 5, dtype=torch.float64)
    allowed = torch.tensor([[True] * 5, [False] * 5, [True, False, True, False, False]])
    w = masked_softmax(scores, allowed)
    assert torch.equal(w[1], torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(w[[0, 2]].sum(-1), torch.ones(2, dtype=torch.float64))
    assert (w[~allowed] == 0).all()


def test_oracle_matches_the_textbook_formula():
    q, k, v = qkv(b=1, h=1, n=6, d=4)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    assert max_abs_diff(naive_attention(q, k, v), expected) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_softmax_in_place_equals_softmax_and_reuses_the_tensor(dtype):
    scores = torch.randn(3, 5, 7, dtype=torch.float64).to(dtype)
    scores[0, 1, :4] = torch.finfo(dtype).min  # masked entries, as the fast paths fill them
    expected = torch.softmax(scores, dim=-1)
    work = scores.clone()
    out = softmax_(work)
    assert out.data_ptr() == work.data_ptr()
    assert max_abs_diff(out, expected) == 0
