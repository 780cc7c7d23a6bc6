"""`voice-engine bench faults`: inject one fault at a time beside good calls; what did it cost them?

Owns the fault run against one spawned echo engine: `--good` callers click through the echo
scenario of bench/twilio.py for the whole run, while the faults below are injected one after the
other, each in its own window with a quiet gap after it. For the baseline window and each fault
window it reports the good callers' relay latency (p50/p99) and frames lost (sent − echoed back
in that window), the server's RSS and CPU, and the engine's counters (/metrics) over the window.

- `stalled-reader`: one caller that never reads its socket but keeps sending media (its receive
  buffer is shrunk so the kernel fills up in a second). The engine must trim its outbound audio
  (`engine_frames_dropped_out_total` rises) without growing memory or hurting the others.
- `garbage`: 20 callers at once sending what no Twilio would: invalid JSON, binary frames,
  oversized text messages, media with broken base64 and unknown events.
- `connect-burst`: 100 new calls within 1 s, each sending a second of media and hanging up.
- `redis-restart` (only with `--redis`): the engine runs with `--redis URL`; the Redis server
  is restarted while the calls run. Audio must be unaffected. `--redis auto` starts a private
  `redis-server --save ""` on a free port and restarts it (stop, start on the same port); with
  any other URL the server is not ours to restart, so every client connection is killed instead
  (`CLIENT KILL TYPE normal`), which is what the engine sees of a restart.

    python -m bench faults --good 50
    python -m bench faults --redis auto
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.soak import (
    TimedList,
    echo_options,
    frame_totals,
    get_health,
    get_metrics,
    http_base,
    md_table,
    new_run,
    out_dir,
    process_snapshot,
    run_async,
    spawn_engine,
    write_report,
)
from bench.sysstats import ProcessSampler
from bench.twilio import free_port, make_click, one_call, percentiles
from bench.twilio_caller import SILENCE_B64_STR, Ticker, TwilioCaller, new_sid
from bench.wsclient import client_frame, upgrade_request

COUNTERS = (
    "frames_in", "frames_out", "frames_dropped_out", "frames_dropped_in", "frames_late",
    "frames_concealed", "bad_messages", "calls", "calls_shed", "backend_errors",
)  # fmt: skip


@dataclass
class FaultOptions:
    good: int = 50
    window: float = 10.0
    gap: float = 5.0
    baseline: float = 10.0
    stall: float = 20.0
    garbage_callers: int = 20
    burst: int = 100
    redis: str | None = None
    workers: int | None = None
    out: Path | None = None
    progress: bool = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voice-engine bench faults",
        description="Faults injected one at a time beside good echo calls: latency and loss "
        "the good calls suffered in each fault's window against a baseline window.",
    )
    p.add_argument("--good", type=int, default=50, help="good callers running throughout")
    p.add_argument("--window", type=float, default=10.0, help="seconds of each fault window")
    p.add_argument("--gap", type=float, default=5.0, help="quiet seconds after each fault")
    p.add_argument("--baseline", type=float, default=10.0, help="seconds of the baseline window")
    p.add_argument(
        "--stall",
        type=float,
        default=20.0,
        help="seconds the stalled reader runs (its window): the engine's 64 KiB write limit "
        "fills only after the kernel's buffers, ~8 s of echoed media",
    )
    p.add_argument("--garbage-callers", type=int, default=20)
    p.add_argument("--burst", type=int, default=100, help="new calls within 1 s")
    p.add_argument(
        "--redis",
        help="also restart Redis under the engine: a redis:// URL, or 'auto' for a private one",
    )
    p.add_argument("--workers", type=int, help="passed to `engine serve --workers`")
    p.add_argument("--out", type=Path, help="default bench/out/<timestamp>-faults")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


# --- a WebSocket client that stops reading (aiohttp always reads) --------------------------------


class StalledReader:
    """A Twilio stream that reads the handshake and then never reads again, but keeps sending a
    media frame every 20 ms (a caller whose network or process has hung on the receive side)."""

    def __init__(self, port: int, rcvbuf: int = 4096) -> None:
        self.port = port
        self.rcvbuf = rcvbuf
        self.sent = 0
        self.skipped = 0  # frames not written because our own send buffer was full
        self.error: str | None = None
        self.sock: socket.socket | None = None
        self.local_port = 0
        # Bytes the server's kernel still held for this caller when it stopped (its Send-Q):
        # what the engine wrote that the caller never read, below the engine's own buffer.
        self.server_send_queue: int | None = None

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Small before connect() so the window the server sees stays small too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        self.sock = sock
        try:
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            self.local_port = sock.getsockname()[1]
            key = base64.b64encode(secrets.token_bytes(16)).decode()
            await loop.sock_sendall(sock, upgrade_request("/twilio/stream", key))
            head = b""
            while b"\r\n\r\n" not in head:  # the handshake is the last thing ever read
                chunk = await loop.sock_recv(sock, 1)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                head += chunk
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            stream_sid = new_sid("MZ")
            sock.send(client_frame(1, b'{"event":"connected","protocol":"Call","version":"1.0.0"}'))
            sock.send(client_frame(
                1,
                b'{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC%s",'
                b'"streamSid":"%s","callSid":"%s","tracks":["inbound"],"customParameters":{},'
                b'"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},'
                b'"streamSid":"%s"}'
                % (b"0" * 32, stream_sid.encode(), new_sid("CA").encode(), stream_sid.encode())
            ))  # fmt: skip
            loud = base64.b64encode(make_click(3)[:160]).decode()
            t0 = time.monotonic()
            n = 0
            while time.monotonic() - t0 < seconds:
                n += 1
                payload = loud if n % 25 < 2 else SILENCE_B64_STR
                frame = client_frame(
                    1,
                    b'{"event":"media","sequenceNumber":"%d","media":{"track":"inbound",'
                    b'"chunk":"%d","timestamp":"%d","payload":"%s"},"streamSid":"%s"}'
                    % (n + 1, n, n * 20, payload.encode(), stream_sid.encode())
                )
                try:
                    sent = sock.send(frame)
                    if sent < len(frame):
                        # A torn frame would corrupt the stream: finish it, however long it takes.
                        await loop.sock_sendall(sock, frame[sent:])
                    self.sent += 1
                except BlockingIOError:
                    self.skipped += 1
                except OSError as exc:
                    self.error = f"send: {exc!r}"
                    return
                await asyncio.sleep(max(0.0, t0 + n * 0.020 - time.monotonic()))
        except OSError as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"
        finally:
            self.server_send_queue = tcp_send_queue(self.port, self.local_port)
            sock.close()


def tcp_send_queue(local_port: int, remote_port: int) -> int | None:
    """tx_queue of the loopback TCP socket local_port → remote_port, from /proc/net/tcp."""
    want = (f":{local_port:04X}", f":{remote_port:04X}")
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if f[1].endswith(want[0]) and f[2].endswith(want[1]):
            return int(f[4].split(":")[0], 16)
    return None


# --- the faults ----------------------------------------------------------------------------------


@dataclass
class Ctx:
    server_port: int
    url: str
    session: aiohttp.ClientSession
    ticker: Ticker
    opts: FaultOptions
    redis: RedisUnderTest | None = None


async def fault_stalled_reader(ctx: Ctx, window: float) -> dict[str, Any]:
    reader = StalledReader(ctx.server_port)
    await reader.run(window)
    return {"frames_sent": reader.sent, "frames_skipped_own_buffer_full": reader.skipped,
            "server_kernel_send_queue_bytes": reader.server_send_queue,
            "error": reader.error}  # fmt: skip


GARBAGE_KINDS = ("invalid-json", "binary", "oversized", "bad-media", "unknown-event")


async def _garbage_caller(ctx: Ctx, kind: str, seconds: float) -> dict[str, Any]:
    """One WebSocket sending one kind of garbage every 20 ms until the server closes it."""
    sent = 0
    close: Any = None
    try:
        async with ctx.session.ws_connect(ctx.url, timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                                          max_msg_size=0) as ws:  # fmt: skip
            sid = new_sid("MZ")
            if kind in ("bad-media", "unknown-event"):
                await ws.send_str('{"event":"connected","protocol":"Call","version":"1.0.0"}')
                await ws.send_str(
                    '{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC' + "0" * 32
                    + f'","streamSid":"{sid}","callSid":"{new_sid("CA")}","tracks":["inbound"],'
                    '"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},'
                    f'"streamSid":"{sid}"}}'
                )
            big = "x" * (4 * 1024 * 1024)
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end and not ws.closed:
                if kind == "invalid-json":
                    await ws.send_str('{"event":"media","media":{"payload":' + secrets.token_hex(8))
                elif kind == "binary":
                    await ws.send_bytes(secrets.token_bytes(160))
                elif kind == "oversized":
                    await ws.send_str('{"event":"media","media":{"payload":"' + big + '"}}')
                elif kind == "bad-media":
                    await ws.send_str(
                        '{"event":"media","sequenceNumber":"2","media":{"track":"inbound",'
                        '"chunk":"1","timestamp":"0","payload":"@@not base64!!"},'
                        f'"streamSid":"{sid}"}}'
                    )
                else:
                    await ws.send_str(f'{{"event":"{secrets.token_hex(4)}","streamSid":"{sid}"}}')
                sent += 1
                # Read whatever the server says without blocking: a close ends this caller.
                with contextlib.suppress(TimeoutError):
                    msg = await ws.receive(timeout=0.020)
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.CLOSING):  # fmt: skip
                        close = ws.close_code
                        break
            close = close if close is not None else ws.close_code
    except Exception as exc:  # noqa: BLE001 - how the server refused it is the result
        return {"kind": kind, "sent": sent, "error": f"{type(exc).__name__}: {exc}"[:160]}
    return {"kind": kind, "sent": sent, "close_code": close}


async def fault_garbage(ctx: Ctx, window: float) -> dict[str, Any]:
    n = ctx.opts.garbage_callers
    results = await asyncio.gather(*(
        _garbage_caller(ctx, GARBAGE_KINDS[i % len(GARBAGE_KINDS)], min(window, 3.0))
        for i in range(n)
    ))  # fmt: skip
    by_kind: dict[str, dict[str, Any]] = {}
    for r in results:
        k = by_kind.setdefault(r["kind"], {"callers": 0, "messages": 0, "outcomes": {}})
        k["callers"] += 1
        k["messages"] += r["sent"]
        outcome = r.get("error") or f"close {r.get('close_code')}"
        k["outcomes"][outcome] = k["outcomes"].get(outcome, 0) + 1
    await asyncio.sleep(max(0.0, window - 3.0))
    return {"callers": n, "by_kind": by_kind}


async def fault_connect_burst(ctx: Ctx, window: float) -> dict[str, Any]:
    n = ctx.opts.burst
    failed = 0
    errors: dict[str, int] = {}
    connect_ms: list[float] = []
    closed_by_server = 0

    async def one(i: int) -> None:
        nonlocal failed, closed_by_server
        await asyncio.sleep(i / n)  # n starts spread over one second
        caller = TwilioCaller(ctx.url, ctx.ticker, session=ctx.session)
        t = time.monotonic()
        try:
            await caller.connect(timeout=10.0)
            connect_ms.append(1000.0 * (time.monotonic() - t))
            caller.speak(make_click(i))
            await asyncio.sleep(1.0)
            closed_by_server += int(caller.closed_by_server)
        except Exception as exc:  # noqa: BLE001
            failed += 1
            key = f"{type(exc).__name__}: {exc}"[:120]
            errors[key] = errors.get(key, 0) + 1
        finally:
            await caller.hangup()

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.sleep(max(0.0, window - (time.monotonic() - started)))
    return {"calls": n, "failed": failed, "closed_by_server": closed_by_server,
            "connect_ms": percentiles(connect_ms), "errors": errors}  # fmt: skip


class RedisUnderTest:
    """A private `redis-server --save ""` on a free port that can be restarted on the same port,
    or someone else's Redis whose client connections are killed to stand in for a restart."""

    def __init__(self, url: str | None) -> None:
        self.own = url is None
        self.port = free_port() if self.own else 0
        self.url = url or f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-")) if self.own else None

    def start(self) -> None:
        if not self.own:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def restart(self, down_s: float) -> str:
        if self.own:
            self.stop()
            await asyncio.sleep(down_s)
            await asyncio.to_thread(self.start)
            return f"stopped, down {down_s:g} s, started again on port {self.port}"
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.url)
        try:
            killed = await client.client_kill_filter(_type="normal", skipme=True)
        finally:
            await client.aclose()
        return f"CLIENT KILL TYPE normal: {killed} connections"

    def close(self) -> None:
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


