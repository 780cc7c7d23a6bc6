"""`POST /vapi/webhook`: VAPI's server messages (protocols/vapi.md §2), authenticated,
de-duplicated, answered or forwarded to the live call.

Order of work for each delivery, so a forged or broken one costs little and changes nothing:

1. Read the raw body, at most 1 MiB (413 past that).
2. Authenticate over the raw bytes (401, nothing processed or stored). Accepted, all compared in
   constant time against `VAPI_WEBHOOK_SECRET`:
   - `Authorization: Bearer <secret>`;
   - `X-Vapi-Secret: <secret>` (the legacy header);
   - HMAC-SHA256, hex or base64 (VAPI's credential offers both; an optional `sha256=` prefix is
     accepted), in `x-signature` or `x-vapi-signature`. With `x-timestamp` (milliseconds;
     seconds are recognised too) the signed payload is `"{timestamp}.{body}"` and a timestamp
     more than 5 minutes off is rejected; without it the payload is the body alone;
   - `x-vapi-signature: <secret>`: VAPI's older "secret token" credential sent the secret itself
     in that header.
   No secret configured: every delivery is refused with 401, unless `--insecure-webhooks`.
3. Parse: malformed JSON or no `message.type` → 400.
4. De-duplicate: VAPI retries deliveries it thinks failed. The event key is the tool call ids for
   `tool-calls`, else call id + type + timestamp (else a digest of the body), marked with the
   store's `first_time` for 24 h. A duplicate gets 200 with the answer the first delivery got for
   the message types that wait for one (tool-calls, function-call, assistant-request,
   transfer-destination-request; the answer is kept beside the key), or `{}` when there is none
   (informational types, or the first delivery is still being worked on). If handling fails, the
   key is released so VAPI's retry is processed. If the store is down, messages are processed
   anyway: at least once beats never.
5. Dispatch by type:
   - `tool-calls` (and the legacy `function-call`): the handlers registered in `engine.tools`;
   - `assistant-request`: `{"assistantId"}` from the settings, else an inline assistant built
     from the local assistant file and the registered tools;
   - `transfer-destination-request`: `TRANSFER_NUMBER`, or `{"error"}`;
   - `end-of-call-report`: stored by call id (and under `call.metadata.engineSessionId`);
   - `transcript`, `speech-update`, `status-update`, `user-interrupted`, `conversation-update`,
     `hang`, `transfer-update`: forwarded to the live call registered for that VAPI call id in
     `app[VAPI_CALLS_KEY]` (the VAPI backend fills it), or, when workers share Redis and the
     call is not here, to the worker holding it (engine/cluster.py);
   - anything else: 200 `{}` and a log line.
   Every type is counted in `app[WEBHOOK_STATS_KEY]` and on /metrics.

A `transfer_call` tool result asks the live call for a transfer by sending its sink the engine's
own message `{"type": "transfer-request", "destination": {"type": "number", "number": …},
"toolCallId": …}` (through the cluster link when another worker holds the call); with no live
call to send it to, the tool call fails instead.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from engine.config import Settings
from engine.log import get_logger
from engine.responder import AssistantConfig, Responder, load_assistant
from engine.server import ENGINE_KEY, json_error, json_response, read_capped
from engine.sessions import SessionStore, StoreUnavailable, attach_store
from engine.tools import REGISTRY, ToolContext, ToolOutcome, ToolRegistry

log = get_logger("webhooks")

MAX_BODY = 1024 * 1024
#: how far an `x-timestamp` may be from our clock
MAX_SKEW_S = 300.0
#: types whose answer VAPI waits for; a duplicate delivery gets the same answer
ANSWERING = frozenset({
    "tool-calls", "function-call", "assistant-request", "transfer-destination-request",
})
#: types the live call wants to hear about
FORWARDED = frozenset({
    "transcript", "speech-update", "status-update", "user-interrupted", "conversation-update",
    "hang", "transfer-update",
})


class CallEventSink(Protocol):
    """A live call that wants VAPI's server messages about itself."""

    def on_vapi_message(self, message: dict[str, Any]) -> None:
        """One server message (the `message` object); must not block."""


