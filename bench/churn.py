"""`voice-engine bench churn`: short calls, connected and hung up many times; is anything left?

Owns the churn run against one spawned echo engine: N calls, C at a time, each one connecting a
`TwilioCaller`, sending about a second of media (a click, then silence) and hanging up (`stop`,
then close). Before and after it reads `/health` (must return to 0 active calls and sessions)
and the server process's open fds, threads, RSS and TCP sockets by state (psutil). What the
engine left behind (a socket in CLOSE_WAIT, a fd, a thread) shows up as after − before.

The count of asyncio tasks inside the server comes from its /metrics
(`engine_event_loop_tasks`, read at each scrape), before and after.

    python -m bench churn --calls 10000 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.soak import (
    get_health,
    get_metrics,
    http_base,
    md_table,
    out_dir,
    process_snapshot,
    run_async,
    spawn_engine,
    write_report,
)
from bench.twilio import make_click, percentiles
from bench.twilio_caller import Ticker, TwilioCaller


@dataclass
class ChurnOptions:
    calls: int = 10000
    concurrency: int = 50
    media: float = 1.0
    settle: float = 2.0
    warmup: int = 5
    workers: int | None = None
    out: Path | None = None
    progress: bool = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voice-engine bench churn",
        description="Connect, send ~1 s of media, hang up; N times, C at once. Then look at "
        "what the server kept: /health, fds, threads, RSS.",
    )
    p.add_argument("--calls", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--media", type=float, default=1.0, help="seconds of media per call")
    p.add_argument("--settle", type=float, default=2.0, help="wait after the churn, s")
    p.add_argument(
        "--warmup", type=int, default=5, help="calls before the 'before' snapshot (lazy set-up)"
    )
    p.add_argument("--workers", type=int, help="passed to `engine serve --workers`")
    p.add_argument("--out", type=Path, help="default bench/out/<timestamp>-churn")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


@dataclass
class Tally:
    done: int = 0
    failed: int = 0
    closed_by_server: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    errors: list[str] | None = None

    def error(self, text: str) -> None:
        self.errors = self.errors or []
        if len(self.errors) < 20:
            self.errors.append(text)


async def short_call(
    url: str, ticker: Ticker, session: aiohttp.ClientSession, media: float, index: int,
    tally: Tally, durations: list[float],
) -> None:  # fmt: skip
    started = time.monotonic()
    caller = TwilioCaller(url, ticker, session=session)
    try:
        await caller.connect(timeout=10.0)
        caller.speak(make_click(index))
        await asyncio.sleep(media)
        await caller.hangup()
    except Exception as exc:  # noqa: BLE001 - a failed call is a result
        tally.failed += 1
        tally.error(f"{type(exc).__name__}: {exc}")
        await caller.hangup()
        return
    if caller.error:
        tally.error(caller.error)
    tally.done += 1
    tally.closed_by_server += int(caller.closed_by_server)
    tally.frames_sent += caller.frames_sent
    tally.frames_received += caller.frames_received
    durations.append(1000.0 * (time.monotonic() - started))


async def churn(opts: ChurnOptions, out: Path) -> dict[str, Any]:
    started = datetime.now().isoformat(timespec="seconds")
    server = await spawn_engine(out, "engine-churn", workers=opts.workers)
    assert server.proc is not None
    pid = server.proc.pid
    base = http_base(server)
    ticker = Ticker()
    tally = Tally()
    durations: list[float] = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            fresh = process_snapshot(pid)
            warm = Tally()
            await asyncio.gather(*(
                short_call(server.url, ticker, session, opts.media, i, warm, [])
                for i in range(opts.warmup)
            ))  # fmt: skip
            await asyncio.sleep(opts.settle)
            health_before = await get_health(session, base)
            before = process_snapshot(pid)
            metrics_before = await get_metrics(session, base)

            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(opts.calls):
                queue.put_nowait(i)

            async def worker() -> None:
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    await short_call(server.url, ticker, session, opts.media, i, tally, durations)

            async def progress(t0: float) -> None:
                while True:
                    await asyncio.sleep(5.0)
                    sys.stderr.write(
                        f"[churn] {time.monotonic() - t0:6.1f}s  calls {tally.done + tally.failed}"
                        f"/{opts.calls} ({tally.failed} failed)  "
                        f"{(tally.done + tally.failed) / (time.monotonic() - t0):.1f} calls/s\n"
                    )

            t0 = time.monotonic()
            reporter = asyncio.create_task(progress(t0)) if opts.progress else None
            await asyncio.gather(*(worker() for _ in range(opts.concurrency)))
            elapsed = time.monotonic() - t0
            if reporter is not None:
                reporter.cancel()
            await asyncio.sleep(opts.settle)
            health_after = await get_health(session, base)
            metrics_after = await get_metrics(session, base)
        # After the harness's own sockets to the server are closed too.
        await asyncio.sleep(0.5)
        after = process_snapshot(pid)
    finally:
        await ticker.close()
        await server.stop()

    def delta(name: str) -> int:
        return int(metrics_after.get(name, 0.0) - metrics_before.get(name, 0.0))

    return {
        "bench": "churn",
        "started": started,
        "options": {
            "calls": opts.calls, "concurrency": opts.concurrency, "media_s": opts.media,
            "settle_s": opts.settle, "warmup": opts.warmup, "workers": opts.workers,
        },  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "elapsed_s": round(elapsed, 2),
        "calls_per_s": round((tally.done + tally.failed) / elapsed, 2) if elapsed else None,
        "completed": tally.done,
        "failed": tally.failed,
        "closed_by_server": tally.closed_by_server,
        "frames_sent": tally.frames_sent,
        "frames_received": tally.frames_received,
        "call_ms": percentiles(durations),
        "engine_counters": {
            k: delta(f"engine_{k}_total")
            for k in ("calls", "calls_shed", "frames_in", "frames_out", "frames_dropped_out",
                      "bad_messages")
        },  # fmt: skip
        "health_before": health_before,
        "health_after": health_after,
        "process_fresh": fresh,
        "process_before": before,
        "process_after": after,
        "diff": {
            "fds": after["fds"] - before["fds"],
            "threads": after["threads"] - before["threads"],
            "rss_mb": round(after["rss_mb"] - before["rss_mb"], 2),
        },
        "asyncio_tasks": {
            "before": int(metrics_before.get("engine_event_loop_tasks", -1)),
            "after": int(metrics_after.get("engine_event_loop_tasks", -1)),
        },
        "errors": tally.errors or [],
    }


def render_markdown(r: dict[str, Any]) -> str:
    o = r["options"]
    lines = [
        f"# Churn: {o['calls']} short calls, {o['concurrency']} at once",
        "",
        f"Started {r['started']} on {r['machine']['cpus']} CPUs. Engine `--backend echo`"
        + (f" `--workers {o['workers']}`" if o["workers"] else "")
        + f". Each call: connect, {o['media_s']:g} s of media, `stop`, close. 'before' is after "
        f"{o['warmup']} warm-up calls; 'after' is {o['settle_s']:g} s after the last hangup.",
        "",
        f"- {r['completed']} completed, {r['failed']} failed, {r['closed_by_server']} closed by "
        f"the server, in {r['elapsed_s']} s: **{r['calls_per_s']} calls/s**",
        f"- call duration p50 {r['call_ms']['p50']} ms, p99 {r['call_ms']['p99']} ms",
        f"- frames sent {r['frames_sent']}, received {r['frames_received']}",
        "- engine counters over the churn: "
        + ", ".join(f"{k} {v}" for k, v in r["engine_counters"].items()),
        f"- /health before {r['health_before']}",
        f"- /health after {r['health_after']}",
        f"- asyncio tasks: {r['asyncio_tasks']}",
        "",
    ]
    rows = []
    for label, key in (("fresh", "process_fresh"), ("before", "process_before"),
                       ("after", "process_after")):  # fmt: skip
        p = r[key]
        rows.append([label, p["fds"], p["threads"], p["rss_mb"], p["tcp"]])
    lines += md_table(["server", "open fds", "threads", "RSS MiB", "TCP sockets"], rows)
    d = r["diff"]
    lines += ["", f"after − before: fds {d['fds']:+d}, threads {d['threads']:+d}, "
              f"RSS {d['rss_mb']:+.2f} MiB", ""]  # fmt: skip
    if r["errors"]:
        lines += ["## Errors (first 20)", ""] + [f"- `{e}`" for e in r["errors"]] + [""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    opts = ChurnOptions(**vars(build_parser().parse_args(argv)))
    out = out_dir(opts.out, "churn")
    try:
        r = run_async(lambda: churn(opts, out))
    except RuntimeError as exc:
        print(f"bench churn: {exc}", file=sys.stderr)
        return 1
    paths = write_report(r, out, render_markdown(r))
    d = r["diff"]
    print(
        f"churn {opts.calls} x{opts.concurrency}: {r['calls_per_s']} calls/s, failed {r['failed']}"
        f"  health after {r['health_after'].get('activeCalls')}/"
        f"{r['health_after'].get('activeSessions')} calls/sessions"
        f"  fds {r['process_before']['fds']}->{r['process_after']['fds']} ({d['fds']:+d})"
        f"  threads {d['threads']:+d}  RSS {d['rss_mb']:+.2f} MiB"
    )
    print(f"report: {paths['markdown']}")
    return 0
