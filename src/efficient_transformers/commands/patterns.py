"""`efficient-transformers patterns`: draw which keys each query attends to, for any mechanism."""

from __future__ import annotations

import json
from pathlib import Path

from ..registry import attention_spec, list_attention
from ..zoo import CLASS_NAMES

# Every mechanism's `small_options` fit 40 tokens (several blocks, buckets, clusters or rows).
GALLERY_LENGTH = 40
CLASS_ORDER = ["-", "FP", "FP+M", "LP", "LR+LP", "M", "LR", "KR", "RC"]


def parse_options(pairs: list[str]) -> dict:
    """["window=4", "shape=[8,8]", "pattern=fixed"] -> {"window": 4, "shape": [8, 8], ...}"""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option: expected key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def draw_map(ax, weights, title: str, fontsize: int = 9):
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("key position j", fontsize=fontsize - 1)
    ax.set_ylabel("query position i", fontsize=fontsize - 1)
    ax.tick_params(labelsize=fontsize - 2)
    return image


def class_label(name: str) -> str:
    return "+".join(attention_spec(name).taxonomy) or "-"


def write_single(name: str, length: int, causal: bool, options: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..visualize import mechanism_map, sorted_view

    spec = attention_spec(name)
    weights = mechanism_map(name, length=length, causal=causal, **options)
    order = sorted_view(name, length=length, causal=causal, **options)
    panels = [(weights, "original order")]
    if order is not None:
        panels.append((weights[order][:, order], "sorted by bucket / cluster / block"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5), squeeze=False)
    for ax, (w, label) in zip(axes[0], panels):
        image = draw_map(ax, w, label)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="influence |∂y_i/∂x_j| (row-normalised)")
    mode = "causal" if causal else "bidirectional"
    fig.suptitle(f"{name}: {spec.title} [{class_label(name)}], {spec.complexity}, N={length}, {mode}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def write_gallery(length: int, causal: bool, out_dir: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..visualize import mechanism_map

    names = list_attention()
    if causal:
        names = [n for n in names if attention_spec(n).decode]
    names.sort(key=lambda n: (CLASS_ORDER.index(class_label(n)) if class_label(n) in CLASS_ORDER
                              else len(CLASS_ORDER), n))
    cols = 5
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        draw_map(ax, mechanism_map(name, length=length, causal=causal), f"{name} [{class_label(name)}]", 9)
        write_single(name, length, causal, {}, out_dir / f"{name}{'-causal' if causal else ''}.png")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    legend = ", ".join(f"{k} = {v}" for k, v in CLASS_NAMES.items())
    mode = "causal" if causal else "bidirectional"
    fig.suptitle(f"Which keys each query attends to (N={length}, {mode}), by survey class\n{legend}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = out_dir / f"gallery{'-causal' if causal else ''}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args) -> int:
    if args.length < 2:
        raise ValueError(f"--length: expected an integer >= 2, got {args.length}")
    if args.all:
        out_dir = Path(args.out or "docs/patterns")
        print(write_gallery(args.length, args.causal, out_dir))
        return 0
    if not args.name:
        raise ValueError("NAME: give a mechanism name or --all")
    options = parse_options(args.options)
    out = Path(args.out or f"{args.name}{'-causal' if args.causal else ''}.png")
    print(write_single(args.name, args.length, args.causal, options, out))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("patterns", help="draw the N x N attention pattern of a mechanism")
    p.add_argument("name", nargs="?", help="registry key (see `efficient-transformers zoo`)")
    p.add_argument("options", nargs="*", metavar="option=value", help="mechanism options")
    p.add_argument("--length", type=int, default=GALLERY_LENGTH)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--all", action="store_true", help="one picture per mechanism plus gallery.png")
    p.add_argument("--out", help="FILE.png, or the folder with --all (default docs/patterns)")
    p.set_defaults(func=run)
