"""`reformer`: LSH attention with shared query-key (Kitaev et al. 2020, arXiv:2001.04451, section 2).

- Angular LSH by random rotations, `n_hashes` rounds, `bucket_size` tokens per bucket on average:
  the number of buckets follows from the (internally padded) length, b = P / bucket_size (rounded
  up to an even number; 1 when P <= bucket_size), unless `n_buckets` fixes it.
- Factorised hashing (offered by the authors' Trax code and by Hugging Face's `ReformerConfig`
  to save memory at long lengths): `n_buckets=(b1, b2)` hashes each round twice, h = h1 + b1·h2
  with b1/2 and b2/2 rotation columns, b1·b2 buckets for b1/2 + b2/2 projections per token
  instead of b1·b2/2. Without `n_buckets`, a length-derived count b above
  2·bucket_size (b/2 projections per token and round, more than a chunk's bucket_size tokens)
  is factorised into two even factors near √b (256 -> 16 × 16, 1024 -> 32 × 32; N > 8k at
  bucket size 64): hashing then costs O(N·√(N/bucket_size)) instead of O(N²/bucket_size). An
  int always means one rotation of b/2 columns, as in the paper.
- Shared-QK: keys are the normalised queries. A token attends to itself only when nothing else is
  available. Sorted by (bucket, position), chunks of `bucket_size`, each chunk attends to itself and
  the previous chunk within the same bucket. Rounds combined with log-sum-exp weights, duplicate
  pairs counted once (see `functional/lsh.py`). Memory O(n_hashes · N · 2 · bucket_size), time
  O(N log N) for the sort; no N×N tensor. On CUDA the rounds' chunks run as one FlexAttention
  call with the pair rules in its mask_mod (`functional/lsh_flex.py`); the same definition.
- Any N: the layer pads to a multiple of `bucket_size`; padded and masked tokens get an extra bucket
  that sorts after every real token, so their values never move a real token's chunk and real
  queries never attend to them. A `bucket_size` above N is clamped to the next power of two >= N
  for padding and chunking (`lsh.chunk_for`): a chunk at or beyond N holds every token either way
  and P <= bucket_size still gives one bucket, so the sets are the same.
- The rotations are fixed per layer: a seed drawn from torch's RNG at construction is stored as a
  persistent buffer and the rotations for each bucket count are generated from it, so forward and
  decode agree and a saved model hashes the same after loading. The paper redraws them at every
  forward; `redraw=True` does that in training mode (eval stays deterministic).

Causal variant (differs from the paper). The paper's causal Reformer masks j > i inside the sorted
chunks, but which chunk a past query lands in depends on how many *later* tokens fall into lower
buckets, so future tokens change what the past sees. Here, in each round, query i attends to the
`bucket_size` most recent earlier tokens j < i of its own bucket (the paper's window of one chunk
back, measured from i instead of from a chunk boundary). That set depends only on tokens <= i. It is
computed with the same sort/gather: sorted by (bucket, position), the earlier tokens of i's bucket
sit right before i, so a band of `bucket_size` sorted positions over (previous chunk, own chunk)
covers them. The number of buckets cannot follow from N (N grows while decoding), so causal layers
use `n_buckets` (default 64 when left None; `build_model("reformer", task="lm")` derives it from
`max_len` as the non-causal layer does from N, so that a bucket holds about `bucket_size`
tokens). Decode keeps every past key, value and bucket id (memory grows like a KV cache): a first
call (the prompt) runs the chunked causal path, later calls evaluate the same definition densely
for each new token against the cache (O(length) per token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.blocks import at_most, pad_mask_to_multiple, pad_to_multiple
from ..functional.dense import naive_attention
from ..functional import lsh_flex
from ..functional.eager import outside_graphs
from ..functional.flex import use_flex
from ..functional.lsh import (
    causal_allowed_rounds, chunk_for, factorized, lsh_attention, lsh_buckets, random_rotations,
    sort_by_bucket, total_buckets, union_with_self,
)
from ..registry import register
from .base import Attention, check_positive_int

CAUSAL_BUCKETS = 64  # buckets of a causal layer when `n_buckets` is None
FACTORIZE_ABOVE = 2  # factorise b buckets when their b/2 projections per token outnumber a chunk
DECODE_QUERY_BLOCK = 64  # new tokens evaluated at once by a decode step (bounds its T x M masks)


def length_buckets(length: int, bucket_size: int) -> int | tuple[int, int]:
    """Buckets for `length` tokens, `bucket_size` per bucket on average: length / bucket_size
    rounded up to an even number, 1 when length <= bucket_size; factorised into two even
    factors (`lsh.factorized`) when more than FACTORIZE_ABOVE · bucket_size."""
    b = max(length // bucket_size, 1)
    b = b + (b % 2) if b > 1 else 1
    return factorized(b) if b > FACTORIZE_ABOVE * bucket_size else b


def check_buckets(n_buckets):
    """`n_buckets`: None, 1, an even int, or a tuple / list of even ints (a factorised hash)."""
    if n_buckets is None:
        return None
    if isinstance(n_buckets, (tuple, list)):
        if not n_buckets or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 2
                                    and f % 2 == 0 for f in n_buckets):
            raise ValueError(f"n_buckets: expected an int or a non-empty list of even ints >= 2 "
                             f"(factorised hashing), got {n_buckets!r}")
        return tuple(n_buckets)
    check_positive_int("n_buckets", n_buckets)
    if n_buckets > 1 and n_buckets % 2:
        raise ValueError(f"n_buckets: expected 1 or an even number (hashing takes the "
                         f"argmax over [xR; -xR]), got {n_buckets}")
    return n_buckets


@register("reformer")
class ReformerAttention(Attention):
    small_options = {"bucket_size": 4, "n_hashes": 2, "n_buckets": 4}

    def __init__(self, dim: int, heads: int, causal: bool = False, bucket_size: int = 64,
                 n_hashes: int = 4, n_buckets: int | tuple[int, ...] | None = None,
                 redraw: bool = False):
        super().__init__(dim, heads, causal)
        self.bucket_size = check_positive_int("bucket_size", bucket_size)
        self.n_hashes = check_positive_int("n_hashes", n_hashes)
        n_buckets = check_buckets(n_buckets)
        if not isinstance(redraw, bool):
            raise ValueError(f"redraw: expected True or False, got {redraw!r}")
        self.n_buckets, self.redraw = n_buckets, redraw
        self.to_qk = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.long)
        self.register_buffer("hash_seed", seed)  # persistent: saved with the weights
        self.buffer_int("hash_seed")  # read once here: torch.compile uses this value
        self._rotations: dict = {}

    # ------------------------------------------------------------------------- hashing
    def buckets_for(self, padded_len: int) -> int | tuple[int, ...]:
        """The bucket count (or its factors) at this padded length."""
        if self.n_buckets is not None:
            return self.n_buckets
        if self.causal:
            return CAUSAL_BUCKETS
        return length_buckets(padded_len, self.bucket_size)

    def rotations(self, n_buckets: int | tuple[int, ...], device, dtype) -> torch.Tensor:
        """(H, R, d, b/2) (factorised: b1/2 + b2/2 + ... columns), fixed per layer (or fresh
        from torch's RNG with redraw in training)."""
        if self.redraw and self.training:
            return random_rotations(self.heads, self.n_hashes, self.head_dim, n_buckets,
                                    device=device, dtype=dtype)
        key = (self.buffer_int("hash_seed"), n_buckets, str(device), dtype)
        if key not in self._rotations:
            self.draw_rotations(key)
        return self._rotations[key]

    @outside_graphs  # a torch.Generator cannot be made inside torch.compile
    def draw_rotations(self, key) -> None:
        seed, n_buckets, device, dtype = key
        gen = torch.Generator().manual_seed(seed)
        self._rotations = {key: random_rotations(self.heads, self.n_hashes, self.head_dim,
                                                 n_buckets, gen, device, dtype)}

    def hash(self, qk: torch.Tensor, n_buckets: int | tuple[int, ...],
             key_mask=None) -> torch.Tensor:
        """qk (B, H, N, d) -> buckets (B, H, R, N); padded positions get the padding bucket (the
        total count)."""
        work = torch.promote_types(qk.dtype, torch.float32)
        return lsh_buckets(qk, self.rotations(n_buckets, qk.device, work), n_buckets, key_mask)

    def qkv(self, x):
        return self.split_heads(self.to_qk(x)), self.split_heads(self.to_v(x))

    def hashed(self, x, mask):
        """x (B, N, dim) padded to P, a multiple of the chunk (`chunk_for`) -> qk, v (B, H, P, d),
        buckets (B, H, R, P); padded and masked positions get the padding bucket."""
        b, n, _ = x.shape
        chunk = chunk_for(n, self.bucket_size)
        x, _ = pad_to_multiple(x, chunk, dim=1)
        p = x.shape[1]
        key_mask = None
        if mask is not None or p != n:
            key_mask = pad_mask_to_multiple(mask, n, chunk, b, device=x.device)
        qk, v = self.qkv(x)  # (B, H, P, d)
        return qk, v, self.hash(qk, self.buckets_for(p), key_mask)

    # ------------------------------------------------------------------------- forward
    def attend(self, x, mask):
        n = x.shape[1]
        qk, v, buckets = self.hashed(x, mask)
        chunk = at_most(self.bucket_size, qk.shape[2])  # `hashed`'s chunk: P when P < bucket_size
        n_buckets = total_buckets(self.buckets_for(qk.shape[2]))
        if lsh_flex.FORCE is not None or use_flex(qk):   # CUDA (or FORCE_FLEX)
            out = lsh_flex.lsh_attention_flex(qk, v, buckets, chunk, self.causal, n_buckets,
                                              flex=lsh_flex.FORCE)
        else:
            out = lsh_attention(qk, v, buckets, chunk, self.causal, n_buckets=n_buckets)
        return self.to_out(self.merge_heads(out[:, :, :n]))

    def display_order(self, x):
        """x (1, N, dim) -> (N,): positions sorted by (bucket of the first hash round, position)
        for head 0, the sort of the fast path (padding sorts last and is dropped)."""
        order = sort_by_bucket(self.hashed(x, None)[2][0, 0, 0])
        return order[order < x.shape[1]]

    # -------------------------------------------------------------------------- decode
    def decode_step(self, x_new, state):
        qk, v = self.qkv(x_new)  # (B, H, T, d)
        buckets = self.hash(qk, self.buckets_for(0))  # (B, H, R, T)
        k = F.normalize(qk, dim=-1)
        if state is None:  # a prompt: the chunked causal path, then keep its keys as the cache
            y = self.attend(x_new, None)
            return y, {"k": k, "v": v, "buckets": buckets, "length": x_new.shape[1]}
        offset = state["length"]
        k = torch.cat([state["k"], k], dim=2)
        v = torch.cat([state["v"], v], dim=2)
        buckets_all = torch.cat([state["buckets"], buckets], dim=3)
        outs = []
        for start in range(0, qk.shape[2], DECODE_QUERY_BLOCK):  # bounds the (T, M) masks
            stop = min(start + DECODE_QUERY_BLOCK, qk.shape[2])
            m = offset + stop  # keys this block may see
            per_round = causal_allowed_rounds(buckets[..., start:stop], buckets_all[..., :m],
                                              self.bucket_size, offset=offset + start)
            allowed = union_with_self(per_round, offset=offset + start)
            outs.append(naive_attention(qk[:, :, start:stop], k[:, :, :m], v[:, :, :m], allowed,
                                        1.0 / math.sqrt(self.head_dim)))
        out = torch.cat(outs, dim=2)
        state = {"k": k, "v": v, "buckets": buckets_all, "length": offset + x_new.shape[1]}
        return self.to_out(self.merge_heads(out)), state

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, "
                f"n_buckets={self.n_buckets}, redraw={self.redraw}")
