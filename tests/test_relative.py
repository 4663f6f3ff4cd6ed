"""Relative positions (Transformer-XL appendix B shift) and the recurrent layers against a naive,
segment-by-segment re-computation of the papers' algorithms (float64, values and gradients).

`naive_recurrent_layer` is the reference the other test files import: a loop over segments and
over queries, with the memory and the compressed memory kept as Python lists (Dai et al. 2019,
section 3.2; Rae et al. 2020, Algorithm 1), every score from `naive_relative_scores`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from efficient_transformers.functional.dense import masked_softmax
from efficient_transformers.functional.relative import (
    naive_relative_scores, relative_scores, relative_shift, shift_distances, sinusoid_relative,
)
from helpers import DIM, assert_values_and_gradients_match, random_mask, small_attention


# ----------------------------------------------------------------------------- the reference
def naive_compress(attn, states, real, usage):
    """One group: states (B, c, D), real (B, c), usage (B, c) -> slot (B, D), valid (B,)."""
    kind = getattr(attn, "compression", None)
    valid = real.any(dim=1)
    if kind == "max":
        slot = torch.stack([states[b][real[b]].max(0).values if valid[b] else states[b, 0] * 0
                            for b in range(states.shape[0])])
    elif kind == "mean":
        slot = torch.stack([states[b][real[b]].mean(0) if valid[b] else states[b, 0] * 0
                            for b in range(states.shape[0])])
    elif kind == "most_used":
        picks = [int(torch.where(real[b], usage[b], torch.tensor(-math.inf, dtype=usage.dtype)).argmax())
                 for b in range(states.shape[0])]
        slot = torch.stack([states[b, p] if valid[b] else states[b, 0] * 0 for b, p in enumerate(picks)])
    else:  # convolutions over the zero-filled group
        h = (states * real[..., None]).transpose(1, 2)  # (B, D, c)
        for i, conv in enumerate(attn.compressor):
            h = F.conv1d(h if i == 0 else F.relu(h), conv.weight, conv.bias, dilation=conv.dilation)
        slot = h[..., -1]
    return slot, valid


def naive_recurrent_layer(attn, x, mask=None):
    """Returns (y, memory states, compressed slots) after running x segment by segment."""
    b, n, dim = x.shape
    H, d = attn.heads, attn.head_dim
    L, M = attn.segment_len, attn.memory_len
    cm_len = getattr(attn, "cmem_len", 0)
    c = getattr(attn, "compression_rate", 1)
    mask = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    wq, wk, wv = attn.to_qkv.weight.chunk(3, dim=0)
    split = lambda t: t.unflatten(-1, (H, d)).transpose(-2, -3)  # (B, n, D) -> (B, H, n, d)
    embed = lambda dist: attn.relative_keys(dist, x.dtype)
    usage_sum = torch.zeros(b, n, dtype=torch.float64)
    usage_cnt = torch.zeros(b, n, dtype=torch.float64)
    cmem: list[tuple[torch.Tensor, torch.Tensor]] = []  # (slot (B, D), valid (B,)), oldest first
    outs = []
    for s0 in range(0, n, L):
        seg = list(range(s0, min(n, s0 + L)))
        mem = list(range(max(0, s0 - M), s0))
        window = [None] * (cm_len - len(cmem[-cm_len:] if cm_len else [])) + (cmem[-cm_len:] if cm_len else [])
        keys = mem + seg
        k_states = torch.cat([x[:, mem].detach(), x[:, seg]], 1)
        k_real = mask[:, keys]
        cm_states = torch.stack([w[0] if w else x.new_zeros(b, dim) for w in window], 1) if cm_len else x.new_zeros(b, 0, dim)
        cm_real = torch.stack([w[1] if w else torch.zeros(b, dtype=torch.bool) for w in window], 1) if cm_len else torch.zeros(b, 0, dtype=torch.bool)
        all_states = torch.cat([cm_states, k_states], 1)
        all_real = torch.cat([cm_real, k_real], 1)
        k_pos = torch.tensor([s0 - M - cm_len + t for t in range(cm_len)] + keys)
        q = split(F.linear(x[:, seg], wq))
        k, v = split(F.linear(all_states, wk)), split(F.linear(all_states, wv))
        q_pos = torch.tensor(seg)
        scores = naive_relative_scores(q, k, attn.u, attn.v, q_pos, k_pos, embed) / math.sqrt(d)
        is_key = torch.arange(len(k_pos)) >= cm_len
        diag = is_key[None, :] & (k_pos[None, :] == q_pos[:, None])
        allowed = all_real[:, None, :] | diag
        if attn.causal:
            allowed = allowed & (~is_key[None, :] | (k_pos[None, :] <= q_pos[:, None]))
        probs = masked_softmax(scores, allowed[:, None])
        outs.append((probs @ v).transpose(1, 2).reshape(b, len(seg), dim))
        real_q = mask[:, seg, None]  # usage of memory and segment states by real queries
        usage_sum[:, keys] += (probs[:, :, :, cm_len:].sum(1) * real_q).sum(1).detach()
        usage_cnt[:, keys] += (allowed[:, :, cm_len:] & real_q).sum(1).double()
        if len(seg) == L and cm_len:  # the segment is complete: evict and compress (Algorithm 1)
            evicted = [j for j in range(s0 - M, s0 + L - M) if j >= 0]
            for g0 in range(0, len(evicted), c):
                grp = evicted[g0: g0 + c]
                slot, valid = naive_compress(attn, x[:, grp].detach(), mask[:, grp],
                                             usage_sum[:, grp] / usage_cnt[:, grp].clamp_min(1))
                cmem.append((slot.detach(), valid))  # the main network never trains f_c
    y = attn.to_out(torch.cat(outs, 1))
    end_seg = (n // L) * L
    memory = x[:, max(0, end_seg - M):].detach()
    slots = torch.stack([s for s, _ in cmem[-cm_len:]], 1) if cm_len and cmem else None
    return y, memory, slots


# ------------------------------------------------------------------------------ the shift
@pytest.mark.parametrize("rows,keys,d_top", [(5, 9, 12), (1, 7, 3), (4, 4, 3), (6, 11, 20),
                                             (4, 1, 3)])
def test_relative_shift_equals_naive_scores(rows, keys, d_top):
    torch.manual_seed(0)
    h, d = 2, 4
    q = torch.randn(3, h, rows, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, h, keys, d, dtype=torch.float64, requires_grad=True)
    u, v = torch.randn(h, d, dtype=torch.float64), torch.randn(h, d, dtype=torch.float64)
    proj = torch.randn(DIM, h * d, dtype=torch.float64, requires_grad=True)

    def embed(dist):
        return (sinusoid_relative(dist, DIM, dtype=torch.float64) @ proj).unflatten(-1, (h, d)).transpose(0, 1)

    dist = shift_distances(rows, keys, d_top)
    fast = relative_scores(q, k, embed(dist), u[:, None], v[:, None])
    # row a, key t at distance d_top - (rows - 1 - a) - t: query position a + (d_top - rows + 1)
    q_pos = torch.arange(rows) + d_top - rows + 1
    slow = naive_relative_scores(q, k, u, v, q_pos, torch.arange(keys), embed)
    assert_values_and_gradients_match(fast, slow, (q, k, proj), tol=1e-12)


def test_relative_shift_is_a_skew():
    pos = torch.arange(3 * 6.0).reshape(3, 6)  # rows 3, keys 4
    strided = torch.arange(2 * 3 * 6.0).reshape(2, 6, 3).transpose(1, 2)  # not contiguous
    offset = torch.arange(2 * 3 * 6.0).reshape(2, 3, 6)[1]               # contiguous, offset 18
    for p in (pos, strided, strided[1:], offset):
        out = relative_shift(p, 4)
        for a in range(3):
            for t in range(4):
                assert torch.equal(out[..., a, t], p[..., a, 3 - 1 - a + t])
    with pytest.raises(ValueError, match="pos"):
        relative_shift(pos, 5)


def test_sinusoid_matches_the_formula():
    emb = sinusoid_relative(torch.tensor([0, 3, -2]), 6, dtype=torch.float64)
    freq = 10000.0 ** (-torch.arange(3, dtype=torch.float64) * 2 / 6)
    assert torch.allclose(emb[1, :3], torch.sin(3 * freq)) and torch.allclose(emb[1, 3:], torch.cos(3 * freq))
    assert torch.allclose(emb[2, :3], torch.sin(-2 * freq)) and torch.equal(emb[0, :3], torch.zeros(3, dtype=torch.float64))


# ------------------------------------------------------------------- whole layer vs naive
LAYERS = [("transformer_xl", {}), ("transformer_xl", {"mem_len": 0}),
          ("transformer_xl", {"mem_len": 11, "segment_len": 4}),
          ("compressive_transformer", {}), ("compressive_transformer", {"compression": "max"}),
          ("compressive_transformer", {"compression": "most_used"})]


@pytest.mark.parametrize("name,options", LAYERS)
@pytest.mark.parametrize("causal", [True, False])
def test_layer_equals_segment_by_segment_reference(name, options, causal):
    attn = small_attention(name, causal=causal, **options)
    with torch.no_grad():
        attn.u.normal_()
        attn.v.normal_()
    x = torch.randn(2, 29, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 29, generator=torch.Generator().manual_seed(1))
    fast = attn(x, mask)
    slow, _, _ = naive_recurrent_layer(attn, x, mask)
    params = [attn.to_qkv.weight, attn.to_r.weight, attn.u, attn.v]
    assert_values_and_gradients_match(fast, slow, [x] + params, mask[..., None], tol=1e-10)
