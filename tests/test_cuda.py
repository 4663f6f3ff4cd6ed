"""Every registered mechanism gives on CUDA what it gives on CPU: values and input gradients of the
same layer (float32, head dim 16, a padded batch), whatever path each device takes (FlexAttention,
fused nodes, the line and block paths). Marked gpu: run by `benchmarks/cuda.sh`."""

from __future__ import annotations

import pytest
import torch

import efficient_transformers as et
from helpers import max_abs_diff, random_mask, small_attention

NAMES = et.list_attention()
CASES = [(n, False) for n in NAMES] + [(n, True) for n in NAMES if et.attention_spec(n).decode]
DIM, HEADS, N = 32, 2, 37   # N within every small_options max_len


def outputs_and_input_grad(attn, x, mask, device):
    """(outputs at real positions, d loss / d x) of attn on `device`, both on CPU."""
    torch.manual_seed(0)
    xd = x.to(device).requires_grad_()
    md = mask.to(device)
    y = attn(xd, md)
    (grad,) = torch.autograd.grad((y * md[..., None]).square().sum(), xd)
    return y[md].cpu(), grad.cpu()


def draws_in_forward(attn, x, mask) -> bool:
    """True where the eval-mode forward draws random numbers (CPU and CUDA streams differ)."""
    with torch.no_grad():
        torch.manual_seed(0)
        first = attn(x, mask)
        torch.manual_seed(1)
        return not torch.equal(first, attn(x, mask))


@pytest.fixture
def no_tf32():
    """float32 on CUDA without TF32 (cuDNN convolutions use it by default: ~1e-3 relative)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,causal", CASES)
def test_cuda_equals_cpu_with_gradients(name, causal, no_tf32):
    attn, twin = (small_attention(name, causal=causal, dtype=torch.float32, dim=DIM, heads=HEADS)
                  for _ in range(2))
    twin.load_state_dict(attn.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, N, DIM, generator=gen)
    mask = random_mask(2, N, generator=gen)
    if draws_in_forward(attn, x, mask):
        pytest.skip("draws random numbers in its forward: the devices' streams differ")
    y_cpu, g_cpu = outputs_and_input_grad(attn, x, mask, "cpu")
    y_cuda, g_cuda = outputs_and_input_grad(twin.cuda(), x, mask, "cuda")
    assert max_abs_diff(y_cuda, y_cpu) < 1e-4 * (1 + y_cpu.abs().max().item())
    assert max_abs_diff(g_cuda, g_cpu) < 1e-3 * (1 + g_cpu.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,causal", CASES)
@pytest.mark.parametrize("small", [True, False], ids=["small_options", "defaults_1k"])
def test_cuda_autocast_training_step(name, causal, small):
    # the trainer's bf16 autocast on CUDA, through each device path (small options with
    # padding; defaults at 1k without: the FlashAttention pieces of axial, sparse, longformer
    # and bigbird): bf16 output near float32's, finite gradients
    torch.manual_seed(0)
    if small:
        attn, n = small_attention(name, causal=causal, dtype=torch.float32, dim=DIM,
                                  heads=HEADS), N
    else:
        attn, n = et.build_attention(name, dim=64, heads=4, causal=causal), 1024
    attn = attn.cuda().eval()
    x = torch.randn(2, n, attn.dim, device="cuda", requires_grad=True)
    mask = random_mask(2, n).cuda() if small else None    # None: no padding, the flash paths
    real = torch.ones(2, n, dtype=torch.bool, device="cuda") if mask is None else mask
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = attn(x, mask)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)
    if "LP" not in et.attention_spec(name).taxonomy:
        with torch.no_grad():
            ref = attn(x, mask)[real]
        assert max_abs_diff(y.float()[real], ref) < 0.05 * ref.abs().max()
