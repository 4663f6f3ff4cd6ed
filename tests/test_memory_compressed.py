"""memory_compressed: compressed and local kinds against oracles, limits, decode, the LMLML model."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.functional.patterns import BlockLocal, dense_pattern_mask
from helpers import assert_values_and_gradients_match, max_abs_diff, random_mask, small_attention
from test_patterns import check_decode, check_oracle, train_steps


def compressed_oracle(attn, q, k, v, mask):
    """Naive attention over [slots ; raw keys] with the documented dense mask."""
    bsz, h, n, d = q.shape
    c = attn.compression
    real = torch.ones(bsz, n, dtype=torch.bool) if mask is None else mask
    pad = (-n) % c
    keep = torch.nn.functional.pad(real, (0, pad))[:, None, :, None].to(k.dtype)
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)) * keep
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad)) * keep
    ks, vs = attn.compress(kp, vp)
    m = ks.shape[2]
    slot_real = torch.nn.functional.pad(real, (0, pad)).view(bsz, m, c).any(-1)       # (B, M)
    i = torch.arange(n)[:, None]
    if attn.causal:
        slot_ok = torch.arange(m)[None, :] < i // c
        raw_ok = dense_pattern_mask(BlockLocal(c, True), n)
    else:
        slot_ok = torch.ones(n, m, dtype=torch.bool)
        raw_ok = torch.zeros(n, n, dtype=torch.bool)
    allowed = torch.cat([slot_ok & slot_real[:, None, :], raw_ok & real[:, None, :]], dim=-1)
    return naive_attention(q, torch.cat([ks, k], 2), torch.cat([vs, v], 2), allowed[:, None])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n,conv_groups", [(22, 1), (24, 1), (23, 2)])
def test_compressed_equals_oracle(causal, padded, n, conv_groups):
    attn = small_attention("memory_compressed", causal=causal, conv_groups=conv_groups)
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(3))
    mask = random_mask(2, n, generator=gen) if padded else None
    out, ref = attn.compressed_core(q, k, v, mask), compressed_oracle(attn, q, k, v, mask)
    real = (mask if padded else torch.ones(2, n, dtype=torch.bool))[:, None, :, None].expand_as(out)
    params = (q, k, v, attn.compress_k.weight, attn.compress_v.bias)
    assert_values_and_gradients_match(out, ref, params, real, tol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_local_equals_oracle(causal, padded):
    attn = small_attention("memory_compressed", causal=causal, kind="local", block_size=5)
    check_oracle(attn.local_core, dense_pattern_mask(BlockLocal(5, causal), 23), 23, padded)


@pytest.mark.parametrize("causal", [False, True])
def test_limits_are_full_attention(causal):
    n = 14
    full = torch.ones(n, n, dtype=torch.bool)
    full = full.tril() if causal else full
    q, k, v = torch.randn(3, 1, 2, n, 8, dtype=torch.float64)
    local = small_attention("memory_compressed", causal=causal, kind="local", block_size=n)
    assert max_abs_diff(local.local_core(q, k, v), naive_attention(q, k, v, full)) < 1e-12
    # compression 1 with an identity convolution: every slot is one key
    comp = small_attention("memory_compressed", causal=causal, compression=1, dim=4, heads=1)
    with torch.no_grad():
        for conv in (comp.compress_k, comp.compress_v):
            conv.weight.copy_(torch.eye(4, dtype=torch.float64)[:, :, None])
            conv.bias.zero_()
    q, k, v = torch.randn(3, 1, 1, n, 4, dtype=torch.float64)
    assert max_abs_diff(comp.compressed_core(q, k, v), naive_attention(q, k, v, full)) < 1e-12


def test_local_decode_and_bounded_state():
    attn = small_attention("memory_compressed", causal=True, kind="local", block_size=5)
    assert check_decode(attn)["k"].shape[2] < 5


def test_compressed_decode_state_holds_slots_and_one_window():
    attn = small_attention("memory_compressed", causal=True, compression=4)
    state = check_decode(attn, n=38)
    assert state["k"].shape[2] == 38 % 4 and state["ks"].shape[2] == 38 // 4


@pytest.mark.parametrize("conv_groups", [1, 2])
def test_compression_is_the_strided_convolution(conv_groups):
    # the matmul over each window's stacked positions against the Conv1d module itself
    attn = small_attention("memory_compressed", conv_groups=conv_groups)
    gen = torch.Generator().manual_seed(4)
    k, v = (torch.randn(2, 2, 12, attn.head_dim, dtype=torch.float64, generator=gen)
            .requires_grad_() for _ in range(2))
    fast = torch.cat(attn.compress(k, v), dim=2)

    def by_conv(t, layer):                          # (B, H, L, d) -> (B, H, L / c, d)
        out = layer(attn.merge_heads(t).transpose(1, 2)).transpose(1, 2)
        return attn.split_heads(out)
    slow = torch.cat([by_conv(k, attn.compress_k), by_conv(v, attn.compress_v)], dim=2)
    params = (k, v, attn.compress_k.weight, attn.compress_k.bias, attn.compress_v.weight)
    assert_values_and_gradients_match(fast, slow, params, tol=1e-12)


def test_grouped_compression_is_one_kernel_per_head():
    """conv_groups = heads: each head's slots are a strided convolution of that head's keys
    alone, with the head's own slice of the weights; decode stays exact."""
    attn = small_attention("memory_compressed", conv_groups=2)
    c, d = attn.compression, attn.head_dim
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(2, 2, 12, d, dtype=torch.float64, generator=gen) for _ in range(2))
    ks, vs = attn.compress(k, v)
    for slots, t, conv in ((ks, k, attn.compress_k), (vs, v, attn.compress_v)):
        assert conv.weight.shape == (2 * d, d, c)
        for h in range(2):
            rows = slice(h * d, (h + 1) * d)
            own = torch.nn.functional.conv1d(t[:, h].transpose(1, 2), conv.weight[rows],
                                             conv.bias[rows], stride=c)
            assert max_abs_diff(slots[:, h], own.transpose(1, 2)) < 1e-12
    check_decode(small_attention("memory_compressed", causal=True, conv_groups=2), n=25)


