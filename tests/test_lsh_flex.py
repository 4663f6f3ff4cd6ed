"""Reformer's CUDA path (`functional/lsh_flex.py`): every round's chunks as one FlexAttention call.

On the CPU, FlexAttention's eager reference (dense scores; its device check lifted, which is all
that stops its backward there) stands in for the CUDA kernel: the mask_mod, the block mask, the
rounds as heads, the lse gradient and the merge are ours and are checked against the chunked path
in float64, values and gradients. The compiled CUDA kernel is checked by the `gpu` tests.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional import lsh_flex
from efficient_transformers.functional.lsh import (
    RoundSort, lsh_attention, lsh_buckets, random_rotations,
)
from helpers import assert_values_and_gradients_match, max_abs_diff, random_mask

pytest.importorskip("torch.nn.attention.flex_attention")


def eager_flex(q, k, v, **kwargs):
    """FlexAttention's eager reference (dense scores), on any device."""
    from torch.nn.attention import flex_attention as module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.flex_attention(q, k, v, **kwargs)


@pytest.fixture
def cpu_flex(monkeypatch):
    """The eager reference with gradients on the CPU (its device check is the only obstacle)."""
    from torch.nn.attention import flex_attention as module

    monkeypatch.setattr(module, "_validate_device", lambda *args: None)
    return eager_flex


