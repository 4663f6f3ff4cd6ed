"""The traffic estimate's FlexAttention stand-in (`bench/traffic_flex.py`): priced, not run."""

from __future__ import annotations

import pytest
import torch

from efficient_transformers.bench.traffic import OperatorTraffic
from efficient_transformers.bench.traffic_flex import (
    FLEX_HOST_S, FLEX_PEAK_FRACTION, BlockCounts, pattern_counts, priced_flex, priced_flex_paths,
)
from efficient_transformers.functional import flex, lsh_flex
from efficient_transformers.functional.patterns import LocalWindow

pytest.importorskip("torch.nn.attention.flex_attention")


def test_a_priced_call_charges_what_the_kernel_would_move_and_compute():
    """B·H = 2·3 lines, 4 query blocks of 16 visiting 2 key blocks of 16 each, d = 8, e = 4, bf16:
    forward 4·pairs·d flops, q, out, lse once and the visited K, V rows; backward 2.5 times the
    flops, every tensor and its gradient once and the K, V rows twice."""
    q = torch.randn(2, 3, 64, 8, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 3, 64, 8, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 3, 64, 4, dtype=torch.bfloat16, requires_grad=True)
    counts = BlockCounts(torch.full((1, 1, 4), 2), (16, 16))
    counter = OperatorTraffic()
    with counter:
        out, aux = priced_flex(q, k, v, block_mask=counts, return_aux=object())
        (out.float().sum() + aux.lse.sum()).backward()
    key_rows = 6 * 4 * 2 * 16                    # lines · query blocks · blocks each · rows
    pairs = key_rows * 16
    n_q = 6 * 64                                 # query rows (and key rows)
    fwd = counter.rows["flex_attention (priced)"]
    bwd = counter.rows["flex_attention_backward (priced)"]
    assert fwd == [1, n_q * (8 + 4) * 2 + n_q * 4 + key_rows * (8 + 4) * 2, 4.0 * pairs * 8]
    tensors = 2 * (n_q * 8 + n_q * 8 + n_q * 4) + 2 * n_q * 4      # q, k, v, grads; out, dO
    assert bwd == [1, tensors * 2 + n_q * 4 + 2 * key_rows * (8 + 4) * 2, 2.5 * 4 * pairs * 8]
    assert q.grad is not None and q.grad.shape == q.shape
    # priced at the calibrated share of the peak, with the calibrated host time per call
    peak = counter.peak_flops * FLEX_PEAK_FRACTION
    assert counter.op_ms(bwd, "flex_attention_backward (priced)") == pytest.approx(
        1e3 * (max(bwd[1] / counter.bandwidth, bwd[2] / peak) + counter.launch_s))
    assert counter.extra_host_s == pytest.approx(2 * FLEX_HOST_S)
    assert counter.host_ms() == pytest.approx(
        1e3 * (counter.dispatches * counter.host_s + 2 * FLEX_HOST_S))


def test_pattern_counts_are_the_key_blocks_of_the_pattern_at_flex_block_size():
    counts = pattern_counts(LocalWindow(20), 512, "cpu")
    assert counts.BLOCK_SIZE == (128, 128)
    assert counts.kv_num_blocks.tolist() == [[[2, 3, 3, 2]]]   # ±20 crosses each inner border
    assert pattern_counts(LocalWindow(20), 512, "cpu") is counts   # cached, as block masks are


def test_flex_layers_are_priced_as_on_cuda_and_the_switches_come_back():
    """Inside the block a FlexAttention layer takes FlexAttention on the CPU and every call is
    priced (no dense reference run); layers whose patterns touch every key block (axial) keep
    their own path, as on CUDA."""
    from efficient_transformers.bench.profile import traffic_mechanism

    table, ms = traffic_mechanism("longformer", 512, "cpu", "bf16", dim=64, heads=2,
                                  as_cuda=True, rows=100)
    assert "flex_attention (priced)" in table and "flex_attention_backward (priced)" in table
    assert ms > 0
    table, _ = traffic_mechanism("axial_transformer", 256, "cpu", "bf16", dim=64, heads=2,
                                 as_cuda=True, rows=100)
    assert "priced" not in table
    assert flex.FORCE_FLEX is None and lsh_flex.FORCE is None
    with priced_flex_paths():
        assert flex.use_flex(torch.randn(1, 1, 8, 16))
        assert not flex.use_flex(torch.randn(1, 1, 8, 16), block_sparse=False)
    assert flex.FORCE_FLEX is None
