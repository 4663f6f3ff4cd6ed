"""The public PyPI implementations of the same methods, timed by the same harness (`--peers`).

Pairings and settings follow ANCHORS.md (one self-attention layer, projections included, heads of
dim/heads). Every import of a peer package happens inside its builder, so nothing here is
imported unless `--peers` runs it; a package that is missing is reported as "not installed".

| peer                         | package                       | ours (causal)             | settings |
|------------------------------|-------------------------------|---------------------------|----------|
| lucidrains_performer         | performer-pytorch             | performer                 | default features (d·log d) |
| lucidrains_performer_causal  | performer-pytorch             | performer (causal)        | same, causal |
| lucidrains_linformer         | linformer                     | linformer                 | k = 256, seq_len = N |
| lucidrains_local             | local-attention               | image_transformer         | window 256, one block each side |
| lucidrains_reformer_lsh      | reformer-pytorch              | reformer                  | bucket 64, 4 hashes |
| lucidrains_sinkhorn          | sinkhorn-transformer          | sinkhorn_transformer      | bucket 128 |
| lucidrains_routing           | routing-transformer           | routing_transformer       | all heads routed, window 128 |
| lucidrains_linear            | linear-attention-transformer  | linear_transformer        | default (softmax feature map) |
| lucidrains_linear_causal     | linear-attention-transformer  | linear_transformer (causal)| same, causal |
| lucidrains_mem_compressed    | memory-compressed-attention   | memory_compressed         | compression factor 3, conv per head |
| lucidrains_isab              | isab-pytorch                  | set_transformer           | 64 latents |
| lucidrains_axial             | axial-attention               | axial_transformer         | 2 axes, grid = grid_shape(N) (64×64 at 4k) |
| hf_longformer                | transformers                  | longformer                | LongformerAttention, window 512 |
| hf_bigbird                   | transformers                  | bigbird                   | whole 1-layer BigBirdModel, block 64, 3 random |

Where our defaults differ from the peer's settings, `Peer.options(n, heads)` gives the options
that set our mechanism to the peer's settings at length n, and the paired case of ours runs with
them under its own label (`routing_transformer [peer settings]`): the ratio compares the same
configuration. `routing_transformer` needs it: by default it mixes local heads with routed heads
and keeps 32 clusters, while the peer routes every head into clusters of `window_size` = 128
tokens. So does `memory_compressed`: by default its compressing convolution mixes every channel
(the paper's convolution over the projected keys), while the peer's is grouped by head
(`conv_groups=heads`, `heads` times fewer multiply-adds).

`lucidrains_local` pairs with `image_transformer` because Parmar et al.'s 1-D local attention
(query blocks over a neighbourhood of memory blocks) is the survey's local-window model. The
BigBird peer is a whole one-layer model (embeddings' LayerNorm and the MLP included), as in
ANCHORS.md, so its ratio favours ours.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .config import grid_shape, label


@dataclass(frozen=True)
class Peer:
    name: str
    package: str            # pip name
    module: str             # import name
    ours: str               # our registry key it pairs with
    causal: bool
    settings: str
    build: Callable[[int, int, int], nn.Module]   # (dim, heads, n) -> module (B, N, dim) -> same
    options: Callable[[int, int], dict[str, Any]] | None = None  # (n, heads) -> ours at the
    #                                                              peer's settings

    @property
    def ours_label(self) -> str:
        """The series of ours this peer is compared with: 'performer (causal)', or, with
        options, 'routing_transformer [peer settings]'."""
        base = label(self.ours, self.causal, "fwdbwd")
        return base if self.options is None else f"{base} [peer settings]"


class _First(nn.Module):
    """Wrap a module whose forward returns a tuple / ModelOutput: keep the (B, N, dim) tensor."""

    def __init__(self, inner: nn.Module, call: Callable | None = None):
        super().__init__()
        self.inner = inner
        self.call = call

    def forward(self, x):
        out = self.call(self.inner, x) if self.call else self.inner(x)
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        return out[0]


def _performer(causal):
    def build(dim, heads, n):
        from performer_pytorch import SelfAttention

        return SelfAttention(dim, causal=causal, heads=heads, dim_head=dim // heads)
    return build


def _linformer(dim, heads, n):
    from linformer import LinformerSelfAttention

    return LinformerSelfAttention(dim, seq_len=n, k=256, heads=heads, dim_head=dim // heads)


def _local(dim, heads, n):
    from local_attention import LocalMHA

    return LocalMHA(dim=dim, window_size=256, heads=heads, dim_head=dim // heads, causal=False,
                    look_backward=1, look_forward=1)


def _reformer(dim, heads, n):
    from reformer_pytorch import LSHSelfAttention

    return _First(LSHSelfAttention(dim, heads=heads, bucket_size=64, n_hashes=4, causal=False))


def _sinkhorn(dim, heads, n):
    from sinkhorn_transformer.sinkhorn_transformer import SinkhornSelfAttention

    return SinkhornSelfAttention(dim, bucket_size=128, max_seq_len=n, heads=heads,
                                 dim_head=dim // heads)


def _routing(dim, heads, n):
    from routing_transformer.routing_transformer import SelfAttention

    return _First(SelfAttention(dim, depth=1, max_seq_len=n, heads=heads, local_attn_heads=0,
                                window_size=128, dim_head=dim // heads))


def _routing_options(n, heads):  # every head routed; clusters of 128 tokens, as window_size=128
    return {"local_heads": 0, "num_clusters": max(1, n // 128)}


def _mem_compressed_options(n, heads):  # the peer's ConvCompress: one kernel per head
    return {"conv_groups": heads}


def _linear(causal):
    def build(dim, heads, n):
        from linear_attention_transformer.linear_attention_transformer import SelfAttention

        return SelfAttention(dim, heads, causal=causal, dim_head=dim // heads)
    return build


def _mem_compressed(dim, heads, n):
    from memory_compressed_attention import MemoryCompressedAttention

    return MemoryCompressedAttention(dim, heads=heads, causal=False, compression_factor=3)


def _isab(dim, heads, n):
    from isab_pytorch import ISAB

    return _First(ISAB(dim=dim, heads=heads, num_latents=64))


def _axial(dim, heads, n):
    from axial_attention import AxialAttention

    rows, cols = grid_shape(n, 2)

    def call(inner, x):  # (B, N, dim) -> (B, rows, cols, dim) -> back
        b = x.shape[0]
        return inner(x.reshape(b, rows, cols, dim)).reshape(b, n, dim)

    return _First(AxialAttention(dim, num_dimensions=2, heads=heads, dim_index=-1), call)


def _longformer(dim, heads, n):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerAttention

    config = LongformerConfig(hidden_size=dim, num_attention_heads=heads, attention_window=[512],
                              attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)

    def call(inner, x):  # all tokens local (mask 0), none global; padded to a multiple of 512
        b, length, _ = x.shape
        pad = -length % 512  # as LongformerModel pads, with the padding masked (-10000)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        mask = torch.zeros(b, length + pad, device=x.device, dtype=x.dtype)
        mask[:, length:] = -10000.0
        out = inner(x, attention_mask=mask, is_index_masked=mask < 0,
                    is_index_global_attn=mask > 0, is_global_attn=False)
        return out[0][:, :length]

    return _First(LongformerAttention(config, layer_id=0), call)


def _bigbird(dim, heads, n):
    from transformers import BigBirdConfig, BigBirdModel

    config = BigBirdConfig(hidden_size=dim, num_attention_heads=heads, num_hidden_layers=1,
                           intermediate_size=4 * dim, attention_type="block_sparse",
                           block_size=64, num_random_blocks=3, vocab_size=128,
                           max_position_embeddings=max(4096, n), hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, add_pooling_layer=False)
    model = BigBirdModel(config, add_pooling_layer=False)
    return _First(model, lambda inner, x: inner(inputs_embeds=x))


PEERS: dict[str, Peer] = {p.name: p for p in [
    Peer("lucidrains_performer", "performer-pytorch", "performer_pytorch", "performer", False,
         "default features", _performer(False)),
    Peer("lucidrains_performer_causal", "performer-pytorch", "performer_pytorch", "performer", True,
         "default features, causal", _performer(True)),
    Peer("lucidrains_linformer", "linformer", "linformer", "linformer", False, "k=256",
         _linformer),
    Peer("lucidrains_local", "local-attention", "local_attention", "image_transformer", False,
         "window 256, one block each side", _local),
    Peer("lucidrains_reformer_lsh", "reformer-pytorch", "reformer_pytorch", "reformer", False,
         "bucket 64, 4 hashes", _reformer),
    Peer("lucidrains_sinkhorn", "sinkhorn-transformer", "sinkhorn_transformer",
         "sinkhorn_transformer", False, "bucket 128", _sinkhorn),
    Peer("lucidrains_routing", "routing-transformer", "routing_transformer",
         "routing_transformer", False, "all heads routed, window 128", _routing,
         options=_routing_options),
    Peer("lucidrains_linear", "linear-attention-transformer", "linear_attention_transformer",
         "linear_transformer", False, "default", _linear(False)),
    Peer("lucidrains_linear_causal", "linear-attention-transformer",
         "linear_attention_transformer", "linear_transformer", True, "default, causal",
         _linear(True)),
    Peer("lucidrains_mem_compressed", "memory-compressed-attention", "memory_compressed_attention",
         "memory_compressed", False, "compression factor 3, convolution grouped by head",
         _mem_compressed, options=_mem_compressed_options),
    Peer("lucidrains_isab", "isab-pytorch", "isab_pytorch", "set_transformer", False,
         "64 latents", _isab),
    Peer("lucidrains_axial", "axial-attention", "axial_attention", "axial_transformer", False,
         "2 axes, most square grid of N", _axial),
    Peer("hf_longformer", "transformers", "transformers", "longformer", False, "window 512",
         _longformer),
    Peer("hf_bigbird", "transformers", "transformers", "bigbird", False,
         "1-layer model, block 64, 3 random blocks", _bigbird),
]}


def installed(peer: Peer) -> bool:
    """Whether the peer's package can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(peer.module) is not None
    except (ImportError, ValueError):
        return False


def build_peer(name: str, dim: int, heads: int, n: int) -> nn.Module:
    if name not in PEERS:
        raise ValueError(f"peer: unknown {name!r}; expected one of {sorted(PEERS)}")
    return PEERS[name].build(dim, heads, n)