def hashed(b=2, h=2, p=48, d=8, rounds=3, n_buckets=4, pad=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qk = torch.randn(b, h, p, d, dtype=torch.float64, generator=gen).requires_grad_()
    v = torch.randn(b, h, p, d, dtype=torch.float64, generator=gen).requires_grad_()
    rot = random_rotations(h, rounds, d, n_buckets, gen, dtype=torch.float64)
    mask = torch.ones(b, p, dtype=torch.bool)
    mask[-1, p - pad:] = False  # the last sequence padded: those tokens take the padding bucket
    return qk, v, lsh_buckets(qk, rot, n_buckets, mask), mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rounds", [1, 2, 3])
@pytest.mark.parametrize("chunk,block", [(4, 8), (8, 4), (4, 128), (6, 16)])
def test_flex_path_equals_the_chunked_path(causal, rounds, chunk, block, cpu_flex):
    """Blocks of 2 chunks, of half a chunk, one block for everything, and chunks that straddle
    blocks; 1 to 3 rounds (pairs of earlier rounds masked); the padding bucket."""
    qk, v, buckets, mask = hashed(p=48, rounds=rounds, seed=rounds + chunk)
    fast = lsh_flex.lsh_attention_flex(qk, v, buckets, chunk, causal, 4, block=block,
                                       flex=cpu_flex)
    slow = lsh_attention(qk, v, buckets, chunk, causal, n_buckets=4)
    assert_values_and_gradients_match(fast, slow, (qk, v), mask[:, None, :, None], tol=1e-12)


def test_a_round_with_no_pair_for_a_token_falls_back_as_the_chunked_path_does(cpu_flex):
    """One bucket per token alone in its round: empty rounds weigh 0, an empty union returns the
    token's own value."""
    qk, v, _, _ = hashed(b=1, h=1, p=16, rounds=2)
    buckets = torch.arange(16).repeat(1, 1, 2, 1)  # every token alone in its bucket
    buckets[..., 0, :8] = 0                        # round 0: the first half shares one bucket
    for causal in (False, True):
        fast = lsh_flex.lsh_attention_flex(qk, v, buckets, 4, causal, 16, block=8, flex=cpu_flex)
        slow = lsh_attention(qk, v, buckets, 4, causal, n_buckets=16)
        assert_values_and_gradients_match(fast, slow, (qk, v), tol=1e-12)
        assert torch.equal(fast[0, 0, 8:], v[0, 0, 8:])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk,block", [(4, 8), (8, 4), (6, 16), (64, 128), (6, 4)])
def test_the_block_mask_lists_every_block_that_holds_a_pair(causal, chunk, block):
    """FlexAttention only visits the listed key blocks (its eager reference does not care, so
    the comparison above cannot see a missing block): every allowed (query slot, key slot) lies
    in a listed block, and a query block lists no more than its queries' keys can span
    (block + 2·chunk slots)."""
    p, rounds, n_buckets = 4 * max(chunk, block), 3, 2
    gen = torch.Generator().manual_seed(chunk)
    buckets = torch.randint(0, n_buckets, (1, 2, rounds, p), generator=gen)
    sort = RoundSort(buckets)
    locations, window = sort.sorted_locations(chunk, causal, n_buckets)
    locations = locations.view(1, 2 * rounds, p, rounds)[..., :rounds - 1].long()
    sorted_buckets = sort.sorted_buckets().view(1, 2 * rounds, p)
    mask_mod = lsh_flex._pair_mask_mod(sorted_buckets, locations, rounds, chunk, causal, window)
    block_mask = lsh_flex.chunk_block_mask(p, chunk, causal, mask_mod, block, "cpu")
    i = torch.arange(p)[:, None]
    j = torch.arange(p)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    listed = block_mask.to_dense()[0, 0].bool()                              # (nb, nb)
    covered = listed[i // block, j // block]                                  # (p, p)
    assert int(block_mask.kv_num_blocks.max()) <= math.ceil((block + 2 * chunk) / block) + 1
    for hr in range(2 * rounds):
        allowed = mask_mod(zero, torch.tensor(hr), i, j)
        assert allowed.any()
        assert not (allowed & ~covered).any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_buckets", [4, (2, 4)])
def test_the_layer_takes_the_flex_path_and_equals_its_chunked_path(causal, n_buckets, monkeypatch,
                                                                    cpu_flex):
    """A reformer layer (padding mask, a length that pads to whole chunks; one rotation or a
    factorised hash) through the flex path equals itself through the chunked path: outputs at
    real positions and parameter gradients."""
    torch.manual_seed(0)
    attn = et.build_attention("reformer", dim=16, heads=2, causal=causal, bucket_size=4,
                              n_hashes=3, n_buckets=n_buckets).double()
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    mask = random_mask(2, 37)
    calls = []
    real_flex = lsh_flex.lsh_attention_flex
    monkeypatch.setattr(lsh_flex, "lsh_attention_flex",
                        lambda *a, **k: (calls.append(1), real_flex(*a, **k))[1])
    chunked = attn(x, mask)
    assert not calls   # the CPU takes the chunked path by itself
    monkeypatch.setattr(lsh_flex, "FORCE", cpu_flex)
    fast = attn(x, mask)
    assert calls
    assert_values_and_gradients_match(fast, chunked, list(attn.parameters()),
                                      mask[..., None], tol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_cuda_flex_kernel_equals_the_chunked_path(causal, dtype, tol):
    """The compiled FlexAttention kernel on CUDA: 4 rounds, chunks of 64, 4096 tokens (the
    layer's defaults), against the chunked path in float64; values and gradients."""
    torch.manual_seed(0)
    b, h, p, d, rounds, n_buckets = 1, 4, 4096, 64, 4, 64
    qk = torch.randn(b, h, p, d, device="cuda")
    v = torch.randn(b, h, p, d, device="cuda")
    rot = random_rotations(h, rounds, d, n_buckets, device="cuda")
    buckets = lsh_buckets(qk, rot, n_buckets)
    ref_in = [t.double().requires_grad_() for t in (qk, v)]
    ref = lsh_attention(*ref_in, buckets, 64, causal, n_buckets=n_buckets)
    fast_in = [t.to(dtype).requires_grad_() for t in (qk, v)]
    fast = lsh_flex.lsh_attention_flex(*fast_in, buckets, 64, causal, n_buckets)
    up = torch.randn_like(ref)
    scale = ref.abs().max().item()
    assert max_abs_diff(fast.double(), ref) < tol * scale
    for a, r in zip(torch.autograd.grad(fast, fast_in, up.to(dtype)),
                    torch.autograd.grad(ref, ref_in, up)):
        assert max_abs_diff(a.double(), r) < tol * r.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_layer_takes_the_flex_path_eager_and_compiled(causal, monkeypatch):
    """On CUDA the layer takes the flex path by itself, and under Inductor gives what eager
    gives."""
    torch.manual_seed(0)
    attn = et.build_attention("reformer", dim=128, heads=2, causal=causal).cuda()
    x = torch.randn(2, 1000, 128, device="cuda")
    calls = []
    real_flex = lsh_flex.lsh_attention_flex
    monkeypatch.setattr(lsh_flex, "lsh_attention_flex",
                        lambda *a, **k: (calls.append(1), real_flex(*a, **k))[1])
    eager = attn(x)
    assert calls
    compiled = torch.compile(attn)(x)
    assert max_abs_diff(compiled, eager) < 1e-3 * eager.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_the_flex_path_traces_whole_inside_torch_compile(causal, monkeypatch):
    """On CUDA a compiled caller traces the flex path (sort, block mask from block indices,
    FlexAttention bare, merge) in one graph: forced here with FlexAttention itself and
    `fullgraph=True` (no graph break), forward only (no CPU backward), equal to eager."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    attn = et.build_attention("reformer", dim=32, heads=2, causal=causal, bucket_size=8,
                              n_hashes=3)
    x = torch.randn(2, 100, 32)
    with torch.no_grad():
        eager = attn(x)
        monkeypatch.setattr(lsh_flex, "FORCE", flex_attention)
        torch._dynamo.reset()
        compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)(x)
    assert max_abs_diff(compiled, eager) < 1e-5
