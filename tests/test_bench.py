"""The benchmark harness at tiny sizes: files, fits, failure records, peers without packages."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.bench import BenchConfig, fit_exponent, run_bench
from efficient_transformers.bench.analysis import crossovers, fit_points, verdict
from efficient_transformers.bench.config import grid_shape, length_options
from efficient_transformers.bench.measure import classify_error
from efficient_transformers.bench.runner import build_cases
from efficient_transformers.bench.worker import CaseRunner
from efficient_transformers.cli import main
from helpers import has_cpp_compiler

TINY = dict(lengths=(64, 128), dim=32, heads=2, repeats=1, threads=1, progress=False)


def two_mechanisms() -> list[str]:
    """`transformer` and one other registered mechanism (a decoder if there is one)."""
    others = [n for n in et.list_attention() if n != "transformer"]
    decoders = [n for n in others if et.attention_spec(n).decode]
    return ["transformer", (decoders or others or ["transformer"])[0]]


def test_harness_runs_and_writes_every_file(tmp_path):
    models = two_mechanisms()
    cfg = BenchConfig(models=models, modes=("fwd", "fwdbwd", "decode"), out=str(tmp_path),
                      **TINY)  # isolated: memory is a fresh process's peak
    results = run_bench(cfg)
    for name in ("bench.json", "bench.csv", "bench.md", "bench_time_fwdbwd.png",
                 "bench_memory_fwdbwd.png", "bench_time_fwd.png", "bench_decode.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    expected = sum(3 if et.attention_spec(m).decode else 2 for m in set(models)) * 2
    assert len(records) == expected
    assert all(r["status"] == "ok" for r in records), [r["status"] for r in records]
    for r in records:
        assert r["time_ms"] > 0
        if r["mode"] == "decode":
            assert r["state_bytes"] > 0
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == expected
    md = (tmp_path / "bench.md").read_text()
    assert "## Forward + backward: time (ms)" in md and "`transformer`" in md
    assert "![bench_time_fwdbwd](bench_time_fwdbwd.png)" in md
    exps = results["analysis"]["exponents"]
    assert {(e["label"], e["mode"]) for e in exps} >= {("transformer", "fwdbwd")}


def test_dense_decode_state_is_the_kv_cache(tmp_path):
    cfg = BenchConfig(models=["transformer"], modes=("decode",), out=str(tmp_path),
                      plots=False, **TINY)  # isolated: a fresh worker process per case
    records = run_bench(cfg)["records"]
    for r in records:  # k and v: B * H * N * d floats each, fp32
        assert r["state_bytes"] == 2 * 1 * 32 * r["n"] * 4


def test_exponent_fit_recovers_synthetic_slopes():
    ns = [256, 1024, 4096, 16384]
    for slope in (1.0, 1.5, 2.0):
        values = [3.0 * n ** slope * (1 + 0.01 * (-1) ** i) for i, n in enumerate(ns)]
        assert fit_exponent(ns, values) == pytest.approx(slope, abs=0.02)
    nlogn = [n * math.log(n) for n in ns]
    assert 1.0 < fit_exponent(ns, nlogn) < 1.2
    assert fit_exponent([1024], [3.0]) is None
    assert fit_exponent([1024, 2048], [0.0, 1.0]) is None
    # the longer lengths: shortest dropped when >= 3 points, at most the 3 longest
    assert [p[0] for p in fit_points([(n, 1.0) for n in (256, 1024, 4096)])] == [1024, 4096]
    assert [p[0] for p in fit_points([(n, 1.0) for n in ns + [65536]])] == [4096, 16384, 65536]
    assert verdict(1.1, 1.0) == "agree" and verdict(0.5, 1.0) == "below"
    assert verdict(2.0, 1.0) == "above" and verdict(None, 1.0) == "n/a"


def test_crossover_is_the_shortest_n_beating_dense_from_there_on():
    def rec(label, n, ms):
        return {"label": label, "target": label, "kind": "ours", "mode": "fwdbwd",
                "causal": False, "n": n, "status": "ok", "time_ms": ms}

    records = [rec("transformer", n, ms) for n, ms in ((256, 1), (1024, 10), (4096, 100))]
    records += [rec("fast", n, ms) for n, ms in ((256, 0.5), (1024, 20), (4096, 50))]
    records += [rec("slow", n, ms) for n, ms in ((256, 2), (1024, 20), (4096, 200))]
    rows = {r["label"]: r for r in crossovers(records)}
    assert rows["fast"]["crossover"] == 4096 and rows["slow"]["crossover"] is None


def test_decode_claims_are_per_token_and_the_terminal_compares_the_mode_it_shows():
    from efficient_transformers.bench.analysis import analyse, exponents
    from efficient_transformers.bench.report import render_terminal

    def rec(label, mode, causal, n, ms):
        return {"label": label, "target": label.split(" ")[0], "kind": "ours", "mode": mode,
                "causal": causal, "n": n, "status": "ok", "time_ms": ms, "peak_mib": 1.0,
                "state_bytes": n}

    ns = (1024, 2048, 4096)
    decode = ([rec("transformer", "decode", True, n, n / 1000) for n in ns]
              + [rec("performer", "decode", True, n, 2.0) for n in ns])
    # the survey's whole-sequence exponent less one: dense O(N) a token, performer O(1)
    claims = {e["label"]: e["claimed"] for e in exponents(decode)}
    assert claims == {"transformer": 1.0, "performer": 0.0}
    results = {"records": decode, "config": {"device": "cpu", "dtype": "fp32"}}
    results["analysis"] = analyse(results)
    rows = {line.split()[0]: line.split() for line in render_terminal(results).splitlines()[3:]}
    assert rows["transformer"][-1] == "baseline" and rows["performer"][-1] == "2k"
    assert rows["performer"][5:7] == ["0.00", "agree"]
    # no dense baseline in the run: "–", not "baseline"
    forward = [rec("performer", "fwd", False, n, n / 100) for n in ns]
    results = {"records": forward, "config": {"device": "cpu", "dtype": "fp32"}}
    results["analysis"] = analyse(results)
    assert render_terminal(results).splitlines()[-1].split()[-1] == "–"


def cuda_analysis(records):
    """(the analysis of a CUDA run of `records`, its target rows by (goal, subject))."""
    from efficient_transformers.bench.analysis import analyse

    an = analyse({"records": records, "config": {"device": "cuda"}})
    return an, {(t["goal"], t["subject"]): t for t in an["targets"]}


def rec(label, kind, ms_by_n, causal=False):
    """Forward + backward records of one series: {N: ms}."""
    target = label.split(" ")[0]
    return [{"label": label, "target": target, "kind": kind, "mode": "fwdbwd",
             "causal": causal, "n": n, "status": "ok", "time_ms": ms, "peak_mib": 1.0}
            for n, ms in ms_by_n.items()]


def test_cuda_targets_hold_windows_to_flex_and_causal_linear_to_the_chunked_kernel():
    from efficient_transformers.bench.analysis import analyse

    ns = (1024, 4096, 16384, 65536)
    records = (rec("dense_sdpa", "ref", dict(zip(ns, (1, 2, 20, 300))))
               + rec("flex_window", "ref", dict(zip(ns, (2, 2, 2, 4))))
               + rec("linear_chunked_causal", "ref", dict(zip(ns, (3, 3, 4, 6))))
               + rec("longformer", "ours", dict(zip(ns, (9, 2, 2, 4.4))))
               + rec("linear_transformer", "ours", dict(zip(ns, (2, 2, 3, 5))))
               # 3x the kernel at 1k does not count (launch-bound); 1.5x at 16k does
               + rec("linear_transformer (causal)", "ours", dict(zip(ns, (9, 3, 6, 6))), True)
               + rec("performer (causal)", "ours", dict(zip(ns, (9, 9, 9, 9))), True))
    an, rows = cuda_analysis(records)
    linear = rows[("within 1.2x of linear_chunked_causal", "linear_transformer (causal)")]
    assert (linear["met"], linear["detail"]) == (False, "worst 1.50x at N=16384")
    flex = rows[("within 1.2x of flex_window", "longformer")]
    assert (flex["met"], flex["detail"]) == (False, "worst 4.50x at N=1024")
    assert rows[("10x faster than dense at 64k", "linear_transformer")]["met"] is True
    # the chunked kernel's ratio table shows the kernelised mechanisms only
    assert set(an["reference_ratios"]["linear_chunked_causal"]) == {
        "linear_transformer", "linear_transformer (causal)", "performer (causal)"}
    records = [r for r in records if r["label"] != "linear_transformer (causal)"]
    an = analyse({"records": records, "config": {"device": "cuda"}})
    assert not [t for t in an["targets"] if "linear_chunked_causal" in t["goal"]]


def test_chunked_causal_linear_reference_computes_the_causal_linear_transformer():
    """The reference kernel is the same function as the causal layer (values and gradients,
    float64), and that function is the masked oracle's."""
    from efficient_transformers.bench.reference import build_reference
    from efficient_transformers.functional.kernels import elu_feature_map, naive_linear_attention

    torch.manual_seed(0)
    ref = build_reference("linear_chunked_causal", 16, 2).double()
    ref.chunk = 4                                  # 11 positions: two whole chunks and a part
    layer = et.build_attention("linear_transformer", dim=16, heads=2, causal=True,
                               chunk_size=3).double()
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 11, 16, dtype=torch.float64)
    grads = []
    for module in (ref, layer):
        y = module(x)
        grads.append(torch.autograd.grad((y * g).sum(), [x, *module.parameters()]))
        if module is ref:
            y_ref = y
    assert torch.allclose(y_ref, layer(x), atol=1e-12)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)
    q, k, v = (torch.randn(1, 2, 11, 8, dtype=torch.float64) for _ in range(3))
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    oracle = naive_linear_attention(elu_feature_map(q), elu_feature_map(k), v, causal)
    assert torch.allclose(ref.core(q, k, v), oracle, atol=1e-12)


