"""Write bench.json, bench.csv, bench.md (+ plots) and render the terminal table."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from .analysis import crossovers, summarize_status
from .config import COMPILED_WARMUP

CSV_COLUMNS = ["label", "kind", "target", "mode", "causal", "n", "batch", "dim", "heads", "dtype",
               "device", "status", "time_ms", "host_ms", "peak_mib", "state_bytes", "mem_method",
               "wall_s", "cpu_s", "note", "options"]


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if v >= size:
            return f"{v / size:.1f} {unit}"
    return f"{int(v)} B"


def fmt_exp(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def fmt_n(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _status_cell(r: dict[str, Any]) -> str:
    s = r["status"]
    if s.startswith("error"):
        return "error"
    return s


def cell(r: dict[str, Any] | None, field: str) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return _status_cell(r)
    value = r.get(field)
    if field == "peak_mib":
        return "–" if value is None else fmt_ms(value)
    if field == "state_bytes":
        return fmt_bytes(value)
    return fmt_ms(value)


def host_cell(r: dict[str, Any] | None) -> str:
    """'3.10 (96%)': the host's time to queue a CUDA step and its share of the step."""
    if not r or r.get("status") != "ok" or r.get("host_ms") is None or not r.get("time_ms"):
        return ""
    return f"{fmt_ms(r['host_ms'])} ({min(100.0, 100 * r['host_ms'] / r['time_ms']):.0f}%)"


def lengths(records) -> list[int]:
    return sorted({r["n"] for r in records})


