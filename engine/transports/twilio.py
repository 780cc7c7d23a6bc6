"""Twilio: the voice webhook (TwiML), and the bidirectional Media Streams WebSocket.

Inbound: JSON text frames → base64 mu-law 8 kHz → jitter buffer keyed by `chunk` (a missing chunk
becomes a concealment frame, never a stall) → PCM → 16 kHz → 20 ms frames to the call.
Outbound: the call's output stream → 8 kHz → mu-law → `media` messages of 160 bytes, paced by the
process-wide pacer so Twilio's buffer holds only a small lead; a `mark` after each utterance tells
when the caller has heard it; `clear` empties Twilio's buffer at once on barge-in.

Both directions run without an await or a task per frame: each incoming message is one synchronous
call from the socket's data callback through the native frame parser (wsserver.py), and each
outgoing frame is built in one allocation (a prebuilt JSON prefix, base64 and framing in C) and
written straight to the socket. Bad input never takes the server down: it is
counted, logged with the session id, and skipped, or it closes only this socket with a fitting code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import socket
import time
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit
from xml.sax.saxutils import quoteattr

import orjson
from aiohttp import WSCloseCode, web

from engine._native.wsframe import text_frame_b64
from engine.audio.g711 import ulaw_decode_b64, ulaw_encode
from engine.audio.jitter import JitterBuffer
from engine.audio.resample import Resampler
from engine.backends.base import CallInfo
from engine.call import Call
from engine.log import get_logger
from engine.transports.base import Reframer, ws_text_frame
from engine.transports.wsserver import ServerWebSocket

log = get_logger("twilio")

FRAME_MS = 20.0
MULAW_FRAME = 160  # bytes of mu-law = 20 ms at 8 kHz
PCM8_FRAME = 320  # bytes of 8 kHz int16 = 20 ms
PCM16_FRAME = 640  # bytes of 16 kHz int16 = 20 ms
PCM8_SILENCE = bytes(PCM8_FRAME)
PCM16_SILENCE = bytes(PCM16_FRAME)
#: audio sent within this much of "played" is not yet taken as heard, over the learned playout lag:
#: resuming a paused reply may repeat a few frames, but never skips any
HEARD_MARGIN_MS = 60.0
#: kernel send buffer per Media Streams socket (Linux doubles it): ~1.5 s of outbound media
SEND_BUFFER = 16 * 1024
#: bytes queued in the engine past which outbound frames are dropped and counted (~1 s of media)
WRITE_LIMIT = 16 * 1024
MAX_MESSAGE = 64 * 1024  # a media message is ~300 bytes; anything near this is not Twilio
MAX_BAD_MESSAGES = 200  # a socket that sends nothing but garbage is closed after this many
LOGGED_PER_KIND = 5  # bad-input log lines per kind per call before they are only counted
TOKEN_TTL_S = 120.0


# ---------------------------------------------------------------------------------------------
# The voice webhook
# ---------------------------------------------------------------------------------------------


def twilio_signature(
    url: str, params: Mapping[str, str] | list[tuple[str, str]], token: str
) -> str:
    """X-Twilio-Signature of a form POST: HMAC-SHA1 over the URL and the sorted parameters."""
    items = sorted(params.items() if isinstance(params, Mapping) else params)
    data = url + "".join(k + v for k, v in items)
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as given, with the default port made explicit, and without it (as Twilio's
    libraries check both)."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    variants = [url]
    if default is not None:
        if parts.port is None:
            variants.append(urlunsplit(parts._replace(netloc=f"{host}:{default}")))
        elif parts.port == default:
            variants.append(urlunsplit(parts._replace(netloc=host)))
    return variants


def signature_valid(url: str, params: list[tuple[str, str]], signature: str, token: str) -> bool:
    return any(
        hmac.compare_digest(twilio_signature(u, params, token), signature)
        for u in _url_variants(url)
    )


def public_base(request: web.Request, public_url: str | None) -> str:
    """The externally reachable base URL: PUBLIC_URL, or what the request (and its proxy) says."""
    if public_url:
        return public_url.rstrip("/")
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{proto}://{host}"


def stream_url(base: str) -> str:
    """Twilio requires wss://; plain http is kept only for loopback development (ws://)."""
    parts = urlsplit(base)
    scheme = (
        "ws"
        if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")
        else "wss"
    )
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/twilio/stream", "", ""))


