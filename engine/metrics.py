"""Metrics: cheap counters on the hot path, Prometheus text at /metrics.

Per-frame counts are plain integer attributes on each call's `CallStats` (an attribute increment,
no lock, no label lookup). At scrape time a collector sums the live calls and the totals of calls
that have ended. Rare events (a turn, a barge-in) go straight into prometheus-client histograms.

With several workers (`serve --workers N`) any worker may answer a scrape, so /metrics answers
for all of them: each worker copies its totals about once a second (`SharedMetrics.publish`) into
prometheus-client's multi-process files, which the answering worker sums. The hot path does not
change; `/metrics?scope=worker` is the answering worker's own view.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable, Iterable, Iterator, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
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
#: (attribute of `Metrics`, metric name, help) of the counters bumped outside the frame path
EVENT_COUNTERS = (
    ("calls_total", "engine_calls", "Calls started"),
    ("calls_shed", "engine_calls_shed", "Calls refused under load"),
    ("backend_errors", "engine_backend_errors", "Backend failures"),
    ("backend_retries", "engine_backend_retries", "Backend request retries"),
    ("transfers", "engine_transfers", "Calls handed to a person"),
    ("bad_messages", "engine_bad_messages", "Malformed or unexpected messages skipped"),
)
#: (metric name, help, how the cluster view combines the live workers' values)
GAUGES: tuple[tuple[str, str, Literal["livesum", "livemax"]], ...] = (
    ("engine_active_calls", "Calls in progress", "livesum"),
    ("engine_active_sessions", "Live sessions", "livesum"),
    ("engine_jitter_depth_frames", "Frames held in jitter buffers", "livesum"),
    ("engine_uptime_seconds", "Seconds since start", "livemax"),  # the oldest live worker
    ("engine_event_loop_tasks", "asyncio tasks alive on the event loop", "livesum"),
)
SCOPES = ("cluster", "worker")

_shared_dir: str | None = None


def enable_multiprocess(path: str) -> None:
    """Makes this process one worker among several: every prometheus-client metric created from
    now on keeps its value in a file under `path`, and each `Metrics` made afterwards publishes
    its totals there for the cluster view.

    Call it in the worker right after fork, before the engine is built. prometheus-client picks
    its value class from PROMETHEUS_MULTIPROC_DIR once, when it is first imported, and the parent
    has imported it long before forking; metrics read `values.ValueClass` each time one is
    created, so replacing it here works whatever was imported first. A fresh class per worker
    also starts with no file handles inherited from the parent.
    """
    global _shared_dir
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # the mmap files are named from it
    values.ValueClass = values.MultiProcessValue()
    _shared_dir = path


def _loop_tasks() -> int:
    """Tasks alive on the running event loop (0 outside one): a leak shows as growth."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


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


class _WorkerRegistry(CollectorRegistry):
    """A registry that remembers its collectors in order, so the cluster view can take in those
    that other modules add (the session store, the webhooks, the cluster link)."""

    def __init__(self) -> None:
        super().__init__(auto_describe=True)
        self.collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self.collectors.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self.collectors.remove(collector)


class Metrics(Collector):
    def __init__(self) -> None:
        self.registry = _WorkerRegistry()
        self.started = time.time()
        self._live: dict[str, CallStats] = {}
        self._ended = CallStats()
        self.calls_total = 0
        self.backend_errors = 0
        self.backend_retries = 0
        self.calls_shed = 0
        self.transfers = 0
        self.bad_messages = 0
        self.active_sessions: Callable[[], int] = lambda: 0
        self.registry.register(self)
        buckets_ms = (5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 500, 800, 1200, 2000, 5000)
        self.relay_latency = Histogram(
            "engine_relay_latency_seconds",
            "Echo backend: caller audio written to the output stream until read to be sent",
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
        self._own = len(self.registry.collectors)  # itself and the histograms
        #: this worker's link to the cluster view; None when the engine runs as one process
        self.shared = SharedMetrics(self, _shared_dir) if _shared_dir is not None else None

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

    def gauges(self) -> dict[str, float]:
        """The GAUGES' current values in this process, by metric name."""
        return {
            "engine_active_calls": self.active_calls,
            "engine_active_sessions": self.active_sessions(),
            "engine_jitter_depth_frames": sum(s.jitter_depth for s in self._live.values()),
            "engine_uptime_seconds": time.time() - self.started,
            "engine_event_loop_tasks": _loop_tasks(),
        }

    def other_collectors(self) -> list[Collector]:
        """Collectors that other modules registered on `registry`."""
        return self.registry.collectors[self._own:]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        frame_help = dict(FRAME_COUNTERS)
        for name, value in self.totals().items():
            yield CounterMetricFamily(f"engine_{name}", frame_help[name], value=value)
        for attr, name, documentation in EVENT_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=getattr(self, attr))
        readings = self.gauges()
        for name, documentation, _ in GAUGES:
            yield GaugeMetricFamily(name, documentation, value=readings[name])

    def describe(self) -> Iterable[object]:
        return []

    def render(self, scope: str = "cluster") -> bytes:
        """Prometheus text: every worker's metrics combined (`cluster`), or this worker's own
        (`worker`). With one process both are the same."""
        if scope == "worker" or self.shared is None:
            return generate_latest(self.registry)
        self.shared.publish()  # this worker's own share without the publishing period's lag
        return generate_latest(self.shared.registry)


