"""Metrics: cheap counters on the hot path, Prometheus text at /metrics.

Per-frame counts are plain integer attributes on each call's `CallStats` (an attribute increment,
no lock, no label lookup). At scrape time a collector sums the live calls and the totals of calls
that have ended. Rare events (a turn, a barge-in) go straight into prometheus-client histograms.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

FRAME_COUNTERS = (
    ("frames_in", "Caller audio frames received"),
    ("frames_out", "Audio frames sent to callers"),
    ("frames_concealed", "Caller frames replaced by loss concealment"),
    ("frames_late", "Caller frames that arrived too late and were dropped"),
    ("frames_dropped_in", "Caller frames dropped because the backend could not keep up"),
    ("frames_dropped_out", "Outbound frames trimmed because the caller's socket was not reading"),
    ("frames_stale", "Assistant audio discarded because its utterance was cancelled"),
    ("underruns", "Output underruns inside an utterance"),
)


class CallStats:
    """Plain counters for one call (one per FRAME_COUNTERS entry); summed into /metrics at
    scrape time."""

    __slots__ = tuple(name for name, _ in FRAME_COUNTERS) + ("jitter_depth",)

    frames_in: int
    frames_out: int
    frames_concealed: int
    frames_late: int
    frames_dropped_in: int
    frames_dropped_out: int
    frames_stale: int
    underruns: int
    jitter_depth: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Metrics(Collector):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.time()
        self._live: dict[str, CallStats] = {}
        self._ended = CallStats()
        self.calls_total = 0
        self.backend_errors = 0
        self.backend_retries = 0
        self.calls_shed = 0
        self.transfers = 0
        self.bad_messages = 0
        self.active_sessions = lambda: 0
        self.registry.register(self)
        buckets_ms = (5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 500, 800, 1200, 2000, 5000)
        self.relay_latency = Histogram(
            "engine_relay_latency_seconds",
            "Inbound frame to outbound frame on the echo path",
            buckets=[b / 1000 for b in buckets_ms],
            registry=self.registry,
        )
        self.response_latency = Histogram(
            "engine_response_latency_seconds",
            "End of the caller's turn to first reply audio sent",
            buckets=[b / 1000 for b in buckets_ms],
            registry=self.registry,
        )
        self.barge_in_latency = Histogram(
            "engine_barge_in_seconds",
            "Caller speech onset detected to output stopped",
            buckets=[b / 1000 for b in (0.5, 1, 2, 5, 10, 20, 40, 60, 100)],
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "engine_event_loop_lag_seconds",
            "How late the event loop ran a timer",
            buckets=[b / 1000 for b in (1, 2, 5, 10, 20, 50, 100, 250, 500, 1000)],
            registry=self.registry,
        )

    def call_started(self, session_id: str) -> CallStats:
        stats = CallStats()
        self._live[session_id] = stats
        self.calls_total += 1
        return stats

    def call_ended(self, session_id: str) -> None:
        stats = self._live.pop(session_id, None)
        if stats is not None:
            for name, _ in FRAME_COUNTERS:
                setattr(self._ended, name, getattr(self._ended, name) + getattr(stats, name))

    @property
    def active_calls(self) -> int:
        return len(self._live)

    def totals(self) -> dict[str, int]:
        out = {name: getattr(self._ended, name) for name, _ in FRAME_COUNTERS}
        for stats in self._live.values():
            for name in out:
                out[name] += getattr(stats, name)
        return out

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, value in self.totals().items():
            yield CounterMetricFamily(f"engine_{name}", dict(FRAME_COUNTERS)[name], value=value)
        yield CounterMetricFamily("engine_calls", "Calls started", value=self.calls_total)
        yield CounterMetricFamily(
            "engine_calls_shed", "Calls refused under load", value=self.calls_shed
        )
        yield CounterMetricFamily(
            "engine_backend_errors", "Backend failures", value=self.backend_errors
        )
        yield CounterMetricFamily(
            "engine_backend_retries", "Backend request retries", value=self.backend_retries
        )
        yield CounterMetricFamily(
            "engine_transfers", "Calls handed to a person", value=self.transfers
        )
        yield CounterMetricFamily(
            "engine_bad_messages",
            "Malformed or unexpected messages skipped",
            value=self.bad_messages,
        )
        yield GaugeMetricFamily("engine_active_calls", "Calls in progress", value=self.active_calls)
        yield GaugeMetricFamily(
            "engine_active_sessions", "Live sessions", value=self.active_sessions()
        )
        depth = sum(s.jitter_depth for s in self._live.values())
        yield GaugeMetricFamily(
            "engine_jitter_depth_frames", "Frames held in jitter buffers", value=depth
        )
        yield GaugeMetricFamily(
            "engine_uptime_seconds", "Seconds since start", value=time.time() - self.started
        )

    def describe(self) -> Iterable[object]:
        return []

    def render(self) -> bytes:
        return generate_latest(self.registry)
