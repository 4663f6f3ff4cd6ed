"""The fused FAVOR+ feature node (`functional.favor`) against the eager feature maps it replaces
(`kernels.softmax_feature_map`, `kernels.softmax_key_features`): values, log-scales and
gradients in float64, with padding, a fully padded row and keys of large norm."""

import pytest
import torch

from efficient_transformers.functional.favor import (
    fused_softmax_feature_map, fused_softmax_key_features,
)
from efficient_transformers.functional.kernels import (
    orthogonal_gaussian, softmax_feature_map, softmax_key_features,
)
from helpers import assert_values_and_gradients_match, max_abs_diff, random_mask

B, H, N, D, M = 2, 3, 17, 8, 12


def features_input(seed: int, key_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    x = (key_scale * torch.randn(B, H, N, D, dtype=torch.float64, generator=gen)).requires_grad_()
    omega = orthogonal_gaussian(M, D).to(torch.float64)
    return x, omega


def masks():
    gen = torch.Generator().manual_seed(3)
    padded = random_mask(B, N, generator=gen)
    empty_row = padded.clone()
    empty_row[1] = False            # a batch row with no real key at all
    return [None, padded, empty_row]


@pytest.mark.parametrize("mask_index", [0, 1, 2])
@pytest.mark.parametrize("is_query", [True, False])
def test_fused_feature_map_equals_reference(is_query, mask_index):
    x, omega = features_input(seed=mask_index)
    mask = None if is_query else masks()[mask_index]
    fast = fused_softmax_feature_map(x, omega, is_query=is_query, key_mask=mask)
    slow = softmax_feature_map(x, omega, is_query=is_query, key_mask=mask)
    assert (fast > 0).any() and torch.isfinite(fast).all()
    assert_values_and_gradients_match(fast, slow, (x,), tol=1e-12)


@pytest.mark.parametrize("mask_index", [0, 1, 2])
@pytest.mark.parametrize("key_scale", [1.0, 6.0])
def test_fused_key_features_equal_reference(mask_index, key_scale):
    """ψ and μ equal; the gradient through ψ too (μ carries none in either); large-norm keys
    spread μ over tens of nats."""
    x, omega = features_input(seed=10 + mask_index, key_scale=key_scale)
    mask = masks()[mask_index]
    psi, mu = fused_softmax_key_features(x, omega, mask)
    ref_psi, ref_mu = softmax_key_features(x, omega, mask)
    assert max_abs_diff(mu, ref_mu) < 1e-12
    assert not mu.requires_grad
    if key_scale > 1:
        assert (mu.max() - mu[mu > -1e29].min()) > 20
    assert_values_and_gradients_match(psi, ref_psi, (x,), tol=1e-12)


def test_fused_features_gradient_w_r_t_omega():
    """The node's ω gradient (unused by the layer, whose ω is a buffer) against the reference."""
    x, omega = features_input(seed=5)
    omega.requires_grad_()
    for role in (True, False):
        fast = fused_softmax_feature_map(x, omega, is_query=role)
        slow = softmax_feature_map(x, omega, is_query=role)
        assert_values_and_gradients_match(fast, slow, (x, omega), tol=1e-12)


def test_fused_features_gradcheck():
    """Numerical gradients of what the stabilisers cancel in: query rows normalised, key
    features normalised per head, causal keys as exp(μ) ψ (the stabiliser has no gradient by
    design, so the features alone would not pass)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    omega = orthogonal_gaussian(6, 4).to(torch.float64)
    mask = torch.tensor([[True, False, True, True, False]])

    def query_rows(t):
        phi = fused_softmax_feature_map(t, omega, True)
        return phi / phi.sum(dim=-1, keepdim=True)

    def keys_per_head(t):
        phi = fused_softmax_feature_map(t, omega, False, key_mask=mask)
        return phi / phi.sum(dim=(-1, -2), keepdim=True)

    def causal_keys(t):
        psi, mu = fused_softmax_key_features(t, omega, mask)
        return psi * mu.exp()[..., None]

    for fn in (query_rows, keys_per_head, causal_keys):
        assert torch.autograd.gradcheck(fn, (x,))


def test_fused_features_without_autograd_equal_reference():
    """Decode and inference steps skip the autograd node: same values."""
    x, omega = features_input(seed=8, key_scale=4.0)
    mask = masks()[1]
    with torch.no_grad():
        for is_query in (True, False):
            fast = fused_softmax_feature_map(x, omega, is_query, key_mask=mask)
            assert max_abs_diff(fast, softmax_feature_map(x, omega, is_query, key_mask=mask)) < 1e-12
        psi, mu = fused_softmax_key_features(x, omega, mask)
        ref_psi, ref_mu = softmax_key_features(x, omega, mask)
        assert max_abs_diff(psi, ref_psi) < 1e-12 and max_abs_diff(mu, ref_mu) < 1e-12
