"""`voice-engine bench soak`: many echo calls held for minutes; does anything drift?

Owns the long run against one spawned engine (`--backend echo`): N `TwilioCaller`s clicking as in
`bench twilio`'s echo scenario for M minutes, the server's RSS and CPU sampled every few seconds,
relay latency p50/p99 per minute, frames sent / received / dropped, and RSS growth (first minute
after the ramp against the last minute; flat within 5 % is the target). Also owns the small
pieces the other reliability benchmarks (bench/churn.py, bench/faults.py) share: spawning the
engine with pass-through flags, reading /health and /metrics, a snapshot of the server process,
latencies stamped with when they were measured, and writing JSON + Markdown.

    python -m bench soak --calls 500 --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil

from bench.sysstats import ProcessSampler
from bench.twilio import (
    REPO,
    Options,
    Progress,
    Run,
    SpawnedServer,
    one_call,
    percentiles,
)
from bench.twilio_caller import Ticker

T = TypeVar("T")


# --- shared by the reliability benchmarks --------------------------------------------------------


class TimedList(list[float]):
    """A list whose `append` also records when each value arrived, so the latencies the echo
    scenario of bench/twilio.py collects can be cut into time windows afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, value: float) -> None:
        self.times.append(time.monotonic())
        super().append(value)

    def between(self, t0: float, t1: float) -> list[float]:
        return [v for t, v in zip(self.times, self, strict=True) if t0 <= t < t1]


async def spawn_engine(
    out: Path, name: str, workers: int | None = None, redis: str | None = None
) -> SpawnedServer:
    """The engine with the echo backend on a free port, its log in `out/<name>.log`."""
    server = SpawnedServer("engine", "echo", out / f"{name}.log", cpu=None)
    if workers:
        server.cmd += ["--workers", str(workers)]
    if redis:
        server.cmd += ["--redis", redis]
    await server.start()
    return server


