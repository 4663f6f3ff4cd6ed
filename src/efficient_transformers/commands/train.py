"""`efficient-transformers train`: train one model on one task (see train/trainer.py).

    efficient-transformers train --task listops --model transformer --preset small --out runs/x
    torchrun --nproc_per_node=2 -m efficient_transformers train ... (DDP; --batch-size is global)
"""

from __future__ import annotations

import json
from typing import Any

from ..tasks import TASKS

MODEL_FLAGS = ("dim", "depth", "heads", "mlp_dim", "dropout", "positions", "pooling")


def parse_value(text: str) -> Any:
    """`--option` values: JSON where it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: expected key=value, got {pair!r}")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def config_from_args(args, task: str | None = None, model: str | None = None, out: str | None = None):
    """The TrainConfig an argparse namespace (train's or lra's flags) asks for."""
    from ..train import TrainConfig, resolve

    task = task or args.task
    explicit = {k: getattr(args, k, None) for k in (
        "steps", "batch_size", "seq_len", "lr", "warmup", "schedule", "weight_decay", "clip",
        "eval_every", "save_every", "log_every", "eval_examples")}
    explicit["model"] = {k: getattr(args, k, None) for k in MODEL_FLAGS}
    explicit["task_options"] = parse_pairs(getattr(args, "task_option", None), "--task-option")
    merged = resolve(task, args.preset, explicit)
    model = model or args.model
    return TrainConfig(task=task, model=model, out=out or args.out,
                       data=getattr(args, "data", None), seed=args.seed, device=args.device,
                       model_kwargs=merged.pop("model"), task_options=merged.pop("task_options"),
                       options=model_options(getattr(args, "option", None), model),
                       preset=args.preset, **merged)


def model_options(pairs: list[str] | None, model: str) -> dict[str, Any]:
    """`--option key=value` for every model, `--option MODEL:key=value` for MODEL only."""
    everyone, mine = [], []
    for pair in pairs or []:
        prefix, colon, rest = pair.partition(":")
        if colon and "=" not in prefix:
            if prefix == model:
                mine.append(rest)
        else:
            everyone.append(pair)
    return {**parse_pairs(everyone, "--option"), **parse_pairs(mine, "--option")}


def add_training_flags(p) -> None:
    """Flags shared by `train` and `lra` (all optional: the preset or defaults fill them)."""
    g = p.add_argument_group("training (override the preset)")
    g.add_argument("--steps", type=int)
    g.add_argument("--batch-size", type=int, help="the global batch (split over torchrun processes)")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--warmup", type=int, help="warm-up steps")
    g.add_argument("--schedule", choices=["cosine", "rsqrt", "constant"])
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--clip", type=float, help="gradient-norm clipping (0: off)")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--save-every", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--eval-examples", type=int, help="cap on the evaluation examples")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--preset", choices=["small", "lra"])
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    m = p.add_argument_group("model (override the preset)")
    m.add_argument("--dim", type=int)
    m.add_argument("--depth", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--mlp-dim", type=int)
    m.add_argument("--dropout", type=float)
    m.add_argument("--positions", choices=["learned", "sinusoidal", "none"])
    m.add_argument("--pooling", choices=["cls", "mean"])
    m.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="attention option passed to build_model (repeatable), e.g. window=64; "
                        "MODEL:key=value applies to MODEL only (for `lra`)")
    m.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                   help="task option (repeatable), e.g. pairs=8 or min_length=100")


def run(args) -> int:
    from ..train import train

    cfg = config_from_args(args)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(json.dumps({k: result[k] for k in ("task", "model", "steps", "accuracy",
                                             "eval_accuracy", "chance", "train_seconds")}))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on a task (LRA or MQAR); torchrun for several processes",
        description="Train one model on one task. Without --data, generated tasks (listops, "
                    "pathfinder, mqar) generate their examples; the others say which files to get.")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--model", required=True, help="a registered model (efficient-transformers zoo)")
    p.add_argument("--data", help="folder of the task's official files")
    p.add_argument("--out", required=True, help="run folder (metrics.jsonl, checkpoint/, model/)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_training_flags(p)
    p.set_defaults(func=run)
