"""Routing Transformer: fast paths against dense masked oracles, k-means behaviour, model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import efficient_transformers as et
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.functional.kmeans import (
    balanced_allowed, balanced_members, centroid_scores, ema_centroids, routed_attention,
    window_allowed,
)
from efficient_transformers.functional.unit import unit_vectors
from efficient_transformers.functional.routed import routed_heads
from helpers import assert_equals_dense_attention, assert_values_and_gradients_match, max_abs_diff, random_mask

DIM, HEADS, N = 16, 2, 23


def build(causal=False, seed=0, **options):
    torch.manual_seed(seed)
    opts = {"num_clusters": 3, "window": 4, "local_heads": 1, **options}
    return et.build_attention("routing_transformer", dim=DIM, heads=HEADS, causal=causal,
                              **opts).double().eval()


def oracle(attn, x, mask):
    """The same definition with N x N scores and boolean masks (module in eval mode)."""
    b, n, _ = x.shape
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    q, k, v = attn.qkv(x)
    hl, c, w = attn.local_heads, attn.num_clusters, attn.window
    eye = torch.eye(n, dtype=torch.bool)
    outs = []
    if hl:
        allowed = window_allowed(n, w, attn.causal) & (real[:, None, None, :] | eye)
        outs.append(naive_attention(q[:, :hl], k[:, :hl], v[:, :hl], allowed))
    if attn.routing_heads:
        q, k, v = q[:, hl:], k[:, hl:], v[:, hl:]
        mu = attn.centroids
        q_hat, k_hat = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if attn.causal:
            r = F.normalize(q_hat + k_hat, dim=-1)
            group = torch.where(real[:, None], centroid_scores(r, mu).argmax(-1), c)  # (B, H, N)
            onehot = F.one_hot(group, c + 1)
            rank = ((onehot.cumsum(2) - onehot) * onehot).sum(-1)
            same = group[..., :, None] == group[..., None, :]
            recent = (rank[..., :, None] - rank[..., None, :]) < w
            allowed = same & recent & torch.ones(n, n, dtype=torch.bool).tril()
            allowed &= real[:, None, None, :] | eye
            outs.append(naive_attention(q, k, v, allowed))
        else:
            size = min(n, math.ceil(n / c))
            qm = balanced_allowed(centroid_scores(q_hat, mu), size, real)  # (B, H, C, N)
            km = balanced_allowed(centroid_scores(k_hat, mu), size, real)
            total = torch.zeros_like(q)
            for cluster in range(c):
                allowed = qm[:, :, cluster, :, None] & km[:, :, cluster, None, :] & real[:, None, None, :]
                out = naive_attention(q, k, v, allowed)
                total = total + out * qm[:, :, cluster, :, None]
            count = qm.sum(2).clamp_min(1)[..., None]
            outs.append(total / count)
    return attn.to_out(attn.merge_heads(torch.cat(outs, dim=1)))


def compare_with_oracle(attn, x, mask):
    x = x.clone().requires_grad_()
    real = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    fast, slow = attn(x, mask), oracle(attn, x, mask)
    assert_values_and_gradients_match(fast, slow, [x] + list(attn.parameters()), real[..., None], tol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("local_heads", [0, 1])
def test_fast_path_equals_oracle(causal, padded, local_heads):
    attn = build(causal, local_heads=local_heads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=gen)
    mask = random_mask(2, N, generator=gen) if padded else None
    compare_with_oracle(attn, x, mask)


@pytest.mark.parametrize("padding", ["none", "some", "a whole row"])
def test_fused_routed_heads_equal_the_composed_reference(padding):
    """The CPU node (gather, attention, average in one, from the projection) against gather +
    SDPA + scatter on q, k, v views, on values and on the projection's gradient."""
    torch.manual_seed(1)
    b, heads, h0, n, d, c = 2, 4, 1, 40, 8, 5
    qkv = torch.randn(b, n, 3 * heads * d, dtype=torch.float64, requires_grad=True)
    q, k, v = (t.view(b, n, heads, d).transpose(1, 2)[:, h0:] for t in qkv.chunk(3, dim=-1))
    real = torch.ones(b, n, dtype=torch.bool)
    if padding != "none":
        real = random_mask(b, n)
    if padding == "a whole row":
        real[1] = False
    mu = F.normalize(torch.randn(heads - h0, c, d, dtype=torch.float64), dim=-1)
    members = [balanced_members(centroid_scores(F.normalize(t, dim=-1), mu), n // c + 2, real)
               for t in (q, k)]  # overlapping clusters: some queries in several, some in none
    fused, loss = routed_heads(qkv, heads, h0, *members, real)
    assert loss.item() == 0.0
    reference = routed_attention(q, k, v, *members, real)
    assert_values_and_gradients_match(fused, reference, [qkv], tol=1e-12)
    if padding == "none":  # real None: no padding known on the host, no mask built
        for fast in (routed_heads(qkv, heads, h0, *members, None)[0],
                     routed_attention(q, k, v, *members, None)):
            reference = routed_attention(q, k, v, *members, real)
            assert_values_and_gradients_match(fast, reference, [qkv], tol=1e-12)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("local_heads", [0, 1])
def test_fused_routing_layer_equals_the_composed_layer_with_its_loss(padded, local_heads):
    """The whole layer, fused CPU node against the composition: outputs, commitment loss, the
    gradients of both (x and every parameter), and the same centroid update in training."""
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, N) if padded else None
    results = []
    for fused in (True, False):
        attn = build(False, local_heads=local_heads, commitment=0.3).train()
        attn.fused_cpu = fused
        y = attn(x, mask)
        up = torch.randn_like(y, generator=torch.Generator().manual_seed(3))
        params = [x] + list(attn.parameters())
        grads = torch.autograd.grad([y, attn.aux_loss], params, [up, torch.tensor(2.0).double()])
        results.append((y, attn.aux_loss, grads, attn.centroids))
    (y1, a1, g1, c1), (y2, a2, g2, c2) = results
    real = torch.ones(2, N, 1, dtype=torch.bool) if mask is None else mask[..., None]
    assert max_abs_diff(y1 * real, y2 * real) < 1e-12
    assert abs(a1.item() - a2.item()) < 1e-14
    for a, b in zip(g1, g2):
        assert max_abs_diff(a, b) < 1e-10
    assert max_abs_diff(c1, c2) < 1e-14


