"""The phone path end to end: Twilio's webhook and Media Streams against the real engine, with a
Twilio stand-in caller on real loopback sockets."""

from __future__ import annotations

import asyncio
import base64
import gc
import time
import weakref
import xml.etree.ElementTree as ElementTree

import aiohttp
import pytest
from aiohttp import WSMsgType

from bench.twilio_caller import Ticker, TwilioCaller, twilio_signature
from engine.call import RELAY_PROBE_EVERY
from engine.config import Settings
from engine.transports.twilio import FRAME_MS, HEARD_MARGIN_MS, StreamTokens
from tests.servers import serve_engine
from tests.speech import noise, speech, to_8k_mulaw
from tests.twilio_helpers import phone_call, until

FORM = {
    "CallSid": "CA" + "1" * 32,
    "AccountSid": "AC" + "2" * 32,
    "From": '+1 <Bob> & "Co"',
    "To": "+15550001111",
    "CallStatus": "ringing",
    "Direction": "inbound",
    "ApiVersion": "2010-04-01",
}


def parse_twiml(text: str) -> tuple[str, dict[str, str]]:
    root = ElementTree.fromstring(text)
    stream = root.find("./Connect/Stream")
    assert stream is not None, text
    return stream.attrib["url"], {
        p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")
    }


# -- the voice webhook --------------------------------------------------------------------------


async def test_voice_webhook_connects_a_bidirectional_stream() -> None:
    async with serve_engine() as served, aiohttp.ClientSession() as http:
        async with http.post(served.url + "/twilio/voice", data=FORM) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/xml"
            url, params = parse_twiml(await resp.text())
    assert url == served.ws_url + "/twilio/stream"  # loopback development keeps ws://
    assert params["callSid"] == FORM["CallSid"]
    assert params["from"] == FORM["From"]  # escaped in the XML, intact once parsed
    assert len(params["token"]) >= 24