async def fault_redis_restart(ctx: Ctx, window: float) -> dict[str, Any]:
    assert ctx.redis is not None
    await asyncio.sleep(min(1.0, window / 4))
    what = await ctx.redis.restart(down_s=min(2.0, window / 4))
    await asyncio.sleep(max(0.0, window - 2 * min(1.0, window / 4) - min(2.0, window / 4)))
    return {"action": what}


FAULTS: dict[str, Callable[[Ctx, float], Awaitable[dict[str, Any]]]] = {
    "stalled-reader": fault_stalled_reader,
    "garbage": fault_garbage,
    "connect-burst": fault_connect_burst,
    "redis-restart": fault_redis_restart,
}


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Window:
    name: str
    t0: float
    t1: float = 0.0
    frames0: tuple[int, int] = (0, 0)
    frames1: tuple[int, int] = (0, 0)
    metrics0: dict[str, float] | None = None
    metrics1: dict[str, float] | None = None
    detail: dict[str, Any] | None = None


def summarise_window(
    w: Window, timed: TimedList, transit: TimedList, sampler: ProcessSampler, t_origin: float
) -> dict[str, Any]:
    sent = w.frames1[0] - w.frames0[0]
    received = w.frames1[1] - w.frames0[1]
    samples = [s for s in sampler.samples if w.t0 <= s.t <= w.t1]
    m0, m1 = w.metrics0 or {}, w.metrics1 or {}
    return {
        "name": w.name,
        "seconds": round(w.t1 - w.t0, 2),
        "from_s": round(w.t0 - t_origin, 2),
        "to_s": round(w.t1 - t_origin, 2),
        "latency_ms": percentiles(timed.between(w.t0, w.t1)),
        # To the caller's socket: without its playout buffer, which only ever deepens.
        "transit_ms": percentiles(transit.between(w.t0, w.t1)),
        "good_frames_sent": sent,
        "good_frames_received": received,
        # Echoes of the last ~100 ms sent are still in flight at the window's end, and ones of
        # the window before arrive in this one: the difference is lost frames ± a few.
        "good_frames_lost": sent - received,
        "server_rss_mb_start": samples[0].rss_mb if samples else None,
        "server_rss_mb_peak": round(max(s.rss_mb for s in samples), 2) if samples else None,
        "server_rss_mb_end": samples[-1].rss_mb if samples else None,
        "server_cpu_mean": (
            round(sum(s.cpu for s in samples) / len(samples), 1) if samples else None
        ),
        "engine": {k: int(m1.get(f"engine_{k}_total", 0) - m0.get(f"engine_{k}_total", 0))
                   for k in COUNTERS},  # fmt: skip
        "detail": w.detail,
    }


