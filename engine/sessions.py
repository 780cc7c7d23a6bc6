"""The session store: chat sessions with a sliding TTL, expiry tombstones, end-of-call reports, and
event de-duplication, behind one async interface with two implementations.

- `MemoryStore` (the default): one process. Sessions sit in an ordered dict kept in order of last
  activity, so expiring them is popping from the front (amortised O(1)) and the live count is
  exact and cheap.
- `RedisStore` (`REDIS_URL`): shared by every worker. Native key TTLs clean up by themselves; a
  sorted set of last-activity times gives the live count in one round trip.

Expiry: a session lives `ttl_s` past its last activity (each message slides it). An expired id
keeps a tombstone for `tombstone_ttl_s` more (default: one more TTL), so the first message to it is
told "expired" (HTTP 410) rather than silently starting over; that message consumes the tombstone,
and the next one with the same id starts a fresh session. Ids never seen (or forgotten) are
"unknown" (HTTP 404 where a route needs an existing session).

Time comes from an injected `clock` (wall-clock seconds; shared by workers, so not monotonic), and
both stores judge expiry by it on every read: tests move the clock instead of sleeping. Redis's own
key TTLs are the backstop that frees memory in real time.

Redis down: every operation retries a few times with a short backoff, then raises
`StoreUnavailable` and counts the failure. Nothing on the audio path calls the store.
"""
from __future__ import annotations

import abc
import asyncio
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from engine.config import Settings
from engine.log import get_logger

log = get_logger("sessions")

Clock = Callable[[], float]
T = TypeVar("T")

#: messages (user and assistant) kept per session; older ones are dropped
MAX_HISTORY = 50
#: how long end-of-call reports are kept
REPORT_TTL_S = 86400.0
#: default lifetime of a de-duplication key
DEDUP_TTL_S = 86400.0


class SessionError(Exception):
    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id


class SessionNotFound(SessionError):
    """The id was never used, or its tombstone is gone too."""


class SessionExpired(SessionError):
    """The session ended for inactivity; the id may be used again for a fresh one."""


class StoreUnavailable(Exception):
    """The backing store did not answer after the retries."""


@dataclass
class Session:
    """The state of one chat conversation."""

    id: str  #: chosen by the client
    created: float  #: clock time of the first message
    last_active: float  #: clock time of the last activity; expiry counts from here
    user_id: str | None = None  #: the client's user id, when it sent one
    history: list[dict[str, str]] = field(default_factory=list)  #: {"role", "content"} messages
    previous_intent: str | None = None  #: the local responder's last intent (its context)
    previous_chat_id: str | None = None  #: VAPI's id of the last chat, sent as `previousChatId`
    turns: int = 0  #: exchanges answered so far

    def add_exchange(self, user: str, assistant: str) -> None:
        self.history.append({"role": "user", "content": user})
        self.history.append({"role": "assistant", "content": assistant})
        if len(self.history) > MAX_HISTORY:
            del self.history[: len(self.history) - MAX_HISTORY]
        self.turns += 1

    def copy(self) -> Session:
        # History entries are never mutated in place, so a new list of the same dicts suffices.
        return replace(self, history=list(self.history))

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> Session:
        # Fields another version of the engine added are ignored, not fatal.
        raw = orjson.loads(data)
        return cls(**{k: v for k, v in raw.items() if k in _SESSION_FIELDS})


_SESSION_FIELDS = frozenset(Session.__dataclass_fields__)


