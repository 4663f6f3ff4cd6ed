"""Run one case in this process: build the target, time it, measure its peak memory.

Timing: `warmup` untimed runs, then the median of `repeats` timed runs (``perf_counter``, with
``torch.cuda.synchronize()`` before and after each run on CUDA; or, with ``clock="cpu"``, the
process's CPU time, all threads, which other processes on a shared machine do not inflate).

Peak memory comes from one run after the warm-up and before the timed runs (a decode: the
prefix and its tokens once more), *above the baseline* taken just before it (the built layer, its
input and the output gradient exist; lazy initialisations are done), so it counts activations,
temporaries, saved tensors and parameter gradients:
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus the
  allocated bytes at the baseline (exact; the caching allocator's reserve is not counted);
- CPU: the process's resident-set high-water mark (``VmHWM`` in /proc/self/status), reset to the
  current RSS by writing 5 to /proc/self/clear_refs at the baseline, minus ``VmRSS`` there. A
  worker process (a fresh one per CPU case) starts with glibc's mmap threshold at 64 KiB, so
  every tensor of 64 KiB or more is its own mapping, returned to the OS when freed: RSS follows
  the live tensors. Where clear_refs is not writable, ``ru_maxrss`` minus the baseline RSS is
  used (an upper bound) and the record says ``mem_method: ru_maxrss``.

Allocator for the timed CPU runs: that 64 KiB threshold makes every large allocation page-fault
afresh, which would inflate the times of code that allocates much, so after the memory run the
worker sets glibc to the state its own dynamic thresholds reach in a long-running process
(mmap threshold 32 MiB, trim threshold 64 MiB: tensors up to 32 MiB reuse heap memory) and
times the next runs: what a user's process sees.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import time
from typing import Any

import torch

from .config import COMPILED_WARMUP, DTYPES, length_options

MIB = 2.0 ** 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
ISOLATED_WORKER = False  # set by a worker process: this process belongs to one case


def _mallopt(trim: int | None, mmap_threshold: int) -> None:
    """Set glibc's thresholds; nothing where it is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        if trim is not None:
            libc.mallopt(M_TRIM_THRESHOLD, trim)
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    except (OSError, AttributeError):
        pass


def instrument_allocator() -> None:
    """For memory runs: mmap every allocation of 64 KiB or more (RSS follows live tensors)."""
    _mallopt(None, 64 * 1024)


def steady_allocator() -> None:
    """For timed runs in a worker: glibc's long-running state (see the module docstring)."""
    if ISOLATED_WORKER:
        _mallopt(64 * 2 ** 20, 32 * 2 ** 20)


# ------------------------------------------------------------------------- CPU memory
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuPeak:
    """Peak resident memory above the current level, in bytes (see the module docstring)."""

    def __init__(self):
        gc.collect()
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "ru_maxrss"
        rss = _proc_status_kib("VmRSS")
        if rss is None:  # not Linux: no way to read it
            self.method = "unavailable"
        self.base_kib = rss or 0

    def peak_bytes(self) -> int | None:
        if self.method == "VmHWM":
            hwm = _proc_status_kib("VmHWM")
        elif self.method == "ru_maxrss":
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        else:
            return None
        return max(0, (hwm or 0) - self.base_kib) * 1024


