"""Linear attention with φ = elu + 1 fused with its input projection: one autograd node for
x -> q, k, v -> attention (Katharopoulos et al. 2020; the forms it fuses are in `kernels.py`,
which stays the reference: `linear_attention` non-causal, `causal_linear_attention` chunked).

Forward writes φ(q), φ(k) and v head-major into one (3, H, B, N, d) tensor, the only large
activation saved (the size of the projection it replaces): backward needs no feature maps
recomputed (elu' = min(φ, 1)) and runs its matmuls on contiguous operands. Each head's gradients
are projected straight back onto x and the weights, so neither (B, H, N, ·) activations nor a
(B, N, 3·H·d) gradient ever exist. Scratch tensors live for one call and are reused across heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import DEFAULT_CHUNK, compute_dtype
from .scratch import Scratch


class _HeadLayout:
    """Chunking of one head: rows (B, N) padded to (B, Np), Np = nc·C, viewed as T = B·nc chunks of
    C rows. Non-causal: one chunk of N rows (every query sees the same state)."""

    def __init__(self, b: int, n: int, causal: bool, chunk: int, dtype, device):
        self.b, self.n, self.causal, self.dtype = b, n, causal, dtype
        self.c = max(1, min(chunk, n)) if causal else n
        self.nc = -(-n // self.c)
        self.npad = self.nc * self.c
        self.tril = (torch.ones(self.c, self.c, dtype=dtype, device=device).tril()
                     if causal else None)                                       # (C, C)
        # [i, j] = 1 where chunk j is before chunk i: prefix sums as one matmul (a cumsum along
        # the chunk axis is several times slower on CPU)
        self.before = (torch.ones(self.nc, self.nc, dtype=dtype, device=device).tril(-1)
                       if causal else None)                                     # (nc, nc)

    def chunks(self, t: torch.Tensor) -> torch.Tensor:
        """(B, Np, r) -> (T, C, r), a view."""
        return t.view(self.b * self.nc, self.c, t.shape[-1])

    def rows(self, t: torch.Tensor, scratch: Scratch, name: str) -> torch.Tensor:
        """(B, N, r) -> (B, Np, r) in the compute dtype: t itself when it already is."""
        if self.npad == self.n and t.dtype == self.dtype:
            return t
        out = scratch(name, self.b, self.npad, t.shape[-1])
        out[:, :self.n].copy_(t)
        out[:, self.n:].zero_()
        return out

    def target(self, dest: torch.Tensor):
        """A (B, N, r) destination as (T, C, r) to compute into, or None: only non-causal (one
        chunk: in-place batched matmuls on strided chunks would loop over them) and only in the
        compute dtype."""
        return None if self.causal or dest.dtype != self.dtype else self.chunks(dest)

    def unrows(self, t: torch.Tensor) -> torch.Tensor:
        """(T, C, r) -> the (B, N, r) real rows, a view."""
        return t.view(self.b, self.npad, -1)[:, :self.n]

    def states(self, per_chunk: torch.Tensor, scratch: Scratch, name: str,
               reverse: bool = False) -> torch.Tensor:
        """(T, m, r) sums over each chunk -> the sums each chunk sees: causal, over the chunks
        before it (`reverse`: after it, for gradients); non-causal, the one chunk itself."""
        if not self.causal:
            return per_chunk
        t = per_chunk.view(self.b, self.nc, -1)                                  # (B, nc, m·r)
        order = self.before.T if reverse else self.before
        seen = torch.bmm(order.expand(self.b, -1, -1), t, out=scratch(name, *t.shape))
        return seen.view(per_chunk.shape)


def _elu_features_(x: torch.Tensor, out: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 = exp(min(x, 0)) + max(x, 0) into `out` (may be x; `low`: scratch of its
    shape). Its slope elu'(x) = exp(min(x, 0)) is exactly min(φ, 1)."""
    torch.clamp(x, max=0.0, out=low).exp_()
    return torch.clamp(x, min=0.0, out=out).add_(low)


def _bmm_t(x: torch.Tensor, y: torch.Tensor, scratch: Scratch, name: str) -> torch.Tensor:
    """(T, C, m), (T, C, r) -> xᵀ y (T, m, r), into scratch."""
    return torch.bmm(x.transpose(1, 2), y, out=scratch(name, x.shape[0], x.shape[2], y.shape[2]))


