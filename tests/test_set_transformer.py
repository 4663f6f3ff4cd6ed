"""set_transformer: the ISAB layer against the naive definition, permutation equivariance and
invariance, padding, float-vector input, a classifier that trains, save/load."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.functional.dense import naive_attention, padding_allowed
from helpers import DIM, assert_values_and_gradients_match, max_abs_diff, random_mask, small_attention, train_losses

N = 23


def naive_mha(block, x, y, mask):
    """Multihead(X, Y, Y) written out: projections, naive softmax attention, output projection."""
    b, h = x.shape[0], block.heads
    split = lambda t: t.view(b, t.shape[1], h, -1).transpose(1, 2)
    k, v = block.to_kv(y).chunk(2, dim=-1)
    allowed = None if mask is None else padding_allowed(mask)
    out = naive_attention(split(block.to_q(x)), split(k), split(v), allowed)
    return block.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))


def oracle(attn, x, mask):
    """H = MAB(I, X) = LN(h + rFF(h)), h = LN(I + Multihead(I, X, X)); y = Multihead(X, H, H)."""
    mab = attn.inducing.mab
    points = attn.inducing.points.expand(x.shape[0], -1, -1)
    h = mab.norm1(points + naive_mha(mab.attention, points, x, mask))
    summary = mab.norm2(h + mab.rff(h))
    return naive_mha(attn.attention, x, summary, None)


@pytest.mark.parametrize("padded", [False, True])
def test_layer_equals_oracle_values_and_gradients(padded):
    attn = small_attention("set_transformer")
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, N) if padded else None
    fast, slow = attn(x, mask), oracle(attn, x, mask)
    assert_values_and_gradients_match(fast, slow, [x] + list(attn.parameters()), tol=1e-12)


def test_isab_layer_is_permutation_equivariant():
    attn = small_attention("set_transformer")
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    mask = random_mask(2, N)
    perm = torch.randperm(N)
    y = attn(x, mask)
    assert max_abs_diff(attn(x[:, perm], mask[:, perm]), y[:, perm]) < 1e-12


def small_model(**kwargs):
    torch.manual_seed(0)
    options = dict(task="classify", vocab_size=19, num_classes=3, dim=16, depth=2, heads=2,
                   max_len=40, num_inducing=4, num_seeds=2)
    return et.build_model("set_transformer", **{**options, **kwargs}).double().eval()


def test_classifier_is_permutation_invariant_and_ignores_padding():
    model = small_model()
    tokens = torch.randint(0, 19, (3, 30))
    mask = random_mask(3, 30)
    logits = model(tokens, mask).logits
    perm = torch.randperm(30)
    assert max_abs_diff(model(tokens[:, perm], mask[:, perm]).logits, logits) < 1e-12
    noisy = torch.where(mask, tokens, torch.randint(0, 19, tokens.shape))
    assert max_abs_diff(model(noisy, mask).logits, logits) < 1e-12
    # a set with its padding removed gives the same logits
    real = tokens[0][mask[0]][None]
    assert max_abs_diff(model(real).logits, logits[:1]) < 1e-12


def test_float_vector_sets():
    model = small_model(input_dim=3)
    x = torch.randn(2, 12, 3, dtype=torch.float64)
    logits = model(x).logits
    assert logits.shape == (2, 3)
    perm = torch.randperm(12)
    assert max_abs_diff(model(x[:, perm]).logits, logits) < 1e-12
    with pytest.raises(ValueError, match="x"):
        model(torch.randn(2, 12, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="tokens"):
        small_model()(torch.randn(2, 12, 3))  # no input_dim: floats are refused


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sequence_options_of_the_training_presets(pooling):
    model = small_model(pooling=pooling, positions="learned", mlp_dim=8)
    tokens = torch.randint(0, 19, (2, 9))
    mask = random_mask(2, 9)
    noisy = torch.where(mask, tokens, torch.randint(0, 19, tokens.shape))
    assert max_abs_diff(model(noisy, mask).logits, model(tokens, mask).logits) < 1e-12
    with pytest.raises(ValueError, match="pooling"):
        small_model(pooling="max")


def test_match_task_and_refusals():
    model = small_model(task="match")
    tokens = torch.randint(0, 19, (2, 2, 9))
    assert model(tokens, labels=torch.tensor([0, 1])).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="task"):
        et.build_model("set_transformer", task="lm")
    with pytest.raises(ValueError, match="max_len"):
        small_model()(torch.randint(0, 19, (1, 41)))
    with pytest.raises(ValueError, match="num_inducing"):
        et.build_attention("set_transformer", dim=DIM, heads=2, num_inducing=0)


def test_classifier_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = et.build_model("set_transformer", task="classify", vocab_size=10, num_classes=2,
                           dim=16, depth=1, heads=2, max_len=16, num_inducing=4)
    tokens = torch.randint(0, 10, (16, 12))
    labels = (tokens == 3).any(dim=1).long()  # does the set contain a 3?
    losses = train_losses(model, tokens, labels, lr=1e-2)
    assert losses[-1] < losses[0]
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = et.load_pretrained(tmp_path).eval()
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
