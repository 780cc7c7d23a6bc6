"""Escalation to a person: the caller hears a hand-off line and the live Twilio call is
redirected to the human number through Twilio's REST API (a local stand-in)."""

from __future__ import annotations

import time

import aiohttp

from bench.twilio_caller import ACCOUNT_SID, Ticker, TwilioCaller, fetch_stream_parameters
from engine.config import Settings
from tests.servers import serve_engine
from tests.twilio_helpers import until
from tests.twilio_rest_standin import TwilioRestStandin

TOKEN = "twilio-auth-token"
HUMAN = "+15550002222"


async def test_asking_for_a_person_redirects_the_call_to_the_human_number() -> None:
    async with TwilioRestStandin(ACCOUNT_SID, TOKEN, fail_429=1) as rest:
        settings = Settings(
            backend="local",
            twilio_auth_token=TOKEN,
            twilio_api_base=rest.base_url,
            transfer_number=HUMAN,
        )
        async with serve_engine(settings) as served, aiohttp.ClientSession() as http:
            ticker = Ticker()
            call_sid = "CA" + "7" * 32
            params = await fetch_stream_parameters(
                http, served.url + "/twilio/voice", call_sid=call_sid, auth_token=TOKEN
            )
            assert params is not None
            caller = TwilioCaller(
                served.ws_url + "/twilio/stream",
                ticker,
                session=http,
                custom_parameters=params,
                call_sid=call_sid,
            )
            try:
                await caller.connect()
                await until(
                    lambda: caller.stats()["marks_echoed"] >= 1, timeout=15, what="greeting"
                )
                # The demo's keypad shortcut to a person (speech works too, but offline
                # recognition of phone audio is not reliable enough to drive a deterministic test).
                pressed = time.monotonic()
                caller.send_dtmf("0")
                await until(
                    lambda: any(u.status == 200 for u in rest.updates),
                    timeout=20,
                    what="the call redirected",
                )
                ok = [u for u in rest.updates if u.status == 200][0]
                assert ok.call_sid == call_sid
                assert f"<Dial>{HUMAN}</Dial>" in ok.form["Twiml"]
                assert [u.status for u in rest.updates] == [429, 200]  # the 429 was retried
                # the hand-off line was heard before the redirect
                assert caller.first_audio_after(pressed) is not None
                assert served.engine.metrics.transfers == 1
            finally:
                if caller.active:
                    await caller.hangup()
                await ticker.close()