def _head_state(fq, fk, v, layout: _HeadLayout, scratch: Scratch, kept=None) -> dict:
    """One head's φ(q), φ(k) (zero for padded keys), v (T, C, ·) -> with them: the key states
    P = Σ φ(k) vᵀ (T, m, d) and p = Σ φ(k) (T, m, 1) each chunk sees (`kept`: [P | p] known
    already), the intra-chunk weights A (T, C, C) (causal, else None), the normaliser (T, C, 1)
    (1 where not positive, as `safe_divide`) and where it is positive "ok"."""
    f = dict(fq=fq, fk=fk, v=v, a=None)
    if kept is None:
        f["states"] = layout.states(_bmm_t(fk, v, scratch, "per_chunk"), scratch, "states")
        f["sums"] = layout.states(fk.sum(dim=1).unsqueeze(-1), scratch, "sums")
    else:
        f["states"], f["sums"] = kept[..., :-1], kept[..., -1:]
    den = torch.bmm(fq, f["sums"])                                           # (T, C, 1)
    if layout.causal:  # inside the chunk: the explicit lower-triangular product
        f["a"] = torch.bmm(fq, fk.transpose(1, 2), out=scratch("a", *fq.shape[:2], layout.c))
        den.add_(f["a"].mul_(layout.tril).sum(dim=-1, keepdim=True))
    f["ok"] = den > torch.finfo(den.dtype).tiny
    f["den"] = den.masked_fill_(~f["ok"], 1.0)
    return f


