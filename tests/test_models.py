"""Models around the registered attentions: training, generation, save / load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.registry import attention_class

TINY = dict(vocab_size=11, dim=16, depth=2, heads=2, max_len=48)


def tiny_model(name, task, **kw):
    torch.manual_seed(0)
    options = {**attention_class(name).small_options, **kw}
    return et.build_model(name, task=task, **{**TINY, **options})


def task_for(name):
    return "lm" if et.attention_spec(name).decode else "classify"


def batch_for(task, n=24, b=4):
    tokens = torch.randint(0, TINY["vocab_size"], (b, n))
    if task == "lm":
        return tokens, tokens
    if task == "match":
        return torch.randint(0, TINY["vocab_size"], (b, 2, n)), (tokens[:, 0] % 2)
    return tokens, tokens[:, 0] % 2


def train_steps(model, batches, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for tokens, labels in batches:
        out = model(tokens, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("name", et.list_models())
def test_every_model_trains_a_few_steps_round_trips_and_copies(name, tmp_path):
    task = task_for(name)
    model = tiny_model(name, task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_steps(model, [batch_for(task) for _ in range(3)])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # right after a step, as EMA weights and torch.optim.swa_utils copy a model: the outputs
    # its last forward left on it (aux_loss, global states, still in a graph) are not copied
    twin = copy.deepcopy(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = et.load_pretrained(tmp_path / "ckpt")
    model.eval(), loaded.eval(), twin.eval()
    tokens, _ = batch_for(task)
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert torch.equal(model(tokens).logits, twin(tokens).logits)


@pytest.mark.parametrize("name", [n for n in et.list_models() if et.attention_spec(n).decode])
def test_incremental_decode_matches_full_forward(name):
    model = tiny_model(name, "lm").eval()
    tokens = torch.randint(0, 11, (2, 20))
    full = model(tokens).logits
    logits_a, state = model.decode(tokens[:, :7])
    logits_b, state = model.decode(tokens[:, 7:8], state)
    logits_c, _ = model.decode(tokens[:, 8:], state)
    assert torch.allclose(torch.cat([logits_a, logits_b, logits_c], 1), full, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in et.list_models() if et.attention_spec(n).decode])
def test_language_models_with_default_options_generate(name):
    # no small_options: what `build_model(name, task="lm")` gives a user must decode as it trains
    torch.manual_seed(0)
    model = et.build_model(name, task="lm", **TINY).eval()
    tokens = torch.randint(0, 11, (2, 13))
    logits, state = model.decode(tokens[:, :5])
    rest, _ = model.decode(tokens[:, 5:], state)
    assert torch.allclose(torch.cat([logits, rest], 1), model(tokens).logits, atol=1e-4)
    assert model.generate(tokens[:, :4], max_new_tokens=3).shape == (2, 7)
    for bad in (-1, float("nan"), True):  # every language model checks its sampling the same way
        with pytest.raises(ValueError, match="temperature"):
            model.generate(tokens[:, :4], max_new_tokens=3, temperature=bad)
    # and its decode state, before any compute: not a state, a shallower model's, another batch's
    for bad in ({"k": 1}, tokens):
        with pytest.raises(TypeError, match="state: expected None or the state"):
            model.decode(tokens[:, 5:6], bad)
    with pytest.raises(ValueError, match="state: expected 2 layer states, got 1"):
        model.decode(tokens[:, 5:6], {**state, "layers": state["layers"][:1]})
    with pytest.raises(ValueError, match="state: holds 2"):
        model.decode(tokens[:1, 5:6].expand(3, 1), state)
    with pytest.raises(ValueError, match="token ids"):
        model.decode(tokens[:, 5:6] + 11, state)


@pytest.mark.parametrize("name,options", [("axial_transformer", {}),
                                          ("image_transformer", {"mode": "2d"})])
def test_grid_language_models_fix_their_grid_from_max_len(name, options):
    model = et.build_model(name, task="lm", **{**TINY, "max_len": 30}, **options).eval()
    assert {block.attention.shape for block in model.encoder.blocks} == {(5, 6)}
    assert model.generate(torch.randint(0, 11, (2, 4)), max_new_tokens=3).shape == (2, 7)
    own = et.build_model(name, task="lm", shape=(3, 4), **{**TINY, "max_len": 12}, **options)
    assert own.encoder.blocks[0].attention.shape == (3, 4)
    classifier = et.build_model(name, task="classify", **{**TINY, "max_len": 30}, **options)
    assert classifier.encoder.blocks[0].attention.shape is None     # each length its own grid
    with pytest.raises(ValueError, match="max_len"):
        et.build_model(name, task="lm", **{**TINY, "max_len": 0}, **options)


def test_language_model_learns_a_toy_task():
    # repeat the first half: the second half of each sequence copies the first
    torch.manual_seed(0)
    model = et.build_model("transformer", task="lm", vocab_size=8, dim=32, depth=2, heads=2, max_len=16)
    def batch():
        half = torch.randint(0, 8, (16, 8))
        seq = torch.cat([half, half], 1)
        labels = seq.clone()
        labels[:, :9] = -100  # score only the copied part (targets 9..15)
        return seq, labels
    losses = train_steps(model, [batch() for _ in range(150)], lr=3e-3)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_learns_a_toy_task(pooling):
    # label = whether token 3 occurs in the sequence
    torch.manual_seed(0)
    model = et.build_model("transformer", task="classify", vocab_size=8, num_classes=2, dim=32,
                           depth=1, heads=2, max_len=12, pooling=pooling)
    def batch():
        tokens = torch.randint(0, 8, (32, 12))
        return tokens, (tokens == 3).any(1).long()
    losses = train_steps(model, [batch() for _ in range(120)], lr=3e-3)
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


def test_dual_encoder_combines_two_texts():
    model = et.build_model("transformer", task="match", vocab_size=11, dim=16, depth=1, heads=2,
                           max_len=10, num_classes=2)
    tokens = torch.randint(0, 11, (3, 2, 10))
    mask = torch.ones(3, 2, 10, dtype=torch.bool)
    mask[:, 1, 7:] = False
    out = model(tokens, mask=mask, labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (3, 2) and out.loss.ndim == 0
    swapped = model(tokens.flip(1), mask=mask.flip(1)).logits
    assert not torch.allclose(out.logits, swapped)  # [u, v, u*v, u-v] is ordered
    with pytest.raises(ValueError, match="tokens"):
        model(tokens[:, 0])


def test_decode_refuses_to_go_past_max_len():
    model = et.build_model("transformer", task="lm", vocab_size=11, dim=16, depth=1, heads=2,
                           max_len=8).eval()
    tokens = torch.randint(0, 11, (2, 5))
    _, state = model.decode(tokens)
    with pytest.raises(ValueError, match="tokens: 5 decoded \\+ 4 new exceed max_len=8"):
        model.decode(tokens[:, :4], state)


def test_generate_greedy_top_k_and_limits():
    torch.manual_seed(0)
    model = et.build_model("transformer", task="lm", vocab_size=11, dim=16, depth=1, heads=2, max_len=20)
    prompt = torch.randint(0, 11, (2, 5))
    greedy = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert greedy.shape == (2, 11) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=6, temperature=0))
    # greedy decode equals argmax of a full forward over the generated text
    logits = model(greedy[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), greedy[:, 5:])
    g = torch.Generator().manual_seed(1)
    sampled = model.generate(prompt, max_new_tokens=6, temperature=0.8, top_k=1, generator=g)
    assert torch.equal(sampled, greedy)  # top-1 sampling is greedy
    for tiny in (1e-30, 1e-45, 5e-324):   # scaled logits overflowed: NaN probabilities before
        assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=tiny), greedy)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, max_new_tokens=16)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            model.generate(prompt, max_new_tokens=2, temperature=bad)


def test_model_input_errors():
    model = et.build_model("transformer", task="classify", vocab_size=11, dim=16, depth=1, heads=2, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 4), 11))
    with pytest.raises(TypeError, match="tokens"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="task"):
        et.build_model("transformer", task="translate")
    # every builder (generic, reversible, sets) checks the shared arguments alike
    for name in ("transformer", "reformer", "set_transformer"):
        for bad in ({"dropout": "0.1"}, {"dropout": float("nan")}, {"dropout": 1.0},
                    {"mlp_dim": 0}, {"mlp_dim": -3}, {"dim": 0}):
            argument = next(iter(bad))
            with pytest.raises(ValueError, match=f"{argument}: expected"):
                et.build_model(name, task="classify", **bad)
    with pytest.raises(TypeError, match="valid options"):
        et.build_model("transformer", task="lm", windw=3)


LABEL_CASES = [("transformer", "classify"), ("transformer", "match"), ("transformer", "lm"),
               ("set_transformer", "classify"), ("transformer_xl", "lm"), ("reformer", "lm")]


def labelled_batch(name, task):
    model = et.build_model(name, task=task, vocab_size=11, num_classes=3, dim=16, depth=1,
                           heads=2, max_len=16)
    tokens = torch.randint(0, 11, (2, 2, 8) if task == "match" else (2, 8))
    return model, tokens, (tokens if task == "lm" else torch.tensor([0, 2]))


@pytest.mark.parametrize("name,task", LABEL_CASES)
def test_labels_are_checked_before_compute(name, task):
    """Out of range (a device-side assert on CUDA), negative other than -100, float, or of
    another shape: ValueError, with the tokens' one read of the device."""
    model, tokens, labels = labelled_batch(name, task)
    top = 11 if task == "lm" else 3
    for bad in (labels + top, labels - 5):
        with pytest.raises(ValueError, match=rf"labels: label ids \(or -100, ignored\) must lie in \[0, {top}\)"):
            model(tokens, labels=bad)
    for bad in (labels.float(), labels[:1], labels.bool()):
        with pytest.raises(ValueError, match="labels: expected an integer tensor of shape"):
            model(tokens, labels=bad)
    assert torch.isfinite(model(tokens, labels=labels.int()).loss)   # int32 ids are fine


