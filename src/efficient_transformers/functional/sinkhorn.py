"""Sinkhorn sorting of blocks and block-sparse attention over softly permuted blocks.

Tay, Bahri, Yang, Metzler, Juan, "Sparse Sinkhorn Attention" (ICML 2020, arXiv:2002.11296),
section 3: the sequence is cut into blocks, a sorting network scores block against block, the
score matrix R is made (approximately) doubly stochastic by Sinkhorn normalisation in log space,
S^0 = (R + Gumbel noise) / temperature, S^{k+1} = F_c(F_r(S^k)) (row then column log-normalisation),
and the soft permutation P = exp(S) mixes the key / value blocks; each block attends to its own
block and its sorted block. SortCut truncates the sorted sequence to its first k blocks.

Pure tensor code. Block shapes: (B, H, n_blocks, block, d); P (B, H, n_rows, n_blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kmeans import block_sdpa


def gumbel_noise(shape, dtype, device) -> torch.Tensor:
    """Standard Gumbel samples from torch's RNG (seeded by torch.manual_seed)."""
    u = torch.rand(shape, dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny
    u = u.clamp(tiny, 1.0 - torch.finfo(dtype).eps)
    return -torch.log((-torch.log(u)).clamp_min(tiny))


def sinkhorn_log(log_alpha: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn normalisation in log space over the last two axes (square matrices).

    Each iteration subtracts the row log-sum-exp, then the column log-sum-exp, so after the last
    iteration every column sums to 1 and the rows approach 1 as `iters` grows. -> log P.
    A half-step x − logsumexp(x) along one axis is `log_softmax` along it: one aten call forward
    and one backward (its saved output gives the gradient, dx = dy − exp(y)·sum(dy)), where the
    composition takes two forward and about four backward (on a GPU each call is host time).
    `sinkhorn_log_reference` is that composition.
    """
    x = log_alpha
    for _ in range(iters):
        x = torch.log_softmax(torch.log_softmax(x, dim=-1), dim=-2)
    return x


def sinkhorn_log_reference(log_alpha: torch.Tensor, iters: int) -> torch.Tensor:
    """`sinkhorn_log` as subtractions of log-sum-exps, through autograd (for tests)."""
    for _ in range(iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha


def causal_row_normalise(scores: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """Causal sorting: row i (absolute block first_row + r) is a softmax over the blocks j < i.

    scores (..., R, M) -> P (..., R, M) with P[r, j] = 0 for j >= first_row + r; the rows of
    block 0 (no past) are all 0. Column normalisation would need the rows of future blocks,
    so the causal matrix is only row-stochastic.
    """
    rows, cols = scores.shape[-2:]
    i = torch.arange(rows, device=scores.device)[:, None] + first_row
    j = torch.arange(cols, device=scores.device)[None, :]
    past = j < i
    masked = scores.masked_fill(~past, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.where(past, torch.exp(masked - lse), torch.zeros_like(scores))


def block_means(x: torch.Tensor, real: torch.Tensor, block: int) -> torch.Tensor:
    """x (B, N, D) with N a multiple of `block`, real (B, N) -> masked means (B, N / block, D).

    Padded tokens are left out (a block with no real token gets 0)."""
    b, n, dim = x.shape
    w = real.to(x.dtype).view(b, n // block, block, 1)
    sums = (x.view(b, n // block, block, dim) * w).sum(2)
    return sums / w.sum(2).clamp_min(1.0)


def hard_block_order(perm: torch.Tensor) -> torch.Tensor:
    """The sorted order of a soft permutation made hard: perm (..., nb, nb) -> block ids (..., nb).

    Sorted slot i takes block argmax_j P_ij; a block picked by several slots keeps its first slot,
    blocks picked by none follow in index order, so the result is always a permutation (the
    sequence itself when argmax P is a permutation matrix)."""
    rows, nb = perm.shape[-2:]
    pick = perm.argmax(dim=-1)  # (..., rows)
    slot = torch.arange(rows, device=perm.device).expand_as(pick)
    first = torch.full((*pick.shape[:-1], nb), rows, dtype=torch.long, device=perm.device)
    first = first.scatter_reduce(-1, pick, slot, reduce="amin")  # (..., nb): first slot or rows
    return torch.sort(first, dim=-1, stable=True).indices


def permuted_slot_real(real_b: torch.Tensor | None, causal: bool, first_row: int, rows: int,
                       block: int = 1, device=None) -> torch.Tensor | None:
    """Which slots of a sorted block hold at least one real token among the blocks it mixes.

    real_b (B, nb, s) -> (B, rows, s): non-causal every block is mixed; causal row i mixes j < i.
    real_b None (no padding, blocks of `block` tokens): None non-causal (every slot is real),
    (1, rows, block) causal (every row but the sequence's first mixes a real block)."""
    if real_b is None:
        if not causal:
            return None
        row = torch.arange(first_row, first_row + rows, device=device)
        return (row > 0)[None, :, None].expand(1, rows, block)
    if not causal:
        return real_b.any(dim=1, keepdim=True).expand(-1, rows, -1)
    real = real_b.to(torch.int32)
    seen = (torch.cumsum(real, dim=1) - real) > 0  # (B, nb, s): any real in blocks < i
    return seen[:, first_row:first_row + rows]


def _zero_padded(blocks: torch.Tensor, real_b: torch.Tensor | None) -> torch.Tensor:
    """blocks (B, H, nb, s, d) with the padded keys (real_b (B, nb, s) False) set to 0."""
    if real_b is None:
        return blocks
    return blocks * real_b[:, None, :, :, None].to(blocks.dtype)


def sorted_blocks(perm: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Apply the soft permutation: perm (B, H, R, nb), blocks (B, H, nb, s, d) -> (B, H, R, s, d)."""
    b, h, nb, s, d = blocks.shape
    mixed = torch.matmul(perm.to(blocks.dtype), blocks.reshape(b, h, nb, s * d))
    return mixed.view(b, h, perm.shape[-2], s, d)


def sinkhorn_block_attention(q_blocks, k_blocks, v_blocks, real_b, perm, causal: bool,
                             first_row: int = 0):
    """Each query block attends to its own block and to its softly sorted block.

    q_blocks (B, H, R, s, d): query blocks first_row .. first_row + R - 1; k_blocks, v_blocks
    (B, H, nb, s, d): every key block; real_b (B, nb, s) bool, or None when every token is real
    (decided on the host: nothing waits for the device); perm (B, H, R, nb).
    Own block: real keys (and the query itself), causal: key position <= query position.
    Sorted block: sum_j perm[r, j] * (block j with padded keys zeroed); a slot is a real key when
    some mixed block has a real token there. -> (B, H, R, s, d). Scores are (R, s, 2s) per head.
    """
    b, h, rows, s, d = q_blocks.shape
    own_k = k_blocks[:, :, first_row:first_row + rows]
    own_v = v_blocks[:, :, first_row:first_row + rows]
    sk = sorted_blocks(perm, _zero_padded(k_blocks, real_b))
    sv = sorted_blocks(perm, _zero_padded(v_blocks, real_b))
    keys = torch.cat([own_k, sk], dim=3)  # (B, H, R, 2s, d)
    values = torch.cat([own_v, sv], dim=3)
    if real_b is None and not causal:
        return block_sdpa(q_blocks, keys, values, None)
    # the leading axis below is B, or 1 when real_b is None
    dev = q_blocks.device
    own = torch.ones(1, rows, s, s, dtype=torch.bool, device=dev)
    if real_b is not None:
        eye = torch.eye(s, dtype=torch.bool, device=dev)  # the query itself
        own = real_b[:, first_row:first_row + rows, None, :] | eye
    if causal:
        own = own & own.new_ones(s, s).tril()  # (B, R, s_q, s_k)
    slot = permuted_slot_real(real_b, causal, first_row, rows, s, dev)  # (B, R, s)
    allowed = torch.cat([own, slot[:, :, None, :].expand(-1, -1, s, -1)], dim=-1)  # (B, R, s, 2s)
    return block_sdpa(q_blocks, keys, values, allowed[:, None])


def sortcut_attention(q, k_blocks, v_blocks, real_b, perm, budget: int):
    """SortCut: every query attends to the first `budget` sorted blocks only, O(N budget s).

    q (B, H, N, d); k_blocks, v_blocks (B, H, nb, s, d); perm (B, H, nb, nb) -> (B, H, N, d)."""
    b, h, nb, s, d = k_blocks.shape
    sk = sorted_blocks(perm[:, :, :budget], _zero_padded(k_blocks, real_b)).reshape(b, h, budget * s, d)
    sv = sorted_blocks(perm[:, :, :budget], _zero_padded(v_blocks, real_b)).reshape(b, h, budget * s, d)
    slot = permuted_slot_real(real_b, False, 0, budget)
    slot = None if slot is None else slot.reshape(b, 1, 1, budget * s)
    return F.scaled_dot_product_attention(q, sk, sv, attn_mask=slot)


# ------------------------------------------------------------ dense definitions (tests only)
def expand_permutation(perm: torch.Tensor, block: int) -> torch.Tensor:
    """perm (..., R, nb) -> the token-level soft permutation kron(perm, I_block) (..., R*s, nb*s)."""
    eye = torch.eye(block, dtype=perm.dtype, device=perm.device)
    r, nb = perm.shape[-2:]
    big = perm[..., :, None, :, None] * eye[:, None, :]  # (..., R, s, nb, s)
    return big.reshape(*perm.shape[:-2], r * block, nb * block)
