"""ETC (Ainslie et al. 2020, section 2): global-local attention against a dense
oracle over the sequence [global; long] (values and gradients, float64), limits, the layer's
global inputs and outputs, the model."""

from __future__ import annotations

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional.dense import masked_softmax, naive_attention
from efficient_transformers.functional.global_local import etc_attention, etc_dense_bias
from helpers import (
    assert_classifier_trains, assert_values_and_gradients_match, max_abs_diff, random_mask,
    small_attention,
)




def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def oracle(ql, kl, vl, qg, kg, vg, window, l2l, g2g, key_mask, segment_ids, l2g):
    b, h, n, d = ql.shape
    g = qg.shape[2]
    bias = etc_dense_bias(n, g, window, l2l, g2g, key_mask, segment_ids, l2g, batch=b)
    q, k, v = (torch.cat(p, dim=2) for p in ((qg, ql), (kg, kl), (vg, vl)))
    ok = torch.isfinite(bias)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias.masked_fill(~ok, 0.0)
    out = masked_softmax(scores, ok) @ v
    return out[:, :, g:], out[:, :, :g]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("window,block,g", [(2, 2, 3), (3, 3, 1), (5, 4, 4)])
def test_fast_path_equals_oracle(padded, segments, window, block, g):
    b, h, n, d, radius = 2, 2, 23, 4, 3
    gen = torch.Generator().manual_seed(window)
    ql, kl, vl = rand(b, h, n, d), rand(b, h, n, d), rand(b, h, n, d)
    qg, kg, vg = rand(b, h, g, d), rand(b, h, g, d), rand(b, h, g, d)
    l2l, g2g, l2g = rand(h, 2 * radius + 1), rand(h, 2 * radius + 1), rand(h, 2)
    key_mask = random_mask(b, n, generator=gen) if padded else None
    seg = torch.randint(-1, g, (b, n), generator=gen) if segments else None
    fast = etc_attention(ql, kl, vl, qg, kg, vg, window, block, l2l, g2g, key_mask, seg, l2g)
    slow = oracle(ql, kl, vl, qg, kg, vg, window, l2l, g2g, key_mask, seg, l2g)
    real = torch.ones(b, n, dtype=torch.bool) if key_mask is None else key_mask
    sel = real[:, None, :, None].expand_as(fast[0])
    assert max_abs_diff(fast[0][sel], slow[0][sel]) < 1e-12
    assert max_abs_diff(fast[1], slow[1]) < 1e-12
    grads = (torch.randn_like(fast[0]) * sel, torch.randn_like(fast[1]))
    inputs = (ql, kl, vl, qg, kg, vg, l2l, g2g) + ((l2g,) if segments else ())
    for a, c in zip(torch.autograd.grad(fast, inputs, grads), torch.autograd.grad(slow, inputs, grads)):
        assert max_abs_diff(a, c) < 1e-12


def test_window_covering_everything_is_full_attention():
    # window >= N, zero biases, no segments: one softmax over [global; long] for every query
    b, h, n, g, d = 2, 2, 13, 3, 4
    ql, kl, vl = rand(b, h, n, d), rand(b, h, n, d), rand(b, h, n, d)
    qg, kg, vg = rand(b, h, g, d), rand(b, h, g, d), rand(b, h, g, d)
    zeros = torch.zeros(h, 9, dtype=torch.float64)
    long_out, glob_out = etc_attention(ql, kl, vl, qg, kg, vg, n, 4, zeros, zeros)
    q, k, v = (torch.cat(p, dim=2) for p in ((qg, ql), (kg, kl), (vg, vl)))
    full = naive_attention(q, k, v)
    assert max_abs_diff(long_out, full[:, :, g:]) < 1e-12
    assert max_abs_diff(glob_out, full[:, :, :g]) < 1e-12


def test_relative_labels_are_clipped():
    from efficient_transformers.functional.global_local import relative_bias
    table = torch.arange(7.0)[None]                              # max distance 3
    bias = relative_bias(table, 8, 8)[0]
    assert bias[0, 0] == 3 and bias[0, 1] == 4 and bias[0, 7] == 6 and bias[7, 0] == 0


def test_layer_global_inputs_and_outputs():
    attn = small_attention("etc")
    b, n = 2, 19
    x = torch.randn(b, n, 16, dtype=torch.float64)
    y = attn(x)
    assert y.shape == (b, n, 16) and attn.global_states.shape == (b, 3, 16)
    long_out, glob = attn.forward_with_globals(x)
    assert torch.equal(long_out, y) and torch.equal(glob, attn.global_states)
    # the caller's global tokens and token-to-global mapping
    tokens = torch.randn(b, 5, 16, dtype=torch.float64)
    seg = torch.arange(n).div(4, rounding_mode="floor").expand(b, n)
    y2 = attn(x, global_tokens=tokens, segment_ids=seg)
    assert y2.shape == (b, n, 16) and attn.global_states.shape == (b, 5, 16)
    # g2l is hard-masked: global token 0 only reads the long tokens of segment 0
    x2 = x.clone()
    x2[:, 4:] += torch.randn(b, n - 4, 16, dtype=torch.float64)
    attn(x2, global_tokens=tokens, segment_ids=seg)
    before = attn.forward_with_globals(x, global_tokens=tokens, segment_ids=seg)[1]
    after = attn.forward_with_globals(x2, global_tokens=tokens, segment_ids=seg)[1]
    assert max_abs_diff(before[:, 0], after[:, 0]) < 1e-12
    assert max_abs_diff(before[:, 1], after[:, 1]) > 1e-6