def test_grid_shape_and_length_tied_options():
    assert grid_shape(4096) == (64, 64) and grid_shape(2048) == (32, 64)
    assert grid_shape(1000) == (25, 40) and math.prod(grid_shape(4096, 3)) == 4096
    assert length_options({"shape": None, "k": 8}, 1024) == {"shape": (32, 32)}
    assert length_options({"max_len": 4096}, 1024) == {"max_len": 4096}
    assert length_options({"max_len": 4096}, 16384) == {"max_len": 16384}
    # sqrt(N) strides and cluster counts keep the O(N sqrt N) mechanisms O(N sqrt N)
    assert [length_options({"stride": 64, "num_clusters": 32}, n) for n in (16, 1000, 4096, 65536)] \
        == [{"stride": s, "num_clusters": s} for s in (8, 32, 64, 256)]


def test_failures_are_recorded_not_dropped():
    base = dict(kind="ours", target="transformer", causal=False, dtype="fp32", device="cpu",
                heads=2, warmup=0, repeats=1, decode_tokens=4, threads=1)
    runner = CaseRunner(timeout=60.0, fresh_per_case=False)  # reused, replaced after a timeout
    try:
        bad = runner.run(dict(base, mode="fwd", n=16, batch=1, dim=32, options={"bogus": 1}))
        assert bad["status"].startswith("error: TypeError") and "bogus" in bad["status"]
        huge = runner.run(dict(base, mode="fwd", n=2 ** 20, batch=2 ** 20, dim=512))
        assert huge["status"] == "oom", huge
        runner.timeout = 0.5
        slow = runner.run(dict(base, mode="fwdbwd", n=4096, batch=4, dim=512, repeats=1000))
        assert slow["status"] == "timeout"
        runner.timeout = 60.0
        fine = runner.run(dict(base, mode="fwd", n=16, batch=1, dim=32))
        assert fine["status"] == "ok" and fine["peak_mib"] is not None
    finally:
        runner.close()
    assert classify_error(RuntimeError("CUDA out of memory. Tried to allocate")) == "oom"
    assert classify_error(ValueError("x: bad")) == "error: ValueError: x: bad"