def test_unit_vectors_equal_normalize_with_gradients():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    x[0, 0, 0] = 0.0      # a zero vector and one below eps: the divisor is the constant eps
    x[0, 0, 1] = 1e-14
    x = x.transpose(1, 2).requires_grad_()  # strided, as the heads of a projection
    assert_values_and_gradients_match(unit_vectors(x), F.normalize(x, dim=-1), [x], tol=1e-12)


def test_oracle_with_a_small_window_and_many_clusters():
    attn = build(True, num_clusters=2, window=2, local_heads=0)
    x = torch.randn(2, 30, DIM, dtype=torch.float64)
    compare_with_oracle(attn, x, random_mask(2, 30))
    attn = build(False, num_clusters=7, window=3)
    compare_with_oracle(attn, x, random_mask(2, 30))


@pytest.mark.parametrize("causal", [False, True])
def test_one_cluster_equals_dense_attention(causal):
    attn = build(causal, num_clusters=1, local_heads=0, window=64)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    assert_equals_dense_attention(attn, x, random_mask(2, N))


def test_balanced_members_equal_the_rank_definition():
    scores = torch.randn(2, 3, 17, 4, dtype=torch.float64)
    real = random_mask(2, 17)
    members = balanced_members(scores, 5, real)  # (B, H, C, 5)
    dense = torch.zeros(2, 3, 4, 17, dtype=torch.bool).scatter(-1, members, True)
    assert torch.equal(dense, balanced_allowed(scores, 5, real))
    # every cluster takes real tokens first
    assert (real[:, None, None, :].expand_as(dense) | ~dense).all()


