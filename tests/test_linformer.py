"""linformer: the layer against the naive definition, leading columns, sharing modes, max_len."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional.dense import naive_attention
from efficient_transformers.attention.linformer import LinformerAttention
from helpers import DIM, assert_values_and_gradients_match, random_mask, small_attention, train_losses

N = 29


def oracle(attn, x, mask):
    """softmax(Q (E K)ᵀ/√d) (F V) with E, F cut to N columns and padded rows of K, V zeroed."""
    q, k, v = [attn.split_heads(t) for t in attn.to_qkv(x).chunk(3, dim=-1)]
    if mask is not None:
        keep = mask[:, None, :, None].to(x.dtype)
        k, v = k * keep, v * keep
    n = x.shape[1]
    e = attn.proj_k[..., :n]
    f = (attn.proj_k if attn.proj_v is None else attn.proj_v)[..., :n]
    spec = "hkn,bhnd->bhkd" if e.dim() == 3 else "kn,bhnd->bhkd"  # per head or shared
    k_bar, v_bar = torch.einsum(spec, e, k), torch.einsum(spec, f, v)
    return attn.to_out(attn.merge_heads(naive_attention(q, k_bar, v_bar)))


@pytest.mark.parametrize("sharing", ["none", "headwise", "key_value", "layerwise"])
@pytest.mark.parametrize("padded", [False, True])
def test_layer_equals_oracle_values_and_gradients(sharing, padded):
    attn = small_attention("linformer", sharing=sharing)
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, N) if padded else None
    fast, slow = attn(x, mask), oracle(attn, x, mask)
    assert_values_and_gradients_match(fast, slow, [x] + list(attn.parameters()), tol=1e-12)
    # shorter inputs use the leading columns only: later columns get no gradient
    grad_e = torch.autograd.grad(attn(x, mask).sum(), attn.proj_k)[0]
    assert (grad_e[..., N:] == 0).all() and grad_e[..., :N].abs().sum() > 0


def test_sharing_modes_hold_the_papers_parameters():
    h, k, max_len = 2, 8, 64
    shapes = {}
    for sharing in ("none", "headwise", "key_value", "layerwise"):
        attn = small_attention("linformer", sharing=sharing)
        shapes[sharing] = (tuple(attn.proj_k.shape),
                           None if attn.proj_v is None else tuple(attn.proj_v.shape))
    assert shapes["none"] == ((h, k, max_len), (h, k, max_len))
    assert shapes["headwise"] == ((k, max_len), (k, max_len))
    assert shapes["key_value"] == shapes["layerwise"] == ((k, max_len), None)


def test_layerwise_sharing_ties_every_layer_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    model = et.build_model("linformer", task="classify", vocab_size=13, dim=16, depth=3, heads=2,
                           max_len=40, k=6, sharing="layerwise")
    layers = [m for m in model.modules() if isinstance(m, LinformerAttention)]
    assert len(layers) == 3 and all(l.proj_k is layers[0].proj_k for l in layers)
    assert sum(p.numel() for p in model.parameters() if p.shape == layers[0].proj_k.shape) == 6 * 41
    tokens = torch.randint(0, 13, (2, 40))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = et.load_pretrained(tmp_path).eval()
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    again = [m for m in loaded.modules() if isinstance(m, LinformerAttention)]
    assert all(l.proj_k is again[0].proj_k for l in again)
    headwise = et.build_model("linformer", task="classify", vocab_size=13, dim=16, depth=2,
                              heads=2, max_len=40, k=6)
    layers = [m for m in headwise.modules() if isinstance(m, LinformerAttention)]
    assert layers[0].proj_k is not layers[1].proj_k


def test_longer_inputs_and_bad_options_are_refused():
    attn = small_attention("linformer")
    assert attn.max_len == 64
    with pytest.raises(ValueError, match="max_len"):
        attn(torch.randn(1, 65, DIM, dtype=torch.float64))
    for option, value in (("k", 0), ("max_len", 0), ("sharing", "all")):
        with pytest.raises(ValueError, match=option):
            et.build_attention("linformer", dim=DIM, heads=2, **{option: value})


def test_classifier_trains():
    torch.manual_seed(0)
    model = et.build_model("linformer", task="classify", vocab_size=17, num_classes=3, dim=16,
                           depth=2, heads=2, max_len=32, k=8)
    tokens = torch.randint(0, 17, (8, 20))
    labels = torch.randint(0, 3, (8,))
    losses = train_losses(model, tokens, labels)
    assert losses[-1] < losses[0]
