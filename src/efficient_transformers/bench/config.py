"""What one benchmark run measures: the configuration, the cases, and the N-tied options table.

A *target* is one thing timed: a registered mechanism ("ours"), a reference kernel ("ref",
`bench/reference.py`) or a public package ("peer", `bench/peers.py`). A *case* is one target at
one length N in one mode:

- ``fwd``     forward only, eval mode under ``torch.no_grad()`` (inference);
- ``fwdbwd``  forward + backward in train mode, input requiring grad (a layer inside a network);
              the CLI mode ``causal`` is this with ``causal=True`` (mechanisms that decode);
- ``decode``  ``causal=True``, eval: a prefix of N - T tokens in one call, then T tokens one at a
              time; the time is per generated token, the state size is at context N.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..attention.base import check_positive_int

MODES = ("fwd", "fwdbwd", "decode", "causal")

# `efficient-transformers bench` with no arguments: about 3½ minutes on 2 CPU cores for the 18
# mechanisms and 4 reference kernels (205 s of cases measured on 2026-11-28; with `fwd` and
# `causal` added to the modes, 373 s).
DEFAULT_LENGTHS = (256, 1024, 4096)
DEFAULT_MODES = ("fwdbwd", "decode")
DEFAULT_REPEATS = 3
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_DECODE_TOKENS = 8
# `--compile MODE`: every target of fwd and fwd+bwd cases goes through torch.compile(mode=MODE)
# (decode stays eager). "reduce-overhead" replays CUDA graphs: no host time per aten call.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILED_WARMUP = 3  # at least: the first call compiles, CUDA graphs are recorded after warm-up


@dataclass
class BenchConfig:
    models: list[str] | None = None      # None: every registered mechanism + the reference kernels
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    modes: tuple[str, ...] = DEFAULT_MODES
    device: str = "cpu"
    dtype: str = "fp32"
    batch: int = 1
    dim: int = 512
    heads: int = 8
    repeats: int = DEFAULT_REPEATS
    warmup: int = 1
    decode_tokens: int = DEFAULT_DECODE_TOKENS
    peers: bool = False
    out: str = "bench-results"
    timeout: float = DEFAULT_TIMEOUT_S
    budget: float | None = None          # seconds for the whole run; later cases are skipped
    threads: int | None = None           # torch threads per case; None: torch's default
    clock: str = "wall"                  # "wall" or "cpu" (process CPU time; CPU device only)
    compile: str | None = None           # a torch.compile mode (COMPILE_MODES), or None: eager
    cuda_graphs: bool = False            # fwd / fwd+bwd steps captured once, replayed (CUDA)
    isolate: bool = True                 # run cases in worker processes (memory, timeouts)
    plots: bool = True
    progress: bool = True
    command: str = ""                    # the command line, for the report
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_config(cfg: BenchConfig) -> None:
    """Refuse impossible settings before anything runs (errors name the option)."""
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {cfg.device!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    for mode in cfg.modes:
        if mode not in MODES:
            raise ValueError(f"--modes: expected a subset of {list(MODES)}, got {mode!r}")
    if not cfg.lengths or any(int(n) < 2 for n in cfg.lengths):
        raise ValueError(f"--lengths: expected integers >= 2, got {list(cfg.lengths)}")
    for name, value, low in (("--batch", cfg.batch, 1), ("--dim", cfg.dim, 1),
                             ("--heads", cfg.heads, 1), ("--repeats", cfg.repeats, 1),
                             ("--warmup", cfg.warmup, 0), ("--decode-tokens", cfg.decode_tokens, 1)):
        check_positive_int(name, value, minimum=low)
    if cfg.threads is not None:
        check_positive_int("--threads", cfg.threads)
    if cfg.dim % cfg.heads:
        raise ValueError(f"--dim: expected a multiple of --heads={cfg.heads}, got {cfg.dim}")
    if cfg.clock not in ("wall", "cpu") or (cfg.clock == "cpu" and cfg.device != "cpu"):
        raise ValueError(f"--clock: expected wall, or cpu with --device cpu, got {cfg.clock!r}")
    if cfg.compile is not None and cfg.compile not in COMPILE_MODES:
        raise ValueError(f"--compile: expected one of {list(COMPILE_MODES)}, got {cfg.compile!r}")
    if cfg.cuda_graphs:
        if cfg.device != "cuda":
            raise ValueError(f"--cuda-graphs: expected --device cuda (CUDA graphs need a GPU), "
                             f"got --device {cfg.device}")
        if cfg.compile is not None:
            raise ValueError(f"--cuda-graphs: expected no --compile (got {cfg.compile!r}); "
                             "--compile reduce-overhead captures CUDA graphs of its own")
        if cfg.peers:
            raise ValueError("--cuda-graphs: expected no --peers (the paired ours / peer "
                             "timing runs eager)")
    if cfg.timeout <= 0:
        raise ValueError(f"--timeout: expected seconds > 0, got {cfg.timeout}")
    if cfg.models is not None and not cfg.models:
        raise ValueError("--models: expected at least one name, got none")
    shortest = min(int(n) for n in cfg.lengths)
    if "decode" in cfg.modes and cfg.decode_tokens >= shortest:
        raise ValueError(f"--decode-tokens: expected fewer than the shortest length {shortest} "
                         f"(decode reads a prompt of N - T tokens first), got {cfg.decode_tokens}")
    if cfg.budget is not None and not cfg.budget > 0:
        raise ValueError(f"--budget: expected seconds > 0, got {cfg.budget}")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device: cuda requested but torch.cuda.is_available() is False")


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ------------------------------------------------------------------ options tied to N
def grid_shape(n: int, axes: int = 2) -> tuple[int, ...]:
    """The most square raster grid with prod(shape) == n: 4096 -> (64, 64), 2048 -> (32, 64).

    For 2 axes: rows = the largest divisor of n not above sqrt(n). More axes: split recursively.
    """
    if axes <= 1:
        return (n,)
    target = round(n ** (1.0 / axes))
    rows = max(d for d in range(1, max(target, 1) + 1) if n % d == 0)
    return (rows, *grid_shape(n // rows, axes - 1))


def _shape_for(n: int, default: Any) -> tuple[int, ...]:
    axes = len(default) if isinstance(default, (tuple, list)) and len(default) >= 2 else 2
    return grid_shape(n, axes)


def _max_len_for(n: int, default: Any) -> int | None:
    if default is None or (isinstance(default, int) and default < n):
        return n
    return default


def _sqrt_for(n: int, default: Any) -> int:
    """sqrt(N) as a power of two, at least 8 (the Sparse Transformer's default summary_size)."""
    return max(8, 2 ** round(math.log2(math.sqrt(max(n, 1)))))


# option name -> fn(N, default) giving the value used at length N. Only these options are
# touched; every other option keeps the mechanism's default. Documented in docs/benchmarks.md.
LENGTH_TIED_OPTIONS = {
    "shape": _shape_for,        # an image / grid input: the most square grid of N positions
    "max_len": _max_len_for,    # a fixed maximum length (Linformer's projection): at least N
    "stride": _sqrt_for,        # Sparse Transformer: stride l close to sqrt(N) (section 4.2)
    "num_clusters": _sqrt_for,  # Routing Transformer: sqrt(N) clusters of sqrt(N) tokens
}


def length_options(spec_options: dict[str, Any], n: int) -> dict[str, Any]:
    """Options to pass at length N for a mechanism whose defaults are `spec_options`."""
    return {k: fn(n, spec_options[k]) for k, fn in LENGTH_TIED_OPTIONS.items() if k in spec_options}


def label(target: str, causal: bool, mode: str) -> str:
    """The series name of a target in the report: 'performer' or 'performer (causal)'."""
    return f"{target} (causal)" if causal and mode != "decode" else target
