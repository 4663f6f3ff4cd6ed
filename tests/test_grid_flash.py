"""`functional.grid_flash`: a union of grid lines as FlashAttention calls, against a dense oracle
(float64, values and gradients), and the layers that take it (axial, strided Sparse
Transformer) against their explicit line path."""

from __future__ import annotations

import math

import pytest
import torch

from efficient_transformers.attention.sparse_transformer import strided_grid_parts
from efficient_transformers.functional import grid_flash
from efficient_transformers.functional.axial import axial_parts, axis_relation
from efficient_transformers.functional.grid_flash import (grid_flash_attention, grid_pieces,
                                                          uses_grid_flash)
from helpers import max_abs_diff, small_attention


def relation(size: int, rule: str) -> torch.Tensor:
    if rule == "not_before":
        return torch.arange(size)[None, :] >= torch.arange(size)[:, None]
    return axis_relation(size, rule)


def union_mask(grid, parts) -> torch.Tensor:
    """(N, N) bool: the keys of the union of parts [(axis, rule, row offset)], checked disjoint."""
    rows, cols = grid
    i = torch.arange(rows * cols)
    r, c = i // cols, i % cols
    allowed = torch.zeros(len(i), len(i), dtype=torch.bool)
    for axis, rule, offset in parts:
        if axis == 1:
            part = (r[None, :] == r[:, None] + offset) & relation(cols, rule)[c[:, None], c[None, :]]
        else:
            part = (c[None, :] == c[:, None]) & relation(rows, rule)[r[:, None], r[None, :]]
        assert not (allowed & part).any(), "parts overlap"
        allowed |= part
    return allowed


def dense(q, k, v, allowed):
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v, lse


def axial_grid_parts(grid, causal):
    return [(axis, rule, -1 if previous else 0) for axis, rule, previous in axial_parts(grid, causal)]


PART_SETS = [("axial", False), ("axial", True), ("union", False), ("union", True),
             ("local", False), ("local", True), ("column", False), ("column", True)]


