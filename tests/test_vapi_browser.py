"""A browser caller (an aiortc peer, on the engine's WebRTC path) talking to VAPI (the local
stand-in) through the engine: the reply is heard, an interruption cuts it and its late audio never
plays, a dropped VAPI socket ends in an apology, not silence, and a transfer tells the page that
an agent is on the way."""
from __future__ import annotations

import asyncio

import aiohttp

from bench.webrtc import WebRTCCaller, serve_webrtc
from engine.config import Settings
from tests.speech import speech
from tests.twilio_helpers import until
from tests.vapi_standin import VapiStandin, fire_webhook, server_message, sign_webhook

API_KEY = "sk-test-browser"


def settings_for(vapi: VapiStandin) -> Settings:
    return Settings(backend="vapi", vapi_api_key=API_KEY, vapi_assistant_id="asst-web",
                    vapi_base_url=vapi.base_url)


async def test_a_browser_talks_to_vapi_and_interrupts_it() -> None:
    async with VapiStandin(API_KEY) as vapi:
        vapi.control.update(reply_ms=5000, stale_audio=True, stale_ms=600)
        async with serve_webrtc(settings_for(vapi)) as served, aiohttp.ClientSession() as http:
            caller = WebRTCCaller(served.url, http=http)
            await caller.connect()
            question = caller.speak(speech("what are your opening hours"))
            await question.done.wait()
            end = question.last_voiced_sent
            assert end is not None
            await until(lambda: caller.first_onset_after(end) is not None, 10.0, "VAPI's reply")
            assert vapi.last_call().audio_in_bytes > 16000  # the caller's audio reached VAPI
            await asyncio.sleep(0.6)
            interruption = caller.speak(speech("no wait, I want to book an appointment"))
            await until(lambda: any(e.get("type") == "barge-in" and e.get("step") == "cancelled"
                                    for _, e in caller.events), 5.0, "the reply cancelled")
            cancelled_at = next(t for t, e in caller.events
                                if e.get("type") == "barge-in" and e.get("step") == "cancelled")
            await interruption.done.wait()
            spoken_end = interruption.last_voiced_sent
            assert spoken_end is not None
            await asyncio.sleep(0.45)
            # VAPI kept streaming the interrupted reply: none of it reaches the browser
            assert caller.loud_frames_between(cancelled_at + 100.0, spoken_end + 450.0) == 0
            await caller.hangup()
            await until(lambda: not served.engine.calls, 5.0, "the call released")


async def test_a_dropped_vapi_socket_ends_the_browser_call_with_an_apology() -> None:
    async with VapiStandin(API_KEY) as vapi:
        vapi.control.update(drop_after_ms=800)
        async with serve_webrtc(settings_for(vapi)) as served, aiohttp.ClientSession() as http:
            caller = WebRTCCaller(served.url, http=http)
            await caller.connect()
            await until(lambda: any(e.get("type") == "end" for _, e in caller.events), 20.0,
                        "the engine to end the call")
            assert caller.loud_frames_between(0.0, float("inf")) > 50  # the apology was heard
            await caller.hangup()
            await until(lambda: not served.engine.calls, 5.0, "the call released")


async def test_a_transfer_tool_call_tells_the_browser_an_agent_is_coming() -> None:
    secret = "webhook-secret"
    async with VapiStandin(API_KEY) as vapi:
        settings = settings_for(vapi).with_overrides(vapi_webhook_secret=secret,
                                                     transfer_number="+15550003333")
        async with serve_webrtc(settings) as served, aiohttp.ClientSession() as http:
            caller = WebRTCCaller(served.url, http=http)
            await caller.connect()
            await until(lambda: served.engine.vapi_calls, 10.0, "the VAPI call registered")
            vapi_call_id = next(iter(served.engine.vapi_calls))
            message = server_message(
                "tool-calls", call_id=vapi_call_id,
                toolCallList=[{"id": "tool-1", "type": "function",
                               "function": {"name": "transfer_call", "arguments": {}}}])
            [(status, body)] = await fire_webhook(
                http, served.url + "/vapi/webhook",
                sign_webhook(message, scheme="bearer", secret=secret))
            assert status == 200 and b"Transferring" in body
            await until(lambda: any(e.get("type") == "agent-requested" for _, e in caller.events),
                        15.0, "the agent-requested event (after the hand-off line)")
            handoff = [e for _, e in caller.events if e.get("type") == "transfer"]
            assert handoff[0]["state"] == "connecting" and handoff[-1]["state"] == "connected"
            assert served.engine.metrics.transfers == 1
            await caller.hangup()
