"""The Twilio stand-in (bench/twilio_caller.py) against real sockets, and `bench twilio` end to end.

The caller is exercised against bench/relay.py and against small scripted servers that play the
engine's part (media, mark, clear) on a loopback port; the playout model also runs on a synthetic
clock through `TwilioCaller.feed`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from bench.relay import create_app as create_relay
from bench.twilio import make_click, synthetic_speech
from bench.twilio_caller import (
    FRAME_S,
    SILENCE,
    Ticker,
    TwilioCaller,
    is_loud,
    mulaw_frames,
    parse_stream_twiml,
    twilio_signature,
)
from tests.servers import serve_app

LOUD = make_click(3)[:160]  # one loud frame
QUIET_GAP = SILENCE * 5  # 100 ms of silence after each click keeps the clicks apart


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Runs `app` on a free loopback port; yields the stream URL."""
    async with serve_app(app) as base:
        yield f"ws{base[4:]}/twilio/stream"


class Scripted:
    """A minimal server side of the stream: records what the caller sends, runs `script` after
    `start` has arrived, then keeps reading until the caller hangs up."""

    def __init__(self, script: Callable[[Scripted], Awaitable[None]]) -> None:
        self.script = script
        self.received: list[dict[str, Any]] = []
        self.ws: web.WebSocketResponse | None = None
        self.sid = ""
        self._arrived = asyncio.Condition()
        self.finished = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/twilio/stream", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        reader = asyncio.create_task(self._read(ws))
        start = await self.wait_for(lambda m: m["event"] == "start")
        self.sid = start["streamSid"]
        await self.script(self)
        self.finished.set()
        await reader
        return ws

    async def _read(self, ws: web.WebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                async with self._arrived:
                    self.received.append(json.loads(msg.data))
                    self._arrived.notify_all()

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 5.0
    ) -> dict[str, Any]:
        """The `count`-th message matching `pred` (waits for it to arrive)."""

        async def matched() -> dict[str, Any]:
            async with self._arrived:
                while True:
                    hits = [m for m in self.received if pred(m)]
                    if len(hits) >= count:
                        return hits[count - 1]
                    await self._arrived.wait()

        return await asyncio.wait_for(matched(), timeout)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        assert self.ws is not None
        if isinstance(message, bytes):
            await self.ws.send_bytes(message)
        elif isinstance(message, str):
            await self.ws.send_str(message)
        else:
            await self.ws.send_str(json.dumps(message))

    async def media(self, frame: bytes, sid: str | None = None) -> None:
        await self.send(
            {
                "event": "media",
                "streamSid": sid or self.sid,
                "media": {"payload": base64.b64encode(frame).decode()},
            }
        )

    async def mark(self, name: str) -> None:
        await self.send({"event": "mark", "streamSid": self.sid, "mark": {"name": name}})

    def echoed(self, name: str) -> Callable[[dict[str, Any]], bool]:
        return lambda m: m["event"] == "mark" and m["mark"]["name"] == name


@pytest.fixture
async def ticker() -> AsyncIterator[Ticker]:
    t = Ticker()
    yield t
    await t.close()


async def call(url: str, ticker: Ticker, **kwargs: Any) -> TwilioCaller:
    caller = TwilioCaller(url, ticker, **kwargs)
    await caller.connect()
    return caller


# --- against the relay ----------------------------------------------------------------------------


async def test_clicks_come_back_and_are_heard_once_each_in_order(ticker: Ticker) -> None:
    clicks = [make_click(i) for i in (0, 5, 10)]
    async with serving(create_relay()) as url:
        caller = await call(url, ticker, record_audio=True)
        sent: list[float] = []
        for click in clicks:
            utt = caller.speak(click + QUIET_GAP)
            await utt.finished()
            assert utt.first_sent is not None
            sent.append(utt.first_sent)
        await caller.hangup(linger=0.2)

    heard_loud = [f for f, loud in zip(caller.heard_audio, caller.heard_loud, strict=True) if loud]
    assert heard_loud == [frame for click in clicks for frame in mulaw_frames(click)]
    assert len(caller.onsets) == len(clicks)
    for onset, sent_at, next_sent in zip(
        caller.onsets, sent, sent[1:] + [float("inf")], strict=True
    ):
        assert sent_at < onset < next_sent
    assert caller.frames_received == caller.frames_sent > 0
    assert caller.frames_heard() == caller.frames_received
    assert caller.error is None


