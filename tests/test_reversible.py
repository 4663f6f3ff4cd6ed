"""The `reformer` model: reversible layers (exact gradients, memory flat in depth), chunked FF, tasks."""

from __future__ import annotations

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.models.reversible import ChunkedFeedForward, ReversibleBlock
from helpers import max_abs_diff, train_losses

SMALL = dict(vocab_size=40, dim=16, heads=2, max_len=48, bucket_size=4, n_hashes=2, n_buckets=4)


def model(task="lm", depth=2, **kwargs):
    torch.manual_seed(0)
    return et.build_model("reformer", task=task, depth=depth, **{**SMALL, **kwargs})


def grads(m, tokens, mask=None, labels=None, seed=3):
    m.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks in both runs
    out = m(tokens, mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_reversible_gradients_equal_plain_backprop(task):
    m = model(task, depth=3, dropout=0.1, ff_chunks=3).double().train()
    tokens = torch.randint(0, 40, (2, 29))
    mask = torch.ones(2, 29, dtype=torch.bool)
    mask[1, 20:] = False
    labels = tokens if task == "lm" else torch.tensor([0, 1])
    loss_rev, g_rev = grads(m, tokens, mask, labels)
    m.encoder.reversible = False
    loss_plain, g_plain = grads(m, tokens, mask, labels)
    assert torch.equal(loss_rev, loss_plain)
    assert g_rev.keys() == g_plain.keys() and len(g_rev) == len(list(m.parameters()))
    for name in g_plain:
        assert max_abs_diff(g_rev[name], g_plain[name]) < 1e-12, name


def test_reversible_input_gradient_through_autograd_grad():
    enc = model(depth=2).double().encoder
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    params = list(enc.blocks.parameters())
    a = torch.autograd.grad(enc.run_blocks(x, None, reversible=True).square().sum(), [x] + params)
    b = torch.autograd.grad(enc.run_blocks(x, None, reversible=False).square().sum(), [x] + params)
    for ga, gb in zip(a, b):
        assert max_abs_diff(ga, gb) < 1e-12


def test_reversible_gradients_under_autocast_equal_plain_backprop():
    # backward recomputes each block under the forward's autocast, not in float32
    m = model("lm", depth=2).train()
    tokens = torch.randint(0, 40, (2, 29))
    results = []
    for reversible in (True, False):
        m.encoder.reversible = reversible
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(tokens, labels=tokens).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (loss_rev, g_rev), (loss_plain, g_plain) = results
    assert torch.equal(loss_rev, loss_plain)
    for name in g_plain:
        scale = g_plain[name].abs().max().item()
        assert max_abs_diff(g_rev[name], g_plain[name]) <= 1e-5 * scale, name  # 1e-3 unreplayed


def test_block_is_inverted_exactly():
    torch.manual_seed(0)
    attn = et.build_attention("reformer", dim=16, heads=2, bucket_size=4, n_buckets=4)
    block = ReversibleBlock(attn, 16, 32, 0.0, 2).double()
    x1, x2 = torch.randn(2, 2, 20, 16, dtype=torch.float64)
    y1, y2 = block(x1, x2)
    back2 = y2 - block.g(y1)
    back1 = y1 - block.f(back2, None)
    assert max_abs_diff(back1, x1) < 1e-12 and max_abs_diff(back2, x2) < 1e-12


def test_chunked_feed_forward_equals_whole():
    torch.manual_seed(0)
    ff = ChunkedFeedForward(16, 32, 0.0, chunks=4).double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    whole = ff.mlp(ff.norm(x))
    assert max_abs_diff(ff(x), whole) < 1e-14


def saved_bytes(m, tokens, reversible):
    """Bytes autograd keeps for backward during one forward (activation memory)."""
    m.encoder.reversible = reversible
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(tokens, labels=tokens).loss  # what is held between forward and backward
    loss.backward()
    return total


def test_activation_memory_does_not_grow_with_depth():
    tokens = torch.randint(0, 40, (2, 48))
    rev = {d: saved_bytes(model(depth=d), tokens, True) for d in (1, 4)}
    plain = {d: saved_bytes(model(depth=d), tokens, False) for d in (1, 4)}
    assert rev[4] == rev[1]  # only the top of the stack is kept, whatever the depth
    assert plain[4] > 2.5 * plain[1]  # plain backprop keeps every layer
    assert rev[4] < plain[4] / 3


@pytest.mark.parametrize("task", ["lm", "classify", "match"])
def test_tasks_train_save_and_load(task, tmp_path):
    m = model(task, depth=1, reversible=True, ff_chunks=2)
    n = 16
    gen = torch.Generator().manual_seed(0)
    shape = (4, 2, n) if task == "match" else (4, n)
    tokens = torch.randint(0, 40, shape, generator=gen)
    labels = tokens if task == "lm" else torch.tensor([0, 1, 0, 1])
    losses = train_losses(m, tokens, labels, steps=8, optimizer=torch.optim.Adam)
    assert losses[-1] < losses[0]
    m.eval()
    m.save_pretrained(tmp_path)
    loaded = et.load_pretrained(tmp_path).eval()
    assert loaded.config == m.config and loaded.config["ff_chunks"] == 2
    assert torch.equal(loaded(tokens).logits, m(tokens).logits)


def test_generate_continues_the_causal_forward():
    m = model("lm", depth=2).eval()
    prompt = torch.randint(0, 40, (2, 7))
    out = m.generate(prompt, max_new_tokens=9, temperature=0)
    assert out.shape == (2, 16) and torch.equal(out[:, :7], prompt)
    logits = m(out).logits  # greedy: every new token is the argmax of the full forward
    assert torch.equal(logits[:, 6:-1].argmax(-1), out[:, 7:])


def test_bad_model_arguments_are_refused():
    with pytest.raises(ValueError, match="ff_chunks"):
        model(ff_chunks=0)
    with pytest.raises(ValueError, match="reversible"):
        model(reversible="yes")
    with pytest.raises(TypeError, match="valid options"):
        model(no_such_option=1)
