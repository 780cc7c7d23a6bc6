"""The text chat API over real sockets: the local responder, and VAPI's chat API (the stand-in)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from engine import chat
from engine.chat import CHAT_KEY, RetryPolicy, SessionLocks, VapiChat
from engine.config import Settings
from engine.server import ENGINE_KEY, create_app
from engine.sessions import STORE_KEY, RedisStore, SessionStore
from tests.redis_server import RedisServer
from tests.servers import serve_app
from tests.vapi_standin import VapiStandin

TTL = 60.0
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, total_timeout=5.0)


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Served:
    url: str
    app: web.Application
    http: aiohttp.ClientSession

    @property
    def store(self) -> SessionStore:
        return self.app[STORE_KEY]

    async def chat(self, session_id: str, message: str, **extra: Any) -> tuple[int, Any]:
        body = {"sessionId": session_id, "message": message, **extra}
        async with self.http.post(f"{self.url}/chat", json=body) as resp:
            return resp.status, await resp.json()

    async def health(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/health") as resp:
            return dict(await resp.json())


@contextlib.asynccontextmanager
async def serving(
    settings: Settings | None = None, *, clock: FakeClock | None = None
) -> AsyncIterator[Served]:
    """The real app on a free loopback port, with the chat routes."""
    settings = (settings or Settings(backend="echo")).with_overrides(port=0, session_ttl_s=TTL)
    app = create_app(settings)
    chat.setup_routes(app)  # a no-op once create_app does it
    if clock is not None:
        app[STORE_KEY].clock = clock
    backend = app[CHAT_KEY].backend
    if isinstance(backend, VapiChat):
        backend.retry = FAST_RETRY
    async with serve_app(app) as base:
        async with aiohttp.ClientSession() as http:
            yield Served(f"{base}", app, http)


async def read_sse(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    events = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            events.append(orjson.loads(line[6:]))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


# ---------------------------------------------------------------------------------------------
# Local responder
# ---------------------------------------------------------------------------------------------


async def test_a_message_gets_a_reply_a_chat_id_and_its_turn() -> None:
    async with serving() as s:
        status, body = await s.chat("s1", "What are your opening hours?", userId="u1")
    assert status == 200
    assert "Monday to Friday" in body["reply"]
    assert body["sessionId"] == "s1" and body["turn"] == 1
    assert isinstance(body["chatId"], str) and body["chatId"]


async def test_context_carries_across_turns() -> None:
    async with serving() as s:
        _, first = await s.chat("s1", "I want to book an appointment")
        _, second = await s.chat("s1", "tuesday")
        _, elsewhere = await s.chat("s2", "tuesday")
    assert "Which day" in first["reply"]
    assert "booked for tuesday" in second["reply"]
    assert "booked" not in elsewhere["reply"]  # no booking context in another session
    assert first["chatId"] != second["chatId"]


async def test_twenty_concurrent_messages_each_get_their_own_reply() -> None:
    async with serving() as s:
        messages = [f"message {n} about bicycles" for n in range(20)]
        answers = await asyncio.gather(*(s.chat("burst", m) for m in messages))
        session = await s.store.get("burst")
    assert all(status == 200 for status, _ in answers)
    for message, (_, body) in zip(messages, answers, strict=True):
        assert f"I heard: {message}." in body["reply"]
    assert sorted(body["turn"] for _, body in answers) == list(range(1, 21))
    assert len({body["chatId"] for _, body in answers}) == 20
    # The history is the exchanges in the order they were answered, each reply after its message.
    for message, (_, body) in zip(messages, answers, strict=True):
        i = 2 * (body["turn"] - 1)
        assert session.history[i] == {"role": "user", "content": message}
        assert session.history[i + 1] == {"role": "assistant", "content": body["reply"]}


async def test_queued_messages_are_answered_in_arrival_order() -> None:
    async with serving() as s:
        locks = s.app[CHAT_KEY].locks
        tasks = []
        # Hold the session so every message queues, and send each only once the previous one
        # has arrived: the arrival order is then known, and the answers must follow it.
        async with locks.hold("ordered"), asyncio.timeout(10):
            for n in range(20):
                tasks.append(asyncio.create_task(s.chat("ordered", f"message {n} about boats")))
                while locks.waiting("ordered") < n + 2:
                    await asyncio.sleep(0)
        answers = await asyncio.gather(*tasks)
    for n, (status, body) in enumerate(answers):
        assert status == 200
        assert body["turn"] == n + 1
        assert f"I heard: message {n} about boats." in body["reply"]


async def test_session_locks_hand_over_in_arrival_order() -> None:
    locks = SessionLocks()
    order: list[int] = []
    inside = peak = 0

    async def job(n: int) -> None:
        nonlocal inside, peak
        async with locks.hold("s"):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0)  # give a newcomer the chance to overtake
            order.append(n)
            inside -= 1

    await asyncio.gather(*(job(n) for n in range(50)))
    assert order == list(range(50))
    assert peak == 1
    assert len(locks) == 0  # idle sessions leave nothing behind


async def test_a_hundred_sessions_at_once() -> None:
    async with serving() as s:
        firsts = await asyncio.gather(
            *(s.chat(f"user-{i}", "I want to book an appointment") for i in range(100)))
        seconds = await asyncio.gather(*(s.chat(f"user-{i}", "friday") for i in range(100)))
        health = await s.health()
    assert all(status == 200 and body["turn"] == 1 for status, body in firsts)
    assert all(status == 200 and "booked for friday" in body["reply"] for status, body in seconds)
    assert health["activeSessions"] == 100


async def test_expired_session_gets_410_once_then_starts_fresh() -> None:
    clock = FakeClock()
    async with serving(clock=clock) as s:
        await s.chat("s1", "I want to book an appointment")
        clock.advance(TTL * 0.8)
        status, body = await s.chat("s1", "hello")  # activity slides the TTL
        assert status == 200 and body["turn"] == 2
        clock.advance(TTL + 1)
        assert await s.chat("s1", "I want to book an appointment") == (
            410, {"error": "session expired"})
        status, body = await s.chat("s1", "I want to book an appointment")
        assert status == 200 and body["turn"] == 1
        clock.advance(TTL + 1)
        await s.chat("s1", "tuesday")  # the 410
        status, body = await s.chat("s1", "tuesday")
    assert status == 200 and "booked" not in body["reply"]  # the old context is gone


async def test_delete_ends_a_session() -> None:
    async with serving() as s:
        await s.chat("s1", "I want to book an appointment")
        async with s.http.delete(f"{s.url}/session/s1") as resp:
            assert resp.status == 200
            assert await resp.json() == {"deleted": "s1"}
        async with s.http.delete(f"{s.url}/session/s1") as resp:
            assert resp.status == 404
            assert "error" in await resp.json()
        status, body = await s.chat("s1", "tuesday")
    assert status == 200 and body["turn"] == 1 and "booked" not in body["reply"]


async def test_deleting_an_expired_session_is_410() -> None:
    clock = FakeClock()
    async with serving(clock=clock) as s:
        await s.chat("s1", "hello")
        clock.advance(TTL + 1)
        async with s.http.delete(f"{s.url}/session/s1") as resp:
            assert resp.status == 410


async def test_health_counts_live_sessions() -> None:
    clock = FakeClock()
    async with serving(clock=clock) as s:
        assert (await s.health())["activeSessions"] == 0
        for sid in ("a", "b", "c"):
            await s.chat(sid, "hello")
        assert (await s.health())["activeSessions"] == 3
        async with s.http.delete(f"{s.url}/session/b"):
            pass
        assert (await s.health())["activeSessions"] == 2
        clock.advance(TTL + 1)
        assert (await s.health())["activeSessions"] == 0


async def test_chat_runs_on_the_redis_store_and_survives_a_redis_restart() -> None:
    server = RedisServer.start_new()
    clock = FakeClock()
    try:
        settings = Settings(backend="echo", redis_url=server.url)
        async with serving(settings, clock=clock) as s:
            assert isinstance(s.store, RedisStore)
            await s.chat("s1", "I want to book an appointment")
            _, booked = await s.chat("s1", "tuesday")
            assert "booked for tuesday" in booked["reply"]
            assert (await s.health())["activeSessions"] == 1
            clock.advance(TTL + 1)
            assert (await s.chat("s1", "hello"))[0] == 410
            server.stop()
            assert await s.chat("s1", "hello") == (503, {"error": "session store unavailable"})
            server.start()
            status, body = await s.chat("s1", "hello")
            assert status == 200 and body["turn"] == 1
            async with s.http.get(f"{s.url}/metrics") as resp:
                metrics = await resp.text()
        assert "engine_session_store_errors_total 1.0" in metrics
    finally:
        server.close()


async def test_reply_streams_as_server_sent_events() -> None:
    async with serving() as s:
        async with s.http.post(f"{s.url}/chat", json={"sessionId": "s1", "message": "prices?"},
                               headers={"Accept": "text/event-stream"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = await read_sse(resp)
        _, after = await s.chat("s1", "and your hours")
    deltas = [e["delta"] for e in events if e["type"] == "delta"]
    done = events[-1]
    assert [e["type"] for e in events] == ["delta"] * len(deltas) + ["done"]
    assert len(deltas) == len(done["reply"].split()) > 5  # word by word
    assert "".join(deltas) == done["reply"]
    assert "forty dollars" in done["reply"]
    assert done["chatId"] and done["sessionId"] == "s1" and done["turn"] == 1
    assert after["turn"] == 2  # the streamed exchange was recorded


@pytest.mark.parametrize(
    "body, complaint",
    [
        (b"", "empty body"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"message": "hi"}', "sessionId is required"),
        (b'{"sessionId": "s1"}', "message is required"),
        (b'{"sessionId": "  ", "message": "hi"}', "sessionId must not be blank"),
        (b'{"sessionId": "s1", "message": " \\n "}', "message must not be blank"),
        (b'{"sessionId": 7, "message": "hi"}', "sessionId must be a string"),
        (b'{"sessionId": "s1", "message": ["hi"]}', "message must be a string"),
        (b'{"sessionId": "s1", "message": "hi", "userId": 5}', "userId"),
        (b'{"sessionId": "' + b"x" * 300 + b'", "message": "hi"}', "longer than"),
    ],
)
async def test_malformed_requests_are_400(body: bytes, complaint: str) -> None:
    async with serving() as s:
        async with s.http.post(f"{s.url}/chat", data=body,
                               headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            assert complaint in (await resp.json())["error"]
        assert s.store.cached_count == 0


async def test_oversized_body_is_413() -> None:
    async with serving() as s:
        status, body = await s.chat("s1", "a" * (chat.MAX_BODY + 10))
        assert status == 413 and "too large" in body["error"]
        status, _ = await s.chat("s1", "still fine?")
    assert status == 200


async def test_a_session_with_too_many_messages_waiting_gets_429(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chat, "MAX_WAITING", 3)
    async with serving() as s:
        locks = s.app[CHAT_KEY].locks
        async with locks.hold("busy"), asyncio.timeout(10):
            queued = [asyncio.create_task(s.chat("busy", f"message {n}")) for n in range(2)]
            while locks.waiting("busy") < 3:
                await asyncio.sleep(0)
            assert await s.chat("busy", "one too many") == (
                429, {"error": "too many messages waiting in this session"})
            assert (await s.chat("other", "hello"))[0] == 200
        answers = await asyncio.gather(*queued)
    assert [status for status, _ in answers] == [200, 200]


# ---------------------------------------------------------------------------------------------
# VAPI's chat API (the stand-in)
# ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def vapi_serving() -> AsyncIterator[tuple[Served, VapiStandin]]:
    async with VapiStandin(api_key="vapi-key") as vapi:
        settings = Settings(backend="echo", vapi_api_key="vapi-key", vapi_base_url=vapi.base_url,
                            vapi_assistant_id="asst-1")
        async with serving(settings) as s:
            yield s, vapi


async def test_vapi_chats_are_threaded_by_previous_chat_id() -> None:
    async with vapi_serving() as (s, vapi):
        answers = [await s.chat("s1", f"question {n}") for n in (1, 2, 3)]
    sent = [r.json() for r in vapi.requests_to("/chat")]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [a[1]["reply"] for a in answers] == [
        f"You said: question {n} (message {n} of this conversation)" for n in (1, 2, 3)]
    assert "previousChatId" not in sent[0]
    chat_ids = [body["chatId"] for _, body in answers]
    assert [b["previousChatId"] for b in sent[1:]] == chat_ids[:2]
    assert all(b["assistantId"] == "asst-1" and not b.get("stream") for b in sent)
    assert all(r.headers["Authorization"] == "Bearer vapi-key" for r in vapi.requests_to("/chat"))


async def test_vapi_burst_is_sent_one_at_a_time_in_one_thread() -> None:
    async with vapi_serving() as (s, vapi):
        answers = await asyncio.gather(*(s.chat("s1", f"burst {n}") for n in range(10)))
    by_turn = sorted((body["turn"], body) for _, body in answers)
    for turn, body in by_turn:
        assert f"(message {turn} of this conversation)" in body["reply"]
    sent = [r.json() for r in vapi.requests_to("/chat")]
    # Each request continued the chat answered just before it: one unbroken chain.
    chain = [None] + [body["chatId"] for _, body in by_turn[:-1]]
    assert [b.get("previousChatId") for b in sent] == chain


async def test_vapi_reply_streams_its_deltas() -> None:
    async with vapi_serving() as (s, vapi):
        async with s.http.post(f"{s.url}/chat", json={"sessionId": "s1", "message": "first one"},
                               headers={"Accept": "text/event-stream"}) as resp:
            assert resp.status == 200
            events = await read_sse(resp)
        _, after = await s.chat("s1", "second one")
    sent = [r.json() for r in vapi.requests_to("/chat")]
    done = events[-1]
    assert done["type"] == "done"
    assert "".join(e["delta"] for e in events[:-1]) == done["reply"]
    assert done["reply"] == "You said: first one (message 1 of this conversation)"
    assert len(events) > 3 and sent[0]["stream"] is True
    assert done["chatId"] in vapi.chats
    assert sent[1]["previousChatId"] == done["chatId"]
    assert "(message 2 of this conversation)" in after["reply"]


async def test_vapi_rate_limit_is_retried() -> None:
    async with vapi_serving() as (s, vapi):
        vapi.control.fail_429 = 1
        status, body = await s.chat("s1", "hello")
        retries = s.app[ENGINE_KEY].metrics.backend_retries
    assert status == 200 and "message 1" in body["reply"]
    assert [r.status for r in vapi.requests_to("/chat")] == [429, 201]
    assert retries == 1


@pytest.mark.parametrize("fault", ["fail_500", "malformed_json"])
async def test_vapi_failure_is_502_and_the_session_stays_usable(fault: str) -> None:
    async with vapi_serving() as (s, vapi):
        _, first = await s.chat("s1", "one")
        setattr(vapi.control, fault, 10)
        status, body = await s.chat("s1", "two")
        assert status == 502 and "VAPI chat" in body["error"]
        setattr(vapi.control, fault, 0)
        status, third = await s.chat("s1", "three")
        errors = s.app[ENGINE_KEY].metrics.backend_errors
    assert status == 200 and third["turn"] == 2
    assert vapi.requests_to("/chat")[-1].json()["previousChatId"] == first["chatId"]
    assert errors == 1


async def test_vapi_failure_before_a_stream_starts_is_a_plain_502() -> None:
    async with vapi_serving() as (s, vapi):
        vapi.control.fail_500 = 10
        async with s.http.post(f"{s.url}/chat", json={"sessionId": "s1", "message": "hi"},
                               headers={"Accept": "text/event-stream"}) as resp:
            assert resp.status == 502
            assert "error" in await resp.json()


async def test_vapi_rejecting_the_key_is_502_without_retries() -> None:
    async with VapiStandin(api_key="the-real-key") as vapi:
        settings = Settings(backend="echo", vapi_api_key="wrong", vapi_base_url=vapi.base_url,
                            vapi_assistant_id="asst-1")
        async with serving(settings) as s:
            status, body = await s.chat("s1", "hi")
    assert status == 502 and "401" in body["error"]
    assert len(vapi.requests_to("/chat")) == 1


async def test_vapi_stream_breaking_midway_ends_with_an_error_event() -> None:
    # The stand-in has no mid-stream fault: this VAPI sends one delta, then drops the connection.
    bodies: list[dict[str, Any]] = []

    async def vapi_chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        if not body.get("stream"):
            return web.json_response({"id": "chat_ok", "output": [
                {"role": "assistant", "content": "fine now"}]}, status=201)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"id": "chat_cut", "path": "chat.output[0].content", '
                         b'"delta": "Hello "}\n\n')
        assert request.transport is not None
        request.transport.abort()
        return resp

    vapi = web.Application()
    vapi.router.add_post("/chat", vapi_chat)
    async with serve_app(vapi) as base:
        settings = Settings(backend="echo", vapi_api_key="k", vapi_assistant_id="asst-1",
                            vapi_base_url=f"{base}")
        async with serving(settings) as s:
            async with s.http.post(f"{s.url}/chat", json={"sessionId": "s1", "message": "hi"},
                                   headers={"Accept": "text/event-stream"}) as resp:
                assert resp.status == 200
                events = await read_sse(resp)
            status, after = await s.chat("s1", "again")
    assert events[0] == {"type": "delta", "delta": "Hello "}
    assert events[-1]["type"] == "error" and "broke" in events[-1]["error"]
    assert (status, after["reply"], after["turn"]) == (200, "fine now", 1)
    assert "previousChatId" not in bodies[-1]  # the broken exchange left the session as it was
