"""Shared test helpers: build any registered attention at a small size."""

from __future__ import annotations

import torch

import efficient_transformers as et
from efficient_transformers.registry import attention_class

DIM, HEADS = 16, 2
# options under which a layer's training forward changes its state at every step or two
STATE_CHANGES_OFTEN = {"performer": {"redraw_interval": 2}, "routing_transformer": {"decay": 0.5}}


def small_attention(name: str, causal: bool = False, dtype=torch.float64, seed: int = 0,
                    dim: int = DIM, heads: int = HEADS, **options):
    """The mechanism with its `small_options` (several blocks / buckets at N ~ 8..64), in eval mode."""
    torch.manual_seed(seed)
    merged = {**attention_class(name).small_options, **options}
    attn = et.build_attention(name, dim=dim, heads=heads, causal=causal, **merged)
    return attn.to(dtype).eval()


def random_mask(batch: int, n: int, generator=None) -> torch.Tensor:
    """(B, N) bool with about a third padded, position 0 of row 0 and the last of row 1 padded."""
    mask = torch.rand(batch, n, generator=generator) > 0.33
    mask[0, 0] = False
    mask[-1, -1] = False
    mask[:, n // 2] = True  # every row keeps real tokens
    return mask


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_classifier_trains(name: str, **options) -> None:
    """A 2-layer classifier of mechanism `name` lowers its loss on one batch of 33 tokens."""
    torch.manual_seed(0)
    model = et.build_model(name, task="classify", vocab_size=13, dim=DIM, depth=2, heads=HEADS,
                           max_len=40, **options)
    tokens = torch.randint(0, 13, (4, 33))
    losses = train_losses(model, tokens, tokens[:, 0] % 2, lr=1e-2)
    assert losses[-1] < losses[0]


def train_losses(model, tokens, labels, steps: int = 6, lr: float = 3e-3,
                 optimizer=torch.optim.AdamW) -> list[float]:
    """`steps` optimizer steps on one batch; the loss before each step."""
    opt = optimizer(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(tokens, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_values_and_gradients_match(fast, slow, params, real=None, tol=1e-10, grad_tol=None):
    """`fast` equals `slow` at the `real` positions (a bool tensor broadcastable to their shape;
    None: everywhere), and so do their gradients w.r.t. `params` under one random upstream
    gradient that is zero off the real positions. `grad_tol` defaults to `tol`."""
    if real is None:
        assert max_abs_diff(fast, slow) < tol
        up = torch.randn_like(fast)
    else:
        sel = real.expand_as(fast)
        assert max_abs_diff(fast[sel], slow[sel]) < tol
        up = torch.randn_like(fast) * sel
    grad_tol = tol if grad_tol is None else grad_tol
    for a, b in zip(torch.autograd.grad(fast, params, up), torch.autograd.grad(slow, params, up)):
        assert max_abs_diff(a, b) < grad_tol


def linear_attention_oracle(attn, x, mask):
    """A kernel mechanism's definition computed naively from the layer's own projections and
    feature map: the dense (N x N) feature-space weights, masked, normalised per row."""
    from efficient_transformers.functional.dense import dense_allowed
    from efficient_transformers.functional.kernels import naive_linear_attention

    q, k, v = attn.qkv(x)
    phi_q, phi_k, log_scale = attn.feature_maps(q, k, mask)
    if log_scale is not None:
        phi_k = phi_k * log_scale.exp()[..., None]
    out = naive_linear_attention(phi_q, phi_k, v, dense_allowed(x.shape[1], attn.causal, mask))
    return attn.to_out(attn.merge_heads(out))


def assert_equals_dense_attention(attn, x, mask, tol=1e-12):
    """attn (a layer with `qkv`, `merge_heads`, `to_out`) equals plain softmax attention over the
    same projections, with the padding mask (at real positions) and without it."""
    from efficient_transformers.functional.dense import sdpa_attention

    q, k, v = attn.qkv(x)
    dense = attn.to_out(attn.merge_heads(sdpa_attention(q, k, v, causal=attn.causal, key_mask=mask)))
    assert max_abs_diff(attn(x, mask)[mask], dense[mask]) < tol
    dense = attn.to_out(attn.merge_heads(sdpa_attention(q, k, v, causal=attn.causal)))
    assert max_abs_diff(attn(x), dense) < tol


def both_modes(names):
    """(name, causal) pairs: every name, and causal too where the mechanism decodes."""
    return [(n, False) for n in names] + [(n, True) for n in names if et.attention_spec(n).decode]


def has_cpp_compiler() -> bool:
    """Inductor on the CPU compiles C++."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