class SessionStore(abc.ABC):
    """What the chat API and the webhooks need from a store; see the module docstring."""

    def __init__(self, ttl_s: float, tombstone_ttl_s: float | None, clock: Clock) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.ttl_s = ttl_s
        self.tombstone_ttl_s = ttl_s if tombstone_ttl_s is None else tombstone_ttl_s
        self.clock = clock
        self.errors = 0  #: operations that gave up (the store did not answer)
        self.retries = 0  #: attempts repeated after a store error
        self._sweeper: asyncio.Task[None] | None = None

    # -- sessions ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, session_id: str) -> Session:
        """The live session, without counting as activity. Raises `SessionExpired` or
        `SessionNotFound` (neither consumes the tombstone)."""

    @abc.abstractmethod
    async def get_or_create(self, session_id: str, user_id: str | None = None) -> Session:
        """The live session (its TTL slides), or a new one for an unknown id. For an expired id
        raises `SessionExpired` once and forgets the tombstone, so the next call creates."""

    @abc.abstractmethod
    async def save(self, session: Session) -> None:
        """Stores the session; counts as activity (sets `last_active` to now)."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None:
        """Ends a live session and drops its reports. An expired id raises `SessionExpired` (and
        forgets the tombstone); an unknown one raises `SessionNotFound`."""

    @abc.abstractmethod
    async def count(self) -> int:
        """Live sessions, exactly (across workers for Redis)."""

    @property
    @abc.abstractmethod
    def cached_count(self) -> int:
        """Live sessions as last known, read synchronously (for /health and /metrics)."""

    # -- end-of-call reports -------------------------------------------------------------------

    @abc.abstractmethod
    async def save_report(
        self, call_id: str, report: dict[str, Any], session_id: str | None = None
    ) -> None:
        """Keeps a call's end-of-call report for `REPORT_TTL_S`, listed under its session."""

    @abc.abstractmethod
    async def get_report(self, call_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def reports(self, session_id: str) -> list[dict[str, Any]]:
        """The reports of the session's calls (any order)."""

    # -- de-duplication ------------------------------------------------------------------------

    @abc.abstractmethod
    async def first_time(self, key: str, ttl_s: float = DEDUP_TTL_S) -> bool:
        """True exactly once per key within `ttl_s` (Redis: `SET key … NX EX ttl`)."""

    @abc.abstractmethod
    async def remember(self, key: str, value: dict[str, Any]) -> None:
        """Attaches a result to a key `first_time` marked (keeping its TTL): a duplicate delivery
        can be given the same answer."""

    @abc.abstractmethod
    async def recall(self, key: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def release(self, key: str) -> None:
        """Forgets a mark, so the next `first_time(key)` is True again (handling failed)."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Periodic housekeeping; the memory store drops what expired, Redis refreshes counts."""

    @property
    def sweep_interval_s(self) -> float:
        return min(30.0, max(1.0, self.ttl_s / 10.0))

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="session-sweep")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except StoreUnavailable:
                pass  # already logged and counted; try again next period
            except Exception:
                log.exception("sessions.sweep_failed")


# ---------------------------------------------------------------------------------------------
# In-process
# ---------------------------------------------------------------------------------------------


class MemoryStore(SessionStore):
    def __init__(
        self,
        ttl_s: float = 1800.0,
        *,
        tombstone_ttl_s: float | None = None,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(ttl_s, tombstone_ttl_s, clock)
        self._live: OrderedDict[str, Session] = OrderedDict()  # oldest activity first
        self._tombs: OrderedDict[str, float] = OrderedDict()  # id → forget at; oldest first
        self._marks: dict[str, tuple[float, dict[str, Any] | None]] = {}  # key → (until, result)
        self._reports: dict[str, tuple[float, dict[str, Any], str | None]] = {}
        self._by_session: dict[str, set[str]] = {}  # session id → call ids with reports

    def _expire(self, now: float) -> None:
        """Turns sessions idle for longer than the TTL into tombstones, and forgets old ones.
        Both dicts are in time order, so this stops at the first entry still valid."""
        while self._live:
            sid, session = next(iter(self._live.items()))
            if now - session.last_active <= self.ttl_s:
                break
            del self._live[sid]
            self._tombs[sid] = session.last_active + self.ttl_s + self.tombstone_ttl_s
        while self._tombs:
            sid, until = next(iter(self._tombs.items()))
            if until > now:
                break
            del self._tombs[sid]

    async def get(self, session_id: str) -> Session:
        self._expire(self.clock())
        session = self._live.get(session_id)
        if session is not None:
            return session.copy()
        if session_id in self._tombs:
            raise SessionExpired(session_id)
        raise SessionNotFound(session_id)

    async def get_or_create(self, session_id: str, user_id: str | None = None) -> Session:
        now = self.clock()
        self._expire(now)
        session = self._live.get(session_id)
        if session is not None:
            session.last_active = now
            self._live.move_to_end(session_id)
            return session.copy()
        if self._tombs.pop(session_id, None) is not None:
            raise SessionExpired(session_id)
        session = Session(session_id, created=now, last_active=now, user_id=user_id)
        self._live[session_id] = session
        return session.copy()

    async def save(self, session: Session) -> None:
        now = self.clock()
        self._expire(now)
        session.last_active = now
        self._tombs.pop(session.id, None)
        self._live[session.id] = session.copy()
        self._live.move_to_end(session.id)

    async def delete(self, session_id: str) -> None:
        self._expire(self.clock())
        if self._live.pop(session_id, None) is None:
            if self._tombs.pop(session_id, None) is not None:
                raise SessionExpired(session_id)
            raise SessionNotFound(session_id)
        for call_id in self._by_session.pop(session_id, ()):
            self._reports.pop(call_id, None)

    async def count(self) -> int:
        return self.cached_count

    @property
    def cached_count(self) -> int:
        self._expire(self.clock())
        return len(self._live)

    async def save_report(
        self, call_id: str, report: dict[str, Any], session_id: str | None = None
    ) -> None:
        self._reports[call_id] = (self.clock() + REPORT_TTL_S, report, session_id)
        if session_id is not None:
            self._by_session.setdefault(session_id, set()).add(call_id)

    async def get_report(self, call_id: str) -> dict[str, Any] | None:
        entry = self._reports.get(call_id)
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1]

    async def reports(self, session_id: str) -> list[dict[str, Any]]:
        out = []
        for call_id in self._by_session.get(session_id, ()):
            report = await self.get_report(call_id)
            if report is not None:
                out.append(report)
        return out

    async def first_time(self, key: str, ttl_s: float = DEDUP_TTL_S) -> bool:
        now = self.clock()
        entry = self._marks.get(key)
        if entry is not None and entry[0] > now:
            return False
        self._marks[key] = (now + ttl_s, None)
        return True

    async def remember(self, key: str, value: dict[str, Any]) -> None:
        entry = self._marks.get(key)
        if entry is not None and entry[0] > self.clock():
            self._marks[key] = (entry[0], value)

    async def recall(self, key: str) -> dict[str, Any] | None:
        entry = self._marks.get(key)
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1]

    async def release(self, key: str) -> None:
        self._marks.pop(key, None)

    async def sweep(self) -> None:
        now = self.clock()
        self._expire(now)
        # Marks and reports have per-entry TTLs, so these scans are O(n); they run once a period.
        for key in [k for k, (until, _) in self._marks.items() if until <= now]:
            del self._marks[key]
        for call_id in [c for c, (until, _, _) in self._reports.items() if until <= now]:
            _, _, sid = self._reports.pop(call_id)
            if sid is not None and sid in self._by_session:
                self._by_session[sid].discard(call_id)
                if not self._by_session[sid]:
                    del self._by_session[sid]


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------


