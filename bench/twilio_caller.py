"""A stand-in for Twilio's side of a bidirectional Media Stream (protocols/twilio.md §4).

Owns: `TwilioCaller`, one simulated phone call on a real WebSocket; `Ticker`, the single task that
paces every caller of the process; the voice webhook request Twilio makes before the stream; and
the small mu-law helpers the caller needs to tell silence, quiet and loud frames apart.

How the caller plays what it receives (the playout model; every timing the harness reports rests
on it):

- Each caller has a playout grid: slot boundaries every 20 ms at `grid0 + k * 20 ms`, where
  `grid0` is a per-caller phase in [0, 20 ms) so playout is not phase-locked to sending (a phone's
  clock is not the server's).
- The playback buffer is FIFO. A frame that arrives while the buffer still holds audio plays right
  after the audio before it. A frame that arrives into an empty buffer starts at the next slot
  boundary (or at once if it arrives exactly on one): the slot that was playing when it arrived
  was silence and stays silence. So playout adds less than one frame of delay to an empty buffer,
  and nothing beyond the queue ahead of it otherwise.
- A frame is *heard* at the start of its slot. Because the buffer is FIFO and the clock fixed, that
  time is known the moment the frame arrives; it is recorded then and only counts once it has
  passed (queries take `now`). A `clear` removes every frame whose slot has not started; the frame
  in its slot finishes (it is already in the earpiece).
- A `mark` comes back when playback reaches it: at the end of the last frame queued before it,
  or at once if nothing is queued. `clear` sends back every pending mark at once, in order.
- Payloads that are not 160 bytes play for their own length (n / 8000 s); each 160-byte piece is
  recorded as one heard frame.
- Since the buffer plays one frame per slot and frames keep coming at the same rate, it only
  drains in a gap: once a frame has come late (jitter) or many at once (a burst), every later
  frame plays that much later too. That is what a caller hears, so heard latency includes it;
  the harness also reports transit (arrival at the socket) to tell the two apart.
- A frame's arrival is when the harness read it, unless the harness itself was stalled then
  (see `Ticker.arrival`): a stall would otherwise bunch arrivals and deepen the buffer.
- Underruns: an empty slot between two non-silent frames of the same utterance (no `mark` or
  `clear` between them).

Sending: every caller sends one `media` message per 20 ms slot of an absolute monotonic schedule
kept by the shared `Ticker` (never a sleep per frame). Twilio never sends faster than real time
nor in bursts, so when the ticker reaches a caller more than one frame late (the harness stalled)
the slots it missed are skipped, counted as late frames, and the next frame carries the current
slot's timestamp (a timestamp jump: a pause in the media, as Twilio marks one). The caller's
audio is delayed, not cut. A burst here would also deepen the caller's own playout buffer for
the rest of the call (it never drains while frames keep coming), which would blame the server
for the harness's stall.

Cost matters: one harness process runs hundreds of callers beside the server. Hence one ticker for
all callers, media messages formatted from a per-call bytes template (only the counters and the
payload vary), base64 of each utterance computed once when it is queued, frames written to the
socket synchronously (aiohttp's `send_str` is a coroutine that may wait for the socket to drain;
one slow socket must never stall the ticker that serves every other call), and data frames read
straight off the connection (`_DataTap`) instead of through a queue and a task per message.
What remains is mostly the kernel's cost of a loopback send per frame.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import math
import secrets
import time
import xml.etree.ElementTree as ElementTree
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

FRAME_S = 0.020  # one media message carries 20 ms of audio
FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
SAMPLE_S = 1.0 / 8000.0
SILENCE_BYTE = 0xFF  # mu-law of 0
SILENCE = bytes([SILENCE_BYTE]) * FRAME_BYTES
SILENCE_B64 = base64.b64encode(SILENCE)
SILENCE_B64_STR = SILENCE_B64.decode("ascii")

# uvloop timers have 1 ms granularity, so the ticker may wake up to ~1.5 ms before a slot; a slot
# counts as due that early rather than being pushed a whole step later.
SLOT_TOLERANCE_S = 0.002
# A caller never lets more than this sit unsent in its socket's write buffer; beyond it frames are
# dropped and counted (the server has stopped reading; buffering more only hides that).
MAX_WRITE_BUFFER = 256 * 1024
MAX_MESSAGE = 4 * 1024 * 1024  # the largest message accepted from the server
# The ticker is the harness's heartbeat (a wake-up every 20 ms / phases). A message read more
# than this after a missed heartbeat was read late because the harness stalled (see Ticker.arrival).
STALL_S = 0.010

ACCOUNT_SID = "AC" + "0" * 32  # the account every simulated call belongs to unless told otherwise
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}


# --- mu-law: just enough to judge a frame without decoding it -----------------------------------


def ulaw_to_linear(byte: int) -> int:
    """G.711 mu-law byte → 16-bit linear sample."""
    u = ~byte & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    magnitude -= 0x84
    return -magnitude if u & 0x80 else magnitude


SILENT_LEVEL = 8  # |x| at or below this is digital silence (mu-law 0xFF, 0x7F, 0xFE, 0x7E)
VOICED_LEVEL = 180  # a caller frame peaking at or above this (about -45 dBFS) carries speech
LOUD_LEVEL = 1000  # a frame peaking at or above this (about -30 dBFS) is audible speech or a click
_NOT_SILENT_BYTES = bytes(b for b in range(256) if abs(ulaw_to_linear(b)) <= SILENT_LEVEL)
_NOT_VOICED_BYTES = bytes(b for b in range(256) if abs(ulaw_to_linear(b)) < VOICED_LEVEL)
_NOT_LOUD_BYTES = bytes(b for b in range(256) if abs(ulaw_to_linear(b)) < LOUD_LEVEL)


def is_loud(frame: bytes) -> bool:
    """True when some sample of the mu-law frame peaks at or above `LOUD_LEVEL`."""
    # translate() deleting every quiet byte runs in C; anything left over is a loud sample.
    return bool(frame.translate(None, _NOT_LOUD_BYTES))


def is_voiced(frame: bytes) -> bool:
    """True when some sample peaks at or above `VOICED_LEVEL`: where speech starts and ends."""
    return bool(frame.translate(None, _NOT_VOICED_BYTES))


def is_silent(frame: bytes) -> bool:
    """True when every sample of the mu-law frame is digital silence."""
    return not frame.translate(None, _NOT_SILENT_BYTES)


def mulaw_frames(mulaw: bytes) -> list[bytes]:
    """Split mu-law audio into 160-byte frames, padding the last one with silence."""
    frames = [mulaw[i : i + FRAME_BYTES] for i in range(0, len(mulaw), FRAME_BYTES)]
    if frames and len(frames[-1]) < FRAME_BYTES:
        frames[-1] = frames[-1] + bytes([SILENCE_BYTE]) * (FRAME_BYTES - len(frames[-1]))
    return frames


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two letters and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


# --- the voice webhook (what Twilio does before it opens the stream) -----------------------------


def twilio_signature(url: str, params: dict[str, str], auth_token: str) -> str:
    """`X-Twilio-Signature` of a form POST: HMAC-SHA1 over the URL, then each name+value by name."""
    data = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def parse_stream_twiml(twiml: str) -> tuple[str, dict[str, str]] | None:
    """The stream URL and `<Parameter>`s of `<Connect><Stream>`; None when there is none."""
    try:
        root = ElementTree.fromstring(twiml)
    except ElementTree.ParseError:
        return None
    stream = root.find("./Connect/Stream")
    if stream is None:
        return None
    params = {
        p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter") if p.get("name")
    }
    return stream.get("url", ""), params


async def fetch_stream_parameters(
    session: aiohttp.ClientSession,
    voice_url: str,
    *,
    call_sid: str,
    account_sid: str = ACCOUNT_SID,
    caller: str = "+15550100000",
    called: str = "+15550199999",
    auth_token: str | None = None,
    timeout: float = 10.0,
) -> dict[str, str] | None:
    """POST the voice webhook as Twilio does and return the stream's `customParameters`.

    Returns None when the server has no voice webhook (404/405) or answers without a
    `<Connect><Stream>`; raises on transport errors and on other error statuses.
    """
    form = {
        "CallSid": call_sid,
        "AccountSid": account_sid,
        "From": caller,
        "To": called,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    headers = {}
    if auth_token:
        headers["X-Twilio-Signature"] = twilio_signature(voice_url, form, auth_token)
    async with session.post(
        voice_url, data=form, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as resp:
        if resp.status in (404, 405):
            return None
        resp.raise_for_status()
        parsed = parse_stream_twiml(await resp.text())
    return None if parsed is None else parsed[1]


# --- the caller -----------------------------------------------------------------------------------


class Utterance:
    """Audio queued with `TwilioCaller.speak`; the ticker fills in when its frames left."""

    __slots__ = (
        "payloads",
        "loud",
        "pos",
        "first_sent",
        "last_sent",
        "first_loud_sent",
        "last_loud_sent",
        "voiced",
        "first_voiced_sent",
        "last_voiced_sent",
        "cut",
        "_waiters",
    )

    def __init__(self, mulaw: bytes) -> None:
        frames = mulaw_frames(mulaw)
        self.payloads: list[bytes] = [base64.b64encode(f) for f in frames]
        self.loud: list[bool] = [is_loud(f) for f in frames]
        self.pos = 0
        self.first_sent: float | None = None  # monotonic time the first frame was written
        self.last_sent: float | None = None  # ... the last frame
        self.first_loud_sent: float | None = None  # ... the first loud frame (speech onset)
        self.last_loud_sent: float | None = None  # ... the last loud frame
        self.voiced: list[bool] = [is_voiced(f) for f in frames]
        self.first_voiced_sent: float | None = None  # ... the first voiced frame (speech onset)
        self.last_voiced_sent: float | None = None  # ... the last voiced frame (end of speech)
        self.cut = False  # replaced by newer speech before its last frame was sent
        self._waiters: list[tuple[str, asyncio.Future[float]]] = []

    @property
    def frames(self) -> int:
        return len(self.payloads)

    @property
    def done(self) -> bool:
        return self.pos >= len(self.payloads)

    def started(self) -> asyncio.Future[float]:
        """Resolves to the time the first frame was sent."""
        return self._future("started", self.first_sent)

    def finished(self) -> asyncio.Future[float]:
        """Resolves to the time the last frame was sent (or the utterance was cut)."""
        return self._future("finished", self.last_sent if self.done or self.cut else None)

    def _future(self, kind: str, value: float | None) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if value is not None:
            fut.set_result(value)
        else:
            self._waiters.append((kind, fut))
        return fut

    def _resolve(self, kind: str, value: float) -> None:
        if not self._waiters:
            return
        keep = []
        for k, fut in self._waiters:
            if k == kind:
                if not fut.done():
                    fut.set_result(value)
            else:
                keep.append((k, fut))
        self._waiters = keep

    def _cut(self, now: float) -> None:
        """Replaced or abandoned before its end: every waiter is released (with `now` for a
        frame that never left)."""
        self.cut = True
        self._resolve("started", self.first_sent if self.first_sent is not None else now)
        self._resolve("finished", self.last_sent if self.last_sent is not None else now)


class TwilioCaller:
    """One simulated phone call: Twilio's side of `<Connect><Stream>`.

    Lifecycle: `await connect()`, then `speak()`/`say()`/`send_dtmf()` while it runs, then
    `await hangup()`. All times are `time.monotonic()` seconds.
    """

    def __init__(
        self,
        url: str,
        ticker: Ticker,
        *,
        session: aiohttp.ClientSession | None = None,
        custom_parameters: dict[str, str] | None = None,
        audio: bytes = b"",
        call_sid: str | None = None,
        account_sid: str = ACCOUNT_SID,
        playout_phase: float | None = None,
        record_audio: bool = False,
        fast_receive: bool = True,
    ) -> None:
        self.url = url
        self.ticker = ticker
        self.stream_sid = new_sid("MZ")
        self.call_sid = call_sid or new_sid("CA")
        self.account_sid = account_sid
        self.custom_parameters = dict(custom_parameters or {})
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._write: Callable[[bytes], None] = _closed_writer
        self._transport: asyncio.Transport | None = None
        self._recv_task: asyncio.Task[None] | None = None
        self._media_tpl = (
            '{"event":"media","sequenceNumber":"%d","media":{"track":"inbound","chunk":"%d",'
            '"timestamp":"%d","payload":"%s"},"streamSid":"' + self.stream_sid + '"}'
        ).encode()
        self._seq = 0  # last sequenceNumber used (`start` is 1; `connected` has none)
        self._chunk = 0  # last media chunk number
        self._t0 = 0.0  # stream start: media timestamps count from here
        self._next_slot = math.inf  # the next send slot; set by the ticker
        self._phase_group = -1
        self._sending = False
        self._utt: Utterance | None = Utterance(audio) if audio else None
        self._phase = (
            playout_phase if playout_phase is not None else secrets.randbelow(20_000) / 1e6
        ) % FRAME_S
        self._grid0 = ticker.epoch + self._phase  # slot boundaries of the playout clock
        self._play_end = -math.inf  # when everything queued for playback will have played
        self._playing = True  # false once the call is over: nothing more can be heard
        self._last_nonsilent = False  # the last queued frame was not digital silence
        self._in_utterance = False  # non-silent audio has arrived since the last mark/clear
        self._pending_marks: deque[tuple[float, str]] = deque()
        self._mark_timer: asyncio.TimerHandle | None = None
        self.record_audio = record_audio
        self.fast_receive = fast_receive

        # What was heard: one entry per 160-byte frame, in playout order.
        self.heard = array("d")  # slot start time of each queued/played frame
        self.heard_loud = bytearray()  # 1 where that frame was loud
        self.heard_audio: list[bytes] = []  # the frames themselves, when record_audio is set
        self.onsets = array("d")  # slot starts of loud frames that follow silence or an empty slot
        self.onset_arrivals = array("d")  # when each of those frames arrived at the socket
        # Counters (see `stats()`).
        self.frames_sent = 0
        self.frames_late = 0
        self.frames_dropped_send = 0
        self.frames_received = 0
        self.frames_cleared = 0
        self.frames_unplayed = 0
        self.underruns = 0
        self.underrun_slots = 0
        self.marks_received = 0
        self.clears_received = 0
        self.wrong_stream_sid = 0
        self.unknown_events = 0
        self.binary_frames = 0
        self.invalid_messages = 0
        self.dtmf_sent = 0
        # Events: (name, echoed at, frames played by then) and the arrival time of every clear.
        self.marks_echoed: list[tuple[str, float, int]] = []
        self.clears: list[float] = []
        self.connected_at: float | None = None
        self.closed_at: float | None = None
        self.closed_by_server = False
        self.stop_sent = False
        self.tapped = False  # data frames reach the caller without aiohttp's queue (see _DataTap)
        self.error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> None:
        """Open the WebSocket, send `connected` and `start`, and begin sending media."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        ws = await asyncio.wait_for(
            self._session.ws_connect(
                self.url,
                autoclose=False,  # on the server's close Twilio sends `stop` first (_receive_loop)
                autoping=True,
                compress=0,
                max_msg_size=MAX_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
            ),
            timeout,
        )
        self._ws = ws
        self._write = _frame_writer(ws)
        self._transport = getattr(getattr(ws, "_writer", None), "transport", None)
        if self.fast_receive:
            self.tapped = _tap_data_frames(
                ws, self._on_text, self._on_binary, self._on_handler_error, self.ticker.arrival
            )
        now = time.monotonic()
        self.connected_at = now
        self._t0 = now
        self._write(b'{"event":"connected","protocol":"Call","version":"1.0.0"}')
        self._seq = 1
        self._write(
            orjson.dumps(
                {
                    "event": "start",
                    "sequenceNumber": "1",
                    "start": {
                        "accountSid": self.account_sid,
                        "streamSid": self.stream_sid,
                        "callSid": self.call_sid,
                        "tracks": ["inbound"],
                        "customParameters": self.custom_parameters,
                        "mediaFormat": MEDIA_FORMAT,
                    },
                    "streamSid": self.stream_sid,
                }
            )
        )
        self._sending = True
        self._next_slot = self.ticker.add(self)
        self._recv_task = asyncio.create_task(
            self._receive_loop(), name=f"twilio-rx-{self.call_sid}"
        )

    async def hangup(self, linger: float = 0.0) -> None:
        """Send `stop` and close. With `linger`, stop sending media that long before, so the
        server's answer to the last frames can still arrive (Twilio itself sends until the end)."""
        if self.closed_at is not None or self._ws is None:
            return
        if linger > 0 and self._sending:
            self._sending = False
            self.ticker.remove(self)
            await asyncio.sleep(linger)
        self._stop_sending()
        self._finish_playout(time.monotonic())
        self._send_stop()
        with contextlib.suppress(Exception):  # closing a broken socket must not fail the hangup
            await self._ws.close()
        if self._recv_task is not None:
            try:
                await asyncio.wait_for(self._recv_task, 2.0)
            except (TimeoutError, asyncio.CancelledError):
                self._recv_task.cancel()
        self._mark_closed()
        if self._own_session and self._session is not None:
            await self._session.close()

    async def wait_closed(self) -> None:
        """Returns when the receive side has ended (server closed, or after `hangup`)."""
        if self._recv_task is not None:
            await asyncio.shield(self._recv_task)

    @property
    def active(self) -> bool:
        return self.connected_at is not None and self.closed_at is None

    # -- what the caller says ----------------------------------------------------------------------

    def speak(self, mulaw: bytes) -> Utterance:
        """Queue speech to start at the next send slot, replacing anything still being said.

        After it ends the caller sends silence again. The returned `Utterance` says when its frames
        left: `first_sent`/`last_sent`, and where speech starts and ends (`first_voiced_sent`,
        `last_voiced_sent`, peaks above -45 dBFS; `first_loud_sent`, `last_loud_sent`, -30 dBFS).
        """
        utt = Utterance(mulaw)
        old = self._utt
        if old is not None and not old.done:
            old._cut(time.monotonic())
        if utt.done:  # nothing to say
            self._utt = None
            utt._cut(time.monotonic())
        else:
            self._utt = utt
        return utt

    async def say(self, mulaw: bytes) -> float:
        """`speak`, then wait for its first frame to go out; returns the time it was sent."""
        return await self.speak(mulaw).started()

    def send_dtmf(self, digit: str) -> None:
        """A key press, as Twilio reports it on the inbound track."""
        self._seq += 1
        self._write(
            b'{"event":"dtmf","streamSid":"%s","sequenceNumber":"%d",'
            b'"dtmf":{"track":"inbound_track","digit":%s}}'
            % (self.stream_sid.encode(), self._seq, orjson.dumps(str(digit)))
        )
        self.dtmf_sent += 1

    # -- the send slot (called by the ticker) ------------------------------------------------------

    def _on_slot(self, now: float) -> None:
        while self._next_slot <= now + SLOT_TOLERANCE_S:
            slot = self._next_slot
            if now - slot > FRAME_S:
                # More than one slot is due: send only the latest (never a burst); see above.
                missed = math.floor((now - slot) / FRAME_S)
                self.frames_late += missed
                slot += missed * FRAME_S
            self._next_slot = slot + FRAME_S
            utt = self._utt
            if utt is None:
                payload = SILENCE_B64
            else:
                i = utt.pos
                payload = utt.payloads[i]
                utt.pos = i + 1
                sent = time.monotonic()
                utt.last_sent = sent
                if i == 0:
                    utt.first_sent = sent
                    utt._resolve("started", sent)
                if utt.voiced[i]:
                    utt.last_voiced_sent = sent
                    if utt.first_voiced_sent is None:
                        utt.first_voiced_sent = sent
                    if utt.loud[i]:
                        utt.last_loud_sent = sent
                        if utt.first_loud_sent is None:
                            utt.first_loud_sent = sent
                if utt.pos >= len(utt.payloads):
                    self._utt = None
                    utt._resolve("finished", sent)
            self._seq += 1
            self._chunk += 1
            transport = self._transport
            if transport is not None and transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                self.frames_dropped_send += 1
                continue
            try:
                self._write(
                    self._media_tpl
                    % (self._seq, self._chunk, round((slot - self._t0) * 1000.0), payload)
                )
            except Exception as exc:  # noqa: BLE001 - the socket went away under us
                self.error = self.error or f"send: {exc!r}"
                self._stop_sending()
                return
            self.frames_sent += 1

    def _stop_sending(self) -> None:
        if self._sending:
            self._sending = False
            self.ticker.remove(self)
        self._next_slot = math.inf
        utt = self._utt
        if utt is not None:
            self._utt = None
            utt._cut(time.monotonic())

    # -- receiving and playout ---------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        on_text = self._on_text
        arrival = self.ticker.arrival
        try:
            while True:
                msg = await ws.receive()
                kind = msg.type
                if kind is WSMsgType.TEXT:
                    on_text(msg.data, arrival())
                elif kind is WSMsgType.BINARY:
                    self._on_binary()
                elif kind is WSMsgType.CLOSE:
                    # The server ended the stream: Twilio sends `stop` (if it has not yet) and
                    # completes the close.
                    self.closed_by_server = self.closed_at is None and self._sending
                    self._stop_sending()
                    self._finish_playout(time.monotonic())
                    self._send_stop()
                    await ws.close()
                    break
                elif kind in (WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
                    if kind is WSMsgType.ERROR:
                        self.error = self.error or f"receive: {ws.exception()!r}"
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - record, never crash the harness
            self.error = self.error or f"receive: {exc!r}"
        finally:
            self._stop_sending()
            self._finish_playout(time.monotonic())
            self._mark_closed()

    def _on_handler_error(self, exc: Exception) -> None:
        self.error = self.error or f"handler: {exc!r}"

    def _on_binary(self, data: bytes = b"", now: float = 0.0) -> None:
        self.binary_frames += 1  # Twilio logs a warning and drops it

    def feed(self, data: str | bytes, now: float) -> None:
        """Hand one text frame from the server to the caller, as received at `now`.

        This is all the receive loop does per message; tests drive the playout model with it on
        a synthetic clock (media and clear need no socket; echoing a mark does).
        """
        self._on_text(data, now)

    def _on_text(self, data: str | bytes, now: float) -> None:
        try:
            msg = orjson.loads(data)
            event = msg["event"]
            sid = msg.get("streamSid")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            self.invalid_messages += 1
            return
        if event == "media":
            if sid != self.stream_sid:
                self.wrong_stream_sid += 1
                return
            try:
                payload = msg["media"]["payload"]
                if payload == SILENCE_B64_STR:  # what most of a call is: no decoding needed
                    self._queue_frame(SILENCE, False, False, now)
                    return
                audio = binascii.a2b_base64(payload)
            except (KeyError, TypeError, binascii.Error, ValueError):
                self.invalid_messages += 1
                return
            if len(audio) == FRAME_BYTES:
                self._queue_frame(audio, is_loud(audio), not is_silent(audio), now)
            elif audio:
                self._queue_payload(audio, now)
        elif event == "mark" or event == "clear":
            if sid != self.stream_sid:
                self.wrong_stream_sid += 1
            elif event == "clear":
                self._on_clear(now)
            else:
                mark = msg.get("mark")
                name = mark.get("name") if isinstance(mark, dict) else None
                if isinstance(name, str):
                    self._on_mark(name, now)
                else:
                    self.invalid_messages += 1
        else:
            self.unknown_events += 1

    def _queue_payload(self, audio: bytes, now: float) -> None:
        """A payload of any length: plays for len/8000 s, recorded per 160-byte piece."""
        for i in range(0, len(audio), FRAME_BYTES):
            piece = audio[i : i + FRAME_BYTES]
            self._queue_frame(
                piece,
                is_loud(piece),
                not is_silent(piece),
                now,
                duration=len(piece) * SAMPLE_S,
                count=i == 0,
            )

    def _queue_frame(
        self,
        frame: bytes,
        loud: bool,
        nonsilent: bool,
        now: float,
        duration: float = FRAME_S,
        count: bool = True,
    ) -> None:
        if count:
            self.frames_received += 1
        if not self._playing:
            return
        start = self._play_end
        gap = False
        if start <= now:
            # Empty buffer: the slot playing now stays silent; this frame starts at the next one.
            grid0 = self._grid0
            start = grid0 + math.ceil((now - grid0) / FRAME_S - 1e-9) * FRAME_S
            gap = start > self._play_end + 1e-6
            if gap and nonsilent and self._last_nonsilent and self._in_utterance:
                self.underruns += 1
                self.underrun_slots += max(1, round((start - self._play_end) / FRAME_S))
        heard = self.heard
        if loud and (gap or not heard or not self.heard_loud[-1]):
            self.onsets.append(start)
            self.onset_arrivals.append(now)
        heard.append(start)
        self.heard_loud.append(1 if loud else 0)
        if self.record_audio:
            self.heard_audio.append(frame)
        self._play_end = start + duration
        self._last_nonsilent = nonsilent
        if nonsilent:
            self._in_utterance = True

    def _on_mark(self, name: str, now: float) -> None:
        self.marks_received += 1
        self._in_utterance = False  # an underrun needs two frames of the same utterance
        if self._play_end <= now and not self._pending_marks:
            self._echo_mark(name, now)
            return
        self._pending_marks.append((self._play_end, name))
        if self._mark_timer is None:
            self._arm_mark_timer()

    def _arm_mark_timer(self) -> None:
        due = self._pending_marks[0][0]
        loop = asyncio.get_running_loop()
        self._mark_timer = loop.call_later(max(0.0, due - time.monotonic()), self._flush_marks)

    def _flush_marks(self) -> None:
        self._mark_timer = None
        now = time.monotonic()
        marks = self._pending_marks
        while marks and marks[0][0] <= now + 0.0005:
            self._echo_mark(marks.popleft()[1], now)
        if marks:
            self._arm_mark_timer()

    def _echo_mark(self, name: str, now: float) -> None:
        if self.closed_at is not None:
            return
        self._seq += 1
        try:
            self._write(
                b'{"event":"mark","sequenceNumber":"%d","streamSid":"%s","mark":{"name":%s}}'
                % (self._seq, self.stream_sid.encode(), orjson.dumps(name))
            )
        except Exception as exc:  # noqa: BLE001
            self.error = self.error or f"send: {exc!r}"
            return
        self.marks_echoed.append((name, now, bisect_right(self.heard, now)))

    def _on_clear(self, now: float) -> None:
        self.clears_received += 1
        self.clears.append(now)
        heard = self.heard
        keep = bisect_right(heard, now)  # frames whose slot has started stay heard
        dropped = len(heard) - keep
        if dropped:
            del heard[keep:]
            del self.heard_loud[keep:]
            if self.record_audio:
                del self.heard_audio[keep:]
            self._drop_onsets_after(now)
            self.frames_cleared += dropped
        # The frame in its slot finishes; nothing after it is queued any more.
        playing_end = heard[-1] + FRAME_S if heard else -math.inf
        self._play_end = playing_end if playing_end > now else min(self._play_end, now)
        self._last_nonsilent = False
        self._in_utterance = False
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None
        marks = self._pending_marks
        while marks:
            self._echo_mark(marks.popleft()[1], now)

    def _drop_onsets_after(self, now: float) -> None:
        keep = bisect_right(self.onsets, now)
        del self.onsets[keep:]
        del self.onset_arrivals[keep:]

    def _finish_playout(self, now: float) -> None:
        """At the end of the call, frames whose slot has not started are never heard."""
        self._playing = False
        heard = self.heard
        keep = bisect_right(heard, now)
        if keep < len(heard):
            self.frames_unplayed += len(heard) - keep
            del heard[keep:]
            del self.heard_loud[keep:]
            if self.record_audio:
                del self.heard_audio[keep:]
            self._drop_onsets_after(now)
            self._play_end = min(self._play_end, now)
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None

    def _send_stop(self) -> None:
        if self.stop_sent or self.closed_at is not None or self._ws is None or self._ws.closed:
            return
        self._seq += 1
        try:
            self._write(
                b'{"event":"stop","sequenceNumber":"%d","streamSid":"%s",'
                b'"stop":{"accountSid":"%s","callSid":"%s"}}'
                % (
                    self._seq,
                    self.stream_sid.encode(),
                    self.account_sid.encode(),
                    self.call_sid.encode(),
                )
            )
        except Exception:  # noqa: BLE001 - the socket is already gone; nothing to tell
            return
        self.stop_sent = True

    def _mark_closed(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()
        self._write = _closed_writer
        self._pending_marks.clear()

    # -- what was heard ----------------------------------------------------------------------------

    def frames_heard(self, now: float | None = None) -> int:
        """Frames whose slot has started by `now` (default: the current time)."""
        return bisect_right(self.heard, time.monotonic() if now is None else now)

    def first_audio_after(self, t: float, now: float | None = None) -> float | None:
        """Start of the first loud frame heard at or after `t` (None if none yet)."""
        now = time.monotonic() if now is None else now
        i = bisect_left(self.heard, t)
        n = bisect_right(self.heard, now)
        j = self.heard_loud.find(1, i, n)
        return self.heard[j] if j >= 0 else None

    def last_audio_heard(self, now: float | None = None) -> float | None:
        """Start of the last loud frame heard by `now`."""
        now = time.monotonic() if now is None else now
        j = self.heard_loud.rfind(1, 0, bisect_right(self.heard, now))
        return self.heard[j] if j >= 0 else None

    def audio_playing(self, t: float) -> bool:
        """Whether a loud frame was in its slot at time `t`."""
        i = bisect_right(self.heard, t) - 1
        return i >= 0 and bool(self.heard_loud[i]) and self.heard[i] + FRAME_S > t

    def audio_stopped_after(
        self, t: float, min_silence: float = 0.1, now: float | None = None
    ) -> float | None:
        """When playback went silent after `t`: the start of the first stretch of at least
        `min_silence` with no loud frame in it (silence, empty slots, or a cleared buffer).

        Returns `t` itself when nothing loud was playing at `t` and nothing loud followed within
        `min_silence`; None when playback has not been silent that long yet.
        """
        now = time.monotonic() if now is None else now
        heard, loud = self.heard, self.heard_loud
        n = bisect_right(heard, now)
        i = bisect_right(heard, t) - 1
        quiet_from = t
        if i >= 0 and loud[i] and heard[i] + FRAME_S > t:
            quiet_from = heard[i] + FRAME_S
        j = i + 1
        while True:
            j = loud.find(1, j, n)
            if j < 0:
                break
            if heard[j] - quiet_from >= min_silence - 1e-9:
                return quiet_from
            quiet_from = max(quiet_from, heard[j] + FRAME_S)
            j += 1
        return quiet_from if now - quiet_from >= min_silence else None

    def loud_frames_between(self, t0: float, t1: float) -> int:
        """Loud frames whose slot started in (t0, t1]."""
        i = bisect_right(self.heard, t0)
        j = bisect_right(self.heard, t1)
        return self.heard_loud.count(1, i, j)

    def stats(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {
            "frames_sent": self.frames_sent,
            "frames_late": self.frames_late,
            "frames_dropped_send": self.frames_dropped_send,
            "frames_received": self.frames_received,
            "frames_heard": self.frames_heard(now),
            "frames_cleared": self.frames_cleared,
            "frames_unplayed": self.frames_unplayed,
            "underruns": self.underruns,
            "underrun_slots": self.underrun_slots,
            "marks_received": self.marks_received,
            "marks_echoed": len(self.marks_echoed),
            "clears_received": self.clears_received,
            "wrong_stream_sid": self.wrong_stream_sid,
            "unknown_events": self.unknown_events,
            "binary_frames": self.binary_frames,
            "invalid_messages": self.invalid_messages,
            "dtmf_sent": self.dtmf_sent,
            "closed_by_server": self.closed_by_server,
            "error": self.error,
        }


def _closed_writer(data: bytes) -> None:
    raise ConnectionResetError("the stream is closed")


class _DataTap:
    """Sits in front of aiohttp's frame parser on one client connection.

    Every complete, unfragmented text or binary frame goes straight to the caller's handler
    (aiohttp would queue it, wake the receive task through a future and step two coroutines per
    message: most of the harness's receive cost). Control frames (close, ping, pong) are handed
    to aiohttp's parser unchanged, so closing and pinging keep aiohttp's handling; anything
    unusual (a fragment, RSV bits, a masked or oversized frame, an unknown opcode) switches the
    connection over to aiohttp for good, and the receive loop then gets its messages as usual.
    """

    __slots__ = (
        "_inner", "_on_text", "_on_binary", "_on_error", "_clock", "_buf", "_through", "_max",
    )  # fmt: skip

    def __init__(
        self,
        inner: Any,
        on_text: Callable[[bytes, float], None],
        on_binary: Callable[[bytes, float], None],
        on_error: Callable[[Exception], None],
        clock: Callable[[], float],
        max_size: int,
    ) -> None:
        self._inner = inner
        self._clock = clock
        self._on_text = on_text
        self._on_binary = on_binary
        self._on_error = on_error
        self._buf = b""
        self._through = False
        self._max = max_size

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._through:
            return self._inner.feed_data(data)  # type: ignore[no-any-return]
        buf = self._buf + data if self._buf else bytes(data)
        end = len(buf)
        pos = 0
        clock = self._clock
        while end - pos >= 2:
            first = buf[pos]
            length = buf[pos + 1]
            if length & 0x80 or first & 0x70 or not first & 0x80:
                break  # masked (a server must not), RSV bits, or a fragment: aiohttp's business
            length &= 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    self._buf = buf[pos:]
                    return False, b""
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                break  # larger than any media message; let aiohttp enforce its limits
            if length > self._max:
                break
            stop = pos + head + length
            if stop > end:
                self._buf = buf[pos:]
                return False, b""
            opcode = first & 0x0F
            if opcode == 1 or opcode == 2:
                handler = self._on_text if opcode == 1 else self._on_binary
                try:
                    handler(buf[pos + head : stop], clock())
                except Exception as exc:  # noqa: BLE001 - a harness bug must not kill the socket
                    self._on_error(exc)
            elif opcode in (8, 9, 10):
                result: tuple[bool, bytes] = self._inner.feed_data(buf[pos:stop])
                if result[0]:
                    self._through = True
                    return result
            else:
                break
            pos = stop
        else:
            self._buf = buf[pos:]
            return False, b""
        # Something this tap does not handle: from here on aiohttp parses everything.
        self._through = True
        self._buf = b""
        return self._inner.feed_data(buf[pos:])  # type: ignore[no-any-return]


def _tap_data_frames(
    ws: aiohttp.ClientWebSocketResponse,
    on_text: Callable[[bytes, float], None],
    on_binary: Callable[[bytes, float], None],
    on_error: Callable[[Exception], None],
    clock: Callable[[], float],
) -> bool:
    """Installs a `_DataTap` on `ws`'s connection; False (and nothing changed) when this aiohttp
    is not built the way the tap expects, in which case `ws.receive()` delivers everything."""
    proto = getattr(getattr(ws, "_conn", None), "protocol", None)  # the connection's protocol
    inner = getattr(proto, "_payload_parser", None)
    payload = getattr(proto, "_payload", None)
    if proto is None or inner is None or payload is None or not hasattr(proto, "set_parser"):
        return False
    if getattr(ws, "compress", 0):
        return False  # compressed frames carry RSV1; the tap would hand them all over anyway
    proto.set_parser(_DataTap(inner, on_text, on_binary, on_error, clock, MAX_MESSAGE), payload)
    return True


def _frame_writer(ws: aiohttp.ClientWebSocketResponse) -> Callable[[bytes], None]:
    """A synchronous TEXT-frame writer for `ws`.

    aiohttp's `send_str` is a coroutine because it may wait for the socket to drain; the ticker
    serves every call of the process and must never wait on one of them, so frames go straight
    to aiohttp's frame encoder (masking is done in C) and the caller bounds the socket's write
    buffer itself (`MAX_WRITE_BUFFER`).
    """
    writer = getattr(ws, "_writer", None)
    write_frame = getattr(writer, "_write_websocket_frame", None)
    if write_frame is not None and not getattr(writer, "compress", 0):
        opcode = int(WSMsgType.TEXT)

        def write(data: bytes) -> None:
            write_frame(data, opcode, 0)

        return write

    # Another aiohttp: correct but slower, one task per message.
    pending: set[asyncio.Task[None]] = set()

    def write_via_task(data: bytes) -> None:
        task = asyncio.ensure_future(ws.send_str(data.decode()))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return write_via_task


class Ticker:
    """One task on an absolute monotonic schedule that serves every caller's send slot.

    The 20 ms frame is divided into `phases` steps; each caller is assigned to the least-used step,
    so the process sends in `phases` smaller bursts per frame instead of one burst of every call
    (real calls are not phase-aligned; `phases=1` gives the all-at-once worst case).
    """

    def __init__(self, phases: int = 4, frame: float = FRAME_S) -> None:
        if phases < 1:
            raise ValueError("phases must be at least 1")
        self.phases = phases
        self.frame = frame
        self.step = frame / phases
        self.epoch = time.monotonic()
        self._groups: list[dict[int, TwilioCaller]] = [{} for _ in range(phases)]
        self._task: asyncio.Task[None] | None = None
        self.lags = array("d")  # how late each wake-up was, seconds
        self.next_due = math.inf  # the heartbeat the ticker is waiting for (inf: not running)
        self.stall_dated = 0  # messages dated back to a missed heartbeat (see `arrival`)
        self.stalls: list[tuple[float, float]] = []  # (when, how late) of wake-ups a frame late
        self.busy = 0.0  # seconds spent serving slots

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups)

    def arrival(self) -> float:
        """When a message being read now arrived, as well as the harness can tell.

        Normally: now. But when the loop has missed the ticker's heartbeat by more than
        `STALL_S`, the harness was stalled (busy, or not scheduled) and everything read now may
        have arrived at any moment since; it is dated to the missed heartbeat, the earliest it
        could have been read. Otherwise a stall of the harness would bunch arrivals and deepen
        every caller's playout buffer for the rest of the call, blaming the server for it.
        """
        now = time.monotonic()
        if now - self.next_due > STALL_S:
            self.stall_dated += 1
            return self.next_due
        return now

    def add(self, caller: TwilioCaller) -> float:
        """Registers `caller`; returns its first send slot (at or after now)."""
        group = min(range(self.phases), key=lambda i: len(self._groups[i]))
        self._groups[group][id(caller)] = caller
        caller._phase_group = group
        now = time.monotonic()
        origin = self.epoch + group * self.step
        first = origin + math.ceil((now - origin) / self.frame) * self.frame
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="twilio-ticker")
        return first

    def remove(self, caller: TwilioCaller) -> None:
        if 0 <= caller._phase_group < self.phases:
            self._groups[caller._phase_group].pop(id(caller), None)

    async def close(self) -> None:
        self.next_due = math.inf
        for g in self._groups:
            g.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def lag_summary(self) -> dict[str, float]:
        """Wake-up lateness of the ticker in ms, and how often it was more than a frame late
        (a stall: the harness, not the server, delayed frames then)."""
        lags = sorted(self.lags)
        if not lags:
            return {
                "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "wakeups": 0, "stalls": 0,
                "stall_dated": self.stall_dated,
            }  # fmt: skip
        return {
            "p50_ms": 1000.0 * lags[len(lags) // 2],
            "p99_ms": 1000.0 * lags[min(len(lags) - 1, int(len(lags) * 0.99))],
            "max_ms": 1000.0 * lags[-1],
            "wakeups": len(lags),
            "stalls": len(self.stalls),
            "stall_dated": self.stall_dated,
        }

    async def _run(self) -> None:
        clock = time.monotonic
        step = self.step
        epoch = self.epoch
        groups = self._groups
        phases = self.phases
        done = math.floor((clock() - epoch) / step)
        while any(groups):
            due = epoch + (done + 1) * step
            # Always give the loop a turn, even when behind: a ticker that catches up without
            # yielding starves every receive callback, and the arrivals it delays would reach
            # the playout model in bursts.
            self.next_due = due
            await asyncio.sleep(max(0.0, due - clock()))
            now = clock()
            lag = now - due
            self.lags.append(max(0.0, lag))
            if lag > self.frame:
                self.stalls.append((now, lag))
            reached = max(done + 1, math.floor((now + SLOT_TOLERANCE_S - epoch) / step))
            # After a long stall every group is due: each caller sends all its missed frames.
            first = max(done + 1, reached - phases + 1)
            for k in range(first, reached + 1):
                for caller in list(groups[k % phases].values()):
                    caller._on_slot(now)
            done = reached
            self.busy += clock() - now
        self.next_due = math.inf
        self._task = None
