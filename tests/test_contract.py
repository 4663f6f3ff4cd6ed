"""The contract of DESIGN.md, checked for every registered mechanism."""

from __future__ import annotations

import pkgutil
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import efficient_transformers as et
from efficient_transformers.zoo import SURVEY_TABLE, avoids_n_by_n
from helpers import (
    DIM, STATE_CHANGES_OFTEN, both_modes, max_abs_diff, random_mask, small_attention,
)

NAMES = et.list_attention()
DECODERS = [n for n in NAMES if et.attention_spec(n).decode]
NON_DECODERS = [n for n in NAMES if not et.attention_spec(n).decode]
LENGTHS = (1, 5, 37)
N = 37


@pytest.mark.parametrize("name", NAMES)
def test_spec_carries_the_survey_facts(name):
    spec, row = et.attention_spec(name), SURVEY_TABLE[name]
    assert (spec.name, spec.title, spec.complexity, spec.decode, spec.taxonomy) == (
        name, row.title, row.complexity, row.decode, row.taxonomy)
    assert spec.year == row.year and "arXiv" in spec.paper
    assert isinstance(spec.options, dict)


@pytest.mark.parametrize("name,causal", both_modes(NAMES))
@pytest.mark.parametrize("n", LENGTHS)
def test_output_shape(name, causal, n):
    attn = small_attention(name, causal=causal)
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    y = attn(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", DECODERS)
def test_strict_causality(name):
    attn = small_attention(name, causal=True)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    y = attn(x)
    for i in (0, 3, 8, 17, 30, N - 2):
        x2 = x.clone()
        x2[:, i + 1:] = torch.randn_like(x2[:, i + 1:]) * 3
        y2 = attn(x2)
        assert max_abs_diff(y[:, : i + 1], y2[:, : i + 1]) < 1e-9, f"future leaks into position {i}"
        assert max_abs_diff(y[:, i + 1:], y2[:, i + 1:]) > 1e-6, "output ignores the input"


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_matches_causal_forward(name, seed):
    attn = small_attention(name, causal=True)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=gen)
    full = attn(x)
    sizes, left = [], N
    while left:
        sizes.append(min(left, int(torch.randint(1, 9, (1,), generator=gen))))
        left -= sizes[-1]
    if seed == 1:
        sizes = [1] * N  # token by token
    outs, state, start = [], None, 0
    for size in sizes:
        y, state = attn.decode(x[:, start:start + size], state)
        outs.append(y)
        start += size
    assert max_abs_diff(torch.cat(outs, dim=1), full) < 1e-8, f"chunks {sizes}"


@pytest.mark.parametrize("name,causal", both_modes(NAMES))
def test_padding_invariance(name, causal):
    attn = small_attention(name, causal=causal)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, N, DIM, dtype=torch.float64, generator=gen)
    mask = random_mask(2, N, generator=gen)
    y = attn(x, mask)
    x2 = torch.where(mask[..., None], x, torch.randn_like(x) * 5)
    y2 = attn(x2, mask)
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()
    assert max_abs_diff(y[mask], y2[mask]) < 1e-9, "padded values change real outputs"
    all_real = torch.ones(2, N, dtype=torch.bool)
    assert max_abs_diff(attn(x, all_real), attn(x)) < 1e-9, "an all-True mask differs from None"


