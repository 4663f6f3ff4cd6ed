"""Sinkhorn Transformer: Sinkhorn normalisation, fast paths against dense oracles, model."""

from __future__ import annotations

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.bench.traffic import OperatorTraffic
from efficient_transformers.functional.sinkhorn import (
    causal_row_normalise, expand_permutation, gumbel_noise, sinkhorn_block_attention, sinkhorn_log,
    sinkhorn_log_reference, sortcut_attention,
)
from helpers import assert_equals_dense_attention, assert_values_and_gradients_match, max_abs_diff, random_mask, train_losses

DIM, HEADS, N = 16, 2, 23


def build(causal=False, seed=0, **options):
    torch.manual_seed(seed)
    opts = {"block_size": 4, "sinkhorn_iters": 5, "temperature": 0.75, **options}
    return et.build_attention("sinkhorn_transformer", dim=DIM, heads=HEADS, causal=causal,
                              **opts).double().eval()


def naive_sinkhorn(scores, iters):
    """Probability-space Sinkhorn: divide by row sums, then by column sums."""
    p = torch.exp(scores - scores.amax(dim=(-1, -2), keepdim=True))
    for _ in range(iters):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    return p


def oracle(attn, x, mask):
    """Same definition, explicitly: loop-built block summaries, probability-space Sinkhorn or a
    masked softmax over past blocks, the token-level soft permutation kron(P, I) applied to the
    keys, and dense scores against [own keys; sorted keys] with a boolean mask (eval mode)."""
    b, n, _ = x.shape
    s = attn.block_size
    nb = math.ceil(n / s)
    np_ = nb * s
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    real = torch.cat([real, torch.zeros(b, np_ - n, dtype=torch.bool)], dim=1)
    x = torch.cat([x, x.new_zeros(b, np_ - n, x.shape[-1])], dim=1)
    summaries = []
    for i in range(nb):
        w = real[:, i * s:(i + 1) * s, None].to(x.dtype)
        summaries.append((x[:, i * s:(i + 1) * s] * w).sum(1) / w.sum(1).clamp_min(1))
    summ = torch.stack(summaries, dim=1)  # (B, nb, dim)
    sq, sk = attn.split_heads(attn.sort_q(summ)), attn.split_heads(attn.sort_k(summ))
    if attn.causal:
        sq = torch.cat([torch.zeros_like(sq[:, :, :1]), sq[:, :, :-1]], dim=2)
    scores = sq @ sk.transpose(-1, -2) / math.sqrt(attn.head_dim)
    if attn.training:  # the same Gumbel draw as the module when the RNG is at the same state
        scores = scores + gumbel_noise(scores.shape, scores.dtype, scores.device)
    scores = scores / attn.temperature
    if attn.causal:
        past = torch.ones(nb, nb, dtype=torch.bool).tril(-1)
        perm = torch.softmax(scores.masked_fill(~past, float("-inf")), dim=-1).nan_to_num(0.0)
    else:
        perm = naive_sinkhorn(scores, attn.sinkhorn_iters)
    q, k, v = attn.qkv(x)
    big = expand_permutation(perm, s)  # (B, H, Np, Np)
    keep = real[:, None, :, None].to(x.dtype)
    ks, vs = big @ (k * keep), big @ (v * keep)
    block = torch.arange(np_) // s
    eye = torch.eye(np_, dtype=torch.bool)
    own = (block[:, None] == block[None, :]) & (real[:, None, None, :] | eye)
    if attn.causal:
        own = own & torch.ones(np_, np_, dtype=torch.bool).tril()
        mixes = past[block][:, block]  # (Np, Np): token m lies in a block before block(i)
        # slot a of the sorted block of block(i) is real when a real token sits at slot a of a
        # block j < block(i)
        slot_real = torch.stack([(real[:, None, :] & mixes[None]
                                  & (torch.arange(np_) % s == a)).any(-1) for a in range(s)], -1)
    else:
        slot_real = torch.stack([(real & (torch.arange(np_) % s == a)).any(-1) for a in range(s)], -1)
        slot_real = slot_real[:, None, :].expand(b, np_, s)
    # sorted key m (row block(m), slot m % s) is visible to query i when block(m) == block(i)
    sorted_ok = (block[:, None] == block[None, :])[None] & slot_real.gather(
        2, (torch.arange(np_) % s)[None, None, :].expand(b, np_, np_))
    if attn.sortcut:
        cut = min(attn.sortcut, nb) * s
        slot = slot_real[:, :1, :].expand(b, np_, s)
        ok = slot.gather(2, (torch.arange(cut) % s)[None, None, :].expand(b, np_, cut))
        out = naive_attention(q, ks[:, :, :cut], vs[:, :, :cut], ok[:, None])
    else:
        allowed = torch.cat([own.expand(b, 1, np_, np_), sorted_ok[:, None]], dim=-1)
        out = naive_attention(q, torch.cat([k, ks], 2), torch.cat([v, vs], 2), allowed)
    return attn.to_out(attn.merge_heads(out))[:, :n], perm


