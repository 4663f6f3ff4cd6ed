"""torch.compile: every mechanism compiles, gives eager's values and gradients, and does not
compile again from step to step.

The "aot_eager_decomp_partition" backend runs what Inductor runs before generating code: Dynamo's
capture (graph breaks, guards, recompiles), AOT autograd with Inductor's decompositions and its
forward / backward partition; the graphs then run eagerly, so no C++ compiler is needed. A test
marked slow compiles with Inductor itself. Two copies of a layer in training mode take the same
steps, one eager, one compiled: stateful layers (routing's centroids, performer's redraw counter)
advance alike. The CUDA path's switches are forced.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import efficient_transformers as et
from efficient_transformers.functional import flex
from helpers import (
    DIM, both_modes, has_cpp_compiler, max_abs_diff, random_mask, small_attention,
)


def step(attn, x, mask, seed):
    """One training step's output and gradients (x and every parameter)."""
    torch.manual_seed(seed)  # the same random draws (noise, redraws) in both copies
    y = attn(x, mask)
    loss = y.square().mean() + (attn.aux_loss if attn.aux_loss is not None else 0)
    params = [x] + [p for p in attn.parameters() if p.requires_grad]
    return y, torch.autograd.grad(loss, params, allow_unused=True)


def assert_compiled_equals_eager(name, causal, backend, tol):
    eager = small_attention(name, causal=causal).train()
    if hasattr(eager, "fused_cpu"):
        eager.fused_cpu = False  # the routing heads' CUDA path
    compiled = torch.compile(copy.deepcopy(eager), backend=backend)
    torch._dynamo.reset()
    n = 24
    x = torch.randn(2, n, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, n, torch.Generator().manual_seed(0))
    for seed, m in enumerate([None] * 3 + [mask] * 3):
        if seed % 3 == 2:
            counters.clear()
        y_e, g_e = step(eager, x, m, seed)
        y_c, g_c = step(compiled, x, m, seed)
        assert max_abs_diff(y_c, y_e) < tol
        for a, b in zip(g_c, g_e):  # None: a parameter the step does not use
            if a is not None or b is not None:
                assert max_abs_diff(a if a is not None else 0 * b, b if b is not None else 0 * a) < tol
        if seed % 3 == 2:  # the third step of an input: nothing compiled again
            assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])


@pytest.mark.parametrize("name,causal", both_modes(et.list_attention()))
def test_compiled_layer_equals_eager_and_compiles_once(name, causal, cuda_path):
    assert_compiled_equals_eager(name, causal, "aot_eager_decomp_partition", 1e-12)


def inductor_cases():
    """Every mechanism; compressive_transformer is an expected failure under torch < 2.14, where
    Inductor's scheduler fails on its graph ("vr must not be None for symbol q0"; it passes with
    torch 2.14.1)."""
    old_torch = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14)
    bug = pytest.mark.xfail(old_torch, reason="Inductor scheduler assertion in torch < 2.14",
                            strict=True)
    return [pytest.param(n, c, marks=bug if n == "compressive_transformer" else ())
            for n, c in both_modes(et.list_attention())]


@pytest.mark.slow
@pytest.mark.skipif(not has_cpp_compiler(), reason="Inductor on the CPU needs a C++ compiler")
@pytest.mark.parametrize("name,causal", inductor_cases())
def test_inductor_compiled_layer_equals_eager(name, causal, cuda_path):
    import torch._inductor.config as inductor_config

    # torch's RNG, not Inductor's own: the same Gumbel noise (sinkhorn) as eager
    with inductor_config.patch(fallback_random=True):
        assert_compiled_equals_eager(name, causal, "inductor", 1e-10)


def test_importing_the_package_does_not_load_the_compiler():
    """torch._dynamo costs about a second to import: `outside_graphs` waits for it."""
    code = ("import sys, efficient_transformers as et; et.list_attention(); "
            "et.build_attention('performer', dim=16, heads=2)(__import__('torch').randn(1, 8, 16)); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


FLEX_USERS = ["image_transformer", "longformer", "bigbird", "sparse_transformer", "etc",
              "routing_transformer", "axial_transformer", "memory_compressed", "reformer"]
SLOWEST = ("longformer", "axial_transformer")  # 8-17 s each on 2 cores: marked slow


@pytest.mark.skipif(not flex.flex_available(), reason="FlexAttention is not importable")
@pytest.mark.parametrize("name,causal", [
    pytest.param(n, c, marks=pytest.mark.slow if n in SLOWEST else ())
    for n, c in both_modes(FLEX_USERS)])
def test_flexattention_path_inside_torch_compile(name, causal, monkeypatch):
    """On CUDA these layers call FlexAttention; inside the caller's torch.compile they call it
    bare (the caller compiles it). Forced on the CPU, forward only (FlexAttention has no CPU
    backward): the compiled layer equals the eager block path, with and without padding."""
    attn = small_attention(name, causal=causal, dtype=torch.float32)
    x = torch.randn(2, 40, DIM)
    mask = random_mask(2, 40, torch.Generator().manual_seed(0))
    with torch.no_grad():
        monkeypatch.setattr(flex, "FORCE_FLEX", False)
        eager = [attn(x), attn(x, mask)]
        monkeypatch.setattr(flex, "FORCE_FLEX", True)
        torch._dynamo.reset()
        compiled = torch.compile(attn, backend="aot_eager")
        got = [compiled(x), compiled(x, mask)]
    assert max_abs_diff(got[0], eager[0]) < 1e-5
    assert max_abs_diff(got[1] * mask[..., None], eager[1] * mask[..., None]) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not has_cpp_compiler(), reason="Inductor on the CPU needs a C++ compiler")
@pytest.mark.parametrize("name", ["transformer_xl", "memory_compressed", "image_transformer"])
@pytest.mark.parametrize("causal", [False, True])
def test_inductor_compiles_again_when_the_length_changes(name, causal):
    # a second length makes Dynamo compile with dynamic shapes: the relative shift's skew, the
    # compressing convolution and a symbolic min() of the length (image_transformer's blocks
    # fitted to it) failed in Inductor's lowering there (torch 2.13)
    torch._dynamo.reset()
    eager = small_attention(name, causal=causal)
    compiled = torch.compile(copy.deepcopy(eager), backend="inductor")
    for n in (16, 24, 40):
        x = torch.randn(2, n, DIM, dtype=torch.float64, requires_grad=True)
        y_c, g_c = step(compiled, x, None, 0)
        y_e, g_e = step(eager, x, None, 0)
        assert max_abs_diff(y_c, y_e) < 1e-10
        for a, b in zip(g_c, g_e):
            if a is not None or b is not None:
                assert max_abs_diff(a, b) < 1e-10
