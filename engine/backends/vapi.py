"""The VAPI backend: each engine call is one VAPI call over VAPI's WebSocket transport.

`start()` creates the call (`POST {base}/call`, through `engine.retry`) with
`transport.provider = "vapi.websocket"` and 16 kHz s16le PCM, the engine's own format, so audio
crosses without conversion; then it opens `transport.websocketCallUrl`. On that socket binary
frames are audio both ways and text frames are JSON messages (shared/protocols/vapi.md).

Outbound: `send_audio` appends the frame to a bounded deque and wakes a writer task; it never
awaits. When the socket cannot keep up (aiohttp's writer waits for the transport to drain) the
deque fills and the oldest frame is dropped and counted (`dropped_frames`): stale caller audio is
worth less than fresh audio to VAPI's endpointing. A backlog is sent as one binary message.

Inbound, generations: every assistant utterance gets a number, starting at 1. `speech-update`
assistant `started` opens the next one; its audio becomes `AudioChunk(pcm, generation)` and its
`stopped` becomes `UtteranceEnd`. A generation is stale once VAPI says `user-interrupted` or the
engine calls `interrupt(g)`; audio VAPI still sends for it is discarded here and counted
(`discarded_chunks`). Audio that arrives before its `started` message opens the next generation
at once, and the late `started` adopts it rather than opening another.

Failure: if the call cannot be created or its socket opened, or the socket drops mid-call, the
backend emits `BackendError(fatal=True)` and the call apologises and ends. There is no reconnect:
for VAPI, closing the transport socket ends the call, so there is nothing to rejoin.

Differences from shared/protocols/vapi.md, where VAPI's own documentation wins:
- `hang` means "the assistant is hanging due to a delay" (slow model, voice or tool), not a
  hang-up: it becomes a `Status`, and only `status-update` `ended` becomes `HangUp`.
- transcripts may arrive typed `transcript[transcriptType="final"]`; both spellings are read.
- there is no client message for DTMF on this transport (`send-transport-message` exists only for
  SIP and Twilio transports), so `dtmf()` is ignored.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
from typing import Any, Awaitable, Callable

import aiohttp
import orjson

from engine.backends.base import Backend, BackendFactory, CallInfo, Emit
from engine.events import (
    AudioChunk,
    BackendError,
    BackendEvent,
    HangUp,
    Interrupted,
    Status,
    Transcript,
    TransferRequest,
    UtteranceEnd,
)
from engine.log import get_logger
from engine.retry import RetryError, excerpt, request_with_retry

log = get_logger("vapi")

DEFAULT_BASE_URL = "https://api.vapi.ai"
SAMPLE_RATE = 16000
TRANSPORT = {
    "provider": "vapi.websocket",
    "audioFormat": {"format": "pcm_s16le", "container": "raw", "sampleRate": SAMPLE_RATE},
}
END_CALL = '{"type":"end-call"}'
#: messages VAPI sends many of that carry nothing the call or the browser page needs
_QUIET_TYPES = frozenset({"model-output", "conversation-update"})
#: most frames joined into one outgoing message when a backlog is sent (1 s of audio, 32 kB)
_COALESCE_MAX = 50
#: malformed messages logged in full before the log goes quiet (the counter keeps counting)
_MALFORMED_LOG_LIMIT = 5


class VapiBackend(Backend):
    """One VAPI call over the WebSocket transport. See the module docstring."""

    turn_taking = True

    def __init__(
        self,
        info: CallInfo,
        emit: Emit,
        *,
        api_key: str | None,
        assistant_id: str | None = None,
        assistant: dict[str, Any] | None = None,
        base_url: str = DEFAULT_BASE_URL,
        http_session: aiohttp.ClientSession | None = None,
        setup_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        close_timeout: float = 2.0,
        retry_attempts: int = 4,
        retry_base_delay: float = 1.0,
        retry_max_delay: float = 8.0,
        retry_sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        on_retry: Callable[[int, float, str], None] | None = None,
        max_queued_frames: int = 50,
        heartbeat: float | None = 15.0,
    ) -> None:
        super().__init__(info, emit)
        self.api_key = api_key
        self.assistant_id = assistant_id
        self.assistant = assistant
        self.base_url = base_url.rstrip("/")
        self.setup_timeout = setup_timeout
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.retry_attempts = retry_attempts
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self._retry_sleep = retry_sleep
        self._on_retry = on_retry
        self.heartbeat = heartbeat
        self._session = http_session
        self._owns_session = http_session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        # outbound caller audio: bounded, oldest dropped (see the module docstring)
        self._out: collections.deque[bytes] = collections.deque()
        self._max_queued = max(1, max_queued_frames)
        self._out_ready = asyncio.Event()
        self._setup_task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._failed = False
        self._remote_ended = False
        #: VAPI's id for the call, once created
        self.call_id: str | None = None
        #: the newest assistant utterance (0 before the first)
        self.generation = 0
        self._stale_upto = 0  # every generation up to this one is cancelled
        self._speaking = False  # between an utterance's start and its stopped message
        self._implicit_open = False  # opened by audio; its started message is still to come
        #: caller frames dropped because the socket could not keep up
        self.dropped_frames = 0
        #: assistant audio chunks discarded because their generation was cancelled
        self.discarded_chunks = 0
        self.discarded_bytes = 0
        #: text frames from VAPI that were not JSON objects with a string "type"
        self.malformed_messages = 0
        #: caller audio sent to VAPI, in bytes
        self.bytes_sent = 0

    # --- construction ---

    @classmethod
    def factory(
        cls,
        api_key: str | None = None,
        assistant_id: str | None = None,
        base_url: str | None = None,
        http_session: aiohttp.ClientSession | None = None,
        *,
        settings: Any = None,
        metrics: Any = None,
        **options: Any,
    ) -> BackendFactory:
        """A factory for `backend_factory("vapi", ...)`. Values come from the arguments, else from
        `settings` (`engine.config.Settings`). `metrics` (an `engine.metrics.Metrics`), when
        given, counts retries. `options` are constructor keywords (timeouts, retry tuning)."""
        if settings is not None:
            api_key = api_key or settings.vapi_api_key
            assistant_id = assistant_id or settings.vapi_assistant_id
            base_url = base_url or settings.vapi_base_url
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "info", "emit"}
        unknown = set(options) - known
        if unknown:
            log.debug("factory.ignored_options", options=sorted(unknown))
        kwargs = {k: v for k, v in options.items() if k in known}
        if metrics is not None and "on_retry" not in kwargs:
            def count_retry(_attempt: int, _delay: float, _reason: str) -> None:
                metrics.backend_retries += 1

            kwargs["on_retry"] = count_retry

        def make(info: CallInfo, emit: Emit) -> Backend:
            return cls(info, emit, api_key=api_key, assistant_id=assistant_id,
                       base_url=base_url or DEFAULT_BASE_URL, http_session=http_session, **kwargs)

        return make

    @property
    def connected(self) -> bool:
        """Whether the call socket is open and being read."""
        return self._reader is not None and not self._reader.done()

    # --- Backend interface ---

    async def start(self) -> None:
        if self._setup_task is not None or self._closed:
            return
        self._setup_task = asyncio.get_running_loop().create_task(
            self._setup(), name=f"vapi-setup-{self.info.session_id}")
        try:
            await self._setup_task
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                return  # close() called during set-up: not an error, nothing to report
            raise

    def send_audio(self, frame: bytes, now: float) -> None:
        if self._closed or self._failed:
            return
        out = self._out
        if len(out) >= self._max_queued:
            out.popleft()
            self.dropped_frames += 1
        out.append(frame)
        if self._writer is not None:
            self._out_ready.set()

    def interrupt(self, generation: int) -> None:
        # Only generations VAPI has started can be cancelled here: marking a future one stale
        # could silence the next reply VAPI makes; its own endpointing decides about that one.
        target = min(generation, self.generation)
        if target > self._stale_upto:
            self._stale_upto = target
            log.debug("vapi.interrupt", session=self.info.session_id, generation=target)

    def dtmf(self, digit: str) -> None:
        log.debug("vapi.dtmf_ignored", session=self.info.session_id, digit=digit)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sid = self.info.session_id
        await _cancel(self._setup_task)
        # the reader first: an end we cause is not a socket lost mid-call
        await _cancel(self._reader, self._writer)
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.send_str(END_CALL), self.close_timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), self.close_timeout)
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._out.clear()
        log.info("vapi.closed", session=sid, call_id=self.call_id, bytes_sent=self.bytes_sent,
                 dropped_frames=self.dropped_frames, discarded_chunks=self.discarded_chunks,
                 malformed_messages=self.malformed_messages)

    # --- set-up ---

    async def _setup(self) -> None:
        sid = self.info.session_id
        if not self.api_key:
            self._fail("VAPI_API_KEY is not set")
            return
        if not self.assistant_id and not self.assistant:
            self._fail("no VAPI assistant: set VAPI_ASSISTANT_ID")
            return
        if self._session is None:
            self._session = aiohttp.ClientSession()
        session = self._session
        loop = asyncio.get_running_loop()
        started = loop.time()
        url = f"{self.base_url}/call"
        try:
            result = await request_with_retry(
                session, "POST", url, json=self._call_body(),
                headers={"Authorization": f"Bearer {self.api_key}"},
                attempts=self.retry_attempts, base_delay=self.retry_base_delay,
                max_delay=self.retry_max_delay, total_timeout=self.setup_timeout,
                sleep=self._retry_sleep, on_retry=self._on_retry)
        except RetryError as exc:
            self._fail(f"VAPI call could not be created: {exc}")
            return
        except aiohttp.ClientError as exc:
            self._fail(f"VAPI call could not be created: {type(exc).__name__}: {exc}")
            return
        if not result.ok:
            self._fail(f"VAPI refused the call: HTTP {result.status}: {excerpt(result.body)}")
            return
        try:
            call = result.json()
            ws_url = call["transport"]["websocketCallUrl"]
            if not isinstance(ws_url, str):
                raise TypeError("websocketCallUrl is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            self._fail(f"VAPI answered with a malformed call object ({exc}): "
                       f"{excerpt(result.body)}")
            return
        self.call_id = call.get("id") if isinstance(call.get("id"), str) else None
        log.info("vapi.call_created", session=sid, call_id=self.call_id,
                 attempts=result.attempts, ms=round((loop.time() - started) * 1000, 1))
        try:
            self._ws = await asyncio.wait_for(
                session.ws_connect(ws_url, heartbeat=self.heartbeat, autoping=True,
                                   max_msg_size=4 * 1024 * 1024),
                self.connect_timeout)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._fail(f"VAPI call socket could not be opened: {type(exc).__name__}: {exc}")
            return
        self._reader = loop.create_task(self._read_loop(self._ws), name=f"vapi-reader-{sid}")
        self._writer = loop.create_task(self._write_loop(self._ws), name=f"vapi-writer-{sid}")
        if self._out:
            self._out_ready.set()  # audio queued while the call was being set up
        log.info("vapi.connected", session=sid, call_id=self.call_id,
                 ms=round((loop.time() - started) * 1000, 1))

    def _call_body(self) -> dict[str, Any]:
        info = self.info
        metadata: dict[str, Any] = {"engineSessionId": info.session_id,
                                    "engineTransport": info.transport}
        if info.call_sid:
            metadata["callSid"] = info.call_sid
        body: dict[str, Any] = {"transport": TRANSPORT, "metadata": metadata}
        if self.assistant_id:
            body["assistantId"] = self.assistant_id
        else:
            body["assistant"] = self.assistant
        if info.caller:
            body["assistantOverrides"] = {"variableValues": {"callerNumber": info.caller}}
        return body

    # --- the socket ---

    async def _write_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        out, ready = self._out, self._out_ready
        try:
            while True:
                if not out:
                    ready.clear()
                    await ready.wait()
                    continue
                if len(out) == 1:
                    data = out.popleft()
                else:  # a backlog goes as one message, of a bounded size
                    data = b"".join(out.popleft() for _ in range(min(len(out), _COALESCE_MAX)))
                # returns at once unless the transport is paused (its buffer over the limit)
                await ws.send_bytes(data)
                self.bytes_sent += len(data)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            # the reader sees the socket go too, and reports it
            log.debug("vapi.writer_stopped", session=self.info.session_id, error=repr(exc))

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        reason = "closed"
        try:
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self._on_audio(msg.data)
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    self._on_text(msg.data)
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    reason = f"socket error: {ws.exception()!r}"
                    break
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                  aiohttp.WSMsgType.CLOSED):
                    reason = f"closed by VAPI (code {ws.close_code})"
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must end the call, not hang it silently
            log.exception("vapi.reader_failed", session=self.info.session_id)
            reason = f"reader failed: {exc!r}"
        if self._writer is not None:
            self._writer.cancel()
        if not self._remote_ended and not self._closed:
            self._fail(f"VAPI call socket lost mid-call: {reason}")

    # --- what VAPI sends ---

    def _on_audio(self, pcm: bytes) -> None:
        if not self._speaking:
            if 0 < self.generation <= self._stale_upto:
                self._discard(pcm)  # the tail of a cancelled utterance
                return
            # audio ahead of its speech-update: open the next utterance now
            self.generation += 1
            self._speaking = True
            self._implicit_open = True
        generation = self.generation
        if generation <= self._stale_upto:
            self._discard(pcm)
            return
        self._emit(AudioChunk(pcm, generation))

    def _discard(self, pcm: bytes) -> None:
        self.discarded_chunks += 1
        self.discarded_bytes += len(pcm)

    def _on_text(self, text: str) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self.malformed_messages += 1
            if self.malformed_messages <= _MALFORMED_LOG_LIMIT:
                log.warning("vapi.malformed_message", session=self.info.session_id,
                            text=text[:200], count=self.malformed_messages)
            return
        kind: str = msg["type"]
        if kind == "speech-update":
            self._on_speech_update(msg)
        elif kind == "transcript" or kind.startswith("transcript["):
            text_value = msg.get("transcript")
            if isinstance(text_value, str):
                self._emit(Transcript(text_value, msg.get("transcriptType") == "final",
                                      str(msg.get("role") or "user")))
        elif kind == "user-interrupted":
            self._on_user_interrupted()
        elif kind == "status-update":
            status = msg.get("status")
            if status == "ended":
                self._remote_ended = True
                self._emit(HangUp(str(msg.get("endedReason") or "assistant-ended-call")))
            else:
                self._emit(Status("status-update", {"status": status}))
        elif kind == "transfer-update":
            self._on_transfer_update(msg)
        elif kind in ("tool-calls", "function-call"):
            calls = msg.get("toolCallList") or msg.get("toolCalls") or []
            names = [c.get("function", {}).get("name") for c in calls
                     if isinstance(c, dict) and isinstance(c.get("function"), dict)]
            if kind == "function-call" and isinstance(msg.get("functionCall"), dict):
                names.append(msg["functionCall"].get("name"))
            self._emit(Status(kind, {"names": names}))
        elif kind == "hang":
            self._emit(Status("hang", {}))
        elif kind == "voice-input":
            self._emit(Status("voice-input", {"input": msg.get("input")}))
        elif kind in _QUIET_TYPES:
            pass
        else:
            log.debug("vapi.message_ignored", session=self.info.session_id, type=kind)

    def _on_speech_update(self, msg: dict[str, Any]) -> None:
        role, status = msg.get("role"), msg.get("status")
        if role == "assistant" and status == "started":
            if self._implicit_open:
                self._implicit_open = False  # its audio came first; this is the same utterance
            else:
                if self._speaking and self.generation > self._stale_upto:
                    # the previous utterance never got its stopped message
                    self._emit(UtteranceEnd(self.generation))
                self.generation += 1
                self._speaking = True
        elif role == "assistant" and status == "stopped":
            self._implicit_open = False
            if self._speaking:
                self._speaking = False
                if self.generation > self._stale_upto:
                    self._emit(UtteranceEnd(self.generation))
        self._emit(Status("speech-update", {
            "role": role, "status": status, "turn": msg.get("turn"),
            "generation": self.generation if role == "assistant" else None}))

    def _on_user_interrupted(self) -> None:
        generation = self.generation
        if generation > self._stale_upto:
            # stale from now on: VAPI may still send audio it had queued for it
            self._stale_upto = generation
            self._emit(Interrupted(generation))
        else:
            self._emit(Status("user-interrupted", {"generation": generation or None}))

    def _on_transfer_update(self, msg: dict[str, Any]) -> None:
        destination = msg.get("destination")
        self._emit(Status("transfer-update", {"destination": destination}))
        if (isinstance(destination, dict) and destination.get("type") == "number"
                and isinstance(destination.get("number"), str)):
            message = destination.get("message")
            if isinstance(message, str) and message:
                self._emit(TransferRequest(destination["number"], message))
            else:
                self._emit(TransferRequest(destination["number"]))

    # --- helpers ---

    def _emit(self, event: BackendEvent) -> None:
        try:
            self.emit(event)
        except Exception:  # the call's handler failing must not kill the reader
            log.exception("vapi.emit_failed", session=self.info.session_id,
                          kind=type(event).__name__)

    def _fail(self, message: str) -> None:
        if self._failed or self._closed:
            return
        self._failed = True
        self._out.clear()
        log.error("vapi.failed", session=self.info.session_id, call_id=self.call_id,
                  message=message)
        self._emit(BackendError(message, fatal=True))


async def _cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait until each has finished (without swallowing our own
    cancellation, as awaiting each under a suppress would)."""
    live = [t for t in tasks if t is not None and not t.done()]
    for task in live:
        task.cancel()
    if live:
        await asyncio.wait(live)
