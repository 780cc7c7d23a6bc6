"""Hostile input for the parsers: whatever arrives, nothing raises out of them, nothing grows
without bound, and a call that is fed garbage still takes good frames afterwards."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.wsclient import client_frame
from engine.config import Settings
from engine.runtime import Engine
from engine.transports import twilio
from engine.transports.webrtc import advertise_opus_receive_options

SID = "MZfuzz"


class Socket:
    """Stands in for the TCP transport under the WebSocket: counts what the engine writes."""

    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> None:
        return None


class Request:
    def __init__(self) -> None:
        self.transport = Socket()


async def feed(stream: twilio.TwilioMediaStream, text: str) -> None:
    """One message through the real frame parser, then let a `start` finish starting."""
    stream.ws.feed_data(client_frame(1, text.encode("utf-8", "surrogatepass")))
    while stream._starting is not None:
        await asyncio.sleep(0)


def media(chunk: int, payload: bytes = b"\xff" * 160) -> str:
    return json.dumps(
        {
            "event": "media",
            "streamSid": SID,
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(chunk * 20),
                "payload": base64.b64encode(payload).decode(),
            },
        }
    )


START = json.dumps(
    {
        "event": "start",
        "streamSid": SID,
        "start": {
            "streamSid": SID,
            "accountSid": "AC1",
            "callSid": "CA1",
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
events = st.sampled_from(["media", "start", "mark", "dtmf", "stop", "connected", "clear", "x", ""])
messages = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.builds(
        lambda e, extra: json.dumps({"event": e, "streamSid": SID, **extra}),
        events,
        st.dictionaries(
            st.sampled_from(["media", "start", "mark", "dtmf", "stop", "streamSid"]),
            json_values,
            max_size=3,
        ),
    ),
    st.builds(
        lambda chunk, payload: media(chunk, payload),
        st.integers(-5, 2**20),
        st.binary(max_size=400),
    ),
    st.builds(
        lambda chunk, text: json.dumps(
            {
                "event": "media",
                "streamSid": SID,
                "media": {"chunk": str(chunk), "timestamp": "x", "payload": text},
            }
        ),
        st.integers(0, 100),
        st.text(max_size=50),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=40))
def test_twilio_messages_never_break_a_call(garbage: list[str]) -> None:
    async def run() -> None:
        engine = Engine(Settings(backend="echo"))
        request = Request()
        stream = twilio.TwilioMediaStream(engine, request)  # type: ignore[arg-type]
        stream.ws.transport = request.transport  # type: ignore[assignment]  # as accept() does
        await feed(stream, START)
        assert stream.call is not None
        for text in garbage:
            await feed(stream, text)
        # memory stays bounded whatever came in
        assert stream._jitter.depth <= stream._jitter.capacity
        assert len(stream._marks_pending) <= 1 and stream._out_frames.pending() < 4096
        if not stream.ws.closing:
            # good frames after the garbage still reach the call
            before = stream.call.stats.frames_in
            last = stream._jitter.last_seq if stream._jitter.received else 0
            for k in range(1, 4):
                await feed(stream, media((last + k) % 2**16))
            assert stream.call.stats.frames_in > before or stream._jitter.resets > 0
        await stream.call.close("fuzz")

    asyncio.run(run())


sdp_lines = st.lists(
    st.one_of(
        st.text(max_size=60),
        st.sampled_from(
            [
                "v=0",
                "m=audio 9 UDP/TLS/RTP/SAVPF 111 0",
                "a=rtpmap:111 opus/48000/2",
                "a=fmtp:111 minptime=10;useinbandfec=0",
                "a=fmtp:111",
                "a=rtpmap:",
                "m=video 9 RTP/AVP 96",
                "a=fmtp:abc x",
                "c=IN IP4 0.0.0.0",
            ]
        ),
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(sdp_lines, st.sampled_from(["\r\n", "\n"]))
def test_answer_rewriting_takes_any_sdp_text(lines: list[str], eol: str) -> None:
    sdp = eol.join(lines)
    out = advertise_opus_receive_options(sdp)
    assert isinstance(out, str)
    assert len(out) <= len(sdp) + 200 * (sdp.count("a=fmtp") + 1)


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**40, 1.5])
    if kind == 2:
        return rng.choice(
            [
                "",
                "x",
                "tool-calls",
                "assistant-request",
                "end-of-call-report",
                "transcript",
                "status-update",
                "\u0000",
                "é" * 3,
            ]
        )
    if kind == 3:
        return rng.random()
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = [
        "message",
        "type",
        "call",
        "id",
        "toolCallList",
        "function",
        "name",
        "arguments",
        "timestamp",
        "transcript",
        "role",
        "status",
    ]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


async def test_signed_garbage_webhooks_get_a_4xx_or_200_never_a_crash() -> None:

    import aiohttp

    from tests.servers import serve_engine
    from tests.vapi_standin import sign_webhook

    rng = random.Random(7)
    secret = "fuzz-secret"
    async with (
        serve_engine(Settings(backend="echo", vapi_webhook_secret=secret)) as served,
        aiohttp.ClientSession() as http,
    ):
        statuses: dict[int, int] = {}
        for i in range(300):
            if i % 3 == 0:
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
            else:
                value = _random_json(rng)
                if i % 3 == 1:
                    value = {"message": value if isinstance(value, dict) else {"type": value}}
                body = json.dumps(value).encode()
            signed = sign_webhook(body, scheme="hmac", secret=secret)
            async with http.post(
                served.url + "/vapi/webhook", data=signed.body, headers=signed.headers
            ) as resp:
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                assert resp.status in (200, 400), (resp.status, body[:80], await resp.text())
        assert statuses.get(400, 0) > 50 and statuses.get(200, 0) > 10
        async with http.get(served.url + "/health") as resp:
            assert resp.status == 200
