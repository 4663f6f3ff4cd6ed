"""compressive_transformer: memory and compressed memory against a naive re-computation (Rae et
al. 2020, Algorithm 1), every compression function, the attention-reconstruction loss
(Algorithm 2) and where gradients may and may not go."""

from __future__ import annotations

import math

import pytest
import torch

import efficient_transformers as et
from helpers import DIM, max_abs_diff, random_mask, small_attention
from test_relative import naive_recurrent_layer

KINDS = ["conv", "max", "mean", "dilated_conv", "most_used"]
NAME = "compressive_transformer"


def options(kind):
    return {"compression": kind, "compression_rate": 2, "segment_len": 8, "mem_len": 4, "cmem_len": 5}


@pytest.mark.parametrize("kind", KINDS)
def test_memory_and_compressed_memory_equal_naive_recomputation(kind):
    attn = small_attention(NAME, causal=True, **options(kind))
    x = torch.randn(2, 48, DIM, dtype=torch.float64)  # 6 segments: the compressed memory wraps
    mask = random_mask(2, 48, generator=torch.Generator().manual_seed(2))
    y, state = attn.process(x, mask)
    y_ref, memory, slots = naive_recurrent_layer(attn, x, mask)
    assert max_abs_diff(y[mask], y_ref[mask]) < 1e-10
    assert torch.equal(state["mem"], memory) and torch.equal(state["mem_mask"], mask[:, -4:])
    assert state["cmem"].shape == slots.shape == (2, 5, DIM)
    assert max_abs_diff(state["cmem"], slots) < 1e-12
    assert state["groups"] == (48 - 4) // 2


@pytest.mark.parametrize("kind", KINDS)
def test_decode_in_chunks_equals_forward(kind):
    attn = small_attention(NAME, causal=True, **options(kind))
    x = torch.randn(2, 45, DIM, dtype=torch.float64)
    full, end_state = attn.process(x)
    outs, state, i = [], None, 0
    for size in (3, 1, 7, 2, 9, 5, 1, 1, 16):
        y, state = attn.decode(x[:, i:i + size], state)
        outs.append(y)
        i += size
    assert max_abs_diff(torch.cat(outs, 1), full) < 1e-10
    assert max_abs_diff(state["cmem"], end_state["cmem"]) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_enters_compressed_memory(kind):
    attn = small_attention(NAME, causal=False, **options(kind))
    x = torch.randn(2, 40, DIM, dtype=torch.float64)
    mask = random_mask(2, 40, generator=torch.Generator().manual_seed(5))
    y, st = attn.process(x, mask)
    y2, st2 = attn.process(torch.where(mask[..., None], x, torch.randn_like(x) * 9), mask)
    assert max_abs_diff(y[mask], y2[mask]) < 1e-10
    assert max_abs_diff(st["cmem"], st2["cmem"]) < 1e-10


