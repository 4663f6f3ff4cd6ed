"""Reformer LSH attention: the chunked fast path against the dense definition, and its rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import efficient_transformers as et
from efficient_transformers.functional import lsh
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.functional.lsh import (
    RoundSort, causal_allowed_rounds, chunked_allowed_rounds, lsh_attention, lsh_buckets,
    naive_lsh_attention, random_rotations, token_rows, union_with_self,
)
from helpers import assert_values_and_gradients_match, max_abs_diff, random_mask, small_attention


def inputs(b=2, h=3, n=24, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qk = torch.randn(b, h, n, d, dtype=torch.float64, generator=gen).requires_grad_()
    v = torch.randn(b, h, n, d, dtype=torch.float64, generator=gen).requires_grad_()
    return qk, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n,chunk,n_buckets,rounds", [
    (24, 4, 4, 1), (24, 4, 4, 3), (30, 3, 6, 2), (32, 8, 2, 4), (16, 16, 1, 2), (40, 5, 8, 3)])
def test_fast_path_equals_definition(causal, padded, n, chunk, n_buckets, rounds):
    qk, v = inputs(n=n, seed=n + rounds)
    gen = torch.Generator().manual_seed(1)
    rot = random_rotations(3, rounds, 8, n_buckets, gen, dtype=torch.float64)
    mask = random_mask(2, n, generator=gen) if padded else None
    buckets = lsh_buckets(qk, rot, n_buckets, mask)
    fast = lsh_attention(qk, v, buckets, chunk, causal)
    slow = naive_lsh_attention(qk, v, buckets, chunk, causal)
    real = torch.ones(2, n, dtype=torch.bool) if mask is None else mask
    # padded queries' outputs are not meaningful
    assert_values_and_gradients_match(fast, slow, (qk, v), real[:, None, :, None], tol=1e-12)
    # the layer's call: the bucket bound from the host instead of the ids' maximum
    bounded = lsh_attention(qk, v, buckets, chunk, causal, n_buckets=n_buckets)
    slow = naive_lsh_attention(qk, v, buckets, chunk, causal)
    assert_values_and_gradients_match(bounded, slow, (qk, v), real[:, None, :, None], tol=1e-12)


def test_buckets_are_the_argmax_over_both_signs_in_any_block_size(monkeypatch):
    """Hashing round by round and block by block gives h(x) = argmax([xR; -xR]) exactly."""
    qk, _ = inputs(n=37, seed=4)
    rot = random_rotations(3, 3, 8, 10, torch.Generator().manual_seed(5), dtype=torch.float64)
    proj = torch.einsum("bhnd,hrdk->bhrnk", qk.detach(), rot)
    expected = torch.cat([proj, -proj], dim=-1).argmax(dim=-1)
    assert torch.equal(lsh_buckets(qk, rot, 10), expected)
    monkeypatch.setattr(lsh, "HASH_BLOCK_ELEMENTS", 2 * 3 * 3 * 5 * 7)  # blocks of 7 tokens
    assert torch.equal(lsh_buckets(qk, rot, 10), expected)


@pytest.mark.parametrize("factors", [(4, 6), (2, 4, 2)])
def test_factorised_buckets_combine_one_argmax_per_factor(monkeypatch, factors):
    """n_buckets = (b1, b2, ...): h = h1 + b1·h2 + b1·b2·h3, h_k the argmax over [xR_k; -xR_k]
    of the factor's own rotation columns; every id in range, and block by block alike."""
    qk, _ = inputs(n=37, seed=6)
    rot = random_rotations(3, 2, 8, factors, torch.Generator().manual_seed(7), dtype=torch.float64)
    assert rot.shape == (3, 2, 8, sum(f // 2 for f in factors))
    proj = torch.einsum("bhnd,hrdk->bhrnk", qk.detach(), rot)
    expected, offset, radix = 0, 0, 1
    for f in factors:
        part = proj[..., offset:offset + f // 2]
        expected = expected + radix * torch.cat([part, -part], dim=-1).argmax(dim=-1)
        offset, radix = offset + f // 2, radix * f
    assert torch.equal(lsh_buckets(qk, rot, factors), expected)
    assert expected.max() < math.prod(factors) and len(expected.unique()) > max(factors)
    monkeypatch.setattr(lsh, "HASH_BLOCK_ELEMENTS", 2 * 3 * 2 * rot.shape[-1] * 5)  # 5 tokens
    assert torch.equal(lsh_buckets(qk, rot, factors), expected)
    mask = random_mask(2, 37)
    padded = lsh_buckets(qk, rot, factors, mask)
    assert (padded[~mask[:, None, None, :].expand_as(padded)] == math.prod(factors)).all()


def test_factorised_count_is_two_even_factors_near_the_root():
    for b in (2, 4, 6, 8, 64, 258, 1000, 1024, 4096):
        b1, b2 = lsh.factorized(b)
        assert b1 % 2 == 0 and b2 % 2 == 0 and b <= b1 * b2 <= b + 2 * math.sqrt(b) + 4, b
    assert lsh.factorized(1024) == (32, 32)
    # the layer factorises a length-derived count above 2 · bucket_size only
    attn = et.build_attention("reformer", dim=16, heads=2, bucket_size=8)
    assert attn.buckets_for(128) == 16 and attn.buckets_for(136) == (4, 6)
    assert et.build_attention("reformer", dim=16, heads=2, bucket_size=64).buckets_for(
        65536) == (32, 32)


def test_non_causal_sets_follow_the_sorted_chunks():
    # one round, chunk 2; sorted by (bucket, position): [1 3] [0 2] [4 5]
    buckets = torch.tensor([1, 0, 1, 0, 1, 1]).view(1, 1, 1, 6)
    sets = chunked_allowed_rounds(buckets, 2)[0, 0, 0]
    expected = {0: {2}, 1: {3}, 2: {0}, 3: {1}, 4: {0, 2, 5}, 5: {0, 2, 4}}
    for i, keys in expected.items():
        assert set(sets[i].nonzero().flatten().tolist()) == keys, i


def test_causal_sets_are_the_most_recent_of_the_bucket():
    buckets = torch.tensor([0, 0, 1, 0, 0, 1]).view(1, 1, 1, 6)
    sets = union_with_self(causal_allowed_rounds(buckets, buckets, 2))[0, 0]
    expected = {0: {0}, 1: {0}, 2: {2}, 3: {0, 1}, 4: {1, 3}, 5: {2}}  # nothing earlier: itself
    for i, keys in expected.items():
        assert set(sets[i].nonzero().flatten().tolist()) == keys, i


@pytest.mark.parametrize("layout", ["heads_first", "projection"])
def test_round_sort_moves_rows_and_merges_rounds_as_indexed(layout):
    """RoundSort's gathers and its embedding_bag merge against indexing by the sort order
    (round r's slot s holds position order[r, s]), values and gradients; x in either layout
    (the projection's (B, P, H, w) memory, as `split_heads` gives, or contiguous (B, H, P, w))."""
    b, h, r, p, w = 2, 3, 3, 10, 5
    gen = torch.Generator().manual_seed(4)
    buckets = torch.randint(0, 3, (b, h, r, p), generator=gen)
    sort = RoundSort(buckets)
    order = buckets * p + torch.arange(p)
    order = order.sort(dim=-1).indices                                      # (B, H, R, P)
    base = torch.randn(b, p, h, w, dtype=torch.float64, generator=gen)
    x = (base.transpose(1, 2) if layout == "projection" else base.transpose(1, 2).contiguous())
    x.requires_grad_()
    expected = x[:, :, None].expand(b, h, r, p, w).gather(3, order[..., None].expand(-1, -1, -1, -1, w))
    assert_values_and_gradients_match(sort.sorted_rows(token_rows(x)), expected.reshape(-1, w),
                                      [x], tol=1e-12)

    out_s = torch.randn(b * h * r * p, w, dtype=torch.float64, generator=gen).requires_grad_()
    lse_s = torch.randn(b * h * r * p, dtype=torch.float64, generator=gen)
    lse_s[torch.rand(lse_s.shape, generator=gen) < 0.4] = float("-inf")   # empty rounds
    lse_s.view(b, h, r, p)[0, 0, :, :3] = float("-inf")                   # empty unions
    lse_s.requires_grad_()
    v = torch.randn(b, h, p, w, dtype=torch.float64, generator=gen).requires_grad_()
    merged = sort.merge_rounds(out_s, lse_s, v)
    rank = order.argsort(dim=-1)                                            # position -> slot
    out_p = out_s.view(b, h, r, p, w).gather(3, rank[..., None].expand(-1, -1, -1, -1, w))
    lse_p = lse_s.view(b, h, r, p).gather(3, rank)                          # (B, H, R, P)
    empty = torch.isinf(lse_p).all(dim=2)                                   # (B, H, P)
    weights = torch.softmax(lse_p.masked_fill(empty[:, :, None], 0.0), dim=2)
    expected = torch.where(empty[..., None], v, (weights[..., None] * out_p).sum(dim=2))
    assert empty.any() and not empty.all()
    assert_values_and_gradients_match(merged, expected, [out_s, lse_s, v], tol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_repeated_rounds_count_each_pair_once(causal):
    qk, v = inputs(n=32)
    rot = random_rotations(3, 1, 8, 4, torch.Generator().manual_seed(2), dtype=torch.float64)
    one = lsh_buckets(qk, rot, 4)
    three = one.repeat(1, 1, 3, 1)  # the same hash three times: the union is one round's set
    assert max_abs_diff(lsh_attention(qk, v, three, 4, causal), lsh_attention(qk, v, one, 4, causal)) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_one_round_is_dense_shared_qk(causal):
    torch.manual_seed(0)
    n = 13
    attn = et.build_attention("reformer", dim=16, heads=2, causal=causal, bucket_size=16,
                              n_hashes=1, n_buckets=1).double().eval()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    q = attn.split_heads(attn.to_qk(x))
    v = attn.split_heads(attn.to_v(x))
    eye = torch.eye(n, dtype=torch.bool)
    allowed = torch.ones(n, n, dtype=torch.bool).tril(-1) if causal else ~eye
    allowed = allowed | (eye & ~allowed.any(-1, keepdim=True))  # the first token sees itself
    dense = naive_attention(q, F.normalize(q, dim=-1), v, allowed, 1 / math.sqrt(8))
    assert max_abs_diff(attn(x), attn.to_out(attn.merge_heads(dense))) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_buckets", [None, (2, 4)])
def test_layer_equals_oracle_at_any_length_with_padding(causal, n_buckets):
    n = 23  # not a multiple of bucket_size: padded inside the layer
    attn = small_attention("reformer", causal=causal, n_buckets=n_buckets, bucket_size=4,
                           n_hashes=3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, n, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = random_mask(2, n, generator=gen)
    fast = attn(x, mask)
    # the oracle on the same padded buckets
    qk = attn.split_heads(attn.to_qk(x))
    v = attn.split_heads(attn.to_v(x))
    buckets = attn.hash(qk, attn.buckets_for(24), mask)
    slow = attn.to_out(attn.merge_heads(naive_lsh_attention(qk, v, buckets, 4, causal)))
    assert_values_and_gradients_match(fast, slow, [x] + list(attn.parameters()), mask[..., None], tol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_buckets", [None, 4])
def test_bucket_size_beyond_the_length_is_the_same_definition_at_a_clamped_chunk(causal, n_buckets):
    assert [lsh.chunk_for(n, 4096) for n in (1, 2, 23, 32, 33)] == [1, 2, 32, 32, 64]
    assert lsh.chunk_for(23, 16) == 16 and lsh.chunk_for(23, 24) == 24
    n = 23
    attn = small_attention("reformer", causal=causal, n_buckets=n_buckets, bucket_size=4096,
                           n_hashes=3)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, n, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = random_mask(2, n, generator=gen)
    fast = attn(x, mask)  # padded to 32 tokens, not 4096
    qk = attn.split_heads(attn.to_qk(x))
    v = attn.split_heads(attn.to_v(x))
    buckets = attn.hash(qk, attn.buckets_for(4096), mask)  # the unclamped bucket count
    slow = attn.to_out(attn.merge_heads(naive_lsh_attention(qk, v, buckets, 4096, causal)))
    assert_values_and_gradients_match(fast, slow, [x] + list(attn.parameters()), mask[..., None], tol=1e-12)
    if causal:  # a prompt through the clamped chunked path, then the cache at bucket_size 4096
        from test_patterns import check_decode
        check_decode(attn)


def test_bucket_count_follows_the_length_and_is_fixed_when_causal():
    attn = et.build_attention("reformer", dim=16, heads=2, bucket_size=8)
    assert [attn.buckets_for(p) for p in (8, 16, 24, 64)] == [1, 2, 4, 8]  # odd rounded up to even
    causal = et.build_attention("reformer", dim=16, heads=2, bucket_size=8, causal=True)
    assert causal.buckets_for(8) == causal.buckets_for(4096)


def test_language_model_sizes_causal_buckets_from_max_len_and_decodes_exactly():
    from test_patterns import check_decode
    sizes = {max_len: [b.attention.n_buckets for b in et.build_model(
        "reformer", task="lm", vocab_size=11, dim=16, depth=2, heads=2, max_len=max_len,
        bucket_size=8).encoder.blocks] for max_len in (8, 40, 64)}
    assert sizes == {8: [1, 1], 40: [6, 6], 64: [8, 8]}    # about bucket_size tokens per bucket
    given = et.build_model("reformer", task="lm", vocab_size=11, max_len=64, n_buckets=2)
    assert given.config["n_buckets"] == 2 and given.encoder.blocks[0].attention.n_buckets == 2
    # one bucket: each token sees the bucket_size most recent earlier tokens, forward = decode
    attn = et.build_attention("reformer", dim=16, heads=2, causal=True, bucket_size=8,
                              n_buckets=1).double()
    check_decode(attn)


def test_hash_ids_and_padding_bucket():
    qk, _ = inputs(n=20)
    rot = random_rotations(3, 2, 8, 6, torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = random_mask(2, 20)
    b = lsh_buckets(qk, rot, 6, mask)
    assert b.shape == (2, 3, 2, 20)
    assert (b[mask[:, None, None, :].expand_as(b)] < 6).all()
    assert (b[~mask[:, None, None, :].expand_as(b)] == 6).all()
    assert len(b[mask[:, None, None, :].expand_as(b)].unique()) > 2


def test_rotations_are_fixed_per_layer_saved_and_redrawn_only_on_request():
    torch.manual_seed(0)
    a = et.build_attention("reformer", dim=16, heads=2, bucket_size=4, n_hashes=2).double()
    x = torch.randn(1, 32, 16, dtype=torch.float64)
    assert torch.equal(a.train()(x), a(x))  # fixed rotations: training forward is deterministic
    torch.manual_seed(1)
    b = et.build_attention("reformer", dim=16, heads=2, bucket_size=4, n_hashes=2).double()
    b.load_state_dict(a.state_dict())  # the seed travels with the weights
    assert torch.equal(a(x), b(x))
    r = et.build_attention("reformer", dim=16, heads=2, bucket_size=4, n_hashes=2, redraw=True)
    r = r.double()
    assert not torch.equal(r.train()(x), r(x))
    assert torch.equal(r.eval()(x), r(x))


def test_factorised_layer_decodes_exactly_and_saves_its_factors(tmp_path):
    from test_patterns import check_decode
    attn = et.build_attention("reformer", dim=16, heads=2, causal=True, bucket_size=4,
                              n_hashes=2, n_buckets=[2, 4]).double()
    assert attn.n_buckets == (2, 4)
    check_decode(attn)
    # a language model sized from a long max_len gets factorised buckets; they survive a save
    model = et.build_model("reformer", task="lm", vocab_size=11, dim=16, depth=1, heads=2,
                           max_len=128, bucket_size=4)
    assert model.encoder.blocks[0].attention.n_buckets == (6, 6)  # 32 -> 6 x 6
    model.save_pretrained(tmp_path)
    loaded = et.load_pretrained(tmp_path)
    assert loaded.encoder.blocks[0].attention.n_buckets == (6, 6)
    tokens = torch.randint(0, 11, (1, 40))
    assert torch.equal(model.eval()(tokens).logits, loaded.eval()(tokens).logits)


def test_bad_options_are_refused():
    for bad in (3, (2, 3), (), [4, 0], (2, True), (2.0, 4)):
        with pytest.raises(ValueError, match="n_buckets"):
            et.build_attention("reformer", dim=16, heads=2, n_buckets=bad)
    with pytest.raises(ValueError, match="bucket_size"):
        et.build_attention("reformer", dim=16, heads=2, bucket_size=0)
    with pytest.raises(ValueError, match="n_hashes"):
        et.build_attention("reformer", dim=16, heads=2, n_hashes=0)
    with pytest.raises(ValueError, match="redraw"):
        et.build_attention("reformer", dim=16, heads=2, redraw=1)


def test_decode_with_a_long_prompt_matches_forward():
    from efficient_transformers.attention import reformer
    attn = small_attention("reformer", causal=True)
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    old = reformer.DECODE_QUERY_BLOCK
    reformer.DECODE_QUERY_BLOCK = 7  # several query blocks inside one decode call
    try:
        y, state = attn.decode(x[:, :5])  # the prompt: the chunked causal path
        y2, _ = attn.decode(x[:, 5:], state)  # 35 tokens in blocks of 7 against the cache
    finally:
        reformer.DECODE_QUERY_BLOCK = old
    assert max_abs_diff(torch.cat([y, y2], 1), attn(x)) < 1e-10
