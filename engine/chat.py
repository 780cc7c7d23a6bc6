"""The text chat API: `POST /chat` and `DELETE /session/{sessionId}` (CONTRACT.md).

    POST /chat  {"sessionId": "s1", "message": "What are your hours?", "userId": "u1"?}
    → 200 {"reply": "...", "chatId": "...", "sessionId": "s1", "turn": 3}

`turn` counts the session's answered exchanges (1, 2, ...), in the order they were answered. The
client picks the session id; its first message creates the session. Replies come from the local
responder (context: the session's previous intent and history; `chatId` is a fresh id per
exchange) or, when `VAPI_API_KEY` is set, from VAPI's chat API (`POST {VAPI_BASE_URL}/chat` with
`assistantId` or an inline assistant, `input`, and `previousChatId` = the id of the session's
last VAPI chat; `chatId` is VAPI's id), through the retry helper.

Ordering: each session has one FIFO lock, taken in arrival order and held for the whole exchange
(backend call and store write; for VAPI streams, to the end of the stream, since the next message
needs this one's chat id). So a burst of messages is answered one at a time, each with its own
reply, none dropped; more than `MAX_WAITING` waiting in one session get 429. Ordering holds within
one process: with several workers, a session's messages must reach the same worker.

Streaming: with `Accept: text/event-stream` the answer is server-sent events, each one `data:`
line of JSON followed by a blank line:

    data: {"type": "delta", "delta": "We "}
        a piece of the reply: one word with its trailing space (local), or VAPI's own deltas
    data: {"type": "done", "reply": "...", "chatId": "...", "sessionId": "s1", "turn": 3}
        the last event: the complete reply; the deltas concatenate to `reply`
    data: {"type": "error", "error": "..."}
        instead of `done`, when the backend fails after the stream began

Errors found before the first event are plain JSON answers with their status, as without SSE:
400 malformed body or fields, 413 body over 64 KiB, 410 `{"error": "session expired"}` (once; the
next message with that id starts afresh), 429 too many waiting, 502 the backend failed after its
retries (the session is unchanged and usable), 503 the session store is down.

`DELETE /session/{id}` → 200 `{"deleted": id}`, 404 unknown, 410 expired.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from engine.config import Settings
from engine.log import get_logger
from engine.metrics import Metrics
from engine.responder import AssistantConfig, Responder, load_assistant
from engine.retry import (
    DEFAULT_RETRY_ON,
    RETRY_AFTER_STATUSES,
    RetryError,
    backoff_delay,
    excerpt,
    parse_retry_after,
    request_with_retry,
)
from engine.server import ENGINE_KEY, json_error, json_response, read_capped
from engine.sessions import (
    Session,
    SessionExpired,
    SessionNotFound,
    SessionStore,
    StoreCollector,
    StoreUnavailable,
    attach_store,
)
from engine.webhooks import inline_assistant

log = get_logger("chat")

MAX_BODY = 64 * 1024
MAX_ID_LEN = 200
#: messages one session may have waiting; past this the client is sending faster than it reads
MAX_WAITING = 256
_PIECES = re.compile(r"\S+\s*")
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must not hold the events back
}

OnDelta = Callable[[str], Awaitable[None]]


class BackendFailed(Exception):
    """The assistant did not answer (after retries); the message is safe to show the client."""


@dataclass(frozen=True)
class ChatRequest:
    session_id: str
    message: str
    user_id: str | None = None


@dataclass(frozen=True)
class ChatReply:
    text: str  #: the complete reply
    chat_id: str  #: this exchange's id (VAPI's chat id on the VAPI backend)
    intent: str | None = None  #: the local responder's intent, its context for the next turn


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try VAPI's chat API (see engine.retry)."""

    attempts: int = 4
    base_delay: float = 1.0
    max_delay: float = 8.0
    total_timeout: float = 20.0
    #: a stream that sends nothing for this long is treated as failed
    stream_idle_timeout: float = 30.0


def parse_chat_request(body: bytes) -> ChatRequest | str:
    """The request, or what is wrong with it (for a 400)."""
    if not body.strip():
        return "empty body: send a JSON object with sessionId and message"
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "body is not valid JSON"
    if not isinstance(data, dict):
        return "body must be a JSON object"
    values: dict[str, str] = {}
    for name in ("sessionId", "message"):
        value = data.get(name)
        if value is None:
            return f"{name} is required"
        if not isinstance(value, str):
            return f"{name} must be a string"
        if not value.strip():
            return f"{name} must not be blank"
        values[name] = value
    if len(values["sessionId"]) > MAX_ID_LEN:
        return f"sessionId is longer than {MAX_ID_LEN} characters"
    user_id = data.get("userId")
    if user_id is not None and (not isinstance(user_id, str) or len(user_id) > MAX_ID_LEN):
        return f"userId must be a string of at most {MAX_ID_LEN} characters"
    return ChatRequest(values["sessionId"], values["message"], user_id)


