"""A local stand-in for VAPI: `POST /call` with the WebSocket transport, the call socket,
`POST /chat`, and signed server messages (webhooks), with fault modes; it records everything it
receives.

It serves real sockets on loopback so the engine's clients are tested exactly as they run against
api.vapi.ai (see shared/protocols/vapi.md):

    async with VapiStandin(api_key="k") as vapi:    # or: await vapi.start() ... await vapi.stop()
        vapi.control.fail_429 = 2                          # faults, set per test
        ... point the engine at vapi.base_url ...
        vapi.requests[0].headers["Authorization"]          # what it received
        vapi.last_call().audio_in                          # caller audio, byte for byte

Also runnable on its own: `python -m tests.vapi_standin --port 8765 --api-key k`; then
`POST /_control` with a JSON object changes `Control` fields and `GET /_recorded` lists what it saw.

What it cannot do: recognise speech. The caller's turn is detected by energy (RMS over 20 ms
frames, an onset of `onset_ms`, an end after `endpoint_silence_ms` of quiet), the "transcript" is
`Control.transcript_text`, and the reply is a synthetic vowel sequence streamed in bursts faster
than real time, as VAPI streams TTS. Playout is estimated in wall-clock time from the first chunk
sent; caller speech during it is a barge-in (`user-interrupted`).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import aiohttp
import numpy as np
from aiohttp import web

FRAME_MS = 20
#: caller audio kept per call; beyond this only the byte count grows
MAX_RECORDED_AUDIO = 8 * 1024 * 1024

#: text frames that are not valid VAPI messages, sent by the `malformed_frames` fault
MALFORMED_FRAMES = ("{not json", "[1, 2, 3]", '{"no_type": true}', '{"type": 42}', "", '"a string"')


# ---------------------------------------------------------------------------------------------
# Audio: synthetic speech for replies and test callers
# ---------------------------------------------------------------------------------------------

#: (F1, F2) of /a/ /e/ /i/ /o/ /u/, and the pitch each is spoken at
_VOWELS = (((730, 1090), 120.0), ((530, 1840), 135.0), ((270, 2290), 150.0),
           ((570, 840), 140.0), ((300, 870), 125.0))


@functools.lru_cache(maxsize=32)
def speech_like(ms: int, rate: int = 16000, seed: int = 0, level: float = 0.3) -> bytes:
    """A vowel sequence (harmonics shaped by two formants, ~300 ms per vowel, short fades), as
    s16le PCM. Loud enough (`level` of full scale at the peaks) to read as speech to any VAD."""
    n = rate * ms // 1000
    out = np.zeros(n, dtype=np.float64)
    seg = max(1, rate * 300 // 1000)
    fade = max(1, rate * 10 // 1000)
    for k, start in enumerate(range(0, n, seg)):
        (f1, f2), f0 = _VOWELS[(k + seed) % len(_VOWELS)]
        length = min(seg, n - start)
        t = np.arange(length) / rate
        wave = np.zeros(length)
        for h in range(1, 30):
            f = h * f0
            if f >= rate / 2:
                break
            gain = 1.0 / (1.0 + ((f - f1) / 90.0) ** 2) + 0.5 / (1.0 + ((f - f2) / 120.0) ** 2)
            wave += gain * np.sin(2 * np.pi * f * t + h * 0.7)
        env = np.ones(length)
        ramp = min(fade, length // 2)
        if ramp:
            env[:ramp] = np.linspace(0.0, 1.0, ramp)
            env[length - ramp:] = np.linspace(1.0, 0.0, ramp)
        out[start:start + length] = wave * env
    peak = float(np.max(np.abs(out))) or 1.0
    return (out / peak * level * 32767).astype("<i2").tobytes()


@functools.lru_cache(maxsize=32)
def room_noise(ms: int, rate: int = 16000, seed: int = 1, rms: float = 30.0) -> bytes:
    """Quiet background noise (about -60 dBFS): what a line carries between words."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, rms, rate * ms // 1000)).astype("<i2").tobytes()


