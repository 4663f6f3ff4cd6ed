"""`--cuda-graphs`: time a case's step as one replayed CUDA graph (eager kernels, no compiler).

A layer with a few hundred small aten calls spends more time on the host launching kernels than
the GPU spends running them (at 8k most of ours do). Captured once in a `torch.cuda.CUDAGraph`
and replayed, the step costs the GPU's time alone: what a user gets from
`torch.cuda.make_graphed_callables` or from capturing a whole training step, without
`torch.compile`'s minutes of compiling per shape.

The capture follows PyTorch's documented recipe: warm-up runs on a side stream (lazy
initialisations, cuBLAS workspaces, compiled FlexAttention kernels), gradients set to None so
that the captured backward allocates them in the graph's memory pool, then one capture. Each
replay recomputes the output and writes fresh gradients (the captured backward assigns, it does
not accumulate).

A captured step replays the kernels it recorded with the addresses it recorded; a layer that
read a host value or copied a host tensor that is gone would replay stale data. So the replay's
result (the output for a forward, the input's gradient for a forward + backward) is compared
with the eager step's before anything is timed, and a case whose replay differs is an error,
not a time.
"""

from __future__ import annotations

from typing import Callable

import torch

WARMUP = 3  # at least, on the side stream before the capture
# relative L2 difference allowed between the replay's result and the eager step's: the same
# kernels on the same inputs, apart from the order of atomic additions (index_add, scatter
# backwards); a stale or wrong replay differs by O(1)
REPLAY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def check_replay(replayed: torch.Tensor, eager: torch.Tensor) -> float:
    """Relative L2 difference of the replay's result from the eager step's; raises
    RuntimeError above REPLAY_TOLERANCE for the dtype."""
    a, b = replayed.double(), eager.double()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    limit = REPLAY_TOLERANCE.get(eager.dtype, 1e-4)
    if not err <= limit:  # also catches NaN
        raise RuntimeError(f"CUDA graph replay differs from the eager step: relative L2 error "
                           f"{err:.3g} (allowed {limit:g} in {eager.dtype})")
    return err


def module_state(module: torch.nn.Module) -> Callable[[], None]:
    """A copy of the module's buffers now -> a function that puts them back. A training step
    may move buffers (routing's k-means centroids): the eager step that the replay is checked
    against and the captured step must start from the same ones."""
    saved = [(m, name, b.clone()) for m in module.modules() for name, b in m._buffers.items()
             if b is not None]

    def restore() -> None:
        for m, name, b in saved:
            m._buffers[name] = b

    return restore


def graphed_step(fn: Callable[[], object], result: Callable[[], torch.Tensor],
                 between: Callable[[], None] | None, device: torch.device, warmup: int,
                 module: torch.nn.Module | None = None) -> tuple[Callable[[], None], float]:
    """Capture `fn` (a forward or a forward + backward) in a CUDA graph after warm-up.

    result(): the tensor the step produces (read after a run: the output, or x.grad);
    between(): clears gradients (set to None) before a run, or None; module: the layer, whose
    buffers the capture starts from as the last eager step did.
    -> (replay, relative difference of the replay's result from the eager step's)."""
    runs = max(warmup, WARMUP)
    restore = None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(runs):
            if i == runs - 1 and module is not None:
                restore = module_state(module)   # before the step the replay is checked against
            if between is not None:
                between()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    eager = result().detach().clone()
    if restore is not None:
        restore()
    if between is not None:
        between()  # the captured backward allocates the gradients in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize(device)
    err = check_replay(result(), eager)
    return graph.replay, err