def twiml_stream(url: str, parameters: Mapping[str, str]) -> str:
    params = "".join(
        f"\n      <Parameter name={quoteattr(k)} value={quoteattr(v)}/>"
        for k, v in parameters.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n  <Connect>\n'
        f"    <Stream url={quoteattr(url)}>{params}\n    </Stream>\n  </Connect>\n</Response>\n"
    )


TWIML_BUSY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n  <Reject reason="busy"/>\n</Response>\n'
)


class StreamTokens:
    """Per-call tokens put into the TwiML and checked on the stream's `start`: unguessable,
    short-lived, single use.

    A token carries its own proof (expiry and nonce, signed with HMAC-SHA256), so whichever
    worker answers the webhook, any worker can check the stream that follows. The key comes from
    TWILIO_AUTH_TOKEN when set (every process and host agrees), otherwise from `process_secret()`,
    made once in the supervisor before it forks its workers. A token is spent on the worker that
    takes the stream.
    """

    def __init__(self, ttl_s: float = TOKEN_TTL_S, auth_token: str | None = None) -> None:
        self.ttl_s = ttl_s
        seed = auth_token.encode() if auth_token else process_secret()
        self._key = hmac.new(seed, b"voice-engine stream token", hashlib.sha256).digest()
        self._spent: dict[bytes, float] = {}  # nonce -> expiry, until it expires

    def issue(self) -> str:
        body = int(time.time() + self.ttl_s).to_bytes(8, "big") + secrets.token_bytes(16)
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")

    def redeem(self, token: str) -> bool:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, binascii.Error):
            return False
        if len(raw) != 40:
            return False
        body, mac = raw[:24], raw[24:]
        if not hmac.compare_digest(hmac.new(self._key, body, hashlib.sha256).digest()[:16], mac):
            return False
        expires = int.from_bytes(body[:8], "big")
        now = time.time()
        if expires <= now:
            return False
        nonce = body[8:]
        if nonce in self._spent:
            return False
        if len(self._spent) > 1000:
            self._spent = {n: exp for n, exp in self._spent.items() if exp > now}
        self._spent[nonce] = expires
        return True


_process_secret: bytes | None = None


def process_secret() -> bytes:
    """A random key made once per process tree: call it before forking so workers share it."""
    global _process_secret
    if _process_secret is None:
        _process_secret = secrets.token_bytes(32)
    return _process_secret


async def voice_webhook(request: web.Request) -> web.Response:
    from engine.server import ENGINE_KEY, json_error

    engine = request.app[ENGINE_KEY]
    settings = engine.settings
    form = await request.post()
    params = [(k, str(v)) for k, v in form.items()]
    base = public_base(request, settings.public_url)
    if settings.twilio_auth_token:
        signature = request.headers.get("X-Twilio-Signature", "")
        url = base + request.path_qs
        if not signature or not signature_valid(url, params, signature, settings.twilio_auth_token):
            log.warning("voice.bad_signature", call_sid=form.get("CallSid"))
            return json_error(401, "invalid X-Twilio-Signature")
    call_sid = str(form.get("CallSid", ""))
    if engine.overloaded():
        engine.metrics.calls_shed += 1
        log.warning("voice.shed", call_sid=call_sid, loop_lag_ms=round(engine.loop_lag_ms, 1))
        return web.Response(text=TWIML_BUSY, content_type="text/xml")
    parameters = {
        "callSid": call_sid,
        "from": str(form.get("From", "")),
        "token": engine.stream_tokens.issue(),
    }
    log.info("voice.incoming", call_sid=call_sid, caller=parameters["from"])
    return web.Response(text=twiml_stream(stream_url(base), parameters), content_type="text/xml")


# ---------------------------------------------------------------------------------------------
# The Media Streams WebSocket
# ---------------------------------------------------------------------------------------------


