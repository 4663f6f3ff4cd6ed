"""Every mechanism on the paths it takes on CUDA (`functional.paths.cuda_paths`, FlexAttention
through its eager reference with the device check lifted) equals the same layer on its CPU
paths: outputs at real positions and the gradients of every parameter, causal or not, with and
without padding. The CUDA-only code (grid lines and global keys as flash calls, FlexAttention
masks, k-means sums by index, bf16-kept kernels' float32 forms, folded heads) runs here end to
end before any GPU does; the `gpu` tests then check the kernels themselves."""

from __future__ import annotations

import contextlib

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional import flex
from efficient_transformers.functional.paths import cuda_paths
from helpers import max_abs_diff, random_mask, small_attention

CASES = [(name, causal) for name in et.list_attention()
         for causal in ((False, True) if et.attention_spec(name).decode else (False,))]


@pytest.fixture
def kernels_taken(eager_flex, monkeypatch):
    """FlexAttention through its eager reference (`eager_flex`); yields the set of CUDA kernels
    the layer called ("flex", "flash")."""
    from efficient_transformers.functional import flash, grid_flash

    taken = set()

    def flex_recorded(*args, **kwargs):
        taken.add("flex")
        return eager_flex(*args, **kwargs)

    def flash_forward(*args, _forward=flash.flash_forward):
        taken.add("flash")
        return _forward(*args)

    monkeypatch.setattr(flex, "_compiled_flex", lambda: flex_recorded)
    for where in (flash, grid_flash):
        monkeypatch.setattr(where, "flash_forward", flash_forward)
    yield taken


# the CUDA kernels each mechanism takes without padding, at its small options (N = 40)
TAKEN = {"image_transformer": {"flex"}, "axial_transformer": {"flash"},
         "sparse_transformer": {"flash"}, "longformer": {"flex", "flash"},
         "bigbird": {"flex", "flash"}, "reformer": {"flex"}, "routing_transformer": {"flex"},
         "memory_compressed": set(), "etc": {"flex", "flash"}}
TAKEN_CAUSAL = {**TAKEN, "longformer": {"flex"}}   # causal global keys: the explicit merge


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name,causal", CASES)
def test_cuda_paths_equal_the_cpu_paths(name, causal, padded, kernels_taken, monkeypatch):
    attn = small_attention(name, causal=causal, dtype=torch.float32)
    n = 37 if padded else 40       # 40: the small grids fill it (axial 5 × 8, stride 4)
    x = torch.randn(2, n, attn.dim)
    mask = random_mask(2, n) if padded else None
    slow = attn(x, mask)
    with cuda_paths():
        monkeypatch.setattr(flex, "FORCE_FLEX", "cuda")
        fast = attn(x, mask)
    if not padded and name in TAKEN:
        assert kernels_taken == (TAKEN_CAUSAL if causal else TAKEN)[name]
    real = torch.ones_like(fast, dtype=torch.bool) if mask is None else \
        mask[..., None].expand_as(fast)
    assert max_abs_diff(fast[real], slow[real]) < 1e-5
    up = torch.randn_like(fast) * real
    params = list(attn.parameters())   # some unused by the long output (etc's global output)
    got, want = (torch.autograd.grad(y, params, up, allow_unused=True) for y in (fast, slow))
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert max_abs_diff(a, b) < 1e-4


@pytest.mark.parametrize("name,causal", CASES)
def test_cuda_paths_in_bf16_stay_close_to_the_cpu_paths(name, causal, kernels_taken, monkeypatch):
    """bf16 on the CUDA paths (bf16-kept kernels, flash pieces in bf16) against bf16 on the CPU
    paths (the same rounded inputs, so the discrete choices of routing and hashing see the same
    scores): outputs and input gradients within bf16's precision."""
    attn = small_attention(name, causal=causal, dtype=torch.bfloat16)
    x = torch.randn(2, 40, attn.dim, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for on_cuda_paths in (False, True):
        with cuda_paths() if on_cuda_paths else contextlib.nullcontext():
            monkeypatch.setattr(flex, "FORCE_FLEX", "cuda" if on_cuda_paths else None)
            y = attn(x).float()
        results.append((y, *torch.autograd.grad(y.square().sum(), x)))
    for got, want in zip(*results):
        assert max_abs_diff(got.float(), want.float()) < 5e-2 * want.float().abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(TAKEN))
def test_cuda_kernels_equal_the_block_paths_on_a_gpu(name, monkeypatch):
    """On CUDA in bf16, head dim 64: the layer with its compiled FlexAttention and flash pieces
    (as the benchmark runs it) against the same layer with them switched off (the CPU's block
    paths, on the GPU), outputs and the gradients of the input and every parameter; then two
    more steps compile nothing new."""
    from torch._dynamo.utils import counters

    from efficient_transformers.functional import flash, grid_flash

    attn = small_attention(name, dtype=torch.bfloat16, dim=128, heads=2).cuda()
    x = torch.randn(2, 40, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wrt = [x, *attn.parameters()]
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(flex, "FORCE_FLEX", None if kernels else False)
        monkeypatch.setattr(grid_flash, "GRID_FLASH", None if kernels else False)
        monkeypatch.setattr(flash, "FLASH_KEYS", None if kernels else False)
        y = attn(x).float()
        results.append((y, *torch.autograd.grad(y.square().sum(), wrt, allow_unused=True)))
    for got, want in zip(*results):
        if got is not None and want is not None:
            assert max_abs_diff(got.float(), want.float()) < 5e-2 * want.float().abs().max().item()
    monkeypatch.setattr(flex, "FORCE_FLEX", None)
    monkeypatch.setattr(grid_flash, "GRID_FLASH", None)
    monkeypatch.setattr(flash, "FLASH_KEYS", None)
    attn(x).float().sum().backward()
    counters.clear()
    for _ in range(2):
        attn(x).float().sum().backward()
    assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])
