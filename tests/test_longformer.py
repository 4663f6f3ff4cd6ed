"""Longformer (Beltagy et al. 2020, section 3.1): the dilated window + global pattern, the blocked
path against the naive oracle (values and gradients, float64), limits, decode memory, the model."""

from __future__ import annotations

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.attention.base import state_nbytes
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.functional.global_local import (
    DilatedWindow, LongformerPattern, gather_global, longformer_attention,
    longformer_dense_allowed, take_rows,
)
from efficient_transformers.functional.flex import flex_available, pattern_block_mask
from efficient_transformers.functional.patterns import dense_pattern_mask
from helpers import (
    assert_values_and_gradients_match, max_abs_diff, random_mask,
    small_attention, train_losses,
)




def test_dilated_window_pattern():
    mask = dense_pattern_mask(DilatedWindow(window=2, dilation=3), 20)
    assert mask[10].nonzero().flatten().tolist() == [4, 7, 10, 13, 16]
    causal = dense_pattern_mask(DilatedWindow(window=2, dilation=3, causal=True), 20)
    assert causal[10].nonzero().flatten().tolist() == [4, 7, 10]
    # the key blocks hold every allowed key
    for pattern in (DilatedWindow(3, 2), DilatedWindow(3, 2, True), LongformerPattern(2, 1, 3)):
        n, block = 24, 4
        blocks = pattern.key_blocks(n // block, block)
        covered = torch.zeros(n, n, dtype=torch.bool)
        for qb in range(n // block):
            for kb in blocks[qb].tolist():
                if kb >= 0:
                    covered[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = True
        rows = getattr(pattern, "num_global", 0)  # global rows are computed densely
        assert not (dense_pattern_mask(pattern, n) & ~covered)[rows:].any()


def test_longformer_pattern_global_rows_and_columns():
    mask = dense_pattern_mask(LongformerPattern(window=1, num_global=2), 10)
    assert mask[:2].all() and mask[:, :2].all()
    assert mask[5].nonzero().flatten().tolist() == [0, 1, 4, 5, 6]
    causal = dense_pattern_mask(LongformerPattern(window=1, num_global=2, causal=True), 10)
    assert not causal.triu(1).any() and causal[1, :2].all() and causal[9, :2].all()


def oracle(qs, ks, vs, qg, kg, vg, is_global, window, dilations, causal, key_mask):
    local, full = zip(*(longformer_dense_allowed(is_global, window, d, causal, key_mask)
                        for d in dilations))
    out_local = naive_attention(qs, ks, vs, torch.cat(local, dim=1))
    out_global = naive_attention(qg, kg, vg, full[0])
    return torch.where(is_global[:, None, :, None], out_global, out_local)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("count", [None, 23], ids=["largest-count", "bound-n"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("window,dilations,block", [(2, (1, 1, 1), 2), (3, (1, 2, 3), 3),
                                                    (4, (2, 2, 1), 3)])
def test_blocked_path_equals_oracle(causal, padded, window, dilations, block, count):
    """count: the global slots as many as the largest row's, or a bound from the host (here every
    position: most slots are invalid)."""
    b, h, n, d = 2, 3, 23, 4
    gen = torch.Generator().manual_seed(window)
    qs, ks, vs, qg, kg, vg = (rand(b, h, n, d) for _ in range(6))
    key_mask = random_mask(b, n, generator=gen) if padded else None
    is_global = torch.rand(b, n, generator=gen) < 0.15
    is_global[0, :3] = True
    is_global[1] = False  # one row without global tokens
    if key_mask is not None:
        is_global &= key_mask
    index, valid = gather_global(is_global, count)
    assert index.shape[1] == (int(is_global.sum(1).max()) if count is None else count)
    fast = longformer_attention(qs, ks, vs, take_rows(qg, index), kg, vg, index, valid, window,
                                dilations, causal, key_mask, block)
    slow = oracle(qs, ks, vs, qg, kg, vg, is_global, window, dilations, causal, key_mask)
    real = torch.ones(b, n, dtype=torch.bool) if key_mask is None else key_mask
    assert_values_and_gradients_match(fast, slow, (qs, ks, vs, qg, kg, vg), real[:, None, :, None], tol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_everything_is_full_attention(causal):
    b, h, n, d = 2, 2, 17, 4
    q, k, v = rand(b, h, n, d), rand(b, h, n, d), rand(b, h, n, d)
    none = torch.zeros(b, 0, dtype=torch.long)
    fast = longformer_attention(q, k, v, None, None, None, none, none.bool(), n, (1, 1), causal,
                                None, 5)
    full = naive_attention(q, k, v, torch.ones(n, n, dtype=torch.bool).tril() if causal else None)
    assert max_abs_diff(fast, full) < 1e-12
    # the layer too: window >= N, no global token == softmax attention with the same projections
    attn = small_attention("longformer", causal=causal, window=n, dilation=1, num_global=0)
    x = torch.randn(b, n, 16, dtype=torch.float64)
    qs, ks, vs = attn.sliding_qkv(x)
    dense = naive_attention(qs, ks, vs, torch.ones(n, n, dtype=torch.bool).tril() if causal else None)
    assert max_abs_diff(attn(x), attn.to_out(attn.merge_heads(dense))) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_layer_with_global_mask_equals_oracle(causal):
    attn = small_attention("longformer", causal=causal, window=2, dilation=[1, 3])
    b, n = 2, 21
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(b, n, 16, dtype=torch.float64)
    mask = random_mask(b, n, generator=gen)
    global_mask = torch.zeros(b, n, dtype=torch.bool)
    global_mask[0, [3, 11]] = True
    global_mask[1, [0, 20]] = True
    y = attn(x, mask, global_mask=global_mask)
    qs, ks, vs = attn.sliding_qkv(x)
    qg = attn.split_heads(attn.to_q_global(x))
    kg, vg = attn.global_kv(x)
    is_global = global_mask & mask
    ref = oracle(qs, ks, vs, qg, kg, vg, is_global, 2, (1, 3), causal, mask)
    ref = attn.to_out(attn.merge_heads(ref))
    # values and every parameter's gradient: the layer folds Kg, Vg into the global queries
    assert_values_and_gradients_match(y, ref, list(attn.parameters()), mask[..., None],
                                      tol=1e-12)
    if causal:  # a per-call global token never lets the future leak
        x2 = x.clone()
        x2[:, 12:] += 3 * torch.randn(b, n - 12, 16, dtype=torch.float64)
        y2 = attn(x2, mask, global_mask=global_mask)
        assert max_abs_diff(y[:, :12], y2[:, :12]) < 1e-12


def test_global_mask_is_checked():
    attn = small_attention("longformer")
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="global_mask"):
        attn(x, global_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="global_mask"):
        attn(x, global_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dilation"):
        et.build_attention("longformer", dim=16, heads=2, dilation=[1, 2, 3])
    with pytest.raises(ValueError, match="window"):
        et.build_attention("longformer", dim=16, heads=2, window=0)


def test_decode_state_is_bounded_and_long_chunks_match():
    attn = small_attention("longformer", causal=True, window=3, dilation=[1, 2], num_global=2)
    x = torch.randn(1, 160, 16, dtype=torch.float64)
    sizes = []
    state = None
    for i in range(60):
        _, state = attn.decode(x[:, i:i + 1], state)
        sizes.append(state_nbytes(state))
    assert sizes[20] == sizes[-1] and sizes[-1] < sizes[20] * 2
    # a chunk longer than the dense decode limit goes through the blocked path
    full = attn(x)
    y1, state = attn.decode(x[:, :90])
    y2, state = attn.decode(x[:, 90:], state)
    assert max_abs_diff(torch.cat([y1, y2], 1), full) < 1e-10
    assert state["k"].shape[2] == 3 * 2 and state["gk"].shape[2] == 2


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_model_trains(task, one_thread):
    torch.manual_seed(0)
    model = et.build_model("longformer", task=task, vocab_size=13, dim=16, depth=2, heads=2,
                           max_len=24, window=4, dilation=[1, 2], num_global=1)
    tokens = torch.randint(0, 13, (4, 21))
    labels = tokens if task == "lm" else tokens[:, 0] % 2
    losses = train_losses(model, tokens, labels, lr=1e-2)
    assert losses[-1] < losses[0]
    if task == "lm":
        out = model.generate(tokens[:, :5], max_new_tokens=6, temperature=0)
        assert out.shape == (4, 11)


@pytest.mark.gpu
def test_cuda_path_equals_cpu_path():
    attn = small_attention("longformer", dtype=torch.float32, window=8, dilation=[1, 2])
    x = torch.randn(2, 300, 16)
    mask = random_mask(2, 300)
    ref = attn(x, mask)
    out = attn.cuda()(x.cuda(), mask.cuda()).cpu()
    assert max_abs_diff(out[mask], ref[mask]) < 1e-4


@pytest.mark.skipif(not flex_available(), reason="FlexAttention is not importable")
def test_flex_mask_leaves_the_global_tokens_to_the_layer():
    """The layer's FlexAttention mask: no global rows (the layer computes them by matmuls) and
    no global keys (merged in by log-sum-exp), so no query block walks every key block and no
    key block is walked by every query block (in the backward); the window stays."""
    n, block = 1024, 128
    full = pattern_block_mask(LongformerPattern(3, 1, 2), n, "cpu", block_size=block)
    layer = pattern_block_mask(LongformerPattern(3, 1, 2, global_rows=False, global_cols=False),
                               n, "cpu", block_size=block)
    assert full.to_dense()[0, 0].sum(1)[0] == n // block       # a global row: every key block
    assert (full.to_dense()[0, 0][:, 0] == 1).all()            # the global keys: in every row
    listed = layer.to_dense()[0, 0]                             # (query block, key block)
    assert listed.sum(1).max() <= 3                             # its block and its neighbours
    assert not listed[2:, 0].any()                              # nobody else reaches block 0


@pytest.mark.parametrize("causal", [False, True])
def test_window_and_dilation_beyond_the_length_cost_what_the_length_allows(causal):
    """window / dilation far beyond N mean the same attention as just beyond it (window >= N:
    every position; dilation >= N: only j = i): the oracle's values and gradients, and no tensor
    larger than at window = dilation = N."""
    from test_contract import LargestTensor

    b, h, n, d = 2, 2, 19, 4
    gen = torch.Generator().manual_seed(1)
    key_mask = random_mask(b, n, generator=gen)
    is_global = torch.zeros(b, n, dtype=torch.bool)
    is_global[:, 2] = True
    index, valid = gather_global(is_global & key_mask)
    largest = {}
    for window, dilations in [(n, (1, n)), (10**6, (1, 10**6)), (2, (n, 1)), (2, (10**6, 1))]:
        qs, ks, vs, qg, kg, vg = (rand(b, h, n, d) for _ in range(6))
        with LargestTensor() as spy:
            fast = longformer_attention(qs, ks, vs, take_rows(qg, index), kg, vg, index, valid,
                                        window, dilations, causal, key_mask, 128)
            fast.sum().backward(retain_graph=True)
        largest[window, dilations] = spy.largest
        for t in (qs, ks, vs, qg, kg, vg):
            t.grad = None
        slow = oracle(qs, ks, vs, qg, kg, vg, is_global & key_mask, window, dilations, causal,
                      key_mask)
        assert_values_and_gradients_match(fast, slow, (qs, ks, vs, qg, kg, vg),
                                          key_mask[:, None, :, None], tol=1e-12)
    assert largest[10**6, (1, 10**6)] <= largest[n, (1, n)]
    assert largest[2, (10**6, 1)] <= largest[2, (n, 1)]


def test_decode_with_window_and_dilation_beyond_the_length_continues_the_forward():
    """window 4096 and a dilation of 4096 on 80 tokens: decoding in pieces (one over the dense
    decode limit, through the blocked path) equals the causal forward."""
    attn = small_attention("longformer", causal=True, window=4096, dilation=[1, 4096],
                           num_global=2)
    x = torch.randn(1, 80, 16, dtype=torch.float64)
    full = attn(x)
    outs, state = [], None
    for lo, hi in [(0, 1), (1, 71), (71, 75), (75, 80)]:
        y, state = attn.decode(x[:, lo:hi], state)
        outs.append(y)
    assert max_abs_diff(torch.cat(outs, 1), full) < 1e-10
    assert state["k"].shape[2] == 80      # what was seen, not window · dilation