VAPI_CALLS_KEY = web.AppKey("vapi_calls", dict)  #: dict[str, CallEventSink] by VAPI call id


@dataclass
class WebhookStats:
    """What the webhook saw, for /metrics and tests."""

    by_type: Counter[str] = field(default_factory=Counter)  #: authenticated messages per type
    unauthorized: int = 0
    malformed: int = 0
    too_large: int = 0
    duplicates: int = 0
    forwarded: int = 0  #: handed to a live call
    unrouted: int = 0  #: forwardable, but no live call here for it
    failed: int = 0  #: handling raised (answered 503/500)

    def as_dict(self) -> dict[str, Any]:
        return {
            "byType": dict(self.by_type), "unauthorized": self.unauthorized,
            "malformed": self.malformed, "tooLarge": self.too_large,
            "duplicates": self.duplicates, "forwarded": self.forwarded,
            "unrouted": self.unrouted, "failed": self.failed,
        }


WEBHOOK_STATS_KEY = web.AppKey("vapi_webhook_stats", WebhookStats)


# ---------------------------------------------------------------------------------------------
# Authenticity
# ---------------------------------------------------------------------------------------------


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def _timestamp_s(value: str) -> float | None:
    try:
        ts = float(value.strip())
    except ValueError:
        return None
    if math.isnan(ts) or ts <= 0:
        return None
    # Milliseconds per VAPI; a value this small can only be seconds (before the year 5138).
    return ts / 1000.0 if ts > 1e11 else ts


def authenticate(
    headers: Mapping[str, str], body: bytes, secret: str, now_s: float,
    max_skew_s: float = MAX_SKEW_S,
) -> str | None:
    """None when the headers prove the sender knows `secret`, else why not (for the 401)."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip() and _same(token.strip(), secret):
        return None
    legacy = headers.get("X-Vapi-Secret")
    if legacy is not None and _same(legacy.strip(), secret):
        return None
    problem = "missing signature"
    key = secret.encode()
    for name in ("x-signature", "x-vapi-signature"):
        raw = headers.get(name)
        if raw is None:
            continue
        given = raw.strip()
        if name == "x-vapi-signature" and _same(given, secret):
            return None
        if given[:7].lower() == "sha256=":
            given = given[7:]
        stamp = headers.get("x-timestamp")
        if stamp is not None:
            ts = _timestamp_s(stamp)
            if ts is None:
                problem = "bad timestamp"
                continue
            if abs(now_s - ts) > max_skew_s:
                problem = "stale timestamp"
                continue
            payload = stamp.strip().encode() + b"." + body
        else:
            payload = body
        digest = hmac.new(key, payload, hashlib.sha256).digest()
        # Both encodings VAPI's HMAC credential offers; each comparison in constant time.
        hex_ok = _same(digest.hex(), given.lower())
        b64_ok = _same(base64.b64encode(digest).decode(), given)
        if hex_ok or b64_ok:
            return None
        problem = "bad signature"
    if problem == "missing signature" and (token or legacy is not None):
        problem = "bad secret"
    return problem


# ---------------------------------------------------------------------------------------------
# The assistant VAPI asks for
# ---------------------------------------------------------------------------------------------


def inline_assistant(
    config: AssistantConfig, responder: Responder, settings: Settings,
    registry: ToolRegistry = REGISTRY,
) -> dict[str, Any]:
    """A VAPI assistant that says what the local assistant file says, with the engine's tools."""
    facts = [
        f"- {intent.name}: {intent.answer}" for intent in responder.intents
        if intent.after is None and not intent.hangup and not intent.transfer
        and "{" not in intent.answer
    ]
    prompt = (
        f"You are {config.name}, answering people on the phone. Keep every answer to one or two "
        "short sentences: they are spoken aloud. Only state facts from this list:\n"
        + "\n".join(facts)
        + "\nUse your tools when they fit; if the caller asks for a person, call transfer_call."
    )
    assistant: dict[str, Any] = {
        "name": config.name[:40],  # VAPI limits assistant names to 40 characters
        "firstMessage": config.first_message,
        "model": {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "messages": [{"role": "system", "content": prompt}],
            "tools": registry.definitions(),
        },
    }
    if settings.public_url:
        assistant["server"] = {"url": f"{settings.public_url}/vapi/webhook"}
    return assistant


