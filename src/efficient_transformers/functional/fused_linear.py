"""Linear attention with φ = elu + 1 fused with its input projection: one autograd node for
x -> q, k, v -> attention (Katharopoulos et al. 2020; the forms it fuses are in `kernels.py`,
which stays the reference: `linear_attention` non-causal, `causal_linear_attention` chunked).

One autograd Function per form. Both save x, the weight and φ(q), φ(k), v (the size of the
projection they replace) as the only large activations: backward recomputes no feature map
(elu' = min(φ, 1)).

- Non-causal, `_ProjectedLinearAttention`: all heads at once. The projection's output
  (B, N, 3·H·d) becomes the features itself (φ applied in place on its q and k columns) and
  heads are strided views of it, so each product is one matmul batched over heads. Backward
  overwrites φ(q), φ(k), v with d_q, d_k, d_v as each stops being needed and projects that
  gradient back with one GEMM for x and one for the weight. So this node runs backward once:
  a second backward (retain_graph) raises, as for any saved tensor modified in place.
  `_ProjectedLinearAttentionOut` also absorbs the output projection (the layer's path): with
  U = φ(q) / φ(q) z and M_h = S_h Wo_hᵀ, y = U M + bo is one GEMM of the projection's size and
  the per-head products φ(q) S, and backward's d_num Sᵀ and φ(q)ᵀ d_num, are gone (d S = d M Wo).
- Causal, `_ProjectedCausalLinearAttention`: head by head, chunked. Forward writes φ(q), φ(k), v
  head-major into one (3, H, B, Np, d) tensor so that chunks are contiguous; each head's
  gradients are projected straight back onto x and the weights, so neither (B, H, N, ·)
  activations nor a (B, N, 3·H·d) gradient ever exist. Scratch tensors live for one call and
  are reused across heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .amp import autocast_free, cast_like_autocast
from .backward import first_order_only, single_backward
from .kernels import DEFAULT_CHUNK, compute_dtype, normaliser_ok
from .scratch import Scratch

# the non-causal nodes overwrite their saved tensors in backward (memory): one pass per graph
fused_backward = single_backward("use the layer's unfused path: `layer.fused = False`")


# ------------------------------------------------------------------------------ shared pieces
def _elu_features_(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 in place (x may be strided). Its slope elu'(x) = exp(min(x, 0)) is
    min(φ, 1)."""
    return F.elu(x, inplace=True).add_(1.0)


