"""One clock for every outgoing stream in the process.

Each transport that has audio to play registers with the pacer; a single task ticks on the
monotonic clock (deadlines advance by whole periods, so the tick never drifts the way
`sleep(period)` in a loop does) and asks each registered stream to top up its caller's buffer.
No task per call, no timer per frame.
"""
from __future__ import annotations

import asyncio
import time
from typing import Protocol

from engine.log import get_logger

log = get_logger("pacing")


class Paced(Protocol):
    def pump(self, now: float) -> bool:
        """Send what is due at `now` (monotonic ms); False once there is nothing left to pace."""


class Pacer:
    def __init__(self, period_ms: float = 20.0) -> None:
        self.period_ms = period_ms
        self._streams: set[Paced] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.ticks = 0
        self.late_ticks = 0

    def register(self, stream: Paced) -> None:
        self._streams.add(stream)
        if not self._wake.is_set():
            self._wake.set()

    def unregister(self, stream: Paced) -> None:
        self._streams.discard(stream)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pacer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        period = self.period_ms / 1000.0
        loop = asyncio.get_running_loop()
        while True:
            if not self._streams:
                self._wake.clear()
                await self._wake.wait()
            deadline = loop.time()
            while self._streams:
                now = time.monotonic() * 1000.0
                for stream in list(self._streams):
                    try:
                        if not stream.pump(now):
                            self._streams.discard(stream)
                    except Exception:
                        log.exception("pacer.pump_failed")
                        self._streams.discard(stream)
                self.ticks += 1
                deadline += period
                delay = deadline - loop.time()
                if delay < 0:
                    # Fell behind (a busy loop): skip the missed ticks rather than bursting.
                    self.late_ticks += 1
                    missed = int(-delay // period) + 1
                    deadline += missed * period
                    delay = deadline - loop.time()
                await asyncio.sleep(delay)