@pytest.mark.parametrize("name,task", LABEL_CASES)
def test_a_batch_with_nothing_to_score_has_loss_zero(name, task):
    """Every label -100 (ignored): loss 0 and zero gradients, where a mean over nothing was NaN
    and reached the weights (and the trainer's evaluation sums)."""
    model, tokens, labels = labelled_batch(name, task)
    out = model(tokens, labels=torch.full_like(labels, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    scored = model(tokens, labels=labels).loss       # and a normal batch: the usual mean
    flat = model(tokens).logits
    if task == "lm":
        expected = torch.nn.functional.cross_entropy(flat[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    else:
        expected = torch.nn.functional.cross_entropy(flat, labels)
    assert abs(scored.item() - expected.item()) < 1e-5


def test_load_refuses_a_mismatched_checkpoint(tmp_path):
    model = et.build_model("transformer", task="lm", vocab_size=11, dim=16, depth=1, heads=2, max_len=8)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["depth"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        et.load_pretrained(tmp_path)
    config["depth"], config["dim"] = 1, 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shapes"):
        et.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        et.load_pretrained(tmp_path / "nowhere")


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    model = et.build_model("transformer", task="lm", vocab_size=11, dim=16, depth=1, heads=2, max_len=8)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["name"] == "transformer"
    assert (tmp_path / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors header


def test_aux_losses_are_added_to_the_loss():
    model = et.build_model("transformer", task="classify", vocab_size=11, dim=16, depth=2, heads=2, max_len=8)
    attn = model.encoder.blocks[0].attention
    original = attn.attend

    def attend_with_aux(x, mask):
        attn.aux_loss = torch.tensor(2.5)
        return original(x, mask)

    attn.attend = attend_with_aux
    tokens, labels = torch.randint(0, 11, (2, 8)), torch.tensor([0, 1])
    out = model(tokens, labels=labels)
    assert out.aux_loss.item() == 2.5
    attn.attend = original
    plain = model(tokens, labels=labels)
    assert plain.aux_loss is None
    assert torch.allclose(out.loss, plain.loss + 2.5)
