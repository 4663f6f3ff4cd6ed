"""synthesizer: every variant against a naive computation of the paper's definition, causality,
exact decode, padding, options."""

import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.attention.synthesizer import VARIANTS
from efficient_transformers.functional.dense import dense_allowed
from helpers import DIM, max_abs_diff, random_mask, small_attention, train_losses

N = 13


def build(variant, causal=False, **options):
    return small_attention("synthesizer", causal=causal, variant=variant, max_len=20, **options)


def oracle(attn, x, mask):
    """softmax(Σ α_c B_c masked) G(x), each B_c written out from the paper, per head."""
    b, n, _ = x.shape
    h, d = attn.heads, attn.head_dim
    heads = lambda t: t.view(b, n, h, -1).transpose(1, 2)
    terms = []
    for part in attn.components:
        if part == "dense":
            hid = heads(torch.relu(attn.hidden(x)))
            terms.append(torch.einsum("bhnd,hdl->bhnl", hid, attn.w_dense)[..., :n]
                         + attn.b_dense[None, :, None, :n])
        elif part == "factorized_dense":
            hid = heads(torch.relu(attn.hidden(x)))
            fa = torch.einsum("bhnd,hda->bhna", hid, attn.w_fa) + attn.b_fa[None, :, None]
            fb = torch.einsum("bhnd,hde->bhne", hid, attn.w_fb) + attn.b_fb[None, :, None]
            tiled = torch.stack([fa[..., j // fb.shape[-1]] * fb[..., j % fb.shape[-1]]
                                 for j in range(n)], dim=-1)  # H_A(A) ⊙ H_B(B), first n entries
            terms.append(tiled)
        elif part == "random":
            terms.append(attn.r[None, :, :n, :n].expand(b, -1, -1, -1))
        elif part == "factorized_random":
            terms.append((attn.r1[:, :n] @ attn.r2[:, :n].transpose(-1, -2))[None].expand(b, -1, -1, -1))
        else:
            q, k = attn.to_qk(x).chunk(2, dim=-1)
            terms.append(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d))
    alpha = attn.mix.softmax(0) if attn.mix is not None else torch.ones(1, dtype=x.dtype)
    logits = sum(a * t for a, t in zip(alpha, terms))
    allowed = dense_allowed(n, attn.causal, mask)
    if allowed is not None:
        allowed = allowed | ~mask[:, None, :, None]  # padded queries: any finite convention
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = logits.softmax(-1) @ heads(attn.to_v(x))
    return attn.to_out(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_variant_equals_oracle_values_and_gradients(variant, causal):
    attn = build(variant, causal)
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, N)
    fast, slow = attn(x, mask), oracle(attn, x, mask)
    sel = mask[..., None].expand_as(fast)  # padded queries are not defined by the paper
    assert max_abs_diff(fast[sel], slow[sel]) < 1e-12
    up = torch.randn_like(fast) * sel
    params = [x] + [p for p in attn.parameters()]
    for a, b in zip(torch.autograd.grad(fast, params, up, allow_unused=True),
                    torch.autograd.grad(slow, params, up, allow_unused=True)):
        if a is not None or b is not None:
            assert max_abs_diff(a, b) < 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_is_causal_decodes_exactly_and_ignores_padding(variant):
    attn = build(variant, causal=True)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    y = attn(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn_like(x2[:, 6:]) * 3
    assert max_abs_diff(attn(x2)[:, :6], y[:, :6]) < 1e-12
    outs, state = [], None
    for start, stop in ((0, 1), (1, 5), (5, 6), (6, N)):
        out, state = attn.decode(x[:, start:stop], state)
        outs.append(out)
    assert max_abs_diff(torch.cat(outs, dim=1), y) < 1e-12
    mask = random_mask(2, N)
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 5)
    assert max_abs_diff(attn(x, mask)[mask], attn(noisy, mask)[mask]) < 1e-12


LOW_RANK_VARIANTS = ["dense", "factorized_random", "dense+vanilla", "factorized_random+vanilla"]


@pytest.mark.parametrize("variant", LOW_RANK_VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_low_rank_fast_path_equals_materialised_logits(variant, causal, padded):
    attn = build(variant, causal)
    assert attn.low_rank and not build("dense+random").low_rank
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, N) if padded else None
    fast, slow = attn.attend_low_rank(x, mask), attn.attend_reference(x, mask)
    sel = (mask if padded else torch.ones(2, N, dtype=torch.bool))[..., None].expand_as(fast)
    assert max_abs_diff(fast[sel], slow[sel]) < 1e-12
    up = torch.randn_like(fast) * sel
    params = [x] + list(attn.parameters())
    for a, b in zip(torch.autograd.grad(fast, params, up, allow_unused=True),
                    torch.autograd.grad(slow, params, up, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert max_abs_diff(a, b) < 1e-12


def test_low_rank_path_never_materialises_n_by_n():
    from test_contract import LargestTensor
    n = 1024
    attn = et.build_attention("synthesizer", dim=16, heads=1, causal=True, max_len=n)
    x = torch.randn(1, n, 16, requires_grad=True)
    with LargestTensor() as spy:
        attn(x).sum().backward()
    assert spy.largest < n * n, f"{spy.op} made a tensor of {spy.largest} elements"


def test_mixture_weights_sum_to_one_and_fixed_random_is_a_buffer():
    attn = build("dense+random+vanilla", trainable=False)
    assert attn.mix.softmax(0).sum().item() == pytest.approx(1.0)
    names = dict(attn.named_parameters())
    assert "r" not in names and "r" in attn.state_dict()
    assert "r" in dict(build("random").named_parameters())


@pytest.mark.parametrize("variant", ["vanilla", "dense+dense", "sparse", "", 3])
def test_bad_variants_are_refused(variant):
    with pytest.raises(ValueError, match="variant"):
        et.build_attention("synthesizer", dim=DIM, heads=2, variant=variant)


def test_options_are_validated_and_max_len_enforced():
    for option, value in (("max_len", 0), ("k", 0), ("trainable", "yes")):
        with pytest.raises(ValueError, match=option):
            et.build_attention("synthesizer", dim=DIM, heads=2, **{option: value})
    attn = build("dense")
    with pytest.raises(ValueError, match="max_len"):
        attn(torch.randn(1, 21, DIM, dtype=torch.float64))


def test_language_model_trains():
    torch.manual_seed(0)
    model = et.build_model("synthesizer", task="lm", vocab_size=17, dim=16, depth=1, heads=2,
                           max_len=32, variant="dense+vanilla")
    tokens = torch.randint(0, 17, (2, 16))
    losses = train_losses(model, tokens, tokens)
    assert losses[-1] < losses[0]
    assert model.generate(tokens[:, :4], max_new_tokens=5, temperature=0).shape == (2, 9)