async def faults(opts: FaultOptions, out: Path) -> dict[str, Any]:
    started = datetime.now().isoformat(timespec="seconds")
    redis: RedisUnderTest | None = None
    if opts.redis:
        redis = RedisUnderTest(None if opts.redis == "auto" else opts.redis)
        redis.start()
    names = ["stalled-reader", "garbage", "connect-burst"] + (["redis-restart"] if redis else [])
    server = await spawn_engine(out, "engine-faults", workers=opts.workers,
                                redis=redis.url if redis else None)  # fmt: skip
    assert server.proc is not None
    pid = server.proc.pid
    base = http_base(server)
    ramp = max(0.5, opts.good / 100.0)
    settle = 2.0
    t0 = time.monotonic()
    t_start = t0 + 0.2
    total = (
        ramp + settle + opts.baseline + len(names) * (opts.window + opts.gap) + 1.0
        + max(0.0, opts.stall - opts.window)
    )  # fmt: skip
    t_end = t_start + total
    run, timed = new_run("engine", opts.good, echo_options(total), t_end)
    transit = TimedList()
    run.transit_ms = transit
    ticker = Ticker()
    sampler = ProcessSampler(pid, interval=0.5, label=lambda: run.connected)
    sampler.start()
    windows: list[Window] = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            ctx = Ctx(server.port, server.url, session, ticker, opts, redis)
            starts = [t_start + ramp * i / opts.good for i in range(opts.good)]
            good = [
                asyncio.create_task(one_call(i, run, server.url, ticker, session, at, None))
                for i, at in enumerate(starts)
            ]
            await asyncio.sleep(t_start + ramp + settle - time.monotonic())
            plan = [("baseline", opts.baseline)] + [
                (n, opts.stall if n == "stalled-reader" else opts.window) for n in names
            ]
            for name, seconds in plan:
                w = Window(name, time.monotonic(), frames0=frame_totals(run),
                           metrics0=await get_metrics(session, base))  # fmt: skip
                if opts.progress:
                    sys.stderr.write(f"[faults] {w.t0 - t0:6.1f}s  {name} ({seconds:g} s), "
                                     f"{run.connected} good calls\n")  # fmt: skip
                if name == "baseline":
                    await asyncio.sleep(seconds)
                else:
                    w.detail = await FAULTS[name](ctx, seconds)
                w.t1 = time.monotonic()
                w.frames1 = frame_totals(run)
                w.metrics1 = await get_metrics(session, base)
                windows.append(w)
                if name != "baseline":
                    await asyncio.sleep(opts.gap)
            outcomes = await asyncio.gather(*good)
            await asyncio.sleep(1.0)
            health_after = await get_health(session, base)
        await sampler.stop()
        snapshot_after = process_snapshot(pid)
    finally:
        await ticker.close()
        await server.stop()
        if redis is not None:
            redis.close()

    rows = [summarise_window(w, timed, transit, sampler, t0) for w in windows]
    base_row = rows[0]
    for r in rows[1:]:
        b, f = base_row["latency_ms"], r["latency_ms"]
        r["vs_baseline"] = {
            "p99_ms_delta": round(f["p99"] - b["p99"], 2) if f["p99"] and b["p99"] else None,
            "lost_delta": r["good_frames_lost"] - base_row["good_frames_lost"],
            "rss_mb_delta": round((r["server_rss_mb_peak"] or 0) - (base_row["server_rss_mb_peak"]
                                                                   or 0), 2),  # fmt: skip
        }
    connected = [o for o in outcomes if o.get("connected")]
    return {
        "bench": "faults",
        "started": started,
        "options": {
            "good": opts.good, "window_s": opts.window, "gap_s": opts.gap,
            "baseline_s": opts.baseline, "stall_s": opts.stall,
            "garbage_callers": opts.garbage_callers,
            "burst": opts.burst, "redis": redis.url if redis else None,
            "redis_own": redis.own if redis else None, "workers": opts.workers,
        },  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "good_connected": len(connected),
        "good_failed": run.failed,
        "good_ended_early": sum(1 for o in connected if o.get("ended_early")),
        "windows": rows,
        "health_after": health_after,
        "process_after": snapshot_after,
        "server_series": sampler.series(t0),
        "errors": run.errors,
    }


