"""Kernel benchmark runner: times every `Case` of the kernel modules, prints ratios, writes JSON.

    python -m bench.kernels [--quick] [--json PATH] [--only TEXT] [--module NAME]
    voice-engine bench kernels ...

Each module in KERNEL_MODULES exposes `cases() -> list[Case]`; a module that is not in this
checkout is skipped, one that fails to import is reported and skipped. A case is timed like
`timeit`'s autorange: the call count grows until one run lasts `--min-time`, then the best of
`--repeat` runs gives nanoseconds per call; the runs of one group's cases are interleaved.
Ratios are speed-ups over the group's baseline (baseline ns / case ns, so 2.0 = twice as
fast) and are checked against each case's target.
The exit status is 0 whatever the numbers: this reports, CI's tests judge.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import timeit
import traceback
from dataclasses import dataclass
from pathlib import Path

from bench.kernel_case import Case

KERNEL_MODULES = ("bench.kernels_g711", "bench.kernels_jitter", "bench.kernels_ws")
DEFAULT_JSON = Path(__file__).parent / "out" / "kernels.json"


@dataclass
class Result:
    case: Case
    ns_per_call: float | None  # None when the case raised
    number: int
    repeats: int
    error: str | None = None
    ratio: float | None = None  # speed-up over the group's baseline

    @property
    def meets_target(self) -> bool | None:
        if self.case.target is None or self.ratio is None:
            return None
        return self.ratio >= self.case.target


def load_cases(modules: tuple[str, ...] = KERNEL_MODULES) -> tuple[list[Case], list[str]]:
    """All cases of the modules that import; plus a note for each module left out."""
    cases: list[Case] = []
    notes: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                notes.append(f"{name}: not in this checkout, skipped")
                continue
            notes.append(f"{name}: import failed ({exc}), skipped")
            continue
        except Exception as exc:  # noqa: BLE001 - a broken module must not hide the others' numbers
            notes.append(f"{name}: import failed ({type(exc).__name__}: {exc}), skipped")
            continue
        cases.extend(module.cases())
    return cases, notes


def _calibrate(timer: timeit.Timer, min_time: float) -> tuple[int, float]:
    """Calls per run so that one run lasts at least `min_time`; and that run's duration."""
    number = 1
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= min_time:
            return number, elapsed
        # Jump close to the target instead of stepping 1, 2, 5, 10, ...
        number = max(number * 2, int(number * min_time / max(elapsed, 1e-9) * 1.1))


def time_group(cases: list[Case], min_time: float, repeat: int) -> list[Result]:
    """Best ns per call of each case over `repeat` runs of at least `min_time` seconds.

    The runs of a group's cases are interleaved (A B C, A B C, ...), so a burst of load from
    elsewhere on the machine slows every case of the round instead of skewing one ratio.
    """
    timers = [timeit.Timer(case.func) for case in cases]
    numbers = [0] * len(cases)
    best = [float("inf")] * len(cases)
    errors: dict[int, str] = {}
    for round_ in range(repeat):
        for i, case in enumerate(cases):
            if i in errors:
                continue
            try:
                if round_ == 0:
                    case.func()  # warm caches and lazy state outside the timing
                    numbers[i], best[i] = _calibrate(timers[i], min_time)
                else:
                    best[i] = min(best[i], timers[i].timeit(numbers[i]))
            except Exception:  # noqa: BLE001 - a failing kernel is reported, the rest still run
                errors[i] = traceback.format_exc(limit=3)
    return [
        Result(case, None, 0, 0, error=errors[i])
        if i in errors
        else Result(case, best[i] / numbers[i] * 1e9, numbers[i], repeat)
        for i, case in enumerate(cases)
    ]


def time_case(case: Case, min_time: float, repeat: int) -> Result:
    """One case on its own (see time_group)."""
    return time_group([case], min_time, repeat)[0]


def attach_ratios(results: list[Result]) -> None:
    baselines = {
        r.case.group: r.ns_per_call
        for r in results
        if r.case.baseline and r.ns_per_call is not None
    }
    for r in results:
        base = baselines.get(r.case.group)
        if base is not None and r.ns_per_call:
            r.ratio = base / r.ns_per_call


def machine_info() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def _fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "error"
    return f"{ns:,.0f}" if ns >= 100 else f"{ns:.1f}"


def format_table(results: list[Result]) -> str:
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.case.group, []).append(r)
    name_width = max([len(r.case.name) for r in results] + [14]) + 2
    lines: list[str] = []
    for group, members in groups.items():
        lines.append(group)
        for r in members:
            if r.case.baseline:
                ratio = "baseline"
            elif r.ratio is not None:
                ratio = f"{r.ratio:6.2f}x"
            else:
                ratio = ""
            verdict = ""
            if r.case.target is not None:
                mark = {True: "✓", False: "✗", None: "?"}[r.meets_target]
                verdict = f"{mark} target {r.case.target:.2f}x"
            lines.append(
                f"  {r.case.name:<{name_width}}{_fmt_ns(r.ns_per_call):>14} ns"
                f"  {ratio:>9}  {verdict}"
            )
            if r.error:
                lines.append("    " + r.error.strip().splitlines()[-1])
        lines.append("")
    return "\n".join(lines)


def to_json(results: list[Result], notes: list[str], args: argparse.Namespace) -> dict[str, object]:
    return {
        "benchmark": "kernels",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "min_time_s": args.min_time,
        "repeat": args.repeat,
        "machine": machine_info(),
        "notes": notes,
        "cases": [
            {
                "group": r.case.group,
                "name": r.case.name,
                "ns_per_call": r.ns_per_call,
                "baseline": r.case.baseline,
                "target": r.case.target,
                "ratio": r.ratio,
                "meets_target": r.meets_target,
                "number": r.number,
                "repeats": r.repeats,
                "error": r.error,
            }
            for r in results
        ],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs: a rough reading in seconds"
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"output file ({DEFAULT_JSON})"
    )
    parser.add_argument("--only", default="", help="run only groups or names containing TEXT")
    parser.add_argument(
        "--module",
        action="append",
        dest="modules",
        help=f"kernel module to load (repeatable; default: {', '.join(KERNEL_MODULES)})",
    )
    parser.add_argument("--min-time", type=float, default=None, help="seconds per timed run")
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed runs per case (best is kept)"
    )
    args = parser.parse_args(argv)
    if args.min_time is None:
        args.min_time = 0.005 if args.quick else 0.1
    if args.repeat is None:
        args.repeat = 3 if args.quick else 7
    args.repeat = max(1, args.repeat)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases, notes = load_cases(tuple(args.modules) if args.modules else KERNEL_MODULES)
    if args.only:
        needle = args.only.lower()
        cases = [c for c in cases if needle in c.group.lower() or needle in c.name.lower()]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
    results = [
        result
        for members in groups.values()
        for result in time_group(members, args.min_time, args.repeat)
    ]
    attach_ratios(results)
    info = machine_info()
    print(
        f"{info['cpu']}, {info['cores']} cores, Python {info['python']}"
        f"{' (quick)' if args.quick else ''}\n"
    )
    print(format_table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(to_json(results, notes, args), indent=2, ensure_ascii=False) + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