def _head_forward(f: dict, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (numerator, normaliser) of the head's output, (T, C, d) and (T, C, 1)."""
    num = torch.bmm(f["fq"], f["states"], out=scratch("num", *f["v"].shape))
    if f["a"] is not None:
        num.baddbmm_(f["a"], f["v"])
    return num, f["den"]


def _head_backward(f: dict, d_out: torch.Tensor, outs, layout: _HeadLayout, scratch: Scratch):
    """Gradient of one head's output (T, C, d) -> d_q, d_k, d_v (T, C, d), computed in `outs`
    where not None, else in scratch. d_den = -(d_num · num) / den without the numerator:
    d_num · φ(q) P = φ(q) · d_num Pᵀ, and d_num · A v = rowsum(A ∘ d_num vᵀ)."""
    fq, fk, vv, a = f["fq"], f["fk"], f["v"], f["a"]
    d_q, d_k, d_v = (scratch(name, *d_out.shape) if t is None else t
                     for t, name in zip(outs, ("d_q", "d_k", "d_v")))
    d_num = scratch("d_num", *d_out.shape)
    torch.div(d_out, f["den"], out=d_num)                                    # (T, C, d)
    torch.bmm(d_num, f["states"].transpose(1, 2), out=d_q)                  # d φ(q) until *slope
    d_den = torch.mul(fq, d_q, out=d_k).sum(dim=-1, keepdim=True)           # d_k: free until below
    if a is not None:
        d_a = torch.bmm(d_num, vv.transpose(1, 2), out=scratch("d_a", *a.shape))    # (T, C, C)
        d_den.add_(torch.mul(a, d_a, out=scratch("a_d_a", *a.shape)).sum(dim=-1, keepdim=True))
    d_den.div_(f["den"]).neg_().mul_(f["ok"])                                 # (T, C, 1)
    d_q.baddbmm_(d_den, f["sums"].transpose(1, 2))
    d_states = layout.states(_bmm_t(fq, d_num, scratch, "d_per_chunk"), scratch, "d_states", True)
    d_sums = layout.states(torch.bmm(fq.transpose(1, 2), d_den), scratch, "d_sums", True)
    torch.bmm(vv, d_states.transpose(1, 2), out=d_k).add_(d_sums.transpose(1, 2))  # d φ(k)
    torch.bmm(fk, d_states, out=d_v)
    if a is not None:
        d_a.add_(d_den).mul_(layout.tril)
        d_q.baddbmm_(d_a, fk)
        d_k.baddbmm_(d_a.transpose(1, 2), fq)
        d_v.baddbmm_(a.transpose(1, 2), d_num)
    slope = d_num                                     # elu' = min(φ, 1), 0 for padded keys
    d_q.mul_(torch.clamp(fq, max=1.0, out=slope))
    d_k.mul_(torch.clamp(fk, max=1.0, out=slope))
    return d_q, d_k, d_v


def _head_columns(qkv: torch.Tensor, heads: int, h: int):
    """qkv (B, N, 3·H·d) [q | k | v, heads inside each] -> head h's q, k, v (B, N, d), views."""
    d = qkv.shape[-1] // (3 * heads)
    dim = heads * d
    return tuple(qkv[..., i * dim + h * d:i * dim + (h + 1) * d] for i in range(3))


class _ProjectedEluLinearAttention(torch.autograd.Function):
    """x (B, N, dim), weight (3·H·d, dim), bias (3·H·d) or None -> (B, N, H·d): q, k, v =
    split(x Wᵀ + b), linear attention with φ = elu + 1, heads merged."""

    @staticmethod
    def forward(ctx, x, weight, bias, heads, key_mask, causal, chunk, dtype):
        b, n, _ = x.shape
        d = weight.shape[0] // (3 * heads)
        layout = _HeadLayout(b, n, causal, chunk, dtype, x.device)
        scratch = Scratch(x.new_empty(0, dtype=dtype))
        # the bias is added head by head below, in the pass that copies the head out (inside
        # the matmul it costs a broadcast copy and a read of the whole output); low precision
        # keeps it there, rounded as in nn.Linear
        fold = bias is not None and x.dtype == dtype
        qkv = F.linear(x, weight, None if fold else bias)                    # (B, N, 3·H·d)
        biases = bias.view(3, heads, d) if fold else None
        feats = x.new_empty(3, heads, b, layout.npad, d, dtype=dtype)       # φ(q), φ(k), v
        feats[..., n:, :] = 0.0                                              # padded rows
        padded = None if key_mask is None else ~key_mask[..., None]          # (B, N, 1)
        low = scratch("low", b, n, d)
        out = x.new_empty(b, n, heads * d)
        # non-causal: every query sees the same [P | p] per head, (H, B, m, d + 1): kept
        kept = None if causal else feats.new_empty(heads, b, d, d + 1)
        for h in range(heads):
            fq, fk, v = dests = [t[:, :n] for t in feats[:, h]]
            for i, (dest, src) in enumerate(zip(dests, _head_columns(qkv, heads, h))):
                if fold:
                    torch.add(src, biases[i, h], out=dest)
                else:
                    dest.copy_(src)
            _elu_features_(fq, fq, low)
            _elu_features_(fk, fk, low)
            if padded is not None:
                fk.masked_fill_(padded, 0.0)
            f = _head_state(*(layout.chunks(t) for t in feats[:, h]), layout, scratch)
            num, den = _head_forward(f, scratch)
            torch.div(layout.unrows(num), layout.unrows(den), out=out[..., h * d:(h + 1) * d])
            if kept is not None:
                torch.cat([f["states"], f["sums"]], dim=-1, out=kept[h])
        ctx.heads, ctx.causal, ctx.chunk, ctx.dtype = heads, causal, chunk, dtype
        ctx.save_for_backward(x, weight, feats, kept)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        x, weight, feats, kept = ctx.saved_tensors
        d_out = d_out.contiguous()                       # head columns view as chunks
        heads = ctx.heads
        b, n, dim = x.shape
        d = weight.shape[0] // (3 * heads)
        layout = _HeadLayout(b, n, ctx.causal, ctx.chunk, ctx.dtype, x.device)
        scratch = Scratch(feats.new_empty(0))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x2 = x.reshape(b * n, dim)
        d_x = None
        d_w = weight.new_empty(3, heads, d, dim) if need_w else None
        d_b = weight.new_empty(3, heads, d) if need_b else None
        grad = x.new_empty(b, n, 3, d)                   # one head's [d_q, d_k, d_v] per row
        per_head = weight.reshape(3, heads, d, dim)
        for h in range(heads):
            f = _head_state(*(layout.chunks(t) for t in feats[:, h]), layout, scratch,
                            None if kept is None else kept[h])
            d_o = layout.rows(d_out[..., h * d:(h + 1) * d], scratch, "d_in")
            slots = grad.unbind(2)
            for slot, g in zip(slots, _head_backward(f, layout.chunks(d_o),
                                                     [layout.target(t) for t in slots],
                                                     layout, scratch)):
                if g.data_ptr() != slot.data_ptr():
                    slot.copy_(layout.unrows(g))
            g2 = grad.view(b * n, 3 * d)
            if need_x:
                w_h = per_head[:, h].reshape(3 * d, dim)
                d_x = torch.mm(g2, w_h) if d_x is None else d_x.addmm_(g2, w_h)
            if need_w:
                d_w[:, h] = torch.mm(g2.T, x2).view(3, d, dim)
            if need_b:
                d_b[:, h] = g2.sum(dim=0).view(3, d)
        return (None if d_x is None else d_x.view_as(x),
                None if d_w is None else d_w.view_as(weight),
                None if d_b is None else d_b.view(-1), None, None, None, None, None)


def projected_elu_linear_attention(x: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor | None, heads: int, causal: bool = False,
                                   key_mask: torch.Tensor | None = None,
                                   chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """x (B, N, dim) -> (B, N, H·d): q, k, v = split_heads(x Wᵀ + b) (W (3·H·d, dim), q | k | v
    stacked), then `linear_attention` (non-causal) or `causal_linear_attention` (chunk_size
    positions per chunk) of φ(q), mask_features(φ(k), key_mask), v with φ = `elu_feature_map`,
    heads merged. Computed in `compute_dtype`, returned in x's dtype. Same values and gradients
    as those compositions; memory: see `_ProjectedEluLinearAttention`."""
    return _ProjectedEluLinearAttention.apply(x, weight, bias, heads, key_mask, causal,
                                              chunk_size, compute_dtype(x.dtype))
