"""The engine's process-wide state: settings, live calls, the backend, shared timers, metrics.

Routes (server.py) reach everything through one `Engine`; nothing here parses a wire format.
Models and other heavy things are loaded once per process and shared by every call.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from engine.backends import backend_factory
from engine.config import Settings
from engine.log import get_logger
from engine.metrics import Metrics
from engine.pacing import Pacer
from engine.responder import load_assistant
from engine.turns import TurnConfig

if TYPE_CHECKING:
    from engine.backends.base import BackendFactory
    from engine.call import Call
    from engine.cluster import ClusterLink

log = get_logger("runtime")


class Engine:
    def __init__(self, settings: Settings, backend: "BackendFactory | None" = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.calls: dict[str, "Call"] = {}
        #: live calls by their VAPI call id, so VAPI's webhooks reach the call they are about
        self.vapi_calls: dict[str, "Call"] = {}
        self.loop_lag_ms = 0.0
        self.assistant, self.responder = load_assistant(settings.assistant_file)
        self.turn_config = TurnConfig(**{
            k: v for k, v in self.assistant.turns.items() if k in TurnConfig.__dataclass_fields__
        })
        self.backend_factory: "BackendFactory" = backend or self._make_backend()
        self.pacer = Pacer()
        from engine.transports.twilio import StreamTokens

        self.stream_tokens = StreamTokens(auth_token=settings.twilio_auth_token)
        self.base_url: str | None = None
        self.draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.active_sessions = lambda: len(self.calls)
        # with Redis, the link to the other workers: it routes VAPI messages to the call's worker
        self.cluster: "ClusterLink | None" = None
        if settings.redis_url:
            from engine.cluster import ClusterCollector, ClusterLink

            self.cluster = ClusterLink(settings.redis_url, sinks=self.vapi_calls,
                                       health=self.health)
            self.metrics.registry.register(ClusterCollector(self.cluster))

    def _make_backend(self) -> "BackendFactory":
        name = self.settings.resolved_backend
        if name == "local":
            return backend_factory("local", engine=self)
        if name == "vapi":
            return backend_factory("vapi", settings=self.settings, metrics=self.metrics)
        return backend_factory(name)

    def new_vad(self) -> Any:
        from engine.audio.vad import EnergyVad

        return EnergyVad()

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    def overloaded(self) -> bool:
        """True when new calls must be refused: the event loop runs so late that one more call
        would degrade every call, or the engine is draining to stop."""
        return self.draining or self.loop_lag_ms > self.settings.max_event_loop_lag_ms

    async def drain(self, grace_s: float) -> None:
        """Stops taking calls, lets live ones finish for up to `grace_s`, then ends the rest."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        if self.calls:
            log.info("engine.draining", calls=len(self.calls), grace_s=grace_s)
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for call in list(self.calls.values()):
            call.transport.hangup("engine-stopping")
            await call.close("engine-stopping")

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "activeSessions": self.metrics.active_sessions(),
            "activeCalls": self.metrics.active_calls,
            "uptime": round(self.uptime, 3),
            "worker": os.getpid(),
        }

    async def start(self) -> None:
        self.pacer.start()
        if self.settings.resolved_backend == "local":
            await self._prepare_local_assistant()
        self._tasks.append(asyncio.create_task(self._watch_loop_lag(), name="loop-lag"))
        if self.metrics.shared is not None:  # one worker of several: feed the cluster view
            self._tasks.append(asyncio.create_task(self._publish_metrics(), name="metrics"))
        if self.cluster is not None:  # returns at once; Redis may come later
            await self.cluster.start()
        log.info("engine.start", backend=self.settings.resolved_backend)

    async def _prepare_local_assistant(self) -> None:
        """Loads the recognizer's model and a decoder, and starts the synthesizer, before the
        first call needs them (the first decoder costs ~15 ms with the phrase model)."""
        from engine.backends.local import recognition_model
        from engine.speech.asr import shared_pool
        from engine.speech.tts import Synthesizer

        def prepare() -> None:
            shared_pool().prewarm(recognition_model(self), 1)
            Synthesizer.shared()

        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, prepare)
        log.info("engine.local_assistant_ready", seconds=round(time.monotonic() - started, 3))

    async def stop(self) -> None:
        for call in list(self.calls.values()):
            await call.close("engine-stopping")
        await self.pacer.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self.metrics.shared is not None:  # the last counts before this worker exits
            self.metrics.shared.publish()
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

    async def _publish_metrics(self, period: float = 1.0) -> None:
        """Copies this worker's totals into the cluster view of /metrics, which therefore lags
        by at most `period`; the hot path keeps its plain counters."""
        shared = self.metrics.shared
        assert shared is not None
        while True:
            await asyncio.sleep(period)
            try:
                shared.publish()
            except Exception:  # a full disk, say: the worker's own view still works
                log.exception("metrics.publish_failed")
