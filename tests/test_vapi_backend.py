"""The VAPI backend against the VAPI stand-in over real sockets: call set-up, audio both ways,
generations and interruption, faults, and a clean close."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from engine.backends import backend_factory
from engine.backends.base import CallInfo
from engine.backends.vapi import TRANSPORT, VapiBackend
from engine.config import Settings
from engine.events import (
    AudioChunk,
    BackendError,
    HangUp,
    Interrupted,
    Status,
    Transcript,
    TransferRequest,
    UtteranceEnd,
)
from tests.vapi_standin import MALFORMED_FRAMES, VapiStandin, frames, room_noise, speech_like

KEY = "vapi-test-key"


class Events:
    """The emit callback: records events; `hook` may act on each (as the call would)."""

    def __init__(self, hook: Callable[[Any], None] | None = None) -> None:
        self.items: list[Any] = []
        self.hook = hook
        self._changed = asyncio.Event()

    def __call__(self, event: Any) -> None:
        self.items.append(event)
        self._changed.set()
        if self.hook is not None:
            self.hook(event)

    async def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float = 5.0) -> None:
        """Until `predicate(items)` holds; a BackendError on the way fails at once, with its
        message, unless it is what the predicate waits for."""
        async with asyncio.timeout(timeout):
            while not predicate(self.items):
                errors = self.of(BackendError)
                if errors:
                    raise AssertionError(f"the backend failed while waiting: {errors}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_event(self, wanted: Any) -> None:
        await self.wait_for(lambda items: wanted in items)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.items if isinstance(e, kind)]

    def index(self, wanted: Any) -> int:
        return self.items.index(wanted)


@pytest.fixture
async def vapi() -> AsyncIterator[VapiStandin]:
    async with VapiStandin(KEY) as standin:
        yield standin


def make(vapi: VapiStandin, events: Events, *, caller: str | None = "+15550100",
         **options: Any) -> VapiBackend:
    info = CallInfo("sess-1", "twilio", caller=caller, call_sid="CA123")
    options.setdefault("api_key", KEY)
    return VapiBackend(info, events, assistant_id="asst-1", base_url=vapi.base_url, **options)


def backend_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("vapi-") and not t.done()]


class SleepLog:
    """An injected retry sleep: records each delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def turn_frames(speech_ms: int = 600, quiet_ms: int = 700, seed: int = 3) -> list[bytes]:
    return frames(speech_like(speech_ms, seed=seed)) + frames(room_noise(quiet_ms))


async def talk(backend: VapiBackend, audio: list[bytes]) -> None:
    """Caller frames at ten times real time (the stand-in endpoints on audio, not on the clock)."""
    for i, frame in enumerate(audio):
        backend.send_audio(frame, i * 20.0)
        await asyncio.sleep(0.002)


def utterance_end(generation: int) -> Callable[[list[Any]], bool]:
    return lambda items: UtteranceEnd(generation) in items


# --- set-up ---


async def test_start_creates_a_websocket_call_with_bearer_auth_and_call_details(
        vapi: VapiStandin) -> None:
    backend = make(vapi, Events())
    await backend.start()
    try:
        (request,) = vapi.requests_to("/call")
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert request.json() == {
            "assistantId": "asst-1",
            "assistantOverrides": {"variableValues": {"callerNumber": "+15550100"}},
            "metadata": {"engineSessionId": "sess-1", "engineTransport": "twilio",
                         "callSid": "CA123"},
            "transport": {"provider": "vapi.websocket",
                          "audioFormat": {"format": "pcm_s16le", "container": "raw",
                                          "sampleRate": 16000}},
        }
        assert backend.call_id in vapi.calls and vapi.is_connected(backend.call_id)
        assert backend.connected
    finally:
        await backend.close()


async def test_an_unknown_caller_sends_no_variable_values(vapi: VapiStandin) -> None:
    backend = make(vapi, Events(), caller=None)
    await backend.start()
    await backend.close()
    body = vapi.requests_to("/call")[0].json()
    assert "assistantOverrides" not in body and body["transport"] == TRANSPORT