def render_markdown(r: dict[str, Any]) -> str:
    o = r["options"]
    lines = [
        f"# Faults beside {o['good']} good echo calls",
        "",
        f"Started {r['started']} on {r['machine']['cpus']} CPUs. Engine `--backend echo`"
        + (f" `--redis {o['redis']}`" if o["redis"] else "")
        + (f" `--workers {o['workers']}`" if o["workers"] else "")
        + f". Baseline {o['baseline_s']:g} s, then each fault in a {o['window_s']:g} s window "
        f"(the stalled reader's: {o['stall_s']:g} s) "
        f"followed by {o['gap_s']:g} s of quiet. Latency = a good caller's click sent → its echo "
        "heard; lost = good frames sent − echoed back in the window (± the few in flight).",
        "",
        f"Good calls: {r['good_connected']} connected, {r['good_failed']} failed, "
        f"{r['good_ended_early']} ended early. After the run: /health {r['health_after']}, "
        f"process {r['process_after']}.",
        "",
    ]
    rows = []
    for w in r["windows"]:
        lat, e = w["latency_ms"], w["engine"]
        vs = w.get("vs_baseline") or {}
        rows.append([
            w["name"], lat["n"], lat["p50"], lat["p99"], vs.get("p99_ms_delta"),
            f"{w['transit_ms']['p50']} / {w['transit_ms']['p99']}",
            w["good_frames_sent"], w["good_frames_lost"],
            f"{w['server_rss_mb_start']:.1f} / {w['server_rss_mb_peak']:.1f} / "
            f"{w['server_rss_mb_end']:.1f}" if w["server_rss_mb_peak"] else None,
            w["server_cpu_mean"], e["frames_dropped_out"], e["frames_dropped_in"],
            e["bad_messages"], e["calls"], e["calls_shed"],
        ])  # fmt: skip
    lines += md_table(
        ["window", "n", "p50 ms", "p99 ms", "p99 Δ vs baseline", "transit p50 / p99 ms",
         "good frames sent", "good lost",
         "server RSS start / peak / end MiB", "server CPU %", "dropped_out", "dropped_in",
         "bad_messages", "calls started", "calls shed"],
        rows,
    )  # fmt: skip
    lines += ["", "## What each fault did", ""]
    for w in r["windows"][1:]:
        lines.append(f"- **{w['name']}**: `{w['detail']}`")
    lines.append("")
    if r["errors"]:
        lines += ["## Errors of good calls (first 20)", ""]
        lines += [f"- `{e}`" for e in r["errors"]] + [""]
    return "\n".join(lines)


