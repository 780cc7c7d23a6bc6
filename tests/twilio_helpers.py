"""Shared pieces of the phone-path tests: a caller on the engine, waiting on conditions."""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Callable

from bench.twilio_caller import Ticker, TwilioCaller
from engine.backends.base import BackendFactory
from engine.config import Settings
from tests.servers import Served, serve_engine


async def until(
    condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Waits (polling every 20 ms) until `condition()` is true; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def phone_call(settings: Settings, backend: BackendFactory | None = None,
                     **caller_options: object) -> AsyncIterator[tuple[Served, TwilioCaller]]:
    """An engine, and one Twilio caller connected to its media stream."""
    async with serve_engine(settings, backend=backend) as served:
        ticker = Ticker()
        caller = TwilioCaller(served.ws_url + "/twilio/stream", ticker, **caller_options)  # type: ignore[arg-type]
        await caller.connect()
        try:
            yield served, caller
        finally:
            if caller.active:
                await caller.hangup()
            await ticker.close()
