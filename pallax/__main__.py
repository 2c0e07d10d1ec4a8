"""Command line: ``python -m pallax demo`` / ``pallax demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pallax")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="windowed attention demo on the default shapes")
    demo.add_argument("--seq", type=int, default=None, help="sequence length (default 1024)")
    bench = commands.add_parser("bench", help="run benchmarks/attention.py")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pallax import demo as demo_module

        demo_module.main(seq=args.seq)
    elif args.command == "bench":
        try:
            from benchmarks import attention
        except ImportError:
            parser.error("benchmarks/ not found: run `pallax bench` from the repository root")
        attention.main(args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
