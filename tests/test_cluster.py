"""Workers sharing Redis (engine/cluster.py): two engines in one process on one real redis-server; a
browser call to VAPI (the stand-in) lives on worker B, VAPI's webhooks land on worker A and still
reach the call, /health on A sees B's call, and a Redis restart mid-call neither stops the call's
audio nor routing once Redis is back."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from itertools import count
from typing import Any

import aiohttp
import pytest

from bench.webrtc import WebRTCCaller, serve_webrtc
from engine.config import Settings
from engine.webhooks import WEBHOOK_STATS_KEY
from tests.redis_server import RedisServer
from tests.servers import serve_engine
from tests.twilio_helpers import until
from tests.vapi_standin import VapiStandin, fire_webhook, server_message, sign_webhook

API_KEY = "sk-test-cluster"
SECRET = "whsec-cluster"
FRAME_MS = 20.0

_stamps = count(int(time.time() * 1000))


@pytest.fixture
def redis() -> Any:
    server = RedisServer.start_new()  # skips with the reason when redis-server is missing
    yield server
    server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def settings_for(vapi: VapiStandin, redis: RedisServer) -> Settings:
    return Settings(backend="vapi", vapi_api_key=API_KEY, vapi_assistant_id="asst-cluster",
                    vapi_base_url=vapi.base_url, redis_url=redis.url,
                    vapi_webhook_secret=SECRET, transfer_number="+15550004444")


async def post(http: aiohttp.ClientSession, url: str, kind: str, call_id: str,
               **fields: Any) -> tuple[int, bytes]:
    # Distinct timestamps: the webhook de-duplicates on call id + type + timestamp.
    message = server_message(kind, call_id=call_id, timestamp_ms=next(_stamps), **fields)
    [answer] = await fire_webhook(http, url + "/vapi/webhook",
                                  sign_webhook(message, scheme="hmac", secret=SECRET))
    return answer


async def health(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/health") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


def vapi_events(caller: WebRTCCaller, status: str) -> list[dict[str, Any]]:
    return [e for _, e in caller.events
            if e.get("type") == "vapi" and e.get("event") == "status-update"
            and e.get("status") == status]


async def test_webhooks_on_one_worker_reach_a_call_held_by_another_across_a_redis_restart(
    redis: RedisServer, http: aiohttp.ClientSession,
) -> None:
    async with VapiStandin(API_KEY) as vapi:
        settings = settings_for(vapi, redis)
        async with serve_webrtc(settings) as b, serve_engine(settings) as a:
            assert a.engine.cluster is not None and b.engine.cluster is not None
            assert a.engine.cluster.worker_id != b.engine.cluster.worker_id
            caller = WebRTCCaller(b.url, http=http)
            await caller.connect()
            await until(lambda: b.engine.vapi_calls, 10.0, "the VAPI call registered on B")
            call_id = next(iter(b.engine.vapi_calls))
            assert call_id not in a.engine.vapi_calls

            # /health on A counts the call B holds
            async def cluster_counts_b() -> bool:
                view = (await health(http, a.url))["cluster"]
                return bool(view["workers"] == 2 and view["activeCalls"] == 1)

            deadline = time.monotonic() + 10.0
            while not await cluster_counts_b():
                assert time.monotonic() < deadline, "A's /health never showed B's call"
                await asyncio.sleep(0.2)
            assert (await health(http, a.url))["activeCalls"] == 0  # A's own count is unchanged

            # a status-update posted to A reaches the call on B, and B's page hears of it
            status, _ = await post(http, a.url, "status-update", call_id, status="in-progress")
            assert status == 200
            await until(lambda: vapi_events(caller, "in-progress"), 5.0, "the status on B's page")
            assert a.app[WEBHOOK_STATS_KEY].forwarded == 1
            assert a.engine.cluster.routed_out == 1 and b.engine.cluster.routed_in == 1

            # Redis restarts mid-call: the call's audio keeps flowing both ways
            frames_before = caller.frames_received
            to_vapi_before = vapi.last_call().audio_in_bytes
            stopped = time.monotonic()
            redis.stop()
            status, _ = await post(http, a.url, "status-update", call_id, status="lost")
            assert status == 200  # answered, so VAPI does not retry; counted as unrouted
            assert a.app[WEBHOOK_STATS_KEY].unrouted == 1
            await asyncio.sleep(1.0)
            redis.start()
            window_ms = (time.monotonic() - stopped) * 1000.0
            received = caller.frames_received - frames_before
            assert received >= 0.5 * window_ms / FRAME_MS, (received, window_ms)
            assert vapi.last_call().audio_in_bytes - to_vapi_before > 16000  # > 0.5 s to VAPI
            assert not vapi_events(caller, "lost")
            assert a.engine.cluster.errors > 0

            # Redis came back empty: B claims its call again and routing works once more
            await until(lambda: b.engine.cluster.connected and b.engine.cluster.subscribed,
                        10.0, "B reconnected")
            owner = None
            deadline = time.monotonic() + 10.0
            while owner != b.engine.cluster.worker_id:
                assert time.monotonic() < deadline, "B never re-claimed its call"
                owner = await a.engine.cluster.owner(call_id)
                await asyncio.sleep(0.1)
            status, body = await post(
                http, a.url, "tool-calls", call_id,
                toolCallList=[{"id": "tool-cluster-1", "type": "function",
                               "function": {"name": "transfer_call", "arguments": {}}}])
            assert status == 200 and b"Transferring" in body and b'"error"' not in body
            await until(lambda: any(e.get("type") == "transfer" for _, e in caller.events),
                        10.0, "the transfer started on B")
            assert b.engine.metrics.transfers == 1 and a.engine.metrics.transfers == 0
            await caller.hangup()
            await until(lambda: not b.engine.calls, 5.0, "the call released")


async def test_a_webhook_for_a_call_no_worker_holds_is_answered_and_counted_unrouted(
    redis: RedisServer, http: aiohttp.ClientSession,
) -> None:
    settings = Settings(backend="echo", redis_url=redis.url, vapi_webhook_secret=SECRET,
                        transfer_number="+15550004444")
    async with serve_engine(settings) as a, serve_engine(settings) as b:
        status, _ = await post(http, a.url, "status-update", "call-nowhere", status="ended")
        assert status == 200
        assert a.app[WEBHOOK_STATS_KEY].unrouted == 1
        assert a.app[WEBHOOK_STATS_KEY].forwarded == 0
        status, body = await post(
            http, a.url, "tool-calls", "call-nowhere",
            toolCallList=[{"id": "tool-nowhere", "type": "function",
                           "function": {"name": "transfer_call", "arguments": {}}}])
        assert status == 200 and b"cannot be transferred" in body
        assert b.engine.cluster is not None and b.engine.cluster.routed_in == 0


async def test_a_stale_claim_to_a_call_that_ended_is_not_delivered(
    redis: RedisServer, http: aiohttp.ClientSession,
) -> None:
    settings = Settings(backend="echo", redis_url=redis.url, vapi_webhook_secret=SECRET)
    async with serve_engine(settings) as a, serve_engine(settings) as b:
        assert b.engine.cluster is not None and a.engine.cluster is not None
        # B claims a call it does not hold (it ended between a heartbeat's snapshot and its write)
        await b.engine.cluster.redis.set("ve:call:call-ended", b.engine.cluster.worker_id)
        await until(lambda: b.engine.cluster.subscribed, 5.0, "B subscribed")
        status, _ = await post(http, a.url, "status-update", "call-ended", status="ended")
        assert status == 200
        await until(lambda: b.engine.cluster.unrouted_in == 1, 5.0, "B told of the message")
        assert b.engine.cluster.routed_in == 0
        assert a.app[WEBHOOK_STATS_KEY].forwarded == 1  # it did reach the worker named


async def test_a_worker_started_while_redis_is_down_joins_the_cluster_when_it_comes_up(
    redis: RedisServer, http: aiohttp.ClientSession,
) -> None:
    redis.stop()
    settings = Settings(backend="echo", redis_url=redis.url)
    async with serve_engine(settings) as a:
        view = (await health(http, a.url))["cluster"]
        assert view["redis"] == "unavailable" and view["workers"] == 0
        redis.start()
        await until(lambda: a.engine.cluster is not None and a.engine.cluster.connected,
                    10.0, "the heartbeat reaching Redis")
        view = (await health(http, a.url))["cluster"]
        assert view["redis"] == "ok" and view["workers"] == 1
        assert view["worker"] == a.engine.cluster.worker_id
