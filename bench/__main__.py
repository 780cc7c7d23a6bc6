"""`python -m bench <benchmark> ...` (also `voice-engine bench ...`): picks a benchmark by name.

Each benchmark module has `main(argv: list[str]) -> int` and is imported only when chosen, so
one benchmark's dependencies never slow down or break another.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "twilio": ("bench.twilio", "simulated Twilio Media Streams calls: latency, loss, CPU"),
    "kernels": ("bench.kernels", "per-frame kernels against their baselines"),
    "webrtc": (
        "bench.webrtc",
        "aiortc WebRTC callers: relay latency, stalls under loss, CPU/MB per call",
    ),
    "soak": ("bench.soak", "echo calls held for minutes: RSS growth, latency per minute"),
    "churn": ("bench.churn", "short calls connected and hung up many times: fds, threads, RSS"),
    "faults": ("bench.faults", "faults injected beside good calls: what each cost them"),
}


def usage() -> str:
    lines = ["usage: voice-engine bench <benchmark> [options]", "", "benchmarks:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in BENCHMARKS.items()]
    lines.append("")
    lines.append("`voice-engine bench <benchmark> --help` lists a benchmark's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(BENCHMARKS[name][0])
    except ImportError as exc:
        print(f"benchmark {name!r} is not available in this checkout: {exc}", file=sys.stderr)
        return 2
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
