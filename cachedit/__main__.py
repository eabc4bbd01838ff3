"""``python -m cachedit`` / ``cachedit``: command-line entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cachedit", description="A torch.compile backend that step-caches diffusion transformers"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from cachedit.integrations import demo

    demo.build_parser(commands.add_parser("demo", help="the embedded model with and without cachedit: table + PNG grid"))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        demo.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