# --- the protocol as Twilio speaks it -------------------------------------------------------------


async def test_start_media_dtmf_and_stop_carry_twilio_fields_and_string_counters(
    ticker: Ticker,
) -> None:
    async def script(server: Scripted) -> None:
        await server.wait_for(lambda m: m["event"] == "media", count=3)

    server = Scripted(script)
    async with serving(server.app()) as url:
        caller = await call(url, ticker, custom_parameters={"token": "t-1", "from": "+15550100"})
        await server.finished.wait()
        caller.send_dtmf("5")
        await server.wait_for(lambda m: m["event"] == "dtmf")
        await caller.hangup()
        await server.wait_for(lambda m: m["event"] == "stop")

    msgs = server.received
    assert msgs[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    start = msgs[1]
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    assert re.fullmatch(r"MZ[0-9a-f]{32}", start["streamSid"])
    assert start["start"]["streamSid"] == start["streamSid"]
    assert re.fullmatch(r"CA[0-9a-f]{32}", start["start"]["callSid"])
    assert re.fullmatch(r"AC[0-9a-f]{32}", start["start"]["accountSid"])
    assert start["start"]["tracks"] == ["inbound"]
    assert start["start"]["customParameters"] == {"token": "t-1", "from": "+15550100"}
    assert start["start"]["mediaFormat"] == {
        "encoding": "audio/x-mulaw",
        "sampleRate": 8000,
        "channels": 1,
    }

    # Every message after `connected` is numbered, as a string, without gaps.
    assert [m["sequenceNumber"] for m in msgs[1:]] == [str(i) for i in range(1, len(msgs))]
    media = [m for m in msgs if m["event"] == "media"]
    assert [m["media"]["chunk"] for m in media] == [str(i) for i in range(1, len(media) + 1)]
    stamps = [int(m["media"]["timestamp"]) for m in media]
    assert all(isinstance(m["media"]["timestamp"], str) for m in media)
    assert all(b > a and (b - a) % 20 == 0 for a, b in itertools.pairwise(stamps))
    assert all(
        m["media"]["track"] == "inbound" and m["streamSid"] == start["streamSid"] for m in media
    )
    assert base64.b64decode(media[0]["media"]["payload"]) == SILENCE

    dtmf = next(m for m in msgs if m["event"] == "dtmf")
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "5"}
    stop = msgs[-1]
    assert stop["event"] == "stop" and stop["streamSid"] == start["streamSid"]
    assert stop["stop"] == {
        "accountSid": start["start"]["accountSid"],
        "callSid": start["start"]["callSid"],
    }


async def test_mark_is_echoed_only_after_the_audio_before_it_has_played(ticker: Ticker) -> None:
    async def script(server: Scripted) -> None:
        for _ in range(10):
            await server.media(LOUD)
        await server.mark("after-ten")
        await server.wait_for(server.echoed("after-ten"))
        await server.mark("nothing-queued")  # the buffer has drained: comes back at once
        await server.wait_for(server.echoed("nothing-queued"))

    server = Scripted(script)
    async with serving(server.app()) as url:
        caller = await call(url, ticker)
        await asyncio.wait_for(server.finished.wait(), 5.0)
        await caller.hangup()

    (first, echoed_at, played), (second, _, played_second) = caller.marks_echoed
    assert (first, second) == ("after-ten", "nothing-queued")
    assert played == 10 and played_second == 10
    # Not before the last frame's 20 ms slot has ended (timers may fire 0.5 ms early).
    assert echoed_at >= caller.heard[9] + FRAME_S - 0.0005
    assert caller.frames_received == 10 and caller.frames_heard() == 10


