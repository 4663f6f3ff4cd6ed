"""Fixed patterns as pure functions, the log-sum-exp merge, and the shared oracle check."""

from __future__ import annotations

import math

import pytest
import torch

from efficient_transformers.functional.axial import axial_attention, grid_shape, strided_column_attention
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.functional.merge import (attention_with_lse, merge_attention_parts,
                                                     merge_pair)
from efficient_transformers.functional.patterns import (
    Axial, BlockLocal, Fixed, ImageLocal1D, ImageLocal2D, LocalWindow, Strided, dense_pattern_mask,
    image2d_attention, pattern_attention, pattern_attention_with_lse,
)
from helpers import max_abs_diff, random_mask, train_losses


def check_oracle(fast, allowed, n, padded, heads=2, d=8, tol=1e-10, seed=0):
    """fast(q, k, v, mask) -> (B, H, N, d) equals naive attention under the dense bool `allowed`
    ((N, N) or (H, N, N)) & key padding, at real queries: values and gradients, float64."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, d, dtype=torch.float64, generator=gen).requires_grad_()
               for _ in range(3))
    mask = random_mask(2, n, generator=gen) if padded else None
    out = fast(q, k, v, mask)
    dense = allowed if mask is None else allowed & mask[:, None, None, :]
    ref = naive_attention(q, k, v, dense)
    real = (mask if mask is not None else torch.ones(2, n, dtype=torch.bool))[:, None, :, None]
    real = real.expand_as(out)
    assert max_abs_diff(out[real], ref[real]) < tol
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen) * real
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert max_abs_diff(a, b) < tol


def keys_per_query(pattern, n):
    return dense_pattern_mask(pattern, n).sum(-1)


def test_strided_gives_about_two_sqrt_n_keys_at_stride_sqrt_n():
    n, l = 1024, 32
    counts = keys_per_query(Strided(l, causal=True), n)
    # late queries: l + 1 local keys plus about n / l column keys, ~ 2·sqrt(N)
    assert abs(counts[-1].item() - 2 * math.sqrt(n)) <= 2
    assert counts.max().item() <= 2 * math.sqrt(n) + 1
    row = dense_pattern_mask(Strided(l, causal=True, part="column"), n)[-1]
    gaps = torch.diff(row.nonzero().flatten())
    assert (gaps == l).all()


def test_fixed_pattern_sees_own_block_and_summaries():
    pattern = Fixed(stride=8, summary=2, causal=True)
    row = dense_pattern_mask(pattern, 40)[35]                    # block 4 = [32, 40)
    expected = {6, 7, 14, 15, 22, 23, 30, 31, 32, 33, 34, 35}
    assert set(row.nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("pattern,block", [
    (LocalWindow(5), 4), (LocalWindow(5, causal=True), 4), (BlockLocal(4), 4),
    (BlockLocal(4, causal=True), 4), (ImageLocal1D(4, 6), 4), (ImageLocal1D(4, 6, causal=True), 4),
    (ImageLocal1D(8, 3, causal=True), 8),
])
def test_key_blocks_cover_every_allowed_key(pattern, block):
    n = 40
    dense = dense_pattern_mask(pattern, n)
    covered = torch.zeros(n, n, dtype=torch.bool)
    for qb, row in enumerate(pattern.key_blocks(n // block, block)):
        for kb in row[row >= 0].tolist():
            covered[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = True
    assert not (dense & ~covered).any()


@pytest.mark.parametrize("pattern", [ImageLocal1D(4, 6, True), ImageLocal2D(7, (2, 3), (2, 2), True),
                                     Strided(4, True, "local"), BlockLocal(4, True), Fixed(4, 2, True, "block")])
def test_earliest_key_keeps_everything_a_future_query_sees(pattern):
    n = 60
    dense = dense_pattern_mask(pattern, n)
    for length in range(1, n):
        seen = dense[length:].any(dim=0).nonzero().flatten()
        assert seen.min().item() >= pattern.earliest_key(length)


def test_image2d_pattern_is_the_rectangle():
    p = ImageLocal2D(width=8, query_shape=(2, 4), memory_flange=(1, 2))
    mask = dense_pattern_mask(p, 48).view(48, 6, 8)
    # query (r=2, c=5): block rows 2-3, columns 4-7; memory rows 1-4, columns 2-7 (width 8)
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[1:5, 2:8] = True
    assert torch.equal(mask[2 * 8 + 5], expected)


def test_axial_pattern_is_row_and_column():
    p = Axial((4, 5), causal=True)
    mask = dense_pattern_mask(p, 20).view(20, 4, 5)
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[2, :4] = True      # the row up to the query (2, 3)
    expected[:2, 3] = True      # the rows above, same column
    expected[1, :] = True       # the whole previous row
    assert torch.equal(mask[2 * 5 + 3], expected)


def test_grid_shape():
    assert grid_shape(37) == (6, 7) and grid_shape(36) == (6, 6) and grid_shape(1) == (1, 1)
    assert grid_shape(10, (2, 4)) == (3, 4) and grid_shape(5, (3, 4)) == (3, 4)


@pytest.mark.parametrize("causal", [False, True])
def test_merge_attention_parts_is_one_softmax_over_the_union(causal):
    n = 13
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 4, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(3))
    split = torch.rand(n, n, generator=gen) > 0.5
    base = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
    a, b = base & split, base & ~split
    a[0] = False                                  # an empty part in a row must be harmless
    b[0, 0] = True
    out, lse = merge_attention_parts([attention_with_lse(q, k, v, a), attention_with_lse(q, k, v, b)])
    ref = naive_attention(q, k, v, a | b)
    ref_lse = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~(a | b), float("-inf")).logsumexp(-1)
    assert max_abs_diff(out, ref) < 1e-12 and max_abs_diff(lse, ref_lse) < 1e-12
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v)),
                    torch.autograd.grad((ref * g).sum() + ref_lse.sum(), (q, k, v))):
        assert max_abs_diff(x, y) < 1e-12


def test_merge_pair_is_merge_attention_parts_for_two():
    """Values and gradients (through both outs and both lses) in float64; a row empty in one
    part, a row empty in both (out_b's row, finite gradients)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 11, 4, dtype=torch.float64, generator=gen).requires_grad_()
               for _ in range(3))
    split = torch.rand(11, 11, generator=gen) > 0.5
    a, b = split.clone(), ~split
    a[0], b[1] = False, False                     # empty in one part
    a[2], b[2] = False, False                     # empty in both
    parts = [attention_with_lse(q, k, v, a), attention_with_lse(q, k, v, b)]
    out = merge_pair(*parts[0], *parts[1])
    ref, _ = merge_attention_parts(parts)
    assert max_abs_diff(out, ref) < 1e-12
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad((out * g).sum(), (q, k, v), retain_graph=True),
                    torch.autograd.grad((ref * g).sum(), (q, k, v))):
        assert torch.isfinite(x).all() and max_abs_diff(x, y) < 1e-12