class RedisStore(SessionStore):
    """Keys (under `prefix`): `s:<id>` the session JSON (EX ttl); `seen:<id>` its last activity
    (EX ttl + tombstone), which tells "expired" from "unknown" after Redis dropped `s:<id>`;
    `active` a sorted set id → last activity, for the live count; `d:<key>` de-dup marks;
    `r:<call>` reports; `sc:<id>` the set of a session's calls with reports."""

    def __init__(
        self,
        url: str,
        ttl_s: float = 1800.0,
        *,
        tombstone_ttl_s: float | None = None,
        clock: Clock = time.time,
        prefix: str = "ve:",
        attempts: int = 3,
        backoff_s: float = 0.05,
        timeout_s: float = 1.0,
    ) -> None:
        super().__init__(ttl_s, tombstone_ttl_s, clock)
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # redis-py's own retries are off: this class retries, so it can count and bound them.
        self.redis = Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self.url = url
        self.prefix = prefix
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._count = 0
        self._active_key = f"{prefix}active"

    def _k(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    async def _run(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        delay = self.backoff_s
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                return await fn()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                last = exc
                if attempt + 1 < self.attempts:
                    self.retries += 1
                    await asyncio.sleep(delay)
                    delay *= 2
        self.errors += 1
        log.warning("sessions.store_unavailable", op=op, error=str(last))
        raise StoreUnavailable(f"session store unavailable ({op}): {last}") from last

    def _ex(self, seconds: float) -> int:
        return max(1, math.ceil(seconds))

    async def _write(self, session: Session) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self._k("s", session.id), session.to_json(), ex=self._ex(self.ttl_s))
        pipe.set(self._k("seen", session.id), repr(session.last_active),
                 ex=self._ex(self.ttl_s + self.tombstone_ttl_s))
        pipe.zadd(self._active_key, {session.id: session.last_active})
        await pipe.execute()

    async def _read(self, session_id: str) -> tuple[Session | None, float | None]:
        """(the stored session, its last activity) as Redis has them."""
        raw, seen = await self._run(
            "get", lambda: self.redis.mget(self._k("s", session_id), self._k("seen", session_id))
        )
        if raw is not None:
            session = Session.from_json(raw)
            return session, session.last_active
        return None, float(seen) if seen is not None else None

    def _state(self, last_active: float | None, now: float) -> str:
        if last_active is None or now - last_active > self.ttl_s + self.tombstone_ttl_s:
            return "unknown"
        return "live" if now - last_active <= self.ttl_s else "expired"

    async def _forget(self, session_id: str) -> None:
        async def op() -> None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(self._k("s", session_id), self._k("seen", session_id))
            pipe.zrem(self._active_key, session_id)
            await pipe.execute()

        await self._run("forget", op)

    async def get(self, session_id: str) -> Session:
        session, last = await self._read(session_id)
        state = self._state(last, self.clock())
        if state == "live" and session is not None:
            return session
        if state == "expired":
            raise SessionExpired(session_id)
        raise SessionNotFound(session_id)

    async def get_or_create(self, session_id: str, user_id: str | None = None) -> Session:
        now = self.clock()
        session, last = await self._read(session_id)
        state = self._state(last, now)
        if state == "live" and session is not None:
            session.last_active = now
            await self._run("touch", lambda: self._write(session))
            return session
        if state == "expired":
            await self._forget(session_id)
            raise SessionExpired(session_id)
        fresh = Session(session_id, created=now, last_active=now, user_id=user_id)
        await self._run("create", lambda: self._write(fresh))
        self._count += 1
        return fresh

    async def save(self, session: Session) -> None:
        session.last_active = self.clock()
        await self._run("save", lambda: self._write(session))

    async def delete(self, session_id: str) -> None:
        _, last = await self._read(session_id)
        state = self._state(last, self.clock())
        if state == "unknown":
            raise SessionNotFound(session_id)
        await self._forget(session_id)
        if state == "expired":
            raise SessionExpired(session_id)
        self._count = max(0, self._count - 1)

        async def drop_reports() -> None:
            calls = await self.redis.smembers(self._k("sc", session_id))
            keys = [self._k("r", _text(c)) for c in calls] + [self._k("sc", session_id)]
            await self.redis.delete(*keys)

        await self._run("delete", drop_reports)

    async def count(self) -> int:
        cutoff = self.clock() - self.ttl_s

        async def op() -> int:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zremrangebyscore(self._active_key, "-inf", f"({cutoff!r}")
            pipe.zcard(self._active_key)
            _, n = await pipe.execute()
            return int(n)

        self._count = await self._run("count", op)
        return self._count

    @property
    def cached_count(self) -> int:
        return self._count

    async def save_report(
        self, call_id: str, report: dict[str, Any], session_id: str | None = None
    ) -> None:
        async def op() -> None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self._k("r", call_id), orjson.dumps(report), ex=self._ex(REPORT_TTL_S))
            if session_id is not None:
                pipe.sadd(self._k("sc", session_id), call_id)
                pipe.expire(self._k("sc", session_id), self._ex(REPORT_TTL_S))
            await pipe.execute()

        await self._run("save_report", op)

    async def get_report(self, call_id: str) -> dict[str, Any] | None:
        raw = await self._run("get_report", lambda: self.redis.get(self._k("r", call_id)))
        return orjson.loads(raw) if raw is not None else None

    async def reports(self, session_id: str) -> list[dict[str, Any]]:
        async def op() -> list[Any]:
            calls = await self.redis.smembers(self._k("sc", session_id))
            if not calls:
                return []
            return list(await self.redis.mget([self._k("r", _text(c)) for c in calls]))

        return [orjson.loads(raw) for raw in await self._run("reports", op) if raw is not None]

    async def first_time(self, key: str, ttl_s: float = DEDUP_TTL_S) -> bool:
        # A random token, so a retry after a lost reply recognises its own earlier SET.
        token = secrets.token_hex(8).encode()
        name = self._k("d", key)

        async def op() -> bool:
            if await self.redis.set(name, token, nx=True, ex=self._ex(ttl_s)):
                return True
            return bool(await self.redis.get(name) == token)

        return await self._run("first_time", op)

    async def remember(self, key: str, value: dict[str, Any]) -> None:
        await self._run("remember", lambda: self.redis.set(
            self._k("d", key), orjson.dumps(value), xx=True, keepttl=True))

    async def recall(self, key: str) -> dict[str, Any] | None:
        raw = await self._run("recall", lambda: self.redis.get(self._k("d", key)))
        # Marks without a result hold a hex token; results are JSON objects.
        if raw is None or not _text(raw).startswith("{"):
            return None
        value: dict[str, Any] = orjson.loads(raw)
        return value

    async def release(self, key: str) -> None:
        await self._run("release", lambda: self.redis.delete(self._k("d", key)))

    async def sweep(self) -> None:
        await self.count()

    @property
    def sweep_interval_s(self) -> float:
        return 5.0

    async def close(self) -> None:
        await super().close()
        await self.redis.aclose()


