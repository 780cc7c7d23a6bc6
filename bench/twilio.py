"""`voice-engine bench twilio`: many simulated Twilio calls against a server, at once.

Owns the load run: spawning the server under test (the engine, or the trivial relay of
bench/relay.py as the baseline), ramping up `TwilioCaller`s that share one `Ticker`, driving each
call through a scenario, sampling CPU and memory of the server and of the harness itself, and
summing everything up for bench/report.py.

Scenarios (every latency is measured at the caller: from when its audio left to when the reply
was *heard*, i.e. played from its playback buffer; see bench/twilio_caller.py):

- `echo`: a loud 40 ms click every `--click-interval` over silence; latency = onset of the next
  loud run heard after the click was sent − the click's send time. Against an echoing server
  this is the relay latency; frames sent vs received back is the loss.
- `talk`: speech, then silence; latency = the last voiced frame of the caller's speech (peak above
  -45 dBFS) was sent → the first loud reply frame (-30 dBFS) heard. Repeats after the reply has
  played out.
- `barge`: speech; when the reply has been heard for 300 ms the caller speaks again; latency =
  that speech's first voiced frame sent → the reply stops at the caller (the first `clear`, or
  playback silent for 250 ms, whichever is first). Loud frames heard after the `clear` while the
  caller is still speaking belong to the interrupted reply (no new reply may start yet) and must
  be 0. Rounds where the reply had already ended when the caller spoke are counted, not timed.

    python -m bench twilio --spawn relay --calls 100,250,500 --duration 30
    python -m bench twilio --spawn engine --compare-relay --calls 100 --scenario echo
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import wave
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import numpy as np

from bench.sysstats import ProcessSampler
from bench.twilio_caller import (
    FRAME_BYTES,
    FRAME_S,
    Ticker,
    TwilioCaller,
    Utterance,
    fetch_stream_parameters,
    new_sid,
)

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("echo", "talk", "barge")
DEFAULT_URL = "ws://127.0.0.1:8080/twilio/stream"
T = TypeVar("T")


# --- options ------------------------------------------------------------------------------------


@dataclass
class Options:
    url: str | None = None
    spawn: str | None = None  # "engine" | "relay"
    engine_backend: str = "echo"
    calls: list[int] = field(default_factory=lambda: [50])
    ramp: float | None = None
    duration: float = 20.0
    scenario: str = "echo"
    out: Path | None = None
    compare_relay: bool = False
    voice_file: Path | None = None
    phases: int = 4
    click_interval: float = 0.5
    server_pid: int | None = None
    pin: bool = False
    webhook: bool = True  # false once the server has shown it has no voice webhook
    webhooks_answered: int = 0  # calls whose stream parameters came from the server's TwiML
    sent_by_ended: int = 0  # frames sent and received by calls that have already ended
    received_by_ended: int = 0
    auth_token: str | None = None
    seed: int = 1
    progress: bool = True


def _calls(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "--calls takes a number or a comma list: 50,100,250"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("--calls needs positive numbers")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voice-engine bench twilio",
        description="Simulated Twilio Media Streams calls against a server: latency, loss, CPU.",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help=f"ws URL of a running server (default {DEFAULT_URL})")
    target.add_argument(
        "--spawn",
        choices=["engine", "relay"],
        help="start the server on a free port and sample its CPU and RSS",
    )
    p.add_argument(
        "--engine-backend",
        default="echo",
        help="backend of a spawned engine (echo measures the relay path; talk and "
        "barge need one that answers, e.g. local)",
    )
    p.add_argument(
        "--calls", type=_calls, default=[50], help="calls at once; a comma list runs each level"
    )
    p.add_argument(
        "--ramp", type=float, help="seconds over which call starts are spread (default calls/100)"
    )
    p.add_argument(
        "--duration", type=float, default=20.0, help="seconds every call lasts after the ramp"
    )
    p.add_argument("--scenario", choices=SCENARIOS, default="echo")
    p.add_argument(
        "--out", type=Path, help="output folder (default bench/out/<timestamp>-<scenario>)"
    )
    p.add_argument(
        "--compare-relay",
        action="store_true",
        help="also run the same load against bench/relay.py and report both",
    )
    p.add_argument(
        "--voice-file",
        type=Path,
        help="caller speech: raw 8 kHz mu-law (.ulaw/.raw) or a WAV (default: generated)",
    )
    p.add_argument(
        "--phases",
        type=int,
        default=4,
        help="send phases per 20 ms (1 = every call sends in the same instant)",
    )
    p.add_argument("--click-interval", type=float, default=0.5, help="echo: seconds between clicks")
    p.add_argument("--server-pid", type=int, help="with --url: sample this process's CPU and RSS")
    p.add_argument(
        "--pin", action="store_true", help="pin the harness to CPU 0 and a spawned server to CPU 1"
    )
    p.add_argument(
        "--no-webhook",
        dest="webhook",
        action="store_false",
        help="skip POST /twilio/voice before each stream",
    )
    p.add_argument(
        "--auth-token",
        default=os.environ.get("TWILIO_AUTH_TOKEN"),
        help="sign the voice webhook like Twilio (default $TWILIO_AUTH_TOKEN)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def parse_args(argv: list[str]) -> Options:
    ns = build_parser().parse_args(argv)
    if ns.url is None and ns.spawn is None:
        ns.url = DEFAULT_URL
    return Options(**vars(ns))


# --- audio the callers send -----------------------------------------------------------------------


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """16-bit linear → G.711 mu-law."""
    x = np.asarray(pcm, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def make_click(index: int) -> bytes:
    """A loud 40 ms tone burst (two frames); its pitch differs between neighbouring callers."""
    n = 2 * FRAME_BYTES
    t = np.arange(n) / 8000.0
    freq = 600.0 + 100.0 * (index % 16)
    ramp = np.minimum(1.0, np.minimum(np.arange(n), n - 1 - np.arange(n)) / 40.0)  # 5 ms fades
    return ulaw_encode(0.7 * 32767 * ramp * np.sin(2 * np.pi * freq * t))


def synthetic_speech(seconds: float = 1.6, seed: int = 0) -> bytes:
    """A vowel-like stand-in for speech: a gliding 110-150 Hz voice through three formants, in
    syllables of about 200 ms with short gaps. Loud enough for a VAD, without any TTS."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 8000)
    t = np.arange(n) / 8000.0
    f0 = 130.0 + 20.0 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / 8000.0
    signal = np.zeros(n)
    for h in range(1, 30):
        fh = h * f0
        gain = sum(
            np.exp(-(((fh - fc) / bw) ** 2)) for fc, bw in ((700, 130), (1220, 150), (2600, 250))
        )
        signal += (gain + 0.02) / h * np.sin(h * phase)
    syllable = np.clip(np.sin(np.pi * 4.5 * t) * 1.3, 0.0, 1.0) ** 0.6  # ~4.5 syllables per s
    signal *= syllable
    signal *= 0.5 * 32767 / max(1e-9, float(np.max(np.abs(signal))))
    return ulaw_encode(signal)


