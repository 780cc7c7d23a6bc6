"""`voice-engine bench webrtc`: aiortc callers against the engine's WebRTC path.

Owns the WebRTC load run and the pieces the tests share with it:

- `WebRTCCaller`: one aiortc peer talking to the engine (`POST /webrtc/offer`, the events socket),
  sending 16 kHz PCM as Opus through the engine's own `CallAudioTrack` and receiving through the
  engine's `OpusReceivePath`, so the harness is cheap and never the thing measured;
- `serve_webrtc`: the engine with the WebRTC routes on a free loopback port, in-process (tests);
- the `_serve` and `_callers` entry points the harness runs as subprocesses, so the engine and the
  callers can each sit in their own network namespace (`--impair`, see tests/netns.py).

Scenario (echo backend: every caller frame comes straight back): each caller sends a loud 40 ms
tone burst every `--click-interval` over silence, its pitch cycling through eight, so an echo that
returns after later bursts were sent still finds its own. Latency = the burst's first frame handed
to the caller's sender → the first loud frame of that pitch its receive path releases, rounded up
to the caller's 20 ms playout grid (random phase per caller): mouth-to-ear with no playout buffer
beyond the caller's jitter buffer, which is the engine's, so time spent waiting for a missing
packet counts. A burst whose echo is not heard within seven intervals counts as lost. A stall is
the longest wait between two frames released, at the engine (from its `stats` events) and at the
caller.

Each run spawns the engine (`--media engine`: the patched receive and send paths; `--media aiortc`:
aiortc's own, unchanged) and samples its CPU and RSS over the steady part; CPU per connection is the
mean over the window divided by the callers connected, RSS per connection is the growth over the
idle server divided likewise, and "per core" is how many connections 100 % of one core would carry
at that cost.

    python -m bench webrtc --calls 10,25,50 --duration 15
    python -m bench webrtc --calls 10 --impair            # also across a 5 % loss, 30±10 ms link
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import WSMsgType, web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from bench.sysstats import ProcessSampler
from bench.twilio import free_port
from engine.config import Settings
from engine.server import ENGINE_KEY, create_app
from engine.transports import webrtc
from engine.transports.webrtc import CallAudioTrack, OpusReceivePath, install_receive_path

REPO = Path(__file__).resolve().parent.parent
FRAME_MS = 20.0
FRAME_BYTES = 640  # 20 ms of 16 kHz int16
SILENCE = bytes(FRAME_BYTES)
LOUD_PEAK = 1000  # a frame peaking at or above this (about -30 dBFS) is audible
CLICK_PITCHES = tuple(500.0 + 200.0 * i for i in range(8))
PITCH_TOLERANCE_HZ = 75.0
VOICED_PEAK = 180  # about -45 dBFS: where speech starts and ends


# --- the engine, in-process ----------------------------------------------------------------------


@dataclass
class ServedWebRTC:
    url: str  #: http://127.0.0.1:PORT
    engine: Any  #: the Engine, for assertions on its state
    app: web.Application

    @property
    def sessions(self) -> webrtc.WebRTCSessions:
        return self.app[webrtc.WEBRTC_KEY]


def build_app(settings: Settings, media: str | None = None) -> web.Application:
    """The engine's app, on the given WebRTC media path ("engine" or "aiortc")."""
    return create_app(settings.with_overrides(webrtc_media=media))