def compare_with_oracle(attn, x, mask):
    x = x.clone().requires_grad_()
    real = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    torch.manual_seed(123)
    fast = attn(x, mask)
    torch.manual_seed(123)
    slow, _ = oracle(attn, x, mask)
    assert_values_and_gradients_match(fast, slow, [x] + list(attn.parameters()), real[..., None], tol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_path_equals_oracle(causal, padded):
    attn = build(causal)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=gen)
    mask = random_mask(2, N, generator=gen) if padded else None
    compare_with_oracle(attn, x, mask)


@pytest.mark.parametrize("causal", [False, True])
def test_training_mode_with_gumbel_noise_equals_oracle(causal):
    attn = build(causal).train()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=gen)
    compare_with_oracle(attn, x, random_mask(2, N, generator=gen))


@pytest.mark.parametrize("padded", [False, True])
def test_sortcut_equals_oracle(padded):
    attn = build(False, sortcut=2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=gen)
    compare_with_oracle(attn, x, random_mask(2, N, generator=gen) if padded else None)


@pytest.mark.parametrize("causal,first_row", [(False, 0), (True, 0), (True, 2)])
def test_no_padding_known_on_the_host_equals_an_all_real_mask(causal, first_row):
    """real_b None (the layer knows there is no padding, so nothing reads the device) against
    the same blocks with an all-True real_b, on values and gradients; SortCut too."""
    gen = torch.Generator().manual_seed(3)
    b, h, nb, s, d = 2, 2, 5, 4, 3
    q, k, v = (torch.randn(b, h, nb, s, d, dtype=torch.float64, generator=gen).requires_grad_()
               for _ in range(3))
    perm = torch.softmax(torch.randn(b, h, nb - first_row, nb, dtype=torch.float64,
                                     generator=gen), dim=-1)
    real_b = torch.ones(b, nb, s, dtype=torch.bool)
    rows = q[:, :, first_row:]

    def both(real):
        return sinkhorn_block_attention(rows, k, v, real, perm, causal, first_row)
    assert_values_and_gradients_match(both(None), both(real_b), (q, k, v), tol=1e-12)
    if not causal:
        flat = q.reshape(b, h, nb * s, d)
        assert_values_and_gradients_match(sortcut_attention(flat, k, v, None, perm, 2),
                                          sortcut_attention(flat, k, v, real_b, perm, 2),
                                          (q, k, v), tol=1e-12)


def test_sortcut_larger_than_the_number_of_blocks_is_clipped():
    x = torch.randn(1, 9, DIM, dtype=torch.float64)
    assert max_abs_diff(build(False, sortcut=3)(x), build(False, sortcut=50)(x)) < 1e-12


def test_sinkhorn_is_doubly_stochastic_and_matches_probability_space():
    scores = torch.randn(3, 7, 7, dtype=torch.float64) * 2
    p = sinkhorn_log(scores, 100).exp()
    assert max_abs_diff(p.sum(-1), torch.ones(3, 7, dtype=torch.float64)) < 1e-8
    assert max_abs_diff(p.sum(-2), torch.ones(3, 7, dtype=torch.float64)) < 1e-12
    few = sinkhorn_log(scores, 3).exp()
    assert max_abs_diff(few, naive_sinkhorn(scores, 3)) < 1e-12
    assert max_abs_diff(few.sum(-2), torch.ones(3, 7, dtype=torch.float64)) < 1e-12


@pytest.mark.parametrize("iters", [1, 3, 8])
def test_sinkhorn_node_equals_the_autograd_loop(iters):
    # one autograd node against the same loop through autograd: values and gradients, also
    # through exp (the layer uses P = exp(log P)); and fewer aten calls for forward + backward
    gen = torch.Generator().manual_seed(3)
    scores = (torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=gen) * 2).requires_grad_()
    assert_values_and_gradients_match(sinkhorn_log(scores, iters),
                                      sinkhorn_log_reference(scores, iters), [scores], tol=1e-12)
    assert_values_and_gradients_match(sinkhorn_log(scores, iters).exp(),
                                      sinkhorn_log_reference(scores, iters).exp(), [scores],
                                      tol=1e-12)

    def calls(fn):
        with OperatorTraffic() as count:
            fn(scores, iters).exp().sum().backward()
        return count.dispatches

    assert calls(sinkhorn_log) < calls(sinkhorn_log_reference)


