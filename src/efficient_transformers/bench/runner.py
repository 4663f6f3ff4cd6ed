"""Run a benchmark: enumerate the cases, run each in a worker, analyse, write the reports."""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from typing import Any

import torch

from .config import BenchConfig, check_config, label
from .reference import REFERENCES, cuda_only_note, is_reference, same_mask_references
from .worker import CaseRunner


def target_kind(name: str) -> str:
    """The kind of a target name: "ref" (bench/reference.py), "peer" (bench/peers.py) or
    "ours" (a registered mechanism)."""
    from .peers import PEERS

    if is_reference(name):
        return "ref"
    if name in PEERS:
        return "peer"
    return "ours"


def resolve_targets(cfg: BenchConfig) -> list[tuple[str, str]]:
    """[(kind, name)] to run: --models (or every mechanism + the references), + peers."""
    import efficient_transformers as et

    registered = et.list_attention()
    if cfg.models is None:
        names = registered + list(REFERENCES)
    else:
        names = list(dict.fromkeys(cfg.models))
        from .peers import PEERS

        known = set(registered) | set(REFERENCES) | set(same_mask_references()) | set(PEERS)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--models: unknown {unknown}; expected registered mechanisms "
                             f"{registered}, references {list(REFERENCES)}, same-mask "
                             f"references {list(same_mask_references())} or peers "
                             f"{sorted(PEERS)}")
    targets = [(target_kind(n), n) for n in names]
    if cfg.peers:  # every peer, or with --models the peers of the mechanisms listed
        from .peers import PEERS

        for peer in PEERS.values():
            wanted = cfg.models is None or peer.ours in names
            if wanted and ("peer", peer.name) not in targets:
                targets.append(("peer", peer.name))
    return targets


def peer_runs(modes) -> list[tuple[str, bool]]:
    """(mode, causal) runs of a peer: forward and forward+backward of those asked, else
    forward+backward (a causal peer builds its causal module itself)."""
    return [(m, False) for m in modes if m in ("fwd", "fwdbwd")] or [("fwdbwd", False)]


def build_cases(cfg: BenchConfig) -> list[dict[str, Any]]:
    import efficient_transformers as et
    from .peers import PEERS

    registered = set(et.list_attention())
    targets = resolve_targets(cfg)
    # Peers that pair with a causal form make our mechanism's causal fwd+bwd part of the run.
    causal_needed = {PEERS[n].ours for k, n in targets if k == "peer" and PEERS[n].causal}
    cases = []
    base = dict(device=cfg.device, dtype=cfg.dtype, batch=cfg.batch, dim=cfg.dim,
                heads=cfg.heads, repeats=cfg.repeats, warmup=cfg.warmup,
                decode_tokens=cfg.decode_tokens, threads=cfg.threads, clock=cfg.clock,
                compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)
    for kind, name in targets:
        decodes = kind == "ours" and et.attention_spec(name).decode
        runs: list[tuple[str, bool]] = []
        for mode in cfg.modes:
            if mode in ("fwd", "fwdbwd"):
                runs.append((mode, False))
            elif mode == "decode" and decodes:
                runs.append(("decode", True))
            elif mode == "causal" and decodes:
                runs.append(("fwdbwd", True))
        if kind == "peer":
            runs = peer_runs(cfg.modes)
        if kind == "ours" and name in causal_needed and decodes:
            # the causal form in the modes its causal peer runs in
            runs += [(m, True) for m, _ in peer_runs(cfg.modes) if (m, True) not in runs]
        lengths = sorted(int(n) for n in cfg.lengths)
        peer = PEERS.get(name) if kind == "peer" else None
        if peer is not None and peer.options is not None and peer.ours in registered:
            # ours at the peer's settings, just before the peer's own cases
            cases += [dict(base, kind="ours", target=peer.ours, mode=mode, causal=causal, n=n,
                           label=peer.ours_label, options=peer.options(n, cfg.heads),
                           registered=True, for_peer=name)
                      for mode, causal in runs for n in lengths]
        for mode, causal in runs:
            for n in lengths:
                case = dict(base, kind=kind, target=name, mode=mode, causal=causal, n=n,
                            label=label(name, causal, mode), registered=name in registered)
                if peer is not None and mode == "fwdbwd" and peer.ours in registered:
                    # after its own runs, the peer's worker times ours against it, alternating
                    case["pair"] = {"target": peer.ours, "causal": peer.causal,
                                    "options": peer.options(n, cfg.heads) if peer.options else {}}
                cases.append(case)
    return sorted(cases, key=_case_order(targets))


