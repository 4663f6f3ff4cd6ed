"""`efficient-transformers bench`: time and memory of every mechanism against N (see docs/benchmarks.md)."""

from __future__ import annotations

import shlex
import sys


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t.lower().replace("k", "")) * (1024 if t.lower().endswith("k") else 1)
                     for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--lengths: expected comma-separated integers like 256,1024,4k, "
                         f"got {text!r}") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run(args) -> int:
    from ..bench.config import BenchConfig
    from ..bench.report import render_terminal
    from ..bench.runner import run_bench

    cfg = BenchConfig(
        models=_names(args.models) if args.models else None,
        lengths=_ints(args.lengths), modes=tuple(_names(args.modes)), device=args.device,
        dtype=args.dtype, batch=args.batch, dim=args.dim, heads=args.heads,
        repeats=args.repeats, warmup=args.warmup, decode_tokens=args.decode_tokens,
        clock=args.clock, compile=args.compile, cuda_graphs=args.cuda_graphs,
        peers=args.peers, out=args.out, timeout=args.timeout, budget=args.budget,
        threads=args.threads,
        isolate=not args.in_process, plots=not args.no_plots, progress=not args.quiet,
        command="efficient-transformers " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if sys.argv and sys.argv[0].endswith(("efficient-transformers", "__main__.py"))
        else "efficient-transformers bench")
    if args.from_json:  # re-render the reports of an earlier run, run nothing
        import json

        from ..bench.analysis import analyse
        from ..bench.report import write_reports

        runs = []
        for path in _names(args.from_json):
            with open(path) as f:
                runs.append(json.load(f))
        results = runs[0]  # several runs (same device and sizes): their records together
        for more in runs[1:]:
            results["records"] += more["records"]
            results["elapsed_s"] = round(results["elapsed_s"] + more["elapsed_s"], 1)
            modes = results["config"]["modes"] + [m for m in more["config"]["modes"]
                                                  if m not in results["config"]["modes"]]
            results["config"]["modes"] = modes
            results["config"]["command"] += "`, then `" + more["config"].get("command", "")
        results["analysis"] = analyse(results)
        results["files"] = write_reports(results, args.out, plots=not args.no_plots)
    else:
        import signal

        def _terminate(signum, frame):  # SIGTERM: stop like Ctrl-C, workers included
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            results = run_bench(cfg)
        finally:
            signal.signal(signal.SIGTERM, previous)
    print(render_terminal(results))
    print(f"\nwrote {', '.join(results['files'])}")
    if args.update_doc:
        from ..bench.report import update_doc

        cfg = results["config"]
        section = args.doc_section or cfg["device"] + ("-graphs" if cfg.get("cuda_graphs") else "")
        update_doc(args.update_doc, results, section)
        print(f"updated the '{section}' section of {args.update_doc}")
    return 0


def add_parser(subparsers) -> None:
    from ..bench import config as c

    p = subparsers.add_parser(
        "bench", help="time and memory of each attention against N; scaling fits; peers",
        description="Benchmark one attention layer (projections included) per mechanism at each "
                    "length: forward, forward+backward, decode; peak memory; exponent fits "
                    "against the survey's complexity; crossover with dense attention. Writes "
                    "bench.json, bench.csv, bench.md and PNG plots to --out.")
    p.add_argument("--models", default=None,
                   help="comma-separated mechanisms, reference kernels (dense_sdpa, "
                        "dense_sdpa_causal, flex_window, linear_chunked_causal) or peers; "
                        "default: every registered mechanism and the reference kernels")
    p.add_argument("--lengths", default=",".join(map(str, c.DEFAULT_LENGTHS)),
                   help="comma-separated N (256,1024,4k); default %(default)s")
    p.add_argument("--modes", default=",".join(c.DEFAULT_MODES),
                   help="comma-separated of fwd, fwdbwd, decode, causal (causal fwd+bwd); "
                        "default %(default)s")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(c.DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=c.DEFAULT_REPEATS,
                   help="timed runs per case (median); default %(default)s")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first; default 1")
    p.add_argument("--decode-tokens", type=int, default=c.DEFAULT_DECODE_TOKENS,
                   help="tokens decoded one at a time after the prefix; default %(default)s")
    p.add_argument("--peers", action="store_true",
                   help="also time the public packages (pip install 'efficient-transformers[peers]')")
    p.add_argument("--out", default="bench-results", help="output folder; default %(default)s")
    p.add_argument("--timeout", type=float, default=c.DEFAULT_TIMEOUT_S,
                   help="seconds per case before it is recorded as timeout; default %(default)s")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: cases left when it is spent are recorded "
                        "as skipped (shortest lengths run first)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time (default); cpu: CPU time of the case's process, "
                        "all threads (CPU only; with --threads 1 it is robust to other load "
                        "on a shared machine)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per case")
    p.add_argument("--compile", default=None, choices=c.COMPILE_MODES, metavar="MODE",
                   help="time every layer through torch.compile(mode=MODE) for fwd and fwdbwd "
                        "(decode stays eager): " + ", ".join(c.COMPILE_MODES) + "; "
                        "reduce-overhead replays CUDA graphs. Default: eager")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: capture each fwd and fwdbwd step once after warm-up and "
                        "time its replays (eager kernels, no host time per call, no "
                        "compiling); the replay is checked against the eager step first")
    p.add_argument("--in-process", action="store_true",
                   help="run cases in this process (no timeouts, no CPU memory isolation)")
    p.add_argument("--update-doc", metavar="PATH", default=None,
                   help="also put the report between the '<!-- bench:SECTION start/end -->' "
                        "markers of PATH (e.g. docs/benchmarks.md)")
    p.add_argument("--doc-section", default=None,
                   help="section name for --update-doc; default: the device (cpu, cuda), "
                        "cuda-graphs for a --cuda-graphs run")
    p.add_argument("--from-json", metavar="FILE", default=None,
                   help="re-render the reports (and --update-doc) from earlier bench.json "
                        "files (comma-separated: their records together) instead of running")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