# ---------------------------------------------------------------------------------------------
# The handler
# ---------------------------------------------------------------------------------------------


def event_key(message: dict[str, Any], body: bytes) -> str:
    """The identity of one event across VAPI's retries."""
    kind = message["type"]
    if kind == "tool-calls":
        ids = [c.get("id") for c in _tool_calls(message)]
        if ids and all(isinstance(i, str) and i for i in ids):
            return "vapi:tool:" + ",".join(str(i) for i in ids)
    call_id = _call_id(message)
    stamp = message.get("timestamp")
    if call_id is not None and isinstance(stamp, (int, float, str)) and stamp != "":
        return f"vapi:{call_id}:{kind}:{stamp}"
    return "vapi:body:" + hashlib.sha256(body).hexdigest()


def _call_id(message: dict[str, Any]) -> str | None:
    call = message.get("call")
    if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"]:
        return str(call["id"])
    return None


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    calls = message.get("toolCallList")
    if isinstance(calls, list):
        return [c for c in calls if isinstance(c, dict)]
    # Older payloads only carry toolWithToolCallList: [{"name", "toolCall": {...}}]
    out = []
    for item in message.get("toolWithToolCallList") or []:
        if isinstance(item, dict) and isinstance(item.get("toolCall"), dict):
            out.append(item["toolCall"])
    return out