def _safe_normaliser_(den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normaliser -> (it with 1 where not `normaliser_ok`, in place, as `safe_divide`; the mask
    of where it is: its gradient flows only there)."""
    ok = normaliser_ok(den)
    return den.masked_fill_(~ok, 1.0), ok


# ------------------------------------------------------------- non-causal: all heads at once
def _heads(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """One batch element's projection (N, 3·H·d) -> q, k, v stacked (3, H, N, d): a view (row
    stride 3·H·d, head stride d) that batched matmuls read without copies."""
    return rows.view(rows.shape[0], 3, heads, -1).permute(1, 2, 0, 3)


def _states_and_normaliser(feats: torch.Tensor, states: torch.Tensor, heads: int):
    """feats (N, 3·H·d) [φ(q) | φ(k) | v] -> states (H, d, d + 1) = [S | z] = φ(k)ᵀ [v | 1]
    filled in; returns the normaliser φ(q) z (H, N, 1) (`_safe_normaliser_`) and its mask."""
    q, k, v = _heads(feats, heads)                                       # (H, N, d) each
    d = v.shape[-1]
    states[..., :d] = torch.bmm(k.transpose(1, 2), v)                    # S (H, d, d)
    states[..., d] = k.sum(dim=1)                                        # z (H, d)
    return _normaliser(feats, states, heads)


def _normaliser(feats, states, heads):
    """φ(q) z (H, N, 1) from filled states, through `_safe_normaliser_` (-> it, its mask).
    The matrix-vector product as row vector times matrix: several times faster on CPU."""
    q = _heads(feats, heads)[0]
    z_row = states[..., -1:].transpose(1, 2)                             # (H, 1, d)
    return _safe_normaliser_(torch.bmm(z_row, q.transpose(1, 2)).transpose(1, 2))


def _attend(feats: torch.Tensor, states: torch.Tensor, out: torch.Tensor, heads: int):
    """feats (N, 3·H·d) -> states filled in, out (N, H·d) = φ(q) S / φ(q) z."""
    den, _ = _states_and_normaliser(feats, states, heads)
    q = _heads(feats, heads)[0]
    d = q.shape[-1]
    # written straight into the merged-heads layout: an elementwise op with a strided out
    torch.div(torch.bmm(q, states[..., :d]), den, out=out.view(-1, heads, d).transpose(0, 1))


def _features_backward_(feats, states, den, ok, d_q, d_s, heads, d_k_out, d_v_out) -> None:
    """The common tail of both backward forms. d_q (H, N, d): the gradient of φ(q) through the
    numerator divided by the normaliser (taken over, any strides); d_s (H, d, d): the gradient
    of S -> feats overwritten with [d_q | d_k | d_v], the gradients of the projection. d_k_out,
    d_v_out: contiguous (H, N, d) scratch (d_v_out may share d_q's storage: it is written after
    d_q's last read). The normaliser's gradient d_den = -(φ(q) · d_q) / den needs no numerator
    (d_num · φ(q) S = φ(q) · d_num Sᵀ)."""
    q, k, v = _heads(feats, heads)                                       # (H, N, d) each
    z = states[..., -1:]                                                 # (H, d, 1)
    # (H, N, 1); the products in d_k_out, scratch until d_k is written there
    d_den = torch.mul(q, d_q, out=d_k_out).sum(dim=-1, keepdim=True)
    d_den.div_(den).neg_().mul_(ok)
    d_z = torch.bmm(d_den.transpose(1, 2), q)                            # (H, 1, d): zᵀ's
    d_q.addcmul_(d_den, z.transpose(1, 2))                               # d φ(q)
    q.clamp_(max=1.0).mul_(d_q)                                          # d_q = d φ(q) · elu'
    d_k = torch.bmm(v, d_s.transpose(1, 2), out=d_k_out).add_(d_z)       # d φ(k)
    torch.bmm(k, d_s, out=d_v_out)
    k.clamp_(max=1.0).mul_(d_k)                                          # 0 at padded keys
    v.copy_(d_v_out)


def _attend_backward_(feats, states, d_out, heads) -> None:
    """Backward of `_attend`: d_out (N, H, d) -> feats overwritten with the projection's
    gradient."""
    q = _heads(feats, heads)[0]
    d = q.shape[-1]
    den, ok = _normaliser(feats, states, heads)
    d_num = torch.div(d_out.transpose(0, 1), den)                        # (H, N, d)
    d_s = torch.bmm(q.transpose(1, 2), d_num)                            # (H, d, d)
    d_q = torch.bmm(d_num, states[..., :d].transpose(1, 2))              # d φ(q), S part
    _features_backward_(feats, states, den, ok, d_q, d_s, heads, d_num, d_q)  # d_num: free


@autocast_free
class _ProjectedLinearAttention(torch.autograd.Function):
    """Non-causal. x (B, N, dim), weight (3·H·d, dim), bias (3·H·d) or None -> (B, N, H·d):
    q, k, v = split(x Wᵀ + b), linear attention with φ = elu + 1, heads merged."""

    @staticmethod
    def forward(ctx, x, weight, bias, heads, key_mask, dtype):
        feats, states = _features(x, weight, bias, heads, key_mask, dtype)
        out = x.new_empty(*x.shape[:2], weight.shape[0] // 3)
        for i in range(x.shape[0]):  # batched matmuls over heads need one batch element's views
            _attend(feats[i], states[i], out[i], heads)
        ctx.heads = heads
        ctx.save_for_backward(x, weight, feats, states)
        return out

    @staticmethod
    @first_order_only
    @fused_backward
    def backward(ctx, d_out):
        x, weight, feats, states = ctx.saved_tensors
        b, n, _ = x.shape
        d_out = d_out.reshape(b, n, ctx.heads, -1)                           # (B, N, H, d)
        for i in range(b):
            _attend_backward_(feats[i], states[i], d_out[i], ctx.heads)
        return (*_projection_grads(ctx, x, weight, feats), None, None, None)


@autocast_free
class _ProjectedLinearAttentionOut(torch.autograd.Function):
    """Non-causal with the output projection absorbed: x (B, N, dim), weight, bias as above,
    out_weight (dim_out, H·d), out_bias (dim_out) or None -> (B, N, dim_out). With
    U = φ(q) / φ(q) z (B, N, H·d), y = Σ_h U_h S_h Wo_hᵀ + bo = U M + bo, M_h = S_h Wo_hᵀ
    (d × dim_out): one GEMM of the size of the output projection replaces it and the products
    φ(q) S (and, backward, d_num Sᵀ and φ(q)ᵀ d_num: d S = d M Wo)."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_weight, out_bias, heads, key_mask):
        b, n, _ = x.shape
        feats, states = _features(x, weight, bias, heads, key_mask, x.dtype)
        hd = weight.shape[0] // 3
        d = hd // heads
        wo = out_weight.view(-1, heads, d).permute(1, 2, 0)                 # (H, d, dim_out)
        u = x.new_empty(b, n, hd)
        mixes = x.new_empty(b, heads, d, wo.shape[-1])                       # M per batch element
        y = x.new_empty(b, n, wo.shape[-1])
        dens = x.new_empty(b, heads, n, 1)                                   # normalisers, saved
        oks = torch.empty(b, heads, n, 1, dtype=torch.bool, device=x.device)
        for i in range(b):
            dens[i], oks[i] = _states_and_normaliser(feats[i], states[i], heads)
            q = _heads(feats[i], heads)[0]
            torch.div(q, dens[i], out=u[i].view(n, heads, d).transpose(0, 1))  # U (N, H·d)
            torch.bmm(states[i][..., :d], wo, out=mixes[i])                  # M (H, d, dim_out)
            m = mixes[i].view(hd, -1)
            if out_bias is None:
                torch.mm(u[i], m, out=y[i])
            else:
                torch.addmm(out_bias, u[i], m, out=y[i])
        ctx.heads = heads
        ctx.save_for_backward(x, weight, feats, states, out_weight, dens, oks)
        ctx.u, ctx.mixes = u, mixes   # intermediates held here: backward frees them early
        return y

    @staticmethod
    @first_order_only
    @fused_backward
    def backward(ctx, d_y):
        x, weight, feats, states, out_weight, dens, oks = ctx.saved_tensors
        u, mixes = ctx.u, ctx.mixes
        del ctx.u, ctx.mixes
        b, n, _ = x.shape
        heads = ctx.heads
        hd = u.shape[-1]
        d = hd // heads
        wo_rows = out_weight.view(-1, heads, d).transpose(0, 1)             # (H, dim_out, d)
        d_wo = u.new_zeros(out_weight.shape[0], heads, d)                    # Wo's layout
        d_k = u.new_empty(heads, n, d)                                       # scratch
        for i in range(b):
            d_m = torch.mm(u[i].T, d_y[i]).view(heads, d, -1)                # (H, d, dim_out)
            d_u = torch.mm(d_y[i], mixes[i].view(hd, -1).T, out=u[i])        # (N, H·d), over U
            d_s = torch.bmm(d_m, wo_rows)                                    # (H, d, d)
            d_wo.transpose(0, 1).baddbmm_(d_m.transpose(1, 2), states[i][..., :d])
            d_q = d_u.view(n, heads, d).transpose(0, 1).div_(dens[i])        # (H, N, d), a view
            _features_backward_(feats[i], states[i], dens[i], oks[i], d_q, d_s, heads, d_k,
                                d_u.view(heads, n, d))                       # d_v in d_u's storage
        # scratch and the forward's intermediates freed before the projection's gradient GEMMs
        del d_u, d_q, d_k, u, mixes
        d_x, d_w, d_b = _projection_grads(ctx, x, weight, feats)
        need_wo, need_bo = ctx.needs_input_grad[3:5]
        return (d_x, d_w, d_b, d_wo.view(out_weight.shape) if need_wo else None,
                d_y.sum(dim=(0, 1)) if need_bo else None, None, None)


def _features(x, weight, bias, heads, key_mask, dtype):
    """-> feats (B, N, 3·H·d) = [φ(q) | φ(k) | v] of x Wᵀ + b in `dtype` (padded keys' φ(k) 0)
    and an empty states tensor (B, H, d, d + 1)."""
    hd = weight.shape[0] // 3                                                # H·d
    # bias inside the GEMM; low precision: rounded as in nn.Linear, then computed in dtype
    feats = F.linear(x, weight, bias).to(dtype)                              # (B, N, 3·H·d)
    _elu_features_(feats[..., :2 * hd])                                      # φ(q), φ(k)
    if key_mask is not None:                                                 # padded keys
        feats[..., hd:2 * hd].masked_fill_(~key_mask[..., None], 0.0)
    d = hd // heads
    return feats, feats.new_empty(x.shape[0], heads, d, d + 1)


def _projection_grads(ctx, x, weight, feats):
    """The projection's gradient now in feats (B, N, 3·H·d) -> d x, d weight, d bias (one GEMM
    each, None where not needed)."""
    b, n, dim = x.shape
    grad = feats.view(b * n, -1).to(x.dtype)                                 # (B·N, 3·H·d)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (grad.mm(weight).view_as(x) if need_x else None,
            grad.T.mm(x.reshape(b * n, dim)) if need_w else None,
            grad.sum(dim=0) if need_b else None)


