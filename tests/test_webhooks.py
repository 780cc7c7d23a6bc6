"""VAPI server messages at `POST /vapi/webhook`, over a real socket, signed by the stand-in's helper
the way VAPI signs them (and mis-signed the ways a forger or a broken proxy would)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from engine import webhooks
from engine.config import Settings
from engine.server import create_app
from engine.sessions import STORE_KEY, SessionStore
from engine.tools import OPENING_HOURS
from engine.webhooks import VAPI_CALLS_KEY, WEBHOOK_STATS_KEY, WebhookStats, authenticate
from tests.servers import serve_app
from tests.vapi_standin import (
    STALE_AGE_S,
    Scheme,
    SignedWebhook,
    fire_webhook,
    hmac_sha256,
    server_message,
    sign_webhook,
)

SECRET = "whsec-test-secret"
SCHEMES: tuple[Scheme, ...] = ("bearer", "x-vapi-secret", "hmac", "hmac-timestamp")


class RecordingCall:
    """A live call as the VAPI backend registers it: it keeps what it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def on_vapi_message(self, message: dict[str, Any]) -> None:
        self.messages.append(message)


@dataclass
class Served:
    url: str
    app: web.Application
    http: aiohttp.ClientSession

    @property
    def stats(self) -> WebhookStats:
        return self.app[WEBHOOK_STATS_KEY]

    @property
    def store(self) -> SessionStore:
        return self.app[STORE_KEY]

    def register_call(self, call_id: str) -> RecordingCall:
        call = RecordingCall()
        self.app[VAPI_CALLS_KEY][call_id] = call
        return call

    async def fire(self, signed: SignedWebhook, times: int = 1) -> list[tuple[int, Any]]:
        answers = await fire_webhook(self.http, f"{self.url}/vapi/webhook", signed, times=times)
        return [(status, orjson.loads(body) if body else None) for status, body in answers]

    async def send(
        self, message: dict[str, Any], scheme: Scheme = "hmac-timestamp"
    ) -> tuple[int, Any]:
        return (await self.fire(sign_webhook(message, scheme=scheme, secret=SECRET)))[0]


@contextlib.asynccontextmanager
async def serving(**overrides: Any) -> AsyncIterator[Served]:
    # dataclasses.replace, not with_overrides: a test may set a field to None on purpose.
    settings = replace(Settings(backend="echo", vapi_webhook_secret=SECRET, port=0), **overrides)
    app = create_app(settings)
    webhooks.setup_routes(app)  # a no-op once create_app does it
    async with serve_app(app) as base:
        async with aiohttp.ClientSession() as http:
            yield Served(f"{base}", app, http)


def tool_calls(*calls: tuple[str, str, Any], call_id: str = "call-1") -> dict[str, Any]:
    return server_message("tool-calls", call_id=call_id, toolCallList=[
        {"id": tid, "type": "function", "function": {"name": name, "arguments": args}}
        for tid, name, args in calls
    ])


# ---------------------------------------------------------------------------------------------
# Authenticity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_each_auth_scheme_is_accepted(scheme: Scheme) -> None:
    async with serving() as s:
        call = s.register_call("call-1")
        status, body = await s.send(server_message("status-update", call_id="call-1",
                                                   status="in-progress"), scheme)
        assert (status, body) == (200, {})
        assert s.stats.by_type == {"status-update": 1}
    assert [m["type"] for m in call.messages] == ["status-update"]


@pytest.mark.parametrize(
    "options",
    [{"signature_header": "x-vapi-signature"}, {"encoding": "base64"}, {"prefix": "sha256="},
     {"encoding": "base64", "prefix": "sha256=", "signature_header": "x-vapi-signature"}],
)
async def test_hmac_header_encoding_and_prefix_variants_are_accepted(
    options: dict[str, Any],
) -> None:
    message = server_message("status-update", status="in-progress")
    async with serving() as s:
        for scheme in ("hmac", "hmac-timestamp"):
            signed = sign_webhook(message, scheme=scheme, secret=SECRET, **options)  # type: ignore[arg-type]
            bad = sign_webhook(message, scheme=scheme, secret=SECRET, variant="bad",  # type: ignore[arg-type]
                               **options)  # type: ignore[arg-type]
            assert [a[0] for a in await s.fire(signed)] == [200]
            assert [a[0] for a in await s.fire(bad)] == [401]


async def test_the_legacy_secret_token_in_x_vapi_signature_is_accepted() -> None:
    async with serving() as s:
        body = orjson.dumps(server_message("hang"))
        legacy = SignedWebhook(body, {"Content-Type": "application/json",
                                      "x-vapi-signature": SECRET}, "legacy", "valid")
        wrong = SignedWebhook(body, {"Content-Type": "application/json",
                                     "x-vapi-signature": SECRET + "x"}, "legacy", "bad")
        assert [a[0] for a in await s.fire(legacy)] == [200]
        assert [a[0] for a in await s.fire(wrong)] == [401]