def test_module_permutation_is_doubly_stochastic_after_enough_iterations():
    attn = build(False, sinkhorn_iters=100, temperature=1.0)
    x = torch.randn(2, 40, DIM, dtype=torch.float64)
    _, perm = oracle(attn, x, None)
    ones = torch.ones(2, HEADS, 10, dtype=torch.float64)
    assert max_abs_diff(perm.sum(-1), ones) < 1e-6 and max_abs_diff(perm.sum(-2), ones) < 1e-6


def test_causal_rows_use_only_past_blocks():
    scores = torch.randn(2, 6, 6, dtype=torch.float64)
    p = causal_row_normalise(scores)
    assert torch.equal(p.triu(), torch.zeros_like(p))
    assert max_abs_diff(p[:, 1:].sum(-1), torch.ones(2, 5, dtype=torch.float64)) < 1e-12
    rows = causal_row_normalise(scores[:, 3:], first_row=3)  # decode: rows of blocks 3..5
    assert max_abs_diff(rows, p[:, 3:]) < 1e-15


@pytest.mark.parametrize("causal", [False, True])
def test_one_block_equals_dense_attention(causal):
    attn = build(causal, block_size=32)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    assert_equals_dense_attention(attn, x, random_mask(2, N))


def test_gumbel_noise_in_training_only_and_seeded():
    attn = build(False)
    x = torch.randn(1, N, DIM, dtype=torch.float64)
    assert torch.equal(attn(x), attn(x))  # eval: deterministic
    attn.train()
    torch.manual_seed(5)
    a = attn(x)
    torch.manual_seed(5)
    assert torch.equal(a, attn(x))
    assert max_abs_diff(a, attn.eval()(x)) > 1e-6


@pytest.mark.parametrize("options,error,argument", [
    ({"sortcut": 2, "causal": True}, ValueError, "sortcut"),
    ({"block_size": 0}, ValueError, "block_size"), ({"sinkhorn_iters": 0}, ValueError, "sinkhorn_iters"),
    ({"temperature": 0.0}, ValueError, "temperature"), ({"sortcut": -1}, ValueError, "sortcut"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": 1e-40}, ValueError, "temperature"),    # NaN outputs before
    ({"temperature": True}, ValueError, "temperature"),
])
def test_bad_options_are_refused(options, error, argument):
    with pytest.raises(error, match=argument):
        et.build_attention("sinkhorn_transformer", dim=DIM, heads=HEADS, **options)


def decode_in_chunks(attn, x, sizes):
    """x (B, N, dim) fed to decode in chunks of `sizes` (summing to N) -> outputs (B, N, dim)."""
    outs, state = [], None
    for chunk in x.split(sizes, dim=1):
        y, state = attn.decode(chunk, state)
        outs.append(y)
    return torch.cat(outs, dim=1)


def test_decode_across_many_blocks_matches_forward():
    attn = build(True, block_size=3)
    x = torch.randn(1, 31, DIM, dtype=torch.float64)
    assert max_abs_diff(decode_in_chunks(attn, x, [10, 1, 7, 13]), attn(x)) < 1e-10


SMALL_CHUNKS = [1, 2, 1, 3, 1, 1, 2, 3, 1, 2, 3, 2, 1]  # N = 23 tokens


@pytest.mark.parametrize("block_size", [5, 23, 24, 4096])
def test_decode_in_small_chunks_matches_forward(block_size):
    """While the tokens so far fit in block 0, decode computes it as one block of their length:
    chunks that cross block boundaries (5), end on one (23) or never reach one (24, 4096)."""
    attn = build(True, block_size=block_size)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    assert max_abs_diff(decode_in_chunks(attn, x, SMALL_CHUNKS), attn(x)) < 1e-10


def test_decode_with_a_block_size_beyond_the_length_costs_no_more():
    def traffic(block_size):  # bytes the operators of a chunked decode move
        x = torch.randn(2, N, DIM, dtype=torch.float64)
        with OperatorTraffic() as count, torch.no_grad():
            decode_in_chunks(build(True, block_size=block_size), x, SMALL_CHUNKS)
        return sum(row[1] for row in count.rows.values())
    assert traffic(4096) <= traffic(32)


@pytest.mark.parametrize("task,options", [("lm", {}), ("classify", {"sortcut": 2})])
def test_model_trains(task, options):
    torch.manual_seed(0)
    model = et.build_model("sinkhorn_transformer", task=task, vocab_size=32, num_classes=3, dim=32,
                           depth=2, heads=2, max_len=64, block_size=8, **options)
    tokens = torch.randint(0, 32, (2, 32))
    labels = tokens if task == "lm" else torch.tensor([0, 2])
    losses = train_losses(model, tokens, labels, steps=5)
    assert losses[-1] < losses[0]
    if task == "lm":
        assert model.generate(tokens[:, :5], max_new_tokens=3, temperature=0).shape == (2, 8)
