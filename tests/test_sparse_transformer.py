"""sparse_transformer: strided / fixed, merged / split heads, against the oracle; limits; decode."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.functional.patterns import dense_pattern_mask
from helpers import max_abs_diff, small_attention
from test_patterns import check_decode, check_oracle, train_steps

VARIANTS = [{"pattern": p, "combine": c, "stride": 4, "summary_size": 2}
            for p in ("strided", "fixed") for c in ("merged", "split")]


def head_masks(attn, n):
    """(H, N, N): the pattern of each head (split: first half A(1), second half A(2))."""
    patterns = attn.patterns()
    per = attn.heads // len(patterns)
    return torch.stack([dense_pattern_mask(p, n) for p in patterns for _ in range(per)])


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: f"{o['pattern']}-{o['combine']}")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_core_equals_oracle(options, causal, padded):
    attn = small_attention("sparse_transformer", causal=causal, **options)
    n = 30
    check_oracle(attn.core, head_masks(attn, n), n, padded)


@pytest.mark.parametrize("options", VARIANTS[1:], ids=lambda o: f"{o['pattern']}-{o['combine']}")
def test_decode_matches_causal_forward(options):
    check_decode(small_attention("sparse_transformer", causal=True, **options))


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("causal", [False, True])
def test_stride_covering_everything_is_full_attention(pattern, causal):
    n = 17
    attn = small_attention("sparse_transformer", causal=causal, pattern=pattern, stride=n, summary_size=1)
    full = torch.ones(n, n, dtype=torch.bool)
    full = full.tril() if causal else full
    assert torch.equal(head_masks(attn, n)[0], full)
    q, k, v = torch.randn(3, 1, 2, n, 8, dtype=torch.float64)
    assert max_abs_diff(attn.core(q, k, v), naive_attention(q, k, v, full)) < 1e-12


def test_options_are_checked():
    with pytest.raises(ValueError, match="pattern"):
        et.build_attention("sparse_transformer", dim=16, heads=2, pattern="dilated")
    with pytest.raises(ValueError, match="summary_size"):
        et.build_attention("sparse_transformer", dim=16, heads=2, stride=4, summary_size=5)
    with pytest.raises(ValueError, match="combine"):
        et.build_attention("sparse_transformer", dim=16, heads=1, combine="split")


def test_model_trains():
    torch.manual_seed(0)
    model = et.build_model("sparse_transformer", dim=32, depth=2, heads=2, max_len=64, stride=5,
                           pattern="fixed", summary_size=2, combine="split")
    train_steps(model, torch.randint(0, 256, (2, 40)))
