"""`sinkhorn_transformer`: Sparse Sinkhorn Attention (Tay et al. 2020).

Tay, Bahri, Yang, Metzler, Juan, "Sparse Sinkhorn Attention", ICML 2020, arXiv:2002.11296,
section 3:
- the sequence is cut into blocks of `block_size` (padded internally to a multiple); a sequence
  that fits in one block is one block of its own length (the same attention, without the padding);
- sorting network (SortNet): each block is summarised by the mean of its real tokens, projected
  per head into a query and a key summary; block-to-block scores R = s_q s_k^T / sqrt(d)
  (an attention-style SortNet that works for any number of blocks);
- Sinkhorn normalisation in log space for `sinkhorn_iters` iterations at `temperature`, with Gumbel
  noise added in training only -> a soft permutation P of the blocks (doubly stochastic in the limit);
- each block attends to its own block and to its sorted block sum_j P_ij (K_j, V_j):
  scores (N / s, s, 2 s), O(N s + (N / s)^2), never N x N;
- SortCut (`sortcut` = k > 0): every query attends only to the first k sorted blocks, O(N k s)
  (encoder only; clipped to the number of blocks).

Causal form (differs from the paper's causal Sinkhorn balancing): row i of P may only use blocks
j < i, which lie entirely in the past of every token of block i. Row i is scored with the summary of
the previous block i - 1 (so the own block's future tokens never enter its sorting), and is a
softmax over the past blocks only: column normalisation would need the rows of future blocks,
which would let the future change the past, so the causal matrix is row-stochastic (block 0 has no
sorted block). Inside the own block the mask is causal. Decode keeps the keys, values and summaries
of past blocks and the current partial block, and recomputes the rows of the blocks it touches.
Padding: padded tokens are left out of the block summaries, zeroed before the permutation, and
masked as keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.blocks import at_most, pad_mask_to_multiple, pad_to_multiple
from ..functional.sinkhorn import (
    block_means, causal_row_normalise, gumbel_noise, hard_block_order, sinkhorn_block_attention,
    sinkhorn_log, sortcut_attention,
)
from ..registry import register
from .base import Attention, check_number, check_positive_int


MIN_TEMPERATURE = 1e-6


@register("sinkhorn_transformer")
class SinkhornAttention(Attention):
    small_options = {"block_size": 4, "sinkhorn_iters": 5, "temperature": 0.75}

    def __init__(self, dim: int, heads: int, causal: bool = False, block_size: int = 128,
                 sinkhorn_iters: int = 8, temperature: float = 0.75, sortcut: int = 0):
        super().__init__(dim, heads, causal)
        check_positive_int("block_size", block_size)
        check_positive_int("sinkhorn_iters", sinkhorn_iters)
        # from 1e-6: the scores over a smaller one overflow float32 (the permutation is hard
        # long before, near 1e-2)
        check_number("temperature", temperature, MIN_TEMPERATURE)
        check_positive_int("sortcut", sortcut, minimum=0)
        if sortcut and causal:
            raise ValueError("sortcut: expected 0 with causal=True (SortCut truncates the sorted "
                             "sequence globally, so it is an encoder-only variant)")
        self.block_size, self.sinkhorn_iters = block_size, sinkhorn_iters
        self.temperature, self.sortcut = float(temperature), sortcut
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.sort_q = nn.Linear(dim, dim)  # SortNet: block summary -> per-head query summary
        self.sort_k = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block_size={self.block_size}, "
                f"sinkhorn_iters={self.sinkhorn_iters}, temperature={self.temperature}, "
                f"sortcut={self.sortcut}")

    def qkv(self, x):
        return self.split_projection(self.to_qkv(x), 3)

    def block_for(self, length: int) -> int:
        """The block over `length` positions: block_size, or the length itself when it fits in
        one block (one block either way: its sorted block is itself, or none when causal, and
        padding never counts, so only the cost of a block_size far beyond the length changes)."""
        return at_most(self.block_size, length)

    # ----------------------------------------------------------------------- sorting
    def block_scores(self, summaries: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """summaries (B, nb, dim) -> scores R (B, H, rows, nb). Causal row i uses summary i - 1."""
        sq = self.split_heads(self.sort_q(summaries))  # (B, H, nb, d)
        sk = self.split_heads(self.sort_k(summaries))
        if self.causal:
            sq = F.pad(sq, (0, 0, 1, 0))[:, :, :-1]  # row i <- summary of block i - 1
        if rows is not None:
            sq = sq[:, :, rows]
        return torch.matmul(sq, sk.transpose(-1, -2)) / math.sqrt(self.head_dim)

    def permutation(self, scores: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """scores (B, H, R, nb) -> soft permutation P (same shape), computed in float32 at least."""
        s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
        if self.training:
            s = s + gumbel_noise(s.shape, s.dtype, s.device)
        s = s / self.temperature
        if self.causal:
            return causal_row_normalise(s, first_row)
        return sinkhorn_log(s, self.sinkhorn_iters).exp()

    def sort_matrix(self, x, mask):
        """x (B, N, dim) -> padded xp (B, Np, dim), real (B, Np) and P (B, H, nb, nb)."""
        b, n, _ = x.shape
        s = self.block_for(n)
        real = pad_mask_to_multiple(mask, n, s, b, device=x.device)  # (B, Np)
        xp, _ = pad_to_multiple(x, s, dim=1)
        perm = self.permutation(self.block_scores(block_means(xp, real, s)))  # (B, H, nb, nb)
        return xp, real, perm

    def display_order(self, x):
        """x (1, N, dim) -> (N,): the blocks in head 0's hard sorted order (slot i takes block
        argmax_j P_ij, see `hard_block_order`), positions in order inside a block, padding dropped."""
        s = self.block_for(x.shape[1])
        blocks = hard_block_order(self.sort_matrix(x, None)[2][0, 0])  # (nb,)
        order = (blocks[:, None] * s + torch.arange(s, device=x.device)).reshape(-1)
        return order[order < x.shape[1]]

    # ----------------------------------------------------------------------- forward
    def attend(self, x, mask):
        b, n, _ = x.shape
        s = self.block_for(n)
        xp, real, perm = self.sort_matrix(x, mask)
        nb = xp.shape[1] // s
        q, k, v = self.qkv(xp)  # (B, H, Np, d)
        padded = mask is not None or nb * s != n  # known on the host: no wait for the device
        real_b = real.view(b, nb, s) if padded else None
        kb, vb = (t.reshape(b, self.heads, nb, s, -1) for t in (k, v))
        if self.sortcut:
            out = sortcut_attention(q, kb, vb, real_b, perm, min(self.sortcut, nb))
        else:
            qb = q.reshape(b, self.heads, nb, s, -1)
            out = sinkhorn_block_attention(qb, kb, vb, real_b, perm, self.causal)
            out = out.reshape(b, self.heads, nb * s, -1)
        return self.to_out(self.merge_heads(out[:, :, :n]))

    # ------------------------------------------------------------------------ decode
    def decode_step(self, x_new, state):
        b, t, dim = x_new.shape
        s, h = self.block_size, self.heads
        q, k, v = self.qkv(x_new)
        start = 0 if state is None else state["length"]
        end = start + t
        if state is not None:
            k = torch.cat([state["k"], k], dim=2)
            v = torch.cat([state["v"], v], dim=2)
        # summaries of the blocks of block_size completed so far (row i only needs blocks < i)
        partial = x_new if state is None else torch.cat([state["partial"], x_new], dim=1)
        done = partial.shape[1] // s
        summaries = state["summaries"] if state is not None else x_new.new_zeros(b, 0, dim)
        if done:
            ones = torch.ones(b, done * s, dtype=torch.bool, device=x_new.device)
            summaries = torch.cat([summaries, block_means(partial[:, : done * s], ones, s)], dim=1)
        partial = partial[:, done * s:]
        # attention blocks: while all `end` tokens fit in block 0, one block of length `end` (the
        # same block 0, so each token sees what the causal forward gives it); else block_size
        s = self.block_for(end)
        first, last = start // s, (end - 1) // s  # query blocks touched by this chunk
        rows = last - first + 1
        nb = last + 1
        summ = torch.cat([summaries, summaries.new_zeros(b, nb - summaries.shape[1], dim)], dim=1) \
            if summaries.shape[1] < nb else summaries[:, :nb]
        perm = self.permutation(self.block_scores(summ, slice(first, nb)), first_row=first)
        pad = nb * s - end
        kb = F.pad(k, (0, 0, 0, pad)).view(b, h, nb, s, -1)
        vb = F.pad(v, (0, 0, 0, pad)).view(b, h, nb, s, -1)
        real_b = None if pad == 0 else \
            (torch.arange(nb * s, device=x_new.device) < end).view(1, nb, s).expand(b, -1, -1)
        offset = start - first * s
        qb = F.pad(q, (0, 0, offset, rows * s - offset - t)).view(b, h, rows, s, -1)
        out = sinkhorn_block_attention(qb, kb, vb, real_b, perm, causal=True, first_row=first)
        out = out.reshape(b, h, rows * s, -1)[:, :, offset:offset + t]
        new_state = {"length": end, "k": k, "v": v, "summaries": summaries, "partial": partial}
        return self.to_out(self.merge_heads(out)), new_state
