"""Phone calls through the engine to VAPI (the local stand-in, over real sockets): audio both ways,
barge-in that drops VAPI's late audio, and every fault ending as stated."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest

from engine.backends import backend_factory
from engine.config import Settings
from tests.speech import speech, to_8k_mulaw
from tests.twilio_helpers import phone_call, until
from tests.vapi_standin import VapiStandin

API_KEY = "sk-test-engine"


@pytest.fixture
async def vapi() -> AsyncIterator[VapiStandin]:
    async with VapiStandin(API_KEY) as standin:
        yield standin


def settings_for(vapi: VapiStandin) -> Settings:
    return Settings(
        backend="vapi",
        vapi_api_key=API_KEY,
        vapi_assistant_id="asst-help-desk",
        vapi_base_url=vapi.base_url,
    )


def quick_backend(vapi: VapiStandin, retries: list[object] | None = None):
    """The real VAPI backend with short retry delays, so fault tests take seconds."""
    options: dict[str, object] = {}
    if retries is not None:
        options["on_retry"] = lambda *attempt: retries.append(attempt)
    return backend_factory(
        "vapi",
        settings=settings_for(vapi),
        retry_base_delay=0.05,
        retry_max_delay=0.2,
        setup_timeout=3.0,
        **options,
    )


async def test_a_phone_caller_talks_to_vapi_through_the_engine(vapi: VapiStandin) -> None:
    async with phone_call(settings_for(vapi)) as (served, caller):
        await until(lambda: vapi.calls, what="VAPI call created")
        created = vapi.requests_to("/call")[0]
        body = created.json()
        assert created.headers["Authorization"] == f"Bearer {API_KEY}"
        assert body["assistantId"] == "asst-help-desk"
        assert body["transport"]["provider"] == "vapi.websocket"
        assert body["transport"]["audioFormat"] == {
            "format": "pcm_s16le",
            "container": "raw",
            "sampleRate": 16000,
        }
        assert body["metadata"]["engineSessionId"] == caller.stream_sid
        question = caller.speak(to_8k_mulaw(speech("what are your opening hours")))
        await question.finished()
        asked = question.last_loud_sent or time.monotonic()
        await until(
            lambda: caller.first_audio_after(asked) is not None, timeout=10, what="VAPI's reply"
        )
        call = vapi.last_call()
        assert call.audio_in_bytes > 16000 * 2  # over a second of the caller's PCM reached VAPI
        await until(
            lambda: caller.stats()["marks_echoed"] >= 1, timeout=10, what="reply heard to its end"
        )


async def test_barge_in_cuts_vapi_and_its_late_audio_never_plays(vapi: VapiStandin) -> None:
    vapi.control.update(reply_ms=5000, stale_audio=True, stale_ms=600)
    async with phone_call(settings_for(vapi)) as (served, caller):
        question = caller.speak(to_8k_mulaw(speech("what are your opening hours")))
        await question.finished()
        asked = question.last_loud_sent or time.monotonic()
        await until(
            lambda: caller.first_audio_after(asked) is not None, timeout=10, what="VAPI's reply"
        )
        await asyncio.sleep(0.6)
        interruption = caller.speak(to_8k_mulaw(speech("no wait, I want to book an appointment")))
        onset = await interruption.started()
        await until(lambda: caller.clears_received >= 1, timeout=5, what="clear")
        clear_at = caller.clears[0]
        assert clear_at - onset < 0.5
        await interruption.finished()
        speech_end = interruption.last_loud_sent
        assert speech_end is not None
        await asyncio.sleep(0.45)
        # VAPI kept streaming the interrupted reply for 600 ms: none of it may reach the caller
        assert caller.loud_frames_between(clear_at + 0.02, speech_end + 0.45) == 0
        call = next(iter(served.engine.calls.values()))
        await until(
            lambda: call.backend.discarded_chunks > 0 or call.stats.frames_stale > 0,
            timeout=5,
            what="stale VAPI audio discarded",
        )


async def test_vapi_rate_limit_is_retried_and_the_call_goes_on(vapi: VapiStandin) -> None:
    vapi.control.update(fail_429=2, retry_after="0")
    retries: list[object] = []
    async with phone_call(settings_for(vapi), backend=quick_backend(vapi, retries)) as (
        served,
        caller,
    ):
        await until(lambda: vapi.calls, timeout=10, what="call created after two 429s")
        statuses = [r.status for r in vapi.requests_to("/call")]
        assert statuses == [429, 429, 201]
        assert len(retries) == 2
        assert caller.active


@pytest.mark.parametrize("fault", ["unreachable", "dropped"])
async def test_a_vapi_failure_plays_an_apology_and_ends_the_call(
    vapi: VapiStandin, fault: str
) -> None:
    if fault == "unreachable":
        vapi.control.update(fail_500=100)
    else:
        vapi.control.update(drop_after_ms=800)
    async with phone_call(settings_for(vapi), backend=quick_backend(vapi)) as (served, caller):
        started = time.monotonic()
        await until(
            lambda: caller.closed_at is not None, timeout=30, what="the engine ends the call"
        )
        assert caller.closed_by_server
        # the apology was heard before the line closed
        assert caller.loud_frames_between(started, caller.closed_at) > 50
        assert served.engine.metrics.backend_errors >= 1
        await until(lambda: not served.engine.calls, timeout=5, what="call released")