@pytest.mark.parametrize(
    "scheme, variant",
    [(scheme, "bad") for scheme in SCHEMES]
    + [(scheme, "missing") for scheme in SCHEMES]
    + [("hmac", "tampered"), ("hmac-timestamp", "tampered"), ("hmac-timestamp", "stale")],
)
async def test_bad_missing_tampered_and_stale_signatures_are_401_and_change_nothing(
    scheme: str, variant: str
) -> None:
    report = server_message("end-of-call-report", call_id="call-9", endedReason="hangup",
                            call={"id": "call-9", "metadata": {"engineSessionId": "s1"}})
    async with serving() as s:
        answers = await s.fire(sign_webhook(report, scheme=scheme, secret=SECRET,  # type: ignore[arg-type]
                                            variant=variant))  # type: ignore[arg-type]
        assert answers[0][0] == 401 and "error" in answers[0][1]
        assert s.stats.by_type == {} and s.stats.unauthorized == 1
        assert await s.store.get_report("call-9") is None
        # Nothing was marked either: the genuine delivery is processed, not taken for a replay.
        assert (await s.send(report))[0] == 200
        assert await s.store.get_report("call-9") is not None
        assert s.stats.duplicates == 0


async def test_stale_timestamp_is_named_in_the_401() -> None:
    async with serving() as s:
        signed = sign_webhook(server_message("hang"), scheme="hmac-timestamp", secret=SECRET,
                              variant="stale")
        assert await s.fire(signed) == [(401, {"error": "stale timestamp"})]


def test_timestamps_within_five_minutes_are_fresh_either_side() -> None:
    body = b'{"message": {"type": "hang"}}'
    now = time.time()
    for offset, ok in ((-290, True), (290, True), (-310, False), (310, False)):
        stamp = str(int((now + offset) * 1000))
        signature = hmac_sha256(SECRET, f"{stamp}.".encode() + body)
        headers = {"x-timestamp": stamp, "x-signature": signature}
        assert (authenticate(headers, body, SECRET, now) is None) is ok, offset
    assert STALE_AGE_S > 300  # the stand-in's "stale" is stale for us too


async def test_without_a_secret_every_delivery_is_refused() -> None:
    async with serving(vapi_webhook_secret=None) as s:
        answers = await s.fire(sign_webhook(server_message("hang"), scheme="bearer", secret=""))
        assert answers[0][0] == 401
        assert s.stats.by_type == {}


async def test_insecure_mode_accepts_unsigned_deliveries() -> None:
    async with serving(vapi_webhook_secret=None, insecure_webhooks=True) as s:
        unsigned = SignedWebhook(orjson.dumps(server_message("hang")),
                                 {"Content-Type": "application/json"}, "none", "valid")
        assert await s.fire(unsigned) == [(200, {})]


# ---------------------------------------------------------------------------------------------
# Idempotency
# ---------------------------------------------------------------------------------------------


async def test_a_replayed_delivery_is_processed_once() -> None:
    message = server_message("transcript", call_id="call-1", role="user",
                             transcriptType="final", transcript="what are your hours")
    async with serving() as s:
        call = s.register_call("call-1")
        signed = sign_webhook(message, scheme="hmac", secret=SECRET)
        assert await s.fire(signed, times=3) == [(200, {})] * 3
        assert s.stats.duplicates == 2
    assert len(call.messages) == 1


async def test_a_replayed_tool_call_gets_the_same_answer() -> None:
    async with serving() as s:
        signed = sign_webhook(tool_calls(("tc-1", "check_availability", {"day": "saturday"})),
                              scheme="hmac-timestamp", secret=SECRET)
        (s1, first), (s2, second) = await s.fire(signed, times=2)
        assert s.stats.duplicates == 1
    assert s1 == s2 == 200
    assert first == second == {"results": [{
        "toolCallId": "tc-1", "name": "check_availability",
        "result": "We are open on Saturday from 10:00 to 14:00."}]}


async def test_same_type_with_another_timestamp_is_a_new_event() -> None:
    async with serving() as s:
        call = s.register_call("call-1")
        for ts in (1000, 2000):
            await s.send(server_message("speech-update", call_id="call-1", timestamp_ms=ts,
                                        role="user", status="started"))
    assert len(call.messages) == 2


# ---------------------------------------------------------------------------------------------
# Messages that wait for an answer
# ---------------------------------------------------------------------------------------------


async def test_tool_calls_round_trip_through_the_registry() -> None:
    async with serving() as s:
        status, body = await s.send(tool_calls(
            ("tc-1", "check_availability", {"day": "Tuesday"}),
            ("tc-2", "check_availability", '{"day": "sun"}'),  # arguments as a JSON string
            ("tc-3", "check_availability", {"day": "someday"}),
            ("tc-4", "no_such_tool", {}),
        ))
    assert status == 200
    assert body["results"] == [
        {"toolCallId": "tc-1", "name": "check_availability",
         "result": "We are open on Tuesday from 9:00 to 18:00."},
        {"toolCallId": "tc-2", "name": "check_availability", "result": "We are closed on Sunday."},
        {"toolCallId": "tc-3", "name": "check_availability", "error": "unknown day: someday"},
        {"toolCallId": "tc-4", "name": "no_such_tool", "error": "unknown tool: no_such_tool"},
    ]
    assert OPENING_HOURS["sunday"] is None


