"""linear_transformer: the layer against the naive definition, decode state, a model that trains."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import efficient_transformers as et
from efficient_transformers.attention.linear_transformer import KernelAttention
from helpers import linear_attention_oracle, DIM, assert_values_and_gradients_match, max_abs_diff, random_mask, small_attention, train_losses

N = 29


oracle = linear_attention_oracle


REFERENCES = {
    "oracle": oracle,
    # KernelAttention.attend: projection, feature maps and the forms of functional.kernels through
    # autograd, which LinearTransformerAttention.attend fuses into one autograd node
    "generic": lambda attn, x, mask: KernelAttention.attend(attn, x, mask),
}


@pytest.mark.parametrize("reference", list(REFERENCES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_layer_equals_references_values_and_gradients(reference, causal, padded):
    attn = small_attention("linear_transformer", causal=causal, chunk_size=4)
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, N) if padded else None
    fast, slow = attn(x, mask), REFERENCES[reference](attn, x, mask)
    assert_values_and_gradients_match(fast, slow, [x] + list(attn.parameters()), tol=1e-12, grad_tol=1e-11)


class OutputDtypes(TorchDispatchMode):
    """The dtypes of every floating-point tensor the operators inside return."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.dtypes.add(t.dtype)
        return out


@pytest.fixture
def keep_bf16_on_cpu(monkeypatch):
    """kernels.KEEP_BF16 on: the CUDA bf16 path, run on CPU."""
    from efficient_transformers.functional import kernels

    monkeypatch.setattr(kernels, "KEEP_BF16", True)


KERNELISED = [("linear_transformer", False), ("linear_transformer", True), ("performer", False),
              ("performer", True)]


@pytest.mark.parametrize("name,causal", KERNELISED)
def test_bf16_path_computes_in_bf16_near_the_float64_layer(name, causal, keep_bf16_on_cpu,
                                                           monkeypatch):
    """`keeps_bf16` (bf16 input on CUDA, forced here on CPU): the forward computes in bf16 with
    no float32 inside, within bf16 precision of the float64 definition (`kernels.keeps_bf16`
    measures about 0.4-1%), input gradients too (about 0.4-1.3% here); decode state stays
    float32; float32 input and the automatic choice on CPU are untouched."""
    from efficient_transformers.functional import kernels

    attn = small_attention(name, causal=causal, chunk_size=4)
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, N)
    g = torch.randn(2, N, DIM, dtype=torch.float64) * mask[..., None]    # real outputs only
    exact = oracle(attn, x, mask)
    (grad,) = torch.autograd.grad((exact * g).sum(), x)
    attn.to(torch.bfloat16)
    x_low = x.detach().bfloat16().requires_grad_()
    g_low = g.bfloat16()
    with OutputDtypes() as seen:
        low = attn(x_low, mask)
        (grad_low,) = torch.autograd.grad((low * g_low).sum(), x_low)
    assert low.dtype == torch.bfloat16 and seen.dtypes == {torch.bfloat16}
    assert (low.double() - exact)[mask].norm() / exact[mask].norm() < 2e-2
    assert (grad_low.double() - grad).norm() / grad.norm() < 3e-2
    if causal:
        _, state = attn.decode(x_low.detach()[:, :7])
        kv = state["kv"][0] if isinstance(state["kv"], tuple) else state["kv"]
        assert kv.dtype == torch.float32
    assert not kernels.keeps_bf16(x_low.detach().float())
    monkeypatch.setattr(kernels, "KEEP_BF16", None)
    assert not kernels.keeps_bf16(x_low)                                   # CPU: float32 inside


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,causal", KERNELISED)
def test_cuda_bf16_keeps_bf16_within_its_precision(name, causal):
    from efficient_transformers.functional.kernels import keeps_bf16

    attn = small_attention(name, causal=causal, chunk_size=4)
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, N)
    g = torch.randn(2, N, DIM, dtype=torch.float64) * mask[..., None]
    exact = oracle(attn, x, mask)
    (grad,) = torch.autograd.grad((exact * g).sum(), x)
    x_low = x.detach().bfloat16().cuda().requires_grad_()
    assert keeps_bf16(x_low)
    low = attn.to("cuda", torch.bfloat16)(x_low, mask.cuda())
    (grad_low,) = torch.autograd.grad((low * g.bfloat16().cuda()).sum(), x_low)
    low, grad_low = low.double().cpu(), grad_low.double().cpu()
    assert (low - exact)[mask].norm() / exact[mask].norm() < 2e-2
    assert (grad_low - grad).norm() / grad.norm() < 3e-2


def test_decode_state_does_not_grow():
    attn = small_attention("linear_transformer", causal=True)
    x = torch.randn(1, 40, DIM, dtype=torch.float64)
    y, state = attn.decode(x[:, :5])
    size = et.state_nbytes(state)
    outs = [y]
    for i in range(5, 40):
        y, state = attn.decode(x[:, i:i + 1], state)
        outs.append(y)
        assert et.state_nbytes(state) == size
    assert state["length"] == 40
    assert max_abs_diff(torch.cat(outs, dim=1), attn(x)) < 1e-10


def test_half_precision_long_sequence_is_finite():
    # the normaliser sums N positive terms: it would overflow fp16 without the fp32 compute
    attn = small_attention("linear_transformer", causal=True, dtype=torch.float16)
    x = (torch.randn(1, 4096, DIM) * 8).half()
    assert torch.isfinite(attn(x)).all()
    attn.causal = False
    assert torch.isfinite(attn(x)).all()


def test_chunk_size_is_validated():
    with pytest.raises(ValueError, match="chunk_size"):
        et.build_attention("linear_transformer", dim=DIM, heads=2, chunk_size=0)


def test_language_model_trains():
    torch.manual_seed(0)
    model = et.build_model("linear_transformer", task="lm", vocab_size=17, dim=32, depth=2,
                           heads=2, max_len=64)
    tokens = torch.randint(0, 17, (2, 16))
    losses = train_losses(model, tokens, tokens)
    assert losses[-1] < losses[0]
    out = model.generate(tokens[:, :5], max_new_tokens=4, temperature=0)
    assert out.shape == (2, 9)