@contextlib.asynccontextmanager
async def serve_webrtc(
    settings: Settings | None = None,
    media: str | None = None,
    host: str = "127.0.0.1",
    setup: Callable[[web.Application], None] | None = None,
    shutdown_grace_s: float = 0.0,
) -> AsyncIterator[ServedWebRTC]:
    """The engine with its WebRTC routes on a real socket of `host` (a free port); `setup` may add
    more routes before it starts. On exit, calls still live are ended after `shutdown_grace_s`
    (none by default: a test does not wait for calls to end on their own)."""
    settings = (settings or Settings(backend="echo")).with_overrides(
        port=0, shutdown_grace_s=shutdown_grace_s
    )
    app = build_app(settings, media)
    if setup is not None:
        setup(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    engine = app[ENGINE_KEY]
    engine.base_url = f"http://{host}:{port}"
    try:
        yield ServedWebRTC(engine.base_url, engine, app)
    finally:
        await runner.cleanup()


# --- one caller -----------------------------------------------------------------------------------


class Utterance:
    """Audio queued with `WebRTCCaller.speak`; the caller's track fills in when its frames left."""

    def __init__(self, pcm: bytes) -> None:
        pcm = pcm + bytes(-len(pcm) % FRAME_BYTES)
        self.frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]
        peaks = [peak(f) for f in self.frames]
        self.voiced = [p >= VOICED_PEAK for p in peaks]
        self.loud = [p >= LOUD_PEAK for p in peaks]
        self.pos = 0
        self.first_sent: float | None = None  # monotonic ms
        self.last_sent: float | None = None
        self.first_voiced_sent: float | None = None
        self.last_voiced_sent: float | None = None
        self.first_loud_sent: float | None = None
        self.done = asyncio.Event()


def peak(frame: bytes) -> int:
    x = np.frombuffer(frame, dtype="<i2")
    return int(max(int(x.max()), -int(x.min()))) if len(x) else 0