def http_base(server: SpawnedServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def get_health(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return dict(await resp.json())


async def get_metrics(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The engine's /metrics as {name: value} (unlabelled samples only; enough for counters)."""
    async with session.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        text = await resp.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line or " " not in line:
            continue
        name, _, value = line.partition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def process_snapshot(pid: int) -> dict[str, Any]:
    """Open fds, threads, RSS and TCP sockets by state of the server and its workers."""
    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    fds = threads = 0
    rss = 0.0
    states: dict[str, int] = {}
    for p in procs:
        try:
            fds += p.num_fds()
            threads += p.num_threads()
            rss += p.memory_info().rss
            for conn in p.net_connections(kind="tcp"):
                states[conn.status] = states.get(conn.status, 0) + 1
        except psutil.Error:
            continue
    return {
        "processes": len(procs),
        "fds": fds,
        "threads": threads,
        "rss_mb": round(rss / (1024 * 1024), 2),
        "tcp": dict(sorted(states.items())),
    }


def run_async(coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs a benchmark's coroutine on uvloop when it is there, as bench/twilio.py does."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro())


def out_dir(given: Path | None, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = given or (REPO / "bench" / "out" / f"{stamp}-{name}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_report(results: dict[str, Any], out: Path, markdown: str) -> dict[str, Path]:
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["markdown"].write_text(markdown)
    return paths


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("–" if c is None else str(c) for c in row) + " |" for row in rows]
    return lines


def echo_options(duration: float, click_interval: float = 0.5) -> Options:
    """Options for `bench.twilio.one_call` running the echo scenario without the webhook."""
    return Options(
        scenario="echo", duration=duration, click_interval=click_interval, webhook=False,
        progress=False,
    )  # fmt: skip


def new_run(target: str, calls: int, opts: Options, t_end: float) -> tuple[Run, TimedList]:
    run = Run(target=target, calls=calls, opts=opts, t_end=t_end, speech=b"", barge_speech=b"")
    timed = TimedList()
    run.latencies_ms = timed
    return run, timed


def frame_totals(run: Run) -> tuple[int, int]:
    """Frames sent and received so far by every call of `run`, ended or live."""
    sent = run.sent_by_ended + sum(c.frames_sent for c in run.callers.values())
    received = run.received_by_ended + sum(c.frames_received for c in run.callers.values())
    return sent, received


# --- the soak ------------------------------------------------------------------------------------


@dataclass
class SoakOptions:
    calls: int = 500
    minutes: float = 10.0
    workers: int | None = None
    ramp: float | None = None
    sample_every: float = 2.0
    click_interval: float = 0.5
    out: Path | None = None
    progress: bool = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voice-engine bench soak",
        description="N echo calls held for M minutes against a spawned engine: drift in RSS, "
        "latency and loss.",
    )
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--minutes", type=float, default=10.0, help="how long every call is held")
    p.add_argument("--workers", type=int, help="passed to `engine serve --workers`")
    p.add_argument("--ramp", type=float, help="seconds over which calls start (default calls/100)")
    p.add_argument("--sample-every", type=float, default=2.0, help="server CPU/RSS sampling, s")
    p.add_argument("--click-interval", type=float, default=0.5)
    p.add_argument("--out", type=Path, help="default bench/out/<timestamp>-soak")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def per_window(
    timed: TimedList,
    sampler: ProcessSampler,
    t_from: float,
    t_to: float,
    width: float,
    t0: float,
) -> list[dict[str, Any]]:
    """Latency percentiles and mean server RSS/CPU for each `width`-second window."""
    rows = []
    start = t_from
    while start < t_to - 1e-6:
        end = min(t_to, start + width)
        lat = percentiles(timed.between(start, end))
        samples = [s for s in sampler.samples if start <= s.t < end]
        rows.append({
            "from_s": round(start - t0, 1),
            "to_s": round(end - t0, 1),
            "latency_ms": lat,
            "rss_mb": round(sum(s.rss_mb for s in samples) / len(samples), 2) if samples else None,
            "cpu": round(sum(s.cpu for s in samples) / len(samples), 1) if samples else None,
        })
        start = end
    return rows


async def soak(opts: SoakOptions, out: Path) -> dict[str, Any]:
    started = datetime.now().isoformat(timespec="seconds")
    server = await spawn_engine(out, "engine-soak", workers=opts.workers)
    assert server.proc is not None
    pid = server.proc.pid
    try:
        duration = opts.minutes * 60.0
        ramp = opts.ramp if opts.ramp is not None else opts.calls / 100.0
        t0 = time.monotonic()
        t_start = t0 + 0.2
        steady_from = t_start + ramp + 1.0
        t_end = t_start + ramp + duration
        echo = echo_options(duration, opts.click_interval)
        run, timed = new_run("engine", opts.calls, echo, t_end)
        ticker = Ticker()
        sampler = ProcessSampler(pid, interval=opts.sample_every, label=lambda: run.connected)
        sampler.start()
        progress = Progress(run, t0, opts.progress)
        progress_task = asyncio.create_task(progress.loop())
        gc.freeze()  # as in bench/twilio.py: no full collections over hundreds of callers
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            base = http_base(server)
            metrics_before = await get_metrics(session, base)
            starts = [t_start + ramp * i / opts.calls for i in range(opts.calls)]
            tasks = [
                asyncio.create_task(one_call(i, run, server.url, ticker, session, at, None))
                for i, at in enumerate(starts)
            ]
            outcomes = await asyncio.gather(*tasks)
            progress_task.cancel()
            gc.unfreeze()
            await asyncio.sleep(1.0)
            metrics_after = await get_metrics(session, base)
            health_after = await get_health(session, base)
        if opts.progress:
            sys.stderr.write(("\r" if sys.stderr.isatty() else "") + progress.line() + "\n")
        await sampler.stop()
        await ticker.close()
        snapshot_after = process_snapshot(pid)
    finally:
        await server.stop()

    # Windows: a minute each (the last may be short), or a third of a run under 1.5 minutes.
    steady = t_end - steady_from
    width = 60.0 if steady >= 90.0 else max(1.0, steady / 3.0)
    minutes = per_window(timed, sampler, steady_from, t_end, width, t0)
    first_rss = minutes[0]["rss_mb"] if minutes else None
    last_rss = minutes[-1]["rss_mb"] if minutes else None
    growth = (
        round(100.0 * (last_rss - first_rss) / first_rss, 2) if first_rss and last_rss else None
    )
    connected = [o for o in outcomes if o.get("connected")]
    sent = sum(o["stats"]["frames_sent"] for o in connected)
    received = sum(o["stats"]["frames_received"] for o in connected)
    clicks = {
        k: sum(o["scenario"].get(k, 0) for o in connected)
        for k in ("clicks", "clicks_back", "clicks_lost")
    }

    def delta(name: str) -> int:
        return int(metrics_after.get(name, 0.0) - metrics_before.get(name, 0.0))

    return {
        "bench": "soak",
        "started": started,
        "options": {
            "calls": opts.calls, "minutes": opts.minutes, "workers": opts.workers,
            "ramp_s": ramp, "sample_every_s": opts.sample_every,
            "click_interval_s": opts.click_interval,
        },  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "connected": len(connected),
        "failed_to_connect": run.failed,
        "ended_early": sum(1 for o in connected if o.get("ended_early")),
        "frames": {
            "sent": sent,
            "received": received,
            "lost": max(0, sent - received),
            "dropped_send": sum(o["stats"]["frames_dropped_send"] for o in connected),
            "late": sum(o["stats"]["frames_late"] for o in connected),
        },
        "engine_counters": {
            k: delta(f"engine_{k}_total")
            for k in ("frames_in", "frames_out", "frames_dropped_in", "frames_dropped_out",
                      "frames_late", "frames_concealed", "bad_messages", "calls_shed")
        },  # fmt: skip
        "clicks": clicks,
        "latency_ms": percentiles(list(timed)),
        # Click sent → echo at the caller's socket: the engine's share, without the caller's
        # playout buffer (which only deepens, e.g. after a stall of the harness itself).
        "transit_ms": percentiles(run.transit_ms),
        "window_s": width,
        "per_window": minutes,
        "rss_growth_pct": growth,
        "rss_flat": growth is not None and abs(growth) <= 5.0,
        "server": {
            "pid": pid,
            **sampler.summary(steady_from, t_end),
            "series": sampler.series(t0),
        },
        "ticker": ticker.lag_summary(),
        "health_after": health_after,
        "process_after": snapshot_after,
        "latency_series": [
            [round(t - t0, 2), round(v, 2)] for t, v in zip(timed.times, timed, strict=True)
        ],
        "errors": run.errors,
    }


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    series = results["server"]["series"]
    ax1.plot([s["t"] for s in series], [s["rss_mb"] for s in series], color="C0")
    ax1.set_ylabel("server RSS, MiB")
    o = results["options"]
    ax1.set_title(f"soak: {o['calls']} echo calls, {o['minutes']:g} min")
    mids = [(w["from_s"] + w["to_s"]) / 2 for w in results["per_window"]]
    lat = results["latency_series"]
    if lat:
        ax2.scatter([p[0] for p in lat], [p[1] for p in lat], s=1, alpha=0.15, color="C7",
                    label="each click")  # fmt: skip
    for key, colour in (("p50", "C1"), ("p99", "C3")):
        ax2.plot(mids, [w["latency_ms"][key] for w in results["per_window"]], "o-",
                 color=colour, label=f"{key} per window")  # fmt: skip
    ax2.set_ylabel("relay latency, ms")
    ax2.set_xlabel("seconds since start")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out / "soak.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_markdown(r: dict[str, Any], png: str) -> str:
    o, fr, lat = r["options"], r["frames"], r["latency_ms"]
    lines = [
        f"# Soak: {o['calls']} echo calls held {o['minutes']:g} min",
        "",
        f"Started {r['started']} on {r['machine']['cpus']} CPUs. Engine `--backend echo`"
        + (f" `--workers {o['workers']}`" if o["workers"] else "")
        + f"; calls ramped over {o['ramp_s']:g} s; a 40 ms click every {o['click_interval_s']:g} s"
        " per call; latency = click sent → its echo heard at the caller.",
        "",
        f"- connected {r['connected']}, failed {r['failed_to_connect']}, "
        f"ended early {r['ended_early']}",
        f"- frames sent {fr['sent']}, received {fr['received']}, lost {fr['lost']}, "
        f"dropped at send {fr['dropped_send']}, late (harness) {fr['late']}",
        f"- clicks {r['clicks']['clicks']}, back {r['clicks']['clicks_back']}, "
        f"lost {r['clicks']['clicks_lost']}",
        f"- latency p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms (n={lat['n']});"
        f" transit (to the caller's socket) p50 {r['transit_ms']['p50']} ms, "
        f"p99 {r['transit_ms']['p99']} ms",
        f"- server CPU mean {r['server']['cpu_mean']:.1f} % of a core, "
        f"RSS peak {r['server']['rss_peak_mb']:.1f} MiB",
        f"- **RSS growth first→last window: {r['rss_growth_pct']} %** "
        f"({'flat' if r['rss_flat'] else 'NOT flat'} by the 5 % target)",
        "- engine counters over the run: "
        + ", ".join(f"{k} {v}" for k, v in r["engine_counters"].items()),
        f"- after the run: /health {r['health_after']}, process {r['process_after']}",
        "",
        f"## Per window ({r['window_s']:g} s each, after the ramp)",
        "",
    ]
    lines += md_table(
        ["from s", "to s", "n", "p50 ms", "p99 ms", "server RSS MiB", "server CPU %"],
        [
            [w["from_s"], w["to_s"], w["latency_ms"]["n"], w["latency_ms"]["p50"],
             w["latency_ms"]["p99"], w["rss_mb"], w["cpu"]]
            for w in r["per_window"]
        ],
    )  # fmt: skip
    lines += ["", f"![RSS and latency]({png})", ""]
    if r["errors"]:
        lines += ["## Errors (first 20)", ""] + [f"- `{e}`" for e in r["errors"]] + [""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    opts = SoakOptions(**vars(build_parser().parse_args(argv)))
    out = out_dir(opts.out, "soak")
    try:
        results = run_async(lambda: soak(opts, out))
    except RuntimeError as exc:
        print(f"bench soak: {exc}", file=sys.stderr)
        return 1
    png = plot(results, out)
    paths = write_report(results, out, render_markdown(results, png.name))
    lat, fr = results["latency_ms"], results["frames"]
    print(
        f"soak x{opts.calls} {opts.minutes:g} min: latency p50 {lat['p50']} p99 {lat['p99']} ms"
        f"  frames sent {fr['sent']} recv {fr['received']} lost {fr['lost']}"
        f"  dropped_out {results['engine_counters']['frames_dropped_out']}"
        f"  RSS growth {results['rss_growth_pct']} %  failed {results['failed_to_connect']}"
    )
    print(f"report: {paths['markdown']}")
    return 0
