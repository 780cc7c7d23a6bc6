"""The session store, the same tests on MemoryStore and on RedisStore against a real redis-server.

Time is a fake clock both stores read, so expiry is tested without sleeping.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from engine.sessions import (
    MAX_HISTORY,
    MemoryStore,
    RedisStore,
    Session,
    SessionExpired,
    SessionNotFound,
    SessionStore,
    StoreUnavailable,
)
from tests.redis_server import RedisServer

TTL = 60.0


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start_new()
    yield server
    server.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


MakeStore = Callable[..., SessionStore]


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[MakeStore]:
    made: list[SessionStore] = []
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None

    def make(**kwargs: object) -> SessionStore:
        store: SessionStore
        if server is None:
            store = MemoryStore(TTL, clock=clock, **kwargs)  # type: ignore[arg-type]
        else:
            # A fresh key prefix per store keeps tests apart on the shared server.
            store = RedisStore(server.url, TTL, clock=clock, prefix=f"t{uuid.uuid4().hex[:8]}:",
                               **kwargs)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def store(make_store: MakeStore) -> SessionStore:
    return make_store()


async def test_first_message_creates_a_session_that_is_found_again(store: SessionStore) -> None:
    created = await store.get_or_create("s1", user_id="u1")
    assert created.turns == 0 and created.user_id == "u1"
    again = await store.get_or_create("s1")
    assert again.created == created.created and again.user_id == "u1"
    assert (await store.get("s1")).id == "s1"


async def test_saved_state_round_trips(store: SessionStore) -> None:
    session = await store.get_or_create("s1")
    session.add_exchange("I want to book an appointment", "Which day?")
    session.previous_intent = "booking"
    session.previous_chat_id = "chat_1"
    await store.save(session)
    loaded = await store.get("s1")
    assert loaded.history == [
        {"role": "user", "content": "I want to book an appointment"},
        {"role": "assistant", "content": "Which day?"},
    ]
    assert loaded.previous_intent == "booking"
    assert (loaded.previous_chat_id, loaded.turns) == ("chat_1", 1)


async def test_changes_are_not_visible_until_saved(store: SessionStore) -> None:
    session = await store.get_or_create("s1")
    session.add_exchange("hello", "hi")
    assert (await store.get("s1")).turns == 0


async def test_activity_slides_the_ttl(store: SessionStore, clock: FakeClock) -> None:
    await store.get_or_create("s1")
    for _ in range(3):
        clock.advance(TTL * 0.9)
        await store.get_or_create("s1")
    clock.advance(TTL * 0.9)
    assert (await store.get("s1")).id == "s1"


async def test_expired_session_says_so_once_then_starts_fresh(
    store: SessionStore, clock: FakeClock
) -> None:
    old = await store.get_or_create("s1")
    old.add_exchange("hello", "hi")
    await store.save(old)
    clock.advance(TTL + 1)
    with pytest.raises(SessionExpired):
        await store.get_or_create("s1")
    fresh = await store.get_or_create("s1")
    assert fresh.turns == 0 and fresh.history == []
    assert fresh.created == clock.now


async def test_reading_an_expired_session_does_not_use_up_its_tombstone(
    store: SessionStore, clock: FakeClock
) -> None:
    await store.get_or_create("s1")
    clock.advance(TTL + 1)
    for _ in range(2):
        with pytest.raises(SessionExpired):
            await store.get("s1")
    with pytest.raises(SessionExpired):
        await store.get_or_create("s1")


async def test_tombstone_is_forgotten_after_another_ttl(
    store: SessionStore, clock: FakeClock
) -> None:
    await store.get_or_create("s1")
    clock.advance(2 * TTL + 1)
    with pytest.raises(SessionNotFound):
        await store.get("s1")
    assert (await store.get_or_create("s1")).turns == 0


async def test_unknown_id_is_not_found(store: SessionStore) -> None:
    with pytest.raises(SessionNotFound):
        await store.get("nobody")
    with pytest.raises(SessionNotFound):
        await store.delete("nobody")


async def test_delete_ends_the_session_and_its_reports(store: SessionStore) -> None:
    await store.get_or_create("s1")
    await store.save_report("call-1", {"type": "end-of-call-report", "summary": "ok"}, "s1")
    await store.delete("s1")
    with pytest.raises(SessionNotFound):
        await store.get("s1")
    assert await store.get_report("call-1") is None
    with pytest.raises(SessionNotFound):
        await store.delete("s1")


async def test_deleting_an_expired_session_says_expired(
    store: SessionStore, clock: FakeClock
) -> None:
    await store.get_or_create("s1")
    clock.advance(TTL + 1)
    with pytest.raises(SessionExpired):
        await store.delete("s1")
    with pytest.raises(SessionNotFound):
        await store.delete("s1")


async def test_count_is_live_sessions_only(store: SessionStore, clock: FakeClock) -> None:
    for i in range(3):
        await store.get_or_create(f"old{i}")
    assert await store.count() == 3 and store.cached_count == 3
    clock.advance(TTL / 2)
    await store.get_or_create("new")
    clock.advance(TTL / 2 + 1)
    assert await store.count() == 1
    assert store.cached_count == 1


async def test_first_time_is_true_exactly_once(store: SessionStore) -> None:
    answers = await asyncio.gather(*(store.first_time("evt-1") for _ in range(10)))
    assert answers.count(True) == 1
    assert await store.first_time("evt-2")


async def test_a_remembered_answer_is_recalled_and_a_release_reopens_the_key(
    store: SessionStore,
) -> None:
    assert await store.recall("k") is None
    assert await store.first_time("k")
    assert await store.recall("k") is None  # marked, no answer yet
    await store.remember("k", {"results": [{"toolCallId": "t1", "result": "yes"}]})
    assert await store.recall("k") == {"results": [{"toolCallId": "t1", "result": "yes"}]}
    await store.release("k")
    assert await store.first_time("k")


async def test_reports_are_kept_by_call_and_listed_by_session(store: SessionStore) -> None:
    await store.save_report("call-1", {"summary": "first"}, "s1")
    await store.save_report("call-2", {"summary": "second"}, "s1")
    await store.save_report("call-3", {"summary": "no session"})
    assert await store.get_report("call-3") == {"summary": "no session"}
    assert sorted(r["summary"] for r in await store.reports("s1")) == ["first", "second"]
    assert await store.reports("s2") == []


async def test_history_is_bounded() -> None:
    session = Session("s", 0.0, 0.0)
    for i in range(MAX_HISTORY):
        session.add_exchange(f"q{i}", f"a{i}")
    assert len(session.history) == MAX_HISTORY
    assert session.history[-1] == {"role": "assistant", "content": f"a{MAX_HISTORY - 1}"}
    assert session.turns == MAX_HISTORY


# --- the memory store's own housekeeping ---


async def test_memory_marks_expire_with_the_clock(clock: FakeClock) -> None:
    store = MemoryStore(TTL, clock=clock)
    assert await store.first_time("k", ttl_s=10)
    clock.advance(9)
    assert not await store.first_time("k", ttl_s=10)
    clock.advance(2)
    assert await store.first_time("k", ttl_s=10)


async def test_memory_sweep_drops_expired_marks_and_reports(clock: FakeClock) -> None:
    store = MemoryStore(TTL, clock=clock)
    await store.first_time("k", ttl_s=10)
    await store.save_report("call-1", {"summary": "x"}, "s1")
    clock.advance(86400 + 1)
    await store.sweep()
    assert store._marks == {} and store._reports == {} and store._by_session == {}


# --- Redis specifics ---


async def test_redis_sets_native_ttls(redis_server: RedisServer, clock: FakeClock) -> None:
    store = RedisStore(redis_server.url, TTL, clock=clock, prefix="native:")
    try:
        await store.get_or_create("s1")
        await store.first_time("k", ttl_s=30)
        assert 0 < await store.redis.ttl("native:s:s1") <= TTL
        assert TTL < await store.redis.ttl("native:seen:s1") <= 2 * TTL
        assert 0 < await store.redis.ttl("native:d:k") <= 30
    finally:
        await store.redis.flushdb()
        await store.close()


async def test_redis_sessions_are_shared_between_stores(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    a = RedisStore(redis_server.url, TTL, clock=clock, prefix="shared:")
    b = RedisStore(redis_server.url, TTL, clock=clock, prefix="shared:")
    try:
        session = await a.get_or_create("s1")
        session.previous_chat_id = "chat_9"
        await a.save(session)
        assert (await b.get_or_create("s1")).previous_chat_id == "chat_9"
        assert await a.first_time("evt") and not await b.first_time("evt")
    finally:
        await a.close()
        await b.close()


async def test_redis_down_raises_a_clear_error_and_recovers_after_a_restart(
    clock: FakeClock,
) -> None:
    server = RedisServer.start_new()
    store = RedisStore(server.url, TTL, clock=clock, backoff_s=0.01)
    try:
        await store.get_or_create("s1")
        server.stop()
        with pytest.raises(StoreUnavailable, match="session store unavailable"):
            await store.get_or_create("s1")
        assert store.errors == 1 and store.retries == store.attempts - 1
        server.start()
        # The data did not survive (no persistence), but the store works again at once.
        session = await store.get_or_create("s1")
        session.add_exchange("hello", "hi")
        await store.save(session)
        assert (await store.get("s1")).turns == 1
        assert await store.first_time("after-restart")
        assert store.errors == 1
    finally:
        await store.close()
        server.close()