async def test_the_factory_reads_settings(vapi: VapiStandin) -> None:
    settings = Settings(vapi_api_key=KEY, vapi_assistant_id="asst-9", vapi_base_url=vapi.base_url)
    events = Events()
    backend = backend_factory("vapi", settings=settings)(CallInfo("s-9", "webrtc"), events)
    assert isinstance(backend, VapiBackend)
    await backend.start()
    await backend.close()
    assert vapi.requests_to("/call")[0].json()["assistantId"] == "asst-9"
    assert not events.of(BackendError)


# --- audio both ways ---


async def test_caller_audio_reaches_vapi_and_the_reply_comes_back_as_one_generation(
        vapi: VapiStandin) -> None:
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    audio = turn_frames()
    await talk(backend, audio)
    await events.wait_for(utterance_end(1))
    await backend.close()

    call = vapi.last_call()
    assert bytes(call.audio_in) == b"".join(audio)
    assert Transcript(vapi.control.transcript_text, True, "user") in events.items
    assert Transcript(vapi.control.reply_text, True, "assistant") in events.items
    chunks = events.of(AudioChunk)
    assert {c.generation for c in chunks} == {1}
    assert b"".join(c.pcm for c in chunks) == call.replies[0].pcm
    assert events.index(UtteranceEnd(1)) > events.index(chunks[-1])
    started = [e for e in events.of(Status)
               if e.data.get("role") == "assistant" and e.data.get("status") == "started"]
    assert started[0].data["generation"] == 1
    assert backend.dropped_frames == 0 and backend.discarded_chunks == 0


async def test_frames_queued_before_the_socket_opens_are_sent_newest_kept(
        vapi: VapiStandin) -> None:
    backend = make(vapi, Events(), max_queued_frames=50)
    audio = turn_frames(speech_ms=200, quiet_ms=1400)  # 80 distinct frames
    for i, frame in enumerate(audio):
        backend.send_audio(frame, i * 20.0)  # returns at once: nothing is connected yet
    assert backend.dropped_frames == 30
    await backend.start()
    call = vapi.last_call()
    async with asyncio.timeout(5):
        while call.audio_in_bytes < 50 * 640:
            await asyncio.sleep(0.01)
    await backend.close()
    assert bytes(call.audio_in) == b"".join(audio[30:])


# --- interruption ---


async def test_vapi_barge_in_drops_the_stale_audio_it_keeps_sending(vapi: VapiStandin) -> None:
    vapi.control.stale_audio = True
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    await talk(backend, turn_frames())
    await events.wait_for(lambda items: any(isinstance(e, AudioChunk) for e in items))
    await talk(backend, turn_frames(speech_ms=300, seed=1))  # over the reply: a barge-in
    await events.wait_for(utterance_end(2))
    await backend.close()

    first = vapi.last_call().replies[0]
    assert first.interrupted and first.stale_bytes > 0
    cut = events.index(Interrupted(1))
    assert not [e for e in events.items[cut:] if isinstance(e, AudioChunk) and e.generation == 1]
    assert backend.discarded_bytes == first.stale_bytes
    assert UtteranceEnd(1) not in events.items
    second = [c for c in events.of(AudioChunk) if c.generation == 2]
    assert b"".join(c.pcm for c in second) == vapi.last_call().replies[1].pcm


async def test_local_interrupt_drops_late_audio_while_the_next_reply_plays(
        vapi: VapiStandin) -> None:
    backend: VapiBackend

    def barge_in_on_first_chunk(event: Any) -> None:
        # the engine's own barge-in cut generation 1 as soon as it began
        if isinstance(event, AudioChunk) and event.generation == 1:
            backend.interrupt(1)

    events = Events(barge_in_on_first_chunk)
    backend = make(vapi, events)
    await backend.start()
    await talk(backend, turn_frames())
    await events.wait_for(lambda items: any(
        isinstance(e, Status) and e.data.get("role") == "assistant"
        and e.data.get("status") == "stopped" for e in items))
    first = vapi.last_call().replies[0]
    first_chunks = [c for c in events.of(AudioChunk) if c.generation == 1]
    assert len(first_chunks) == 1
    assert backend.discarded_bytes == len(first.pcm) - len(first_chunks[0].pcm)
    assert UtteranceEnd(1) not in events.items

    await talk(backend, turn_frames(seed=2))
    await events.wait_for(utterance_end(2))
    await backend.close()
    second = [c for c in events.of(AudioChunk) if c.generation == 2]
    assert b"".join(c.pcm for c in second) == vapi.last_call().replies[1].pcm
    assert not events.of(Interrupted)  # VAPI's own barge-in on a cut reply is not news


