"""transformer_xl: the memory after a few segments, stop-gradient into the cache, a longer memory
at evaluation; the memory language models (both keys): streaming training with the state carried
across batches, evaluation over a longer stream, generate, save/load, classify and match; the
stream loader; and a small run of benchmarks/memory_helps.py (memory must help)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.models.memory import MemoryLanguageModel, StreamBatches, stream_loss
from helpers import DIM, max_abs_diff, random_mask, small_attention
from test_relative import naive_recurrent_layer

NAME = "transformer_xl"
MEMORY_MODELS = {"transformer_xl": dict(segment_len=8, mem_len=8),
                 "compressive_transformer": dict(segment_len=8, mem_len=4, cmem_len=4, compression_rate=2)}


# ------------------------------------------------------------------------------ attention
def test_memory_after_a_few_segments_equals_naive():
    attn = small_attention(NAME, causal=True)  # segment 8, memory 5
    x = torch.randn(2, 32, DIM, dtype=torch.float64)
    mask = random_mask(2, 32, generator=torch.Generator().manual_seed(4))
    y, state = attn.process(x, mask)
    y_ref, memory, _ = naive_recurrent_layer(attn, x, mask)
    assert state["length"] == 32 and torch.equal(state["mem"], memory)
    assert torch.equal(state["mem_mask"], mask[:, -5:])
    assert max_abs_diff(y[mask], y_ref[mask]) < 1e-10
    # mid-segment the buffer also holds the partial segment: memory + current = 5 + 3
    _, state = attn.process(x[:, :19])
    assert state["mem"].shape[1] == 5 + 3 and torch.equal(state["mem"], x[:, 11:19])


def test_no_gradient_into_the_cache():
    attn = small_attention(NAME, causal=True, dtype=torch.float32).train()
    x = torch.randn(1, 24, DIM, requires_grad=True)
    y, state = attn.process(x)
    assert not state["mem"].requires_grad
    g = torch.autograd.grad(y[:, 16:].sum(), x, retain_graph=True)[0]  # the third segment
    assert g[:, :16].abs().sum() == 0 and g[:, 16:].abs().sum() > 0
    # yet the values do depend on the memory
    x2 = x.detach().clone()
    x2[:, 12] += 1.0
    assert max_abs_diff(attn(x2)[:, 16:], y[:, 16:].detach()) > 1e-6
    grads = torch.autograd.grad(y.sum(), list(attn.parameters()), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_longer_memory_at_evaluation():
    attn = small_attention(NAME, causal=True, eval_mem_len=13)
    x = torch.randn(2, 40, DIM, dtype=torch.float64)
    y_eval = attn(x)
    assert attn.memory_len == 13
    y_ref, _, _ = naive_recurrent_layer(attn, x)
    assert max_abs_diff(y_eval, y_ref) < 1e-10
    y_train = attn.train()(x)
    assert attn.memory_len == 5
    assert max_abs_diff(y_train[:, :8], y_eval[:, :8]) < 1e-12       # the first segment: no memory
    assert max_abs_diff(y_train[:, 8:], y_eval[:, 8:]) > 1e-6


def test_options_are_validated():
    for bad in (dict(segment_len=0), dict(mem_len=-1), dict(eval_mem_len=1.5), dict(segment_len="8")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            et.build_attention(NAME, dim=DIM, heads=2, **bad)


def test_per_segment_cost_is_bounded():
    """No score block grows with N: every op output at N = 512 stays within N * (M + 2L) elements."""
    from test_contract import LargestTensor
    attn = et.build_attention(NAME, dim=16, heads=1, causal=True, segment_len=32, mem_len=32)
    x = torch.randn(1, 512, 16, requires_grad=True)
    with LargestTensor() as spy:
        attn(x).sum().backward()
    assert spy.largest <= 512 * (32 + 2 * 32), spy.op


# --------------------------------------------------------------------------------- models
def build_lm(name, **kwargs):
    torch.manual_seed(0)
    return et.build_model(name, task="lm", vocab_size=23, dim=32, depth=2, heads=2, max_len=64,
                          **{**MEMORY_MODELS[name], **kwargs})


@pytest.mark.parametrize("name", list(MEMORY_MODELS))
def test_streaming_in_chunks_equals_one_call(name):
    model = build_lm(name).eval()
    assert isinstance(model, MemoryLanguageModel)
    tokens = torch.randint(0, 23, (2, 50))
    full = model(tokens)
    memory, logits = None, []
    for i in range(0, 50, 8):
        out = model(tokens[:, i:i + 8], memory=memory)
        logits.append(out.logits)
        memory = out.memory
    assert memory["length"] == 50
    assert max_abs_diff(torch.cat(logits, 1), full.logits) < 1e-5
    # uneven chunks and a longer stream than any call
    memory, logits = None, []
    for a, b in ((0, 3), (3, 20), (20, 21), (21, 50)):
        out = model(tokens[:, a:b], memory=memory)
        logits.append(out.logits)
        memory = out.memory
    assert max_abs_diff(torch.cat(logits, 1), full.logits) < 1e-5


@pytest.mark.parametrize("name", list(MEMORY_MODELS))
def test_training_carries_memory_across_batches(name):
    model = build_lm(name).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = torch.randint(0, 23, (4 * 40,))
    memory, saw_aux = None, False
    for tokens in StreamBatches(stream, 4, 8):
        out = model(tokens, labels=tokens, memory=memory)
        assert torch.isfinite(out.loss)
        saw_aux |= out.aux_loss is not None
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        memory = out.memory
        assert all(not t.requires_grad for s in memory["layers"] for t in s.values()
                   if isinstance(t, torch.Tensor))
    assert saw_aux == (name == "compressive_transformer")
    assert memory["length"] == 40
    with pytest.raises(ValueError, match="memory"):
        model(stream[:16].view(2, 8), memory=memory)  # 4 streams in memory, batch of 2


@pytest.mark.parametrize("name", list(MEMORY_MODELS))
def test_generate_uses_the_memory_and_save_load(name, tmp_path):
    model = build_lm(name).eval()
    context = torch.randint(0, 23, (2, 30))
    memory = model(context).memory
    prompt = torch.randint(0, 23, (2, 3))
    out = model.generate(prompt, max_new_tokens=62, temperature=0, memory=memory)  # beyond max_len
    assert out.shape == (2, 65) and torch.equal(out[:, :3], prompt)
    # greedy continuation equals the argmax of one forward over context + generated text
    logits = model(torch.cat([context, out[:, :12]], 1)).logits
    assert torch.equal(logits[:, 32:-1].argmax(-1), out[:, 3:12])
    with torch.no_grad():  # the memory changes what the model predicts
        assert max_abs_diff(model.decode(prompt, memory)[0], model.decode(prompt)[0]) > 1e-4
    model.save_pretrained(tmp_path / "m")
    loaded = et.load_pretrained(tmp_path / "m")
    assert isinstance(loaded, MemoryLanguageModel)
    assert max_abs_diff(loaded.eval()(context).logits, model(context).logits) == 0


@pytest.mark.parametrize("name", list(MEMORY_MODELS))
@pytest.mark.parametrize("task", ["classify", "match"])
def test_classify_and_match(name, task, tmp_path):
    torch.manual_seed(0)
    model = et.build_model(name, task=task, vocab_size=23, num_classes=3, dim=32, depth=1, heads=2,
                           max_len=40, **MEMORY_MODELS[name])
    shape = (2, 30) if task == "classify" else (2, 2, 30)
    tokens, mask = torch.randint(0, 23, shape), torch.ones(shape, dtype=torch.bool)
    mask[..., 25:] = False
    out = model(tokens, mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    out.loss.backward()
    model.eval()
    noisy = torch.where(mask, tokens, torch.randint(0, 23, shape))
    assert max_abs_diff(model(tokens, mask=mask).logits, model(noisy, mask=mask).logits) < 1e-5
    model.save_pretrained(tmp_path / "c")
    assert max_abs_diff(et.load_pretrained(tmp_path / "c")(tokens, mask=mask).logits,
                        model(tokens, mask=mask).logits) == 0


def test_lm_refuses_absolute_positions():
    with pytest.raises(ValueError, match="positions"):
        et.build_model(NAME, task="lm", vocab_size=10, dim=16, depth=1, heads=2, positions="learned")


def test_stream_batches_keep_rows_contiguous():
    stream = torch.arange(103)
    batches = list(StreamBatches(stream, 4, 7))
    assert len(batches) == 4 and batches[0].shape == (4, 7) and batches[-1].shape == (4, 4)
    rows = torch.cat(batches, 1)
    assert torch.equal(rows, torch.arange(100).view(4, 25))
    assert len(StreamBatches(stream, 4, 7, drop_last=True)) == 3
    with pytest.raises(ValueError, match="stream"):
        StreamBatches(stream.view(1, -1), 4, 7)


def test_stream_loss_counts_every_prediction():
    model = build_lm(NAME).eval()
    tokens = torch.randint(0, 23, (2, 40))
    whole, _ = stream_loss(model, tokens, 40)
    chunked, _ = stream_loss(model, tokens, 6)
    assert abs(whole - chunked) < 1e-5


# ------------------------------------------------------------------------------ benchmark
def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_helps.py"
    spec = importlib.util.spec_from_file_location("memory_helps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copy_task_stream_layout():
    bench = load_benchmark()
    tokens, copy = bench.make_stream(3, 8, 10, torch.Generator().manual_seed(0))
    assert tokens.shape == copy.shape == (72,)
    idx = torch.nonzero(copy).squeeze(1)
    assert torch.equal(tokens[idx], tokens[idx - 16]) and int(copy.sum()) == 3 * 7


@pytest.mark.slow
def test_memory_helps_on_the_copy_task():
    """The answer lies two segments back: transformer_xl with memory must beat it without."""
    bench = load_benchmark()
    results = bench.run(steps=300, models=("xl", "none"))
    with_memory = results["transformer_xl mem_len=2L"][0]
    without = results["transformer_xl mem_len=0 (no memory)"][0]
    assert with_memory < 0.5 * without, results
