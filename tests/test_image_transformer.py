"""image_transformer: oracle (1-D and 2-D local), limits, decode, the image model."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.functional.patterns import dense_pattern_mask
from efficient_transformers.models.images import images_to_tokens, tokens_to_images
from helpers import max_abs_diff, small_attention
from test_patterns import check_decode, check_oracle, train_steps

OPTIONS_1D = {"mode": "1d", "block_size": 4, "window": 6, "shape": None}
OPTIONS_2D = {"mode": "2d", "shape": (6, 7), "query_shape": (2, 3), "memory_flange": (2, 2)}


@pytest.mark.parametrize("options", [OPTIONS_1D, {"mode": "1d", "block_size": 5, "window": 3, "shape": None}, OPTIONS_2D])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_core_equals_oracle(options, causal, padded):
    attn = small_attention("image_transformer", causal=causal, **options)
    n = 33
    check_oracle(attn.core, dense_pattern_mask(attn.pattern(n), n), n, padded)


@pytest.mark.parametrize("causal", [False, True])
def test_collapses_to_full_attention(causal):
    n = 19
    full = torch.ones(n, n, dtype=torch.bool)
    full = full.tril() if causal else full
    for options in ({"mode": "1d", "block_size": 4, "window": n}, {"mode": "1d", "block_size": 32, "window": 0},
                    {"mode": "2d", "shape": (4, 5), "query_shape": (4, 5), "memory_flange": (0, 0)},
                    {"mode": "2d", "shape": (4, 5), "query_shape": (1, 2), "memory_flange": (4, 5)}):
        attn = small_attention("image_transformer", causal=causal, **options)
        assert torch.equal(dense_pattern_mask(attn.pattern(n), n), full), options
        q, k, v = torch.randn(3, 1, 2, n, 8, dtype=torch.float64)
        assert max_abs_diff(attn.core(q, k, v), naive_attention(q, k, v, full)) < 1e-12


def test_decode_1d_is_exact_and_keeps_a_bounded_cache():
    attn = small_attention("image_transformer", causal=True, **OPTIONS_1D)
    state = check_decode(attn, n=45)
    assert state["k"].shape[2] <= OPTIONS_1D["window"] + OPTIONS_1D["block_size"]


def test_decode_2d_keeps_the_rows_in_reach():
    attn = small_attention("image_transformer", causal=True, **OPTIONS_2D)
    state = check_decode(attn, n=42)
    hq, hm, w = 2, 2, 7
    assert state["k"].shape[2] <= (hq + hm) * w


def test_options_are_checked():
    with pytest.raises(ValueError, match="mode"):
        et.build_attention("image_transformer", dim=16, heads=2, mode="3d")
    with pytest.raises(ValueError, match="query_shape"):
        et.build_attention("image_transformer", dim=16, heads=2, query_shape=(0, 2))
    with pytest.raises(ValueError, match="shape"):
        et.build_attention("image_transformer", dim=16, heads=2, shape=(2, 3, 4))
    attn = et.build_attention("image_transformer", dim=16, heads=2, causal=True, mode="2d")
    with pytest.raises(ValueError, match="shape"):
        attn.decode(torch.randn(1, 3, 16))
    attn = et.build_attention("image_transformer", dim=16, heads=2, shape=[4, 4])  # JSON list
    with pytest.raises(ValueError, match="max_len"):
        attn(torch.randn(1, 17, 16))


def test_image_model_trains_and_generates_images():
    torch.manual_seed(0)
    model = et.build_model("image_transformer", shape=(4, 6), mode="2d", query_shape=(2, 3),
                           memory_flange=(1, 2), dim=32, depth=2, heads=2)
    images = torch.randint(0, 256, (3, 4, 6))
    train_steps(model, images_to_tokens(images))
    out = model.generate(images_to_tokens(images)[:, :5], max_new_tokens=19, temperature=0)
    assert tokens_to_images(out, (4, 6)).shape == (3, 4, 6)
    one_d = et.build_model("image_transformer", dim=32, depth=1, heads=2, block_size=4, window=4, max_len=32)
    train_steps(one_d, torch.randint(0, 256, (2, 30)))


def test_images_become_tokens_only_from_whole_intensities():
    images = torch.randint(0, 256, (2, 4, 6))
    assert torch.equal(images_to_tokens(images.float()), images.reshape(2, 24))
    with pytest.raises(ValueError, match="whole intensities"):   # [0, 1] images: all token 0
        images_to_tokens(images.float() / 255)
    with pytest.raises(ValueError, match=r"intensities in \[0, 255\]"):
        images_to_tokens(images + 256)
    with pytest.raises(ValueError, match="images: expected a tensor"):
        images_to_tokens(images[0, 0])
