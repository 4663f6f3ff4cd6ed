"""The FlexAttention path (compiled forward on CPU) against the CPU block path."""

import time

import pytest
import torch

from efficient_transformers.functional import flex
from efficient_transformers.functional.patterns import ImageLocal1D, pattern_attention
from helpers import assert_values_and_gradients_match, max_abs_diff, random_mask, small_attention

needs_flex = pytest.mark.skipif(not flex.flex_available(), reason="FlexAttention is not importable")


@pytest.fixture
def forced_flex():
    old = flex.FORCE_FLEX
    flex.FORCE_FLEX = True
    yield
    flex.FORCE_FLEX = old


def test_use_flex_choice():
    q = torch.randn(1, 1, 4, 8)
    assert not flex.use_flex(q)                         # CPU: the block path
    old = flex.FORCE_FLEX
    try:
        flex.FORCE_FLEX = True
        assert flex.use_flex(q) == flex.flex_available()
        assert flex.use_flex(q, block_sparse=False) == flex.flex_available()   # forced: any pattern
        assert not flex.use_flex(q.double())            # FlexAttention has no float64 path
        flex.FORCE_FLEX = False
        assert not flex.use_flex(q)
    finally:
        flex.FORCE_FLEX = old


def check_flex_equals_block_path(compiled):
    n, block = 70, 8
    pattern = ImageLocal1D(block, 12, causal=True)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(3))
    mask = random_mask(2, n, generator=gen)
    start = time.perf_counter()
    out = flex.flex_pattern_attention(q, k, v, pattern, mask, block_size=32, compiled=compiled)
    assert time.perf_counter() - start < 300, "compile took too long"
    ref = pattern_attention(q, k, v, pattern, block, mask)
    real = mask[:, None, :, None].expand_as(out)
    assert max_abs_diff(out[real], ref[real]) < 1e-5
    assert flex.pattern_block_mask(pattern, n, q.device, block_size=32) is \
        flex.pattern_block_mask(pattern, n, q.device, block_size=32)       # cached without padding


def assert_forced_flex_equals_cpu_path(attn):
    """attn (FORCE_FLEX on) on a padded batch equals the same layer with FORCE_FLEX off, forward."""
    x = torch.randn(2, 37, 16)
    mask = random_mask(2, 37)
    with torch.no_grad():
        fast = attn(x, mask)
        flex.FORCE_FLEX = False
        ref = attn(x, mask)
    assert max_abs_diff(fast[mask], ref[mask]) < 1e-5


@needs_flex
def test_flex_block_mask_equals_block_path_eager():
    """The BlockMask and mask_mod built from the pattern, through FlexAttention's eager reference."""
    check_flex_equals_block_path(compiled=False)


@needs_flex
@pytest.mark.slow
def test_compiled_flex_forward_equals_block_path_with_padding():
    """The compiled kernel on CPU (about 40 s of compile on 2 busy cores)."""
    check_flex_equals_block_path(compiled=True)


@needs_flex
@pytest.mark.slow
@pytest.mark.parametrize("name,options", [
    ("image_transformer", {}),                                               # 2-D small_options
    ("sparse_transformer", {"pattern": "fixed", "combine": "split"}),
    ("sparse_transformer", {"pattern": "strided"}),
    ("axial_transformer", {}),
    ("memory_compressed", {"kind": "local"}),
])
def test_mechanisms_through_flex_equal_the_cpu_path(name, options, forced_flex):
    attn = small_attention(name, causal=True, dtype=torch.float32, **options)
    assert_forced_flex_equals_cpu_path(attn)


@needs_flex
@pytest.mark.parametrize("name,options,causal", [
    ("longformer", {"window": 3, "dilation": [1, 2], "num_global": 2}, False),
    ("longformer", {"window": 3, "dilation": [1, 2], "num_global": 2}, True),
    ("longformer", {"window": 5, "num_global": 9}, False),   # more global rows than window
    ("longformer", {"window": 5, "num_global": 9}, True),
    ("bigbird", {}, False),                                  # not causal (the survey)
    ("bigbird", {"num_global": 2, "num_random_blocks": 1}, False),
    ("routing_transformer", {"window": 5, "local_heads": 1}, False),   # its local heads
    ("routing_transformer", {"window": 5, "local_heads": 1}, True),
])
def test_layer_flex_path_through_eager_flex_equals_cpu_path(name, options, causal, forced_flex,
                                                          eager_flex):
    """The layer's FlexAttention path (its masks, the global keys merged in by log-sum-exp, the
    global rows) through FlexAttention's eager reference instead of the compiled kernel, with
    its device check lifted (the only thing that stops its backward on the CPU): outputs at real
    positions and the gradients of every parameter equal the CPU path's."""
    attn = small_attention(name, causal=causal, dtype=torch.float32, **options).eval()
    assert_forced_flex_equals_cpu_path(attn)          # (eval: routing's centroids stay put)
    x = torch.randn(2, 37, 16)
    mask = random_mask(2, 37)
    fast = attn(x, mask)
    flex.FORCE_FLEX = False
    slow = attn(x, mask)
    assert_values_and_gradients_match(fast, slow, list(attn.parameters()), mask[..., None],
                                      tol=1e-5, grad_tol=1e-4)