class WebRTCCaller:
    """One aiortc peer on the engine's WebRTC path. Times are monotonic milliseconds."""

    def __init__(
        self,
        base_url: str,
        *,
        http: aiohttp.ClientSession,
        events: bool = True,
        playout_phase: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        self.want_events = events
        self.pc: RTCPeerConnection | None = None
        self.session_id: str | None = None
        self.track = CallAudioTrack(self._next_frame)
        self.receive_path: OpusReceivePath | None = None
        self._queue: list[Utterance] = []
        self._phase = (
            playout_phase if playout_phase is not None else random.uniform(0, FRAME_MS)
        ) % FRAME_MS
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        # what was sent and heard
        self.frames_sent = 0
        self.utterances = 0  # queued with `speak`
        self.frames_received = 0
        self.max_stall_ms = 0.0
        self._last_rx: float | None = None
        self._was_loud = False
        self.loud_heard: list[float] = []  # heard time of every loud frame
        self.onsets: list[float] = []  # heard time of loud frames after a quiet one
        self.onset_pitches: list[float] = []  # the strongest frequency of each of those frames
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.engine_stats: dict[str, Any] | None = None  # the last `stats` event
        self.connected_at: float | None = None
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    async def connect(self, timeout: float = 20.0) -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc = pc
        transceiver = pc.addTransceiver(self.track, direction="sendrecv")
        self.receive_path = install_receive_path(transceiver.receiver, self._on_audio)
        await pc.setLocalDescription(await pc.createOffer())
        async with self.http.post(
            self.base_url + "/webrtc/offer",
            json={"sdp": pc.localDescription.sdp, "type": "offer"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"offer refused: {resp.status} {body}")
        self.session_id = body["sessionId"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
        if self.want_events:
            self._ws = await self.http.ws_connect(
                self.base_url.replace("http", "ws", 1) + f"/webrtc/events/{self.session_id}",
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=3.0),
            )
            self._reader = asyncio.create_task(
                self._read_events(), name=f"events-{self.session_id}"
            )
        deadline = time.monotonic() + timeout
        while pc.connectionState != "connected":
            if pc.connectionState in ("failed", "closed") or time.monotonic() > deadline:
                raise RuntimeError(f"connection {pc.connectionState}")
            await asyncio.sleep(0.01)
        self.connected_at = time.monotonic() * 1000.0

    async def hangup(self) -> None:
        """Ends the call the way a page does: `hangup` on the events socket (its final `stats` and
        `end` arrive before it closes), then the peer connection."""
        if self.closed:
            return
        self.closed = True
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await self._ws.send_str('{"type":"hangup"}')
            if self._reader is not None:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.track.stop()
        if self.pc is not None:
            await self.pc.close()
        if self.receive_path is not None:
            self.receive_path.close()

    async def _read_events(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            event = orjson.loads(msg.data)
            self.events.append((time.monotonic() * 1000.0, event))
            if event.get("type") == "stats":
                self.engine_stats = event

    # -- sending -----------------------------------------------------------------------------------

    def speak(self, pcm: bytes) -> Utterance:
        """Queue 16 kHz PCM to send after what is queued already."""
        utt = Utterance(pcm)
        self._queue.append(utt)
        self.utterances += 1
        return utt

    def _next_frame(self, now: float) -> bytes:
        self.frames_sent += 1
        if not self._queue:
            return SILENCE
        utt = self._queue[0]
        i = utt.pos
        frame = utt.frames[i]
        if i == 0:
            utt.first_sent = now
        if utt.voiced[i]:
            if utt.first_voiced_sent is None:
                utt.first_voiced_sent = now
            utt.last_voiced_sent = now
        if utt.loud[i] and utt.first_loud_sent is None:
            utt.first_loud_sent = now
        utt.last_sent = now
        utt.pos = i + 1
        if utt.pos == len(utt.frames):
            self._queue.pop(0)
            utt.done.set()
        return frame

    # -- receiving ---------------------------------------------------------------------------------

    def _on_audio(self, frame: bytes, now: float) -> None:
        last = self._last_rx
        if last is not None and now - last > self.max_stall_ms:
            self.max_stall_ms = now - last
        self._last_rx = now
        self.frames_received += 1
        loud = peak(frame) >= LOUD_PEAK
        if loud:
            heard = self.heard_at(now)
            self.loud_heard.append(heard)
            if not self._was_loud:
                self.onsets.append(heard)
                self.onset_pitches.append(pitch(frame))
        self._was_loud = loud

    def heard_at(self, released: float) -> float:
        """When a frame released at `released` starts playing: the next slot of the playout grid."""
        k = math.ceil((released - self._phase) / FRAME_MS)
        return self._phase + k * FRAME_MS

    def first_onset_after(
        self, t: float, pitch_hz: float | None = None, before: float = math.inf
    ) -> float | None:
        """The first onset heard at or after `t` (and before `before`), of that pitch if given."""
        for heard, f in zip(self.onsets, self.onset_pitches, strict=True):
            if heard >= before:
                return None
            if heard >= t and (pitch_hz is None or abs(f - pitch_hz) <= PITCH_TOLERANCE_HZ):
                return heard
        return None

    def loud_frames_between(self, t0: float, t1: float) -> int:
        return sum(1 for x in self.loud_heard if t0 <= x < t1)

    def event_types(self) -> list[str]:
        return [e.get("type", "") for _, e in self.events]

    def stats(self) -> dict[str, Any]:
        path = self.receive_path.stats() if self.receive_path is not None else {}
        return {
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "max_stall_ms": round(self.max_stall_ms, 1),
            "receive": path,
            "engine": self.engine_stats,
        }


# --- the load run (inside the callers' process) ---------------------------------------------------


def click_pitch(index: int) -> float:
    """The pitch of a caller's `index`-th click: eight in turn, so an echo that comes back after
    later clicks were sent (aiortc's own path, whose delay grows with every loss) still finds
    the click it belongs to."""
    return CLICK_PITCHES[index % len(CLICK_PITCHES)]


def make_click(pitch_hz: float) -> bytes:
    """A loud 40 ms tone burst."""
    n = 2 * FRAME_BYTES // 2
    t = np.arange(n) / 16000.0
    ramp = np.minimum(1.0, np.minimum(np.arange(n), n - 1 - np.arange(n)) / 80.0)
    return (0.7 * 32767 * ramp * np.sin(2 * np.pi * pitch_hz * t)).astype("<i2").tobytes()


def pitch(frame: bytes) -> float:
    """The strongest frequency of a 20 ms frame (50 Hz bins)."""
    x = np.frombuffer(frame, dtype="<i2").astype(np.float32)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum[1:]) + 1) * 16000.0 / len(x)


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    v = sorted(values)

    def pick(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 2)

    return {
        "n": len(v),
        "p50": pick(0.5),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": round(v[-1], 2),
        "mean": round(statistics.fmean(v), 2),
    }


async def one_caller(
    index: int,
    url: str,
    http: aiohttp.ClientSession,
    start_at: float,
    t_end: float,
    interval_s: float,
    shared: dict[str, Any],
) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    caller = WebRTCCaller(url, http=http, playout_phase=random.uniform(0, FRAME_MS))
    try:
        await caller.connect()
    except Exception as exc:  # noqa: BLE001 - a failed call is a result, not a crash
        shared["failed"] += 1
        shared["errors"].append(f"connect: {exc!r}")
        with contextlib.suppress(Exception):
            await caller.hangup()
        return {"connected": False}
    shared["connected"] += 1
    shared["callers"].append(caller)
    sends: list[tuple[float, float]] = []  # (when the click's first loud frame left, its pitch)
    await asyncio.sleep(random.uniform(0.2, interval_s))  # spread the clicks of different callers
    k = 0
    while time.monotonic() + interval_s < t_end:
        utt = caller.speak(make_click(click_pitch(k)))
        await utt.done.wait()
        if utt.first_loud_sent is not None:
            sends.append((utt.first_loud_sent, click_pitch(k)))
        k += 1
        await asyncio.sleep(interval_s - 0.04)
    # An echo may come back up to (pitches - 1) intervals late and still be told apart.
    window = 1000.0 * interval_s * (len(CLICK_PITCHES) - 1)
    await asyncio.sleep(min(2.0, window / 1000.0))
    lost = 0
    for sent, pitch_hz in sends:
        onset = caller.first_onset_after(sent, pitch_hz, before=sent + window)
        if onset is None:
            lost += 1
        else:
            shared["latencies"].append(onset - sent)
    clicks = len(sends)
    shared["connected"] -= 1
    await caller.hangup()
    return {"connected": True, "clicks": clicks, "clicks_lost": lost, **caller.stats()}


async def run_callers(
    url: str, calls: int, duration: float, ramp: float, interval_s: float, progress: bool
) -> dict[str, Any]:
    t0 = time.monotonic()
    t_start = t0 + 0.2
    t_end = t_start + ramp + duration
    shared: dict[str, Any] = {
        "connected": 0,
        "failed": 0,
        "errors": [],
        "latencies": [],
        "callers": [],
    }
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await wait_reachable(http, url, 30.0)
        tasks = [
            asyncio.create_task(
                one_caller(i, url, http, t_start + ramp * i / calls, t_end, interval_s, shared)
            )
            for i in range(calls)
        ]
        ticker = asyncio.create_task(_progress(shared, calls, t0, progress))
        outcomes = await asyncio.gather(*tasks)
        ticker.cancel()
    ok = [o for o in outcomes if o.get("connected")]
    engine_stats = [o["engine"] for o in ok if o.get("engine")]
    return {
        "calls": calls,
        "connected": len(ok),
        "failed": shared["failed"],
        "steady_from": t_start + ramp + 1.0,
        "steady_to": t_end - 0.6,
        "latency_ms": percentiles(shared["latencies"]),
        "latencies_ms": [round(x, 2) for x in shared["latencies"]],
        "clicks": sum(o["clicks"] for o in ok),
        "clicks_lost": sum(o["clicks_lost"] for o in ok),
        "caller_max_stall_ms": max((o["max_stall_ms"] for o in ok), default=None),
        "engine_max_stall_ms": max((s.get("maxStallMs", 0.0) for s in engine_stats), default=None),
        "engine_concealed": sum(s.get("concealed", 0) for s in engine_stats),
        "engine_lost": sum(s.get("lost", 0) for s in engine_stats),
        "engine_fec": sum(s.get("fec", 0) for s in engine_stats),
        "engine_frames_in": sum(s.get("framesIn", 0) for s in engine_stats),
        "engine_slots_skipped": sum(s.get("slotsSkipped", 0) for s in engine_stats),
        "caller_concealed": sum(o["receive"].get("concealed", 0) for o in ok),
        "frames_sent": sum(o["frames_sent"] for o in ok),
        "frames_received": sum(o["frames_received"] for o in ok),
        "errors": shared["errors"][:20],
    }


async def wait_reachable(http: aiohttp.ClientSession, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.get(url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        except (TimeoutError, aiohttp.ClientError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer /health within {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def _progress(shared: dict[str, Any], calls: int, t0: float, enabled: bool) -> None:
    """Every 2 s: callers connected, clicks sent, echoes heard, and the stall so far."""
    while enabled:
        await asyncio.sleep(2.0)
        callers: list[WebRTCCaller] = shared["callers"]
        sent = sum(c.utterances for c in callers)
        heard = sum(len(c.onsets) for c in callers)
        stall = max((c.max_stall_ms for c in callers), default=0.0)
        sys.stderr.write(
            f"  [{time.monotonic() - t0:5.1f}s] callers {shared['connected']}/{calls} "
            f"failed {shared['failed']}  clicks sent {sent} echoes heard {heard}  "
            f"longest stall at a caller {stall:.0f} ms\n"
        )
        sys.stderr.flush()


# --- subprocess entry points ----------------------------------------------------------------------


def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.webrtc _serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--backend", default="echo")
    p.add_argument("--media", choices=webrtc.MEDIA_PATHS, default="engine")
    args = p.parse_args(argv)

    async def serve() -> None:
        settings = Settings(backend=args.backend, host=args.host, port=args.port)
        app = build_app(settings, args.media)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"READY http://{args.host}:{port}", flush=True)
        stop = asyncio.Event()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    import logging

    logging.getLogger().setLevel(logging.WARNING)  # one JSON line per call start/end is noise here
    _run(serve())
    return 0


def _callers(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.webrtc _callers")
    p.add_argument("--url", required=True)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--ramp", type=float, default=None)
    p.add_argument("--click-interval", type=float, default=0.5)
    p.add_argument("--json-out", default="-")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    ramp = args.ramp if args.ramp is not None else args.calls / 20.0
    result = _run(
        run_callers(args.url, args.calls, args.duration, ramp, args.click_interval, args.progress)
    )
    text = json.dumps(result)
    if args.json_out == "-":
        print(text, flush=True)
    else:
        Path(args.json_out).write_text(text)
    return 0


def _run(coro: Any) -> Any:
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


class EngineProcess:
    """`_serve` as a subprocess (inside a namespace when `prefix` says so)."""

    def __init__(self, media: str, host: str, port: int, log_path: Path, prefix: list[str]) -> None:
        self.cmd = [
            *prefix,
            sys.executable,
            "-m",
            "bench.webrtc",
            "_serve",
            "--host",
            host,
            "--port",
            str(port),
            "--media",
            media,
        ]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> None:
        # handed to the child, closed in stop()
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            env=_python_env(),
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(b"READY ") or not line:
                break
        if not line.startswith(b"READY "):
            self.stop()
            raise RuntimeError(f"the engine did not start; see {self.log_path}")
        self.url = line.split()[1].decode()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self._log.close()
        self.proc = None




# --- the whole invocation -------------------------------------------------------------------------


@dataclass
class Options:
    calls: list[int] = field(default_factory=lambda: [10, 25, 50])
    media: list[str] = field(default_factory=lambda: ["engine", "aiortc"])
    duration: float = 15.0
    click_interval: float = 0.5
    impair: bool = False
    impair_only: bool = False
    loss: float = 0.05
    delay_ms: float = 30.0
    jitter_ms: float = 10.0
    out: Path | None = None
    progress: bool = True


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(
        prog="voice-engine bench webrtc", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--calls", default="10,25,50", help="connections at once; a comma list runs each level"
    )
    p.add_argument(
        "--media",
        default="engine,aiortc",
        help="media paths to measure: engine (patched), aiortc (stock), or both",
    )
    p.add_argument(
        "--duration", type=float, default=15.0, help="seconds each run lasts after the ramp"
    )
    p.add_argument("--click-interval", type=float, default=0.5)
    p.add_argument("--impair", action="store_true", help="also run across the impaired link")
    p.add_argument("--impair-only", action="store_true", help="run only across the impaired link")
    p.add_argument("--loss", type=float, default=0.05)
    p.add_argument("--delay-ms", type=float, default=30.0)
    p.add_argument("--jitter-ms", type=float, default=10.0)
    p.add_argument("--out", type=Path, help="output folder (default bench/out/<timestamp>-webrtc)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    ns = p.parse_args(argv)
    calls = [int(x) for x in ns.calls.split(",") if x.strip()]
    media = [m.strip() for m in ns.media.split(",") if m.strip()]
    if not calls or min(calls) < 1 or any(m not in webrtc.MEDIA_PATHS for m in media):
        p.error("--calls takes positive numbers; --media engine and/or aiortc")
    return Options(
        calls=calls,
        media=media,
        duration=ns.duration,
        click_interval=ns.click_interval,
        impair=ns.impair or ns.impair_only,
        impair_only=ns.impair_only,
        loss=ns.loss,
        delay_ms=ns.delay_ms,
        jitter_ms=ns.jitter_ms,
        out=ns.out,
        progress=ns.progress,
    )


def one_run(
    opts: Options, link_name: str, media: str, calls: int, out: Path, link: Any | None
) -> dict[str, Any]:
    host = link.engine_ip if link is not None else "127.0.0.1"
    port = free_port() if link is None else 8080
    engine_prefix = link.run_in(link.engine_ns, []) if link is not None else []
    caller_prefix = link.run_in(link.client_ns, []) if link is not None else []
    label = f"{link_name}-{media}-{calls}"
    if opts.progress:
        sys.stderr.write(f"[{label}] starting the engine ({media} media path)\n")
    server = EngineProcess(media, host, port, out / f"engine-{label}.log", engine_prefix)
    server.start()
    try:
        sampler = ProcessSampler(server.pid, interval=0.5)
        sampler.sample()
        time.sleep(1.0)
        idle_rss = _rss_mb(server.pid)
        result_path = out / f"callers-{label}.json"
        ramp = calls / 20.0
        cmd = [
            *caller_prefix,
            sys.executable,
            "-m",
            "bench.webrtc",
            "_callers",
            "--url",
            server.url,
            "--calls",
            str(calls),
            "--duration",
            str(opts.duration),
            "--ramp",
            str(ramp),
            "--click-interval",
            str(opts.click_interval),
            "--json-out",
            str(result_path),
        ]
        if not opts.progress:
            cmd.append("--no-progress")
        callers = subprocess.Popen(cmd, cwd=REPO, env=_python_env())
        harness = ProcessSampler(callers.pid, interval=0.5)
        harness.sample()
        samples: list[tuple[float, float, float]] = []  # (t, server cpu %, harness cpu %)
        while callers.poll() is None:
            time.sleep(0.5)
            s = sampler.sample()
            h = harness.sample() if callers.poll() is None else None
            if s is not None:
                samples.append((s.t, s.cpu, h.cpu if h else float("nan")))
        if callers.returncode != 0:
            raise RuntimeError(f"the callers exited with {callers.returncode}")
        result = json.loads(result_path.read_text())
    finally:
        server.stop()
    t0, t1 = result["steady_from"], result["steady_to"]
    window = [s for s in sampler.samples if t0 <= s.t <= t1] or sampler.samples
    hwindow = [s for s in harness.samples if t0 <= s.t <= t1] or harness.samples
    cpu = statistics.fmean(s.cpu for s in window) if window else 0.0
    rss = max((s.rss_mb for s in window), default=idle_rss)
    connected = max(1, result["connected"])
    per_conn = cpu / connected
    result.update(
        {
            "link": link_name,
            "media": media,
            "server_cpu_percent": round(cpu, 1),
            "server_cpu_peak": round(max((s.cpu for s in window), default=0.0), 1),
            "cpu_per_connection_percent": round(per_conn, 3),
            "connections_per_core": int(100.0 / per_conn) if per_conn > 0 else None,
            "server_rss_idle_mb": round(idle_rss, 1),
            "server_rss_mb": round(rss, 1),
            "rss_per_connection_mb": round(max(0.0, rss - idle_rss) / connected, 3),
            "harness_cpu_percent": round(statistics.fmean(s.cpu for s in hwindow), 1)
            if hwindow
            else None,
        }
    )
    result.pop("steady_from")
    result.pop("steady_to")
    if opts.progress:
        lat = result["latency_ms"]
        sys.stderr.write(
            f"[{label}] latency p50 {lat['p50']} p99 {lat['p99']} ms, engine stall max "
            f"{result['engine_max_stall_ms']} ms, cpu/conn {per_conn:.2f} %, "
            f"rss/conn {result['rss_per_connection_mb']} MB\n"
        )
    return result


def _rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)


def render_markdown(results: dict[str, Any]) -> str:
    opts = results["options"]
    lines = [
        "# WebRTC benchmark",
        "",
        (
            f"Started {results['started']} on {results['machine']['cpus']} CPUs, Python "
            f"{results['machine']['python']}, libopus {results['machine']['libopus']}. Echo "
            f"backend; each caller sends a 40 ms tone burst every {opts['click_interval_s']} s "
            f"over silence; {opts['duration_s']:g} s per run after the ramp."
        ),
        "",
        (
            "Media paths: `engine` = the engine's receive path (native adaptive jitter buffer, "
            "libopus at 16 kHz with FEC/PLC) and send path (pre-encoded CELT low-delay packets); "
            "`aiortc` = aiortc's own receive path (JitterBuffer(16, prefetch 4), decoder thread, "
            "48 kHz) and encoder, unchanged."
        ),
        "",
        (
            "Latency: burst handed to the caller's sender → first loud frame released by the "
            "caller's receive path, on its 20 ms playout grid. Stall: longest wait between two "
            "frames handed on (engine: to the call; caller: to its ear). CPU: % of one core, "
            "server process, mean over the steady part; per core = connections one core carries "
            "at that cost."
        ),
    ]
    if results.get("link"):
        lines += ["", f"Impaired link: {results['link']}."]
    columns = [
        "link",
        "media",
        "calls",
        "conn",
        "latency p50",
        "p95",
        "p99",
        "max (ms)",
        "clicks",
        "lost",
        "engine stall max",
        "caller stall max",
        "concealed (engine)",
        "server CPU %",
        "CPU/conn %",
        "conn/core",
        "RSS/conn MB",
        "harness CPU %",
    ]
    lines += ["", "| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
    for r in results["runs"]:
        lat = r["latency_ms"]
        row = [
            r["link"],
            r["media"],
            r["calls"],
            r["connected"],
            lat["p50"],
            lat["p95"],
            lat["p99"],
            lat["max"],
            r["clicks"],
            r["clicks_lost"],
            r["engine_max_stall_ms"],
            r["caller_max_stall_ms"],
            r["engine_concealed"],
            r["server_cpu_percent"],
            r["cpu_per_connection_percent"],
            r["connections_per_core"],
            r["rss_per_connection_mb"],
            r["harness_cpu_percent"],
        ]
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in row) + " |")
    errors = [(r["link"], r["media"], r["calls"], e) for r in results["runs"] for e in r["errors"]]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {a} {b} x{c}: `{e}`" for a, b, c, e in errors[:30]]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_serve":  # the subprocesses a run starts
        return _serve(argv[1:])
    if argv and argv[0] == "_callers":
        return _callers(argv[1:])
    opts = parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = opts.out or (REPO / "bench" / "out" / f"{stamp}-webrtc")
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    link_text = None
    if not opts.impair_only:
        for calls in opts.calls:
            for media in opts.media:
                runs.append(one_run(opts, "loopback", media, calls, out, None))
    if opts.impair:
        from tests.netns import ImpairedLink, LinkUnavailable

        try:
            with ImpairedLink(opts.loss, opts.delay_ms, opts.jitter_ms) as link:
                link_text = link.describe()
                if opts.progress:
                    sys.stderr.write(f"impaired link: {link_text}\n")
                for calls in opts.calls:
                    for media in opts.media:
                        runs.append(one_run(opts, link.kind or "impaired", media, calls, out, link))
        except LinkUnavailable as exc:
            print(f"bench webrtc: skipping the impaired link: {exc}", file=sys.stderr)
    from engine.audio.opus import opus_version

    results = {
        "bench": "webrtc",
        "started": datetime.now().isoformat(timespec="seconds"),
        "options": {
            "calls": opts.calls,
            "media": opts.media,
            "duration_s": opts.duration,
            "click_interval_s": opts.click_interval,
            "impair": opts.impair,
        },
        "link": link_text,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "libopus": opus_version(),
        },
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(render_markdown(results))
    for r in runs:
        lat = r["latency_ms"]
        print(
            f"{r['link']:>9} {r['media']:>6} x{r['calls']:<3} latency p50 {lat['p50']} "
            f"p99 {lat['p99']} ms  stall max {r['engine_max_stall_ms']} ms  "
            f"cpu/conn {r['cpu_per_connection_percent']} %"
            f"  conn/core {r['connections_per_core']}  rss/conn {r['rss_per_connection_mb']} MB"
        )
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
