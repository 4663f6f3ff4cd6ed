"""`efficient-transformers docs`: one Markdown page per registered mechanism, with its picture.

Each page joins what the code knows (the survey's facts, the options and their defaults, the
mechanism's docstring, its decode state size) with the latest benchmark exponents when a
`bench.json` is given, and the pattern picture from `efficient-transformers patterns`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from ..attention.base import state_nbytes
from ..registry import attention_class, attention_spec, build_attention, list_attention
from ..zoo import CLASS_NAMES, claimed_exponent
from .patterns import GALLERY_LENGTH


# Options a mechanism needs for the examples' input of 100 tokens (everything else: defaults).
EXAMPLE_OPTIONS = {"axial_transformer": {"shape": [10, 10]}, "image_transformer": {"shape": [10, 10]}}


def example_options(name: str) -> dict:
    return {k: v for k, v in EXAMPLE_OPTIONS.get(name, {}).items() if k in attention_spec(name).options}


def decode_state_sizes(name: str, contexts=(50, 100), dim: int = 64, heads: int = 4) -> dict:
    """Bytes of the decode state after `context` tokens, fp32, the example's options."""
    torch.manual_seed(0)
    attn = build_attention(name, dim=dim, heads=heads, causal=True, **example_options(name)).eval()
    sizes, state, seen = {}, None, 0
    with torch.no_grad():
        for context in contexts:
            _, state = attn.decode(torch.randn(1, context - seen, dim), state)
            seen = context
            sizes[context] = state_nbytes(state)
    return sizes


def measured_exponents(bench_files: list[Path]) -> dict:
    """name -> ["cuda bf16: time N^1.02, memory N^0.98", ...] from `bench.json` files (fwd+bwd,
    non-causal, our mechanisms) written by `efficient-transformers bench`."""
    found: dict[str, list[str]] = {}
    for path in bench_files:
        if not path.is_file():
            raise FileNotFoundError(f"--bench: no file {path}")
        data = json.loads(path.read_text())
        where = f"{data['config']['device']} {data['config']['dtype']}"
        for fit in data.get("analysis", {}).get("exponents", []):
            if fit["kind"] != "ours" or fit["mode"] != "fwdbwd" or fit["causal"]:
                continue
            if fit.get("time_exponent") is None or fit.get("memory_exponent") is None:
                continue
            lengths = ", ".join(str(n) for n in fit.get("fit_lengths", []))
            found.setdefault(fit["target"], []).append(
                f"{where}: time N^{fit['time_exponent']:.2f}, memory N^{fit['memory_exponent']:.2f} "
                f"(fit over N = {lengths})")
    return found


def usage_example(name: str) -> str:
    spec = attention_spec(name)
    extra = "".join(f", {k}={v!r}" for k, v in example_options(name).items())
    lines = ["import torch", "import efficient_transformers as et", "",
             f'attn = et.build_attention("{name}", dim=64, heads=4{extra})',
             "x = torch.randn(2, 100, 64)            # (batch, length, dim)",
             "mask = torch.ones(2, 100, dtype=torch.bool)",
             "mask[1, 80:] = False                    # padding",
             "y = attn(x, mask)                       # (2, 100, 64)",
             "assert y.shape == x.shape"]
    if spec.decode:
        lines += ["", f'causal = et.build_attention("{name}", dim=64, heads=4, causal=True{extra}).eval()',
                  "y1, state = causal.decode(x[:, :60])     # a prompt",
                  "y2, state = causal.decode(x[:, 60:61], state)  # then one token at a time"]
        task = "lm"
        head = ""
    else:
        task, head = "classify", ', pooling="mean"'
    lines += ["", f'model = et.build_model("{name}", task="{task}", vocab_size=100, dim=64, depth=2,',
              f"                       heads=4, max_len=100{head}{extra})",
              "out = model(torch.randint(0, 100, (2, 100)))",
              "print(out.logits.shape)"]
    return "\n".join(lines)


def page(name: str, fits: dict) -> str:
    spec = attention_spec(name)
    cls = attention_class(name)
    classes = ", ".join(f"{c} ({CLASS_NAMES[c]})" for c in spec.taxonomy) or "baseline"
    doc = inspect.cleandoc(cls.__doc__ or inspect.getmodule(cls).__doc__ or "")
    module_doc = inspect.cleandoc(inspect.getmodule(cls).__doc__ or "")
    measured = ("; ".join(fits[name]) if name in fits
                else "not measured yet (run `efficient-transformers bench` and rebuild the docs)")
    out = [f"# {spec.title} (`{name}`)", "",
           f"*{spec.paper}*, {spec.year}. Survey class: {classes}.", "",
           "## What it does", "", module_doc, ""]
    if doc and doc != module_doc:
        out += [doc, ""]
    out += ["## Options", "", "| option | default |", "|---|---|"]
    out += [f"| `{k}` | `{v!r}` |" for k, v in spec.options.items()] or ["| (none) | |"]
    out += ["", "Every layer also takes `dim`, `heads` and `causal`.", "",
            "## Cost", "", f"Survey complexity: {spec.complexity} (exponent of N ≈ "
            f"{claimed_exponent(name):g}). Measured: {measured}.", ""]
    if spec.decode:
        sizes = decode_state_sizes(name)
        out += ["## Decode", "", "Decodes autoregressively (`layer.decode(x_new, state)` continues a "
                "causal forward exactly). Decode state, dim 64, fp32, default options: " +
                ", ".join(f"{v:,} bytes after {k} tokens" for k, v in sizes.items()) + ".", ""]
    else:
        out += ["## Decode", "", "Does not decode (survey Table 1): `causal=True` raises ValueError.", ""]
    out += ["## Pattern", "", f"![{name} pattern](patterns/{name}.png)", "",
            "Influence of each key position on each query's output on a random input, with the "
            "mechanism's small test configuration at N = 40 (`efficient-transformers patterns " + name +
            "`). Keys reached through a detached cache (the segment memory of Transformer-XL and "
            "the Compressive Transformer) carry no gradient and do not show.", "",
            "## Usage", "", "```python", usage_example(name), "```", ""]
    return "\n".join(out)


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fits = measured_exponents([Path(p) for p in args.bench.split(",")] if args.bench else [])
    names = list_attention()
    for name in names:
        (out / f"{name}.md").write_text(page(name, fits), encoding="utf-8")
    index = ["# The mechanisms", "", "![gallery](patterns/gallery.png)", "",
             "| name | title | class | complexity | decode |", "|---|---|---|---|---|"]
    for name in names:
        s = attention_spec(name)
        index.append(f"| [`{name}`]({name}.md) | {s.title} | {'+'.join(s.taxonomy) or '-'} | "
                     f"{s.complexity} | {'yes' if s.decode else 'no'} |")
    (out / "index.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    if not args.no_pictures:
        from .patterns import write_gallery
        write_gallery(GALLERY_LENGTH, False, out / "patterns")
    print(f"wrote {len(names)} pages to {out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("docs", help="write one Markdown page per mechanism (docs/)")
    p.add_argument("--out", default="docs")
    p.add_argument("--bench", help="bench.json files (comma-separated) whose fitted exponents go "
                   "on the pages, e.g. docs/bench/cpu.json,docs/bench/cuda.json")
    p.add_argument("--no-pictures", action="store_true")
    p.set_defaults(func=run)
