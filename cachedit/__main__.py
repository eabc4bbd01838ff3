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
    # serve / generate: their dependencies (uvicorn, FastAPI, prometheus-client) load only when run
    from cachedit.integrations import serve

    serve.build_serve_parser(
        commands.add_parser("serve", help="an OpenAI-compatible image server with batching across requests")
    )
    serve.build_generate_parser(commands.add_parser("generate", help="one image from a prompt, without a server"))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        demo.main(args)
    elif args.command == "serve":
        return serve.serve_main(args)
    elif args.command == "generate":
        return serve.generate_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