def _resample(pcm: np.ndarray, rate: int) -> np.ndarray:
    if rate == 8000:
        return pcm
    import soxr

    return soxr.resample(pcm.astype(np.float32), rate, 8000).astype(np.float32)


def read_voice_file(path: Path) -> bytes:
    """Raw 8 kHz mu-law, or a WAV (16-bit PCM at any rate, or mu-law) converted to it."""
    if path.suffix.lower() != ".wav":
        return path.read_bytes()
    with wave.open(str(path), "rb") as w:
        rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"{path}: only 16-bit PCM WAV files are read")
    pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32)
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1)
    return ulaw_encode(np.clip(_resample(pcm, rate), -32768, 32767))


def _speech_from_tests(text: str) -> bytes | None:
    """Speech rendered offline by the test suite's helper, when this checkout has it."""
    try:
        from tests.speech import speech, to_8k_mulaw  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any failure means: use the synthetic voice
        return None
    try:
        audio = speech(text)
        out = to_8k_mulaw(*audio) if isinstance(audio, tuple) else to_8k_mulaw(audio)
        data = np.asarray(out, dtype=np.uint8).tobytes() if not isinstance(out, bytes) else out
    except Exception:  # noqa: BLE001
        return None
    return data if len(data) >= 8 * FRAME_BYTES else None