async def test_transfer_tool_asks_the_live_call_to_transfer() -> None:
    async with serving(transfer_number="+15550100") as s:
        call = s.register_call("call-1")
        _, body = await s.send(tool_calls(("tc-1", "transfer_call", {})))
        _, elsewhere = await s.send(tool_calls(("tc-2", "transfer_call", {}), call_id="call-2"))
    assert "result" in body["results"][0]
    assert next(m for m in call.messages if m["type"] == "transfer-request")["destination"] == {
        "type": "number", "number": "+15550100"}
    assert "error" in elsewhere["results"][0]  # no live call here to transfer


async def test_transfer_tool_without_a_number_fails_politely() -> None:
    async with serving() as s:
        call = s.register_call("call-1")
        _, body = await s.send(tool_calls(("tc-1", "transfer_call", {})))
    assert "error" in body["results"][0] and call.messages == []


async def test_assistant_request_names_the_configured_assistant() -> None:
    async with serving(vapi_assistant_id="asst-42") as s:
        answer = await s.send(server_message("assistant-request"))
    assert answer == (200, {"assistantId": "asst-42"})


async def test_assistant_request_without_an_id_gets_the_local_assistant_inline() -> None:
    async with serving(public_url="https://engine.example") as s:
        status, body = await s.send(server_message("assistant-request"))
    assistant = body["assistant"]
    assert status == 200
    assert assistant["firstMessage"] == "Hello! How can I help you today?"
    assert "Monday to Friday" in assistant["model"]["messages"][0]["content"]
    names = {t["function"]["name"] for t in assistant["model"]["tools"]}
    assert {"check_availability", "transfer_call"} <= names
    assert assistant["server"] == {"url": "https://engine.example/vapi/webhook"}


async def test_transfer_destination_request_answers_the_configured_number() -> None:
    async with serving(transfer_number="+15550100") as s:
        status, body = await s.send(server_message("transfer-destination-request"))
    assert status == 200
    assert body["destination"] == {"type": "number", "number": "+15550100"}
    assert body["message"]["type"] == "request-start"


async def test_transfer_destination_request_without_a_number_is_an_error_answer() -> None:
    async with serving() as s:
        status, body = await s.send(server_message("transfer-destination-request"))
    assert status == 200 and "error" in body


# ---------------------------------------------------------------------------------------------
# Informational messages
# ---------------------------------------------------------------------------------------------


async def test_end_of_call_report_is_stored_with_its_call_and_session() -> None:
    message = server_message("end-of-call-report", endedReason="customer-ended-call",
                             summary="Asked about opening hours.",
                             call={"id": "call-7", "metadata": {"engineSessionId": "s1"}})
    async with serving() as s:
        assert await s.send(message) == (200, {})
        stored = await s.store.get_report("call-7")
        by_session = await s.store.reports("s1")
    assert stored is not None and stored["summary"] == "Asked about opening hours."
    assert by_session == [stored]


@pytest.mark.parametrize("kind", sorted(webhooks.FORWARDED))
async def test_call_events_are_forwarded_to_the_live_call(kind: str) -> None:
    async with serving() as s:
        call = s.register_call("call-1")
        assert await s.send(server_message(kind, call_id="call-1")) == (200, {})
        assert await s.send(server_message(kind, call_id="call-elsewhere")) == (200, {})
        assert s.stats.forwarded == 1 and s.stats.unrouted == 1
    assert [m["type"] for m in call.messages] == [kind]


async def test_unknown_type_is_200_and_counted() -> None:
    async with serving() as s:
        assert await s.send(server_message("assistant.started")) == (200, {})
        assert await s.send(server_message("something-new")) == (200, {})
        assert s.stats.by_type == {"assistant.started": 1, "something-new": 1}
        async with s.http.get(f"{s.url}/metrics") as resp:
            text = await resp.text()
    assert 'engine_vapi_messages_total{type="something-new"} 1.0' in text


@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b"[1]", b'{"type": "hang"}', b'{"message": {"call": {}}}',
     b'{"message": {"type": 7}}', b'{"message": "hang"}'],
)
async def test_malformed_messages_are_400(body: bytes) -> None:
    async with serving() as s:
        answers = await s.fire(sign_webhook(body, scheme="hmac", secret=SECRET))
        assert answers[0][0] == 400 and "error" in answers[0][1]
        assert s.stats.malformed == 1 and s.stats.by_type == {}


async def test_oversized_body_is_413() -> None:
    message = server_message("conversation-update", padding="x" * (webhooks.MAX_BODY + 1))
    async with serving() as s:
        answers = await s.fire(sign_webhook(message, scheme="hmac", secret=SECRET))
        assert answers[0][0] == 413
        assert s.stats.too_large == 1 and s.stats.by_type == {}