# --------------------------------------------------------------- causal: head by head, chunked
class _HeadLayout:
    """Chunking of one head: rows (B, N) padded to (B, Np), Np = nc·C, viewed as T = B·nc chunks of
    C rows."""

    def __init__(self, b: int, n: int, chunk: int, dtype, device):
        self.b, self.n, self.dtype = b, n, dtype
        self.c = max(1, min(chunk, n))
        self.nc = -(-n // self.c)
        self.npad = self.nc * self.c
        self.tril = torch.ones(self.c, self.c, dtype=dtype, device=device).tril()   # (C, C)
        # [i, j] = 1 where chunk j is before chunk i: prefix sums as one matmul (a cumsum along
        # the chunk axis is several times slower on CPU)
        self.before = torch.ones(self.nc, self.nc, dtype=dtype, device=device).tril(-1)

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

    def unrows(self, t: torch.Tensor) -> torch.Tensor:
        """(T, C, r) -> the (B, N, r) real rows, a view."""
        return t.view(self.b, self.npad, -1)[:, :self.n]

    def states(self, per_chunk: torch.Tensor, scratch: Scratch, name: str,
               reverse: bool = False) -> torch.Tensor:
        """(T, m, r) sums over each chunk -> the sums over the chunks before each chunk
        (`reverse`: after it, for gradients)."""
        t = per_chunk.view(self.b, self.nc, -1)                                  # (B, nc, m·r)
        order = self.before.T if reverse else self.before
        seen = torch.bmm(order.expand(self.b, -1, -1), t, out=scratch(name, *t.shape))
        return seen.view(per_chunk.shape)


def _bmm_t(x: torch.Tensor, y: torch.Tensor, scratch: Scratch, name: str) -> torch.Tensor:
    """(T, C, m), (T, C, r) -> xᵀ y (T, m, r), into scratch."""
    return torch.bmm(x.transpose(1, 2), y, out=scratch(name, x.shape[0], x.shape[2], y.shape[2]))


def _head_state(fq, fk, v, layout: _HeadLayout, scratch: Scratch) -> dict:
    """One head's φ(q), φ(k) (zero for padded keys), v (T, C, ·) -> with them: the key states
    P = Σ φ(k) vᵀ (T, m, d) and p = Σ φ(k) (T, m, 1) each chunk sees, the intra-chunk weights
    A (T, C, C), the normaliser (T, C, 1) (1 where not positive, as `safe_divide`) and where it
    is positive "ok"."""
    f = dict(fq=fq, fk=fk, v=v)
    f["states"] = layout.states(_bmm_t(fk, v, scratch, "per_chunk"), scratch, "states")
    f["sums"] = layout.states(fk.sum(dim=1).unsqueeze(-1), scratch, "sums")
    den = torch.bmm(fq, f["sums"])                                           # (T, C, 1)
    # inside the chunk: the explicit lower-triangular product
    f["a"] = torch.bmm(fq, fk.transpose(1, 2), out=scratch("a", *fq.shape[:2], layout.c))
    den.add_(f["a"].mul_(layout.tril).sum(dim=-1, keepdim=True))
    f["den"], f["ok"] = _safe_normaliser_(den)
    return f


def _head_forward(f: dict, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (numerator, normaliser) of the head's output, (T, C, d) and (T, C, 1)."""
    num = torch.bmm(f["fq"], f["states"], out=scratch("num", *f["v"].shape))
    num.baddbmm_(f["a"], f["v"])
    return num, f["den"]


def _head_backward(f: dict, d_out: torch.Tensor, layout: _HeadLayout, scratch: Scratch):
    """Gradient of one head's output (T, C, d) -> d_q, d_k, d_v (T, C, d) in scratch.
    d_den = -(d_num · num) / den without the numerator: d_num · φ(q) P = φ(q) · d_num Pᵀ, and
    d_num · A v = rowsum(A ∘ d_num vᵀ)."""
    fq, fk, vv, a = f["fq"], f["fk"], f["v"], f["a"]
    d_q, d_k, d_v = (scratch(name, *d_out.shape) for name in ("d_q", "d_k", "d_v"))
    d_num = scratch("d_num", *d_out.shape)
    torch.div(d_out, f["den"], out=d_num)                                    # (T, C, d)
    torch.bmm(d_num, f["states"].transpose(1, 2), out=d_q)                  # d φ(q) until *slope
    d_den = torch.mul(fq, d_q, out=d_k).sum(dim=-1, keepdim=True)           # d_k: free until below
    d_a = torch.bmm(d_num, vv.transpose(1, 2), out=scratch("d_a", *a.shape))    # (T, C, C)
    d_den.add_(torch.mul(a, d_a, out=scratch("a_d_a", *a.shape)).sum(dim=-1, keepdim=True))
    d_den.div_(f["den"]).neg_().mul_(f["ok"])                                 # (T, C, 1)
    d_q.baddbmm_(d_den, f["sums"].transpose(1, 2))
    d_states = layout.states(_bmm_t(fq, d_num, scratch, "d_per_chunk"), scratch, "d_states", True)
    d_sums = layout.states(torch.bmm(fq.transpose(1, 2), d_den), scratch, "d_sums", True)
    torch.bmm(vv, d_states.transpose(1, 2), out=d_k).add_(d_sums.transpose(1, 2))  # d φ(k)
    torch.bmm(fk, d_states, out=d_v)
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


@autocast_free
class _ProjectedCausalLinearAttention(torch.autograd.Function):
    """Causal, chunk positions per chunk. x (B, N, dim), weight (3·H·d, dim), bias (3·H·d) or
    None -> (B, N, H·d): q, k, v = split(x Wᵀ + b), causal linear attention with φ = elu + 1,
    heads merged."""

    @staticmethod
    def forward(ctx, x, weight, bias, heads, key_mask, chunk, dtype):
        b, n, _ = x.shape
        d = weight.shape[0] // (3 * heads)
        layout = _HeadLayout(b, n, chunk, dtype, x.device)
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
        out = x.new_empty(b, n, heads * d)
        for h in range(heads):
            fq, fk, v = dests = [t[:, :n] for t in feats[:, h]]
            for i, (dest, src) in enumerate(zip(dests, _head_columns(qkv, heads, h))):
                if fold:
                    torch.add(src, biases[i, h], out=dest)
                else:
                    dest.copy_(src)
            _elu_features_(fq)
            _elu_features_(fk)
            if padded is not None:
                fk.masked_fill_(padded, 0.0)
            f = _head_state(*(layout.chunks(t) for t in feats[:, h]), layout, scratch)
            num, den = _head_forward(f, scratch)
            torch.div(layout.unrows(num), layout.unrows(den), out=out[..., h * d:(h + 1) * d])
        ctx.heads, ctx.chunk, ctx.dtype = heads, chunk, dtype
        ctx.save_for_backward(x, weight, feats)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, d_out):
        x, weight, feats = ctx.saved_tensors
        d_out = d_out.contiguous()                       # head columns view as chunks
        heads = ctx.heads
        b, n, dim = x.shape
        d = weight.shape[0] // (3 * heads)
        layout = _HeadLayout(b, n, ctx.chunk, ctx.dtype, x.device)
        scratch = Scratch(feats.new_empty(0))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x2 = x.reshape(b * n, dim)
        d_x = None
        d_w = weight.new_empty(3, heads, d, dim) if need_w else None
        d_b = weight.new_empty(3, heads, d) if need_b else None
        grad = x.new_empty(b, n, 3, d)                   # one head's [d_q, d_k, d_v] per row
        per_head = weight.reshape(3, heads, d, dim)
        for h in range(heads):
            f = _head_state(*(layout.chunks(t) for t in feats[:, h]), layout, scratch)
            d_o = layout.rows(d_out[..., h * d:(h + 1) * d], scratch, "d_in")
            for slot, g in zip(grad.unbind(2), _head_backward(f, layout.chunks(d_o), layout,
                                                              scratch)):
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
                None if d_b is None else d_b.view(-1), None, None, None, None)