def test_bad_global_inputs_are_refused():
    attn = small_attention("etc")
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="global_tokens"):
        attn(x, global_tokens=torch.randn(2, 3, 15, dtype=torch.float64))
    with pytest.raises(TypeError, match="global_tokens"):
        attn(x, global_tokens=torch.ones(2, 3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids"):
        attn(x, segment_ids=torch.full((2, 9), 3))            # 3 learned global tokens: 0..2
    with pytest.raises(ValueError, match="segment_ids"):
        attn(x, segment_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="segment_ids"):
        attn(x, segment_ids=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="causal"):
        et.build_attention("etc", dim=16, heads=2, causal=True)


def test_model_trains(one_thread):
    assert_classifier_trains("etc", window=3, num_global=2, max_distance=4)


def test_model_carries_the_global_states_through_its_layers():
    torch.manual_seed(0)
    model = et.build_model("etc", task="classify", vocab_size=11, dim=16, depth=2, heads=2,
                           max_len=24, pooling="mean", window=3, num_global=2, max_distance=4)
    model = model.double().eval()
    encoder = model.encoder
    assert all(block.attention.global_tokens is None for block in encoder.blocks)
    tokens = torch.randint(0, 11, (2, 17))
    hidden = model(tokens).hidden
    # by hand: layer 2 reads the global states layer 1 left, not fresh tokens
    x = encoder.embed_tokens(tokens)
    g = encoder.global_tokens.double().expand(2, -1, -1)
    for block in encoder.blocks:
        long_out, glob_out = block.attention.forward_with_globals(block.norm1(x),
                                                                  global_tokens=block.norm1(g))
        x, g = x + long_out, g + glob_out
        x, g = x + block.mlp(block.norm2(x)), g + block.mlp(block.norm2(g))
    assert max_abs_diff(hidden, encoder.norm(x)) < 1e-12
    assert max_abs_diff(encoder.global_states, encoder.norm(g)) < 1e-12
    # the first layer's global update reaches the output only through the second layer
    with torch.no_grad():
        bias = encoder.blocks[0].attention.to_out_global.bias
        bias += torch.randn(bias.shape, dtype=bias.dtype)
    assert max_abs_diff(model(tokens).hidden, hidden) > 1e-6


def test_model_trains_the_global_path_and_layers_need_globals_without_their_own():
    torch.manual_seed(0)
    model = et.build_model("etc", task="classify", vocab_size=11, dim=16, depth=2, heads=2,
                           max_len=24, window=3, num_global=2, max_distance=4)
    tokens = torch.randint(0, 11, (2, 17))
    model(tokens, labels=torch.tensor([0, 1])).loss.backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    # the heads read the long tokens: only the last layer's global update and, without
    # segment_ids, the l2g biases go unused (the trainer's DDP finds unused parameters)
    last = "encoder.blocks.1.attention."
    assert unused == {last + "to_out_global.weight", last + "to_out_global.bias",
                      last + "g2g_bias", last + "l2g_bias", "encoder.blocks.0.attention.l2g_bias"}
    with pytest.raises(ValueError, match="learned_globals"):
        et.build_model("etc", task="classify", learned_globals=True)
    layer = et.build_attention("etc", dim=16, heads=2, learned_globals=False)
    with pytest.raises(ValueError, match="global_tokens"):
        layer(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="learned_globals"):
        et.build_attention("etc", dim=16, heads=2, learned_globals="no")


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_dense_rows_explicit_path_equals_sdpa(kind):
    """`dense_rows`' CUDA form (explicit matmuls: a bool mask through attention_with_lse, a float
    one, like ETC's learned global biases, through autograd) against its CPU form (SDPA): values
    and gradients, the mask's included; a row with nothing allowed is opened up in both."""
    from efficient_transformers.functional.global_local import dense_rows

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 4, 8, dtype=torch.float64, generator=gen).requires_grad_()
    k, v = (torch.randn(2, 3, 30, 8, dtype=torch.float64, generator=gen).requires_grad_()
            for _ in range(2))
    allowed = torch.rand(2, 1, 4, 30, generator=gen) > 0.4
    allowed[0, 0, 1] = False                                   # an empty row
    params = [q, k, v]
    if kind == "float":
        bias = torch.randn(1, 3, 4, 30, dtype=torch.float64, generator=gen)
        allowed = torch.where(allowed, bias, float("-inf"))
        allowed[0, :, 1] = 0.0                                 # (a float mask opens nothing)
        allowed.requires_grad_()
        params.append(allowed)
    fast = dense_rows(q, k, v, allowed, explicit=True)
    slow = dense_rows(q, k, v, allowed, explicit=False)
    assert_values_and_gradients_match(fast, slow, params, tol=1e-12)


def test_window_and_max_distance_beyond_the_length_cost_what_the_length_allows():
    """window and the relative tables' radius far beyond N: the oracle's values and gradients
    (the table entries past N - 1 get zero), and no tensor in the forward larger than at
    window = radius = N (the backward makes the tables' own gradients, parameter-sized)."""
    from test_contract import LargestTensor

    b, h, n, g, d = 2, 2, 13, 3, 4
    gen = torch.Generator().manual_seed(0)
    key_mask = random_mask(b, n, generator=gen)
    largest = {}
    for window, radius in [(n, n), (4096, 4096)]:
        ql, kl, vl = rand(b, h, n, d), rand(b, h, n, d), rand(b, h, n, d)
        qg, kg, vg = rand(b, h, g, d), rand(b, h, g, d), rand(b, h, g, d)
        l2l, g2g = rand(h, 2 * radius + 1), rand(h, 2 * radius + 1)
        with LargestTensor() as spy:
            fast = etc_attention(ql, kl, vl, qg, kg, vg, window, 84, l2l, g2g, key_mask)
        largest[window] = spy.largest
        slow = oracle(ql, kl, vl, qg, kg, vg, window, l2l, g2g, key_mask, None, None)
        sel = key_mask[:, None, :, None].expand_as(fast[0])
        assert max_abs_diff(fast[0][sel], slow[0][sel]) < 1e-12
        assert max_abs_diff(fast[1], slow[1]) < 1e-12
        grads = (torch.randn_like(fast[0]) * sel, torch.randn_like(fast[1]))
        inputs = (ql, kl, vl, qg, kg, vg, l2l, g2g)
        fast_grads = torch.autograd.grad(fast, inputs, grads)
        for a, c in zip(fast_grads, torch.autograd.grad(slow, inputs, grads)):
            assert max_abs_diff(a, c) < 1e-12
        unused = torch.ones(2 * radius + 1, dtype=torch.bool)
        unused[radius - (n - 1):radius + n] = False
        assert not fast_grads[6][:, unused].any()
    assert largest[4096] <= largest[n]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_path_equals_the_cpu_path_with_max_distance_beyond_the_window(eager_flex, monkeypatch):
    """The FlexAttention path (its eager reference on the CPU, float32: FlexAttention takes no
    float64) equals the CPU path with max_distance above and below the window and beyond N, in
    outputs and the gradients of the parameters the long outputs use; the CPU path makes no
    copies of the relative table (they are for FlexAttention's backward only)."""
    from efficient_transformers.functional import flex, global_cuda

    for window, max_distance in [(5, 40), (30, 4096), (5, 3)]:
        attn = small_attention("etc", dtype=torch.float32, window=window,
                               max_distance=max_distance).eval()
        x = torch.randn(2, 24, 16)
        mask = random_mask(2, 24)
        attn(x, mask)
        assert id(attn.l2l_bias) not in global_cuda._SCORE_MODS      # CPU: no copies made
        monkeypatch.setattr(flex, "FORCE_FLEX", True)
        fast = attn(x, mask)
        assert id(attn.l2l_bias) in global_cuda._SCORE_MODS
        monkeypatch.setattr(flex, "FORCE_FLEX", False)
        slow = attn(x, mask)
        used = [p for name, p in attn.named_parameters()   # those the long outputs use
                if name not in ("g2g_bias", "l2g_bias") and "out_global" not in name]
        assert_values_and_gradients_match(fast, slow, used, mask[..., None], tol=1e-5,
                                          grad_tol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_flex_path_lets_a_deleted_layer_go(eager_flex, monkeypatch):
    """The relative bias's score_mod and its table copies are cached per table for
    FlexAttention; once the layer is gone, so are its table and the cache entry (a sweep that
    builds many layers in one process must not keep them all)."""
    import gc
    import weakref

    from efficient_transformers.functional import flex, global_cuda

    monkeypatch.setattr(flex, "FORCE_FLEX", True)
    attn = small_attention("etc", dtype=torch.float32)
    attn(torch.randn(2, 24, 16)).sum().backward()
    table, key = weakref.ref(attn.l2l_bias), id(attn.l2l_bias)
    assert key in global_cuda._SCORE_MODS
    del attn
    gc.collect()
    assert table() is None
    assert key not in global_cuda._SCORE_MODS