def load_speech(opts: Options) -> tuple[bytes, bytes, str]:
    """(speech, barge-in speech, where they came from)."""
    if opts.voice_file is not None:
        audio = read_voice_file(opts.voice_file)
        return audio, audio[: 8000 * 2], f"file {opts.voice_file}"
    first = _speech_from_tests("Hello, I would like to check the status of my order please.")
    second = _speech_from_tests("Wait, stop, that is not what I asked for.")
    if first and second:
        return first, second, "tests.speech"
    return (
        synthetic_speech(1.6, opts.seed),
        synthetic_speech(1.2, opts.seed + 1),
        "synthetic vowels",
    )


# --- the server under test -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SpawnedServer:
    """The engine or the relay as a subprocess on a free loopback port."""

    def __init__(self, kind: str, engine_backend: str, log_path: Path, cpu: int | None) -> None:
        self.kind = kind
        self.port = free_port()
        if kind == "engine":
            cmd = [
                sys.executable,
                "-m",
                "engine",
                "serve",
                "--backend",
                engine_backend,
                "--port",
                str(self.port),
                "--host",
                "127.0.0.1",
            ]
        else:
            cmd = [sys.executable, "-m", "bench.relay", "--port", str(self.port)]
        self.cmd = cmd
        self.log_path = log_path
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/twilio/stream"

    async def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        if self.cpu is not None:
            _pin(self.proc.pid, self.cpu)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"{self.kind} did not listen on {self.port} within {timeout:.0f} s")

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            for _ in range(100):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                proc.kill()
                proc.wait()
        self._log.close()
        self.proc = None


def _pin(pid: int, cpu: int) -> None:
    import psutil

    try:
        if cpu < (psutil.cpu_count() or 1):
            psutil.Process(pid).cpu_affinity([cpu])
    except (psutil.Error, AttributeError, OSError):
        pass


