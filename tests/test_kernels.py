"""Linear attention: parallel, chunked causal and recurrent forms against the naive definition
(values and gradients, float64), state continuation, and the memory the chunked form promises."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from efficient_transformers.functional.dense import causal_allowed, padding_allowed
from efficient_transformers.functional.fused_linear import projected_elu_linear_attention
from efficient_transformers.functional.kernels import (
    causal_linear_attention, elu_feature_map, linear_attention, mask_features,
    naive_linear_attention, orthogonal_gaussian, recurrent_linear_attention, relu_feature_map,
    softmax_feature_map, softmax_key_features,
)
from helpers import assert_values_and_gradients_match, max_abs_diff, random_mask

B, H, N, M, D = 2, 3, 23, 7, 5


def inputs(padded: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    phi_q = elu_feature_map(torch.randn(B, H, N, M, dtype=torch.float64, generator=gen))
    phi_k = elu_feature_map(torch.randn(B, H, N, M, dtype=torch.float64, generator=gen))
    v = torch.randn(B, H, N, D, dtype=torch.float64, generator=gen)
    mask = random_mask(B, N, generator=gen) if padded else None
    return [t.requires_grad_() for t in (phi_q, phi_k, v)], mask


def grads(out, tensors, seed=1):
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, tensors, upstream, retain_graph=True)


def assert_same(a, b, tensors, tol=1e-12):  # noqa: D103 (values, then gradients)
    assert max_abs_diff(a, b) < tol
    for ga, gb in zip(grads(a, tensors), grads(b, tensors)):
        assert max_abs_diff(ga, gb) < tol


@pytest.mark.parametrize("padded", [False, True])
def test_parallel_form_equals_oracle(padded):
    (q, k, v), mask = inputs(padded)
    fast = linear_attention(q, mask_features(k, mask), v)
    allowed = None if mask is None else padding_allowed(mask)
    assert_same(fast, naive_linear_attention(q, k, v, allowed), (q, k, v))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
def test_chunked_causal_equals_oracle_and_recurrent(padded, chunk):
    (q, k, v), mask = inputs(padded, seed=chunk)
    km = mask_features(k, mask)
    fast = causal_linear_attention(q, km, v, chunk_size=chunk)
    allowed = causal_allowed(N, N)
    if mask is not None:
        allowed = allowed & padding_allowed(mask)
    assert_same(fast, naive_linear_attention(q, k, v, allowed), (q, k, v))
    recurrent, _ = recurrent_linear_attention(q, km, v)
    assert_same(fast, recurrent, (q, k, v))


def test_chunked_form_continues_from_a_state():
    (q, k, v), _ = inputs(False, seed=5)
    full, full_state = causal_linear_attention(q, k, v, chunk_size=4, return_state=True)
    cut = 10
    first, state = causal_linear_attention(q[..., :cut, :], k[..., :cut, :], v[..., :cut, :],
                                           chunk_size=8, return_state=True)
    second, state = causal_linear_attention(q[..., cut:, :], k[..., cut:, :], v[..., cut:, :],
                                            chunk_size=3, state=state, return_state=True)
    assert max_abs_diff(torch.cat([first, second], dim=-2), full) < 1e-12
    assert max_abs_diff(state, full_state) < 1e-12
    _, rnn_state = recurrent_linear_attention(q, k, v)
    assert rnn_state.shape == (B, H, M, D + 1)
    assert max_abs_diff(rnn_state, full_state) < 1e-10


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_form_never_builds_an_n_by_m_by_d_tensor():
    n, m, d, chunk = 1024, 32, 32, 64
    q = elu_feature_map(torch.randn(1, 1, n, m)).requires_grad_()
    k = elu_feature_map(torch.randn(1, 1, n, m)).requires_grad_()
    v = torch.randn(1, 1, n, d, requires_grad=True)
    with LargestTensor() as spy:
        causal_linear_attention(q, k, v, chunk_size=chunk).sum().backward()
    # inputs are N·m; the chunk products N·C; the per-chunk states N/C·m·(d+1)
    assert spy.largest <= max(n * m, n * chunk, n // chunk * m * (d + 1)) < n * m * d


def test_orthogonal_features_are_orthogonal_within_blocks_and_seeded():
    torch.manual_seed(3)
    omega = orthogonal_gaussian(20, 8, dtype=torch.float64)
    block = omega[:8]
    gram = block @ block.T
    assert max_abs_diff(gram - torch.diag(torch.diagonal(gram)), torch.zeros(8, 8)) < 1e-5
    torch.manual_seed(3)
    assert torch.equal(orthogonal_gaussian(20, 8, dtype=torch.float64), omega)


def test_favor_features_estimate_the_softmax_kernel():
    # E[φ(q)·φ(k)] = exp(qᵀk/√d) (Lemma 1), up to the stabilising constants, which cancel in the
    # ratio φ(q)·φ(k) / φ(q)·φ(k'): compare ratios of kernel values with many features
    torch.manual_seed(0)
    d = 4
    x = torch.randn(1, 1, 3, d, dtype=torch.float64) * 0.5
    omega = orthogonal_gaussian(100_000, d, dtype=torch.float64)
    phi_q = softmax_feature_map(x[..., :1, :], omega, is_query=True)
    phi_k = softmax_feature_map(x[..., 1:, :], omega, is_query=False)
    est = (phi_q @ phi_k.transpose(-1, -2)).flatten()
    exact = torch.exp(x[..., :1, :] @ x[..., 1:, :].transpose(-1, -2) / d ** 0.5).flatten()
    assert abs(est[0] / est[1] - exact[0] / exact[1]) < 0.02


def test_causal_key_features_do_not_depend_on_later_keys():
    torch.manual_seed(0)
    omega = orthogonal_gaussian(16, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 10, 8, dtype=torch.float64)
    k2 = k.clone()
    k2[..., 6:, :] *= 50  # far larger later keys
    (a, mu_a), (b, mu_b) = softmax_key_features(k, omega), softmax_key_features(k2, omega)
    assert torch.equal(a[..., :6, :], b[..., :6, :]) and torch.equal(mu_a[..., :6], mu_b[..., :6])
    # each key by itself: its largest feature is exactly 1/√m, whatever its norm
    assert torch.allclose(b.amax(dim=-1), torch.full_like(mu_b, 16 ** -0.5))
    assert torch.isfinite(mu_b).all() and mu_b[..., 6:].max() < mu_a[..., 6:].min()
    full = softmax_feature_map(k, omega, is_query=False)       # one shift per head: one ratio
    ratio = full / (a * mu_a.exp()[..., None])                  # (1, 2, 10, 16)
    assert max_abs_diff(ratio / ratio[..., :1, :1], torch.ones_like(ratio)) < 1e-12


def scaled_inputs(spread: float, dtype=torch.float64, seed: int = 0):
    """ψ-like key features (max 1 per key) with log-scales spread over `spread` nats."""
    gen = torch.Generator().manual_seed(seed)
    (q, k, v), _ = inputs(False, seed)
    k = (k / k.amax(dim=-1, keepdim=True)).detach().to(dtype).requires_grad_()
    mu = (torch.rand(B, H, N, dtype=torch.float64, generator=gen) - 0.5) * spread
    return q.detach().to(dtype).requires_grad_(), k, v.detach().to(dtype).requires_grad_(), mu.to(dtype)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
@pytest.mark.parametrize("padded", [False, True])
def test_scaled_causal_form_equals_oracle_and_recurrent(chunk, padded):
    q, k, v, mu = scaled_inputs(40.0, seed=chunk)
    mask = random_mask(B, N, generator=torch.Generator().manual_seed(chunk)) if padded else None
    km = mask_features(k, mask)
    fast = causal_linear_attention(q, km, v, chunk_size=chunk, key_log_scale=mu)
    allowed = causal_allowed(N, N)
    if mask is not None:
        allowed = allowed & padding_allowed(mask)
    slow = naive_linear_attention(q, k * mu.exp()[..., None], v, allowed)
    assert_same(fast, slow, (q, k, v), tol=1e-11)
    recurrent, _ = recurrent_linear_attention(q, km, v, key_log_scale=mu)
    assert_same(fast, recurrent, (q, k, v), tol=1e-11)


def test_scaled_causal_form_continues_from_a_state():
    q, k, v, mu = scaled_inputs(60.0, seed=3)
    full, (s_full, r_full) = causal_linear_attention(q, k, v, chunk_size=4, return_state=True,
                                                     key_log_scale=mu)
    cut = 10
    first, state = causal_linear_attention(q[..., :cut, :], k[..., :cut, :], v[..., :cut, :],
                                           chunk_size=8, return_state=True,
                                           key_log_scale=mu[..., :cut])
    second, (s, r) = causal_linear_attention(q[..., cut:, :], k[..., cut:, :], v[..., cut:, :],
                                             chunk_size=3, state=state, return_state=True,
                                             key_log_scale=mu[..., cut:])
    assert max_abs_diff(torch.cat([first, second], dim=-2), full) < 1e-12
    assert torch.equal(r, r_full) and torch.equal(r_full, mu.amax(dim=-1))
    assert max_abs_diff(s, s_full) < 1e-12
    _, (s_rnn, r_rnn) = recurrent_linear_attention(q, k, v, key_log_scale=mu)
    assert torch.equal(r_rnn, r_full) and max_abs_diff(s_rnn, s_full) < 1e-10


def test_scaled_causal_form_keeps_keys_far_below_the_largest_in_float32():
    # log-scales 300 nats apart: exp(μ) alone over- and underflows float32, the scaled form not
    q, k, v, mu = scaled_inputs(300.0, dtype=torch.float64, seed=4)
    slow = naive_linear_attention(q, k * mu.exp()[..., None], v, causal_allowed(N, N))
    fast = causal_linear_attention(q.float(), k.float(), v.float(), chunk_size=4,
                                   key_log_scale=mu.float())
    assert torch.isfinite(fast).all()
    assert max_abs_diff(fast.double(), slow) < 1e-4


def test_padded_keys_have_zero_features_and_gradients():
    torch.manual_seed(0)
    omega = orthogonal_gaussian(16, 8, dtype=torch.float32)
    k = (torch.randn(2, 1, 9, 8) * 40).requires_grad_()  # padded values would overflow exp
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 4:] = False
    phi = softmax_feature_map(k, omega, is_query=False, key_mask=mask)
    assert (phi[..., 4:, :] == 0).all() and torch.isfinite(phi).all()
    phi.sum().backward()
    assert torch.isfinite(k.grad).all() and (k.grad[..., 4:, :] == 0).all()


def test_relu_features_are_positive():
    torch.manual_seed(0)
    phi = relu_feature_map(torch.randn(1, 1, 5, 8), orthogonal_gaussian(16, 8))
    assert (phi > 0).all()


# ------------------------------------------------ the fused layer form against its composition
DIM_IN, HEADS = 12, 3


def layer_inputs(dtype=torch.float64, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, DIM_IN, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(3 * DIM_IN, DIM_IN, generator=gen) * 0.4).to(dtype).requires_grad_()
    b = (torch.randn(3 * DIM_IN, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    return x, weight, b, gen


def composed_layer_form(x, weight, bias, heads, causal, mask, chunk):
    """The reference: projection, heads split, φ, padded keys zeroed, the parallel or the chunked
    causal form, heads merged."""
    b, n, _ = x.shape
    q, k, v = (t.view(b, n, heads, -1).transpose(1, 2).double()
               for t in F.linear(x, weight, bias).chunk(3, dim=-1))
    phi_q, phi_k = elu_feature_map(q), mask_features(elu_feature_map(k), mask)
    out = (causal_linear_attention(phi_q, phi_k, v, chunk_size=chunk) if causal
           else linear_attention(phi_q, phi_k, v))
    return out.transpose(1, 2).reshape(b, n, -1)


@pytest.mark.parametrize("causal,chunk", [(False, 64), (True, 1), (True, 4), (True, 7), (True, 64)])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_layer_form_equals_composition(causal, chunk, padded):
    # chunk 4 and 7 do not divide N = 23: the padded-rows path; 64 > N: one chunk
    x, weight, bias, gen = layer_inputs(seed=chunk)
    mask = random_mask(B, N, generator=gen) if padded else None
    fast = projected_elu_linear_attention(x, weight, bias, HEADS, causal, mask, chunk)
    slow = composed_layer_form(x, weight, bias, HEADS, causal, mask, chunk)
    assert_values_and_gradients_match(fast, slow, [x, weight, bias], tol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_layer_form_without_bias_or_input_gradient(causal):
    x, weight, _, _ = layer_inputs(seed=2, bias=False)
    x = x.detach()
    fast = projected_elu_linear_attention(x, weight, None, HEADS, causal, chunk_size=8)
    slow = composed_layer_form(x, weight, None, HEADS, causal, None, 8)
    assert_values_and_gradients_match(fast, slow, [weight], tol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_layer_form_gradient_of_a_sum(causal):
    # out.sum() sends an expanded (stride 0) gradient
    x, weight, bias, _ = layer_inputs(seed=3)
    fast = torch.autograd.grad(projected_elu_linear_attention(x, weight, bias, HEADS, causal,
                                                             chunk_size=4).sum(), (x, weight))
    slow = torch.autograd.grad(composed_layer_form(x, weight, bias, HEADS, causal, None, 4).sum(),
                               (x, weight))
    assert all(max_abs_diff(a, b) < 1e-12 for a, b in zip(fast, slow))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_layer_form_with_a_fully_padded_sequence(causal, batch):
    # the last sequence has no real key: normaliser 0, output 0 there with the reference's
    # gradients (`safe_divide`); batch 1 is the benchmark's shape (one element, no batch loop)
    x, weight, bias, gen = layer_inputs(seed=5)
    x = x[:batch].detach().requires_grad_()
    mask = random_mask(batch, N, generator=gen)
    mask[-1] = False
    fast = projected_elu_linear_attention(x, weight, bias, HEADS, causal, mask, 4)
    slow = composed_layer_form(x, weight, bias, HEADS, causal, mask, 4)
    assert fast[-1].abs().max() == 0
    assert_values_and_gradients_match(fast, slow, [x, weight, bias], tol=1e-12)


@pytest.mark.parametrize("batch,padding,out_bias", [(1, "none", True), (2, "some", True),
                                                     (2, "a whole sequence", False)])
def test_fused_layer_form_with_the_output_projection_absorbed(batch, padding, out_bias):
    # non-causal with out_weight: y = U M + bo with M = S Woᵀ per head, against the composition
    # followed by the output projection; every input's gradient
    x, weight, bias, gen = layer_inputs(seed=7)
    x = x[:batch].detach().requires_grad_()
    out_weight = (torch.randn(5, DIM_IN, generator=gen) * 0.3).double().requires_grad_()
    bo = (torch.randn(5, generator=gen) * 0.1).double().requires_grad_() if out_bias else None
    mask = None if padding == "none" else random_mask(batch, N, generator=gen)
    if padding == "a whole sequence":
        mask[-1] = False
    fast = projected_elu_linear_attention(x, weight, bias, HEADS, False, mask, 4, out_weight, bo)
    slow = F.linear(composed_layer_form(x, weight, bias, HEADS, False, mask, 4), out_weight, bo)
    params = [x, weight, bias, out_weight] + ([bo] if out_bias else [])
    assert_values_and_gradients_match(fast, slow, params, tol=1e-12)


def test_fused_layer_form_runs_backward_once():
    # non-causal backward overwrites the saved features with their gradients: a second
    # backward through the same graph must raise, naming the unfused path, not return wrong
    # gradients
    x, weight, bias, _ = layer_inputs(seed=6)
    out_weight = torch.randn(4, DIM_IN, dtype=torch.float64)
    for projection in (None, out_weight):  # both non-causal forms
        out = projected_elu_linear_attention(x, weight, bias, HEADS,
                                             out_weight=projection).square().sum()
        torch.autograd.grad(out, x, retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward.*layer.fused = False"):
            torch.autograd.grad(out, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_layer_form_low_precision(dtype, causal):
    # computed in float32 from the low-precision projection, returned in the input dtype
    x, weight, bias, gen = layer_inputs(dtype=dtype, seed=4)
    mask = random_mask(B, N, generator=gen)
    fast = projected_elu_linear_attention(x, weight, bias, HEADS, causal, mask, 4)
    assert fast.dtype == dtype
    slow = composed_layer_form(x, weight, bias, HEADS, causal, mask, 4)
    assert max_abs_diff(fast.double(), slow) < 3e-2
    fast.float().square().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in (x, weight, bias))


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages that autograd saves for backward while fn() runs."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("causal", [False, True])
def test_fused_layer_form_saves_only_input_weight_and_features(causal):
    x, weight, bias, _ = layer_inputs(dtype=torch.float32)
    mask = torch.ones(B, N, dtype=torch.bool)
    saved = saved_bytes(lambda: projected_elu_linear_attention(x, weight, bias, HEADS, causal, mask))
    # x, the weight and φ(q), φ(k), v (the size of the projection); non-causal also the state
    # [S | z] (H, B, m, d + 1) of every head; no chunk products, no prefix states
    d = DIM_IN // HEADS
    states = 0 if causal else HEADS * B * d * (d + 1)
    assert saved == 4 * (x.numel() + weight.numel() + 3 * B * N * DIM_IN + states)