def _text(value: bytes | str) -> str:
    # The client is made without decode_responses: values come back as bytes.
    return value.decode() if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------


STORE_KEY = web.AppKey("session_store", SessionStore)
_ATTACHED_KEY = web.AppKey("session_store_attached", bool)


def store_from_settings(settings: Settings, clock: Clock = time.time) -> SessionStore:
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.session_ttl_s, clock=clock)
    return MemoryStore(settings.session_ttl_s, clock=clock)


class StoreCollector(Collector):
    """The store's failure counters on /metrics."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "engine_session_store_errors", "Session store operations that gave up",
            value=self.store.errors)
        yield CounterMetricFamily(
            "engine_session_store_retries", "Session store operations retried",
            value=self.store.retries)

    def describe(self) -> list[object]:
        return []


def attach_store(app: web.Application, settings: Settings) -> SessionStore:
    """The app's store: the one already at `app[STORE_KEY]` (tests put one with a fake clock
    there) or one made from the settings. Starts and closes it with the app; idempotent, so the
    chat API and the webhooks can both call it."""
    if app.get(_ATTACHED_KEY):
        return app[STORE_KEY]
    store = app[STORE_KEY] if STORE_KEY in app else store_from_settings(settings)
    app[STORE_KEY] = store
    app[_ATTACHED_KEY] = True

    async def on_startup(app: web.Application) -> None:
        await store.start()

    async def on_cleanup(app: web.Application) -> None:
        await store.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return store