@pytest.mark.parametrize("name", NON_DECODERS)
def test_non_decoders_refuse_causal(name):
    with pytest.raises(ValueError, match="causal"):
        et.build_attention(name, dim=DIM, heads=2, causal=True)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_refused_before_compute(name):
    attn = small_attention(name)
    with pytest.raises(ValueError, match="x"):
        attn(torch.randn(N, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="x"):
        attn(torch.randn(2, N, DIM + 1, dtype=torch.float64))
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="mask"):
        attn(x, torch.ones(2, N + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        attn(x, torch.ones(2, N))
    with pytest.raises(TypeError, match="valid options"):
        et.build_attention(name, dim=DIM, heads=2, no_such_option=1)
    with pytest.raises(ValueError, match="dim"):
        et.build_attention(name, dim=DIM + 1, heads=2)
    if attn.max_len is not None:
        with pytest.raises(ValueError, match="max_len"):
            attn(torch.randn(1, attn.max_len + 1, DIM, dtype=torch.float64))


@pytest.mark.parametrize("name", DECODERS)
def test_decode_refuses_a_state_it_did_not_make(name):
    attn = small_attention(name, causal=True)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    _, state = attn.decode(x)
    with pytest.raises(ValueError, match="state: holds 2 sequences, x_new has batch 3"):
        attn.decode(torch.randn(3, 1, DIM, dtype=torch.float64), state)
    other = "transformer" if name != "transformer" else "performer"
    _, foreign = small_attention(other, causal=True).decode(x)
    for bad in (foreign, {"k": x}, x):
        with pytest.raises(TypeError, match="state: expected None or the state"):
            attn.decode(x[:, :1], bad)


@pytest.mark.parametrize("name", NAMES)
def test_decode_refused_where_not_claimed(name):
    attn = small_attention(name)
    with pytest.raises(ValueError, match="decode"):
        attn.decode(torch.randn(1, 3, DIM, dtype=torch.float64))


@pytest.mark.parametrize("name,causal", both_modes(NAMES))
def test_gradients_are_finite(name, causal):
    attn = small_attention(name, causal=causal, dtype=torch.float32).train()
    x = torch.randn(2, N, DIM, requires_grad=True)
    mask = random_mask(2, N)
    attn(x, mask).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in attn.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name,causal", both_modes(NAMES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_finite(name, causal, dtype):
    attn = small_attention(name, causal=causal, dtype=dtype).train()
    x = (torch.randn(2, N, DIM) * 4).to(dtype).requires_grad_()
    y = attn(x, random_mask(2, N))
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name,causal", both_modes(NAMES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_trains_and_decodes(name, causal, dtype):
    # float32 layer and input under torch.autocast: output in the autocast dtype and near the
    # float32 one (learnable patterns aside: a rounding may move a token to another bucket),
    # finite gradients (the custom nodes' backward runs outside the autocast region)
    attn = small_attention(name, causal=causal, dtype=torch.float32).eval()
    x = torch.randn(2, N, DIM, requires_grad=True)
    mask = random_mask(2, N)
    with torch.autocast("cpu", dtype=dtype):
        y = attn(x, mask)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in attn.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), pname
    if "LP" not in et.attention_spec(name).taxonomy:
        ref = attn(x.detach(), mask)[mask]
        assert max_abs_diff(y.float()[mask], ref) < 0.05 * ref.abs().max()
    if causal:
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            first, state = attn.decode(x[:, :5].detach())
            step, _ = attn.decode(x[:, 5:6].detach(), state)
        assert torch.isfinite(first).all() and torch.isfinite(step).all()


@pytest.mark.parametrize("name", NAMES)
def test_reproducible_under_a_seed(name):
    outs = []
    for _ in range(2):
        attn = small_attention(name, seed=7).train()
        torch.manual_seed(11)
        x = torch.randn(2, N, DIM, dtype=torch.float64)
        outs.append(attn(x))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name,causal", both_modes(NAMES))
def test_activation_checkpointing_changes_nothing(name, causal, reentrant):
    """torch.utils.checkpoint around the layer, in training, for several steps: the same outputs,
    gradients and state as without (the recompute neither redraws nor updates, and uses the state
    its forward used)."""
    runs = []
    for checkpointed in (False, True):
        attn = small_attention(name, causal=causal, **STATE_CHANGES_OFTEN.get(name, {})).train()
        steps = []
        for step in range(4):
            torch.manual_seed(step)
            x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
            mask = random_mask(2, N)
            y = (checkpoint(attn, x, mask, use_reentrant=reentrant) if checkpointed
                 else attn(x, mask))
            (y[mask] ** 2).sum().backward()
            grads = [x.grad] + [p.grad.clone() for p in attn.parameters() if p.grad is not None]
            attn.zero_grad()
            steps.append((y.detach(), grads))
        runs.append((steps, attn.state_dict()))
    # float64 rounding apart: the reentrant kind runs the forward without grad, where some
    # layers take another path (about 2e-16 off); a recompute with other state is off by ~0.1
    (plain, plain_state), (checked, checked_state) = runs
    for (y0, g0), (y1, g1) in zip(plain, checked):
        assert max_abs_diff(y0, y1) < 1e-12
        assert len(g0) == len(g1) and all(max_abs_diff(a, b) < 1e-12 for a, b in zip(g0, g1))
    for key, value in plain_state.items():
        assert max_abs_diff(value.double(), checked_state[key].double()) < 1e-12, key


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("name,causal", both_modes([n for n in NAMES if avoids_n_by_n(n)]))
def test_subquadratic_never_materialises_n_by_n(name, causal):
    n = 2048
    torch.manual_seed(0)
    attn = et.build_attention(name, dim=16, heads=1, causal=causal).train()
    x = torch.randn(1, n, 16, requires_grad=True)
    with LargestTensor() as spy:
        attn(x).sum().backward()
    assert spy.largest < n * n, f"{spy.op} made a tensor of {spy.largest} >= N² = {n * n} elements"


def test_dense_baseline_does_materialise_when_naive():
    # the spy itself works: the naive oracle builds N x N scores
    from efficient_transformers.functional.dense import naive_attention
    q = torch.randn(1, 1, 64, 8)
    with LargestTensor() as spy:
        naive_attention(q, q, q)
    assert spy.largest >= 64 * 64


# Options counted in positions (a window, block, bucket, stride, flange or memory). At or beyond
# the sequence length each means "all of it", so a value far beyond must give the same result as
# one just beyond, at no more cost (window=10**6 on 40 tokens used to take gigabytes).
BEYOND_LENGTH = 24                      # tokens; the options below compare 32 with 4096
POSITION_OPTIONS = [
    ("memory_compressed", "block_size", {}),
    ("image_transformer", "block_size", {}),
    ("image_transformer", "window", {}),
    ("image_transformer", "memory_flange", {"mode": "2d", "shape": (4, 6), "query_shape": (2, 3)}),
    ("image_transformer", "query_shape", {"mode": "2d", "shape": (4, 6), "memory_flange": (1, 2)}),
    ("sparse_transformer", "stride", {"summary_size": 4}),
    ("reformer", "bucket_size", {}),
    ("routing_transformer", "window", {}),
    ("sinkhorn_transformer", "block_size", {}),
    ("longformer", "window", {}),
    ("longformer", "dilation", {"window": 4}),
    ("etc", "window", {}),
    ("bigbird", "block_size", {}),
    ("transformer_xl", "mem_len", {"segment_len": 8}),
    ("compressive_transformer", "mem_len", {"segment_len": 8, "cmem_len": 4, "compression_rate": 2}),
    ("compressive_transformer", "cmem_len", {"segment_len": 8, "mem_len": 4, "compression_rate": 2}),
]


def run_with_option(name, causal, options, option, value):
    """(output at real rows, input gradient, largest tensor) of forward + backward in float64."""
    if option in ("memory_flange", "query_shape"):
        value = (value, value)
    torch.manual_seed(0)
    attn = et.build_attention(name, dim=DIM, heads=2, causal=causal, **options, **{option: value})
    attn = attn.double().eval()
    x = torch.randn(2, BEYOND_LENGTH, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, BEYOND_LENGTH, dtype=torch.bool)
    mask[1, -5:] = False
    with LargestTensor() as spy:
        y = attn(x, mask)
        (y[mask] ** 2).sum().backward()
    return y[mask].detach(), x.grad, spy


@pytest.mark.parametrize("name,option,options,causal",
                         [(*case, causal) for case in POSITION_OPTIONS
                          for causal in ((False, True) if et.attention_spec(case[0]).decode else (False,))])
def test_options_beyond_the_length_cost_what_the_length_allows(name, option, options, causal):
    y_near, g_near, near = run_with_option(name, causal, options, option, 32)
    y_far, g_far, far = run_with_option(name, causal, options, option, 4096)
    assert max_abs_diff(y_near, y_far) < 1e-12
    assert max_abs_diff(g_near, g_far) < 1e-12
    assert far.largest <= near.largest, \
        f"{option}=4096 made a tensor of {far.largest} elements ({far.op}), {option}=32 at most {near.largest}"


@pytest.mark.parametrize("name,option,options",
                         [case for case in POSITION_OPTIONS if et.attention_spec(case[0]).decode])
def test_decode_matches_the_forward_with_options_beyond_the_length(name, option, options):
    # the forward fits its blocks to the sequence it sees; decode, whose sequence grows, must
    # still agree with it chunk by chunk (a prompt, then 1, 3, 1, ... tokens)
    value = (4096, 4096) if option in ("memory_flange", "query_shape") else 4096
    torch.manual_seed(0)
    attn = et.build_attention(name, dim=DIM, heads=2, causal=True, **options, **{option: value})
    attn = attn.double().eval()
    x = torch.randn(2, BEYOND_LENGTH, DIM, dtype=torch.float64)
    full = attn(x)
    outs, state, start = [], None, 0
    for size in (5, 1, 3, 1, 6, 1, 7):
        y, state = attn.decode(x[:, start:start + size], state)
        outs.append(y)
        start += size
    assert max_abs_diff(torch.cat(outs, dim=1), full) < 1e-10


def clear_module_caches() -> None:
    """Empty the module-level caches of efficient_transformers.functional (`_NAME: dict`), so
    that what a test makes in them is made under its own grad mode."""
    import efficient_transformers.functional as functional

    for info in pkgutil.iter_modules(functional.__path__):
        module = sys.modules.get(f"{functional.__name__}.{info.name}")
        for attribute, value in vars(module).items() if module else ():
            if attribute.startswith("_") and attribute.isupper() and isinstance(value, dict):
                value.clear()


@pytest.mark.parametrize("name,causal", both_modes(NAMES))
def test_inference_mode_is_no_grad_for_later_training(name, causal):
    """Calls under torch.inference_mode (evaluation inside a training loop, the layer still in
    training mode) leave the layer as calls under torch.no_grad do: the training step after them
    gives the same outputs, gradients and state. A buffer or cache entry made in inference mode
    would be an inference tensor, which autograd cannot save ("Inference tensors cannot be saved
    for backward")."""
    runs = []
    for context in (torch.inference_mode, torch.no_grad):
        clear_module_caches()
        attn = small_attention(name, causal=causal, **STATE_CHANGES_OFTEN.get(name, {})).train()
        torch.manual_seed(0)
        x = torch.randn(2, N, DIM, dtype=torch.float64)
        mask = random_mask(2, N)
        with context():
            for _ in range(3):
                attn(x, mask)
            if causal:
                attn.decode(x[:, :5])
        x.requires_grad_()
        y = attn(x, mask)
        (y[mask] ** 2).sum().backward()
        grads = [x.grad] + [p.grad for p in attn.parameters() if p.grad is not None]
        runs.append((y.detach(), grads, attn.state_dict()))
    (y0, g0, s0), (y1, g1, s1) = runs
    assert max_abs_diff(y0, y1) == 0
    assert len(g0) == len(g1) and all(max_abs_diff(a, b) == 0 for a, b in zip(g0, g1))
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)