class VapiWebhooks:
    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        calls: dict[str, CallEventSink],
        *,
        registry: ToolRegistry = REGISTRY,
        assistant: tuple[AssistantConfig, Responder] | None = None,
        clock: Any = time.time,
        cluster: Any = None,
    ) -> None:
        self.settings = settings
        #: the engine's `ClusterLink` when workers share Redis: calls held elsewhere are
        #: routed there
        self.cluster = cluster
        self.store = store
        self.calls = calls
        self.registry = registry
        self.config, self.responder = assistant or load_assistant(settings.assistant_file)
        self.clock = clock
        self.stats = WebhookStats()

    async def handle(self, request: web.Request) -> web.Response:
        body = await read_capped(request, MAX_BODY)
        if body is None:
            self.stats.too_large += 1
            return json_error(413, f"body too large (limit {MAX_BODY} bytes)")
        problem = self._check(request.headers, body)
        if problem is not None:
            self.stats.unauthorized += 1
            log.warning("webhook.unauthorized", reason=problem, remote=request.remote)
            return json_error(401, problem)
        try:
            payload = orjson.loads(body) if body.strip() else None
        except orjson.JSONDecodeError:
            payload = None
            problem = "body is not valid JSON"
        message = payload.get("message") if isinstance(payload, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str) \
                or not message["type"]:
            self.stats.malformed += 1
            return json_error(400, problem or "missing message.type")
        kind: str = message["type"]
        self.stats.by_type[kind] += 1

        key = event_key(message, body)
        try:
            fresh = await self.store.first_time(key)
        except StoreUnavailable:
            fresh = True  # processed without de-duplication; see the module docstring
        if not fresh:
            self.stats.duplicates += 1
            log.info("webhook.duplicate", type=kind, key=key)
            cached = None
            if kind in ANSWERING:
                try:
                    cached = await self.store.recall(key)
                except StoreUnavailable:
                    pass
            return json_response(cached or {})

        try:
            answer = await self.dispatch(kind, message)
        except StoreUnavailable:
            await self._release(key)
            self.stats.failed += 1
            return json_error(503, "session store unavailable")
        except Exception:
            await self._release(key)
            self.stats.failed += 1
            log.exception("webhook.failed", type=kind)
            return json_error(500, "internal error")
        if kind in ANSWERING:
            try:
                await self.store.remember(key, answer)
            except StoreUnavailable:
                pass
        return json_response(answer)

    def _check(self, headers: Mapping[str, str], body: bytes) -> str | None:
        secret = self.settings.vapi_webhook_secret
        if not secret:
            return None if self.settings.insecure_webhooks else "webhook secret not configured"
        return authenticate(headers, body, secret, self.clock())

    async def _release(self, key: str) -> None:
        try:
            await self.store.release(key)
        except StoreUnavailable:
            pass

    async def dispatch(self, kind: str, message: dict[str, Any]) -> dict[str, Any]:
        if kind == "tool-calls":
            return await self._tool_calls(message)
        if kind == "function-call":
            return await self._function_call(message)
        if kind == "assistant-request":
            if self.settings.vapi_assistant_id:
                return {"assistantId": self.settings.vapi_assistant_id}
            return {"assistant": inline_assistant(
                self.config, self.responder, self.settings, self.registry)}
        if kind == "transfer-destination-request":
            if not self.settings.transfer_number:
                return {"error": "no transfer destination is configured"}
            return {
                "destination": {"type": "number", "number": self.settings.transfer_number},
                "message": {"type": "request-start", "message": self.config.handoff},
            }
        if kind == "end-of-call-report":
            await self._end_of_call(message)
            return {}
        if kind in FORWARDED:
            await self._forward(message)
            return {}
        log.info("webhook.ignored", type=kind)
        return {}

    def _context(self, message: dict[str, Any], tool_call_id: str | None) -> ToolContext:
        return ToolContext(self.settings, _call_id(message), tool_call_id)

    async def _tool_calls(self, message: dict[str, Any]) -> dict[str, Any]:
        jobs = []
        for call in _tool_calls(message):
            fn = call.get("function")
            fn = fn if isinstance(fn, dict) else {}
            call_id = call.get("id")
            call_id = call_id if isinstance(call_id, str) else ""
            name = fn.get("name")
            name = name if isinstance(name, str) else ""
            jobs.append(self.registry.call(
                name, fn.get("arguments"), self._context(message, call_id), call_id))
        outcomes = await asyncio.gather(*jobs)
        results = [(await self._after(message, outcome)).as_vapi() for outcome in outcomes]
        return {"results": results}

    async def _function_call(self, message: dict[str, Any]) -> dict[str, Any]:
        fn = message.get("functionCall")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return {"error": "functionCall.name missing"}
        outcome = await self.registry.call(
            fn["name"], fn.get("parameters"), self._context(message, None))
        outcome = await self._after(message, outcome)
        return {"error": outcome.error} if outcome.error is not None else {"result": outcome.result}

    async def _after(self, message: dict[str, Any], outcome: ToolOutcome) -> ToolOutcome:
        """Carries out what a tool asked of the live call (a transfer)."""
        if outcome.transfer_to is None or outcome.error is not None:
            return outcome
        call_id = _call_id(message)
        sink = self.calls.get(call_id) if call_id is not None else None
        request = {
            "type": "transfer-request",
            "destination": {"type": "number", "number": outcome.transfer_to},
            "toolCallId": outcome.tool_call_id,
            "call": message.get("call"),
        }
        if sink is None:
            # the call may live on another worker sharing Redis
            if call_id is not None and self.cluster is not None \
                    and await self.cluster.route(call_id, request):
                self.stats.forwarded += 1
                return outcome
            log.warning("webhook.transfer_without_call", call_id=call_id)
            return ToolOutcome(outcome.tool_call_id, outcome.name,
                               error="this call cannot be transferred from here")
        self._deliver(sink, request)
        return outcome

    async def _end_of_call(self, message: dict[str, Any]) -> None:
        call_id = _call_id(message)
        if call_id is None:
            log.warning("webhook.report_without_call")
            return
        call = message.get("call")
        metadata = call.get("metadata") if isinstance(call, dict) else None
        metadata = metadata if isinstance(metadata, dict) else {}
        session_id = metadata.get("engineSessionId")
        await self.store.save_report(
            call_id, message, session_id if isinstance(session_id, str) and session_id else None)
        log.info("webhook.end_of_call", call_id=call_id, session=session_id,
                 reason=message.get("endedReason"))

    async def _forward(self, message: dict[str, Any]) -> None:
        call_id = _call_id(message)
        sink = self.calls.get(call_id) if call_id is not None else None
        if sink is None:
            # the call may live on another worker sharing Redis; Redis down counts as unrouted
            if call_id is not None and self.cluster is not None \
                    and await self.cluster.route(call_id, message):
                self.stats.forwarded += 1
                return
            self.stats.unrouted += 1
            return
        self._deliver(sink, message)

    def _deliver(self, sink: CallEventSink, message: dict[str, Any]) -> None:
        try:
            sink.on_vapi_message(message)
            self.stats.forwarded += 1
        except Exception:
            # The call's trouble, not VAPI's: still answer 200 so VAPI does not retry.
            log.exception("webhook.sink_failed", type=message.get("type"))


