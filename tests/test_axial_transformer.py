"""axial_transformer: oracle (2-D and 3-D, causal, padded), limits, decode, model."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.bench.traffic import OperatorTraffic
from efficient_transformers.functional import axial
from efficient_transformers.functional.axial import axial_attention, axial_attention_reference
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.functional.patterns import dense_pattern_mask
from helpers import (
    DIM, HEADS, assert_values_and_gradients_match, max_abs_diff, random_mask, small_attention,
)
from test_kernels import saved_bytes
from test_patterns import check_decode, check_oracle, train_steps


@pytest.mark.parametrize("shape", [(5, 8), (3, 3, 4), None])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_core_equals_oracle(shape, causal, padded):
    attn = small_attention("axial_transformer", causal=causal, shape=shape)
    n = 34
    check_oracle(attn.core, dense_pattern_mask(attn.pattern(n), n), n, padded)


@pytest.fixture(params=[False, True], ids=["head_by_head", "heads_folded"])
def fold_heads(request, monkeypatch):
    """The fused node head by head (the CPU's choice) and with the heads folded into the batch
    (the CUDA one), forced on the CPU."""
    monkeypatch.setattr(axial, "FOLD_HEADS", request.param)
    return request.param


@pytest.mark.parametrize("shape", [(5, 8), (3, 3, 4), None])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_axial_equals_part_by_part_reference(shape, causal, padded, fold_heads):
    # one autograd node against attention_with_lse per part merged by merge_attention_parts:
    # out and lse, values and gradients (the lse alone too: its gradient path without d_out)
    gen = torch.Generator().manual_seed(1)
    n = 34
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64, generator=gen).requires_grad_()
               for _ in range(3))
    mask = random_mask(2, n, generator=gen) if padded else None
    fast = lambda: axial_attention(q, k, v, shape, causal, mask)  # noqa: E731
    slow = lambda: axial_attention_reference(q, k, v, shape, causal, mask)  # noqa: E731
    has_keys = torch.isfinite(slow()[1])
    assert torch.equal(torch.isfinite(fast()[1]), has_keys)
    assert_values_and_gradients_match(fast()[0], slow()[0], [q, k, v], tol=1e-12)
    assert_values_and_gradients_match(fast()[1], slow()[1], [q, k, v], real=has_keys, tol=1e-12)
    both = lambda o, l: o.sum(-1) + l.masked_fill(~has_keys, 0.0)  # noqa: E731
    assert_values_and_gradients_match(both(*fast()), both(*slow()), [q, k, v], tol=1e-12)


def test_heads_fold_on_cuda_only_and_cut_the_operator_count(monkeypatch):
    q = torch.zeros(1, 2, 8, 4)
    assert not axial.folds_heads(q)                     # CPU: head by head (cache, memory)

    def calls(fold):
        monkeypatch.setattr(axial, "FOLD_HEADS", fold)
        attn = small_attention("axial_transformer", shape=(5, 8), dtype=torch.float32,
                               dim=32, heads=8)
        x = torch.randn(1, 40, 32, requires_grad=True)
        with OperatorTraffic() as count:
            attn(x).square().sum().backward()
        return sum(row[0] for row in count.rows.values())

    assert calls(True) < calls(False) / 3   # one pass over the parts, not one per head


@pytest.mark.parametrize("causal", [False, True])
def test_layer_saves_no_probabilities(causal):
    # x, the qkv projection, the attention output (shared with the output projection's input),
    # the lse and the weights: nothing of size N·s per head
    attn = small_attention("axial_transformer", causal=causal, dtype=torch.float32)
    x = torch.randn(2, 40, DIM, requires_grad=True)
    weights = sum(p.numel() for p in attn.parameters())
    expected = 4 * ((1 + 3 + 1) * x.numel() + 2 * HEADS * 40 + weights)
    assert saved_bytes(lambda: attn(x)) <= expected


@pytest.mark.parametrize("causal", [False, True])
def test_a_single_row_is_full_attention(causal):
    n = 13
    attn = small_attention("axial_transformer", causal=causal, shape=(1, n))
    full = torch.ones(n, n, dtype=torch.bool)
    full = full.tril() if causal else full
    assert torch.equal(dense_pattern_mask(attn.pattern(n), n), full)
    q, k, v = torch.randn(3, 1, 2, n, 8, dtype=torch.float64)
    assert max_abs_diff(attn.core(q, k, v), naive_attention(q, k, v, full)) < 1e-12


def test_two_layers_reach_every_earlier_pixel():
    n = 20
    mask = dense_pattern_mask(small_attention("axial_transformer", causal=True, shape=(4, 5)).pattern(n), n)
    two = (mask.double() @ mask.double()) > 0
    assert torch.equal(two, torch.ones(n, n, dtype=torch.bool).tril())


def test_decode_3d_pixel_by_pixel():
    check_decode(small_attention("axial_transformer", causal=True, shape=(3, 3, 4)), n=36)


def test_options_are_checked():
    with pytest.raises(ValueError, match="shape"):
        et.build_attention("axial_transformer", dim=16, heads=2, shape=(16,))
    with pytest.raises(ValueError, match="shape"):
        et.build_attention("axial_transformer", dim=16, heads=2, shape=(4, 0))
    attn = et.build_attention("axial_transformer", dim=16, heads=2, causal=True)
    with pytest.raises(ValueError, match="shape"):
        attn.decode(torch.randn(1, 2, 16))


def test_model_trains_and_generates():
    torch.manual_seed(0)
    model = et.build_model("axial_transformer", dim=32, depth=2, heads=2, max_len=42, shape=[6, 7])
    tokens = torch.randint(0, 256, (2, 42))
    train_steps(model, tokens)
    assert model.generate(tokens[:, :3], max_new_tokens=39).shape == (2, 42)