def test_longer_lengths_after_a_timeout_are_recorded_as_not_run(tmp_path):
    cfg = BenchConfig(models=["transformer"], modes=("fwdbwd",), lengths=(4096, 8192),
                      dim=512, heads=8, batch=4, repeats=1000, timeout=0.5, threads=1,
                      progress=False, plots=False, out=str(tmp_path))
    records = run_bench(cfg)["records"]
    assert [r["status"] for r in records] == ["timeout", "timeout"]
    assert records[1]["note"] == "not run: timeout at N=4096"
    assert "## Cases not measured" in (tmp_path / "bench.md").read_text()


def test_peers_without_their_packages_are_reported_not_installed(tmp_path, monkeypatch):
    from efficient_transformers.bench import peers

    monkeypatch.setattr(peers, "installed", lambda peer: False)
    cfg = BenchConfig(models=["lucidrains_performer", "hf_bigbird"], modes=("fwdbwd",),
                      out=str(tmp_path), isolate=False, **TINY)
    results = run_bench(cfg)
    assert {r["status"] for r in results["records"]} == {"not installed"}
    assert results["records"][0]["note"] == "pip install performer-pytorch"
    rows = results["analysis"]["peers"]
    assert rows and all(r["time_ratio"] is None for r in rows)
    assert "not installed" in (tmp_path / "bench.md").read_text()
    # --peers with --models adds the peers of the mechanisms listed (causal pairing included)
    cases = build_cases(BenchConfig(models=["performer"], peers=True, modes=("fwdbwd",),
                                    lengths=(64,)))
    if "performer" in et.list_attention():
        assert {c["label"] for c in cases} == {"performer", "performer (causal)",
                                               "lucidrains_performer",
                                               "lucidrains_performer_causal"}
        # with forward only, the causal form runs forward too, as its causal peer does
        cases = build_cases(BenchConfig(models=["performer"], peers=True, modes=("fwd",),
                                        lengths=(64,)))
        assert {(c["label"], c["mode"], c["causal"]) for c in cases} == {
            ("performer", "fwd", False), ("performer (causal)", "fwd", True),
            ("lucidrains_performer", "fwd", False), ("lucidrains_performer_causal", "fwd", False)}


def test_reference_kernels_run_first_at_each_length():
    cases = build_cases(BenchConfig(models=["performer", "dense_sdpa", "transformer",
                                            "flex_window"], modes=("fwdbwd", "causal"),
                                    lengths=(1024, 256)))
    order = [(c["n"], c["label"]) for c in cases]
    assert order == [(n, lab) for n in (256, 1024)
                     for lab in ("dense_sdpa", "flex_window", "performer", "performer (causal)",
                                 "transformer", "transformer (causal)")]