async def test_voice_webhook_uses_public_url_with_wss() -> None:
    async with (
        serve_engine(public_url="https://voice.example.com") as served,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(served.url + "/twilio/voice", data=FORM) as resp:
            url, _ = parse_twiml(await resp.text())
    assert url == "wss://voice.example.com/twilio/stream"


async def test_signature_is_required_when_the_auth_token_is_set() -> None:
    token = "secret-token"
    public = "https://voice.example.com"
    async with (
        serve_engine(public_url=public, twilio_auth_token=token) as served,
        aiohttp.ClientSession() as http,
    ):
        url = served.url + "/twilio/voice"
        async with http.post(url, data=FORM) as resp:
            assert resp.status == 401
            assert "Signature" in (await resp.json())["error"]
        bad = twilio_signature(public + "/twilio/voice", FORM, "wrong-token")
        async with http.post(url, data=FORM, headers={"X-Twilio-Signature": bad}) as resp:
            assert resp.status == 401
        good = twilio_signature(public + "/twilio/voice", FORM, token)
        async with http.post(url, data=FORM, headers={"X-Twilio-Signature": good}) as resp:
            assert resp.status == 200
        # Twilio's libraries also sign with the default port made explicit
        with_port = twilio_signature("https://voice.example.com:443/twilio/voice", FORM, token)
        async with http.post(url, data=FORM, headers={"X-Twilio-Signature": with_port}) as resp:
            assert resp.status == 200
        tampered = dict(FORM, From="+19998887777")
        async with http.post(url, data=tampered, headers={"X-Twilio-Signature": good}) as resp:
            assert resp.status == 401


def test_a_stream_token_from_one_worker_is_good_on_another_once() -> None:
    # two workers' token books: same key (forked from one supervisor, or one auth token)
    a, b = StreamTokens(auth_token="k"), StreamTokens(auth_token="k")
    token = a.issue()
    assert b.redeem(token)
    assert not b.redeem(token)  # spent
    assert not StreamTokens(auth_token="other").redeem(a.issue())  # another deployment's key
    assert StreamTokens().redeem(StreamTokens().issue())  # one process tree shares its secret
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert not a.redeem(tampered)
    for garbage in ("", "x", "!!!!", "A" * 54, token + "AA"):
        assert not a.redeem(garbage)
    assert not StreamTokens(ttl_s=-1.0, auth_token="k").redeem(
        StreamTokens(ttl_s=-1.0, auth_token="k").issue()
    )  # expired


async def test_stream_token_is_single_use_when_checks_are_on() -> None:
    token = "secret-token"
    async with serve_engine(twilio_auth_token=token) as served, aiohttp.ClientSession() as http:
        sig = twilio_signature(served.url + "/twilio/voice", FORM, token)
        async with http.post(
            served.url + "/twilio/voice", data=FORM, headers={"X-Twilio-Signature": sig}
        ) as resp:
            _, params = parse_twiml(await resp.text())
        ticker = Ticker()
        try:
            tokenless = TwilioCaller(served.ws_url + "/twilio/stream", ticker, session=http)
            await tokenless.connect()
            await until(lambda: tokenless.closed_at is not None, what="tokenless stream closed")
            good = TwilioCaller(
                served.ws_url + "/twilio/stream", ticker, session=http, custom_parameters=params
            )
            await good.connect()
            await asyncio.sleep(0.2)
            assert good.active and len(served.engine.calls) == 1
            replay = TwilioCaller(
                served.ws_url + "/twilio/stream", ticker, session=http, custom_parameters=params
            )
            await replay.connect()
            await until(lambda: replay.closed_at is not None, what="replayed token rejected")
            assert good.active
            await good.hangup()
        finally:
            await ticker.close()


async def test_an_overloaded_engine_rejects_new_calls_busy() -> None:
    async with serve_engine() as served, aiohttp.ClientSession() as http:
        served.engine.loop_lag_ms = 10_000.0
        async with http.post(served.url + "/twilio/voice", data=FORM) as resp:
            body = await resp.text()
    assert resp.status == 200 and '<Reject reason="busy"/>' in body
    assert served.engine.metrics.calls_shed == 1


# -- audio -------------------------------------------------------------------------------------


def click_train(count: int) -> bytes:
    """Loud 20 ms clicks separated by 180 ms of silence, as mu-law."""
    loud = bytes([0x80, 0x00] * 80)  # full-scale square wave
    return (loud + b"\xff" * 160 * 9) * count


def clicks_heard(caller: TwilioCaller, since: float) -> int:
    """Clicks heard back: loud frames more than 60 ms after the previous loud frame (resampling
    may spread one click over two frames, and jitter may put an empty slot between them)."""
    clicks, last = 0, -1.0
    for at, loud in zip(caller.heard, caller.heard_loud, strict=True):
        if loud and at >= since:
            if at - last > 0.06:
                clicks += 1
            last = at
    return clicks


async def test_echo_backend_returns_every_frame() -> None:
    async with phone_call(Settings(backend="echo")) as (served, caller):
        utterance = caller.speak(click_train(10))
        await utterance.finished()
        await asyncio.sleep(0.3)
        stats = caller.stats()
        assert stats["frames_received"] >= stats["frames_sent"] - 3
        assert clicks_heard(caller, utterance.first_sent or 0.0) == 10
        call = next(iter(served.engine.calls.values()))
        assert call.stats.frames_in >= stats["frames_sent"] - 3
        # one relayed chunk in RELAY_PROBE_EVERY is timed into the relay-latency histogram
        histogram = served.engine.metrics.relay_latency.collect()[0]
        count = next(s.value for s in histogram.samples if s.name.endswith("_count"))
        assert count >= call.stats.frames_out // RELAY_PROBE_EVERY >= 1
        async with aiohttp.ClientSession() as http, http.get(f"{served.url}/metrics") as resp:
            assert f"engine_relay_latency_seconds_count {count}" in await resp.text()


async def test_an_ended_call_is_freed_without_the_garbage_collector() -> None:
    # The engine runs with a garbage collector tuned for latency (full collections are rare):
    # a reference cycle anywhere in a call would hold its memory long after it ended.
    gc.collect()
    gc.disable()
    try:
        async with phone_call(Settings(backend="echo")) as (served, caller):
            utterance = caller.speak(click_train(3))
            await utterance.finished()
            call = next(iter(served.engine.calls.values()))
            refs = [weakref.ref(call), weakref.ref(call.transport), weakref.ref(call.output)]
            del call
            await caller.hangup()
            await until(lambda: not served.engine.calls, what="call ended")
            await asyncio.sleep(0.05)
            assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()


@pytest.mark.slow
async def test_caller_hears_the_greeting_then_an_answer() -> None:
    async with phone_call(Settings(backend="local")) as (served, caller):
        await until(lambda: caller.stats()["marks_echoed"] >= 1, timeout=15, what="greeting heard")
        greeting = caller.stats()["frames_heard"]
        assert greeting > 50  # "Hello! How can I help you today?" is well over a second
        question = caller.speak(to_8k_mulaw(speech("what are your opening hours")))
        await question.finished()
        asked = question.last_loud_sent or time.monotonic()
        await until(
            lambda: caller.first_audio_after(asked) is not None, timeout=10, what="the answer"
        )
        reply_at = caller.first_audio_after(asked)
        assert reply_at is not None and reply_at - asked < 2.0
        await until(
            lambda: caller.stats()["marks_echoed"] >= 2, timeout=20, what="answer heard to its end"
        )
        assert caller.stats()["clears_received"] == 0
        assert caller.underruns == 0


async def reply_playing(caller: TwilioCaller, text: str = "what are your opening hours") -> float:
    """Asks a question after the greeting; returns once its (long) answer is being heard."""
    await until(lambda: caller.stats()["marks_echoed"] >= 1, timeout=15, what="greeting heard")
    question = caller.speak(to_8k_mulaw(speech(text)))
    await question.finished()
    asked = question.last_loud_sent or time.monotonic()
    await until(lambda: caller.first_audio_after(asked) is not None, timeout=10, what="the answer")
    await asyncio.sleep(0.8)  # well into the answer
    return asked


@pytest.mark.slow
async def test_barge_in_clears_and_nothing_stale_follows() -> None:
    async with phone_call(Settings(backend="local")) as (served, caller):
        await reply_playing(caller)
        interruption = caller.speak(
            to_8k_mulaw(speech("no stop, I would like to book an appointment"))
        )
        onset = await interruption.started()
        await until(lambda: caller.clears_received >= 1, timeout=5, what="clear")
        clear_at = caller.clears[0]
        await interruption.finished()
        speech_end = interruption.last_loud_sent
        stopped = caller.audio_stopped_after(onset, min_silence=0.1)
        assert speech_end is not None and stopped is not None
        # functional bounds only (the latency itself is measured by `voice-engine bench twilio`)
        assert clear_at - onset < 0.5 and stopped - onset < 0.5
        # Until the caller's turn ends (500 ms of silence), nothing may be heard: no stale tail.
        await asyncio.sleep(0.45)
        assert caller.loud_frames_between(clear_at + 0.02, speech_end + 0.45) == 0
        call = next(iter(served.engine.calls.values()))
        assert call.turns.cancelled_generation >= 2
        # and the caller's new turn is answered
        await until(
            lambda: caller.first_audio_after(speech_end) is not None, timeout=10, what="new answer"
        )


def loud_frames_of_reply(caller: TwilioCaller, since: float) -> int:
    return caller.loud_frames_between(since, time.monotonic())


@pytest.mark.slow
async def test_a_short_noise_burst_pauses_and_resumes_without_losing_audio() -> None:
    # The same answer twice: heard whole, then with a noise burst in the middle.
    heard: list[int] = []
    for burst in (False, True):
        async with phone_call(Settings(backend="local")) as (served, caller):
            asked = await reply_playing(caller)
            if burst:
                noisy = to_8k_mulaw(noise(0.06, -12.0, seed=3))
                caller.speak(noisy)
                await until(lambda: caller.clears_received >= 1, timeout=5, what="pause")
            await until(
                lambda: caller.stats()["marks_echoed"] >= 2,
                timeout=20,
                what="answer heard to its end",
            )
            heard.append(loud_frames_of_reply(caller, asked))
            call = next(iter(served.engine.calls.values()))
            assert call.turns.cancelled_generation == -1
    whole, interrupted = heard
    assert interrupted >= whole - 1, f"{whole - interrupted} frames of the answer were lost"
    # A resume may replay what was in flight, no more: what Twilio held ahead (the lead), the
    # margin kept unheard on purpose, and about a frame of playout lag on each side.
    in_flight = (Settings().twilio_lead_ms + HEARD_MARGIN_MS + 2 * FRAME_MS) / FRAME_MS
    assert interrupted <= whole + in_flight, f"{interrupted - whole} frames were heard twice"


async def test_dtmf_reaches_the_call() -> None:
    async with phone_call(Settings(backend="echo")) as (served, caller):
        caller.send_dtmf("5")
        caller.send_dtmf("#")
        await until(
            lambda: (
                served.engine.calls and next(iter(served.engine.calls.values())).dtmf == ["5", "#"]
            ),
            timeout=5,
            what="dtmf",
        )


# -- bad input ---------------------------------------------------------------------------------


def start_message(sid: str) -> str:
    return (
        '{"event":"start","sequenceNumber":"1","streamSid":"%s","start":{"accountSid":"AC1",'
        '"streamSid":"%s","callSid":"CA1","tracks":["inbound"],"customParameters":{},'
        '"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}' % (sid, sid)
    )


def media_message(sid: str, chunk: int, payload: str) -> str:
    return (
        '{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":{"track":"inbound",'
        '"chunk":"%d","timestamp":"%d","payload":"%s"}}'
        % (chunk + 1, sid, chunk, chunk * 20, payload)
    )


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Reads (and ignores the echoed media of) a socket until the server closes it."""
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type is WSMsgType.CLOSE:
            return msg.data
        if msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
            return ws.close_code


async def test_bad_input_is_skipped_or_closes_only_its_own_socket() -> None:
    silence = base64.b64encode(b"\xff" * 160).decode()
    async with (
        phone_call(Settings(backend="echo")) as (served, good),
        aiohttp.ClientSession() as http,
    ):
        talk = good.speak(click_train(25))  # five seconds of clicks while the bad sockets misbehave
        metrics = served.engine.metrics
        url = served.ws_url + "/twilio/stream"

        ws = await http.ws_connect(url)
        skipped = [
            "this is not json",
            "[1, 2, 3]",
            '{"event":"surprise"}',
            media_message("MZbad", 1, silence),  # media before start
        ]
        for text in skipped:
            await ws.send_str(text)
        await ws.send_str(start_message("MZbad"))
        skipped_after_start = [
            media_message("MZsomeoneelse", 2, silence),  # wrong streamSid
            media_message("MZbad", 3, "!!!notbase64!!!"),
            media_message(
                "MZbad", 4, base64.b64encode(b"\xff" * 100).decode()
            ),  # odd length: padded
            '{"event":"media","streamSid":"MZbad","media":{"payload":5}}',
            '{"event":"dtmf","streamSid":"MZbad","dtmf":{"digit":"xyz"}}',
            '{"event":"mark","streamSid":"MZbad","mark":{}}',
        ]
        for text in skipped_after_start:
            await ws.send_str(text)
        await ws.send_str(media_message("MZbad", 5, silence))
        await until(
            lambda: metrics.bad_messages >= len(skipped) + len(skipped_after_start),
            timeout=5,
            what="bad messages counted",
        )
        assert not ws.closed
        bad_call = served.engine.calls["MZbad"]
        await until(
            lambda: bad_call.stats.frames_in >= 2, timeout=5, what="good frames after bad ones"
        )
        # a binary frame is not Media Streams: that socket (only) is closed, 1003
        await ws.send_bytes(b"\x00\x01")
        assert await close_code(ws) == 1003

        # an oversized message: 1009
        big = await http.ws_connect(url)
        await big.send_str('{"event":"connected","pad":"' + "x" * 100_000 + '"}')
        assert await close_code(big) == 1009

        # a malformed start: 1008
        broken = await http.ws_connect(url)
        await broken.send_str('{"event":"start","start":"nope"}')
        assert await close_code(broken) == 1008

        # an unsupported media format: 1003
        wrong = await http.ws_connect(url)
        await wrong.send_str(start_message("MZwide").replace("audio/x-mulaw", "audio/l16"))
        assert await close_code(wrong) == 1003

        await talk.finished()
        await asyncio.sleep(0.3)
        stats = good.stats()
        assert stats["frames_received"] >= stats["frames_sent"] - 3, stats
        assert clicks_heard(good, talk.first_sent or 0.0) == 25
        assert good.active
        await until(lambda: "MZbad" not in served.engine.calls, timeout=5, what="bad call ended")


async def test_a_missing_chunk_becomes_one_concealment_frame() -> None:
    voiced = base64.b64encode(bytes(range(0, 160))).decode()
    async with serve_engine(Settings(backend="echo")) as served, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(served.ws_url + "/twilio/stream")
        await ws.send_str(start_message("MZgap"))
        for chunk in (1, 2, 4, 5, 6):  # chunk 3 was lost on Twilio's side
            await ws.send_str(media_message("MZgap", chunk, voiced))
        await until(lambda: "MZgap" in served.engine.calls, what="call")
        call = served.engine.calls["MZgap"]
        await until(lambda: call.stats.frames_in == 6, what="six frames, one of them concealed")
        assert call.stats.frames_concealed == 1 and call.stats.frames_late == 0
        await ws.close()


async def test_canned_backend_answers_every_turn_with_its_reply() -> None:
    async with phone_call(Settings(backend="canned")) as (served, caller):
        for turn in (1, 2):
            question = caller.speak(to_8k_mulaw(speech("what are your opening hours")))
            await question.finished()
            asked = question.last_loud_sent or time.monotonic()
            await until(lambda asked=asked: caller.first_audio_after(asked) is not None, timeout=10,
                        what="the canned reply")
            await until(lambda turn=turn: caller.stats()["marks_echoed"] >= turn, timeout=15,
                        what="the reply heard to its end")
        call = next(iter(served.engine.calls.values()))
        assert call.backend.generation == 2
        assert caller.underruns == 0