class WebhookCollector(Collector):
    def __init__(self, stats: WebhookStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        messages = CounterMetricFamily(
            "engine_vapi_messages", "VAPI server messages accepted, by type", labels=["type"])
        for kind, n in sorted(self.stats.by_type.items()):
            messages.add_metric([kind], n)
        yield messages
        rejected = CounterMetricFamily(
            "engine_vapi_messages_rejected", "VAPI server messages refused, by reason",
            labels=["reason"])
        rejected.add_metric(["unauthorized"], self.stats.unauthorized)
        rejected.add_metric(["malformed"], self.stats.malformed)
        rejected.add_metric(["too_large"], self.stats.too_large)
        yield rejected
        yield CounterMetricFamily(
            "engine_vapi_messages_duplicate", "VAPI deliveries seen before",
            value=self.stats.duplicates)

    def describe(self) -> list[object]:
        return []


WEBHOOKS_KEY = web.AppKey("vapi_webhooks", VapiWebhooks)


def setup_routes(app: web.Application) -> None:
    """Adds `POST /vapi/webhook`, the live-call registry `app[VAPI_CALLS_KEY]` and the stats."""
    if WEBHOOKS_KEY in app:
        return  # already set up (create_app does it; tests may call it again)
    engine = app[ENGINE_KEY]
    settings = engine.settings
    store = attach_store(app, settings)
    if VAPI_CALLS_KEY not in app:
        app[VAPI_CALLS_KEY] = {}
    assistant = None
    if isinstance(getattr(engine, "responder", None), Responder):
        assistant = (engine.assistant, engine.responder)  # loaded once per process
    webhooks = VapiWebhooks(settings, store, app[VAPI_CALLS_KEY], assistant=assistant,
                            cluster=getattr(engine, "cluster", None))
    app[WEBHOOKS_KEY] = webhooks
    app[WEBHOOK_STATS_KEY] = webhooks.stats
    engine.metrics.registry.register(WebhookCollector(webhooks.stats))
    if not settings.vapi_webhook_secret:
        if settings.insecure_webhooks:
            log.warning("webhook.insecure",
                        detail="VAPI_WEBHOOK_SECRET unset: accepting any sender")
        else:
            log.warning("webhook.no_secret",
                        detail="VAPI_WEBHOOK_SECRET unset: every /vapi/webhook delivery gets 401")
    app.router.add_post("/vapi/webhook", webhooks.handle)
