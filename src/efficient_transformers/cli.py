"""The `efficient-transformers` command. Each subcommand lives in `commands/<name>.py` (found
automatically) and exposes `add_parser(subparsers)`, which sets `func(args) -> int` on its parser."""

from __future__ import annotations

import argparse
import importlib
import sys



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efficient-transformers",
        description="The X-formers of 'Efficient Transformers: A Survey' behind one PyTorch API.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import commands
    from .discover import import_submodules

    for name in import_submodules(commands.__name__, commands.__path__):
        importlib.import_module(f"{commands.__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"efficient-transformers {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