def projected_elu_linear_attention(x: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor | None, heads: int, causal: bool = False,
                                   key_mask: torch.Tensor | None = None,
                                   chunk_size: int = DEFAULT_CHUNK,
                                   out_weight: torch.Tensor | None = None,
                                   out_bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, N, dim) -> (B, N, H·d): q, k, v = split_heads(x Wᵀ + b) (W (3·H·d, dim), q | k | v
    stacked), then `linear_attention` (non-causal) or `causal_linear_attention` (chunk_size
    positions per chunk) of φ(q), mask_features(φ(k), key_mask), v with φ = `elu_feature_map`,
    heads merged. Computed in `compute_dtype`, returned in x's dtype. With `out_weight`
    (dim_out, H·d) and `out_bias`, followed by that output projection -> (B, N, dim_out),
    absorbed into the attention where the form allows it (non-causal, x already in the compute
    dtype). Same values and gradients as those compositions; memory: see the module's
    docstring. Under autocast, x and the weights are first cast to its dtype, as for nn.Linear."""
    x, weight, bias, out_weight, out_bias = cast_like_autocast(x, weight, bias, out_weight,
                                                               out_bias)
    dtype = compute_dtype(x.dtype)
    if out_weight is not None and not causal and x.dtype == dtype:
        return _ProjectedLinearAttentionOut.apply(x, weight, bias, out_weight, out_bias, heads,
                                                  key_mask)
    if causal:
        out = _ProjectedCausalLinearAttention.apply(x, weight, bias, heads, key_mask,
                                                    chunk_size, dtype)
    else:
        out = _ProjectedLinearAttention.apply(x, weight, bias, heads, key_mask, dtype)
    return out if out_weight is None else F.linear(out, out_weight, out_bias)
