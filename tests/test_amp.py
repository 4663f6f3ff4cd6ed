"""`functional.amp`: custom autograd nodes and torch.autocast."""

from __future__ import annotations

import pytest
import torch

from efficient_transformers.functional.amp import autocast_free, cast_like_autocast


class _Product(torch.autograd.Function):
    """a @ b, saving both: under autocast its forward would compute in bfloat16 and its
    backward (outside the autocast region) would mix bfloat16 and float32."""

    @staticmethod
    def forward(ctx, a, b):
        out = a @ b
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, g):
        a, b, out = ctx.saved_tensors
        return (g + 0 * out) @ b.T, a.T @ (g + 0 * out)


_FreeProduct = autocast_free(type("_FreeProduct", (_Product,), {}))


def test_an_undecorated_node_breaks_under_autocast():
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _Product.apply(a, b)
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_autocast_free_node_computes_in_its_inputs_dtype():
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _FreeProduct.apply(a, b)
    assert out.dtype == torch.float32 and torch.equal(out, a @ b)
    out.sum().backward()
    expected = torch.autograd.grad((a @ b).sum(), (a, b))
    assert torch.equal(a.grad, expected[0]) and torch.equal(b.grad, expected[1])


def test_cast_like_autocast():
    x, w = torch.randn(2, 3), torch.randn(3, 3)
    index = torch.arange(3)
    assert cast_like_autocast(x, None, index) == (x, None, index)          # autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cx, cw, none, cindex = cast_like_autocast(x, w, None, index)
    assert (cx.dtype, cw.dtype, none, cindex.dtype) == (torch.bfloat16, torch.bfloat16, None,
                                                        torch.long)