class SessionLocks:
    """One FIFO lock per session with messages in flight; the entry goes when the last leaves.

    asyncio.Lock hands itself to waiters in the order they asked, and a newcomer never overtakes a
    waiter, so holding it is a queue in arrival order without a worker task per session."""

    def __init__(self) -> None:
        self._entries: dict[str, list[Any]] = {}  # id → [lock, holders and waiters]

    def waiting(self, session_id: str) -> int:
        entry = self._entries.get(session_id)
        return entry[1] if entry is not None else 0

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[None]:
        entry = self._entries.get(session_id)
        if entry is None:
            entry = self._entries[session_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._entries[session_id]


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


class ChatBackend(Protocol):
    async def reply(self, session: Session, message: str, on_delta: OnDelta | None) -> ChatReply:
        """The answer to `message` in `session`'s context; streams pieces to `on_delta` when
        given. Raises `BackendFailed`."""

    def update(self, session: Session, reply: ChatReply) -> None:
        """Records the reply's context in the session (before it is saved)."""


def new_chat_id() -> str:
    return "chat_" + secrets.token_hex(8)


class LocalChat:
    """The embedded responder: instant and deterministic."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder

    async def reply(self, session: Session, message: str, on_delta: OnDelta | None) -> ChatReply:
        answer = self.responder.reply(message, session.previous_intent)
        if on_delta is not None:
            for piece in _PIECES.findall(answer.text):
                await on_delta(piece)
        return ChatReply(answer.text, new_chat_id(), answer.intent)

    def update(self, session: Session, reply: ChatReply) -> None:
        session.previous_intent = reply.intent


class VapiChat:
    """VAPI's chat API, threaded by `previousChatId` (protocols/vapi.md §3)."""

    def __init__(
        self,
        settings: Settings,
        assistant: tuple[AssistantConfig, Responder],
        metrics: Metrics,
        retry: RetryPolicy,
    ) -> None:
        self.url = f"{settings.vapi_base_url}/chat"
        self.headers = {"Authorization": f"Bearer {settings.vapi_api_key}"}
        if settings.vapi_assistant_id:
            self.target: dict[str, Any] = {"assistantId": settings.vapi_assistant_id}
        else:
            self.target = {"assistant": inline_assistant(*assistant, settings)}
        self.metrics = metrics
        self.retry = retry
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.http = aiohttp.ClientSession()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None

    def _body(self, session: Session, message: str, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {**self.target, "input": message}
        if session.previous_chat_id:
            body["previousChatId"] = session.previous_chat_id
        if stream:
            body["stream"] = True
        return body

    def _on_retry(self, attempt: int, delay: float, reason: str) -> None:
        self.metrics.backend_retries += 1

    async def reply(self, session: Session, message: str, on_delta: OnDelta | None) -> ChatReply:
        if self.http is None:
            raise BackendFailed("the VAPI client is not running")
        if on_delta is not None:
            return await self._stream(self.http, self._body(session, message, True), on_delta)
        p = self.retry
        try:
            result = await request_with_retry(
                self.http, "POST", self.url, json=self._body(session, message, False),
                headers=self.headers, attempts=p.attempts, base_delay=p.base_delay,
                max_delay=p.max_delay, total_timeout=p.total_timeout, on_retry=self._on_retry)
        except RetryError as exc:
            last = f"HTTP {exc.status}" if exc.status is not None else "no answer"
            raise BackendFailed(f"VAPI chat failed after {exc.attempts} attempts ({last})") from exc
        if not result.ok:
            raise BackendFailed(f"VAPI chat answered HTTP {result.status}: {excerpt(result.body)}")
        try:
            chat = result.json()
        except ValueError as exc:
            raise BackendFailed("VAPI chat answered malformed JSON") from exc
        return _chat_reply(chat)

    def update(self, session: Session, reply: ChatReply) -> None:
        session.previous_chat_id = reply.chat_id

    async def _open(
        self, http: aiohttp.ClientSession, body: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        """Starts a streamed chat with the retry helper's policy (engine.retry). The helper reads
        whole answers, and a stream must be passed on as it arrives, so the attempts are made
        here until the answer starts; after that a failure ends the stream."""
        p = self.retry
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            left = max(0.001, p.total_timeout - (time.monotonic() - start))
            try:
                resp = await http.post(
                    self.url, json=body, headers=self.headers,
                    timeout=aiohttp.ClientTimeout(connect=left, sock_read=p.stream_idle_timeout))
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status not in DEFAULT_RETRY_ON:
                    if 200 <= resp.status < 300:
                        return resp
                    detail = excerpt(await resp.read())
                    resp.release()
                    raise BackendFailed(f"VAPI chat answered HTTP {resp.status}: {detail}")
                if resp.status in RETRY_AFTER_STATUSES:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                reason = f"HTTP {resp.status}"
                resp.release()
            if attempt >= p.attempts:
                raise BackendFailed(f"VAPI chat failed after {attempt} attempts ({reason})")
            delay = (min(retry_after, p.max_delay) if retry_after is not None
                     else backoff_delay(attempt - 1, p.base_delay, p.max_delay, random.random))
            if time.monotonic() - start + delay >= p.total_timeout:
                raise BackendFailed(f"VAPI chat failed after {attempt} attempts ({reason})")
            log.info("chat.vapi_retry", attempt=attempt, reason=reason, delay_s=round(delay, 3))
            self._on_retry(attempt, delay, reason)
            await asyncio.sleep(delay)

    async def _stream(
        self, http: aiohttp.ClientSession, body: dict[str, Any], on_delta: OnDelta
    ) -> ChatReply:
        resp = await self._open(http, body)
        chat_id: str | None = None
        pieces: list[str] = []
        final: ChatReply | None = None
        try:
            async for event in _sse_events(resp):
                if "output" in event:
                    # The closing event: the complete chat.
                    final = _chat_reply(event)
                    continue
                if isinstance(event.get("id"), str):
                    chat_id = event["id"]
                delta = event.get("delta")
                if isinstance(delta, str) and delta:
                    pieces.append(delta)
                    await on_delta(delta)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendFailed(f"VAPI chat stream broke: {type(exc).__name__}") from exc
        finally:
            resp.release()
        if final is not None:
            return final
        if chat_id is None:
            raise BackendFailed("VAPI chat stream ended without a chat id")
        return ChatReply("".join(pieces), chat_id)


def _chat_reply(chat: Any) -> ChatReply:
    """A VAPI chat object's id and assistant output."""
    if not isinstance(chat, dict) or not isinstance(chat.get("id"), str):
        raise BackendFailed("VAPI chat answer has no id")
    output = chat.get("output")
    if not isinstance(output, list):
        raise BackendFailed("VAPI chat answer has no output")
    text = "".join(
        m["content"] for m in output
        if isinstance(m, dict) and m.get("role") == "assistant"
        and isinstance(m.get("content"), str)
    )
    return ChatReply(text, chat["id"])


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an SSE stream's `data:` fields (malformed ones are skipped)."""
    buffer = b""
    data: list[bytes] = []
    async for chunk in resp.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif not line and data:
                event = _parse_event(b"\n".join(data))
                data.clear()
                if event is not None:
                    yield event
    if buffer.startswith(b"data:"):
        data.append(buffer[5:].removeprefix(b" "))
    if data:
        event = _parse_event(b"\n".join(data))
        if event is not None:
            yield event


def _parse_event(raw: bytes) -> dict[str, Any] | None:
    if raw.strip() == b"[DONE]":
        return None
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        log.warning("chat.bad_sse_event", data=raw[:200].decode("utf-8", "replace"))
        return None
    return event if isinstance(event, dict) else None


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


# ---------------------------------------------------------------------------------------------
# The routes
# ---------------------------------------------------------------------------------------------


class LiveCall(Protocol):
    async def close(self, reason: str) -> None: ...


class ChatService:
    def __init__(
        self,
        store: SessionStore,
        backend: ChatBackend,
        metrics: Metrics,
        calls: Mapping[str, LiveCall] | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.metrics = metrics
        self.calls: Mapping[str, LiveCall] = calls if calls is not None else {}
        self.locks = SessionLocks()

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_capped(request, MAX_BODY)
        if body is None:
            return json_error(413, f"body too large (limit {MAX_BODY} bytes)")
        parsed = parse_chat_request(body)
        if isinstance(parsed, str):
            return json_error(400, parsed)
        if self.locks.waiting(parsed.session_id) >= MAX_WAITING:
            return json_error(429, "too many messages waiting in this session")
        stream = "text/event-stream" in request.headers.get("Accept", "")
        async with self.locks.hold(parsed.session_id):
            try:
                session = await self.store.get_or_create(parsed.session_id, parsed.user_id)
            except SessionExpired:
                return json_error(410, "session expired")
            except StoreUnavailable:
                return json_error(503, "session store unavailable")
            if stream:
                return await self._exchange_streamed(request, session, parsed.message)
            try:
                reply = await self.backend.reply(session, parsed.message, None)
            except BackendFailed as exc:
                return self._failed(session, exc)
            try:
                await self._record(session, parsed.message, reply)
            except StoreUnavailable:
                return json_error(503, "session store unavailable")
            return json_response(self._answer(session, reply))

    async def _record(self, session: Session, message: str, reply: ChatReply) -> None:
        self.backend.update(session, reply)
        session.add_exchange(message, reply.text)
        await self.store.save(session)

    def _answer(self, session: Session, reply: ChatReply) -> dict[str, Any]:
        return {"reply": reply.text, "chatId": reply.chat_id, "sessionId": session.id,
                "turn": session.turns}

    def _failed(self, session: Session, exc: BackendFailed) -> web.Response:
        self.metrics.backend_errors += 1
        log.warning("chat.backend_failed", session=session.id, error=str(exc))
        return json_error(502, str(exc))

    async def _exchange_streamed(
        self, request: web.Request, session: Session, message: str
    ) -> web.StreamResponse:
        resp: web.StreamResponse | None = None

        async def on_delta(piece: str) -> None:
            nonlocal resp
            if resp is None:
                resp = web.StreamResponse(headers=SSE_HEADERS)
                await resp.prepare(request)
            await resp.write(_sse({"type": "delta", "delta": piece}))

        try:
            try:
                reply = await self.backend.reply(session, message, on_delta)
            except BackendFailed as exc:
                if resp is None:
                    return self._failed(session, exc)
                self.metrics.backend_errors += 1
                log.warning("chat.backend_failed", session=session.id, error=str(exc))
                await resp.write(_sse({"type": "error", "error": str(exc)}))
                await resp.write_eof()
                return resp
            try:
                await self._record(session, message, reply)
            except StoreUnavailable:
                if resp is None:
                    return json_error(503, "session store unavailable")
                await resp.write(_sse({"type": "error", "error": "session store unavailable"}))
                await resp.write_eof()
                return resp
            if resp is None:  # an empty reply has no deltas
                resp = web.StreamResponse(headers=SSE_HEADERS)
                await resp.prepare(request)
            await resp.write(_sse({"type": "done", **self._answer(session, reply)}))
            await resp.write_eof()
            return resp
        except ConnectionResetError:
            # The client left mid-stream; nobody is there to answer.
            log.info("chat.client_gone", session=session.id)
            return resp if resp is not None else web.Response(status=499)

    async def handle_delete(self, request: web.Request) -> web.Response:
        session_id = request.match_info["sessionId"]
        if len(session_id) > MAX_ID_LEN:
            return json_error(400, f"sessionId is longer than {MAX_ID_LEN} characters")
        # A voice call under this session id ends too: the session is everything it holds.
        call = self.calls.get(session_id)
        if call is not None:
            await call.close("session-deleted")
        # Behind the session's queued messages, so none of them re-creates it afterwards.
        async with self.locks.hold(session_id):
            try:
                await self.store.delete(session_id)
            except SessionNotFound:
                if call is None:
                    return json_error(404, "unknown session")
            except SessionExpired:
                return json_error(410, "session expired")
            except StoreUnavailable:
                return json_error(503, "session store unavailable")
        log.info("chat.session_deleted", session=session_id)
        return json_response({"deleted": session_id})


CHAT_KEY = web.AppKey("chat", ChatService)


def _assistant_of(engine: Any, settings: Settings) -> tuple[AssistantConfig, Responder]:
    """The engine's assistant (loaded once per process), or the file's."""
    if isinstance(getattr(engine, "responder", None), Responder):
        return engine.assistant, engine.responder
    return load_assistant(settings.assistant_file)


def setup_routes(app: web.Application, *, retry: RetryPolicy | None = None) -> None:
    """Adds `POST /chat` and `DELETE /session/{sessionId}`, the session store (see
    `engine.sessions.attach_store`) and the VAPI client's lifecycle; makes /health's
    `activeSessions` count the store's live sessions plus live calls."""
    if CHAT_KEY in app:
        return  # already set up (create_app does it; tests may call it again)
    engine = app[ENGINE_KEY]
    settings = engine.settings
    store = attach_store(app, settings)
    assistant = _assistant_of(engine, settings)
    backend: ChatBackend
    if settings.vapi_api_key:
        vapi = VapiChat(settings, assistant, engine.metrics, retry or RetryPolicy())
        backend = vapi

        async def start_client(app: web.Application) -> None:
            await vapi.start()

        async def close_client(app: web.Application) -> None:
            await vapi.close()

        app.on_startup.append(start_client)
        app.on_cleanup.append(close_client)
    else:
        backend = LocalChat(assistant[1])
    service = ChatService(store, backend, engine.metrics, engine.calls)
    app[CHAT_KEY] = service
    # Sync and O(1): the memory store counts exactly; Redis's count is refreshed by its sweep.
    engine.metrics.active_sessions = lambda: store.cached_count + len(engine.calls)
    engine.metrics.registry.register(StoreCollector(store))
    app.router.add_post("/chat", service.handle_chat)
    app.router.add_delete("/session/{sessionId}", service.handle_delete)
