"""Where a layer's forward + backward spends its time: the top operators (CPU) or kernels (CUDA)
of a few profiled steps, one text table per mechanism, for the mechanisms that miss a target.

    python -m efficient_transformers.bench.profile --models performer,reformer --length 65536 \
        --device cuda --dtype bf16 --out bench-results/profile --budget 60
    python -m efficient_transformers.bench.profile --missed bench-results/cuda/bench.json ...

Each mechanism is built as the benchmark builds it (`measure.build_target`: default options,
N-tied ones from `config.py`), run `--warmup` times, then profiled for `--steps` steps with
`torch.profiler`. Writes <out>/<name>.txt (the table, sorted by device time on CUDA, by self CPU
time on CPU; <name>-causal.txt for a causal form) and prints one summary line per mechanism; a
mechanism that fails (out of memory, say) gets its error in its file instead. Stops starting new
mechanisms once `--budget` seconds have passed. `--missed` takes the mechanisms from a
benchmark's bench.json instead: the subjects of the targets that run missed, each in the form
(causal or not) that missed; `benchmarks/cuda.sh` runs it after the CUDA benchmark. `--traffic`
counts each operator's bytes and flops over one step instead (`traffic.py`: an estimate for a
GPU that runs on any device); with `--as-cuda` the layers take the paths they take on CUDA
(`functional/paths.py`), FlexAttention excepted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

from .config import DTYPES, label
from .measure import build_target, sync_device, training_step
from .reference import REFERENCES, is_reference
from .runner import target_kind


def _prepared_step(name: str, n: int, device: str, dtype: str, causal: bool, warmup: int,
                   dim: int, heads: int):
    """(step, clear, device) for forward + backward of `name` as the benchmark builds it, after
    `warmup` steps."""
    dev = torch.device(device)
    torch.manual_seed(0)
    case = {"kind": target_kind(name), "target": name, "n": n, "dim": dim, "heads": heads,
            "causal": causal, "mode": "fwdbwd"}
    layer, _ = build_target(case)
    layer = layer.to(device=dev, dtype=getattr(torch, DTYPES[dtype]))
    x = torch.randn(1, n, dim, device=dev, dtype=next(layer.parameters()).dtype)
    step, clear = training_step(layer, x)
    for _ in range(warmup):
        clear()
        step()
    sync_device(dev)
    return step, clear, dev


def profile_mechanism(name: str, n: int, device: str, dtype: str, causal: bool = False,
                      warmup: int = 2, steps: int = 2, rows: int = 15, dim: int = 512,
                      heads: int = 8) -> tuple[str, float]:
    """(the profiler's table for `steps` forward + backward steps of `name` at length n,
    the median step time in ms over those steps)."""
    from torch.profiler import ProfilerActivity, profile

    step, clear, dev = _prepared_step(name, n, device, dtype, causal, warmup, dim, heads)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    times = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            clear()
            start = time.perf_counter()
            step()
            sync_device(dev)
            times.append((time.perf_counter() - start) * 1e3)
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows)
    return table, sorted(times)[len(times) // 2]


def traffic_mechanism(name: str, n: int, device: str, dtype: str, causal: bool = False,
                      rows: int = 15, dim: int = 512, heads: int = 8,
                      as_cuda: bool = False) -> tuple[str, float]:
    """(the operator-traffic table of one forward + backward step of `name` at length n, its
    estimated H100 time in ms): `traffic.OperatorTraffic`, an estimate, not a measurement.
    `as_cuda`: the layer takes the paths it takes on CUDA (`functional.paths.cuda_paths`), its
    FlexAttention calls priced instead of run (`traffic_flex`)."""
    from ..functional.paths import cuda_paths
    from .traffic import OperatorTraffic
    from .traffic_flex import priced_flex_paths

    paths = contextlib.ExitStack()
    if as_cuda:
        paths.enter_context(cuda_paths())
        paths.enter_context(priced_flex_paths())
    with paths:
        step, clear, _ = _prepared_step(name, n, device, dtype, causal, 1, dim, heads)
        clear()
        counter = OperatorTraffic()
        with counter:
            step()
    return counter.table(rows), counter.total_ms()


def missed_subjects(results: dict) -> list[tuple[str, bool]]:
    """[(mechanism or reference name, causal)] of the targets a benchmark run missed
    (`results`: a bench.json), in the order of its target rows, each once. A peer row's subject
    'ours vs peer' names ours."""
    import efficient_transformers as et

    known = set(et.list_attention()) | set(REFERENCES)
    found: list[tuple[str, bool]] = []
    for row in results.get("analysis", {}).get("targets", []):
        if row.get("met") is not False:
            continue
        subject = row["subject"].split(" vs ")[0]
        causal = subject.endswith(" (causal)")
        name = subject.removesuffix(" (causal)")
        if name in known and (name, causal) not in found:
            found.append((name, causal))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m efficient_transformers.bench.profile",
                                description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--models", help="comma-separated registry names or reference kernels "
                                        "(bench/reference.py)")
    which.add_argument("--missed", metavar="BENCH_JSON",
                       help="a benchmark's bench.json: profile the subjects of the targets it "
                            "missed (each causal or not as it missed; --causal is ignored)")
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--causal", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", default="bench-results/profile")
    p.add_argument("--traffic", action="store_true",
                   help="count each operator's bytes and flops over one step instead of timing "
                        "(bench/traffic.py: an estimate for a GPU, on any device)")
    p.add_argument("--as-cuda", action="store_true",
                   help="with --traffic: the layers take the paths they take on CUDA "
                        "(functional/paths.py; FlexAttention excepted)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds after which no new mechanism starts; default %(default)s")
    args = p.parse_args(argv)
    import efficient_transformers as et

    if args.as_cuda and not args.traffic:
        p.error("--as-cuda: applies to --traffic only (timing on the CPU would mislead)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device: cuda was asked for but torch sees no CUDA device; use --device cpu")
    if args.missed is not None:
        try:
            with open(args.missed, encoding="utf-8") as f:
                todo = missed_subjects(json.load(f))
        except (OSError, ValueError) as err:
            p.error(f"--missed: expected a readable bench.json, got {args.missed!r} ({err})")
        if not todo:
            print(f"no missed target in {args.missed}: nothing to profile")
            return 0
    else:
        models = [m for m in args.models.split(",") if m]
        unknown = [m for m in models if m not in et.list_attention() and not is_reference(m)]
        if unknown or not models:
            p.error(f"--models: expected registered mechanisms from {et.list_attention()} or "
                    f"reference kernels {list(REFERENCES)}, got {unknown or args.models!r}")
        todo = [(m, args.causal) for m in models]
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    for name, causal in todo:
        what = label(name, causal, "fwdbwd")
        if time.perf_counter() - start > args.budget:
            print(f"{what}: not profiled (budget of {args.budget:g} s spent)")
            continue
        try:
            if args.traffic:
                table, ms = traffic_mechanism(name, args.length, args.device, args.dtype,
                                              causal, args.rows, as_cuda=args.as_cuda)
                summary = f"{what}: N={args.length} {args.dtype} fwd+bwd estimate {ms:.2f} ms"
            else:
                table, ms = profile_mechanism(name, args.length, args.device, args.dtype,
                                              causal, args.warmup, args.steps, args.rows)
                summary = f"{what}: N={args.length} {args.dtype} fwd+bwd {ms:.2f} ms per step"
            text = f"{summary}\n\n{table}\n"
        except Exception as err:  # noqa: BLE001 - an OOM or a failure is a result, not a stop
            summary = f"{what}: N={args.length} failed: {type(err).__name__}: {err}"[:300]
            text = summary + "\n"
        if args.device == "cuda":
            torch.cuda.empty_cache()
        stem = f"{name}-causal" if causal else name
        with open(os.path.join(args.out, f"{stem}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        print(summary, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