def frames(pcm: bytes, frame_bytes: int = 640) -> list[bytes]:
    """`pcm` cut into whole frames (a short tail is dropped)."""
    return [pcm[i:i + frame_bytes] for i in range(0, len(pcm) - frame_bytes + 1, frame_bytes)]


def rms(frame: bytes) -> float:
    samples = np.frombuffer(frame, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples * samples))) if samples.size else 0.0


# ---------------------------------------------------------------------------------------------
# Control (faults and script) and records
# ---------------------------------------------------------------------------------------------


@dataclass
class Control:
    """What the stand-in does; tests change fields directly, or over `POST /_control`."""

    # --- REST faults (POST /call and POST /chat), counted down per request ---
    fail_429: int = 0  #: answer the next N requests 429
    retry_after: str | None = "1"  #: the Retry-After header sent with a 429 (seconds or HTTP date)
    fail_500: int = 0  #: answer the next N requests 500
    malformed_json: int = 0  #: answer the next N successful requests with a truncated JSON body
    delay_s: float = 0.0  #: wait this long before answering each request
    # --- the conversation ---
    transcript_text: str = "What are your opening hours?"  #: what the caller "said"
    reply_text: str = "We are open from nine to five, Monday to Friday."  #: the assistant's words
    reply_ms: int = 1500  #: length of each spoken reply
    chunk_ms: int = 20  #: reply audio per binary frame
    burst_chunks: int = 8  #: frames sent back to back ...
    burst_gap_s: float = 0.04  #: ... then a pause: 160 ms of audio per 40 ms, 4x real time
    first_message: str | None = None  #: speak this as soon as the socket opens
    speech_rms: float = 500.0  #: a 20 ms frame at or above this RMS is speech
    onset_ms: int = 60  #: speech this long starts the caller's turn
    endpoint_silence_ms: int = 500  #: quiet this long ends it
    # --- call socket faults ---
    drop_after_ms: float | None = None  #: abort the socket (no close frame) this long after opening
    malformed_frames: bool = False  #: send MALFORMED_FRAMES at the start and inside each reply
    stale_audio: bool = False  #: keep sending an interrupted reply's audio after user-interrupted
    stale_ms: int = 300  #: how much stale audio
    # --- chat ---
    chat_reply: str = "You said: {input} (message {n} of this conversation)"  #: reply template
    #: after the deltas, send the complete chat as a last event. shared/protocols/vapi.md says
    #: VAPI does; VAPI's docs (CreateChatStreamResponse: id, sessionId, path, delta) do not, so it
    #: is off: a client must get the chat id from the deltas' `id`, as VAPI's own example does.
    chat_final_event: bool = False

    def update(self, **changes: Any) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown control fields: {sorted(unknown)}")
        for name, value in changes.items():
            setattr(self, name, value)


