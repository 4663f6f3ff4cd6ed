"""`efficient-transformers zoo`: the survey's Table 1 with a column saying what is implemented."""

from __future__ import annotations

import json

from ..registry import attention_spec, list_attention
from ..zoo import SURVEY_TABLE

COLUMNS = ["name", "title", "paper", "year", "class", "complexity", "decode", "implemented"]


def zoo_rows() -> list[dict]:
    implemented = set(list_attention())
    rows = []
    for name, row in SURVEY_TABLE.items():
        rows.append({
            "name": name, "title": row.title, "paper": row.paper.split(" (")[0], "year": row.year,
            "class": "+".join(row.taxonomy) or "-", "complexity": row.complexity,
            "decode": "yes" if row.decode else "no",
            "implemented": "yes" if name in implemented else "no",
            "options": attention_spec(name).options if name in implemented else {},
        })
    return rows


def render(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False, default=str)
    cells = [[str(r[c]) for c in COLUMNS] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]
    fmt_row = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    lines = [fmt_row(COLUMNS), fmt_row(["-" * w for w in widths])] + [fmt_row(c) for c in cells]
    done = sum(r["implemented"] == "yes" for r in rows)
    return "\n".join(lines + [f"\n{done} of {len(rows)} implemented (17 X-formers + the dense baseline)."])


def run(args) -> int:
    print(render(zoo_rows(), args.format))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("zoo", help="print the survey's table of X-formers and what is implemented")
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    p.set_defaults(func=run)