def voice_url_for(ws_url: str) -> str:
    """The voice webhook beside a stream URL: ws://h:p/twilio/stream → http://h:p/twilio/voice."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rsplit("/", 1)[0] + "/voice" if "/" in parts.path else "/twilio/voice"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


# --- one load run --------------------------------------------------------------------------------


async def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def poll(fn: Callable[[], T | None], until: float, every: float = 0.05) -> T | None:
    """`fn()` every `every` seconds until it returns something or `until` passes."""
    while True:
        value = fn()
        if value is not None or time.monotonic() >= until:
            return value
        await asyncio.sleep(min(every, max(0.0, until - time.monotonic())) or every)


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    v = sorted(values)

    def pick(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 3)

    return {
        "n": len(v),
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": round(v[-1], 3),
        "mean": round(statistics.fmean(v), 3),
    }


@dataclass
class Run:
    """State of one load run shared by the scenarios, the progress line and the CPU sampler."""

    target: str
    calls: int
    opts: Options
    t_end: float
    speech: bytes
    barge_speech: bytes
    callers: dict[int, TwilioCaller] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # to heard, per the scenario
    transit_ms: list[float] = field(default_factory=list)  # echo: click sent → echo at the socket
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    webhook: bool = True  # false once the server has shown it has no voice webhook
    webhooks_answered: int = 0  # calls whose stream parameters came from the server's TwiML
    sent_by_ended: int = 0  # frames sent and received by calls that have already ended
    received_by_ended: int = 0

    @property
    def connected(self) -> int:
        return len(self.callers)

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)


async def scenario_echo(
    caller: TwilioCaller, run: Run, index: int, rng: random.Random
) -> dict[str, Any]:
    interval = run.opts.click_interval
    click = make_click(index)
    clicks: list[Utterance] = []
    matched = lost = 0
    onsets = caller.onsets
    arrivals = caller.onset_arrivals

    def match(now: float) -> None:
        nonlocal matched, lost
        while matched + lost < len(clicks):
            sent = clicks[matched + lost].first_sent
            if sent is None:
                return
            j = bisect_left(onsets, sent)
            if j < len(onsets) and onsets[j] <= now and onsets[j] < sent + interval:
                run.latencies_ms.append(1000.0 * (onsets[j] - sent))
                run.transit_ms.append(1000.0 * (arrivals[j] - sent))
                matched += 1
            elif now >= sent + interval:
                lost += 1  # nothing came back before the next click went out
            else:
                return

    # Clicks start at a random point of the first interval so calls do not click in step, and
    # stop one interval before the end so the last one can come back.
    next_click = time.monotonic() + rng.uniform(0.1, 0.1 + interval)
    while caller.active and next_click < run.t_end - interval:
        await sleep_until(next_click)
        if not caller.active:
            break
        clicks.append(caller.speak(click))
        match(time.monotonic())
        next_click += interval
    await sleep_until(run.t_end)
    match(time.monotonic())
    return {
        "clicks": len(clicks),
        "clicks_back": matched,
        "clicks_lost": lost,
        "onsets": len(onsets),
    }


async def scenario_talk(
    caller: TwilioCaller, run: Run, index: int, rng: random.Random
) -> dict[str, Any]:
    turns = replies = 0
    speech_s = len(run.speech) / 8000.0
    await asyncio.sleep(rng.uniform(0.0, 1.0))
    while caller.active and time.monotonic() + speech_s + 1.0 < run.t_end:
        utt = caller.speak(run.speech)
        await utt.finished()
        end = utt.last_voiced_sent or utt.last_sent or time.monotonic()
        turns += 1
        heard = await poll(partial(caller.first_audio_after, end), until=min(end + 8.0, run.t_end))
        if heard is None:
            continue
        replies += 1
        run.latencies_ms.append(1000.0 * (heard - end))
        # Let the reply play out before speaking again, like a person would.
        await poll(partial(caller.audio_stopped_after, heard, 0.5), until=run.t_end)
        await asyncio.sleep(rng.uniform(0.3, 1.0))
    return {"turns": turns, "replies": replies}


async def scenario_barge(
    caller: TwilioCaller, run: Run, index: int, rng: random.Random
) -> dict[str, Any]:
    rounds = no_reply = not_playing = leaked = clears = 0
    speech_s = (len(run.speech) + len(run.barge_speech)) / 8000.0
    await asyncio.sleep(rng.uniform(0.0, 1.0))
    while caller.active and time.monotonic() + speech_s + 3.0 < run.t_end:
        utt = caller.speak(run.speech)
        await utt.finished()
        end = utt.last_voiced_sent or utt.last_sent or time.monotonic()
        reply = await poll(partial(caller.first_audio_after, end), until=min(end + 8.0, run.t_end))
        if reply is None:
            no_reply += 1
            continue
        rounds += 1
        await sleep_until(reply + 0.3)
        barge = caller.speak(run.barge_speech)
        await barge.finished()
        onset = barge.first_voiced_sent or barge.first_sent or time.monotonic()
        barge_end = barge.last_sent or time.monotonic()
        await sleep_until(barge_end + 0.3)
        clear = next((c for c in caller.clears if c >= onset), None)
        if clear is not None:
            clears += 1
            leaked += caller.loud_frames_between(clear, barge_end)
        if not caller.audio_playing(onset):
            not_playing += 1  # the reply had ended before the caller spoke: nothing to stop
        else:
            quiet = caller.audio_stopped_after(onset, min_silence=0.25)
            stops = [t for t in (clear, quiet) if t is not None]
            if stops:
                run.latencies_ms.append(1000.0 * (min(stops) - onset))
        # Wait for whatever answer the barge-in gets to finish before the next round.
        await poll(partial(caller.audio_stopped_after, barge_end, 0.5), until=run.t_end)
        await asyncio.sleep(rng.uniform(0.3, 1.0))
    return {
        "rounds": rounds,
        "no_reply": no_reply,
        "reply_not_playing_at_barge": not_playing,
        "clears_after_barge": clears,
        "frames_heard_after_clear": leaked,
    }


SCENARIO_FUNCS: dict[
    str, Callable[[TwilioCaller, Run, int, random.Random], Awaitable[dict[str, Any]]]
] = {
    "echo": scenario_echo,
    "talk": scenario_talk,
    "barge": scenario_barge,
}


async def one_call(
    index: int,
    run: Run,
    url: str,
    ticker: Ticker,
    session: aiohttp.ClientSession,
    start_at: float,
    voice_url: str | None,
) -> dict[str, Any]:
    rng = random.Random(run.opts.seed * 100_003 + index)
    await sleep_until(start_at)
    call_sid = new_sid("CA")
    params: dict[str, str] = {}
    if voice_url is not None and run.webhook:
        try:
            got = await fetch_stream_parameters(
                session, voice_url, call_sid=call_sid, auth_token=run.opts.auth_token
            )
        except Exception as exc:  # noqa: BLE001 - a failed call is a result, not a crash
            run.failed += 1
            run.error(f"webhook: {exc!r}")
            return {"connected": False}
        if got is None:
            run.webhook = False  # the server has no voice webhook; stop asking
        else:
            params = got
            run.webhooks_answered += 1
    caller = TwilioCaller(
        url,
        ticker,
        session=session,
        custom_parameters=params,
        call_sid=call_sid,
        playout_phase=rng.uniform(0.0, FRAME_S),
    )
    try:
        await caller.connect(timeout=10.0)
    except Exception as exc:  # noqa: BLE001
        run.failed += 1
        run.error(f"connect: {exc!r}")
        return {"connected": False}
    run.callers[index] = caller
    gc.freeze()  # see run_load
    scenario: dict[str, Any] = {}
    try:
        scenario = await SCENARIO_FUNCS[run.opts.scenario](caller, run, index, rng)
    except Exception as exc:  # noqa: BLE001
        run.error(f"scenario: {exc!r}")
    finally:
        ended_early = not caller.active
        # Echo: stop sending 300 ms before the stop so every frame sent can come back.
        await caller.hangup(linger=0.3 if run.opts.scenario == "echo" else 0.0)
        run.callers.pop(index, None)
        run.sent_by_ended += caller.frames_sent
        run.received_by_ended += caller.frames_received
    if caller.error:
        run.error(caller.error)
    return {
        "connected": True,
        "ended_early": ended_early,
        "stats": caller.stats(caller.closed_at),
        "scenario": scenario,
        "clears": len(caller.clears),
    }


class Progress:
    """One updating line on stderr: elapsed, calls, frames, current p50."""

    def __init__(self, run: Run, t0: float, enabled: bool) -> None:
        self.run = run
        self.t0 = t0
        self.enabled = enabled

    def line(self) -> str:
        run = self.run
        sent = run.sent_by_ended + sum(c.frames_sent for c in run.callers.values())
        received = run.received_by_ended + sum(c.frames_received for c in run.callers.values())
        recent = run.latencies_ms[-2000:]
        p50 = f"{statistics.median(recent):6.1f} ms" if recent else "    -   "
        return (
            f"[{run.target} x{run.calls}] {time.monotonic() - self.t0:6.1f}s  "
            f"calls {run.connected:4d}/{run.calls} ({run.failed} failed)  "
            f"frames sent {sent:8d} recv {received:8d}  p50 {p50}"
        )

    async def loop(self) -> None:
        # On a terminal the line updates in place twice a second; into a file or a pipe it is
        # written as a plain line every 5 s.
        tty = sys.stderr.isatty()
        ticks = 0
        while True:
            if self.enabled and tty:
                sys.stderr.write("\r" + self.line() + "  ")
                sys.stderr.flush()
            elif self.enabled and ticks % 10 == 0 and ticks:
                sys.stderr.write(self.line() + "\n")
            ticks += 1
            await asyncio.sleep(0.5)


async def run_load(
    target: str,
    url: str,
    calls: int,
    opts: Options,
    speech: tuple[bytes, bytes],
    server_pid: int | None,
    voice_url: str | None,
) -> dict[str, Any]:
    ramp = opts.ramp if opts.ramp is not None else calls / 100.0
    t0 = time.monotonic()
    t_start = t0 + 0.2
    steady_from = t_start + ramp + 1.0
    t_end = t_start + ramp + opts.duration
    run = Run(
        target=target, calls=calls, opts=opts, t_end=t_end, speech=speech[0], barge_speech=speech[1]
    )
    ticker = Ticker(phases=opts.phases)
    server = (
        ProcessSampler(server_pid, label=lambda: run.connected) if server_pid is not None else None
    )
    harness = ProcessSampler(os.getpid(), label=lambda: run.connected, include_children=False)
    for sampler in (server, harness):
        if sampler is not None:
            sampler.start()
    progress = Progress(run, t0, opts.progress)
    progress_task = asyncio.create_task(progress.loop())
    # A full collection over hundreds of calls' objects stalls the loop for tens of ms, and a
    # stall bunches arrivals, which deepens every caller's playout buffer for good. So the heap
    # is frozen (out of the collector's sight, O(1)) now and after each call connects, and only
    # collected once the run is over.
    gc.freeze()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [
            asyncio.create_task(
                one_call(i, run, url, ticker, session, t_start + ramp * i / calls, voice_url)
            )
            for i in range(calls)
        ]
        outcomes = await asyncio.gather(*tasks)
    progress_task.cancel()
    gc.unfreeze()
    if opts.progress:
        sys.stderr.write(("\r" if sys.stderr.isatty() else "") + progress.line() + "\n")
    for sampler in (server, harness):
        if sampler is not None:
            await sampler.stop()
    await ticker.close()
    result = summarise(run, outcomes, ticker, server, harness, t0, steady_from, t_end, ramp)
    gc.collect()
    return result


def summarise(
    run: Run,
    outcomes: list[dict[str, Any]],
    ticker: Ticker,
    server: ProcessSampler | None,
    harness: ProcessSampler,
    t0: float,
    steady_from: float,
    t_end: float,
    ramp: float,
) -> dict[str, Any]:
    connected = [o for o in outcomes if o.get("connected")]
    totals: dict[str, int] = {}  # the caller stats that are counts (bools and texts left out)
    for o in connected:
        for key, value in o["stats"].items():
            if isinstance(value, int) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + value
    scenario: dict[str, int] = {}
    for o in connected:
        for key, value in o.get("scenario", {}).items():
            scenario[key] = scenario.get(key, 0) + value
    sent = totals.get("frames_sent", 0)
    received = totals.get("frames_received", 0)
    echo = run.opts.scenario == "echo"
    steady_end = t_end - 0.5
    harness_cpu = harness.summary(steady_from, steady_end)
    # The harness's capacity from its cost per frame handled (sent or received), over the whole
    # run: unlike CPU per call this stays right when the harness was starved and skipped slots.
    per_frame_us = 1e6 * harness.cpu_seconds / (sent + received) if sent + received else 0.0
    frames_per_call_s = 50.0 * (1.0 + received / sent) if sent else 100.0
    calls_per_core = round(1e6 / (per_frame_us * frames_per_call_s)) if per_frame_us else None
    result: dict[str, Any] = {
        "target": run.target,
        "calls": run.calls,
        "scenario": run.opts.scenario,
        "ramp_s": ramp,
        "duration_s": run.opts.duration,
        "connected": len(connected),
        "failed_to_connect": run.failed,
        "ended_early": sum(1 for o in connected if o.get("ended_early")),
        "webhooks_answered": run.webhooks_answered,
        "latency_ms": percentiles(run.latencies_ms),
        "latencies_ms": [round(v, 3) for v in run.latencies_ms],
        "transit_ms": percentiles(run.transit_ms),
        # Echo: how long each click's echo waited in the caller's playout buffer (heard − arrived).
        "playout_wait_ms": percentiles(
            [h - a for h, a in zip(run.latencies_ms, run.transit_ms, strict=False)]
            if run.transit_ms
            else []
        ),
        "frames": {
            "sent": sent,
            "received": received,
            "back_ratio": round(received / sent, 6) if echo and sent else None,
            "lost": max(0, sent - received) if echo else None,
            "late": totals.get("frames_late", 0),
            "dropped_send": totals.get("frames_dropped_send", 0),
            "heard": totals.get("frames_heard", 0),
            "cleared": totals.get("frames_cleared", 0),
            "unplayed": totals.get("frames_unplayed", 0),
            "underruns": totals.get("underruns", 0),
            "underrun_slots": totals.get("underrun_slots", 0),
        },
        "protocol": {
            k: totals.get(k, 0)
            for k in (
                "marks_received",
                "marks_echoed",
                "clears_received",
                "wrong_stream_sid",
                "unknown_events",
                "binary_frames",
                "invalid_messages",
            )
        },
        "scenario_stats": scenario,
        "ticker": {
            **ticker.lag_summary(),
            "busy_s": round(ticker.busy, 3),
            "phases": ticker.phases,
        },
        "harness": {
            **harness_cpu,
            "cpu_us_per_frame": round(per_frame_us, 2) if per_frame_us else None,
            "calls_per_core": calls_per_core,
            "series": harness.series(t0),
        },
        "server": (
            {
                "pid": server.pid,
                **server.summary(steady_from, steady_end),
                "series": server.series(t0),
            }
            if server is not None
            else None
        ),
        "errors": run.errors,
    }
    # Everything else the machine ran meanwhile (other programs share these cores).
    server_cpu = result["server"]["cpu_mean"] if result["server"] else 0.0
    result["other_cpu_mean"] = round(
        max(0.0, harness_cpu["system_cpu_mean"] - harness_cpu["cpu_mean"] - server_cpu), 1
    )
    return result


# --- the whole invocation ------------------------------------------------------------------------


async def run_all(opts: Options, out: Path) -> dict[str, Any]:
    speech, barge_speech, speech_source = load_speech(opts)
    targets: list[str] = [opts.spawn or "server"]
    if opts.compare_relay and targets[0] != "relay":
        targets.append("relay")
    if opts.pin:
        _pin(os.getpid(), 0)
    runs = []
    for calls in opts.calls:
        for target in targets:
            spawned: SpawnedServer | None = None
            if target in ("engine", "relay"):
                spawned = SpawnedServer(
                    target,
                    opts.engine_backend,
                    out / f"{target}-{calls}.log",
                    cpu=1 if opts.pin else None,
                )
                await spawned.start()
                url = spawned.url
                pid: int | None = spawned.proc.pid if spawned.proc else None
            else:
                assert opts.url is not None
                url, pid = opts.url, opts.server_pid
            voice_url = voice_url_for(url) if opts.webhook and target != "relay" else None
            try:
                result = await run_load(
                    target, url, calls, opts, (speech, barge_speech), pid, voice_url
                )
            finally:
                if spawned is not None:
                    await spawned.stop()
            result["url"] = url
            runs.append(result)
    return {
        "bench": "twilio",
        "started": datetime.now().isoformat(timespec="seconds"),
        "options": {
            "scenario": opts.scenario,
            "calls": opts.calls,
            "duration_s": opts.duration,
            "ramp_s": opts.ramp,
            "targets": targets,
            "url": opts.url,
            "spawn": opts.spawn,
            "engine_backend": opts.engine_backend if opts.spawn == "engine" else None,
            "phases": opts.phases,
            "click_interval_s": opts.click_interval,
            "pin": opts.pin,
            "speech": speech_source,
            "speech_s": round(len(speech) / 8000.0, 2),
        },
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "runs": runs,
    }


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    if opts.phases < 1:
        print("--phases must be at least 1", file=sys.stderr)
        return 2
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = opts.out or (REPO / "bench" / "out" / f"{stamp}-{opts.scenario}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            results = runner.run(run_all(opts, out))
        except RuntimeError as exc:
            print(f"bench twilio: {exc}", file=sys.stderr)
            return 1
    from bench.report import write_outputs

    paths = write_outputs(results, out)
    for run in results["runs"]:
        lat = run["latency_ms"]
        server = run["server"] or {}
        timed = f"p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} ms" if lat["n"] else "none measured"
        print(
            f"{run['target']:>7} x{run['calls']:<4} latency {timed} (n={lat['n']})"
            f"  server cpu {server.get('cpu_mean', float('nan')):.1f}%"
            f"  harness cpu {run['harness']['cpu_mean']:.1f}%"
            f"  failed {run['failed_to_connect']}"
        )
    print(f"report: {paths['markdown']}")
    return 0
