"""The influence maps behind `efficient-transformers patterns`."""

from __future__ import annotations

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.visualize import influence_map, jacobian_by_copies, mechanism_map
from helpers import both_modes, small_attention

N = 16


@pytest.mark.parametrize("name,causal", both_modes(et.list_attention()))
def test_every_mechanism_draws_its_map(name, causal):
    # fused nodes (linear_transformer, routing) run backward once: the map must not need more
    weights = mechanism_map(name, length=N, causal=causal, dim=16)
    assert weights.shape == (N, N) and torch.isfinite(weights).all()
    assert torch.allclose(weights.amax(dim=1), torch.ones(N, dtype=weights.dtype))
    if causal:
        assert weights.triu(1).abs().max() == 0, "a causal map reaches a later position"


def test_jacobian_by_copies_equals_autograds_jacobian():
    attn = small_attention("transformer", causal=True)
    x = torch.randn(7, 16, dtype=torch.float64)
    expected = torch.autograd.functional.jacobian(lambda t: attn(t[None])[0], x)
    assert torch.allclose(jacobian_by_copies(attn, x, chunk=10), expected, atol=1e-12)


def test_dense_causal_map_is_the_lower_triangle():
    attn = small_attention("transformer", causal=True)
    weights = influence_map(attn, torch.randn(N, 16, dtype=torch.float64))
    assert torch.equal(weights > 0, torch.ones(N, N, dtype=torch.bool).tril())


def test_patterns_command_draws_one_map_and_refuses_a_bad_length(tmp_path, capsys):
    from efficient_transformers.cli import main

    assert main(["patterns", "longformer", "window=2", "--length", "12",
                 "--out", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "map.png").stat().st_size > 0
    for length in ("0", "-5"):   # -5 was a RuntimeError from torch
        assert main(["patterns", "transformer", "--length", length]) == 2
        assert "--length: expected an integer >= 2" in capsys.readouterr().err
