"""No step makes the host wait for the device.

On CUDA an op whose result the host must read (`int(t)`, `bool(t.all())`, an index by a bool
mask, `nonzero`) stops the host until every queued kernel has run: the host's time and the GPU's
then add up instead of overlapping, and the step cannot be captured in a CUDA graph. These tests
run every mechanism on the CPU with the CUDA path's switches forced and list the ops that would
wait on CUDA: in a training step (forward + backward) after the first one, which may read a seed
or fill a cache, and in decoding one token. FlexAttention's path only runs on CUDA and is not
covered here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import efficient_transformers as et
from helpers import DIM, both_modes, random_mask, small_attention

# ops that return a value the host reads, or a tensor whose shape depends on the data
HOST_READS = {
    "aten._local_scalar_dense.default", "aten.nonzero.default", "aten.nonzero_static.default",
    "aten.masked_select.default", "aten.is_nonzero.default", "aten.equal.default",
    "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
}


def _bool_indexed(func, args) -> bool:
    """aten.index / index_put with a bool mask among the indices: its shape is the mask's count."""
    if not str(func).startswith(("aten.index.", "aten.index_put")) or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())


class HostReads(TorchDispatchMode):
    """Records the ops that would make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS or _bool_indexed(func, args):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def training_step(attn, x, mask):
    y = attn(x, mask)
    loss = y.square().mean()
    if attn.aux_loss is not None:
        loss = loss + attn.aux_loss
    loss.backward()


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("name,causal", both_modes(et.list_attention()))
def test_a_training_step_never_waits_for_the_device(name, causal, padded, cuda_path):
    attn = small_attention(name, causal=causal, dtype=torch.float32).train()
    if hasattr(attn, "fused_cpu"):
        attn.fused_cpu = False  # the routing heads' CUDA path
    n = 40
    x = torch.randn(2, n, DIM, requires_grad=True)
    mask = random_mask(2, n, torch.Generator().manual_seed(1)) if padded else None
    training_step(attn, x, mask)  # may read the seed and fill caches
    spy = HostReads()
    with spy:
        training_step(attn, x, mask)
    assert spy.ops == []


@pytest.mark.parametrize("name", [n for n in et.list_attention() if et.attention_spec(n).decode])
def test_decoding_a_token_never_waits_for_the_device(name, cuda_path):
    attn = small_attention(name, causal=True, dtype=torch.float32)
    x = torch.randn(2, 24, DIM)
    with torch.no_grad():
        _, state = attn.decode(x[:, :16])  # the prompt
        _, state = attn.decode(x[:, 16:17], state)
        spy = HostReads()
        with spy:
            for t in range(17, 24):
                _, state = attn.decode(x[:, t:t + 1], state)
    assert spy.ops == []


def test_the_spy_sees_host_reads():
    """The checks above would see the reads this suite removed."""
    t = torch.arange(6)
    spy = HostReads()
    with spy:
        int(t.max())
        bool(t.all())
        t[t > 2]
        t.nonzero()
    assert spy.ops == ["aten._local_scalar_dense.default", "aten._local_scalar_dense.default",
                       "aten.index.Tensor", "aten.nonzero.default"]


def test_a_seed_buffer_is_read_once_per_change():
    attn = small_attention("reformer", dtype=torch.float32)
    first = attn.buffer_int("hash_seed")
    assert first == int(attn.hash_seed)
    spy = HostReads()
    with spy:
        assert attn.buffer_int("hash_seed") == first
    assert spy.ops == []  # cached
    with torch.no_grad():
        attn.hash_seed.fill_(first + 1)  # an in-place write: read again
    assert attn.buffer_int("hash_seed") == first + 1
    other = small_attention("reformer", dtype=torch.float32, seed=5)
    attn.load_state_dict(other.state_dict())
    assert attn.buffer_int("hash_seed") == int(other.hash_seed) != first + 1
    attn.hash_seed = torch.tensor([7])  # another tensor
    assert attn.buffer_int("hash_seed") == 7
