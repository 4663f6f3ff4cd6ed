"""Operator traffic of one forward + backward step: what each aten operator reads and writes,
and its flops, counted on any device (the CPU included) with a `TorchDispatchMode`.

An estimate, not a measurement. At long N an eager layer is bound by memory bandwidth, so the
bytes its operators move rank where a GPU would spend its time, without a GPU. Each operator
is charged max(bytes / bandwidth, flops / peak) + launch, summed (defaults: an H100, 2.8 TB/s,
500 TFLOP/s, 4 µs). The count follows the path the layer takes on the device it runs on: run
on the CPU, it cannot see CUDA-only paths (FlexAttention). On an H100 the dense layer at 16k
bf16 is estimated at 4.2 ms and was measured at 4.75 ms.

At short N the GPU waits for the host instead: eager PyTorch spends about 18 µs of host time per
aten call of a forward + backward (views included). That figure is the fit to the 2026-11-27
H100 run at N = 1k, where six layers whose code has not changed since ran in 15-23 µs per call
(transformer 64 calls, 1.20 ms; linformer 104, 1.88 ms; transformer_xl 290, 4.88 ms; routing
440, 8.31 ms; sinkhorn 406, 9.40 ms; compressive 602, 9.33 ms). The estimate is the larger of
the two, device and host time: a layer of 400 calls cannot go under about 7 ms at any N.

    python -m efficient_transformers.bench.profile --traffic --models performer \
        --length 16384 --device cpu --dtype bf16

Views and allocations move nothing and are not counted; an in-place operator reads and writes
its target (counted twice), an out= argument is only written (counted once), a gather reads
as many source elements as it writes, and a broadcast operand (an `expand`ed view: stride 0)
is charged its distinct elements.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ALLOCATIONS = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided"}


def _moves_nothing(func, inputs, outputs) -> bool:
    """Allocations, and views: every output shares an input's storage and nothing is written
    (annotated views, and the unannotated ones such as `_unsafe_view`)."""
    if func.overloadpacket.__name__ in ALLOCATIONS:
        return True
    if not outputs or any(a.alias_info is not None and a.alias_info.is_write
                          for a in func._schema.arguments):
        return False
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    return all(t.untyped_storage().data_ptr() in storages for t in outputs)


def _cpu_flash_flops(func, args) -> float:
    """The CPU flash kernel has no flop formula in torch: 4·B·H·N·M·d forward, 2.5× backward,
    half of it causal. Forward args (q, k, v, dropout, is_causal), backward (dO, q, k, v, out,
    lse, dropout, is_causal)."""
    backward = "backward" in func.__name__
    q, k = args[1:3] if backward else args[0:2]
    causal = args[7] if backward else (len(args) > 4 and args[4])
    forward = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    return forward * (2.5 if backward else 1.0) * (0.5 if causal else 1.0)


def _flops(func, args, kwargs, out) -> float:
    from torch.utils.flop_counter import flop_registry

    if func.overloadpacket in flop_registry:
        try:
            return float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        except Exception:  # noqa: BLE001 - an unusual signature: no flops rather than no count
            return 0.0
    if "flash_attention_for_cpu" in func.__name__:
        return float(_cpu_flash_flops(func, args))
    return 0.0


GATHERS = {"index_select", "gather"}  # read as many source elements as they write


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's distinct elements: a dimension of stride 0 (broadcast by `expand`)
    repeats the same elements and adds none."""
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            count *= size
    return count * t.element_size() if t.numel() else 0


def _bytes(func, inputs, outputs) -> int:
    """Bytes read and written: every input and output's distinct elements once, except a
    gather's source, which is charged what the gather writes (the rows it picks: fewer than the
    source, or more when rows repeat)."""
    sizes = [_distinct_bytes(t) for t in inputs + outputs]
    if func.overloadpacket.__name__ in GATHERS and inputs and outputs:
        sizes[0] = outputs[0].numel() * inputs[0].element_size()
    return sum(sizes)