async def test_interrupting_a_generation_vapi_has_not_started_keeps_its_next_reply(
        vapi: VapiStandin) -> None:
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    backend.interrupt(5)  # nothing has been said yet
    await talk(backend, turn_frames())
    await events.wait_for(utterance_end(1))
    await backend.close()
    assert b"".join(c.pcm for c in events.of(AudioChunk)) == vapi.last_call().replies[0].pcm


# --- server messages ---


async def test_server_messages_become_engine_events(vapi: VapiStandin) -> None:
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    assert backend.call_id is not None
    for message in (
        {"type": "hang"},
        {"type": 'transcript[transcriptType="final"]', "role": "user",
         "transcriptType": "final", "transcript": "speak to a person"},
        {"type": "tool-calls", "toolCallList": [
            {"id": "t1", "type": "function", "function": {"name": "lookup", "arguments": {}}}]},
        {"type": "model-output", "output": "tok"},
        {"type": "transfer-update", "destination": {
            "type": "number", "number": "+15550199", "message": "Connecting you now."}},
    ):
        await vapi.push(backend.call_id, message)
    await events.wait_event(TransferRequest("+15550199", "Connecting you now."))
    await backend.close()
    assert Status("hang", {}) in events.items and not events.of(HangUp)
    assert Transcript("speak to a person", True, "user") in events.items
    assert Status("tool-calls", {"names": ["lookup"]}) in events.items
    assert not [e for e in events.of(Status) if e.kind == "model-output"]


async def test_a_failing_event_handler_does_not_stop_the_reader(vapi: VapiStandin) -> None:
    def fail_on_transcripts(event: Any) -> None:
        if isinstance(event, Transcript):
            raise RuntimeError("the call's handler failed")

    events = Events(hook=fail_on_transcripts)
    backend = make(vapi, events)
    await backend.start()
    assert backend.call_id is not None
    await vapi.push(backend.call_id, {"type": 'transcript[transcriptType="final"]', "role": "user",
                                      "transcriptType": "final", "transcript": "hello"})
    await vapi.push(backend.call_id, {"type": "hang"})
    await events.wait_event(Status("hang", {}))  # read after the failure: the reader lives on
    await backend.close()


async def test_audio_ahead_of_its_speech_update_joins_that_utterance(vapi: VapiStandin) -> None:
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    call_id = backend.call_id
    assert call_id is not None
    frame = speech_like(20)

    async def assistant(status: str) -> None:
        await vapi.push(call_id, {"type": "speech-update", "role": "assistant", "status": status})

    await vapi.push_audio(call_id, frame)  # ahead of its started message
    await assistant("started")
    await vapi.push_audio(call_id, frame)
    await assistant("stopped")
    await vapi.push_audio(call_id, frame)  # after stopped, ahead of the next started
    await assistant("started")
    await vapi.push_audio(call_id, frame)
    await events.wait_for(lambda items: len([e for e in items if isinstance(e, AudioChunk)]) == 4)
    await backend.close()

    def generation(e: Any) -> Any:
        return e.data.get("generation") if isinstance(e, Status) else e.generation

    assert [(type(e).__name__, generation(e)) for e in events.items
            if not (isinstance(e, Status) and e.kind == "status-update")] == [
        ("AudioChunk", 1), ("Status", 1), ("AudioChunk", 1), ("UtteranceEnd", 1), ("Status", 1),
        ("AudioChunk", 2), ("Status", 2), ("AudioChunk", 2)]


async def test_vapi_ending_the_call_is_a_hangup_not_an_error(vapi: VapiStandin) -> None:
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    assert backend.call_id is not None
    await vapi.end_call(backend.call_id, "assistant-ended-call")
    await events.wait_event(HangUp("assistant-ended-call"))
    async with asyncio.timeout(5):
        while backend.connected:
            await asyncio.sleep(0.01)
    await backend.close()
    assert not events.of(BackendError)


# --- faults ---


async def test_429_with_retry_after_is_retried_then_the_call_connects(vapi: VapiStandin) -> None:
    vapi.control.fail_429, vapi.control.retry_after = 2, "1"
    sleeps, retries = SleepLog(), []
    events = Events()
    backend = make(vapi, events, retry_sleep=sleeps, on_retry=lambda *a: retries.append(a))
    await backend.start()
    connected = backend.connected
    await backend.close()
    assert connected and not events.of(BackendError)
    assert [r.status for r in vapi.requests_to("/call")] == [429, 429, 201]
    assert sleeps.delays == [1.0, 1.0] and len(retries) == 2


