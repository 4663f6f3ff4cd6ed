"""PNG plots of a benchmark run (matplotlib, Agg): time and memory against N on log-log axes, one
line per mechanism, the dense baseline drawn thick and black; decode; ours against the peers."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINES = ("transformer", "dense_sdpa")
MARKERS = "os^vD<>pPhX*"
STYLES = ("-", "--", "-.", ":")


def _series(records, mode: str, field: str, kinds=("ours", "ref")):
    """{label: ([N], [value])} of successful records, in record order."""
    out: dict[str, tuple[list, list]] = {}
    for r in sorted(records, key=lambda r: r["n"]):
        if r["mode"] != mode or r["kind"] not in kinds or r["status"] != "ok":
            continue
        value = r.get(field)
        if value is None or value <= 0:
            continue
        xs, ys = out.setdefault(r["label"], ([], []))
        xs.append(r["n"])
        ys.append(value)
    return out


def _failures(records, mode: str) -> dict[str, str]:
    """{label: 'oom at 64k'}: the first failed length of each series (drawn at its last point)."""
    out = {}
    for r in sorted(records, key=lambda r: r["n"]):
        if r["mode"] == mode and r["status"] in ("oom", "timeout") and r["label"] not in out:
            n = r["n"]
            out[r["label"]] = f"{r['status']} at {n // 1024}k" if n % 1024 == 0 else \
                f"{r['status']} at {n}"
    return out


def _style(i: int, lab: str) -> dict[str, Any]:
    if lab == BASELINES[0]:
        return dict(color="black", linewidth=3.2, linestyle="-", marker="o", zorder=10)
    if lab in BASELINES:
        return dict(color="dimgray", linewidth=2.6, linestyle="--", marker="o", zorder=9)
    cmap = plt.get_cmap("tab20")
    return dict(color=cmap(i % 20), linewidth=1.4, linestyle=STYLES[(i // 10) % len(STYLES)],
                marker=MARKERS[i % len(MARKERS)], markersize=4.5)


def _loglog(ax, data: dict, ns: list[int], failures: dict[str, str]) -> None:
    for i, (lab, (xs, ys)) in enumerate(data.items()):
        style = _style(i, lab)
        ax.plot(xs, ys, label=lab + (" (dense baseline)" if lab in BASELINES else ""), **style)
        if lab in failures:  # an oom / timeout beyond the last point
            ax.annotate(failures[lab], (xs[-1], ys[-1]), xytext=(4, 4),
                        textcoords="offset points", fontsize=7, color=style["color"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in ns])
    ax.grid(True, which="both", alpha=0.25)


def _finish(fig, ax, title: str, ylabel: str, path: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_plots(results: dict[str, Any], out: str) -> list[str]:
    cfg, records = results["config"], results["records"]
    ns = sorted({r["n"] for r in records})
    where = f"{cfg['device'].upper()} {cfg['dtype']}, B={cfg['batch']}, dim {cfg['dim']}, " \
            f"{cfg['heads']} heads"
    names = []
    panels = [
        ("fwdbwd", "time_ms", "bench_time_fwdbwd.png", "Forward + backward time", "median time (ms)"),
        ("fwdbwd", "peak_mib", "bench_memory_fwdbwd.png", "Forward + backward peak memory",
         "peak memory above weights + input (MiB)"),
        ("fwd", "time_ms", "bench_time_fwd.png", "Forward (inference) time", "median time (ms)"),
        ("decode", "time_ms", "bench_decode.png", "Decode: time per generated token",
         "time per token (ms)"),
    ]
    for mode, field, name, title, ylabel in panels:
        data = _series(records, mode, field)
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(9, 5.6))
        _loglog(ax, data, ns, _failures(records, mode))
        xlabel = "context length (tokens)" if mode == "decode" else "sequence length N (tokens)"
        _finish(fig, ax, f"{title}\n{where}", ylabel, os.path.join(out, name), xlabel)
        names.append(name)
    peer_png = _peer_plot(results, out, where)
    if peer_png:
        names.append(peer_png)
    return names


def _peer_plot(results: dict[str, Any], out: str, where: str) -> str | None:
    rows = [p for p in results["analysis"]["peers"]
            if p["mode"] == "fwdbwd" and p["ours_ms"] is not None and p["peer_ms"] is not None]
    if not rows:
        return None
    n = 4096 if any(p["n"] == 4096 for p in rows) else max(p["n"] for p in rows)
    rows = [p for p in rows if p["n"] == n]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [p["ours_ms"] for p in rows], height=0.4, label="ours",
            color="tab:blue")
    ax.barh([y - 0.2 for y in ys], [p["peer_ms"] for p in rows], height=0.4, label="peer",
            color="tab:gray")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{p['ours']} vs {p['peer']}" for p in rows], fontsize=8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    for y, p in zip(ys, rows):
        ax.text(max(p["ours_ms"], p["peer_ms"]) * 1.08, y, f"{p['time_ratio']:.2f}x",
                va="center", fontsize=8)
    ax.set_title(f"Ours vs public packages, forward + backward at N={n}\n{where}", fontsize=11)
    ax.set_xlabel("median time (ms, log scale); label: ours / peer")
    ax.legend(loc="lower right", fontsize=8)
    ax.margins(x=0.15)
    name = "bench_peers.png"
    fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name
