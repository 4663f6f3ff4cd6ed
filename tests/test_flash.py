"""`functional.flash`: direct flash kernel calls and `merge_flash_keys` (a part merged with a few
keys run as one FlashAttention call) against the explicit merge, values and gradients."""

from __future__ import annotations

import pytest
import torch

from efficient_transformers.functional import flash
from efficient_transformers.functional.merge import attention_with_lse, merge_pair
from helpers import assert_values_and_gradients_match, max_abs_diff, small_attention
from test_flex import needs_flex


def explicit_merge(out_a, lse_a, q, k, v):
    return merge_pair(out_a, lse_a, *attention_with_lse(q, k, v))


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("empty_rows", [False, True])
def test_merge_flash_keys_equals_the_explicit_merge_with_gradients(empty_rows, chunked,
                                                                   monkeypatch):
    """Part A is attention over its own keys (some rows without any when empty_rows: lse −inf);
    the merged output and the gradients of every input, float64; chunked: the 30 flash keys as
    3 chunks of 10 (ETC's global rows: their own keys, then every long token)."""
    monkeypatch.setattr(flash, "ROW_CHUNK", 10)
    gen = torch.Generator().manual_seed(0)
    q, k_a, v_a = (torch.randn(2, 3, 20, 8, generator=gen, dtype=torch.float64,
                               requires_grad=True) for _ in range(3))
    k_g, v_g = (torch.randn(2, 3, 30, 8, generator=gen, dtype=torch.float64, requires_grad=True)
                for _ in range(2))
    assert flash.row_chunks(30) == 3
    allowed = torch.rand(20, 20, generator=gen) < 0.5
    if empty_rows:
        allowed[:4] = False
    allowed[4:, 0] = True
    fast = flash.merge_flash_keys(*attention_with_lse(q, k_a, v_a, allowed), q, k_g, v_g,
                                  chunked=chunked)
    slow = explicit_merge(*attention_with_lse(q, k_a, v_a, allowed), q, k_g, v_g)
    assert_values_and_gradients_match(fast, slow, [q, k_a, v_a, k_g, v_g], tol=1e-12)


def test_flash_keys_taken_on_cuda_only_unless_forced(monkeypatch):
    q = torch.randn(1, 2, 16, 8)
    assert not flash.uses_flash_keys(q)
    monkeypatch.setattr(flash, "FLASH_KEYS", True)
    assert flash.uses_flash_keys(q)
    assert not flash.uses_flash_keys(q.to(torch.int32))


@needs_flex
@pytest.mark.parametrize("name,options,taken", [
    # longformer's global rows have their own form (Kg, Vg folded into the queries)
    ("longformer", {"window": 3, "dilation": [1, 2], "num_global": 2}, ["merge_flash_keys"]),
    ("bigbird", {}, ["flash_rows", "merge_flash_keys"]),
    ("bigbird", {"num_global": 2, "num_random_blocks": 1}, ["flash_rows", "merge_flash_keys"]),
])
def test_layer_global_keys_by_flash_equal_the_explicit_merge(name, options, taken, eager_flex,
                                                             monkeypatch):
    """The layer's FlexAttention path (through FlexAttention's eager reference, its device check
    lifted) without padding: the global keys as one flash call and the global rows by
    `flash_rows` equal their explicit forms, in the outputs and the gradients of every
    parameter."""
    from efficient_transformers.functional import flex, global_cuda

    monkeypatch.setattr(flex, "FORCE_FLEX", True)
    attn = small_attention(name, dtype=torch.float32, **options)
    x = torch.randn(2, 37, 16)
    calls = []
    for function_name in ("merge_flash_keys", "flash_rows"):
        function = getattr(global_cuda, function_name)
        monkeypatch.setattr(global_cuda, function_name,
                            lambda *a, f=function, n=function_name: calls.append(n) or f(*a))
    results = []
    for forced in (True, False):
        monkeypatch.setattr(flash, "FLASH_KEYS", forced)
        results.append(attn(x))
    assert sorted(calls) == taken                      # taken when forced only
    assert_values_and_gradients_match(*results, list(attn.parameters()), tol=1e-5,
                                      grad_tol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_flash_keys_matches_the_explicit_merge_in_bf16():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k_a, v_a = (torch.randn(1, 4, 512, 64, generator=gen, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
    k_g, v_g = (torch.randn(1, 4, 128, 64, generator=gen, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True) for _ in range(2))
    assert flash.uses_flash_keys(q)
    fast = flash.merge_flash_keys(*attention_with_lse(q, k_a, v_a), q, k_g, v_g)
    slow = explicit_merge(*attention_with_lse(q, k_a, v_a), q, k_g, v_g)
    up = torch.randn_like(fast)
    inputs = [q, k_a, v_a, k_g, v_g]
    for a, b in zip((fast, *torch.autograd.grad(fast, inputs, up)),
                    (slow, *torch.autograd.grad(slow, inputs, up))):
        assert max_abs_diff(a.float(), b.float()) < 3e-2 * b.float().abs().max().item()


@pytest.mark.parametrize("n", [64, 37, 6000])
def test_flash_rows_equal_explicit_rows_with_gradients(n, monkeypatch):
    """A few rows against every key, the keys in chunks as extra heads (n = 6000 with chunks of
    500: 12 chunks; 37 is prime: one call), float64, values and the gradients of q, k, v."""
    monkeypatch.setattr(flash, "ROW_CHUNK", 500)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    assert flash.row_chunks(n) == {64: 1, 37: 1, 6000: 12}[n]
    fast = flash.flash_rows(q, k, v)
    slow = attention_with_lse(q, k, v)[0]
    assert_values_and_gradients_match(fast, slow, [q, k, v], tol=1e-12)


def test_flash_rows_take_keys_in_any_layout():
    """k, v as the layers make them, heads a transposed view of (B, N, H, d): same result."""
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    kv = torch.randn(2, 1, 4096, 2, 8, dtype=torch.float64)
    k, v = (t.transpose(1, 2) for t in kv)
    assert not k.is_contiguous()
    assert max_abs_diff(flash.flash_rows(q, k, v), attention_with_lse(q, k, v)[0]) < 1e-12


def test_row_chunks_are_divisors_near_the_target():
    assert flash.row_chunks(65536) == 32 and flash.row_chunks(2048) == 1
    assert flash.row_chunks(6150) == 5                 # 4 does not divide 6150; 5 · 1230
    assert flash.row_chunks(8191) == 1                 # prime: one call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_flash_rows_match_explicit_rows_in_bf16():
    """128 rows against 65536 keys in 32 chunks of 2048 (the bench's bigbird at 64k)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, 128, 64, generator=gen, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    k, v = (torch.randn(1, 4, 65536, 64, generator=gen, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    assert flash.uses_flash_keys(q) and flash.row_chunks(65536) == 32
    fast = flash.flash_rows(q, k, v)
    slow = attention_with_lse(*(t.float() for t in (q, k, v)))[0]
    up = torch.randn_like(slow)
    for a, b in zip((fast, *torch.autograd.grad(fast.float(), (q, k, v), up)),
                    (slow, *torch.autograd.grad(slow, (q, k, v), up))):
        assert max_abs_diff(a.float(), b.float()) < 3e-2 * b.float().abs().max().item()