@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("grid", [(5, 8), (6, 6), (2, 3), (1, 7), (9, 1)])
@pytest.mark.parametrize("kind,causal", PART_SETS)
def test_grid_flash_equals_dense_oracle_with_gradients(grid, kind, causal, shared_keys,
                                                        monkeypatch):
    """Both forms, shared keys taken out again (the default) and every rule as its own pieces."""
    monkeypatch.setattr(grid_flash, "SHARED_KEYS", shared_keys)
    parts = (axial_grid_parts(grid, causal) if kind == "axial"
             else strided_grid_parts(causal, kind))
    allowed = union_mask(grid, parts)
    q, k, v = (torch.randn(2, 3, math.prod(grid), 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out, lse = grid_flash_attention(q, k, v, grid, parts)
    want, want_lse = dense(q, k, v, allowed)
    assert max_abs_diff(out, want) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert max_abs_diff(lse[finite], want_lse[finite]) < 1e-12
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    expected = torch.autograd.grad((want * g).sum(), (q, k, v))
    for a, b in zip(got, expected):
        assert max_abs_diff(a, b) < 1e-12


def test_rules_become_one_or_two_pieces():
    pieces = grid_pieces([(1, "all", 0), (0, "far", 0), (1, "not_before", -1)])
    assert [(p.axis, p.offset, p.direction, p.gap) for p in pieces] == [
        (1, 0, "all", 0), (0, 0, "before", 2), (0, 0, "after", 2), (1, -1, "after", 0)]


def test_column_rules_with_covered_keys_become_whole_columns():
    """"other" and "far" columns run whole where the keys they leave out are in row parts: the
    non-causal unions lose a piece and a reversed piece; the own position is shared."""
    axial, shared = grid_flash.shared_form(axial_grid_parts((5, 8), False), 8)
    assert sorted(axial) == [(0, "all", 0), (1, "all", 0)] and shared == (0,)
    union, shared = grid_flash.shared_form(strided_grid_parts(False, "union"), 8)
    assert sorted(union) == [(0, "all", 0), (1, "after", -1), (1, "all", 0), (1, "before", 1)]
    assert shared == (0,)
    before = grid_pieces(strided_grid_parts(False, "union"))
    after = grid_pieces(union)
    assert (len(before), len(after)) == (5, 4)
    assert [p.direction for p in after].count("after") == 1
    shared_rows = [(1, "all", 0), (1, "all", -1), (1, "all", 1), (0, "far", 0)]
    assert grid_flash.shared_form(shared_rows, 8) == (
        [(1, "all", 0), (1, "all", -1), (1, "all", 1), (0, "all", 0)], (-8, 0, 8))
    for parts in (axial_grid_parts((5, 8), True), strided_grid_parts(True, "union"),
                  [(0, "other", 0)], [(1, "before", 0), (0, "other", 0)],
                  [(1, "all", 0), (1, "all", -1), (0, "far", 0)]):   # row +1 not covered
        assert grid_flash.shared_form(parts, 8) == (parts, ())


@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("grid", [(5, 8), (2, 3), (1, 7), (9, 1)])
def test_shared_neighbour_rows_equal_the_oracle_with_gradients(grid, shared_keys, monkeypatch):
    """A far column beside whole neighbouring rows: three shared offsets (0, ±C)."""
    monkeypatch.setattr(grid_flash, "SHARED_KEYS", shared_keys)
    parts = [(1, "all", 0), (1, "all", -1), (1, "all", 1), (0, "far", 0)]
    allowed = union_mask(grid, parts)
    q, k, v = (torch.randn(2, 3, math.prod(grid), 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out, lse = grid_flash_attention(q, k, v, grid, parts)
    want, want_lse = dense(q, k, v, allowed)
    assert max_abs_diff(out, want) < 1e-12 and max_abs_diff(lse, want_lse) < 1e-12
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    expected = torch.autograd.grad((want * g).sum(), (q, k, v))
    for a, b in zip(got, expected):
        assert max_abs_diff(a, b) < 1e-12


@pytest.mark.parametrize("kind", ["axial", "union"])
def test_shared_keys_in_bf16_are_close_to_float64_with_gradients(kind):
    grid = (16, 16)
    parts = axial_grid_parts(grid, False) if kind == "axial" else strided_grid_parts(False, kind)
    assert grid_flash.shared_form(parts, 16)[1]
    q, k, v = (torch.randn(1, 2, 256, 16, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    g = torch.randn(1, 2, 256, 16, dtype=torch.float64)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out, _ = grid_flash_attention(*low, grid, parts)
    want, _ = dense(q, k, v, union_mask(grid, parts))
    got = torch.autograd.grad((out * g.bfloat16()).sum(), low)
    expected = torch.autograd.grad((want * g).sum(), (q, k, v))
    assert max_abs_diff(out.double(), want) < 2e-2 * want.abs().max().item()
    for a, b in zip(got, expected):
        assert max_abs_diff(a.double(), b) < 3e-2 * b.abs().max().item()


def test_bf16_is_close_to_float64():
    grid = (16, 16)
    parts = strided_grid_parts(False, "union")
    q, k, v = (torch.randn(1, 2, 256, 16, dtype=torch.float64) for _ in range(3))
    out, _ = grid_flash_attention(*(t.bfloat16() for t in (q, k, v)), grid, parts)
    want, _ = dense(q, k, v, union_mask(grid, parts))
    assert out.dtype == torch.bfloat16
    assert max_abs_diff(out.double(), want) < 2e-2 * want.abs().max().item()


def test_no_piece_left_gives_zero_and_minus_infinity():
    """Far column keys on a grid of 2 rows: no query has a key (out 0, lse −inf, gradient 0)."""
    q = torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    out, lse = grid_flash_attention(q, q, q, (2, 3), [(0, "far", 0)])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_refuses_a_grid_that_does_not_cover_n():
    q = torch.randn(1, 1, 10, 4)
    with pytest.raises(ValueError, match="grid: expected"):
        grid_flash_attention(q, q, q, (3, 3), [(1, "all", 0)])


def test_taken_on_cuda_only_unless_forced_and_never_with_a_mask(monkeypatch):
    q = torch.randn(1, 2, 16, 8)
    assert not uses_grid_flash(q)
    monkeypatch.setattr(grid_flash, "GRID_FLASH", True)
    assert uses_grid_flash(q)
    assert not uses_grid_flash(q, torch.ones(1, 16, dtype=torch.bool))


LAYERS = [("axial_transformer", {"shape": (4, 6)}), ("sparse_transformer", {}),
          ("sparse_transformer", {"combine": "split"})]


@pytest.mark.parametrize("name,options", LAYERS)
@pytest.mark.parametrize("causal", [False, True])
def test_layer_on_grid_flash_equals_its_line_path(name, options, causal, monkeypatch):
    """The layer with GRID_FLASH forced equals the same layer on its explicit line path."""
    layer = small_attention(name, causal=causal, dtype=torch.float64, **options)
    x = torch.randn(2, 24, layer.dim, dtype=torch.float64, requires_grad=True)
    (line_path, took_flash), (on_grid, took_grid) = (
        step_with(layer, x, forced, monkeypatch, wrt=(x, *layer.parameters()))
        for forced in (False, True))
    assert not took_flash and took_grid      # the path taken is the one asked for
    for a, b in zip(line_path, on_grid):
        assert max_abs_diff(a, b) < 1e-12


@pytest.mark.parametrize("name,options", LAYERS)
def test_causal_layer_on_grid_flash_is_strictly_causal_and_decodes_alike(name, options,
                                                                         monkeypatch):
    """The contract's causality and decode checks on the grid path (the contract's N = 37
    fills no grid of these layers, so it never takes this path)."""
    monkeypatch.setattr(grid_flash, "GRID_FLASH", True)
    layer = small_attention(name, causal=True, dtype=torch.float64, **options)
    x = torch.randn(2, 24, layer.dim, dtype=torch.float64)
    y = layer(x)
    for i in (0, 5, 11, 22):
        x2 = x.clone()
        x2[:, i + 1:] = torch.randn_like(x2[:, i + 1:]) * 3
        y2 = layer(x2)
        assert max_abs_diff(y[:, :i + 1], y2[:, :i + 1]) < 1e-12, f"future leaks into {i}"
        assert max_abs_diff(y[:, i + 1:], y2[:, i + 1:]) > 1e-6
    outs, state = [], None
    for start in range(0, 24, 5):
        out, state = layer.decode(x[:, start:start + 5], state)
        outs.append(out)
    assert max_abs_diff(torch.cat(outs, dim=1), y) < 1e-10


def step_with(layer, x, forced, monkeypatch, wrt):
    """((output, gradients of its squares' sum with respect to `wrt`), whether grid_flash ran)
    of one step with GRID_FLASH set to `forced`."""
    calls = []
    original = grid_flash._lines
    monkeypatch.setattr(grid_flash, "_lines", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(grid_flash, "GRID_FLASH", forced)
    y = layer(x)
    loss = y.to(torch.promote_types(y.dtype, torch.float32)).square().sum()   # bf16 in float32
    grads = torch.autograd.grad(loss, wrt)
    monkeypatch.setattr(grid_flash, "_lines", original)
    return (y, *grads), bool(calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,causal", PART_SETS)
def test_cuda_flash_kernels_match_the_oracle(kind, causal):
    """The CUDA FlashAttention forward and backward, called with the union's out and lse."""
    grid = (32, 64)
    parts = (axial_grid_parts(grid, causal) if kind == "axial"
             else strided_grid_parts(causal, kind))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, math.prod(grid), 64, generator=gen, dtype=torch.float64)
               for _ in range(3))
    qc, kc, vc = (t.cuda().bfloat16().requires_grad_() for t in (q, k, v))
    out, _ = grid_flash_attention(qc, kc, vc, grid, parts)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * g.cuda().bfloat16()).sum(), (qc, kc, vc))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    want, _ = dense(q, k, v, union_mask(grid, parts))
    expected = torch.autograd.grad((want * g).sum(), (q, k, v))
    assert max_abs_diff(out.double().cpu(), want) < 2e-2 * want.abs().max().item()
    for a, b in zip(got, expected):
        assert max_abs_diff(a.double().cpu(), b) < 3e-2 * b.abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,options", LAYERS)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_layer_takes_grid_flash_and_matches_its_line_path(name, options, causal, monkeypatch):
    """On CUDA bf16 (head dim 64) the layer takes grid_flash by itself; forced off, its explicit
    line path gives the same values and input gradients to bf16's precision."""
    layer = small_attention(name, causal=causal, dtype=torch.bfloat16, dim=128, heads=2,
                            **options).cuda()
    x = torch.randn(2, 24, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert uses_grid_flash(x.view(2, 24, 2, 64).transpose(1, 2))
    (on_grid, took_grid), (line_path, took_flash) = (
        step_with(layer, x, forced, monkeypatch, wrt=(x,)) for forced in (None, False))
    assert took_grid and not took_flash
    for a, b in zip(on_grid, line_path):
        assert max_abs_diff(a.float(), b.float()) < 3e-2 * b.float().abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,options", LAYERS[:2])
def test_cuda_grid_flash_inside_torch_compile(name, options):
    """Inductor on CUDA compiles the layers with their FlashAttention pieces: the compiled
    layer's values and input gradients are eager's, to bf16's precision."""
    layer = small_attention(name, dtype=torch.bfloat16, dim=128, heads=2, **options).cuda()
    compiled = torch.compile(layer)
    x = torch.randn(2, 24, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = []
    for run in (layer, compiled, compiled):
        y = run(x)
        results.append((y.float(), torch.autograd.grad(y.float().square().sum(), x)[0].float()))
    for y, g in results[1:]:
        assert max_abs_diff(y, results[0][0]) < 3e-2 * results[0][0].abs().max().item()
        assert max_abs_diff(g, results[0][1]) < 3e-2 * results[0][1].abs().max().item()


@pytest.mark.parametrize("name,options", LAYERS[:2])
def test_grid_path_compiles_and_equals_eager(name, options, monkeypatch):
    """torch.compile (Inductor's decompositions and partition, graphs run eagerly) through the
    autograd node and the CPU flash kernels: eager's values and gradients."""
    monkeypatch.setattr(grid_flash, "GRID_FLASH", True)
    layer = small_attention(name, dtype=torch.float64, **options)
    compiled = torch.compile(layer, backend="aot_eager_decomp_partition")
    x = torch.randn(2, 24, layer.dim, dtype=torch.float64, requires_grad=True)
    results = []
    for run in (layer, compiled):
        y = run(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x, *layer.parameters()))))
    for a, b in zip(*results):
        assert max_abs_diff(a, b) < 1e-12