async def test_persistent_500s_end_in_one_fatal_error_after_bounded_attempts(
        vapi: VapiStandin) -> None:
    vapi.control.fail_500 = 100
    sleeps = SleepLog()
    events = Events()
    backend = make(vapi, events, retry_sleep=sleeps)
    await backend.start()
    assert len(events.items) == 1
    (error,) = events.of(BackendError)
    assert error.fatal and "500" in error.message
    assert len(vapi.requests_to("/call")) == 4 and len(sleeps.delays) == 3
    assert not backend_tasks()
    backend.send_audio(b"\x00\x01" * 320, 0.0)  # a failed backend takes audio and ignores it
    await backend.close()
    assert not backend_tasks()


async def test_a_wrong_key_is_fatal_without_retrying(vapi: VapiStandin) -> None:
    sleeps = SleepLog()
    events = Events()
    backend = make(vapi, events, api_key="wrong", retry_sleep=sleeps)
    await backend.start()
    await backend.close()
    (error,) = events.of(BackendError)
    assert error.fatal and "401" in error.message
    assert len(vapi.requests) == 1 and sleeps.delays == []


async def test_a_malformed_call_object_is_fatal(vapi: VapiStandin) -> None:
    vapi.control.malformed_json = 1
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    await backend.close()
    (error,) = events.of(BackendError)
    assert error.fatal and "malformed call object" in error.message


async def test_a_slow_answer_within_the_budget_still_connects(vapi: VapiStandin) -> None:
    vapi.control.delay_s = 0.3
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    connected = backend.connected
    await backend.close()
    assert connected and not events.of(BackendError)


async def test_an_answer_slower_than_the_setup_budget_is_fatal(vapi: VapiStandin) -> None:
    vapi.control.delay_s = 2.0
    events = Events()
    backend = make(vapi, events, setup_timeout=0.3)
    await backend.start()
    await backend.close()
    (error,) = events.of(BackendError)
    assert error.fatal and "timed out" in error.message
    assert not backend_tasks()


async def test_malformed_text_frames_are_ignored(vapi: VapiStandin) -> None:
    vapi.control.malformed_frames = True
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    await talk(backend, turn_frames())
    await events.wait_for(utterance_end(1))
    await backend.close()
    assert backend.malformed_messages == len(MALFORMED_FRAMES) + 1  # + one inside the reply
    assert not events.of(BackendError)
    assert b"".join(c.pcm for c in events.of(AudioChunk)) == vapi.last_call().replies[0].pcm


async def test_a_socket_dropped_mid_call_is_fatal_and_leaves_nothing_running(
        vapi: VapiStandin) -> None:
    vapi.control.drop_after_ms = 150
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    talking = asyncio.ensure_future(talk(backend, turn_frames(quiet_ms=3000)))
    await events.wait_for(lambda items: any(isinstance(e, BackendError) for e in items))
    await talking
    (error,) = events.of(BackendError)
    assert error.fatal and "lost mid-call" in error.message
    assert vapi.last_call().dropped
    await backend.close()
    assert not backend_tasks() and not backend.connected


# --- close ---


async def test_close_says_end_call_once_and_leaves_nothing_running(vapi: VapiStandin) -> None:
    events = Events()
    backend = make(vapi, events)
    await backend.start()
    backend.dtmf("5")  # no DTMF message exists on this transport: nothing is sent
    await backend.close()
    await backend.close()
    call = vapi.last_call()
    assert call.control_messages() == [{"type": "end-call"}]
    assert call.ended and not vapi.is_connected(call.id)
    assert not backend_tasks() and not events.of(BackendError)


async def test_close_during_setup_cancels_it_quietly(vapi: VapiStandin) -> None:
    vapi.control.delay_s = 2.0
    events = Events()
    backend = make(vapi, events)
    starting = asyncio.ensure_future(backend.start())
    async with asyncio.timeout(5):
        while not vapi.requests:
            await asyncio.sleep(0.01)
    await backend.close()
    await starting  # returns, does not raise
    assert not events.items and not backend_tasks() and not vapi.calls