def test_training_updates_centroids_after_routing_and_eval_does_not():
    attn = build(False)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    before = attn.centroids.clone()
    y_eval = attn(x)
    assert torch.equal(attn.centroids, before), "eval must not move the centroids"
    attn.train()
    y_train = attn(x)  # routed with the old centroids, updated afterwards
    assert max_abs_diff(y_train, y_eval) < 1e-12
    assert not torch.equal(attn.centroids, before)
    assert torch.allclose(attn.centroids.norm(dim=-1), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("by_index", [False, True], ids=["one-hot", "index_add"])
def test_ema_step_ignores_padded_tokens_and_empty_clusters(by_index):
    torch.manual_seed(0)
    mu = F.normalize(torch.randn(2, 3, 4, dtype=torch.float64), dim=-1)
    x = F.normalize(torch.randn(1, 2, 6, 4, dtype=torch.float64), dim=-1)
    assign = torch.tensor([[[0, 0, 1, 1, 1, 0], [2, 2, 2, 2, 2, 2]]])
    real = torch.tensor([[True, True, True, True, False, False]])
    new = ema_centroids(mu, x, assign, real, decay=0.5, by_index=by_index)
    expect = F.normalize(0.5 * mu[0, 0] + 0.5 * x[0, 0, :2].mean(0), dim=-1)
    assert max_abs_diff(new[0, 0], expect) < 1e-12
    assert torch.equal(new[0, 2], mu[0, 2])  # no member: unchanged
    x2 = x.clone()
    x2[..., 4:, :] = 7.0  # padded values do not matter
    assert torch.equal(new, ema_centroids(mu, x2, assign, real, decay=0.5, by_index=by_index))


def test_ema_sums_by_index_equal_the_one_hot_matmul():
    """The CUDA default (index_add_) against the CPU's (one-hot matmul), 2 batches, 3 heads."""
    gen = torch.Generator().manual_seed(1)
    mu = F.normalize(torch.randn(3, 5, 8, dtype=torch.float64, generator=gen), dim=-1)
    x = F.normalize(torch.randn(2, 3, 40, 8, dtype=torch.float64, generator=gen), dim=-1)
    assign = torch.randint(0, 4, (2, 3, 40), generator=gen)   # cluster 4 left empty
    real = random_mask(2, 40, generator=gen)
    one_hot = ema_centroids(mu, x, assign, real, 0.9, by_index=False)
    indexed = ema_centroids(mu, x, assign, real, 0.9, by_index=True)
    assert max_abs_diff(one_hot, indexed) < 1e-12
    assert max_abs_diff(indexed[:, 4], mu[:, 4]) < 1e-12   # empty: kept (renormalised)


def test_no_padding_as_none_equals_an_all_real_mask():
    """real=None (no mask: nothing masked or weighted) gives what an all-True mask gives: the
    k-means step (both sums), the commitment loss and its gradient, the balanced members."""
    from efficient_transformers.functional.kmeans import commitment_loss

    gen = torch.Generator().manual_seed(2)
    mu = F.normalize(torch.randn(3, 5, 8, dtype=torch.float64, generator=gen), dim=-1)
    x = F.normalize(torch.randn(2, 3, 40, 8, dtype=torch.float64, generator=gen), dim=-1)
    x.requires_grad_()
    scores = centroid_scores(x, mu)
    best = scores.max(-1)
    every = torch.ones(2, 40, dtype=torch.bool)
    for by_index in (False, True):
        assert max_abs_diff(ema_centroids(mu, x, best.indices, None, 0.9, by_index=by_index),
                            ema_centroids(mu, x, best.indices, every, 0.9, by_index=by_index)) < 1e-12
    losses = [commitment_loss(x, best.indices, mu, real) for real in (None, every)]
    assert max_abs_diff(*losses) < 1e-12
    grads = [torch.autograd.grad(loss, x, retain_graph=True)[0] for loss in losses]
    assert max_abs_diff(*grads) < 1e-12
    assert torch.equal(balanced_members(scores, 9, None), balanced_members(scores, 9, every))


def test_aux_loss_is_the_commitment_loss_with_gradient():
    attn = build(False, commitment=0.5)
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    attn(x)
    assert attn.aux_loss is not None and attn.aux_loss.ndim == 0 and attn.aux_loss > 0
    (grad,) = torch.autograd.grad(attn.aux_loss, x)
    assert grad.abs().sum() > 0
    # the closed form equals the explicit squared distance to the winning centroid
    q, k, _ = attn.qkv(x)
    total = 0.0
    for t in (q[:, 1:], k[:, 1:]):
        t_hat = F.normalize(t, dim=-1)
        mu = attn.centroids[0][centroid_scores(t_hat, attn.centroids).argmax(-1)]  # (B, 1, N, d)
        total = total + (t_hat - mu).square().sum(-1).mean() / 2
    assert abs(attn.aux_loss.item() - 0.5 * total.item()) < 1e-12
    only_local = build(False, local_heads=HEADS)
    only_local(x)
    assert only_local.aux_loss is None


@pytest.mark.parametrize("options,argument", [
    ({"local_heads": 3}, "local_heads"), ({"num_clusters": 0}, "num_clusters"),
    ({"window": 0}, "window"), ({"decay": 1.0}, "decay"), ({"commitment": -1.0}, "commitment"),
    ({"decay": float("nan")}, "decay"), ({"commitment": float("inf")}, "commitment"),
])
def test_bad_options_are_refused(options, argument):
    with pytest.raises(ValueError, match=argument):
        et.build_attention("routing_transformer", dim=DIM, heads=HEADS, **options)


def test_decode_after_a_long_prompt_matches_forward():
    attn = build(True, num_clusters=2, window=3)
    x = torch.randn(1, 40, DIM, dtype=torch.float64)
    full = attn(x)
    y1, state = attn.decode(x[:, :29])  # prompt through the fast path
    y2, state = attn.decode(x[:, 29:33], state)
    y3, state = attn.decode(x[:, 33:], state)
    assert max_abs_diff(torch.cat([y1, y2, y3], dim=1), full) < 1e-10


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_model_trains_and_reports_the_aux_loss(task):
    torch.manual_seed(0)
    model = et.build_model("routing_transformer", task=task, vocab_size=32, num_classes=3, dim=32,
                           depth=2, heads=2, max_len=64, num_clusters=4, window=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 32, (2, 32))
    labels = tokens if task == "lm" else torch.tensor([0, 2])
    losses = []
    for _ in range(5):
        out = model(tokens, labels=labels)
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    if task == "lm":
        generated = model.generate(tokens[:, :5], max_new_tokens=3, temperature=0)
        assert generated.shape == (2, 8)
