"""The engine's process-wide state: settings, live calls, the session store, metrics, shared timers.

Routes (server.py) reach everything through one `Engine`; nothing here parses a wire format.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from engine.config import Settings
from engine.log import get_logger
from engine.metrics import Metrics

log = get_logger("runtime")


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.calls: dict[str, Any] = {}
        self.loop_lag_ms = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.active_sessions = lambda: len(self.calls)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "activeSessions": self.metrics.active_sessions(),
            "activeCalls": self.metrics.active_calls,
            "uptime": round(self.uptime, 3),
        }

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._watch_loop_lag(), name="loop-lag"))
        log.info("engine.start", backend=self.settings.resolved_backend)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        log.info("engine.stop")

    async def _watch_loop_lag(self, period: float = 0.1) -> None:
        """Measures how late the loop wakes a timer; the load shedder reads `loop_lag_ms`."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + period
            await asyncio.sleep(period)
            lag = max(0.0, loop.time() - expected)
            # A smoothed value so one slow tick does not shed calls.
            self.loop_lag_ms = 0.8 * self.loop_lag_ms + 0.2 * lag * 1000.0
            self.metrics.loop_lag.observe(lag)