class SharedMetrics:
    """This worker's share of the cluster view, in prometheus-client's multi-process files.

    `publish()` turns the plain totals into multi-process metrics of the same names: counter
    increases since the last publish go into Counters (a dead worker's files stay, so the sum
    never goes backwards), current readings into "live" Gauges (the supervisor drops a dead
    worker's with `mark_process_dead`). The histograms are multi-process by themselves. Counters
    of the other modules' collectors are copied the same way; their other families (such as the
    cluster link's worker count, already a cluster-wide figure) are shown as this worker reads
    them.
    """

    def __init__(self, metrics: Metrics, path: str) -> None:
        self.metrics = metrics
        self.path = path
        self._frames = {
            name: Counter(f"engine_{name}", documentation, registry=None)
            for name, documentation in FRAME_COUNTERS
        }
        self._events = {
            attr: Counter(name, documentation, registry=None)
            for attr, name, documentation in EVENT_COUNTERS
        }
        self._gauges = {
            name: Gauge(name, documentation, registry=None, multiprocess_mode=mode)
            for name, documentation, mode in GAUGES
        }
        self._others: dict[tuple[str, tuple[str, ...]], Counter] = {}
        self._published: dict[object, float] = {}  # what each counter held at the last publish
        if not os.path.exists(os.path.join(path, f"counter_{os.getpid()}.db")):
            # a prometheus-client that no longer reads `values.ValueClass` per metric
            raise RuntimeError("metrics are not multi-process: call enable_multiprocess first")
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path)
        self.registry.register(_Readings(metrics))

    def publish(self) -> None:
        """Brings this worker's figures in the shared files up to date."""
        metrics = self.metrics
        for name, value in metrics.totals().items():
            self._advance(self._frames[name], name, value)
        for attr, counter in self._events.items():
            self._advance(counter, attr, getattr(metrics, attr))
        for name, reading in metrics.gauges().items():
            self._gauges[name].set(reading)
        for collector in metrics.other_collectors():
            for family in collector.collect():
                if family.type == "counter":
                    self._publish_family(family)

    def _publish_family(self, family: Metric) -> None:
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # `_created`: not summed across processes
            labelnames = tuple(sorted(sample.labels))
            counter = self._others.get((family.name, labelnames))
            if counter is None:
                counter = Counter(family.name, family.documentation, labelnames, registry=None)
                self._others[(family.name, labelnames)] = counter
            labelvalues = tuple(sample.labels[k] for k in labelnames)
            child = counter.labels(*labelvalues) if labelnames else counter
            self._advance(child, (family.name, labelnames, labelvalues), sample.value)

    def _advance(self, counter: Counter, key: object, value: float) -> None:
        increase = value - self._published.get(key, 0.0)
        if increase < 0:  # the source started again from zero
            increase = value
        self._published[key] = value
        if increase:
            counter.inc(increase)


class _Readings(Collector):
    """The other modules' families that are not counters, as this worker reads them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for collector in self.metrics.other_collectors():
            for family in collector.collect():
                if family.type != "counter":
                    yield family

    def describe(self) -> Iterable[object]:
        return []