def test_peers_run_beside_their_pair_and_at_the_peers_settings():
    from efficient_transformers.bench.analysis import peer_rows
    from efficient_transformers.bench.peers import PEERS

    cases = build_cases(BenchConfig(models=["transformer", "routing_transformer", "performer"],
                                    peers=True, modes=("fwdbwd",), lengths=(256, 1024)))
    order = [(c["n"], c["label"]) for c in cases]
    assert order[:6] == [(256, "transformer"), (256, "routing_transformer"),
                         (256, "routing_transformer [peer settings]"),
                         (256, "lucidrains_routing"), (256, "performer"),
                         (256, "lucidrains_performer")]
    assert order[6:8] == [(256, "performer (causal)"), (256, "lucidrains_performer_causal")]
    # routing runs again with the peer's settings: every head routed, clusters of 128 tokens
    matched = [c for c in cases if c.get("for_peer") == "lucidrains_routing"]
    assert [c["options"] for c in matched] == [{"local_heads": 0, "num_clusters": 2},
                                               {"local_heads": 0, "num_clusters": 8}]
    assert all(c["kind"] == "ours" and c["target"] == "routing_transformer" for c in matched)
    # the peer's own case carries its pair: its worker also times ours, alternating
    peer_case = next(c for c in cases if c["target"] == "lucidrains_routing" and c["n"] == 1024)
    assert peer_case["pair"] == {"target": "routing_transformer", "causal": False,
                                 "options": {"local_heads": 0, "num_clusters": 8}}
    # the ratio compares the peer with that series, not with the default one
    def rec(label, kind, target, ms):
        return {"label": label, "kind": kind, "target": target, "mode": "fwdbwd", "n": 256,
                "status": "ok", "time_ms": ms, "peak_mib": 1.0}
    rows = peer_rows([rec("routing_transformer", "ours", "routing_transformer", 30.0),
                      rec(PEERS["lucidrains_routing"].ours_label, "ours", "routing_transformer",
                          20.0),
                      rec("lucidrains_routing", "peer", "lucidrains_routing", 40.0)])
    assert [r["time_ratio"] for r in rows] == [0.5]
    rows = peer_rows([rec("lucidrains_routing", "peer", "lucidrains_routing", 40.0)])
    assert [r["ours_status"] for r in rows] == ["not in this run"]  # registered, not measured
    # memory_compressed pairs at the peer's convolution: one kernel per head
    cases = build_cases(BenchConfig(models=["memory_compressed"], peers=True, modes=("fwdbwd",),
                                    lengths=(256,), heads=4))
    matched = [c for c in cases if c.get("for_peer") == "lucidrains_mem_compressed"]
    assert [(c["label"], c["options"]) for c in matched] == [
        ("memory_compressed [peer settings]", {"conv_groups": 4})]


def test_peer_ratio_comes_from_alternating_runs_in_one_process(tmp_path, monkeypatch):
    from torch import nn

    from efficient_transformers.bench import peers

    fake = peers.Peer("fake_peer", "fake-package", "torch", "transformer", False, "a linear map",
                      lambda dim, heads, n: nn.Linear(dim, dim))
    monkeypatch.setitem(peers.PEERS, "fake_peer", fake)
    cfg = BenchConfig(models=["transformer", "fake_peer"], modes=("fwdbwd",), out=str(tmp_path),
                      isolate=False, **dict(TINY, repeats=3))
    results = run_bench(cfg)
    peer_record = next(r for r in results["records"]
                       if r["target"] == "fake_peer" and r["n"] == 128)
    paired = peer_record["paired"]
    assert len(paired["ours_times_ms"]) == len(paired["peer_times_ms"]) == 3
    rows = [p for p in results["analysis"]["peers"] if p["n"] == 128]
    assert len(rows) == 1 and rows[0]["timing"] == "paired"
    assert rows[0]["time_ratio"] == paired["ratio"] == paired["ours_ms"] / paired["peer_ms"]
    ours = next(r for r in results["records"] if r["label"] == "transformer" and r["n"] == 128)
    assert rows[0]["separate_ratio"] == ours["time_ms"] / peer_record["time_ms"]
    # memory: each side's own run, as before
    memory = ours["peak_mib"] / peer_record["peak_mib"] if peer_record["peak_mib"] else None
    assert rows[0]["memory_ratio"] == memory
    assert "alternates the two" in (tmp_path / "bench.md").read_text()