class OperatorTraffic(TorchDispatchMode):
    """Per operator: [calls, bytes read + written, flops]; `table` and `total_ms` price them."""

    def __init__(self, bandwidth: float = 2.8e12, peak_flops: float = 5e14,
                 launch_s: float = 4e-6, host_s: float = 18e-6):
        super().__init__()
        self.bandwidth, self.peak_flops, self.launch_s = bandwidth, peak_flops, launch_s
        self.host_s = host_s
        self.rows = defaultdict(lambda: [0, 0, 0.0])
        self.dispatches = 0    # every aten call, views included: the host's work
        self.peak_fraction: dict[str, float] = {}   # a priced kernel's share of the peak
        self.extra_host_s = 0.0                     # priced calls' host time beyond a dispatch

    _active: list = []  # the counters whose blocks are open (innermost last)

    def __enter__(self):
        OperatorTraffic._active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        OperatorTraffic._active.remove(self)
        return super().__exit__(*exc)

    @classmethod
    def charge(cls, name: str, nbytes: float, flops: float, peak_fraction: float = 1.0,
               host_s: float = 0.0) -> None:
        """Add a priced call (not an aten operator: `traffic_flex`) to the innermost counter: one
        host dispatch plus `host_s`, its flops at `peak_fraction` of the peak."""
        if cls._active:
            counter = cls._active[-1]
            row = counter.rows[name]
            row[0] += 1
            row[1] += int(nbytes)
            row[2] += float(flops)
            counter.dispatches += 1
            counter.peak_fraction[name] = peak_fraction
            counter.extra_host_s += host_s

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.dispatches += 1
        out = func(*args, **kwargs)
        # an out= argument is only written: it is counted once, as an output
        outs = {a.name for a in func._schema.arguments if a.is_out}
        read = (args, {k: v for k, v in kwargs.items() if k not in outs})
        inputs = [t for t in tree_flatten(read)[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not _moves_nothing(func, inputs, outputs):
            row = self.rows[func.__name__]
            row[0] += 1
            row[1] += _bytes(func, inputs, outputs)
            row[2] += _flops(func, args, kwargs, out)
        return out

    def op_ms(self, row, name: str = "") -> float:
        calls, nbytes, flops = row
        peak = self.peak_flops * self.peak_fraction.get(name, 1.0)
        return 1e3 * (max(nbytes / self.bandwidth, flops / peak) + calls * self.launch_s)

    def table(self, rows: int = 15) -> str:
        """Totals, then the operators with the largest estimated time."""
        calls = sum(r[0] for r in self.rows.values())
        nbytes = sum(r[1] for r in self.rows.values())
        flops = sum(r[2] for r in self.rows.values())
        lines = [f"{calls} operator calls, {nbytes / 2**30:.2f} GiB read + written, "
                 f"{flops / 1e12:.3f} TFLOP; device {self.device_ms():.2f} ms at "
                 f"{self.bandwidth / 1e12:g} TB/s, {self.peak_flops / 1e12:g} TFLOP/s, "
                 f"{self.launch_s * 1e6:g} µs per call",
                 f"{self.dispatches} aten calls with views; host {self.host_ms():.2f} ms at "
                 f"{self.host_s * 1e6:g} µs per call"
                 + (f" and {1e3 * self.extra_host_s:.2f} ms more for priced calls"
                    if self.extra_host_s else "")
                 + f"; estimate {self.total_ms():.2f} ms (the larger)", "",
                 f"{'operator':58s} {'calls':>6s} {'GiB':>8s} {'GFLOP':>9s} {'est. ms':>8s}"]
        for name, row in sorted(self.rows.items(), key=lambda kv: -self.op_ms(kv[1], kv[0]))[:rows]:
            lines.append(f"{name:58s} {row[0]:6d} {row[1] / 2**30:8.3f} {row[2] / 1e9:9.1f} "
                         f"{self.op_ms(row, name):8.3f}")
        return "\n".join(lines)

    def device_ms(self) -> float:
        return sum(self.op_ms(row, name) for name, row in self.rows.items())

    def host_ms(self) -> float:
        return 1e3 * (self.dispatches * self.host_s + self.extra_host_s)

    def total_ms(self) -> float:
        """The step's estimate: the device's time or, where longer, the host's."""
        return max(self.device_ms(), self.host_ms())
