"""`bench --cuda-graphs`: steps captured once and replayed, each replay checked against the eager
step. The capture itself needs a GPU (the `gpu` tests); the checks and the plumbing run here."""

from __future__ import annotations

import json

import pytest
import torch

import efficient_transformers as et
from efficient_transformers.bench import BenchConfig, run_bench
from efficient_transformers.bench import cuda_graphs, measure
from efficient_transformers.cli import main


def test_replay_check_accepts_reordered_sums_and_refuses_stale_results():
    eager = torch.randn(4, 64, 32, dtype=torch.bfloat16)
    assert cuda_graphs.check_replay(eager.clone(), eager) == 0.0
    rounding = (eager.float() * (1 + 4e-3 * torch.randn_like(eager.float()))).bfloat16()
    assert cuda_graphs.check_replay(rounding, eager) < 1e-2
    with pytest.raises(RuntimeError, match="replay differs from the eager step.*bfloat16"):
        cuda_graphs.check_replay(torch.roll(eager, 1, dims=1), eager)   # another step's data
    with pytest.raises(RuntimeError, match="replay differs"):
        cuda_graphs.check_replay(torch.zeros_like(eager), eager)        # never written
    nan = eager.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="replay differs"):
        cuda_graphs.check_replay(nan, eager)
    x = torch.randn(100, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="allowed 0.0001"):
        cuda_graphs.check_replay(x * (1 + 1e-3), x)


def test_cuda_graphs_are_refused_where_they_cannot_run(tmp_path, capsys):
    tiny = dict(models=["linformer"], lengths=(64,), dim=32, heads=2, repeats=1, progress=False)
    with pytest.raises(ValueError, match="--cuda-graphs: expected --device cuda"):
        run_bench(BenchConfig(cuda_graphs=True, **tiny), write=False)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="--cuda-graphs: expected no --compile"):
            run_bench(BenchConfig(cuda_graphs=True, device="cuda", compile="default", **tiny),
                      write=False)
        with pytest.raises(ValueError, match="--cuda-graphs: expected no --peers"):
            run_bench(BenchConfig(cuda_graphs=True, device="cuda", peers=True, **tiny),
                      write=False)
    assert main(["bench", "--cuda-graphs", "--models", "linformer", "--out", str(tmp_path)]) == 2
    assert "--cuda-graphs: expected --device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_a_case_times_the_replay_of_what_it_captured(mode, monkeypatch):
    """The harness's side, with the capture replaced by a stand-in that records what it was
    given (the CPU has no CUDA graphs): the step is warmed up and captured with its result
    (the output, or the input's gradient), the timed runs are replays, and the record carries
    the replay's difference from the eager step."""
    seen = {"replays": 0}

    def fake_graphed_step(fn, result, between, device, warmup, module):
        seen["module"] = module
        if between is not None:
            between()
        fn()
        seen["result"] = result()
        seen["clears"] = between is not None

        def replay():
            seen["replays"] += 1
            fn()

        return replay, 0.0

    monkeypatch.setattr(cuda_graphs, "graphed_step", fake_graphed_step)
    case = dict(kind="ours", target="linformer", n=64, dim=32, heads=2, causal=False, mode=mode,
                device="cpu", dtype="fp32", batch=2, repeats=3, warmup=1, cuda_graphs=True)
    record = measure.run_case(case)
    assert record["status"] == "ok" and record["cuda_graphs"] is True
    assert record["replay_error"] == 0.0 and len(record["times_ms"]) == 3
    assert seen["replays"] == 1 + 3   # the memory run's replay, then the timed ones
    assert seen["result"].shape == (2, 64, 32)   # the output, or x.grad: both (B, N, dim)
    assert seen["clears"] == (mode == "fwdbwd")
    assert isinstance(seen["module"], torch.nn.Module)   # its buffers restored before capture


def test_module_state_puts_moved_buffers_back():
    """A training step of routing_transformer moves its centroids (a new tensor each step);
    `module_state` taken before puts them back."""
    torch.manual_seed(0)
    attn = et.build_attention("routing_transformer", dim=32, heads=2, num_clusters=3)
    before = attn.centroids.clone()
    restore = cuda_graphs.module_state(attn)
    attn(torch.randn(2, 40, 32)).sum().backward()
    assert not torch.equal(attn.centroids, before)
    restore()
    assert torch.equal(attn.centroids, before)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_every_mechanism_replays_as_one_cuda_graph(causal, tmp_path):
    """Every registered mechanism and reference kernel captures its forward + backward and its
    forward in bf16 (no host sync, no host tensor read at replay), and each replay matches the
    eager step."""
    models = et.list_attention() + (["dense_sdpa", "flex_window"] if not causal else [])
    if causal:
        models = [m for m in models if et.attention_spec(m).decode]
    cfg = BenchConfig(models=models, device="cuda", dtype="bf16",
                      modes=("causal",) if causal else ("fwd", "fwdbwd"), lengths=(1024,),
                      dim=128, heads=2, repeats=2, cuda_graphs=True, progress=False,
                      out=str(tmp_path))
    records = run_bench(cfg)["records"]
    bad = {(r["target"], r["mode"]): r["status"] for r in records if r["status"] != "ok"}
    assert not bad, bad
    assert all(r["cuda_graphs"] and r["replay_error"] <= 3e-2 for r in records)
    assert all(r["time_ms"] > 0 and r["peak_mib"] >= 0 for r in records)


def test_a_graphs_run_lands_in_its_own_doc_section(tmp_path):
    """--update-doc puts a --cuda-graphs run between the `cuda-graphs` markers, beside the eager
    `cuda` section, and its report says how it was timed."""
    cfg = BenchConfig(models=["linformer"], modes=("fwdbwd",), lengths=(64,), dim=32, heads=2,
                      repeats=1, threads=1, progress=False, plots=False, out=str(tmp_path))
    run_bench(cfg)
    saved = json.loads((tmp_path / "bench.json").read_text())
    saved["config"].update(device="cuda", cuda_graphs=True)   # as a GPU run would record it
    for r in saved["records"]:
        r.update(device="cuda", cuda_graphs=True, replay_error=0.0)
    (tmp_path / "graphs.json").write_text(json.dumps(saved))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- bench:cuda start -->\neager\n<!-- bench:cuda end -->\n")
    assert main(["bench", "--from-json", str(tmp_path / "graphs.json"), "--no-plots", "--quiet",
                 "--out", str(tmp_path / "re"), "--update-doc", str(doc)]) == 0
    text = doc.read_text()
    assert "<!-- bench:cuda start -->\neager\n<!-- bench:cuda end -->" in text
    graphs = text.split("<!-- bench:cuda-graphs start -->")[1].split("<!-- bench:cuda-graphs end")[0]
    assert "captured once as a CUDA graph" in graphs and "`linformer`" in graphs