def test_empty_rows_give_zero_and_finite_gradients():
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    allowed = torch.tensor([[True, False, False], [False, False, False], [True, True, False]])
    out, lse = attention_with_lse(q, q, q, allowed)
    assert torch.equal(out[0, 0, 1], torch.zeros(4)) and lse[0, 0, 1] == float("-inf")
    (out.sum() + merge_attention_parts([(out, lse), (out * 0, lse)])[0].sum()).backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_pattern_attention_with_lse_equals_oracle(causal, padded):
    pattern = ImageLocal1D(4, 6, causal)
    check_oracle(lambda q, k, v, m: pattern_attention_with_lse(q, k, v, pattern, 4, m)[0],
                 dense_pattern_mask(pattern, 23), 23, padded)


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_axial_attention_equals_oracle(shape, causal, padded):
    n = math.prod(shape) - 3  # a partial last row
    check_oracle(lambda q, k, v, m: axial_attention(q, k, v, shape, causal, m)[0],
                 dense_pattern_mask(Axial(shape, causal), n), n, padded)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_column_attention_equals_oracle(causal):
    p = Strided(4, causal, "column")
    check_oracle(lambda q, k, v, m: strided_column_attention(q, k, v, 4, "causal" if causal else "all", m)[0],
                 dense_pattern_mask(p, 22), 22, True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("geometry", [(7, (2, 3), (2, 2)), (8, (2, 4), (1, 2)), (5, (3, 2), (4, 3))])
def test_image2d_attention_equals_oracle(causal, padded, geometry):
    width, qs, flange = geometry
    p = ImageLocal2D(width, qs, flange, causal)
    n = 4 * width + 3
    check_oracle(lambda q, k, v, m: image2d_attention(q, k, v, p, m), dense_pattern_mask(p, n), n, padded)


def test_pattern_attention_existing_api_still_works():
    p = LocalWindow(3, causal=True)
    check_oracle(lambda q, k, v, m: pattern_attention(q, k, v, p, 4, m), dense_pattern_mask(p, 18), 18, True)


def check_decode(attn, n=37, dim=16, seed=0):
    """Feeding x in random chunks, and token by token, equals one causal forward. Returns the
    last state (to check what it keeps)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, dim, dtype=torch.float64, generator=gen)
    full = attn(x)
    for sizes in ([int(s) for s in torch.randint(1, 9, (n,), generator=gen)], [1] * n):
        outs, state, start = [], None, 0
        while start < n:
            size = min(sizes[len(outs)], n - start)
            y, state = attn.decode(x[:, start:start + size], state)
            outs.append(y)
            start += size
        assert max_abs_diff(torch.cat(outs, dim=1), full) < 1e-9, sizes
    return state


def train_steps(model, tokens, steps=4, lr=3e-3, **forward):
    """A few AdamW steps on one batch: the loss must go down and stay finite."""
    losses = train_losses(model, tokens, forward.get("labels", tokens), steps=steps, lr=lr)
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0], losses


def test_hand_written_backward_equals_autograd():
    from efficient_transformers.functional.merge import attention_with_lse_reference
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 7, 5, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(3))
    allowed = torch.rand(7, 7, generator=gen) > 0.4
    allowed[3] = False                                  # an empty row
    g_out, g_lse = torch.randn(2, 3, 7, 5, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    grads = []
    for fn in (attention_with_lse, attention_with_lse_reference):
        out, lse = fn(q, k, v, allowed)
        loss = (out * g_out).sum() + (lse.masked_fill(~torch.isfinite(lse), 0) * g_lse).sum()
        grads.append((out, lse, *torch.autograd.grad(loss, (q, k, v))))
    for a, b in zip(*grads):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        assert max_abs_diff(a[torch.isfinite(a)], b[torch.isfinite(b)]) < 1e-12
