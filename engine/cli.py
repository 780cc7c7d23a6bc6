"""`voice-engine` (also `python -m engine`): serve, bench."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.config import Settings
from engine.log import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voice-engine", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--backend", choices=["auto", "local", "vapi", "echo", "canned"])
    serve.add_argument("--workers", type=int)
    serve.add_argument("--redis", dest="redis_url")
    serve.add_argument("--insecure-webhooks", action="store_true", default=None)
    serve.add_argument("--assistant", dest="assistant_file", help="assistant TOML file")

    bench = sub.add_parser("bench", help="the benchmark harness (see bench/)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.command == "serve":
        settings = Settings.from_env().with_overrides(
            host=args.host, port=args.port, backend=args.backend, workers=args.workers,
            redis_url=args.redis_url, insecure_webhooks=args.insecure_webhooks,
            assistant_file=args.assistant_file,
        )
        from engine.server import serve

        return serve(settings)
    if args.command == "bench":
        # The harness lives beside the package in a checkout, not in the installed package.
        checkout = Path(__file__).resolve().parent.parent
        if (checkout / "bench" / "__main__.py").is_file() and str(checkout) not in sys.path:
            sys.path.insert(0, str(checkout))
        try:
            from bench.__main__ import main as bench_main
        except ImportError:
            print(
                "voice-engine bench runs from a checkout (the bench/ folder beside engine/)",
                file=sys.stderr,
            )
            return 2
        return bench_main(args.args)
    return 2