class TwilioMediaStream:
    """One Media Streams WebSocket: one call. Messages arrive one synchronous call each
    (`on_text`), straight from the socket (see wsserver.py)."""

    kind = "twilio"

    def __init__(self, engine: Any, request: web.Request) -> None:
        self.engine = engine
        self.ws = ServerWebSocket(request, self, MAX_MESSAGE)
        self.session_id = "-"
        self.stream_sid: str | None = None
        self.account_sid: str | None = None
        self.call_sid: str | None = None
        self.call: Call | None = None
        self._socket = request.transport
        self._bad: dict[str, int] = {}
        self._bad_total = 0
        # inbound
        # The jitter buffer holds decoded PCM so that concealment can fade the last frame. Media
        # Streams ride on TCP: a missing `chunk` is concealed as soon as a later one shows the
        # gap, and frames that are merely late (a stalled socket, then a burst) are never lost.
        self._jitter = JitterBuffer(PCM8_FRAME, MULAW_FRAME, 8000, capacity=64, ordered=True)
        self._pcm8 = bytearray(PCM8_FRAME)
        self._up = Resampler(8000, 16000)
        self._in_frames = Reframer(PCM16_FRAME)
        # outbound
        self._down = Resampler(16000, 8000)
        self._out_frames = Reframer(PCM8_FRAME)
        self._pcm16 = bytearray(PCM16_FRAME)
        self._prefix = b""
        self._lead_ms = engine.settings.twilio_lead_ms
        self._buffer_end = 0.0  # when Twilio will have played everything sent (monotonic ms)
        self._frames_sent = 0
        self._marks_due: list[
            tuple[int, int, int]
        ] = []  # (after frame n, generation, end position)
        self._marks_pending: dict[str, tuple[int, int, float]] = {}  # name → (generation, end, due)
        # How much later than the engine's model the caller actually hears audio (network, the
        # carrier's playout grid). Learned from mark echoes; what is sent within this much of
        # "played" is not yet taken as heard, so a paused reply resumes without losing audio.
        self._play_lag_ms = 40.0
        self._sending_generation = -1
        self._paused = False
        self._registered = False
        self._starting: asyncio.Task[None] | None = None
        # A caller that stops reading must cost little and hear nothing stale when it resumes:
        # a small kernel send buffer (instead of autotuning up to megabytes) makes the socket
        # push back within seconds, and past `write_limit` queued bytes frames are trimmed.
        self.write_limit = WRITE_LIMIT
        raw = request.transport.get_extra_info("socket") if request.transport else None
        if raw is not None:
            try:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass

    # -- inbound -------------------------------------------------------------------------------

    def on_text(self, data: bytes) -> None:
        if data.startswith(b'{"event":"media"'):
            message = self._parse(data)
            if message is not None:
                self._on_media(message)
        else:
            self._on_other(data)

    def on_binary(self, data: bytes) -> None:
        self._reject("binary-frame", len(data))
        self._close(WSCloseCode.UNSUPPORTED_DATA, "binary frames are not Media Streams")

    def _on_other(self, data: bytes) -> None:
        """Messages other than media: rare. `start` awaits the backend, and messages behind it
        wait (in order) until the call is ready."""
        message = self._parse(data)
        if message is None:
            return
        event = message.get("event")
        if event == "start":
            self.ws.hold()
            task = asyncio.get_running_loop().create_task(self._start_then_release(message))
            self._starting = task  # keeps the task alive until it is done
        elif event == "media":
            self._on_media(message)
        elif event == "mark":
            self._on_mark(message)
        elif event == "dtmf":
            self._on_dtmf(message)
        elif event == "stop":
            log.info("stream.stop", session=self.session_id)
            self._close(WSCloseCode.OK, "stream stopped")
        elif event == "connected":
            log.debug(
                "stream.connected", protocol=message.get("protocol"), version=message.get("version")
            )
        else:
            self._reject("unknown-event", event)

    async def _start_then_release(self, message: dict[str, Any]) -> None:
        try:
            await self._on_start(message)
        except Exception:
            log.exception("stream.start_failed", session=self.session_id)
            self._close(WSCloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._starting = None
            self.ws.release()

    def _parse(self, data: bytes) -> dict[str, Any] | None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._reject("invalid-json", data[:80].decode(errors="replace"))
            return None
        if type(message) is not dict:
            self._reject("not-an-object", data[:80].decode(errors="replace"))
            return None
        return message

    def _on_media(self, message: dict[str, Any]) -> None:
        call = self.call
        if call is None:
            self._reject("media-before-start")
            return
        if message.get("streamSid") != self.stream_sid:
            self._reject("wrong-streamSid", message.get("streamSid"))
            return
        media: Any = message.get("media")  # checked by the except below, not before
        try:
            if media.get("track", "inbound") not in ("inbound", "inbound_track"):
                return
            decoded = ulaw_decode_b64(media["payload"])  # base64 and mu-law in one pass
            chunk = int(media["chunk"])
            timestamp = int(media["timestamp"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            self._reject("bad-media", f"{type(exc).__name__}: {exc}")
            return
        if len(decoded) != PCM8_FRAME:
            codes = len(decoded) // 2
            if not codes or codes > 8 * MULAW_FRAME:
                self._reject("bad-payload-length", codes)
                return
            self._reject("odd-payload-length", codes)
            decoded = (decoded + PCM8_SILENCE)[:PCM8_FRAME]
        now = time.monotonic() * 1000.0
        jitter = self._jitter
        jitter.push(chunk & 0xFFFF, (timestamp * 8) & 0xFFFFFFFF, decoded, now)
        stats = call.stats
        pcm8 = self._pcm8
        while jitter.pop_into(pcm8, now) >= 0:
            pcm16 = self._up.process(pcm8)
            if len(pcm16) == PCM16_FRAME and not self._in_frames.pending():
                call.on_frame(pcm16, now)
            else:
                self._in_frames.push(pcm16)
                while (whole := self._in_frames.pop()) is not None:
                    call.on_frame(whole, now)
        stats.frames_concealed = jitter.lost
        stats.frames_late = jitter.late
        stats.jitter_depth = jitter.depth

    async def _on_start(self, message: dict[str, Any]) -> None:
        if self.call is not None:
            self._reject("second-start")
            return
        start = message.get("start")
        sid = message.get("streamSid") or (
            start.get("streamSid") if isinstance(start, dict) else None
        )
        if (
            not isinstance(start, dict)
            or not isinstance(sid, str)
            or not sid
            or len(sid) > 64
            or '"' in sid
            or "\\" in sid
        ):
            self._reject("bad-start")
            self._close(WSCloseCode.POLICY_VIOLATION, "malformed start message")
            return
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            params = {}
        fmt = start.get("mediaFormat") or {}
        if (
            isinstance(fmt, dict)
            and fmt
            and (fmt.get("encoding") != "audio/x-mulaw" or int(fmt.get("sampleRate", 8000)) != 8000)
        ):
            self._reject("unsupported-media-format", fmt)
            self._close(WSCloseCode.UNSUPPORTED_DATA, "only audio/x-mulaw at 8000 Hz")
            return
        token = params.get("token")
        if token is not None or self.engine.settings.twilio_auth_token:
            if not isinstance(token, str) or not self.engine.stream_tokens.redeem(token):
                self._reject("bad-token")
                self._close(WSCloseCode.POLICY_VIOLATION, "invalid stream token")
                return
        self.stream_sid = sid
        self.session_id = sid
        self.account_sid = start.get("accountSid")
        self.call_sid = start.get("callSid") or params.get("callSid")
        self._prefix = b'{"event":"media","streamSid":"' + sid.encode() + b'","media":{"payload":"'
        info = CallInfo(
            session_id=sid,
            transport="twilio",
            caller=params.get("from") or None,
            call_sid=self.call_sid,
            metadata={k: v for k, v in params.items() if k != "token"},
        )
        log.info("stream.start", session=sid, call_sid=self.call_sid, caller=info.caller)
        self.call = Call(self.engine, info, self)
        await self.call.start()

    def _on_mark(self, message: dict[str, Any]) -> None:
        mark = message.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            self._reject("bad-mark")
            return
        pending = self._marks_pending.pop(name, None)
        if pending is None or self.call is None:
            return  # a mark flushed by `clear`: it was not heard
        generation, end_pos, due = pending
        now = time.monotonic() * 1000.0
        lag = min(max(now - due, FRAME_MS), 500.0)
        self._play_lag_ms += (lag - self._play_lag_ms) * 0.25
        self.call.output.heard_up_to(end_pos)
        self.call.on_heard(generation, now)

    def _on_dtmf(self, message: dict[str, Any]) -> None:
        dtmf = message.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or len(digit) != 1 or digit not in "0123456789*#ABCD":
            self._reject("bad-dtmf", digit)
            return
        if self.call is not None:
            self.call.on_dtmf(digit)

    def _reject(self, kind: str, detail: Any = None) -> None:
        """Counts and logs (a few per kind) a message that is skipped."""
        count = self._bad.get(kind, 0) + 1
        self._bad[kind] = count
        self._bad_total += 1
        self.engine.metrics.bad_messages += 1
        if count <= LOGGED_PER_KIND or count % 1000 == 0:
            log.warning(
                "stream.bad_input",
                session=self.session_id,
                kind=kind,
                count=count,
                detail=None if detail is None else str(detail)[:120],
            )
        if self._bad_total == MAX_BAD_MESSAGES and not self.ws.closing:
            self._close(WSCloseCode.INVALID_TEXT, "too many malformed messages")

    # -- outbound ------------------------------------------------------------------------------

    def kick(self) -> None:
        if self.pump(time.monotonic() * 1000.0) and not self._registered:
            self._registered = True
            self.engine.pacer.register(self)

    def pump(self, now: float) -> bool:
        """Tops Twilio's buffer up to the lead; False when nothing is left to send."""
        call = self.call
        if call is None or self.ws.closing:
            self._registered = False
            return False
        output = call.output
        if not self._paused:
            sock = self._socket
            while self._buffer_end - now < self._lead_ms:
                frame = self._next_frame(now)
                if frame is None:
                    break
                if self._buffer_end < now:
                    self._buffer_end = now
                self._buffer_end += FRAME_MS
                if sock is None or sock.is_closing():
                    break
                if sock.get_write_buffer_size() > self.write_limit:
                    call.stats.frames_dropped_out += 1  # the caller's socket is not reading: trim
                else:
                    sock.write(text_frame_b64(self._prefix, ulaw_encode(frame), b'"}}'))
                    call.stats.frames_out += 1
                self._frames_sent += 1
                while self._marks_due and self._marks_due[0][0] <= self._frames_sent:
                    _, generation, end_pos = self._marks_due.pop(0)
                    self._send_mark(generation, end_pos)
        self._settle_heard(output, now)
        # Paced only while audio waits to be sent: once everything has left, the tail's heard
        # position is settled by the utterance's mark (or the next pump), not by a timer per call.
        busy = output.ring.queued > 0 or self._out_frames.pending() > 0
        if not busy:
            self._registered = False
        return busy

    def _settle_heard(self, output: Any, now: float) -> None:
        """What has played out of Twilio's buffer by `now` has been heard."""
        in_buffer_ms = self._buffer_end - now
        if in_buffer_ms < 0:
            in_buffer_ms = 0.0
        unheard = (
            int((in_buffer_ms + self._play_lag_ms + HEARD_MARGIN_MS) * 16)
            + self._out_frames.pending()
        )
        target = output.ring.read_pos - unheard
        if target > output.ring.ack_pos:
            output.heard_up_to(target)

    def _next_frame(self, now: float) -> bytes | None:
        """The next 20 ms of 8 kHz PCM to send, or None."""
        frames = self._out_frames
        output = self.call.output  # type: ignore[union-attr]
        while frames.pending() < PCM8_FRAME:
            generation = output.read_frame(self._pcm16)
            if generation < 0:
                return None
            if generation != self._sending_generation:
                self._sending_generation = generation
                self.call.on_output_started(generation, now)  # type: ignore[union-attr]
            pcm8 = self._down.process(self._pcm16)
            finished = output.finished_at_read()
            if finished is None and not frames.pending():
                return pcm8  # the common case: one frame in, one out, inside an utterance
            frames.push(pcm8)
            if finished is not None:
                # Flush the resampler's delay line, pad to a whole frame, and mark the end there.
                frames.push(self._down.process(PCM16_SILENCE))
                frames.push(bytes((-frames.pending()) % PCM8_FRAME))
                after = self._frames_sent + frames.pending() // PCM8_FRAME
                self._marks_due.append((after, finished, output.ring.read_pos))
        return frames.pop()

    def _send_mark(self, generation: int, end_pos: int) -> None:
        name = f"u{generation}"
        self._marks_pending[name] = (generation, end_pos, self._buffer_end)
        self._send_json({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def _send_json(self, message: dict[str, Any]) -> None:
        self.ws.send(ws_text_frame(orjson.dumps(message)))

    def _send_clear(self, now: float) -> None:
        self._send_json({"event": "clear", "streamSid": self.stream_sid})
        # Twilio echoes every pending mark at once on clear; those were not heard.
        self._marks_pending.clear()
        self._marks_due.clear()
        self._buffer_end = now
        self._out_frames.clear()
        self._down = Resampler(16000, 8000)
        self._sending_generation = -1

    def pause(self, now: float) -> None:
        if self._paused or self.call is None:
            return
        self._paused = True
        self._settle_heard(self.call.output, now)  # the pacer may not have looked for a while
        self._send_clear(now)
        rewound = self.call.output.rewind()
        # `t` is when the clear left (the frame that triggered it arrived at `now`)
        log.info(
            "barge_in.output_paused",
            session=self.session_id,
            t=round(time.monotonic() * 1000.0, 3),
            rewound_ms=rewound // 16,
        )

    def resume(self, now: float) -> None:
        if not self._paused:
            return
        self._paused = False
        log.info("barge_in.output_resumed", session=self.session_id, t=round(now, 1))
        self.kick()

    def cancel(self, now: float) -> None:
        if not self._paused and (self._buffer_end > now or self._marks_pending):
            self._send_clear(now)
        else:
            self._marks_due.clear()
            self._out_frames.clear()
            self._sending_generation = -1
        self._paused = False

    def notify(self, event: dict[str, Any]) -> None:
        pass

    def hangup(self, reason: str) -> None:
        if not self.ws.closing:
            log.info("stream.hangup", session=self.session_id, reason=reason)
            self._close(WSCloseCode.OK, reason)

    async def transfer(self, destination: str) -> bool:
        from engine.transports.twilio_rest import redirect_call

        if not self.call_sid or not self.account_sid:
            log.warning("transfer.no_call_sid", session=self.session_id)
            return False
        return await redirect_call(
            self.engine, self.account_sid, self.call_sid, destination, self.session_id
        )

    # -- teardown ------------------------------------------------------------------------------

    def _close(self, code: int, reason: str) -> None:
        self.ws.close(code, reason)

    async def _finish(self, close_code: int | None) -> None:
        self.engine.pacer.unregister(self)
        if self._starting is not None:  # the caller left while the call was starting
            self._starting.cancel()
            try:
                await self._starting
            except asyncio.CancelledError:
                pass
        if self.call is not None:
            await self.call.close("stream-ended")
            self.call = None  # the call points back here: free both without waiting for the GC
        if self._bad:
            log.info("stream.bad_input_summary", session=self.session_id, counts=self._bad)
        log.info("stream.end", session=self.session_id, close_code=close_code)


async def media_stream(request: web.Request) -> web.StreamResponse:
    from engine.server import ENGINE_KEY

    stream = TwilioMediaStream(request.app[ENGINE_KEY], request)
    response = await stream.ws.accept()
    try:
        await stream.ws.wait_closed()
    finally:
        await stream._finish(stream.ws.close_code)
    return response


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/twilio/voice", voice_webhook)
    app.router.add_get("/twilio/stream", media_stream)