UNFUSED = {"linear_transformer": "fused", "routing_transformer": "fused_cpu"}  # the switches


@pytest.mark.parametrize("name,causal", both_modes(NAMES))
def test_a_second_backward_pass_gives_the_same_gradients(name, causal):
    """retain_graph=True, then a second backward through the same graph (two losses, a Jacobian
    row by row): the same gradients. A fused node that reuses its saved tensors as gradient
    buffers refuses the second pass, naming the switch to its unfused path, which takes it."""
    for fused in (True, False):
        attn = small_attention(name, causal=causal)
        if not fused:
            setattr(attn, UNFUSED[name], False)
        x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
        y = attn(x, random_mask(2, N))
        first = torch.autograd.grad(y[:, :9].sum(), x, retain_graph=True)[0]
        if fused and name in UNFUSED and not causal:
            with pytest.raises(RuntimeError, match=f"second backward.*{UNFUSED[name]} = False"):
                torch.autograd.grad(y[:, :9].sum(), x)
            continue
        assert max_abs_diff(torch.autograd.grad(y[:, :9].sum(), x)[0], first) == 0
        break


@pytest.mark.parametrize("name,causal", both_modes(NAMES))
def test_double_backward_is_right_or_refused(name, causal):
    """create_graph=True (a gradient penalty ||d(y·w)/dx||²): its gradient matches central
    finite differences, or the backward refuses with a clear error (ours for the custom nodes,
    torch's for SDPA's CPU kernel), never a silently missing second-order term."""
    long_segments = {"segment_len": 16} if name in ("transformer_xl", "compressive_transformer") else {}
    attn = small_attention(name, causal=causal, dim=8, heads=2, **long_segments)  # (XL: no detach)
    gen = torch.Generator().manual_seed(0)
    x, w, u = (torch.randn(1, 12, 8, dtype=torch.float64, generator=gen) for _ in range(3))

    def penalty(x):
        g, = torch.autograd.grad((attn(x) * w).sum(), x, create_graph=True)
        return (g ** 2).sum()

    try:
        h, = torch.autograd.grad(penalty(x.requires_grad_()), x)
    except RuntimeError as error:
        message = str(error)
        assert "no double backward" in message or (
            "derivative for aten::_scaled_dot_product" in message and "is not implemented" in message), message
        return
    eps = 1e-5
    with torch.enable_grad():
        fd = (penalty((x + eps * u).detach().requires_grad_())
              - penalty((x - eps * u).detach().requires_grad_())) / (2 * eps)
    assert abs((h * u).sum().item() - fd.item()) < 1e-6 * max(1.0, abs(fd.item()))