def test_cli_runs_and_rejects_bad_arguments(tmp_path, capsys):
    code = main(["bench", "--models", "transformer", "--lengths", "64,128", "--dim", "32",
                 "--heads", "2", "--repeats", "1", "--modes", "fwd", "--out", str(tmp_path),
                 "--in-process", "--quiet", "--no-plots", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "transformer" in out and (tmp_path / "bench.md").exists()
    assert main(["bench", "--models", "nope", "--out", str(tmp_path)]) == 2
    assert "--models: unknown ['nope']" in capsys.readouterr().err
    assert main(["bench", "--modes", "sideways", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--dim", "30", "--heads", "4", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    # each refused before anything runs, naming the flag (these ran, or failed in a case, before)
    for args, message in ((["--models", ","], "--models: expected at least one name"),
                          (["--warmup", "-1"], "--warmup: expected an integer >= 0"),
                          (["--threads", "0"], "--threads: expected an integer >= 1"),
                          (["--decode-tokens", "0"], "--decode-tokens: expected an integer >= 1"),
                          (["--lengths", "8,64"], "--decode-tokens: expected fewer than the "
                                                  "shortest length 8"),
                          (["--budget", "0"], "--budget: expected seconds > 0")):
        assert main(["bench", *args, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def test_compile_mode_times_compiled_layers_and_decodes_eagerly(tmp_path, monkeypatch):
    """--compile: fwd and fwd+bwd targets go through torch.compile with the mode (here its
    capture and AOT autograd without code generation, so no C++ compiler is needed), after at
    least COMPILED_WARMUP warm-up runs; decode stays eager. The report says so."""
    from efficient_transformers.bench import measure
    from efficient_transformers.bench.config import COMPILED_WARMUP

    modes, real_compile = [], torch.compile

    def capture_only(layer, mode):
        modes.append(mode)
        return real_compile(layer, backend="aot_eager_decomp_partition")

    monkeypatch.setattr(torch, "compile", capture_only)
    calls = []
    real_timed = measure._timed
    monkeypatch.setattr(measure, "_timed", lambda fn, device, warmup, *a, **k: (
        calls.append(warmup), real_timed(fn, device, warmup, *a, **k))[1])
    cfg = BenchConfig(models=["linformer"], modes=("fwd", "fwdbwd", "decode"), out=str(tmp_path),
                      isolate=False, compile="max-autotune", plots=False, **TINY)
    records = run_bench(cfg)["records"]
    assert all(r["status"] == "ok" for r in records), [r["status"] for r in records]
    assert modes == ["max-autotune"] * 4 and calls == [COMPILED_WARMUP] * 4  # fwd, fwdbwd x 2 N
    assert {r.get("compiled") for r in records if r["mode"] != "decode"} == {"max-autotune"}
    assert all("compiled" not in r for r in records if r["mode"] == "decode")
    assert "torch.compile(mode='max-autotune')" in (tmp_path / "bench.md").read_text()
    with pytest.raises(ValueError, match="--compile: expected one of"):
        run_bench(BenchConfig(models=["linformer"], compile="fastest", **TINY), write=False)


@pytest.mark.slow
@pytest.mark.skipif(not has_cpp_compiler(), reason="Inductor on the CPU needs a C++ compiler")
def test_compile_mode_with_inductor_on_the_cpu(tmp_path):
    cfg = BenchConfig(models=["transformer", "performer"], modes=("fwdbwd",), out=str(tmp_path),
                      compile="default", plots=False, **TINY)
    records = run_bench(cfg)["records"]
    assert [r["status"] for r in records] == ["ok"] * 4
    assert {r["compiled"] for r in records} == {"default"}


@pytest.mark.gpu
def test_flex_window_reference_matches_masked_sdpa():
    import torch

    from efficient_transformers.bench.reference import DenseSDPA, FlexWindow

    torch.manual_seed(0)
    flex = FlexWindow(64, 2, window=100).cuda()
    dense = DenseSDPA(64, 2).cuda()
    dense.load_state_dict(flex.state_dict())
    x = torch.randn(2, 1000, 64, device="cuda")
    i = torch.arange(1000, device="cuda")
    allowed = (i[:, None] - i[None, :]).abs() <= 100
    dense.core = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed)
    with torch.no_grad():
        assert (flex(x) - dense(x)).abs().max().item() < 1e-3


@pytest.mark.gpu
def test_cuda_harness_measures_time_and_allocator_peak(tmp_path):
    cfg = BenchConfig(models=["transformer", "dense_sdpa", "flex_window"], device="cuda",
                      dtype="bf16", modes=("fwdbwd",), lengths=(1024, 2048), dim=64, heads=2,
                      repeats=2, progress=False, out=str(tmp_path))
    records = run_bench(cfg)["records"]
    assert [r["status"] for r in records] == ["ok"] * 6
    assert all(r["peak_mib"] > 0 and r["mem_method"] == "max_memory_allocated" for r in records)
    assert all(0 < r["host_ms"] <= r["time_ms"] for r in records)   # queued, then synchronised


def test_memory_run_comes_before_the_timed_runs_and_the_allocator_switch(monkeypatch):
    """Peak memory from its own run (under the instrumented allocator); then the allocator goes
    to glibc's steady state and only the runs after that are timed."""
    from efficient_transformers.bench import measure

    events = []

    class FakePeak:
        method = "fake"

        def __init__(self):
            events.append("baseline")

        def peak_bytes(self):
            events.append("peak read")
            return 123

    monkeypatch.setattr(measure, "steady_allocator", lambda: events.append("steady"))
    times, peak, method = measure._timed(lambda: events.append("run"), torch.device("cpu"),
                                         warmup=1, repeats=3, start_peak=FakePeak,
                                         between=lambda: events.append("clear"))
    assert (peak, method, len(times)) == (123, "fake", 3)
    assert events == ["clear", "run", "clear", "baseline", "run", "peak read", "steady",
                      "clear", "run", "clear", "run", "clear", "run"]


def test_host_time_is_taken_before_the_closing_synchronisation(monkeypatch):
    from efficient_transformers.bench import measure

    now = [0.0]
    monkeypatch.setattr(measure, "sync_device", lambda device: now.__setitem__(0, now[0] + 10))
    monkeypatch.setattr(measure, "steady_allocator", lambda: None)

    def step():  # the host queues for 1 s; the device then needs 10 more (the sync's wait)
        now[0] += 1

    class NoPeak:
        method = "none"

        def peak_bytes(self):
            return None

    host = []
    times, _, _ = measure._timed(step, torch.device("cpu"), warmup=1, repeats=3,
                                 start_peak=NoPeak, clock=lambda: now[0], host_times=host)
    assert (times, host) == ([11.0] * 3, [1.0] * 3)


def test_report_shows_the_host_share_where_it_was_measured(tmp_path):
    from efficient_transformers.bench.report import render_markdown

    cfg = BenchConfig(models=["transformer"], modes=("fwdbwd",), isolate=False, plots=False,
                      out=str(tmp_path), **TINY)
    results = run_bench(cfg, write=False)
    assert all("host_ms" not in r for r in results["records"])    # CPU: the host is the device
    assert "host time" not in render_markdown(results, [])
    for r in results["records"]:
        r["host_ms"] = 0.9 * r["time_ms"]
    md = render_markdown(results, [])
    assert "## Forward + backward: host time (ms) and its share of the step" in md
    row = next(line for line in md.splitlines() if line.startswith("| `transformer`")
               and "(90%)" in line)
    assert row.count("(90%)") == 2


def test_profile_writes_a_table_per_mechanism_and_refuses_unknown_names(tmp_path, capsys):
    from efficient_transformers.bench import profile

    out = tmp_path / "profile"
    assert profile.main(["--models", "linear_transformer", "--length", "64", "--device", "cpu",
                         "--dtype", "fp32", "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    text = (out / "linear_transformer.txt").read_text()
    assert "N=64 fp32 fwd+bwd" in text and "Self CPU" in text
    assert "linear_transformer: N=64" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        profile.main(["--models", "nope", "--device", "cpu", "--out", str(out)])
    assert stop.value.code == 2 and "--models" in capsys.readouterr().err


def test_profile_missed_takes_the_missed_subjects_of_a_bench_json(tmp_path, capsys):
    import json

    from efficient_transformers.bench import profile

    rows = [{"goal": "10x faster than dense at 64k", "subject": "performer", "met": False},
            {"goal": "10x faster than dense at 64k", "subject": "linformer", "met": True},
            {"goal": "within 1.2x of linear_chunked_causal",
             "subject": "linear_transformer (causal)", "met": False},
            {"goal": "beats transformer fwd+bwd from N=8k", "subject": "performer", "met": False},
            {"goal": "time and memory <= peer", "subject": "reformer vs reformer_pytorch",
             "met": False},
            {"goal": "at least as fast as the peer", "subject": "etc vs x", "met": None}]
    results = {"analysis": {"targets": rows}}
    assert profile.missed_subjects(results) == [("performer", False),
                                                ("linear_transformer", True), ("reformer", False)]
    path = tmp_path / "bench.json"
    rows[0]["met"] = rows[4]["met"] = True
    path.write_text(json.dumps(results))
    out = tmp_path / "profile"
    assert profile.main(["--missed", str(path), "--length", "64", "--device", "cpu", "--dtype",
                         "fp32", "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["linear_transformer-causal.txt",
                                                     "performer.txt"]
    assert "linear_transformer (causal): N=64" in capsys.readouterr().out
    path.write_text(json.dumps({"analysis": {"targets": rows[1:2]}}))
    assert profile.main(["--missed", str(path), "--device", "cpu", "--out", str(out)]) == 0
    assert "nothing to profile" in capsys.readouterr().out
    for bad in (["--missed", str(tmp_path / "none.json")],
                ["--missed", str(path), "--models", "performer"]):
        with pytest.raises(SystemExit) as stop:
            profile.main(bad + ["--device", "cpu"])
        assert stop.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            profile.main(["--models", "performer", "--device", "cuda"])
        assert "--device: cuda was asked for" in capsys.readouterr().err


def test_operator_traffic_counts_bytes_and_flops_and_skips_views():
    from efficient_transformers.bench.traffic import OperatorTraffic

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    counter = OperatorTraffic(bandwidth=1e9, peak_flops=1e9, launch_s=0.0)
    with counter:
        c = a @ b                          # mm: reads a and b, writes c
        c.t().reshape(-1)                  # a view, then a copy of 64·16 floats (read + write)
        c.add_(1.0)                        # in place: reads and writes c
        torch.empty(1000, 1000)            # an allocation moves nothing
        index = torch.arange(8)
        torch.index_select(c, 0, index, out=torch.empty(8, 16))  # out= written, not read
        column = torch.arange(64)[:, None].expand(64, 16)           # a broadcast index (view)
        torch.zeros(64, 16).scatter_add_(0, column, c)   # the index read as its 64 longs
    rows = dict(counter.rows)
    assert rows["mm.default"] == [1, (64 * 32 + 32 * 16 + 64 * 16) * 4, 2 * 64 * 32 * 16]
    assert rows["clone.default"][1] == 2 * 64 * 16 * 4
    assert rows["add_.Tensor"][:2] == [1, 2 * 64 * 16 * 4]
    assert rows["index_select.out"][1] == (8 * 16 + 8 * 16) * 4 + 8 * 8  # picked rows, index
    assert rows["scatter_add_.default"][1] == 2 * 64 * 16 * 4 + 64 * 8 + 64 * 16 * 4
    assert not any(name.startswith(("t.", "view", "_unsafe_view", "empty")) for name in rows)
    # priced as max(bytes / bandwidth, flops / peak): the matmul is bound by its flops here
    assert counter.op_ms(rows["mm.default"]) == pytest.approx(1e3 * 2 * 64 * 32 * 16 / 1e9)
    assert "operator calls" in counter.table()
    # the host's side: every aten call, views and allocations included, at host_s each; the
    # estimate is the larger of device and host time
    calls = sum(row[0] for row in rows.values())
    assert counter.dispatches > calls + 1
    assert counter.host_ms() == pytest.approx(1e3 * counter.dispatches * 18e-6)
    assert counter.device_ms() == pytest.approx(sum(counter.op_ms(r) for r in rows.values()))
    assert counter.total_ms() == max(counter.host_ms(), counter.device_ms())
    slow_host = OperatorTraffic(bandwidth=1e9, peak_flops=1e9, launch_s=0.0, host_s=1.0)
    with slow_host:
        a @ b
    assert slow_host.total_ms() == slow_host.host_ms() == 1e3 * slow_host.dispatches


def test_profile_traffic_mode_writes_an_estimate(tmp_path, capsys):
    from efficient_transformers.bench import profile

    out = tmp_path / "traffic"
    assert profile.main(["--traffic", "--models", "performer,linear_chunked_causal", "--length",
                         "64", "--device", "cpu", "--dtype", "fp32", "--out", str(out)]) == 0
    text = (out / "performer.txt").read_text()
    assert "fwd+bwd estimate" in text and "GiB read + written" in text and "bmm" in text
    printed = capsys.readouterr().out
    assert "performer: N=64 fp32 fwd+bwd estimate" in printed
    assert "linear_chunked_causal: N=64 fp32 fwd+bwd estimate" in printed   # a reference kernel
    assert "elu" in (out / "linear_chunked_causal.txt").read_text()


def test_profile_traffic_as_cuda_takes_the_cuda_paths(tmp_path, capsys):
    """--as-cuda: axial folds its heads as on CUDA, so one step makes far fewer aten calls;
    the switches are restored afterwards. Refused without --traffic."""
    from efficient_transformers.bench import profile
    from efficient_transformers.functional import axial, kernels

    def calls(*extra):
        out = tmp_path / "t".join(extra or ("cpu",))
        profile.main(["--traffic", "--models", "axial_transformer", "--length", "64",
                      "--device", "cpu", "--dtype", "bf16", "--out", str(out), *extra])
        text = (out / "axial_transformer.txt").read_text()
        return int(text.split(" aten calls with views")[0].rsplit("\n", 1)[-1])

    head_by_head, folded = calls(), calls("--as-cuda")
    assert folded < head_by_head / 2
    assert kernels.KEEP_BF16 is None and axial.FOLD_HEADS is None
    with pytest.raises(SystemExit):
        profile.main(["--models", "axial_transformer", "--as-cuda", "--device", "cpu"])
    assert "--as-cuda: applies to --traffic only" in capsys.readouterr().err


@pytest.mark.parametrize("causal", [False, True])
def test_operator_traffic_prices_the_cpu_flash_kernel_by_its_shapes(causal):
    """4·B·H·N·M·d flops forward (N queries, M keys), 2.5× that backward, half when causal."""
    from efficient_transformers.bench.traffic import OperatorTraffic

    q = torch.randn(1, 2, 32, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 32 if causal else 16, 8), torch.randn(1, 2, 32 if causal else 16, 8)
    counter = OperatorTraffic()
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    forward = 4 * 2 * 32 * k.shape[2] * 8 * (0.5 if causal else 1.0)
    rows = {name.split(".")[0]: row for name, row in counter.rows.items()}
    assert rows["_scaled_dot_product_flash_attention_for_cpu"][2] == forward
    assert rows["_scaled_dot_product_flash_attention_for_cpu_backward"][2] == 2.5 * forward


def test_same_mask_target_holds_each_fixed_pattern_to_flex_with_its_own_mask(tmp_path):
    """A `flex_mask:NAME` reference in the run: NAME (non-causal) is held to it, not to
    flex_window; its ratios get one table."""
    from efficient_transformers.bench.report import render_markdown

    ns = (8192, 65536)
    records = (rec("dense_sdpa", "ref", dict(zip(ns, (2, 60))))
               + rec("flex_window", "ref", dict(zip(ns, (1, 2))))
               + rec("flex_mask:longformer", "ref", dict(zip(ns, (2, 10))))
               + rec("flex_mask:image_transformer", "ref", dict(zip(ns, (1, 2))))
               + rec("longformer", "ours", dict(zip(ns, (2.2, 4))))
               + rec("longformer (causal)", "ours", dict(zip(ns, (9, 9))), True)
               + rec("image_transformer", "ours", dict(zip(ns, (1.3, 2)))))
    an, rows = cuda_analysis(records)
    longformer = rows[("within 1.2x of flex_mask:longformer (same mask)", "longformer")]
    assert (longformer["met"], longformer["detail"]) == (True, "worst 1.10x at N=8192")
    image = rows[("within 1.2x of flex_mask:image_transformer (same mask)", "image_transformer")]
    assert (image["met"], image["detail"]) == (False, "worst 1.30x at N=8192")
    assert not [t for t in an["targets"] if t["goal"].endswith("of flex_window")]
    assert an["same_mask_ratios"] == {"longformer": {8192: 1.1, 65536: 0.4},
                                      "image_transformer": {8192: 1.3, 65536: 1.0}}
    results = run_bench(BenchConfig(models=["transformer"], modes=("fwdbwd",), isolate=False,
                                    plots=False, out=str(tmp_path), **TINY), write=False)
    results.update(records=records, analysis=an)
    text = render_markdown(results, [])
    assert "## Forward + backward time / FlexAttention with the same mask" in text
    assert "| `longformer` | 1.10 | 0.40 |" in text


def test_same_mask_references_are_named_per_mechanism_and_cuda_only():
    from efficient_transformers.bench.reference import (SAME_MASK_MECHANISMS, SameMaskFlex,
                                                        build_reference, cuda_only_note)
    from efficient_transformers.bench.runner import resolve_targets, target_kind

    assert target_kind("flex_mask:bigbird") == "ref"
    assert cuda_only_note("flex_mask:bigbird") and cuda_only_note("dense_sdpa") is None
    cfg = BenchConfig(models=["longformer", "flex_mask:longformer"], progress=False)
    assert resolve_targets(cfg) == [("ours", "longformer"), ("ref", "flex_mask:longformer")]
    with pytest.raises(ValueError, match="same-mask references"):
        resolve_targets(BenchConfig(models=["flex_mask:performer"], progress=False))
    assert "flex_mask:longformer" not in [n for _, n in resolve_targets(BenchConfig())]
    for name in SAME_MASK_MECHANISMS:   # each gives one mask at its default options
        assert isinstance(build_reference(f"flex_mask:{name}", 64, 2, 4096), SameMaskFlex)
    import efficient_transformers as et

    split = et.build_attention("sparse_transformer", dim=64, heads=2, combine="split")
    dilated = et.build_attention("longformer", dim=64, heads=2, dilation=[1, 2])
    assert split.single_pattern(4096) is None and dilated.pattern(4096) is None


def test_same_mask_reference_computes_attention_under_the_mechanisms_mask(monkeypatch):
    """The reference's core (FlexAttention's eager reference here) equals dense attention
    restricted to the mechanism's pattern, pair by pair."""
    import torch

    from efficient_transformers.bench.reference import SAME_MASK_MECHANISMS, SameMaskFlex
    from efficient_transformers.functional import flex

    from torch.nn.attention import flex_attention as module

    monkeypatch.setattr(flex, "_compiled_flex", lambda: module.flex_attention)
    for name in SAME_MASK_MECHANISMS:
        n = 256
        ref = SameMaskFlex(name, 64, 2, n).double()
        q, k, v = (torch.randn(1, 2, n, 32, dtype=torch.float64) for _ in range(3))
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        allowed = ref.pattern.allows(i, j)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        assert allowed.any(-1).all()
        got = ref.core(q, k, v)
        assert (got - want).abs().max().item() < 1e-10, name


@pytest.mark.gpu
def test_same_mask_reference_runs_forward_and_backward_on_cuda():
    """Each same-mask reference compiles and runs a training step in bf16; its output is
    attention under the mechanism's mask (masked SDPA in float32 as the oracle)."""
    import torch

    from efficient_transformers.bench.reference import SAME_MASK_MECHANISMS, build_reference

    for name in SAME_MASK_MECHANISMS:
        n = 2048
        ref = build_reference(f"flex_mask:{name}", 128, 2, n).cuda()
        x = torch.randn(1, n, 128, device="cuda", requires_grad=True)
        q, k, v = ref.to_qkv(x).view(1, n, 3, 2, -1).permute(2, 0, 3, 1, 4)
        if hasattr(ref.pattern, "tables"):
            ref.pattern.tables(x.device)
        i = torch.arange(n, device="cuda")
        allowed = ref.pattern.allows(i[:, None], i[None, :])
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        got = ref.core(*(t.bfloat16() for t in (q, k, v)))
        assert (got.float() - want).abs().max().item() < 3e-2 * want.abs().max().item(), name
        ref(x).sum().backward()
        assert torch.isfinite(x.grad).all()