def grid(records, mode: str) -> dict[str, dict[int, dict]]:
    """{label: {N: record}} for one mode, labels in record order."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        if r["mode"] == mode:
            out.setdefault(r["label"], {})[r["n"]] = r
    return out


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ----------------------------------------------------------------------------- markdown
def render_markdown(results: dict[str, Any], plots: list[str]) -> str:
    cfg, env, records, an = results["config"], results["environment"], results["records"], \
        results["analysis"]
    ns = lengths(records)
    exps = {(e["label"], e["mode"]): e for e in an["exponents"]}
    cross = {c["label"]: c for c in an["crossover"]}
    baselines = {c["baseline"] for c in cross.values()}
    out = [f"# Attention benchmark: {cfg['device'].upper()}, {cfg['dtype']}", ""]
    if cfg.get("command"):
        out += [f"Command: `{cfg['command']}`", ""]
    where = env.get("gpu") or f"{env['processor']}, {env['threads']} threads"
    out += [f"{env['date']} · torch {env['torch']} · Python {env['python']} · {where} · "
            f"{env['platform']}", "",
            f"One self-attention layer with projections, x ({cfg['batch']}, N, {cfg['dim']}), "
            f"{cfg['heads']} heads, default options of each mechanism (N-tied options from "
            f"`bench/config.py`). Median of {cfg['repeats']} runs after {cfg['warmup']} warm-up"
            + (" (CPU time of the process, all threads)" if cfg.get("clock") == "cpu" else "")
            + (f"; every layer through `torch.compile(mode={cfg['compile']!r})` for forward and "
               f"forward + backward (compiling in the warm-up, at least "
               f"{COMPILED_WARMUP} runs), decode eager" if cfg.get("compile") else "")
            + ("; forward and forward + backward captured once as a CUDA graph after the "
               "warm-up and replayed (`--cuda-graphs`: eager kernels, no host time per call; "
               "each replay checked against the eager step), decode eager"
               if cfg.get("cuda_graphs") else "")
            + "; "
            f"per-case limit {cfg['timeout']:g} s; {results['elapsed_s']:g} s in all. "
            "Statuses: " + ", ".join(f"{k} {v}" for k, v in
                                     summarize_status(records).items()) + ".", ""]
    for mode, title in (("fwdbwd", "Forward + backward"), ("fwd", "Forward (inference)")):
        g = grid(records, mode)
        if not g:
            continue
        out += [f"## {title}: time (ms)", ""]
        header = ["mechanism", "claimed"] + [fmt_n(n) for n in ns] + \
            ["time exp.", "verdict", "mem exp."]
        if mode == "fwdbwd":
            header.append("beats dense from")
        rows = []
        for lab, by_n in g.items():
            e = exps.get((lab, mode), {})
            row = [f"`{lab}`", e.get("complexity") or "–"] + [cell(by_n.get(n), "time_ms")
                                                             for n in ns]
            row += [fmt_exp(e.get("time_exponent")), e.get("time_verdict", "n/a"),
                    fmt_exp(e.get("memory_exponent"))]
            if mode == "fwdbwd":
                c = cross.get(lab)
                row.append(("baseline" if lab in baselines else "–") if c is None else
                           (fmt_n(c["crossover"]) if c["crossover"] else "never"))
            rows.append(row)
        out += [md_table(header, rows), ""]
        if any(r.get("host_ms") is not None for by_n in g.values() for r in by_n.values()):
            out += [f"## {title}: host time (ms) and its share of the step", ""]
            rows = [[f"`{lab}`"] + [host_cell(by_n.get(n)) for n in ns] for lab, by_n in g.items()]
            out += [md_table(["mechanism"] + [fmt_n(n) for n in ns], rows), "",
                    "Host time: from the step's start until its last kernel was queued, before "
                    "the closing synchronisation. Near 100% the host (Python, the dispatcher, "
                    "kernel launches) sets the pace and fewer, larger operators would help more "
                    "than fewer bytes.", ""]
        out += [f"## {title}: peak memory (MiB above weights and input)", ""]
        rows = [[f"`{lab}`"] + [cell(by_n.get(n), "peak_mib") for n in ns]
                for lab, by_n in g.items()]
        out += [md_table(["mechanism"] + [fmt_n(n) for n in ns], rows), ""]
    g = grid(records, "decode")
    if g:
        out += ["## Decode: time per generated token (ms) · state size at context N", ""]
        rows = [[f"`{lab}`"] + [f"{cell(by_n.get(n), 'time_ms')} · {cell(by_n.get(n), 'state_bytes')}"
                                if by_n.get(n) and by_n[n]["status"] == "ok"
                                else cell(by_n.get(n), "time_ms") for n in ns]
                for lab, by_n in g.items()]
        out += [md_table(["mechanism"] + [fmt_n(n) for n in ns], rows), ""]
    for ref, table in an["reference_ratios"].items():
        out += [f"## Forward + backward time / `{ref}`", ""]
        rows = [[f"`{lab}`"] + [f"{ratios[n]:.2f}" if n in ratios else "" for n in ns]
                for lab, ratios in table.items()]
        out += [md_table(["mechanism"] + [fmt_n(n) for n in ns], rows), ""]
    if an.get("same_mask_ratios"):
        out += ["## Forward + backward time / FlexAttention with the same mask "
                "(`flex_mask:NAME`)", ""]
        rows = [[f"`{lab}`"] + [f"{ratios[n]:.2f}" if n in ratios else "" for n in ns]
                for lab, ratios in an["same_mask_ratios"].items()]
        out += [md_table(["mechanism"] + [fmt_n(n) for n in ns], rows), ""]
    if an["peers"]:
        out += ["## Ours / peer (public packages, same harness, same run)", ""]
        rows = []
        for p in an["peers"]:
            rows.append([f"`{p['ours']}`", f"`{p['peer']}` ({p['settings']})", p["mode"],
                         fmt_n(p["n"]),
                         fmt_ms(p["ours_ms"]) if p["ours_ms"] is not None else p["ours_status"],
                         fmt_ms(p["peer_ms"]) if p["peer_ms"] is not None else p["peer_status"],
                         "–" if p["time_ratio"] is None else f"{p['time_ratio']:.2f}",
                         "–" if p.get("separate_ratio") is None else f"{p['separate_ratio']:.2f}",
                         "–" if p["memory_ratio"] is None else f"{p['memory_ratio']:.2f}"])
        out += [md_table(["ours", "peer", "mode", "N", "ours ms", "peer ms", "time ratio",
                          "separate processes", "memory ratio"], rows), ""]
        if any(p["timing"] == "paired" for p in an["peers"]):
            out += ["Forward + backward times here come from one worker per peer that, after the "
                    "peer's own runs, builds ours too and alternates the two (one step each per "
                    "round, order swapped every round): a drift of the machine's speed, or a "
                    "process that runs slower as a whole, weighs on both sides alike. 'separate "
                    "processes': the ratio of the two sides' own cases, for comparison. Memory: "
                    "each side's own fresh process.", ""]
    if an["causal"]:
        out += ["## Causal / non-causal forward + backward", ""]
        rows = [[f"`{c['target']}`", fmt_n(c["n"]), fmt_ms(c["causal_ms"]),
                 fmt_ms(c["noncausal_ms"]), f"{c['ratio']:.2f}"] for c in an["causal"]]
        out += [md_table(["mechanism", "N", "causal ms", "non-causal ms", "ratio"], rows), ""]
    if an["targets"]:
        out += ["## Targets of the benchmark issue", ""]
        rows = [[t["goal"], f"`{t['subject']}`",
                 {True: "met", False: "**missed**", None: "not measured"}[t["met"]],
                 t["detail"]] for t in an["targets"]]
        out += [md_table(["target", "subject", "result", "measured"], rows), ""]
    failures = [r for r in records if r["status"] not in ("ok",)]
    if failures:
        out += ["## Cases not measured", ""]
        rows = [[f"`{r['label']}`", r["mode"], fmt_n(r["n"]), r["status"].replace("|", "\\|"),
                 (r.get("note") or "").replace("|", "\\|")] for r in failures]
        out += [md_table(["mechanism", "mode", "N", "status", "note"], rows), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    out += ["Exponents: least-squares slope of log(value) on log(N) over the longer lengths "
            "(the shortest dropped when three or more, at most the three longest); verdict "
            "'agree' within ±0.25 of the survey's claimed exponent, 'below'/'above' otherwise. "
            "'beats dense from': the shortest measured N from which the mechanism is faster than "
            "`transformer` (dense SDPA) at every longer measured N. Peak memory: "
            + ("CUDA allocator peak above the baseline." if cfg["device"] == "cuda" else
               "resident-set high-water mark of a fresh process per case above its baseline "
               "(see docs/benchmarks.md)."), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- terminal
def render_terminal(results: dict[str, Any]) -> str:
    records, an = results["records"], results["analysis"]
    ns = lengths(records)
    mode = "fwdbwd" if any(r["mode"] == "fwdbwd" for r in records) else records[0]["mode"]
    g = grid(records, mode)
    exps = {(e["label"], e["mode"]): e for e in an["exponents"]}
    cross = {c["label"]: c for c in crossovers(records, mode)}   # of the mode shown
    baselines = {c["baseline"] for c in cross.values()}
    header = ["mechanism"] + [f"{fmt_n(n)} ms" for n in ns] + ["t-exp", "claim", "verdict",
                                                               "m-exp", "beats dense"]
    rows = []
    for lab, by_n in g.items():
        e = exps.get((lab, mode), {})
        c = cross.get(lab)
        rows.append([lab] + [cell(by_n.get(n), "time_ms") for n in ns] +
                    [fmt_exp(e.get("time_exponent")), fmt_exp(e.get("claimed")),
                     e.get("time_verdict", "n/a"), fmt_exp(e.get("memory_exponent")),
                     ("baseline" if lab in baselines else "–") if c is None else
                     (fmt_n(c["crossover"]) if c["crossover"] else "never")])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    title = {"fwdbwd": "forward + backward", "fwd": "forward", "decode": "decode"}[mode]
    text = [f"{title}, median ms ({results['config']['device']}, {results['config']['dtype']})",
            line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    missed = [t for t in an["targets"] if t["met"] is False]
    if an["targets"]:
        text.append(f"\ntargets: {sum(t['met'] is True for t in an['targets'])} met, "
                    f"{len(missed)} missed" + (":" if missed else ""))
        text += [f"  {t['subject']}: {t['goal']} ({t['detail']})" for t in missed]
    return "\n".join(text)


# ------------------------------------------------------------------------------- files
def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return "" if v is None else v


def write_reports(results: dict[str, Any], out: str, plots: bool = True) -> list[str]:
    os.makedirs(out, exist_ok=True)
    files = []
    png = []
    if plots:
        from .plots import write_plots

        png = write_plots(results, out)
    path = os.path.join(out, "bench.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    files.append(path)
    path = os.path.join(out, "bench.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in results["records"]:
            w.writerow([_csv_value(r.get(c)) for c in CSV_COLUMNS])
    files.append(path)
    path = os.path.join(out, "bench.md")
    with open(path, "w") as f:
        f.write(render_markdown(results, png) + "\n")
    files.append(path)
    return files + [os.path.join(out, p) for p in png]


# ------------------------------------------------------------------------ docs section
def doc_section(results: dict[str, Any]) -> str:
    """The markdown report for a documentation page: headings two levels down, no plots."""
    text = render_markdown(results, plots=[])
    return "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())


def update_doc(path: str, results: dict[str, Any], section: str) -> None:
    """Replace the text between `<!-- bench:SECTION start -->` and `<!-- bench:SECTION end -->`
    in `path` (appended at the end when the markers are not there yet)."""
    start, end = f"<!-- bench:{section} start -->", f"<!-- bench:{section} end -->"
    block = f"{start}\n{doc_section(results)}\n{end}"
    text = open(path).read() if os.path.exists(path) else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)
