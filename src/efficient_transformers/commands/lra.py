"""`efficient-transformers lra`: train and evaluate every (model, task) pair and write a leaderboard
like the LRA paper's Table 1: OUT/leaderboard.md, leaderboard.json and leaderboard.png.

Each pair trains in OUT/<task>/<model>/ with `train`'s machinery: a pair with a result.json is
done and skipped; a pair with a checkpoint resumes from it; a pair whose model cannot be built for
the task (e.g. an encoder-only mechanism on the causal MQAR task) or fails is listed with the
reason instead of an accuracy.

    efficient-transformers lra --models transformer,performer --tasks listops,mqar --preset small --out runs/lra
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes, atomic_write_json, read_json
from ..tasks import TASKS
from .train import add_training_flags, config_from_args

TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
          "pathfinder": "Pathfinder", "mqar": "MQAR"}


def split_list(text: str, known: list[str], flag: str) -> list[str]:
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))  # once each
    if items == ["all"]:
        return list(known)
    unknown = [t for t in items if t not in known]
    if unknown or not items:
        raise ValueError(f"{flag}: unknown {unknown or 'empty list'}; expected a comma-separated "
                         f"list of {known} or 'all'")
    return items


def run_pair(args, task: str, model: str, out: Path) -> dict[str, Any]:
    from ..train import train
    from ..train.checkpoint import find_checkpoint

    if (out / "result.json").is_file():
        return {**read_json(out / "result.json"), "status": "ok"}
    if args.report_only:
        if (out / "failed.json").is_file():
            return read_json(out / "failed.json")
        return {"task": task, "model": model, "status": "pending", "reason": "not run yet"}
    data = (args.data_map or {}).get(task)
    cfg = config_from_args(args, task=task, model=model, out=str(out))
    cfg.data = data
    started = time.perf_counter()
    try:
        result = train(cfg, resume=find_checkpoint(out) is not None if out.exists() else False,
                       progress=not args.no_progress)
        return {**result, "status": "ok", "wall_seconds": time.perf_counter() - started}
    except Exception as err:  # one broken pair must not stop the leaderboard
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        if args.verbose:
            traceback.print_exc()
        failed = {"task": task, "model": model, "status": "failed", "reason": reason}
        atomic_write_json(out / "failed.json", failed)  # listed by --report-only; retried otherwise
        return failed


def markdown(board: dict) -> str:
    tasks, rows = board["tasks"], board["rows"]
    head = ["Model"] + [TITLES.get(t, t) for t in tasks] + ["Avg"]
    lines = [f"# Leaderboard (preset {board['preset'] or 'default'})", "",
             "Test accuracy (%); chance is the majority class (ListOps, LRA tasks) or 1/pairs (MQAR).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    chance = ["chance"] + [f"{100 * board['chance'][t]:.2f}" if t in board["chance"] else "–"
                           for t in tasks] + ["–"]
    for model in board["models"]:
        cells, accs = [model], []
        for t in tasks:
            r = rows[model][t]
            if r["status"] == "ok":
                cells.append(f"{100 * r['accuracy']:.2f}")
                accs.append(r["accuracy"])
            else:
                cells.append("n/a" if r["status"] == "failed" else "…")
        cells.append(f"{100 * sum(accs) / len(accs):.2f}" if len(accs) == len(tasks) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| " + " | ".join(chance) + " |")
    lines += ["", "Time per pair: training wall seconds / process CPU seconds.", "",
              "| Model | " + " | ".join(TITLES.get(t, t) for t in tasks) + " |",
              "|" + "---|" * (len(tasks) + 1)]
    for model in board["models"]:
        cells = [model]
        for t in tasks:
            r = rows[model][t]
            cells.append(f"{r['train_seconds']:.0f} / {r.get('cpu_seconds') or 0:.0f}"
                         if r["status"] == "ok" else "–")
        lines.append("| " + " | ".join(cells) + " |")
    failed = [(m, t, rows[m][t]["reason"]) for m in board["models"] for t in tasks
              if rows[m][t]["status"] == "failed"]
    if failed:
        lines += ["", "Not available:", ""] + [f"- {m} on {t}: {why}" for m, t, why in failed]
    return "\n".join(lines) + "\n"


def plot(board: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, models, rows = board["tasks"], board["models"], board["rows"]
    width = 0.8 / len(tasks)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(models) + 3.5), 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, task in enumerate(tasks):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(models))]
        ys = [100 * rows[m][task]["accuracy"] if rows[m][task]["status"] == "ok" else 0.0
              for m in models]
        color = colors[j % len(colors)]
        ax.bar(xs, ys, width, label=TITLES.get(task, task), color=color)
        for x, m in zip(xs, models):
            if rows[m][task]["status"] != "ok":
                ax.text(x, 1, "n/a" if rows[m][task]["status"] == "failed" else "…",
                        ha="center", va="bottom", rotation=90, fontsize=7, color=color)
        if task in board["chance"]:
            ax.hlines(100 * board["chance"][task], -0.5, len(models) - 0.5, colors=color,
                      linestyles="dashed", linewidth=1,
                      label=f"{TITLES.get(task, task)} chance")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=35, ha="right")
    ax.set_xlim(-0.5, len(models) - 0.5)
    ax.set_ylim(0, 100)
    ax.set_xlabel("model")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Long Range Arena-style leaderboard (preset {board['preset'] or 'default'})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_leaderboard(out: Path, board: dict) -> None:
    atomic_write_json(out / "leaderboard.json", board)
    atomic_write_bytes(out / "leaderboard.md", markdown(board).encode())
    plot(board, out / "leaderboard.png")


def run(args) -> int:
    from ..registry import list_models
    from .train import parse_pairs

    models = split_list(args.models, list_models(), "--models")
    tasks = split_list(args.tasks, list(TASKS), "--tasks")
    args.data_map = {k: str(v) for k, v in parse_pairs(args.data, "--data").items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    board = {"preset": args.preset, "tasks": tasks, "models": models, "chance": {},
             "rows": {m: {t: {"status": "pending", "reason": "not run yet"} for t in tasks}
                      for m in models}}
    for task in tasks:
        for model in models:
            result = run_pair(args, task, model, out / task / model)
            board["rows"][model][task] = result
            if result["status"] == "ok":
                board["chance"][task] = result["chance"]
                print(f"{model} on {task}: accuracy {100 * result['accuracy']:.2f}% "
                      f"(chance {100 * result['chance']:.2f}%), {result['train_seconds']:.0f} s")
            elif result["status"] == "failed":
                print(f"{model} on {task}: {result['reason']}")
            write_leaderboard(out, board)  # after every pair: a partial board is readable
    print(markdown(board))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lra", help="train and evaluate models on LRA tasks / MQAR and write a leaderboard",
        description="Train each (model, task) pair, resuming pairs already done, and write "
                    "OUT/leaderboard.md, .json and .png.")
    p.add_argument("--models", required=True, help="comma-separated models, or 'all'")
    p.add_argument("--tasks", required=True, help=f"comma-separated tasks of {list(TASKS)}, or 'all'")
    p.add_argument("--out", required=True)
    p.add_argument("--data", action="append", metavar="TASK=FOLDER",
                   help="folder of a task's official files (repeatable), e.g. text=data/imdb")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing pairs")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the leaderboard of the pairs already done "
                        "(and of those that failed)")
    add_training_flags(p)
    p.set_defaults(func=run)