def naive_reconstruction_loss(attn, x):
    """Algorithm 2 with explicit loops: for each completed segment s, the states it evicted."""
    L, M, c, H = attn.segment_len, attn.mem_len, attn.compression_rate, attn.heads
    wq, wk, wv = attn.to_qkv.weight.chunk(3, dim=0)

    def attend(h, m):  # content attention per head, (n, D) x (m, D) -> (n, D)
        outs = []
        for head in range(H):
            sl = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
            q, k, v = h @ wq[sl].T, m @ wk[sl].T, m @ wv[sl].T
            outs.append(torch.softmax(q @ k.T / math.sqrt(attn.head_dim), -1) @ v)
        return torch.cat(outs, -1)

    total, rows = 0.0, 0
    for s in range(x.shape[1] // L):
        evicted = [j for j in range(s * L - M, (s + 1) * L - M) if j >= 0]
        if not evicted:
            continue
        for b in range(x.shape[0]):
            old = x[b, evicted].detach()
            comp = attn.compressor[0](old.T[None])[0].T  # conv, kernel = stride = c
            diff = attend(x[b, s * L:(s + 1) * L].detach(), old) - attend(x[b, s * L:(s + 1) * L].detach(), comp)
            total = total + diff.square().sum()
            rows += L
    return total / (rows * x.shape[-1])


def test_reconstruction_loss_equals_naive_and_reaches_compression_only():
    attn = small_attention(NAME, causal=True, **options("conv")).train()
    x = torch.randn(2, 40, DIM, dtype=torch.float64, requires_grad=True)
    y = attn(x)
    aux = attn.aux_loss
    assert aux is not None and aux.dim() == 0 and aux > 0
    with torch.no_grad():
        ref = naive_reconstruction_loss(attn, x)
    assert abs(aux.item() - ref.item()) < 1e-12
    compression = {n for n, _ in attn.named_parameters() if n.startswith("compressor.")}
    grads = dict(zip([n for n, _ in attn.named_parameters()],
                     torch.autograd.grad(aux, list(attn.parameters()) + [x], allow_unused=True)))
    for n, g in grads.items():
        assert (g is not None and g.abs().sum() > 0) == (n in compression), n
    x_grad = torch.autograd.grad(attn(x).sum(), x, retain_graph=True)[0]
    assert x_grad.abs().sum() > 0
    # the main output never trains the compression network
    main = torch.autograd.grad(y.square().sum(), list(attn.compressor.parameters()), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in main)


def test_no_gradient_into_the_cache():
    attn = small_attention(NAME, causal=True, dtype=torch.float32, **options("conv")).train()
    x = torch.randn(1, 24, DIM, requires_grad=True)
    y, state = attn.process(x)
    for key in ("mem", "cmem"):
        assert not state[key].requires_grad
    # the last segment's output reaches earlier inputs only through the (detached) caches
    g = torch.autograd.grad(y[:, 16:].sum(), x)[0]
    assert g[:, :16].abs().sum() == 0 and g[:, 16:].abs().sum() > 0
    y2, _ = attn.process(torch.randn(1, 8, DIM), state=state)
    y2.sum().backward()  # a backward through the next call does not reach the previous graph
    assert x.grad is None


def test_training_the_compressor_lowers_the_reconstruction_loss():
    torch.manual_seed(0)
    attn = et.build_attention(NAME, dim=DIM, heads=2, causal=True, **options("conv")).train()
    opt = torch.optim.Adam(attn.compressor.parameters(), lr=1e-2)
    x = torch.randn(2, 48, DIM)
    losses = []
    for _ in range(20):
        attn(x)
        losses.append(attn.aux_loss.item())
        attn.aux_loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]


def test_options_are_validated():
    with pytest.raises(ValueError, match="mem_len"):
        et.build_attention(NAME, dim=DIM, heads=2, mem_len=5, compression_rate=2, segment_len=8)
    with pytest.raises(ValueError, match="segment_len"):
        et.build_attention(NAME, dim=DIM, heads=2, mem_len=6, compression_rate=3, segment_len=8)
    with pytest.raises(ValueError, match="compression_rate"):
        et.build_attention(NAME, dim=DIM, heads=2, compression="dilated_conv", compression_rate=3,
                           segment_len=9, mem_len=9)
    with pytest.raises(ValueError, match="compression"):
        et.build_attention(NAME, dim=DIM, heads=2, compression="zip")
    with pytest.raises(ValueError, match="cmem_len"):
        et.build_attention(NAME, dim=DIM, heads=2, cmem_len=-1)


def test_zero_compressed_memory_is_transformer_xl():
    torch.manual_seed(0)
    comp = et.build_attention(NAME, dim=DIM, heads=2, causal=True, segment_len=8, mem_len=4, cmem_len=0,
                              compression_rate=2).double().eval()
    xl = et.build_attention("transformer_xl", dim=DIM, heads=2, causal=True, segment_len=8, mem_len=4).double()
    xl.load_state_dict({k: v for k, v in comp.state_dict().items() if not k.startswith("compressor")})
    x = torch.randn(2, 30, DIM, dtype=torch.float64)
    assert max_abs_diff(comp(x), xl.eval()(x)) < 1e-12