GPU_CASES = [("image_transformer", {"mode": "1d", "shape": None, "block_size": 32, "window": 48}),
             ("image_transformer", {"mode": "2d", "shape": (20, 16), "query_shape": (4, 8),
                                    "memory_flange": (4, 8)}),
             ("sparse_transformer", {"pattern": "strided", "stride": 16}),
             ("sparse_transformer", {"pattern": "fixed", "stride": 16, "combine": "split"}),
             ("axial_transformer", {"shape": (20, 16)}),
             ("memory_compressed", {"kind": "local", "block_size": 32})]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_takes_flex_for_block_sparse_patterns_only():
    q = torch.randn(1, 2, 256, 16, device="cuda")
    assert flex.use_flex(q) == flex.flex_available()
    assert not flex.use_flex(q, block_sparse=False)     # columns: the line path
    assert not flex.use_flex(q[..., :8])                # head dim below MIN_HEAD_DIM


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name,options", GPU_CASES, ids=lambda c: str(c))
def test_cuda_flex_path_equals_block_path_with_gradients(name, options, causal):
    attn = small_attention(name, causal=causal, dtype=torch.float32, dim=64, heads=4, **options).cuda()
    assert_cuda_flex_equals_block_path(attn)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,options,causal", [
    ("longformer", {"window": 16, "dilation": [1, 1, 2, 2], "num_global": 3}, False),
    ("longformer", {"window": 16, "dilation": [1, 1, 2, 2], "num_global": 3}, True),
    ("bigbird", {"block_size": 32, "num_random_blocks": 2, "num_global": 2}, False),
    ("routing_transformer", {"window": 32, "local_heads": 2, "num_clusters": 4}, False),
    ("routing_transformer", {"window": 32, "local_heads": 2, "num_clusters": 4}, True),
])
def test_cuda_layers_around_flex_equal_the_block_path(name, options, causal):
    """The compiled kernel with lse, the global keys merged in and the global rows by matmuls
    (longformer, bigbird); routing's local heads: against the block path on the same GPU,
    outputs and input gradients."""
    attn = small_attention(name, causal=causal, dtype=torch.float32, dim=64, heads=4,
                           **options).cuda()
    assert_cuda_flex_equals_block_path(attn)


def assert_cuda_flex_equals_block_path(attn):
    """attn (dim 64, on CUDA) with FORCE_FLEX on and off on a padded batch (2, 300): outputs at
    real positions and the input's gradient agree (in eval mode: routing's centroids stay)."""
    attn.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 64, generator=gen).cuda().requires_grad_()
    mask = random_mask(2, 300, generator=gen).cuda()
    results = []
    for forced in (True, False):
        old, flex.FORCE_FLEX = flex.FORCE_FLEX, forced
        try:
            y = attn(x, mask)
            (grad,) = torch.autograd.grad((y * mask[..., None]).square().sum(), x)
        finally:
            flex.FORCE_FLEX = old
        results.append((y[mask], grad))
    assert max_abs_diff(results[0][0], results[1][0]) < 2e-4
    assert max_abs_diff(results[0][1], results[1][1]) < 2e-3 * results[1][1].abs().max().item() + 1e-4


def _relative_dense(q, k, v, table):
    """Softmax attention with ETC's clamped relative bias table (H, 2R+1), densely."""
    n, radius = q.shape[-2], (table.shape[-1] - 1) // 2
    i = torch.arange(n)
    offset = (i[None, :] - i[:, None]).clamp(-radius, radius) + radius
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + table[:, offset][None]
    return torch.softmax(scores, dim=-1) @ v


def test_relative_score_mod_reads_copies_whose_gradients_sum_into_the_table(eager_flex):
    """The score_mod reads the table through BIAS_COPIES copies (spreading FlexAttention's
    atomic adds): through FlexAttention's eager reference in float64, values and the gradients
    of q, k, v and the table equal the dense definition; a second table gets its own function."""
    from efficient_transformers.functional.global_cuda import relative_score_mod

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 80, 8, dtype=torch.float64, generator=gen).requires_grad_()
               for _ in range(3))
    table = torch.nn.Parameter(torch.randn(2, 9, dtype=torch.float64, generator=gen))
    fast = eager_flex(q, k, v, score_mod=relative_score_mod(table))
    assert_values_and_gradients_match(fast, _relative_dense(q, k, v, table), [q, k, v, table],
                                      tol=1e-12)
    other = torch.nn.Parameter(table.detach().clone())
    assert relative_score_mod(other) is not relative_score_mod(table)


@needs_flex
@pytest.mark.slow
def test_relative_score_mod_follows_its_table_without_recompiling():
    """Compiled (CPU, inference): after an in-place update of the table the same function reads
    the new values through fresh copies, and nothing compiles again."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention
    from efficient_transformers.functional.global_cuda import relative_score_mod

    compiled = torch.compile(flex_attention, dynamic=False)
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    table = torch.nn.Parameter(torch.randn(2, 25))
    with torch.no_grad():
        compiled(q, k, v, score_mod=relative_score_mod(table))
        counters.clear()
        for _ in range(2):
            table.mul_(0.5).add_(0.3)            # an optimiser step: same object, new values
            out = compiled(q, k, v, score_mod=relative_score_mod(table))
            assert max_abs_diff(out, _relative_dense(q, k, v, table)) < 1e-5
    assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])