async def test_clear_drops_the_buffer_and_echoes_pending_marks_at_once(ticker: Ticker) -> None:
    async def script(server: Scripted) -> None:
        for _ in range(50):  # one second of reply
            await server.media(LOUD)
        await server.mark("reply-1")
        # Let the caller play part of it: five of its own frames take about 100 ms.
        sent = sum(1 for m in server.received if m["event"] == "media")
        await server.wait_for(lambda m: m["event"] == "media", count=sent + 5)
        await server.send({"event": "clear", "streamSid": server.sid})
        await server.wait_for(server.echoed("reply-1"))
        for _ in range(5):
            await server.media(LOUD)
        await server.mark("reply-2")
        await server.wait_for(server.echoed("reply-2"))

    server = Scripted(script)
    async with serving(server.app()) as url:
        caller = await call(url, ticker)
        await asyncio.wait_for(server.finished.wait(), 5.0)
        await caller.hangup()

    assert caller.clears_received == 1
    kept = 50 - caller.frames_cleared
    assert 0 < kept < 50  # some of the reply was heard, the rest never will be
    (name_1, at_1, played_1), (name_2, _, played_2) = caller.marks_echoed
    assert (name_1, name_2) == ("reply-1", "reply-2")
    assert at_1 == caller.clears[0] and played_1 == kept
    assert played_2 == kept + 5
    assert caller.frames_heard() == kept + 5 == len(caller.heard)


@pytest.mark.parametrize("fast_receive", [True, False], ids=["tapped", "aiohttp-queue"])
async def test_wrong_stream_sid_binary_unknown_and_garbage_are_counted_and_ignored(
    ticker: Ticker, fast_receive: bool
) -> None:
    async def script(server: Scripted) -> None:
        await server.media(LOUD, sid="MZ" + "0" * 32)
        await server.send(b"\x00\x01binary")
        await server.send({"event": "bogus", "streamSid": server.sid})
        await server.send("{not json")
        await server.send({"event": "media", "streamSid": server.sid, "media": {}})
        await server.mark("still-alive")
        await server.wait_for(server.echoed("still-alive"))

    server = Scripted(script)
    async with serving(server.app()) as url:
        caller = await call(url, ticker, fast_receive=fast_receive)
        assert caller.tapped is fast_receive
        await asyncio.wait_for(server.finished.wait(), 5.0)
        assert caller.active
        await caller.hangup()

    assert (caller.wrong_stream_sid, caller.binary_frames, caller.unknown_events) == (1, 1, 1)
    assert caller.invalid_messages == 2
    assert caller.frames_received == 0 and len(caller.heard) == 0
    assert [m[0] for m in caller.marks_echoed] == ["still-alive"]


async def test_server_closing_the_socket_gets_a_stop_first(ticker: Ticker) -> None:
    async def script(server: Scripted) -> None:
        await server.wait_for(lambda m: m["event"] == "media")
        assert server.ws is not None
        await server.ws.close()

    server = Scripted(script)
    async with serving(server.app()) as url:
        caller = await call(url, ticker)
        await asyncio.wait_for(caller.wait_closed(), 5.0)
        await caller.hangup()

    # aiohttp's server discards what arrives while it closes, so the stop is seen from this side.
    assert caller.closed_by_server and caller.stop_sent and not caller.active
    assert caller.frames_sent > 0 and caller.error is None


# --- the playout model on a synthetic clock -------------------------------------------------------


def media(caller: TwilioCaller, frame: bytes) -> str:
    return json.dumps(
        {
            "event": "media",
            "streamSid": caller.stream_sid,
            "media": {"payload": base64.b64encode(frame).decode()},
        }
    )