def test_options_are_checked():
    with pytest.raises(ValueError, match="conv_groups"):
        et.build_attention("memory_compressed", dim=16, heads=2, conv_groups=3)
    with pytest.raises(ValueError, match="conv_groups"):
        et.build_attention("memory_compressed", dim=16, heads=2, conv_groups=0)
    with pytest.raises(ValueError, match="kind"):
        et.build_attention("memory_compressed", dim=16, heads=2, kind="global")
    with pytest.raises(ValueError, match="compression"):
        et.build_attention("memory_compressed", dim=16, heads=2, compression=0)


def test_model_alternates_local_and_compressed_and_trains(tmp_path):
    torch.manual_seed(0)
    model = et.build_model("memory_compressed", dim=32, depth=5, heads=2, max_len=64, block_size=8)
    assert [b.attention.kind for b in model.encoder.blocks] == ["local", "compressed"] * 2 + ["local"]
    tokens = torch.randint(0, 256, (2, 40))
    train_steps(model, tokens)
    model.save_pretrained(tmp_path)
    again = et.load_pretrained(tmp_path)
    assert [b.attention.kind for b in again.encoder.blocks] == ["local", "compressed"] * 2 + ["local"]
    model.eval()
    assert max_abs_diff(again(tokens).logits, model(tokens).logits) < 1e-5
    assert model.generate(tokens[:, :4], max_new_tokens=6).shape == (2, 10)
    single = et.build_model("memory_compressed", dim=32, depth=2, heads=2, max_len=64, kind="local")
    assert [b.attention.kind for b in single.encoder.blocks] == ["local", "local"]
