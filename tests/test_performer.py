"""performer: FAVOR+ layer against the naive definition, approximation error vs exact softmax,
random-feature redraws, stabilisation (causal, fp16), decode state, a model that trains."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional.dense import dense_allowed, naive_attention
from efficient_transformers.functional.kernels import (
    causal_linear_attention, linear_attention, orthogonal_gaussian, softmax_feature_map,
    softmax_key_features,
)
from helpers import linear_attention_oracle, DIM, assert_values_and_gradients_match, max_abs_diff, random_mask, small_attention, train_losses

N = 29


oracle = linear_attention_oracle


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_layer_equals_oracle_values_and_gradients(kernel, causal, padded):
    attn = small_attention("performer", causal=causal, kernel=kernel, chunk_size=4)
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, N) if padded else None
    fast, slow = attn(x, mask), oracle(attn, x, mask)
    assert_values_and_gradients_match(fast, slow, [x] + list(attn.parameters()), tol=1e-12, grad_tol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
def test_approximation_error_falls_as_features_grow(causal):
    gen = torch.Generator().manual_seed(0)
    b, h, n, d = 1, 2, 48, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, generator=gen) for _ in range(3))
    q, k = q * 0.5, k * 0.5  # FAVOR+ variance grows as exp(|q + k|²/√d): stay in its regime
    allowed = dense_allowed(n, causal, None)
    exact = naive_attention(q, k, v, allowed)
    errors = []
    for m in (8, 64, 512, 4096):
        err = 0.0
        for seed in range(4):
            torch.manual_seed(seed)
            omega = orthogonal_gaussian(m, d, dtype=torch.float64)
            phi_q = softmax_feature_map(q, omega, is_query=True)
            if causal:
                psi_k, log_scale = softmax_key_features(k, omega)
                approx = causal_linear_attention(phi_q, psi_k, v, chunk_size=16,
                                                 key_log_scale=log_scale)
            else:
                approx = linear_attention(phi_q, softmax_feature_map(k, omega, is_query=False), v)
            err += (approx - exact).abs().mean().item() / 4
        errors.append(err)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 8, errors  # ~1/sqrt(m): 4096/8 = 512 = 22²


def test_redraw_every_k_training_calls_never_in_eval_and_seeded():
    torch.manual_seed(0)
    attn = et.build_attention("performer", dim=DIM, heads=2, features=8, redraw_interval=3)
    x = torch.randn(1, 5, DIM, generator=torch.Generator().manual_seed(1))
    seen = [attn.omega.clone()]
    for _ in range(7):
        attn(x)
        seen.append(attn.omega.clone())
    # calls 1-3 use the initial draw, calls 4-6 the second, call 7 the third
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[3], seen[0])
    assert not torch.equal(seen[4], seen[3]) and torch.equal(seen[6], seen[4])
    assert not torch.equal(seen[7], seen[6])
    attn.eval()
    fixed = attn.omega.clone()
    y = attn(x)
    for _ in range(5):
        assert torch.equal(attn(x), y)
    assert torch.equal(attn.omega, fixed)
    # the same seed gives the same sequence of draws
    torch.manual_seed(0)
    again = et.build_attention("performer", dim=DIM, heads=2, features=8, redraw_interval=3)
    for _ in range(7):
        again(x)
    assert torch.equal(again.omega, seen[7])
    never = et.build_attention("performer", dim=DIM, heads=2, features=8, redraw_interval=0)
    first = never.omega.clone()
    for _ in range(3):
        never(x)
    assert torch.equal(never.omega, first)


def test_features_are_saved_with_the_model(tmp_path):
    torch.manual_seed(0)
    model = et.build_model("performer", task="lm", vocab_size=11, dim=16, depth=1, heads=2,
                           max_len=32, features=8).eval()
    tokens = torch.randint(0, 11, (2, 9))
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    loaded = et.load_pretrained(tmp_path).eval()
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_causal_rows_ignore_extreme_future_values():
    attn = small_attention("performer", causal=True)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    y = attn(x)
    x2 = x.clone()
    x2[:, 10:] *= 200  # would dominate a max taken over all keys
    y2 = attn(x2)
    assert max_abs_diff(y[:, :10], y2[:, :10]) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_inputs_stay_finite_in_half_precision(causal, dtype):
    attn = small_attention("performer", causal=causal, dtype=dtype).train()
    x = (torch.randn(2, 300, DIM) * 30.0).to(dtype).requires_grad_()
    y = attn(x, random_mask(2, 300))
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_stay_finite_at_attention_logits_of_thousands(causal):
    """Inputs 60x a LayerNorm's scale: logits q·k/√d up to ~7000, where a query's features and
    the keys' overlap by less than 1e-19 and the normaliser's square (in the division's gradient)
    underflowed: NaN gradients in float32 for 3 to 5 of these 5 seeds before."""
    for seed in range(5):
        attn = small_attention("performer", causal=causal, dtype=torch.float32, seed=seed).train()
        torch.manual_seed(seed)
        x = (torch.randn(2, 40, DIM) * 60.0).requires_grad_()
        y = attn(x, random_mask(2, 40))
        y.square().mean().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_causal_keys_of_large_norm_keep_their_weight_in_float32():
    # keys whose features are ~e^-150 below the bound max|ω|²/2: a shared data-independent shift
    # would underflow them in float32; each key's own log-scale keeps the float64 result
    attn = small_attention("performer", causal=True, features=64, chunk_size=8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        attn.to_qkv.weight[DIM:2 * DIM] *= 12.0            # key rows: norms far above the queries'
        exact = attn(x)
        _, _, log_scale = attn.feature_maps(*attn.qkv(x)[:2], None)
        assert log_scale.min() < -150                        # exp(-150) is 0 in float32
        fast = attn.float()(x.float())
    assert torch.isfinite(fast).all()
    assert max_abs_diff(fast.double(), exact) < 1e-4 * (1 + exact.abs().max().item())


def test_decode_state_does_not_grow():
    attn = small_attention("performer", causal=True)
    x = torch.randn(1, 30, DIM, dtype=torch.float64)
    y, state = attn.decode(x[:, :1])
    size, outs = et.state_nbytes(state), [y]
    for i in range(1, 30):
        y, state = attn.decode(x[:, i:i + 1], state)
        assert et.state_nbytes(state) == size
        outs.append(y)
    assert max_abs_diff(torch.cat(outs, dim=1), attn(x)) < 1e-10


@pytest.mark.parametrize("option,value", [("features", 0), ("kernel", "cosine"),
                                          ("redraw_interval", -1), ("chunk_size", 0)])
def test_bad_options_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        et.build_attention("performer", dim=DIM, heads=2, **{option: value})


def test_language_model_trains():
    torch.manual_seed(0)
    model = et.build_model("performer", task="lm", vocab_size=17, dim=16, depth=1, heads=2,
                           max_len=64, features=32)
    tokens = torch.randint(0, 17, (2, 16))
    losses = train_losses(model, tokens, tokens)
    assert losses[-1] < losses[0]