@dataclass
class RecordedRequest:
    """One HTTP request as received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0  #: the status it was answered with

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ReplyRecord:
    """One assistant utterance on a call socket."""

    turn: int  #: 1, 2, ... per call
    text: str
    pcm: bytes  #: the whole utterance
    bytes_sent: int = 0  #: how much of it went out before it ended or was cut
    interrupted: bool = False  #: a barge-in cut it
    stale_bytes: int = 0  #: audio sent after user-interrupted (the stale_audio fault)
    completed: bool = False  #: all of it was sent


@dataclass
class CallRecord:
    """One call: how it was created and everything that crossed its socket."""

    id: str
    body: dict[str, Any]  #: the POST /call body
    sample_rate: int
    audio_in: bytearray = field(default_factory=bytearray)  #: caller audio (up to 8 MB)
    audio_in_bytes: int = 0  #: caller audio received in total
    messages_in: list[Any] = field(default_factory=list)  #: text frames received (raw if not JSON)
    messages_out: list[Any] = field(default_factory=list)  #: text frames sent
    replies: list[ReplyRecord] = field(default_factory=list)
    connections: int = 0  #: sockets opened for it
    ended: bool = False
    ended_reason: str | None = None
    dropped: bool = False  #: the drop fault fired

    def control_messages(self, *types: str) -> list[dict[str, Any]]:
        """Client text messages of the given types (all JSON objects if none given)."""
        return [m for m in self.messages_in
                if isinstance(m, dict) and (not types or m.get("type") in types)]


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    # VAPI's API answers errors in NestJS's shape
    reason = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
              500: "Internal Server Error"}.get(status, "Error")
    return web.json_response({"message": message, "error": reason, "statusCode": status},
                             status=status, headers=headers)


class VapiStandin:
    def __init__(self, api_key: str = "standin-key", *, host: str = "127.0.0.1",
                 control: Control | None = None) -> None:
        self.api_key = api_key
        self.host = host
        self.control = control or Control()
        self.requests: list[RecordedRequest] = []
        self.calls: dict[str, CallRecord] = {}
        self.chats: dict[str, dict[str, Any]] = {}
        self.port = 0
        self._threads: dict[str, list[dict[str, Any]]] = {}  # chat id or session id → messages
        self._sockets: dict[str, _CallSocket] = {}
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._middleware])
        self.app.router.add_post("/call", self._create_call)
        self.app.router.add_post("/chat", self._create_chat)
        self.app.router.add_get("/call/{call_id}", self._get_call)
        self.app.router.add_get("/{call_id}/transport", self._transport)
        self.app.router.add_post("/_control", self._set_control)
        self.app.router.add_get("/_recorded", self._recorded)

    # --- lifecycle ---

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    shutdown_timeout=0.25)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.base_url

    async def stop(self) -> None:
        for sock in list(self._sockets.values()):
            await sock.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> VapiStandin:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ws_url(self, call_id: str) -> str:
        return f"ws://{self.host}:{self.port}/{call_id}/transport"

    # --- what tests ask ---

    def requests_to(self, path: str, method: str = "POST") -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path and r.method == method]

    def last_call(self) -> CallRecord:
        if not self.calls:
            raise LookupError("no call was created")
        return list(self.calls.values())[-1]

    def is_connected(self, call_id: str) -> bool:
        return call_id in self._sockets

    async def push(self, call_id: str, message: dict[str, Any] | str) -> None:
        """Send any text frame on a live call socket (a server message the script does not make)."""
        sock = self._sockets[call_id]
        if isinstance(message, str):
            await sock.send_text(message)
        else:
            await sock.send_json(message)

    async def push_audio(self, call_id: str, pcm: bytes) -> None:
        """Send one binary frame on a live call socket, outside any scripted reply."""
        await self._sockets[call_id].send_audio(pcm)

    async def end_call(self, call_id: str, reason: str = "assistant-ended-call") -> None:
        """The assistant ends the call: `status-update` ended, then the socket closes."""
        await self._sockets[call_id].end(reason)

    # --- HTTP plumbing ---

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_") or request.path.endswith("/transport"):
            return await handler(request)
        record = RecordedRequest(request.method, request.path, dict(request.headers),
                                 await request.read())
        self.requests.append(record)
        c = self.control
        if c.delay_s > 0:
            await asyncio.sleep(c.delay_s)
        response: web.StreamResponse
        if c.fail_429 > 0:
            c.fail_429 -= 1
            headers = {"Retry-After": c.retry_after} if c.retry_after is not None else None
            response = _error(429, "Too many requests, slow down.", headers)
        elif c.fail_500 > 0:
            c.fail_500 -= 1
            response = _error(500, "Internal server error (stand-in fault)")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _error(exc.status, exc.reason)
            if (c.malformed_json > 0 and isinstance(response, web.Response)
                    and 200 <= response.status < 300 and response.body):
                c.malformed_json -= 1
                body = bytes(response.body)  # type: ignore[arg-type]
                response = web.Response(body=body[: max(1, len(body) // 2)], status=response.status,
                                        content_type="application/json")
        record.status = response.status
        return response

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.api_key):
            return _error(401, "Invalid Key. Hot tip, you may be using the private key instead of "
                               "the public key, or vice versa.")
        return None

    async def _json_body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError:
            return None

    # --- POST /call ---

    async def _create_call(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        body = await self._json_body(request)
        problem, rate, audio_format = _validate_call(body)
        if problem:
            return _error(400, problem)
        call_id = str(uuid.uuid4())
        self.calls[call_id] = CallRecord(call_id, body, rate)
        now = _iso_now()
        call: dict[str, Any] = {
            "id": call_id, "orgId": "standin-org", "type": "vapi.websocketCall",
            "status": "queued", "cost": 0, "createdAt": now, "updatedAt": now,
            "transport": {"provider": "vapi.websocket", "websocketCallUrl": self.ws_url(call_id),
                          "audioFormat": audio_format},
        }
        for key in ("assistantId", "assistantOverrides", "metadata", "name"):
            if key in body:
                call[key] = body[key]
        return web.json_response(call, status=201)

    async def _get_call(self, request: web.Request) -> web.Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        rec = self.calls.get(request.match_info["call_id"])
        if rec is None:
            return _error(404, "Call not found")
        status = "ended" if rec.ended else ("in-progress" if rec.connections else "queued")
        answer: dict[str, Any] = {"id": rec.id, "type": "vapi.websocketCall", "status": status}
        if rec.ended_reason:
            answer["endedReason"] = rec.ended_reason
        return web.json_response(answer)

    # --- the call socket ---

    async def _transport(self, request: web.Request) -> web.StreamResponse:
        call_id = request.match_info["call_id"]
        rec = self.calls.get(call_id)
        if rec is None or rec.ended or call_id in self._sockets:
            # closing the socket ends a VAPI call: there is nothing to rejoin
            return _error(404, "Call not found or already ended")
        ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        rec.connections += 1
        sock = _CallSocket(self, rec, ws, request)
        self._sockets[call_id] = sock
        try:
            await sock.run()
        finally:
            self._sockets.pop(call_id, None)
        return ws

    # --- POST /chat ---

    async def _create_chat(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        body = await self._json_body(request)
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        raw_input = body.get("input")
        if isinstance(raw_input, str) and raw_input:
            new_messages = [{"role": "user", "content": raw_input}]
        elif (isinstance(raw_input, list) and raw_input
              and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                      and isinstance(m.get("content"), str) for m in raw_input)):
            new_messages = [dict(m) for m in raw_input]
        else:
            return _error(400, "input must be a non-empty string or a list of {role, content}")
        previous_id, session_id = body.get("previousChatId"), body.get("sessionId")
        if previous_id and session_id:
            return _error(400, "previousChatId and sessionId cannot be used together")
        history: list[dict[str, Any]] = []
        previous = None
        if previous_id:
            previous = self.chats.get(str(previous_id))
            if previous is None:
                return _error(404, f"Chat {previous_id} not found")
            history = self._threads[previous["id"]]
        elif session_id:
            history = self._threads.get(f"session:{session_id}", [])
        assistant_id = body.get("assistantId") or (previous or {}).get("assistantId")
        if not assistant_id and not isinstance(body.get("assistant"), dict):
            return _error(400, "assistantId or assistant must be provided")
        thread = history + new_messages
        turn = sum(1 for m in thread if m.get("role") == "user")
        last_user = next((m["content"] for m in reversed(new_messages) if m["role"] == "user"),
                         new_messages[-1]["content"])
        reply = self.control.chat_reply.format(input=last_user, n=turn)
        now = _iso_now()
        chat: dict[str, Any] = {
            "id": f"chat_{uuid.uuid4().hex[:16]}", "orgId": "standin-org",
            "messages": new_messages, "output": [{"role": "assistant", "content": reply}],
            "createdAt": now, "updatedAt": now,
        }
        if assistant_id:
            chat["assistantId"] = assistant_id
        if previous_id:
            chat["previousChatId"] = previous_id
        if session_id:
            chat["sessionId"] = session_id
        self.chats[chat["id"]] = chat
        self._threads[chat["id"]] = thread + chat["output"]
        if session_id:
            self._threads[f"session:{session_id}"] = thread + chat["output"]
        if not body.get("stream"):
            return web.json_response(chat, status=201)
        return await self._stream_chat(request, chat, reply)

    async def _stream_chat(self, request: web.Request, chat: dict[str, Any],
                           reply: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=201, headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for piece in re.findall(r"\S+\s*", reply):
            event = {"id": chat["id"], "path": "chat.output[0].content", "delta": piece}
            if "sessionId" in chat:
                event["sessionId"] = chat["sessionId"]
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await asyncio.sleep(0)
        if self.control.chat_final_event:
            await resp.write(b"data: " + json.dumps(chat).encode() + b"\n\n")
        await resp.write_eof()  # the stream ends when the connection does
        return resp

    # --- control routes (for a stand-in running in another process) ---

    async def _set_control(self, request: web.Request) -> web.Response:
        changes = await self._json_body(request)
        if not isinstance(changes, dict):
            return _error(400, "body must be a JSON object of Control fields")
        try:
            self.control.update(**changes)
        except ValueError as exc:
            return _error(400, str(exc))
        return web.json_response(dataclasses.asdict(self.control))

    async def _recorded(self, request: web.Request) -> web.Response:
        return web.json_response({
            "requests": [{"method": r.method, "path": r.path, "status": r.status,
                          "headers": r.headers, "body": r.body.decode("utf-8", "replace")}
                         for r in self.requests],
            "calls": [{"id": c.id, "audioInBytes": c.audio_in_bytes, "messagesIn": c.messages_in,
                       "replies": [{"turn": r.turn, "bytesSent": r.bytes_sent,
                                    "interrupted": r.interrupted, "staleBytes": r.stale_bytes}
                                   for r in c.replies],
                       "ended": c.ended, "endedReason": c.ended_reason}
                      for c in self.calls.values()],
        })


def _validate_call(body: Any) -> tuple[str | None, int, dict[str, Any]]:
    """The problem with a POST /call body (None if fine), its sample rate and audio format."""
    fmt: dict[str, Any] = {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000}
    if not isinstance(body, dict):
        return "body must be a JSON object", 0, fmt
    if not (isinstance(body.get("assistantId"), str) and body["assistantId"]) and not isinstance(
            body.get("assistant"), dict):
        return "assistantId or assistant must be provided", 0, fmt
    transport = body.get("transport")
    if not isinstance(transport, dict) or transport.get("provider") != "vapi.websocket":
        return "the stand-in only serves transport.provider 'vapi.websocket'", 0, fmt
    if "phoneNumberId" in body or "phoneNumber" in body:
        return "phoneNumber and phoneNumberId are not permitted with this transport", 0, fmt
    for key in ("metadata", "assistantOverrides"):
        if key in body and not isinstance(body[key], dict):
            return f"{key} must be an object", 0, fmt
    declared = transport.get("audioFormat", {})
    if not isinstance(declared, dict):
        return "transport.audioFormat must be an object", 0, fmt
    fmt = {**fmt, **declared}
    if fmt["format"] not in ("pcm_s16le", "mulaw"):
        return "transport.audioFormat.format must be one of pcm_s16le, mulaw", 0, fmt
    if fmt["format"] != "pcm_s16le":
        return "the stand-in speaks pcm_s16le only", 0, fmt
    if fmt["container"] != "raw":
        return "transport.audioFormat.container must be raw", 0, fmt
    rate = fmt["sampleRate"]
    if not isinstance(rate, int) or isinstance(rate, bool) or not 8000 <= rate <= 48000:
        return "transport.audioFormat.sampleRate must be an integer from 8000 to 48000", 0, fmt
    return None, rate, fmt


class _CallSocket:
    """One live call socket: turn detection on the caller's audio, the scripted replies, faults."""

    def __init__(self, standin: VapiStandin, rec: CallRecord, ws: web.WebSocketResponse,
                 request: web.Request) -> None:
        self.standin = standin
        self.rec = rec
        self.ws = ws
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.frame_bytes = rec.sample_rate * FRAME_MS // 1000 * 2
        self.pending = bytearray()
        self.speech_run = 0
        self.silence_run = 0
        self.in_speech = False
        self.turn = 0
        self.current: ReplyRecord | None = None
        self.reply_task: asyncio.Task[None] | None = None
        self.playing_until = 0.0
        self.muted = False
        self.closing = False
        self.send_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def c(self) -> Control:
        return self.standin.control

    # --- sending ---

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_text(json.dumps(message), record=message)

    async def send_text(self, text: str, record: Any = None) -> None:
        if self.ws.closed:
            return
        async with self.send_lock:
            self.rec.messages_out.append(text if record is None else record)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_str(text)

    async def send_audio(self, chunk: bytes) -> bool:
        if self.ws.closed:
            return False
        async with self.send_lock:
            try:
                await self.ws.send_bytes(chunk)
            except (ConnectionError, RuntimeError):
                return False
        return True

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- the session ---

    async def run(self) -> None:
        await self.send_json({"type": "status-update", "status": "in-progress"})
        if self.c.malformed_frames:
            for text in MALFORMED_FRAMES:
                await self.send_text(text)
        if self.c.drop_after_ms is not None:
            self.spawn(self._drop_later(self.c.drop_after_ms / 1000.0))
        if self.c.first_message:
            self.start_reply(self.c.first_message)
        try:
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    await self.on_audio(msg.data)
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    await self.on_text(msg.data)
                else:
                    break
        finally:
            await self.shutdown()
            if not self.rec.ended:
                # the client closed the socket: for VAPI that ends the call
                self.rec.ended, self.rec.ended_reason = True, "customer-ended-call"

    async def shutdown(self) -> None:
        self.closing = True
        others = [t for t in self.tasks if t is not asyncio.current_task() and not t.done()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others)
        if not self.ws.closed:
            await self.ws.close()

    async def end(self, reason: str) -> None:
        if self.rec.ended:
            return
        self.rec.ended, self.rec.ended_reason = True, reason
        if self.reply_task is not None and not self.reply_task.done():
            self.reply_task.cancel()
        await self.send_json({"type": "status-update", "status": "ended", "endedReason": reason})
        await self.ws.close()

    async def _drop_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.rec.dropped = True
        self.rec.ended, self.rec.ended_reason = True, "pipeline-error-transport-dropped"
        if self.reply_task is not None and not self.reply_task.done():
            self.reply_task.cancel()
        transport = self.request.transport
        if transport is not None:
            transport.abort()  # no close frame, like a network failure
        else:
            await self.ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR)

    # --- caller audio: energy endpointing ---

    async def on_audio(self, data: bytes) -> None:
        self.rec.audio_in_bytes += len(data)
        if len(self.rec.audio_in) + len(data) <= MAX_RECORDED_AUDIO:
            self.rec.audio_in += data
        self.pending += data
        fb = self.frame_bytes
        onset = max(1, self.c.onset_ms // FRAME_MS)
        endpoint = max(1, self.c.endpoint_silence_ms // FRAME_MS)
        while len(self.pending) >= fb:
            frame = bytes(self.pending[:fb])
            del self.pending[:fb]
            if rms(frame) >= self.c.speech_rms:
                self.speech_run += 1
                self.silence_run = 0
                if not self.in_speech and self.speech_run >= onset:
                    self.in_speech = True
                    await self.user_started()
            else:
                self.speech_run = 0
                if self.in_speech:
                    self.silence_run += 1
                    if self.silence_run >= endpoint:
                        self.in_speech = False
                        self.silence_run = 0
                        await self.user_stopped()

    def reply_active(self) -> bool:
        r = self.current
        if r is None or r.interrupted:
            return False
        sending = self.reply_task is not None and not self.reply_task.done()
        return sending or self.loop.time() < self.playing_until

    async def user_started(self) -> None:
        await self.send_json({"type": "speech-update", "role": "user", "status": "started",
                              "turn": self.turn})
        words = self.c.transcript_text.split()
        await self.send_json({"type": "transcript", "role": "user", "transcriptType": "partial",
                              "transcript": words[0] if words else ""})
        if self.reply_active():
            await self.interrupt_reply()

    async def interrupt_reply(self) -> None:
        r = self.current
        assert r is not None
        r.interrupted = True
        self.playing_until = 0.0
        if self.reply_task is not None and not self.reply_task.done():
            self.reply_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reply_task
        await self.send_json({"type": "user-interrupted"})
        if self.c.stale_audio:
            stale_len = self.standin_bytes(self.c.stale_ms)
            # what was still to come, or (if all of it had gone out) its tail again
            stale = r.pcm[r.bytes_sent:] or r.pcm[-stale_len:]
            for chunk in self.chunks(stale[:stale_len]):
                if await self.send_audio(chunk):
                    r.stale_bytes += len(chunk)
        if not r.completed:
            await self.send_json({"type": "speech-update", "role": "assistant",
                                  "status": "stopped", "turn": r.turn})

    async def user_stopped(self) -> None:
        await self.send_json({"type": "speech-update", "role": "user", "status": "stopped",
                              "turn": self.turn})
        await self.send_json({"type": "transcript", "role": "user", "transcriptType": "final",
                              "transcript": self.c.transcript_text})
        self.start_reply(self.c.reply_text)

    # --- replies ---

    def standin_bytes(self, ms: int) -> int:
        return self.rec.sample_rate * ms // 1000 * 2

    def chunks(self, pcm: bytes) -> list[bytes]:
        size = max(2, self.standin_bytes(self.c.chunk_ms))
        return [pcm[i:i + size] for i in range(0, len(pcm), size)]

    def start_reply(self, text: str, end_after: bool = False) -> None:
        if self.reply_task is not None and not self.reply_task.done():
            self.reply_task.cancel()  # superseded by a newer reply
        self.turn += 1
        pcm = speech_like(self.c.reply_ms, self.rec.sample_rate, seed=self.turn)
        reply = ReplyRecord(self.turn, text, pcm)
        self.rec.replies.append(reply)
        self.current = reply
        self.reply_task = self.spawn(self._speak(reply, end_after))

    async def _speak(self, r: ReplyRecord, end_after: bool) -> None:
        await self.send_json({"type": "speech-update", "role": "assistant", "status": "started",
                              "turn": r.turn})
        duration = len(r.pcm) / (self.rec.sample_rate * 2)
        for i, chunk in enumerate(self.chunks(r.pcm)):
            if i == 0:
                self.playing_until = self.loop.time() + duration
            if self.c.malformed_frames and i == 3:
                await self.send_text(MALFORMED_FRAMES[i % len(MALFORMED_FRAMES)])
            if not self.muted and not await self.send_audio(chunk):
                return
            r.bytes_sent += len(chunk)
            if (i + 1) % max(1, self.c.burst_chunks) == 0:
                await asyncio.sleep(self.c.burst_gap_s)
        await self.send_json({"type": "transcript", "role": "assistant",
                              "transcriptType": "final", "transcript": r.text})
        await self.send_json({"type": "speech-update", "role": "assistant", "status": "stopped",
                              "turn": r.turn})
        r.completed = True
        if end_after:
            self.spawn(self.end("assistant-said-end-call-phrase"))

    # --- client messages ---

    async def on_text(self, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            self.rec.messages_in.append(data)
            return
        self.rec.messages_in.append(msg)
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        if kind in ("end-call", "hangup"):
            await self.end("customer-ended-call")
        elif kind == "say" and isinstance(msg.get("content"), str):
            self.start_reply(msg["content"], end_after=bool(msg.get("endCallAfterSpoken")))
        elif kind == "add-message" and msg.get("triggerResponseEnabled", True):
            self.start_reply(self.c.reply_text)
        elif kind == "control":
            control = msg.get("control")
            if control == "mute-assistant":
                self.muted = True
            elif control == "unmute-assistant":
                self.muted = False
            elif control == "say-first-message":
                self.start_reply(self.c.first_message or self.c.reply_text)
        elif kind == "transfer":
            await self.send_json({"type": "transfer-update", "destination": msg.get("destination")})


# ---------------------------------------------------------------------------------------------
# Server messages (webhooks): signed as VAPI signs them, and deliberately mis-signed
# ---------------------------------------------------------------------------------------------

Scheme = Literal["bearer", "x-vapi-secret", "hmac", "hmac-timestamp"]
Variant = Literal["valid", "bad", "missing", "stale", "tampered"]
#: how old a "stale" timestamp is
STALE_AGE_S = 600


def server_message(kind: str, *, call_id: str = "call-standin", timestamp_ms: int | None = None,
                   **fields: Any) -> dict[str, Any]:
    """A server message envelope: `{"message": {"type", "timestamp", "call": {"id"}, ...}}`."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return {"message": {"type": kind, "timestamp": ts, "call": {"id": call_id}, **fields}}


@dataclass(frozen=True)
class SignedWebhook:
    """A server message ready to POST: the exact bytes and headers."""

    body: bytes
    headers: dict[str, str]
    scheme: str
    variant: str


def hmac_sha256(secret: str, payload: bytes, encoding: Literal["hex", "base64"] = "hex") -> str:
    digest = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def sign_webhook(
    message: dict[str, Any] | bytes,
    *,
    scheme: Scheme,
    secret: str,
    variant: Variant = "valid",
    now_ms: int | None = None,
    signature_header: str = "x-signature",
    timestamp_header: str = "x-timestamp",
    encoding: Literal["hex", "base64"] = "hex",
    prefix: str = "",
) -> SignedWebhook:
    """Sign a server message the way a VAPI credential does, or break it on purpose.

    Schemes: `bearer` (`Authorization: Bearer <secret>`), `x-vapi-secret` (the legacy header),
    `hmac` (hex HMAC-SHA256 of the raw body) and `hmac-timestamp` (hex HMAC-SHA256 of
    `"{timestamp}.{body}"`, timestamp in ms in `timestamp_header`).
    VAPI's HMAC credential can also encode the signature in base64 and put a prefix before it
    (`sha256=`, GitHub style): `encoding` and `prefix`.
    Variants: `valid`; `bad` (wrong secret); `missing` (no auth header at all); `stale` (a
    correctly signed timestamp ten minutes old, hmac-timestamp only); `tampered` (the body changed
    after signing). A replay is the same `SignedWebhook` sent twice (`fire_webhook(times=2)`).
    """
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    key = secret if variant != "bad" else secret + "-wrong"
    headers = {"Content-Type": "application/json"}
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if variant == "stale":
        if scheme != "hmac-timestamp":
            raise ValueError("only hmac-timestamp carries a timestamp that can go stale")
        now -= STALE_AGE_S * 1000
    if scheme == "bearer":
        headers["Authorization"] = f"Bearer {key}"
    elif scheme == "x-vapi-secret":
        headers["X-Vapi-Secret"] = key
    elif scheme == "hmac":
        headers[signature_header] = prefix + hmac_sha256(key, body, encoding)
    elif scheme == "hmac-timestamp":
        headers[timestamp_header] = str(now)
        headers[signature_header] = prefix + hmac_sha256(key, f"{now}.".encode() + body, encoding)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    if variant == "missing":
        for name in ("Authorization", "X-Vapi-Secret", signature_header):
            headers.pop(name, None)
    if variant == "tampered":
        body = body.replace(b'"type"', b'"type" ', 1) if b'"type"' in body else body + b" "
    return SignedWebhook(body, headers, scheme, variant)


async def fire_webhook(session: aiohttp.ClientSession, url: str, signed: SignedWebhook, *,
                       times: int = 1) -> list[tuple[int, bytes]]:
    """POST the signed message `times` times (2 = a replay); the (status, body) of each answer."""
    answers = []
    for _ in range(times):
        async with session.post(url, data=signed.body, headers=signed.headers) as resp:
            answers.append((resp.status, await resp.read()))
    return answers


# ---------------------------------------------------------------------------------------------
# python -m tests.vapi_standin
# ---------------------------------------------------------------------------------------------


async def _serve(host: str, port: int, api_key: str) -> None:
    standin = VapiStandin(api_key, host=host)
    await standin.start(port)
    print(f"vapi-standin listening on {standin.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await standin.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A local stand-in for VAPI's call and chat APIs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", default="standin-key")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port, args.api_key))


if __name__ == "__main__":
    main()
