"""From records to findings: scaling exponents, crossovers, ratios and the issue's targets.

Exponent fit: least squares of log(value) against log(N) over the *longer* lengths — every
successful length except the shortest when there are three or more, at most the three longest
(defaults 256, 1024, 4096 fit 1024..4096; CUDA's 1k..64k fit 4k..64k). Verdict against the
survey's claimed exponent (`zoo.claimed_exponent`): "agree" within ±0.25, else "below" (cheaper
than claimed at these lengths, usually fixed overheads) or "above".
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

TOLERANCE = 0.25
MEMORY_TARGET = 1.25     # sub-quadratic mechanisms: memory exponent below this
CAUSAL_TARGET = 2.0      # causal forms within 2x of the non-causal form
FLEX_TARGET = 1.2        # fixed patterns within 1.2x of FlexAttention with their mask (CUDA)
LINEAR_TARGET = 1.2      # causal linear attention within 1.2x of the chunked kernel (CUDA)
LINEAR_FROM = 4096       # ... at the lengths of ANCHORS.md's kernel table (4k and up)


def fit_exponent(ns: Iterable[float], values: Iterable[float]) -> float | None:
    """Slope of log(value) vs log(N) by least squares; None with < 2 usable points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if n > 0 and v and v > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def fit_points(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The longer lengths: drop the shortest when >= 3 points, keep at most the 3 longest."""
    pts = sorted(p for p in points if p[1] is not None and p[1] > 0)
    if len(pts) >= 3:
        pts = pts[1:]
    return pts[-3:]


def verdict(fit: float | None, claimed: float | None) -> str:
    if fit is None or claimed is None:
        return "n/a"
    if abs(fit - claimed) <= TOLERANCE:
        return "agree"
    return "below" if fit < claimed else "above"


def _ok(records, **match) -> dict[int, dict]:
    """{N: record} of successful records matching every key."""
    out = {}
    for r in records:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
            out[r["n"]] = r
    return out


def series(records) -> list[tuple[str, str, str, bool, str]]:
    """Distinct (label, mode, target, causal, kind) in record order."""
    seen = {}
    for r in records:
        key = (r["label"], r["mode"])
        seen.setdefault(key, (r["label"], r["mode"], r["target"], r["causal"], r["kind"]))
    return list(seen.values())


def _claimed(target: str, kind: str) -> tuple[str | None, float | None]:
    from ..zoo import SURVEY_TABLE, claimed_exponent

    if kind == "ours" and target in SURVEY_TABLE:
        return SURVEY_TABLE[target].complexity, claimed_exponent(target)
    if kind == "ref":
        from .reference import COMPLEXITY

        return COMPLEXITY.get(target, (None, None))
    return None, None


def _subquadratic(target: str, kind: str) -> bool:
    from ..zoo import SURVEY_TABLE, is_subquadratic

    return kind == "ours" and target in SURVEY_TABLE and is_subquadratic(target)


def exponents(records) -> list[dict[str, Any]]:
    rows = []
    for lab, mode, target, causal, kind in series(records):
        pts = _ok(records, label=lab, mode=mode)
        t_pts = fit_points([(n, r.get("time_ms")) for n, r in pts.items()])
        m_pts = fit_points([(n, r.get("peak_mib")) for n, r in pts.items()])
        complexity, claimed = _claimed(target, kind)
        if mode == "decode" and claimed is not None:
            claimed -= 1.0  # per generated token: the whole sequence's cost over its N tokens
        t_fit = fit_exponent([p[0] for p in t_pts], [p[1] for p in t_pts])
        m_fit = fit_exponent([p[0] for p in m_pts], [p[1] for p in m_pts])
        row = {"label": lab, "mode": mode, "target": target, "kind": kind, "causal": causal,
               "complexity": complexity, "claimed": claimed,
               "time_exponent": t_fit, "time_verdict": verdict(t_fit, claimed),
               "memory_exponent": m_fit, "memory_verdict": verdict(m_fit, claimed),
               "fit_lengths": [p[0] for p in t_pts], "subquadratic": _subquadratic(target, kind)}
        if mode == "decode":  # per-token time and state size against context length
            s_pts = fit_points([(n, r.get("state_bytes")) for n, r in pts.items()])
            row["state_exponent"] = fit_exponent([p[0] for p in s_pts], [p[1] for p in s_pts])
        rows.append(row)
    return rows


def _baseline_label(records, causal: bool, mode: str = "fwdbwd") -> str | None:
    """`transformer` (dense SDPA through our layer), else the dense_sdpa reference."""
    labels = {r["label"] for r in records if r["mode"] == mode and r.get("status") == "ok"}
    order = (["transformer (causal)", "dense_sdpa_causal"] if causal else []) + \
        ["transformer", "dense_sdpa"]
    return next((b for b in order if b in labels), None)


def crossovers(records, mode: str = "fwdbwd") -> list[dict[str, Any]]:
    """Shortest measured N from which a series beats the dense baseline at every longer N."""
    rows = []
    for lab, m, target, causal, kind in series(records):
        if m != mode:
            continue
        base_label = _baseline_label(records, causal, mode)
        if base_label is None or lab == base_label:
            continue
        mine, base = _ok(records, label=lab, mode=mode), _ok(records, label=base_label, mode=mode)
        common = sorted(set(mine) & set(base))
        ratios = {n: mine[n]["time_ms"] / base[n]["time_ms"] for n in common}
        cross = None
        for n in reversed(common):
            if ratios[n] < 1.0:
                cross = n
            else:
                break
        rows.append({"label": lab, "target": target, "kind": kind, "baseline": base_label,
                     "crossover": cross, "ratio": ratios, "measured": common})
    return rows


def same_mask_ratios(records, mode: str = "fwdbwd") -> dict[str, dict[str, dict[int, float]]]:
    """{flex_mask:NAME: {NAME: {N: time / time of the reference}}} for the same-mask references
    in the run (bench/reference.py), each against its own mechanism, non-causal (the mask's)."""
    from .reference import SAME_MASK, same_mask_references

    out = {}
    for ref in same_mask_references():
        if _ok(records, label=ref, mode=mode):
            mechanism = ref[len(SAME_MASK):]
            table = ratio_table(records, ref, mode, subjects=(mechanism,))
            if mechanism in table:
                out[ref] = {mechanism: table[mechanism]}
    return out


def ratio_table(records, ref: str, mode: str = "fwdbwd",
                subjects: Iterable[str] | None = None) -> dict[str, dict[int, float]]:
    """{label: {N: time / time of `ref`}} for every series of `mode` (of the mechanisms in
    `subjects` when given)."""
    base = _ok(records, label=ref, mode=mode)
    out = {}
    for lab, m, target, *_ in series(records):
        if m != mode or lab == ref or (subjects is not None and target not in subjects):
            continue
        mine = _ok(records, label=lab, mode=mode)
        common = sorted(set(mine) & set(base))
        if common:
            out[lab] = {n: mine[n]["time_ms"] / base[n]["time_ms"] for n in common}
    return out


def peer_rows(records) -> list[dict[str, Any]]:
    """ours / peer for every peer in the run, per mode and N (time and memory)."""
    from .peers import PEERS

    import efficient_transformers as et

    registered = et.list_attention()
    rows = []
    peer_names = [n for n in dict.fromkeys(r["target"] for r in records if r["kind"] == "peer")]
    for name in peer_names:
        peer = PEERS[name]
        ours_label = peer.ours_label
        modes = dict.fromkeys(r["mode"] for r in records if r["target"] == name)
        for mode in modes:
            for r in sorted((r for r in records if r["target"] == name and r["mode"] == mode),
                            key=lambda r: r["n"]):
                ours = next((o for o in records if o["label"] == ours_label and o["mode"] == mode
                             and o["n"] == r["n"] and o["kind"] == "ours"), None)
                missing = "not in this run" if peer.ours in registered else "not registered"
                row = {"peer": name, "package": peer.package, "ours": ours_label,
                       "settings": peer.settings, "mode": mode, "n": r["n"],
                       "peer_status": r["status"], "ours_status": ours["status"] if ours else
                       missing,
                       "peer_ms": r.get("time_ms"), "ours_ms": ours.get("time_ms") if ours else None,
                       "peer_mib": r.get("peak_mib"),
                       "ours_mib": ours.get("peak_mib") if ours else None, "timing": "separate"}
                row["time_ratio"] = _div(row["ours_ms"], row["peer_ms"])
                row["memory_ratio"] = _div(row["ours_mib"], row["peer_mib"])
                paired = r.get("paired")
                if paired:  # alternating runs in one process: the ratio that drift cannot bias
                    row["separate_ratio"] = row["time_ratio"]
                    row.update(timing="paired", ours_ms=paired["ours_ms"],
                               peer_ms=paired["peer_ms"], time_ratio=paired["ratio"])
                rows.append(row)
    return rows


def _div(a, b):
    return a / b if a is not None and b else None


def causal_rows(records) -> list[dict[str, Any]]:
    """causal / non-causal fwd+bwd time of the same mechanism."""
    rows = []
    for lab, mode, target, causal, kind in series(records):
        if mode != "fwdbwd" or not causal or kind != "ours":
            continue
        c, nc = _ok(records, label=lab, mode=mode), _ok(records, label=target, mode=mode)
        for n in sorted(set(c) & set(nc)):
            rows.append({"target": target, "n": n, "causal_ms": c[n]["time_ms"],
                         "noncausal_ms": nc[n]["time_ms"],
                         "ratio": c[n]["time_ms"] / nc[n]["time_ms"]})
    return rows


def targets(results: dict[str, Any], exps, cross, peers, causal) -> list[dict[str, Any]]:
    """The issue's performance targets that this run can check: one row per (target, subject)."""
    records = results["records"]
    device = results["config"]["device"]
    rows = []

    def add(goal, subject, ok, detail):
        rows.append({"goal": goal, "subject": subject, "met": ok, "detail": detail})

    subq = [r for r in exps if r["subquadratic"] and r["mode"] == "fwdbwd" and not r["causal"]]
    for r in subq:
        m = r["memory_exponent"]
        if m is not None:
            add(f"memory exponent < {MEMORY_TARGET}", r["label"], m < MEMORY_TARGET, f"{m:.2f}")
    by_label = {c["label"]: c for c in cross}
    if device == "cpu":
        for r in subq:
            c = by_label.get(r["label"])
            if c and c["ratio"]:
                n = 4096 if 4096 in c["ratio"] else max(c["ratio"])
                ratio = c["ratio"][n]
                add(f"beats {c['baseline']} fwd+bwd at N={n}", r["label"], ratio < 1.0,
                    f"{ratio:.2f}x of {c['baseline']}")
    else:
        for r in subq:
            c = by_label.get(r["label"])
            if not c or not c["ratio"]:
                continue
            big = [n for n in c["ratio"] if n >= 8192]
            if big:
                worst = max(c["ratio"][n] for n in big)
                add(f"beats {c['baseline']} fwd+bwd from N=8k", r["label"], worst < 1.0,
                    f"worst {worst:.2f}x at N>=8k")
            if 65536 in c["ratio"]:
                speedup = 1.0 / c["ratio"][65536]
                add("10x faster than dense at 64k", r["label"], speedup >= 10.0,
                    f"{speedup:.1f}x")
        flex = ratio_table(records, "flex_window")
        from ..zoo import SURVEY_TABLE

        same_mask = same_mask_ratios(records)
        for ref, table in same_mask.items():
            for lab, ratios in table.items():
                worst_n = max(ratios, key=ratios.get)
                add(f"within {FLEX_TARGET}x of {ref} (same mask)", lab,
                    ratios[worst_n] <= FLEX_TARGET, f"worst {ratios[worst_n]:.2f}x at N={worst_n}")
        compared = {lab for table in same_mask.values() for lab in table}
        # flex_window is a ±256 sliding window: the "same mask" only for windowed fixed patterns,
        # where the run has no reference with the mechanism's own mask
        windowed = {r["target"] for r in records if r["kind"] == "ours"
                    and "window" in (r.get("options") or {})} | _windowed_fixed_patterns()
        for lab, ratios in flex.items():
            target = lab.split(" ")[0]
            if target in SURVEY_TABLE and "FP" in SURVEY_TABLE[target].taxonomy \
                    and target in windowed and not lab.endswith("(causal)") \
                    and lab not in compared:
                worst_n = max(ratios, key=ratios.get)
                add(f"within {FLEX_TARGET}x of flex_window", lab, ratios[worst_n] <= FLEX_TARGET,
                    f"worst {ratios[worst_n]:.2f}x at N={worst_n}")
        chunked = ratio_table(records, "linear_chunked_causal").get("linear_transformer (causal)")
        if chunked:
            long = {n: r for n, r in chunked.items() if n >= LINEAR_FROM} or chunked
            worst_n = max(long, key=long.get)
            add(f"within {LINEAR_TARGET}x of linear_chunked_causal", "linear_transformer (causal)",
                long[worst_n] <= LINEAR_TARGET, f"worst {long[worst_n]:.2f}x at N={worst_n}")
    peer_ns = {p["n"] for p in peers if p["mode"] == "fwdbwd"}
    peer_n = 4096 if 4096 in peer_ns else max(peer_ns, default=None)
    for p in peers:
        if p["mode"] != "fwdbwd" or p["n"] != peer_n:
            continue
        if p["time_ratio"] is None:
            add("at least as fast as the peer", f"{p['ours']} vs {p['peer']}", None,
                f"N={p['n']}: ours {p['ours_status']}, peer {p['peer_status']}")
            continue
        ok = p["time_ratio"] <= 1.0 and (p["memory_ratio"] is None or p["memory_ratio"] <= 1.0)
        mem = f", memory {p['memory_ratio']:.2f}x" if p["memory_ratio"] is not None else ""
        add("time and memory <= peer", f"{p['ours']} vs {p['peer']}", ok,
            f"N={p['n']}: time {p['time_ratio']:.2f}x{mem}")
    for c in causal:
        if c["n"] == max(x["n"] for x in causal if x["target"] == c["target"]):
            add(f"causal within {CAUSAL_TARGET:g}x of non-causal", c["target"],
                c["ratio"] <= CAUSAL_TARGET, f"N={c['n']}: {c['ratio']:.2f}x")
    return rows


def _windowed_fixed_patterns() -> set[str]:
    """Registered fixed-pattern mechanisms with a `window` option (sliding-window attention)."""
    try:
        from ..registry import attention_spec, list_attention

        return {n for n in list_attention() if "window" in attention_spec(n).options}
    except Exception:  # noqa: BLE001 - reports must render from a bench.json alone
        return set()


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    records = results["records"]
    exps = exponents(records)
    cross = crossovers(records)
    peers = peer_rows(records)
    causal = causal_rows(records)
    from .reference import RATIO_SUBJECTS, REFERENCES

    refs = {ref: ratio_table(records, ref, subjects=RATIO_SUBJECTS.get(ref)) for ref in REFERENCES
            if _ok(records, label=ref, mode="fwdbwd")}
    same_mask = {lab: ratios for table in same_mask_ratios(records).values()
                 for lab, ratios in table.items()}
    return {"exponents": exps, "crossover": cross, "peers": peers, "causal": causal,
            "reference_ratios": refs, "same_mask_ratios": same_mask,
            "targets": targets(results, exps, cross, peers, causal)}


def summarize_status(records) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r["status"].split(":")[0]] += 1
    return dict(counts)