def _case_order(targets: list[tuple[str, str]]):
    """Sort key: shorter lengths first across all targets (a --budget cut drops the longest
    cases, and a timeout at N skips the longer N of the same series); at one length, the
    reference kernels first (a budget cut inside a length leaves the baselines that every ratio
    needs), then a peer right after the mechanism it pairs with, so that a slow drift of the
    machine's speed during a run (other load on a shared host) biases ours / peer as little as
    it can."""
    from .peers import PEERS

    position = {name: i for i, (_, name) in enumerate(targets)}

    def key(case):
        name = case.get("for_peer") or case["target"]
        if case["kind"] == "peer" or case.get("for_peer"):
            peer = PEERS[name]
            return case["n"], 1, position.get(peer.ours, position[name]), peer.causal
        return case["n"], case["kind"] != "ref", position[name], case["causal"]

    return key


def _precheck(case: dict[str, Any]) -> dict[str, Any] | None:
    """A result recorded without running: peer not installed, CUDA-only reference on CPU."""
    if case["kind"] == "peer":
        from .peers import PEERS, installed

        peer = PEERS[case["target"]]
        if not installed(peer):
            return {"status": "not installed", "note": f"pip install {peer.package}"}
    note = cuda_only_note(case["target"]) if case["kind"] == "ref" else None
    if note and case["device"] != "cuda":
        return {"status": "skipped", "note": note}
    return None


def environment(cfg: BenchConfig) -> dict[str, Any]:
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "threads": cfg.threads or torch.get_num_threads(),
    }
    if cfg.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def run_bench(cfg: BenchConfig, write: bool = True) -> dict[str, Any]:
    """Run every case of `cfg`; returns the result dict (also written to cfg.out if `write`)."""
    check_config(cfg)
    from .analysis import analyse

    cases = build_cases(cfg)
    # CPU: a fresh process per case (its RSS peak is the case's). CUDA: one process for all
    # cases (the allocator's peak is reset per case; compiled kernels are reused), replaced
    # after a timeout, a crash or a CUDA error.
    runner = CaseRunner(cfg.timeout, isolate=cfg.isolate, fresh_per_case=cfg.device == "cpu")
    failed_at: dict[tuple, tuple[int, str]] = {}
    records = []
    started = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), unit="case", dynamic_ncols=True, desc="bench")
    try:
        for case in cases:
            if bar is not None:
                bar.set_postfix_str(f"{case['label']} {case['mode']} N={case['n']}", refresh=True)
            key = (case["kind"], case["label"], case["mode"], case["causal"])
            result = _precheck(case)
            if result is None and key in failed_at:
                n0, status = failed_at[key]
                result = {"status": status, "note": f"not run: {status} at N={n0}"}
            if result is None and cfg.budget and time.perf_counter() - started > cfg.budget:
                result = {"status": "skipped", "note": f"over the run budget of {cfg.budget:g} s"}
            if result is None:
                t0 = time.perf_counter()
                result = runner.run(case, group=cfg.device)
                result["wall_s"] = round(time.perf_counter() - t0, 3)
                if result["status"] in ("timeout", "oom"):
                    failed_at[key] = (case["n"], result["status"])
            record = {k: case[k] for k in ("label", "kind", "target", "mode", "causal", "n",
                                           "batch", "dim", "heads", "dtype", "device")}
            record.update(result)
            records.append(record)
            if bar is not None:
                bar.update(1)
    except BaseException:  # interrupted: do not leave a worker computing
        runner.close(kill=True)
        raise
    finally:
        runner.close()
        if bar is not None:
            bar.close()
    results = {"config": cfg.to_dict(), "environment": environment(cfg), "records": records,
               "elapsed_s": round(time.perf_counter() - started, 1)}
    results["analysis"] = analyse(results)
    if write:
        from .report import write_reports

        results["files"] = write_reports(results, cfg.out, plots=cfg.plots)
    return results