def plot(r: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    s = r["server_series"]
    ax.plot([p["t"] for p in s], [p["rss_mb"] for p in s], color="C0")
    for i, w in enumerate(r["windows"][1:]):
        ax.axvspan(w["from_s"], w["to_s"], color=f"C{i + 1}", alpha=0.2, label=w["name"])
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylabel("server RSS, MiB")
    ax.set_xlabel("seconds since start")
    ax.set_title("faults: server RSS (shaded = fault windows)")
    fig.tight_layout()
    path = out / "faults.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    opts = FaultOptions(**vars(build_parser().parse_args(argv)))
    out = out_dir(opts.out, "faults")
    try:
        r = run_async(lambda: faults(opts, out))
    except RuntimeError as exc:
        print(f"bench faults: {exc}", file=sys.stderr)
        return 1
    plot(r, out)
    paths = write_report(r, out, render_markdown(r))
    for w in r["windows"]:
        lat = w["latency_ms"]
        print(
            f"{w['name']:>15}: p50 {lat['p50']} p99 {lat['p99']} ms (n={lat['n']})"
            f"  transit p99 {w['transit_ms']['p99']} ms"
            f"  good lost {w['good_frames_lost']}/{w['good_frames_sent']}"
            f"  RSS peak {w['server_rss_mb_peak']} MiB"
            f"  dropped_out {w['engine']['frames_dropped_out']}"
            f"  bad_messages {w['engine']['bad_messages']}"
        )
    print(f"report: {paths['markdown']}")
    return 0
