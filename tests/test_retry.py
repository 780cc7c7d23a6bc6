"""The retry helper against a scripted HTTP server on loopback; sleeps are recorded, not waited."""
from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engine.retry import RetryError, request_with_retry
from tests.servers import serve_app


@dataclass
class Script:
    """Answers in order: (status, headers) tuples, "drop" (close the connection unanswered) or
    ("slow", seconds) (answer 200 that late). After the list runs out, `then` forever."""

    steps: list[Any]
    then: Any = (200, {})
    hits: int = 0

    def next(self) -> Any:
        self.hits += 1
        return self.steps.pop(0) if self.steps else self.then


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.StreamResponse:
        step = script.next()
        if step == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        if isinstance(step, tuple) and step[0] == "slow":
            import asyncio

            await asyncio.sleep(step[1])
            return web.Response(status=200, text="late")
        status, headers = step
        return web.Response(status=status, headers=headers, text=f"answer {script.hits}")

    app = web.Application()
    app.router.add_route("*", "/x", handle)
    async with serve_app(app, shutdown_timeout=0.5) as base:
        yield f"{base}/x"


@dataclass
class FakeTime:
    """A clock that only moves when the helper sleeps; the sleeps are recorded."""

    now: float = 1000.0
    delays: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.now += delay


async def call(url: str, t: FakeTime, method: str = "POST", **kwargs: Any) -> Any:
    async with aiohttp.ClientSession() as http:
        return await request_with_retry(http, method, url, sleep=t.sleep, clock=t.clock,
                                        json={"n": 1}, **kwargs)


@pytest.mark.parametrize(("draw", "expected"), [(1.0, [1.0, 2.0, 4.0]), (0.0, [0.5, 1.0, 2.0])])
async def test_backoff_doubles_from_one_second_with_equal_jitter(draw: float,
                                                                 expected: list[float]) -> None:
    script = Script([(500, {}), (502, {}), (504, {})])
    t = FakeTime()
    async with scripted(script) as url:
        result = await call(url, t, rng=lambda: draw)
    assert result.status == 200 and result.attempts == 4
    assert t.delays == expected


async def test_jittered_delays_stay_between_half_and_full_nominal() -> None:
    script = Script([(503, {})] * 3)
    t = FakeTime()
    async with scripted(script) as url:
        await call(url, t, rng=random.Random(7).random)
    for delay, nominal in zip(t.delays, [1.0, 2.0, 4.0], strict=True):
        assert nominal / 2 <= delay <= nominal


async def test_backoff_is_capped_by_max_delay() -> None:
    script = Script([(500, {})] * 4)
    t = FakeTime()
    async with scripted(script) as url:
        await call(url, t, attempts=5, max_delay=3.0, rng=lambda: 1.0)
    assert t.delays == [1.0, 2.0, 3.0, 3.0]


async def test_retry_after_seconds_is_honoured_on_429() -> None:
    script = Script([(429, {"Retry-After": "3"})])
    t = FakeTime()
    async with scripted(script) as url:
        result = await call(url, t, rng=lambda: 0.0)
    assert result.status == 200
    assert t.delays == [3.0]


async def test_retry_after_http_date_is_honoured_on_503() -> None:
    wall = 1_700_000_000.0
    script = Script([(503, {"Retry-After": formatdate(wall + 6, usegmt=True)})])
    t = FakeTime()
    async with scripted(script) as url:
        await call(url, t, wall_clock=lambda: wall)
    assert t.delays == [6.0]


async def test_retry_after_is_capped_by_max_delay() -> None:
    script = Script([(429, {"Retry-After": "30"})])
    t = FakeTime()
    async with scripted(script) as url:
        await call(url, t, max_delay=8.0)
    assert t.delays == [8.0]


async def test_retry_after_on_a_500_is_not_an_instruction() -> None:
    script = Script([(500, {"Retry-After": "5"})])
    t = FakeTime()
    async with scripted(script) as url:
        await call(url, t, rng=lambda: 1.0)
    assert t.delays == [1.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_other_client_errors_are_answered_without_retry(status: int) -> None:
    script = Script([(status, {})])
    t = FakeTime()
    async with scripted(script) as url:
        result = await call(url, t)
    assert result.status == status and result.attempts == 1
    assert script.hits == 1 and t.delays == []
    assert result.body == b"answer 1"


async def test_gives_up_after_the_attempts_with_the_last_status_and_counts_retries() -> None:
    script = Script([], then=(500, {}))
    t = FakeTime()
    retries: list[tuple[int, float, str]] = []
    async with scripted(script) as url:
        with pytest.raises(RetryError) as caught:
            await call(url, t, on_retry=lambda a, d, r: retries.append((a, d, r)))
    err = caught.value
    assert err.status == 500 and err.attempts == 4 and script.hits == 4
    assert "answer 4" in str(err) and "HTTP 500" in str(err)
    assert [a for a, _, _ in retries] == [1, 2, 3]


async def test_total_time_is_bounded_sleeps_included() -> None:
    script = Script([], then=(503, {}))
    t = FakeTime()
    async with scripted(script) as url:
        with pytest.raises(RetryError) as caught:
            await call(url, t, attempts=20, total_timeout=5.0, rng=lambda: 1.0)
    # 1 s and 2 s fit in the 5 s budget; a 4 s sleep would end past it, so no third retry
    assert t.delays == [1.0, 2.0]
    assert caught.value.attempts == 3 and "time budget" in str(caught.value)


async def test_retry_after_longer_than_the_budget_gives_up_at_once() -> None:
    script = Script([], then=(429, {"Retry-After": "8"}))
    t = FakeTime()
    async with scripted(script) as url:
        with pytest.raises(RetryError):
            await call(url, t, total_timeout=3.0)
    assert t.delays == [] and script.hits == 1


async def test_connection_errors_are_retried_then_reported() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = FakeTime()
    with pytest.raises(RetryError) as caught:
        await call(f"http://127.0.0.1:{port}/x", t, rng=lambda: 1.0)
    assert caught.value.status is None and caught.value.attempts == 4
    assert "ClientConnectorError" in str(caught.value)
    assert t.delays == [1.0, 2.0, 4.0]


async def test_a_dropped_connection_is_retried() -> None:
    # POST: aiohttp itself silently re-sends an idempotent request once on a dropped connection
    script = Script(["drop"])
    t = FakeTime()
    async with scripted(script) as url:
        result = await call(url, t)
    assert result.status == 200 and result.attempts == 2 and len(t.delays) == 1


async def test_an_attempt_that_times_out_is_retried() -> None:
    script = Script([("slow", 0.3)])
    t = FakeTime()
    async with scripted(script) as url:
        result = await call(url, t, attempt_timeout=0.1)
    assert result.status == 200 and result.attempts == 2 and result.body == b"answer 2"
