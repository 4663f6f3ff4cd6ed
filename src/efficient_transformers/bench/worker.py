"""Worker processes: each case runs in a child so that a timeout or a crash cannot take the run
down, and (on CPU) so the resident-memory high-water mark belongs to that case alone.

Children come from a `forkserver` that has imported torch and the mechanisms once, so a fresh
process per case costs a fork, not an import. On CPU each case gets a fresh process; on CUDA one
process serves all cases of a target (its peak memory comes from the allocator, reset per case)
and is replaced after a timeout or a crash.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import torch  # noqa: F401  (imported here so the forkserver preloads it)

from . import measure
from .measure import classify_error, run_case

def serve(conn) -> None:
    """Child loop: receive a case dict, answer a result dict; None ends it."""
    measure.ISOLATED_WORKER = True  # a fresh process per CPU case: it may set the allocator
    measure.instrument_allocator()
    import efficient_transformers as et

    et.list_attention()  # register every mechanism (already imported in the forkserver)
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        if case is None:
            return
        if case.get("device") == "cuda":
            _allow_recompiles()
        try:
            result = run_case(case)
        except BaseException as err:  # noqa: BLE001 - every failure is a result to record
            if isinstance(err, KeyboardInterrupt):
                raise
            result = {"status": classify_error(err)}
        if case.get("device") == "cuda" and result["status"] != "ok":
            # a CUDA error poisons the context: ask for a fresh process
            # (a failed graph capture leaves the stream's capture state behind)
            result["fatal"] = "CUDA error" in result["status"] or \
                "device-side assert" in result["status"] or bool(case.get("cuda_graphs"))
            if not result["fatal"]:
                torch.cuda.empty_cache()  # the failed case's tensors are gone by now
        conn.send(result)


def _allow_recompiles() -> None:
    """One CUDA process serves every length: let compiled kernels (FlexAttention) specialise
    on each shape instead of falling back after dynamo's default limit of 8."""
    try:
        import torch._dynamo.config as dynamo_config

        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, attr):
                setattr(dynamo_config, attr, max(64, getattr(dynamo_config, attr)))
    except Exception:  # noqa: BLE001 - best effort
        pass


def _context():
    try:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["efficient_transformers.bench.worker",
                                    "efficient_transformers.attention"])
        return ctx
    except ValueError:  # no forkserver on this platform
        return mp.get_context("spawn")


class CaseRunner:
    """Runs cases in worker processes with a per-case timeout (or in-process if isolate=False)."""

    def __init__(self, timeout: float, isolate: bool = True, fresh_per_case: bool = True):
        self.timeout, self.isolate, self.fresh = timeout, isolate, fresh_per_case
        self.proc = None
        self.conn = None
        self.group = None

    def _start(self) -> None:
        ctx = _context()
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def _stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if not kill:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                kill = True
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self.proc, self.conn = None, None

    def run(self, case: dict[str, Any], group: str | None = None) -> dict[str, Any]:
        if not self.isolate:
            try:
                return run_case(case)
            except Exception as err:  # noqa: BLE001
                return {"status": classify_error(err)}
        if self.proc is not None and (self.fresh or group != self.group):
            self._stop()
        if self.proc is None:
            self._start()
            self.group = group
        self.conn.send(case)
        if not self.conn.poll(self.timeout):
            self._stop(kill=True)
            return {"status": "timeout", "note": f"over the per-case limit of {self.timeout:g} s"}
        try:
            result = self.conn.recv()
            if result.pop("fatal", False):
                self._stop(kill=True)
            return result
        except (EOFError, OSError):
            self.proc.join(timeout=5)
            code = self.proc.exitcode
            self._stop(kill=True)
            if code == -9:
                return {"status": "oom", "note": "worker killed by SIGKILL (the system's "
                                                 "out-of-memory killer)"}
            return {"status": f"error: worker died (exit code {code})"}

    def close(self, kill: bool = False) -> None:
        self._stop(kill=kill)
