"""The cluster link: how workers sharing Redis find the worker that holds a VAPI call, hand it a
server message, and see each other's load.

Keys and channels (all under `ve:`):

- `call:<vapi call id>` → the id of the worker holding that call (EX `CALL_TTL_S`). Written when a
  call registers and refreshed with every heartbeat, so a Redis restart (which forgets everything)
  is repaired within one heartbeat, and a crashed worker's claims fade by themselves.
- `worker:<id>` (pub/sub channel): messages for the calls that worker holds, as JSON
  `{"callId", "message", "from"}`; the subscriber hands each to `sinks[callId].on_vapi_message`.
- `worker:<id>:alive` → that worker's `health()` JSON (EX `ALIVE_TTL_S`), and the set `workers`
  listing the ids seen; together the cluster view for /health, refreshed every heartbeat and read
  from a cache, so /health never waits on Redis.

Nothing on the audio path touches this module: registration is a background write, routing runs
in the webhook handler, delivery is one synchronous `on_vapi_message` on the loop. Redis down:
operations give up quickly (short timeouts, one retry), count an error, and answer "not routed";
the subscriber and heartbeat retry with exponential backoff and recover on their own.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from secrets import token_hex
from typing import Any, Protocol, TypeVar

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.log import get_logger

log = get_logger("cluster")

T = TypeVar("T")

PREFIX = "ve:"
#: lifetime of a call → worker claim; refreshed every heartbeat while the call lives
CALL_TTL_S = 60
#: a worker whose heartbeat is older than this is gone
ALIVE_TTL_S = 10
HEARTBEAT_S = 2.0
#: reconnect delays of the subscriber and heartbeat: from the first to the cap, doubling
BACKOFF_S = (0.1, 2.0)


class CallEventSink(Protocol):
    def on_vapi_message(self, message: dict[str, Any]) -> None: ...


def default_worker_id() -> str:
    """`host-pid-xxxx`: the suffix keeps two engines in one process (tests) and a reused pid
    apart."""
    return f"{socket.gethostname()}-{os.getpid()}-{token_hex(2)}"


class _Unavailable(Exception):
    pass


class ClusterLink:
    """One worker's link to the others; see the module docstring."""

    def __init__(
        self,
        redis_url: str,
        worker_id: str | None = None,
        *,
        sinks: Mapping[str, CallEventSink],
        health: Callable[[], dict[str, Any]],
        heartbeat_s: float = HEARTBEAT_S,
        timeout_s: float = 0.5,
        prefix: str = PREFIX,
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.worker_id = worker_id or default_worker_id()
        self.sinks = sinks  #: live calls by VAPI call id (the engine's `vapi_calls`, shared)
        self.health = health
        self.heartbeat_s = heartbeat_s
        self.prefix = prefix
        # Retries are this class's own (counted, bounded); redis-py's are off.
        self.redis = Redis.from_url(
            redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0))
        # Its own client: a subscribed connection blocks on reads and cannot serve commands.
        self._sub_redis = Redis.from_url(
            redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0))
        self.channel = self._channel(self.worker_id)
        self.errors = 0  #: Redis operations that failed
        self.routed_out = 0  #: messages published to the worker holding the call
        self.routed_in = 0  #: messages received and handed to a local call
        self.unrouted_in = 0  #: messages received for a call no longer here
        self.connected = False  #: the last heartbeat reached Redis
        self.subscribed = False
        self._view: dict[str, Any] = {"workers": 0, "activeCalls": 0, "activeSessions": 0}
        self._view_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writes: set[asyncio.Task[None]] = set()
        self._resubscribe = asyncio.Event()

    # -- keys ----------------------------------------------------------------------------------

    def _call_key(self, vapi_call_id: str) -> str:
        return f"{self.prefix}call:{vapi_call_id}"

    def _channel(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def _alive_key(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}:alive"

    @property
    def _workers_key(self) -> str:
        return f"{self.prefix}workers"

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the subscriber and the heartbeat; returns at once, Redis up or not."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._subscribe_loop(), name="cluster-subscriber"),
                asyncio.create_task(self._heartbeat_loop(), name="cluster-heartbeat"),
            ]

    async def stop(self) -> None:
        # Let the last unregistrations (calls just closed) land, briefly, before leaving.
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=1.0)
        for task in self._tasks + list(self._writes):
            task.cancel()
        for task in self._tasks + list(self._writes):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        try:
            # Leave the view at once rather than after ALIVE_TTL_S.
            await self._op("leave", lambda: self._leave())
        except _Unavailable:
            pass
        await self.redis.aclose()
        await self._sub_redis.aclose()

    async def _leave(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self._alive_key(self.worker_id))
        pipe.srem(self._workers_key, self.worker_id)
        for call_id in list(self.sinks):
            pipe.delete(self._call_key(call_id))
        await pipe.execute()

    # -- one Redis operation -------------------------------------------------------------------

    async def _op(self, op: str, fn: Callable[[], Awaitable[T]], attempts: int = 2,
                  quiet: bool = False) -> T:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        last: Exception | None = None
        for attempt in range(attempts):
            try:
                return await fn()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                last = exc
                if attempt + 1 < attempts:
                    await asyncio.sleep(0.02)
        self.errors += 1
        if not quiet:
            log.warning("cluster.redis_unavailable", op=op, error=str(last))
        raise _Unavailable(op) from last

    # -- calls ---------------------------------------------------------------------------------

    def register_call(self, vapi_call_id: str) -> None:
        """Claims the call for this worker, in the background (the call never waits on it)."""
        self._background("register", lambda: self.redis.set(
            self._call_key(vapi_call_id), self.worker_id, ex=CALL_TTL_S))

    def unregister_call(self, vapi_call_id: str) -> None:
        self._background("unregister", lambda: self.redis.delete(self._call_key(vapi_call_id)))

    def _background(self, op: str, fn: Callable[[], Awaitable[object]]) -> None:
        async def run() -> None:
            try:
                await self._op(op, fn)
            except _Unavailable:
                pass  # counted; the heartbeat re-registers live calls when Redis is back

        task = asyncio.get_running_loop().create_task(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def owner(self, vapi_call_id: str) -> str | None:
        """The worker holding the call, or None (unknown, or Redis down)."""
        try:
            raw = await self._op("owner", lambda: self.redis.get(self._call_key(vapi_call_id)))
        except _Unavailable:
            return None
        return raw.decode() if isinstance(raw, bytes) else raw

    async def publish(self, worker_id: str, vapi_call_id: str, message: dict[str, Any]) -> bool:
        """True when a subscriber of that worker received it."""
        envelope = orjson.dumps({"callId": vapi_call_id, "message": message,
                                 "from": self.worker_id})
        try:
            receivers = await self._op(
                "publish", lambda: self.redis.publish(self._channel(worker_id), envelope))
        except _Unavailable:
            return False
        return bool(receivers)

    async def route(self, vapi_call_id: str, message: dict[str, Any]) -> bool:
        """Hands `message` to the worker holding `vapi_call_id`; False when no live worker
        took it (unknown call, our own stale claim, a dead worker, or Redis down)."""
        worker = await self.owner(vapi_call_id)
        if worker is None or worker == self.worker_id:
            return False
        if not await self.publish(worker, vapi_call_id, message):
            return False
        self.routed_out += 1
        return True

    def deliver(self, data: bytes | str) -> bool:
        """One envelope from our channel, to the local call it is about."""
        try:
            envelope = orjson.loads(data)
            call_id = envelope["callId"]
            message = envelope["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("cluster.bad_envelope")
            return False
        sink = self.sinks.get(call_id) if isinstance(call_id, str) else None
        if sink is None or not isinstance(message, dict):
            self.unrouted_in += 1
            log.info("cluster.call_gone", call_id=call_id, type=message.get("type")
                     if isinstance(message, dict) else None)
            return False
        try:
            sink.on_vapi_message(message)
        except Exception:
            log.exception("cluster.sink_failed", type=message.get("type"))
            return False
        self.routed_in += 1
        return True

    # -- the subscriber ------------------------------------------------------------------------

    async def _subscribe_loop(self) -> None:
        delay = BACKOFF_S[0]
        while True:
            pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed = True
                delay = BACKOFF_S[0]
                log.info("cluster.subscribed", channel=self.channel)
                self._resubscribe.clear()
                # Claims may have been lost while we were away (a Redis restart).
                self._refresh_claims()
                while not self._resubscribe.is_set():
                    item = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if item is not None and item.get("type") == "message":
                        self.deliver(item["data"])
            except asyncio.CancelledError:
                self.subscribed = False
                await _quietly(pubsub.aclose())
                raise
            except Exception as exc:  # connection lost, Redis restarting: back off and retry
                if self.subscribed:
                    self.errors += 1
                    log.warning("cluster.subscriber_lost", error=str(exc))
                self.subscribed = False
                await _quietly(pubsub.aclose())
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_S[1])
                continue
            # The heartbeat saw Redis come back: rebuild the connection in case ours is half-open.
            self.subscribed = False
            await _quietly(pubsub.aclose())

    def _refresh_claims(self) -> None:
        calls = list(self.sinks)
        if not calls:
            return

        async def op() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for call_id in calls:
                pipe.set(self._call_key(call_id), self.worker_id, ex=CALL_TTL_S)
            await pipe.execute()

        self._background("refresh", op)

    # -- the heartbeat and the cluster view ----------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        delay = BACKOFF_S[0]
        was_down = False
        while True:
            try:
                # Logged once per outage, not once per beat.
                await self._op("heartbeat", self.beat, attempts=1, quiet=was_down)
            except _Unavailable:
                self.connected = False
                was_down = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.heartbeat_s)
                continue
            self.connected = True
            if was_down:
                log.info("cluster.reconnected", worker=self.worker_id)
                # A subscription that did not notice the outage may sit on a dead socket.
                self._resubscribe.set()
                was_down = False
            delay = BACKOFF_S[0]
            await asyncio.sleep(self.heartbeat_s)

    async def beat(self) -> None:
        """Publishes this worker's health, refreshes its call claims, reads the others'."""
        me = self.health()
        calls = list(self.sinks)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self._alive_key(self.worker_id), orjson.dumps(me), ex=ALIVE_TTL_S)
        pipe.sadd(self._workers_key, self.worker_id)
        for call_id in calls:
            pipe.set(self._call_key(call_id), self.worker_id, ex=CALL_TTL_S)
        pipe.smembers(self._workers_key)
        results = await pipe.execute()
        ids = sorted(_text(w) for w in results[-1])
        healths = await self.redis.mget([self._alive_key(w) for w in ids]) if ids else []
        gone = [w for w, raw in zip(ids, healths, strict=True) if raw is None]
        if gone:
            await self.redis.srem(self._workers_key, *gone)
        live = [orjson.loads(raw) for raw in healths if raw is not None]
        self._view = {
            "workers": len(live),
            "activeCalls": sum(int(h.get("activeCalls", 0)) for h in live),
            "activeSessions": sum(int(h.get("activeSessions", 0)) for h in live),
        }
        self._view_at = time.monotonic()

    @property
    def workers(self) -> int:
        """Live workers as of the last heartbeat."""
        return int(self._view["workers"])

    def view(self) -> dict[str, Any]:
        """The cluster as of the last heartbeat, for /health (never waits on Redis)."""
        age = None if self._view_at is None else round(time.monotonic() - self._view_at, 3)
        return {**self._view, "worker": self.worker_id,
                "redis": "ok" if self.connected else "unavailable", "ageS": age}


async def _quietly(aw: Awaitable[object]) -> None:
    try:
        await aw
    except Exception:
        pass


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ClusterCollector(Collector):
    """The link's counters on /metrics."""

    def __init__(self, link: ClusterLink) -> None:
        self.link = link

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        link = self.link
        yield CounterMetricFamily("engine_cluster_errors", "Cluster Redis operations that failed",
                                  value=link.errors)
        routed = CounterMetricFamily("engine_cluster_messages",
                                     "VAPI messages passed between workers", labels=["direction"])
        routed.add_metric(["out"], link.routed_out)
        routed.add_metric(["in"], link.routed_in)
        routed.add_metric(["in_unrouted"], link.unrouted_in)
        yield routed
        yield GaugeMetricFamily("engine_cluster_workers", "Live workers in the last heartbeat",
                                value=link.workers)

    def describe(self) -> list[object]:
        return []