def test_frame_into_an_empty_buffer_starts_at_the_next_slot_and_queues_after_that() -> None:
    caller = TwilioCaller("ws://unused", Ticker(), playout_phase=0.005)
    g = caller.ticker.epoch + 0.005  # a slot boundary of this caller's playout clock
    caller.feed(media(caller, LOUD), g + 0.003)
    caller.feed(media(caller, LOUD), g + 0.004)
    assert list(caller.heard) == pytest.approx([g + 0.020, g + 0.040])
    # (queried mid-slot: a slot start computed from the epoch may round either side of g + 40 ms)
    assert caller.frames_heard(g + 0.030) == 1 and caller.frames_heard(g + 0.045) == 2
    # The buffer ran dry at g+60 ms; the next loud frame of the same utterance comes late.
    caller.feed(media(caller, LOUD), g + 0.101)
    assert caller.heard[-1] == pytest.approx(g + 0.120)
    assert caller.underruns == 1 and caller.underrun_slots == 3
    assert list(caller.onsets) == pytest.approx([g + 0.020, g + 0.120])


def test_clear_lets_the_frame_in_its_slot_finish_and_drops_the_rest() -> None:
    caller = TwilioCaller("ws://unused", Ticker(), playout_phase=0.0)
    g = caller.ticker.epoch
    for _ in range(5):
        caller.feed(media(caller, LOUD), g + 0.001)  # slots g+20 ... g+100
    caller.feed(json.dumps({"event": "clear", "streamSid": caller.stream_sid}), g + 0.045)
    assert caller.frames_cleared == 3 and len(caller.heard) == 2
    assert caller.audio_stopped_after(g + 0.045, min_silence=0.1, now=g + 1.0) == pytest.approx(
        g + 0.060
    )
    # New audio waits for the interrupted frame's slot to end, then plays on the clock.
    caller.feed(media(caller, LOUD), g + 0.046)
    assert caller.heard[-1] == pytest.approx(g + 0.060)
    assert caller.underruns == 0  # a clear ends the utterance


def test_quiet_and_silent_frames_are_told_apart_from_loud_ones() -> None:
    speech = synthetic_speech(1.0)
    frames = mulaw_frames(speech)
    assert is_loud(LOUD) and not is_loud(SILENCE)
    assert sum(map(is_loud, frames)) > len(frames) // 2  # mostly voiced, with gaps


def test_voice_webhook_signature_and_twiml_parameters() -> None:
    # Twilio's documented example: URL + sorted params, HMAC-SHA1 with the auth token.
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    sig = twilio_signature("https://mycompany.com/myapp.php?foo=1&bar=2", params, "12345")
    assert sig == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        '<Stream url="wss://x.example/twilio/stream"><Parameter name="token" value="a&amp;b"/>'
        "</Stream></Connect></Response>"
    )
    assert parse_stream_twiml(twiml) == ("wss://x.example/twilio/stream", {"token": "a&b"})
    assert parse_stream_twiml("<Response><Say>hi</Say></Response>") is None


# --- the harness end to end -----------------------------------------------------------------------


def test_bench_twilio_against_the_relay_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    from bench.__main__ import main

    code = main(
        [
            "twilio",
            "--spawn",
            "relay",
            "--calls",
            "5",
            "--duration",
            "3",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    assert run["target"] == "relay" and run["connected"] == 5 and run["failed_to_connect"] == 0
    assert run["frames"]["sent"] > 0 and run["frames"]["received"] == run["frames"]["sent"]
    assert run["latency_ms"]["n"] > 0 and run["server"]["cpu_peak"] >= 0
    report = (tmp_path / "report.md").read_text()
    assert "| relay | 5 |" in report
    for name in ("latency.png", "cpu_time.png", "cpu_vs_calls.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_messages_read_after_a_missed_heartbeat_are_dated_to_it() -> None:
    ticker = Ticker()
    assert ticker.arrival() == pytest.approx(time.monotonic(), abs=0.01)  # not running: now
    ticker.next_due = time.monotonic() - 0.050  # the harness missed its heartbeat 50 ms ago
    assert ticker.arrival() == ticker.next_due and ticker.stall_dated == 1
    ticker.next_due = time.monotonic() + 0.005  # on time
    assert ticker.arrival() < ticker.next_due and ticker.stall_dated == 1