class CudaPeak:
    def __init__(self, device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.device = device
        self.method = "max_memory_allocated"
        self.base = torch.cuda.memory_allocated(device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)


# --------------------------------------------------------------------------- targets
def build_target(case: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module a case times, and the options used (for the record)."""
    kind, name, n = case["kind"], case["target"], case["n"]
    dim, heads = case["dim"], case["heads"]
    causal = case["causal"] or case["mode"] == "decode"
    if kind == "ours":
        import efficient_transformers as et

        options = {**length_options(et.attention_spec(name).options, n), **case.get("options", {})}
        return et.build_attention(name, dim=dim, heads=heads, causal=causal, **options), options
    if kind == "ref":
        from .reference import build_reference

        return build_reference(name, dim, heads, n), {}
    if kind == "peer":
        from .peers import build_peer

        return build_peer(name, dim, heads, n), {}
    raise ValueError(f"case kind: expected ours, ref or peer, got {kind!r}")


def sync_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, warmup: int, repeats: int, start_peak, between=None,
           clock=time.perf_counter, host_times: list | None = None):
    """Warm-up runs, one run for the peak memory above a baseline taken just before it, then
    `repeats` timed runs -> (times, peak bytes or None, memory method). `host_times`, when
    given, gets for each timed run the time until `fn` returned, before the closing
    synchronisation: on CUDA the host's share of the step (close to the whole step when the
    host, not the GPU, sets the pace)."""
    for _ in range(warmup):
        if between is not None:
            between()
        fn()
    if between is not None:
        between()
    peak = start_peak()
    fn()
    peak_bytes, method = peak.peak_bytes(), peak.method
    if device.type == "cpu":
        steady_allocator()  # the median of the timed runs absorbs the first one's heap growth
    times = []
    for _ in range(repeats):
        if between is not None:
            between()
        sync_device(device)
        t0 = clock()
        fn()
        if host_times is not None:
            host_times.append(clock() - t0)
        sync_device(device)
        times.append(clock() - t0)
    return times, peak_bytes, method


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Measure one case; returns {"status": "ok", "time_ms", "peak_mib", ...}. Raises on failure.

    `cpu_s` is the CPU time of the whole case (build, warm-up, timed runs; all threads): on a
    loaded machine it tells what the case would cost alone.
    """
    cpu0 = time.process_time()
    result = _run_case(case)
    result["cpu_s"] = round(time.process_time() - cpu0, 3)
    return result


def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(case["device"])
    dtype = getattr(torch, DTYPES[case["dtype"]])
    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    torch.manual_seed(0)
    layer, options = build_target(case)
    layer = layer.to(device=device, dtype=dtype)
    b, n, dim, mode = case["batch"], case["n"], case["dim"], case["mode"]
    x = torch.randn(b, n, dim, device=device, dtype=dtype)
    result: dict[str, Any] = {"options": options}
    warmup, repeats = case["warmup"], case["repeats"]
    if case.get("compile") and mode != "decode":
        torch._dynamo.reset()  # a worker's earlier cases must not fill the recompile limit
        layer = compiled(layer, case)
        warmup = max(warmup, COMPILED_WARMUP)
        result["compiled"] = case["compile"]
    if case.get("cuda_graphs") and mode != "decode":
        result["cuda_graphs"] = True
    clock = time.process_time if case.get("clock") == "cpu" else time.perf_counter

    def start_peak():
        return CudaPeak(device) if device.type == "cuda" else CpuPeak()

    host = [] if device.type == "cuda" else None   # on the CPU the host is the device
    if mode == "fwd":
        layer.eval()
        last = {}

        def forward():
            last["y"] = layer(x)

        with torch.no_grad():
            if case.get("cuda_graphs"):
                times, peak_bytes, method, result["replay_error"] = _timed_graph(
                    forward, lambda: last["y"], None, device, case, start_peak, clock, host,
                    layer)
            else:
                times, peak_bytes, method = _timed(forward, device, warmup, repeats,
                                                   start_peak, clock=clock, host_times=host)
    elif mode == "fwdbwd":
        step, clear = training_step(layer, x)
        if case.get("cuda_graphs"):
            times, peak_bytes, method, result["replay_error"] = _timed_graph(
                step, lambda: x.grad, clear, device, case, start_peak, clock, host, layer)
        else:
            times, peak_bytes, method = _timed(step, device, warmup, repeats, start_peak,
                                               between=clear, clock=clock, host_times=host)
        if case.get("pair"):
            result["paired"] = _paired(case, layer, x, device, dtype, clock)
    elif mode == "decode":
        result.update(_decode(layer, x, case, start_peak))
        return result
    else:
        raise ValueError(f"mode: expected fwd, fwdbwd or decode, got {mode!r}")
    result.update(status="ok", time_ms=statistics.median(times) * 1e3,
                  times_ms=[t * 1e3 for t in times])
    if host:
        result["host_ms"] = statistics.median(host) * 1e3
    result.update(peak_mib=None if peak_bytes is None else peak_bytes / MIB,
                  mem_method=method)
    return result


def _timed_graph(fn, result, between, device, case, start_peak, clock, host, layer):
    """`--cuda-graphs`: warm-up and one capture (`cuda_graphs.graphed_step`), then the timed
    replays -> (times, peak bytes over the warm-up and the capture, method, the replay's
    relative difference from the eager step)."""
    from .cuda_graphs import graphed_step

    peak = start_peak()
    replay, err = graphed_step(fn, result, between, device, case["warmup"], layer)
    peak_bytes, method = peak.peak_bytes(), peak.method
    times, _, _ = _timed(replay, device, 0, case["repeats"], start_peak, clock=clock,
                         host_times=host)
    return times, peak_bytes, method, err


def compiled(layer, case):
    """`layer` through torch.compile with the case's mode (`--compile`)."""
    return torch.compile(layer, mode=case["compile"])


def training_step(layer, x):
    """(step, clear) for forward + backward of `layer` on x (B, N, dim) with a fixed random output
    gradient (and the layer's aux loss, if it has one, with gradient 1)."""
    layer.train()
    x.requires_grad_(True)
    grad = torch.randn_like(x)

    def step():
        y = layer(x)
        aux = getattr(layer, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and aux.requires_grad:
            torch.autograd.backward([y, aux], [grad, torch.ones_like(aux)])
        else:
            y.backward(grad)

    def clear():
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return step, clear


def _paired(case, peer_layer, x, device, dtype, clock) -> dict[str, Any]:
    """A peer case's paired timing, after its own runs: our layer (case["pair"]) is built in
    the same process and the two alternate, one forward + backward each per round (the order
    swapped every round), so that a drift of the machine's speed, or a process that runs
    slower as a whole, weighs on both sides alike. -> medians of both and their ratio."""
    pair = case["pair"]
    torch.manual_seed(0)
    ours, _ = build_target(dict(case, kind="ours", target=pair["target"], causal=pair["causal"],
                                options=pair.get("options") or {}))
    ours = ours.to(device=device, dtype=dtype)
    if case.get("compile"):
        ours = compiled(ours, case)
    x_ours = x.detach().clone()
    sides = {"ours": training_step(ours, x_ours), "peer": training_step(peer_layer, x)}
    for _ in range(case["warmup"]):
        for step, clear in sides.values():
            clear()
            step()
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    for i in range(case["repeats"]):
        for side in (("ours", "peer") if i % 2 == 0 else ("peer", "ours")):
            step, clear = sides[side]
            clear()
            sync_device(device)
            t0 = clock()
            step()
            sync_device(device)
            times[side].append(clock() - t0)
    ours_ms, peer_ms = (statistics.median(times[k]) * 1e3 for k in ("ours", "peer"))
    return {"ours_ms": ours_ms, "peer_ms": peer_ms, "ratio": ours_ms / peer_ms,
            "ours_times_ms": [t * 1e3 for t in times["ours"]],
            "peer_times_ms": [t * 1e3 for t in times["peer"]]}


def _decode(layer, x, case, start_peak) -> dict[str, Any]:
    """Prefix of N - T tokens in one call, then T single tokens; time per token, state at N.
    A pass for the peak memory first, then the same decode again, timed."""
    device = x.device
    n = x.shape[1]
    tokens = max(1, min(case.get("decode_tokens", 8), n - 1))
    clock = time.process_time if case.get("clock") == "cpu" else time.perf_counter

    def generate(times=None):
        _, state = layer.decode(x[:, : n - tokens], None)
        for t in range(n - tokens, n):
            sync_device(device)
            t0 = clock()
            _, state = layer.decode(x[:, t: t + 1], state)
            sync_device(device)
            if times is not None:
                times.append(clock() - t0)
        return state

    layer.eval()
    with torch.no_grad():
        if n >= 3:  # warm-up: lazy initialisations happen before the baseline
            _, warm = layer.decode(x[:, :2], None)
            layer.decode(x[:, 2:3], warm)
            del warm
        peak = start_peak()
        state = generate()
        peak_bytes = peak.peak_bytes()
        del state
        if device.type == "cpu":
            steady_allocator()  # the untimed prefix grows the heap
        times = []
        state = generate(times)
    from ..attention.base import state_nbytes

    timed = times[1:] if len(times) > 1 else times  # the first step is the warm-up
    return {"status": "ok", "time_ms": statistics.median(timed) * 1e3,
            "times_ms": [t * 1e3 for t in timed], "state_bytes": state_nbytes(state),
            "decode_tokens": tokens,
            "peak_mib": None if peak_bytes is None else peak_bytes / MIB,
            "mem_method": peak.method}


def classify_error(err: BaseException) -> str:
    """'oom' for out-of-memory errors (CPU allocator or CUDA), else 'error: Type: message'."""
    text = f"{type(err).__name__}: {err}"
    lowered = text.lower()
    oom_cuda = getattr(torch.cuda, "OutOfMemoryError", None)
    if (oom_cuda is not None and isinstance(err, oom_cuda)) or isinstance(err, MemoryError) \
            or "out of memory" in lowered or "can't allocate memory" in lowered \
            or "cannot allocate memory" in lowered:
        return "oom"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return "error: " + first[:300]
