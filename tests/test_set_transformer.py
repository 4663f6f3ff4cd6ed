"""set_transformer: the ISAB layer against the naive definition, permutation equivariance and
invariance, padding, float-vector input, a classifier that trains, save/load."""

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.attention import set_transformer
from efficient_transformers.attention.set_transformer import MultiheadAttention
from efficient_transformers.functional.dense import naive_attention, padding_allowed
from efficient_transformers.functional.folded_cross import KEYS, QUERIES, fold_choice
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


def padded_with_an_empty_row(batch, n):
    """random_mask with its last batch row fully padded (that row attends to all keys)."""
    mask = random_mask(batch, n)
    mask[-1] = False
    return mask


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n_queries, n_keys, form", [(N, 4, QUERIES), (4, N, KEYS)])
def test_folded_forms_equal_the_unfolded_reference(n_queries, n_keys, form, padded):
    """Both folded forms of Multihead(X, Y, Y), chosen by the FLOP rule at these sizes, match
    the unfolded one: values and gradients for x, y and every parameter."""
    assert fold_choice(n_queries, n_keys, DIM, 2) == form
    torch.manual_seed(0)
    mha = MultiheadAttention(DIM, 2).double()
    x = torch.randn(2, n_queries, DIM, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, n_keys, DIM, dtype=torch.float64, requires_grad=True)
    mask = padded_with_an_empty_row(2, n_keys) if padded else None
    fast, slow = mha(x, y, mask), mha(x, y, mask, folded=False)
    assert_values_and_gradients_match(fast, slow, [x, y] + list(mha.parameters()), tol=1e-12)
    if form == KEYS:  # the key bias is constant along the keys: zero gradient by definition
        bk_grad = lambda out: torch.autograd.grad(out.sum(), mha.to_kv.bias)[0][:DIM]
        assert bk_grad(mha(x, y, mask, folded=False)).abs().max() < 1e-12
        assert not bk_grad(mha(x, y, mask)).any()


def test_layer_folded_equals_unfolded_with_an_empty_row(monkeypatch):
    """The registered layer (its MAB(I, X) folds the keys, Multihead(X, H, H) the queries)
    against itself with every attention unfolded, a fully padded batch row included."""
    attn = small_attention("set_transformer")
    assert fold_choice(4, N, DIM, 2) == KEYS and fold_choice(N, 4, DIM, 2) == QUERIES
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    mask = padded_with_an_empty_row(2, N)
    fast = attn(x, mask)
    monkeypatch.setattr(set_transformer, "fold_choice", lambda *args: None)
    slow = attn(x, mask)
    assert_values_and_gradients_match(fast, slow, [x] + list(attn.parameters()), tol=1e-12)


def test_flop_rule_keeps_the_unfolded_form_where_folding_costs_more():
    # H·M = 64 > dim + M = 32 and likewise for the keys: folding would add work
    assert fold_choice(20, 16, DIM, 4) is None
    torch.manual_seed(0)
    mha = MultiheadAttention(DIM, 4).double()
    x = torch.randn(2, 20, DIM, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 16, DIM, dtype=torch.float64, requires_grad=True)
    mask = padded_with_an_empty_row(2, 16)
    assert torch.equal(mha(x, y, mask), mha(x, y, mask, folded=False))
    # forced folding is still the same function, though more work here
    assert fold_choice(20, 16, DIM, 4, folded=True) == QUERIES
    assert_values_and_gradients_match(mha(x, y, mask, folded=True), mha(x, y, mask, folded=False),
                                      [x, y] + list(mha.parameters()), tol=1e-12)
    # self-attention (SAB) never folds with several heads; the benchmark shape folds both sides
    assert fold_choice(16, 16, 512, 8) is None
    assert fold_choice(4096, 64, 512, 8) == QUERIES and fold_choice(64, 4096, 512, 8) == KEYS
    with pytest.raises(ValueError, match="folded"):
        mha(x, y, folded="yes")


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
