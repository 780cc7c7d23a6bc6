"""WebRTC for browsers on aiortc: `POST /webrtc/offer`, the page at `GET /`, its events socket.

One RTCPeerConnection and one `Call` per session. ICE is gathered before the answer leaves (no
trickle), with host candidates on every interface (same machine, LAN) and the STUN/TURN servers of
`settings.stun_servers`. The answer carries the engine's audio track and only Opus.

Inbound: the patch point
------------------------
aiortc's RTCRtpReceiver pushes audio RTP through its own `JitterBuffer(capacity=16, prefetch=4)`
into a decoder thread: 80 ms of added delay, no adaptation, and one lost packet stalls the stream
until 16 packets pile up (320 ms), after which the delay never drains (it releases one frame per
packet that arrives). Here, on each audio receiver and before any RTP flows, that one object is
replaced (`install_receive_path`: the attribute `RTCRtpReceiver._RTCRtpReceiver__jitter_buffer`)
by an `OpusReceivePath`. aiortc calls its `add(packet)` for every RTP packet after doing its own
SSRC, statistics (RTCP receiver reports), RTX and payload-type bookkeeping; `add` consumes the
packet and returns "no frame", so aiortc's decoder thread stays idle. The replacement:

- pushes a 2-byte token per packet into the engine's native adaptive jitter buffer (order, loss,
  and when to give up on a missing packet are decided there; the Opus payload waits in a slot
  table beside it, since Opus packets vary in size and the native buffer holds fixed frames);
- decodes each released packet with libopus, in sequence order, straight to 16 kHz mono (Opus
  decodes natively at 16 kHz: no 48 kHz detour, no resampler), through ctypes on the libopus that
  PyAV ships (or the system's);
- turns a packet given up on into concealment: Opus in-band FEC from the next packet when it is
  already here, else Opus PLC. Never a stall: a missing packet costs at most its deadline;
- keeps one timer at the next frame's deadline, so a lost packet is concealed when it is due,
  not when the packet after it happens to arrive, and a stream that stops (DTX, a dead link)
  keeps its frame clock for the turn machine: concealment fading to silence, every 20 ms.

With no loadable libopus (or `media="aiortc"`, the measured baseline), aiortc's own receive path is
used unchanged, and a task reads its track: 48 kHz stereo frames → left channel → 16 kHz.

Outbound
--------
`CallAudioTrack`, an AudioStreamTrack that aiortc's sender polls: paced on the monotonic clock in
20 ms slots (an absolute schedule: no drift; a slot missed while the loop was busy is skipped, so
the RTP timestamp jumps rather than the stream bursting), fed from the call's output stream, silence
when idle. In engine mode it hands aiortc ready Opus packets (CELT low-delay at 16 kHz, 2.5 ms
look-ahead, ~40 us a frame) that the sender only packetizes; aiortc's own path (`media="aiortc"`)
resamples to 48 kHz stereo and encodes at complexity 10 on the thread pool, once per frame.

Audio handed to the encoder cannot be recalled (RTP has no `clear`): it counts as heard when it is
sent, so a pause has nothing to rewind; `on_heard` follows the last frame of an utterance after a
fixed playout allowance (`PLAYOUT_DELAY_MS`). Pause and cancel take effect at the next 20 ms slot:
from then on only silence is sent, and the encoder state is reset so not even its look-ahead of the
cut audio leaks into the next packet.

Events and teardown
-------------------
`GET /webrtc/events/{sessionId}`: a WebSocket, one per session, server → page JSON text frames
(the call's `notify` events: transcripts, assistant text, turn state, barge-in steps, latency; plus
`session`, `stats` once a second, and at the end `error` when it is a failure, then `end`).
Events before the page connects are kept (up to `MAX_PENDING_EVENTS`). A WebSocket rather than an
RTCDataChannel: no SCTP association per call in the engine, and its close is a clear end-of-page
signal. The page may send `{"type": "hangup"}`.

A session ends when its connection fails or closes, its events socket closes, the call is closed
from elsewhere (`DELETE /session/{id}`, engine stop), the call hangs up, or ICE has not connected
within `CONNECT_TIMEOUT_S`: the call closes, the track and the peer connection stop, the session
leaves `engine.calls` and this module's registry. At shutdown the engine's drain ends the calls
(after its grace period); `on_cleanup` then closes every session left.
"""
from __future__ import annotations

import asyncio
import fractions
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from av import AudioFrame
from av.packet import Packet

from engine.audio.jitter import ACCEPTED, PACKET, RESET, JitterBuffer
from engine.audio.opus import OpusDecoder, OpusEncoder, load_libopus
from engine.audio.resample import Resampler
from engine.backends.base import CallInfo
from engine.call import Call
from engine.log import get_logger
from engine.transports.base import Reframer, ws_text_frame

log = get_logger("webrtc")

FRAME_MS = 20.0
FRAME_S = FRAME_MS / 1000.0
RATE = 16000
PCM16_FRAME = 640  # bytes of 16 kHz int16 = 20 ms
PCM16_SILENCE = bytes(PCM16_FRAME)
OPUS_CLOCK = 48000  # the RTP clock of Opus, whatever the audio bandwidth
OPUS_FRAME_TICKS = 960  # 20 ms on that clock
TIME_BASE_48K = fractions.Fraction(1, OPUS_CLOCK)
TIME_BASE_16K = fractions.Fraction(1, RATE)

MAX_OFFER_BYTES = 64 * 1024  # a browser's audio offer is 2-6 KiB
MAX_PENDING_EVENTS = 256  # events kept for a page whose socket is not connected yet
EVENT_WRITE_LIMIT = 256 * 1024  # a page not reading its socket loses events beyond this
CONNECT_TIMEOUT_S = 30.0  # an answered session whose ICE never connects is closed after this
PLAYOUT_DELAY_MS = 60.0  # from handing a frame to the encoder to the caller hearing it (network +
#                          the browser's jitter buffer): when `on_heard` follows an utterance's end
HANGUP_TAIL_MS = 300.0  # a hang-up waits this long, so the last words sent still play out
STATS_EVERY_FRAMES = 50  # a `stats` event per second while the page listens
JITTER_CAPACITY = 64  # packets the inbound window spans (1.28 s)
JITTER_MAX_DELAY_MS = 120.0  # the most the inbound jitter buffer waits for a missing packet
# The least it waits: senders pace RTP with timers that wake a few ms late or early even on
# loopback (measured J ~0.6 ms, so 4 J ~2.5 ms), and a packet 3 ms behind its slot is not lost.
JITTER_MIN_DELAY_MS = 5.0
RECEIVER_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"  # the patch point, see the docstring

# Ends that are failures, with what the page tells its user (it also gets `end` with the reason).
FAILURE_MESSAGES = {
    "connection-failed": "The audio connection to the engine failed.",
    "ice-timeout": "The audio connection could not be established.",
    "backend-failed": "The assistant could not be reached. Please try again later.",
}

MEDIA_PATHS = ("engine", "aiortc")
MEDIA_ENV = "WEBRTC_MEDIA"  # the setting's name, for error messages
WEB_DIR = Path(__file__).resolve().parent.parent / "web"


# ---------------------------------------------------------------------------------------------
# Inbound: the receive path that replaces aiortc's audio jitter buffer
# ---------------------------------------------------------------------------------------------

FrameSink = Callable[[bytes, float], None]  # (20 ms of 16 kHz PCM, monotonic ms released)
_TOKEN = b"\x00\x00"  # what the native buffer holds per packet; the payload waits in a slot table


class OpusReceivePath:
    """Opus RTP → native jitter buffer → libopus at 16 kHz (FEC/PLC for lost ones) → `sink`.

    Stands in for aiortc's audio `JitterBuffer` on one RTCRtpReceiver (see the module docstring);
    `add` is the only method aiortc calls. Usable on its own: push packets, get 20 ms frames.
    """

    capacity = JITTER_CAPACITY

    def __init__(self, sink: FrameSink, *, min_delay_ms: float = JITTER_MIN_DELAY_MS,
                 max_delay_ms: float = JITTER_MAX_DELAY_MS) -> None:
        self._sink = sink
        self.jitter = JitterBuffer(
            len(_TOKEN), OPUS_FRAME_TICKS, OPUS_CLOCK, capacity=JITTER_CAPACITY,
            min_delay_ms=min_delay_ms, max_delay_ms=max_delay_ms)
        self._mask = JITTER_CAPACITY - 1
        self._payloads: list[bytes] = [b""] * JITTER_CAPACITY  # Opus packets held, by seq & mask
        self._seqs: list[int] = [-1] * JITTER_CAPACITY
        self._scratch = bytearray(len(_TOKEN))
        self._decoder = OpusDecoder(RATE)
        self._frames = Reframer(PCM16_FRAME)
        self._samples = RATE // 50  # duration of the last packet: the length of a concealment
        self._ssrc: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.fec_frames = 0  # concealments decoded from the next packet's FEC data
        self.bad_packets = 0  # packets libopus rejected (concealed instead)
        self.closed = False

    # -- aiortc's JitterBuffer face --------------------------------------------------------------

    def add(self, packet: Any) -> tuple[bool, None]:
        """One RTP packet (aiortc's RtpPacket); returns aiortc's "no PLI, no frame"."""
        payload = packet.payload
        if self.closed or not payload:
            return False, None  # padding-only packets carry no audio; their seq is concealed
        now = time.monotonic() * 1000.0
        if packet.ssrc != self._ssrc:
            if self._ssrc is not None:  # the sender restarted its stream: start afresh
                self.jitter.reset()
                self._decoder.reset()
                self._frames.clear()
                self._seqs = [-1] * JITTER_CAPACITY
            self._ssrc = packet.ssrc
        self.push(packet.sequence_number, packet.timestamp, payload, now)
        return False, None

    # -- sans-IO core ------------------------------------------------------------------------------

    def push(self, seq: int, timestamp: int, payload: bytes, now: float) -> None:
        """Offer one Opus packet that arrived at `now` (ms), then release whatever is due."""
        status = self.jitter.push(seq, timestamp, _TOKEN, now)
        if status == ACCEPTED or status == RESET:
            i = seq & self._mask
            self._payloads[i] = payload
            self._seqs[i] = seq & 0xFFFF
        self.poll(now)

    def poll(self, now: float) -> None:
        """Release every frame due at `now`: packets in order, concealment for overdue gaps."""
        jitter = self.jitter
        scratch = self._scratch
        mask = self._mask
        seqs = self._seqs
        while (kind := jitter.pop_into(scratch, now)) >= 0:
            seq = jitter.last_seq
            i = seq & mask
            pcm = b""
            if kind == PACKET and seqs[i] == seq:
                seqs[i] = -1
                pcm = self._decoder.decode(self._payloads[i])
                self._payloads[i] = b""
                if pcm:
                    self._samples = len(pcm) >> 1
                else:
                    self.bad_packets += 1
            if not pcm:
                nxt = (seq + 1) & 0xFFFF
                j = nxt & mask
                fec = self._payloads[j] if seqs[j] == nxt else None
                if fec is not None and self._decoder.has_fec(fec):
                    self.fec_frames += 1
                pcm = self._decoder.conceal(self._samples, fec)
            if len(pcm) == PCM16_FRAME and not self._frames.pending():
                self._sink(pcm, now)
            else:
                self._frames.push(pcm)
                while (whole := self._frames.pop()) is not None:
                    self._sink(whole, now)
        self._arm(now)

    # -- the gap timer -----------------------------------------------------------------------------

    def _arm(self, now: float) -> None:
        """Wake at the deadline of the next frame, so a lost packet is concealed when it is due,
        not when the packet after it happens to arrive, and a stream that stops (DTX, a dead
        link) keeps its frame clock: concealment, then silence, every 20 ms."""
        deadline = self.jitter.next_deadline()
        timer = self._timer
        if timer is not None:
            if deadline is not None and abs(deadline - self._timer_at) < 0.5:
                return
            timer.cancel()
            self._timer, self._timer_at = None, float("inf")
        if deadline is None:
            return
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # driven without a loop (tests): the caller polls with its own clock
        self._timer_at = deadline
        # uvloop's timers tick in whole milliseconds and may fire up to 1 ms early: aim 1 ms past
        # the deadline so a wake-up never finds it not yet due (and re-arms in a spin).
        delay_s = (max(0.0, deadline - now) + 1.0) / 1000.0
        self._timer = self._loop.call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        if not self.closed:
            self.poll(time.monotonic() * 1000.0)

    def stats(self) -> dict[str, Any]:
        j = self.jitter
        return {
            "received": j.received, "released": j.released, "concealed": j.concealed,
            "lost": j.lost, "late": j.late, "reordered": j.reordered, "depth": j.depth,
            "fec": self.fec_frames,
            "jitterMs": round(j.jitter_ms, 2), "targetDelayMs": round(j.target_delay_ms, 2),
        }

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._decoder.close()


def install_receive_path(receiver: RTCRtpReceiver, sink: FrameSink) -> OpusReceivePath:
    """The patch point: an audio `receiver`, not yet receiving, gives its RTP to OpusReceivePath."""
    if not hasattr(receiver, RECEIVER_JITTER_ATTR):
        raise RuntimeError(
            f"this aiortc has no {RECEIVER_JITTER_ATTR}; the receive patch needs updating")
    path = OpusReceivePath(sink)
    setattr(receiver, RECEIVER_JITTER_ATTR, path)
    return path


async def read_stock_track(track: Any, sink: FrameSink) -> None:
    """aiortc's own receive path, unchanged: decoded 48 kHz frames → one channel → 16 kHz."""
    down = Resampler(OPUS_CLOCK, RATE)
    frames = Reframer(PCM16_FRAME)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        samples = frame.to_ndarray()  # packed s16: shape (1, samples * channels)
        channels = len(frame.layout.channels)
        mono = samples[0, ::channels] if channels > 1 else samples[0]
        frames.push(down.process(mono.tobytes()))
        now = time.monotonic() * 1000.0
        while (whole := frames.pop()) is not None:
            sink(whole, now)


# ---------------------------------------------------------------------------------------------
# Outbound: the call's output stream as an aiortc track
# ---------------------------------------------------------------------------------------------


class CallAudioTrack(AudioStreamTrack):
    """The engine's audio toward the browser: 20 ms slots on the monotonic clock.

    `source(now_ms)` gives the next 640 bytes of 16 kHz PCM. With `encoded`, recv() returns Opus
    packets (aiortc's sender only packetizes them); otherwise AudioFrames for aiortc's encoder.
    """

    kind = "audio"

    def __init__(self, source: Callable[[float], bytes], *, encoded: bool = True) -> None:
        super().__init__()
        self._source = source
        self._encoder = OpusEncoder() if encoded else None
        self._t0: float | None = None
        self._slot = 0
        self.slots_skipped = 0

    async def recv(self) -> Packet | AudioFrame:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
            slot = 0
        else:
            slot = self._slot + 1
            delay = self._t0 + slot * FRAME_S - now
            if delay > 0:
                await asyncio.sleep(delay)
                now = time.monotonic()
                if self.readyState != "live":
                    raise MediaStreamError
            elif delay < -FRAME_S:
                # The loop was busy past a whole slot: skip what was missed instead of bursting.
                missed = int(-delay / FRAME_S)
                slot += missed
                self.slots_skipped += missed
        self._slot = slot
        pcm = self._source(now * 1000.0)
        if self._encoder is not None:
            packet = Packet(self._encoder.encode(pcm))
            packet.pts = slot * OPUS_FRAME_TICKS
            packet.time_base = TIME_BASE_48K
            return packet
        frame = AudioFrame(format="s16", layout="mono", samples=PCM16_FRAME // 2)
        frame.planes[0].update(pcm)
        frame.sample_rate = RATE
        frame.pts = slot * (PCM16_FRAME // 2)
        frame.time_base = TIME_BASE_16K
        return frame

    def flush(self) -> None:
        """Barge-in: the next packet carries nothing of the audio before it."""
        if self._encoder is not None:
            self._encoder.reset()

    def stop(self) -> None:
        super().stop()
        if self._encoder is not None:
            self._encoder.close()


# ---------------------------------------------------------------------------------------------
# One session: a peer connection, a call, the page's events
# ---------------------------------------------------------------------------------------------


class OfferError(ValueError):
    """The offer cannot be answered (400)."""


@dataclass(frozen=True)
class MediaPath:
    """Which media path a session uses: "engine" (the patched paths) or "aiortc" (stock)."""

    receive: str = "engine"
    send: str = "engine"

    @classmethod
    def named(cls, name: str | None) -> MediaPath:
        name = (name or "engine").strip().lower()
        if name not in MEDIA_PATHS:
            raise ValueError(f"{MEDIA_ENV} must be one of {MEDIA_PATHS}, got {name!r}")
        if name == "engine" and load_libopus() is None:
            log.warning("webrtc.no_libopus", fallback="aiortc")
            name = "aiortc"
        return cls(name, name)


def ice_servers(entries: tuple[str, ...] | list[str]) -> list[RTCIceServer]:
    """`stun:host:port` and `turn:user:password@host:port[?transport=udp]` → RTCIceServers."""
    servers = []
    for entry in entries:
        scheme, _, rest = entry.partition(":")
        username = credential = None
        if "@" in rest:
            auth, rest = rest.rsplit("@", 1)
            username, _, credential = auth.partition(":")
        servers.append(
            RTCIceServer(urls=f"{scheme}:{rest}", username=username, credential=credential))
    return servers


_OPUS_RTPMAP = re.compile(r"^a=rtpmap:(\d+) opus/48000(?:/2)?\r?$", re.IGNORECASE | re.MULTILINE)


def advertise_opus_receive_options(sdp: str) -> str:
    """Tell the browser what the engine decodes best: in-band FEC (recovered on loss) and audio up
    to 16 kHz (it is decoded at 16 kHz: no bits spent above 8 kHz). aiortc writes no Opus fmtp."""
    match = _OPUS_RTPMAP.search(sdp)
    if match is None or f"a=fmtp:{match.group(1)} " in sdp:
        return sdp
    line = f"a=fmtp:{match.group(1)} useinbandfec=1;maxplaybackrate=16000;stereo=0\r\n"
    end = sdp.find("\n", match.end()) + 1
    if end == 0:  # the rtpmap is the last line and has no line end
        return sdp + "\r\n" + line
    return sdp[:end] + line + sdp[end:]


class WebRTCSession:
    """One browser call: the CallTransport of its `Call`."""

    kind = "webrtc"

    def __init__(self, registry: WebRTCSessions, session_id: str) -> None:
        self.registry = registry
        self.engine = registry.engine
        self.session_id = session_id
        self.media = registry.media
        self.pc = RTCPeerConnection(registry.configuration)
        self.call: Call | None = None
        self.track = CallAudioTrack(self.next_frame, encoded=self.media.send == "engine")
        self.receive_path: OpusReceivePath | None = None
        self._stock_reader: asyncio.Task[None] | None = None
        self.created = time.monotonic()
        self.connected_at: float | None = None
        self.close_reason: str | None = None
        self._closed: asyncio.Future[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        # the page's events
        self._ws: web.WebSocketResponse | None = None
        self._socket: asyncio.Transport | None = None
        self._pending: deque[bytes] = deque(maxlen=MAX_PENDING_EVENTS)
        self.events_dropped = 0
        # inbound health: the longest wait between two frames handed to the call
        self.frames_in = 0
        self.max_stall_ms = 0.0
        self._last_in: float | None = None
        # outbound
        self._pcm = bytearray(PCM16_FRAME)
        self._paused = False
        self._sending_generation = -1
        self._heard_due: deque[tuple[float, int]] = deque()  # (when heard, generation)
        self._frames_out = 0

    # -- set-up ------------------------------------------------------------------------------------

    async def answer(self, offer_sdp: str) -> str:
        """Applies the browser's offer; returns the answer SDP with every ICE candidate in it."""
        pc = self.pc
        pc.on("connectionstatechange", self._on_connection_state)
        # Our own transceiver first, so the offer's audio binds to it: Opus only, our track, and
        # the receive path patched in before any RTP can flow.
        transceiver = pc.addTransceiver(self.track, direction="sendrecv")
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs
                if c.mimeType.lower() == "audio/opus"]
        transceiver.setCodecPreferences(opus)
        if self.media.receive == "engine":
            self.receive_path = install_receive_path(transceiver.receiver, self._deliver)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc raises many kinds on malformed SDP
            raise OfferError(f"invalid SDP offer: {type(exc).__name__}: {str(exc)[:160]}") from exc
        if transceiver.mid is None:
            raise OfferError("the offer has no audio")
        for other in pc.getTransceivers():
            if other is not transceiver:  # extra m-lines (video, a second audio) are declined
                other.direction = "inactive"
        if self.media.receive == "aiortc":
            self._stock_reader = asyncio.get_running_loop().create_task(
                read_stock_track(transceiver.receiver.track, self._deliver),
                name=f"webrtc-in-{self.session_id}")
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)  # gathers every candidate before returning
        sdp = pc.localDescription.sdp
        if self.media.receive == "engine":
            sdp = advertise_opus_receive_options(sdp)
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(CONNECT_TIMEOUT_S, self._check_connected))
        return sdp

    async def start_call(self, info: CallInfo) -> None:
        self.call = Call(self.engine, info, self)
        await self.call.start()

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("webrtc.connection", session=self.session_id, state=state)
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
        elif state in ("failed", "closed"):
            self.close_soon(f"connection-{state}")

    def _check_connected(self) -> None:
        if self.connected_at is None:
            self.close_soon("ice-timeout")

    # -- inbound -----------------------------------------------------------------------------------

    def _deliver(self, frame: bytes, now: float) -> None:
        last = self._last_in
        if last is not None and now - last > self.max_stall_ms:
            self.max_stall_ms = now - last
        self._last_in = now
        self.frames_in += 1
        call = self.call
        if call is not None and not call.closed:
            call.on_frame(frame, now)
            path = self.receive_path
            if path is not None:
                stats = call.stats
                jitter = path.jitter
                stats.frames_concealed = jitter.concealed
                stats.frames_late = jitter.late
                stats.jitter_depth = jitter.depth

    # -- outbound (called by the track every 20 ms) ---------------------------------------------

    def next_frame(self, now: float) -> bytes:
        """The next 20 ms to send: the call's audio, or silence."""
        call = self.call
        self._frames_out += 1
        if self._frames_out % STATS_EVERY_FRAMES == 0 and self._socket is not None:
            self.notify(self.stats_event())
        if call is None:
            return PCM16_SILENCE
        if call.closed:
            self.close_soon("call-ended")
            return PCM16_SILENCE
        heard = self._heard_due
        while heard and heard[0][0] <= now:
            call.on_heard(heard.popleft()[1], now)
        if self._paused:
            return PCM16_SILENCE
        output = call.output
        generation = output.read_frame(self._pcm)
        if generation < 0:
            return PCM16_SILENCE
        if generation != self._sending_generation:
            self._sending_generation = generation
            call.on_output_started(generation, now)
        # Sent cannot be recalled: it will be heard, so nothing of it is left to rewind.
        output.heard_up_to(output.ring.read_pos)
        finished = output.finished_at_read()
        if finished is not None:
            heard.append((now + PLAYOUT_DELAY_MS, finished))
        call.stats.frames_out += 1
        return bytes(self._pcm)

    # -- CallTransport -----------------------------------------------------------------------------

    def kick(self) -> None:
        """Nothing to do: the track polls the output stream every 20 ms."""

    def pause(self, now: float) -> None:
        if self._paused or self.call is None:
            return
        self._paused = True
        self.track.flush()
        rewound = self.call.output.rewind()
        log.info("barge_in.output_paused", session=self.session_id, t=round(now, 1),
                 rewound_ms=rewound // 16)

    def resume(self, now: float) -> None:
        if self._paused:
            self._paused = False
            log.info("barge_in.output_resumed", session=self.session_id, t=round(now, 1))

    def cancel(self, now: float) -> None:
        if not self._paused:
            self.track.flush()
        self._paused = False
        self._sending_generation = -1

    def notify(self, event: dict[str, Any]) -> None:
        data = ws_text_frame(orjson.dumps(event))
        socket = self._socket
        if socket is None:
            if len(self._pending) == self._pending.maxlen:
                self.events_dropped += 1
            self._pending.append(data)
        elif socket.is_closing() or socket.get_write_buffer_size() > EVENT_WRITE_LIMIT:
            self.events_dropped += 1
        else:
            socket.write(data)

    def hangup(self, reason: str) -> None:
        # The last frames sent are still on the wire and in the browser's jitter buffer; closing
        # the connection at once would cut them off.
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(HANGUP_TAIL_MS / 1000.0, self.close_soon, reason))

    async def transfer(self, destination: str) -> bool:
        """A browser caller cannot be dialled through; the page shows that an agent is being
        connected, and the operator's system acts on the `agent-requested` event (on the page's
        events socket and in the logs, with the session id)."""
        self.notify({"type": "agent-requested", "sessionId": self.session_id,
                     "destination": destination})
        log.info("transfer.agent_requested", session=self.session_id, destination=destination)
        return True

    # -- the page's events socket ------------------------------------------------------------------

    def attach_events(self, ws: web.WebSocketResponse, socket: asyncio.Transport | None) -> None:
        self._ws = ws
        self._socket = socket
        self.notify({"type": "session", "sessionId": self.session_id, "media": self.media.receive})
        if socket is not None:
            while self._pending:
                socket.write(self._pending.popleft())

    def stats_event(self) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "stats", "framesIn": self.frames_in, "maxStallMs": round(self.max_stall_ms, 1),
            "connection": self.pc.connectionState, "slotsSkipped": self.track.slots_skipped,
            "eventsDropped": self.events_dropped,
        }
        if self.receive_path is not None:
            event.update(self.receive_path.stats())
        return event

    # -- teardown ----------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closed is not None

    def close_soon(self, reason: str) -> None:
        if self._closed is None:
            self.registry.spawn(self.close(reason))

    async def close(self, reason: str) -> None:
        """Ends everything the session holds; safe to call again (waits for the first close)."""
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        self.close_reason = reason
        try:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            if self._stock_reader is not None:
                self._stock_reader.cancel()
            if self.call is not None:
                await self.call.close(reason)
            if self._socket is not None:
                self.notify(self.stats_event())
                if reason in FAILURE_MESSAGES:
                    self.notify({"type": "error", "message": FAILURE_MESSAGES[reason]})
                self.notify({"type": "end", "reason": reason})
            self.track.stop()
            await self.pc.close()
            if self.receive_path is not None:
                self.receive_path.close()
            if self._stock_reader is not None:
                await asyncio.gather(self._stock_reader, return_exceptions=True)
            ws = self._ws
            if ws is not None and not ws.closed:
                await ws.close(message=reason.encode()[:120])
        except Exception:
            log.exception("webrtc.close_failed", session=self.session_id)
        finally:
            self.registry.sessions.pop(self.session_id, None)
            log.info("webrtc.end", session=self.session_id, reason=reason, frames_in=self.frames_in,
                     max_stall_ms=round(self.max_stall_ms, 1),
                     **(self.receive_path.stats() if self.receive_path is not None else {}))
            self._closed.set_result(None)


class WebRTCSessions:
    """Every live browser session of the process, and the tasks that end them."""

    def __init__(self, engine: Any, media: MediaPath) -> None:
        self.engine = engine
        self.media = media
        self.configuration = RTCConfiguration(iceServers=ice_servers(engine.settings.stun_servers))
        self.sessions: dict[str, WebRTCSession] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    async def open(self, offer_sdp: str) -> tuple[WebRTCSession, str]:
        """Answers an offer: a new session with its call started; raises OfferError."""
        session_id = "webrtc-" + secrets.token_urlsafe(18)
        session = WebRTCSession(self, session_id)
        self.sessions[session_id] = session
        try:
            answer = await session.answer(offer_sdp)
            info = CallInfo(session_id=session_id, transport="webrtc",
                            metadata={"media": self.media.receive})
            await session.start_call(info)
        except BaseException:
            await session.close("offer-failed")
            raise
        log.info("webrtc.start", session=session_id, media=self.media.receive)
        return session, answer

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close_all(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            await session.close(reason)
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)


WEBRTC_KEY = web.AppKey("webrtc", WebRTCSessions)


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


async def handle_offer(request: web.Request) -> web.Response:
    from engine.server import ENGINE_KEY, json_error, json_response, read_capped

    engine = request.app[ENGINE_KEY]
    sessions = request.app[WEBRTC_KEY]
    body = await read_capped(request, MAX_OFFER_BYTES)
    if body is None:
        return json_error(413, f"offer larger than {MAX_OFFER_BYTES} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return json_error(400, "body is not JSON")
    if not isinstance(data, dict):
        return json_error(400, 'body must be an object {"sdp", "type": "offer"}')
    if data.get("type") != "offer":
        return json_error(400, 'type must be "offer"')
    sdp = data.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        return json_error(400, "sdp must be a non-empty string")
    if "m=audio" not in sdp:
        return json_error(400, "the offer has no audio")
    if engine.overloaded():
        engine.metrics.calls_shed += 1
        log.warning("webrtc.shed", loop_lag_ms=round(engine.loop_lag_ms, 1))
        return json_error(503, "the engine is at capacity; try again shortly")
    try:
        session, answer = await sessions.open(sdp)
    except OfferError as exc:
        log.warning("webrtc.bad_offer", error=str(exc))
        return json_error(400, str(exc))
    return json_response({"sdp": answer, "type": "answer", "sessionId": session.session_id})


async def handle_events(request: web.Request) -> web.StreamResponse:
    from engine.server import json_error

    session = request.app[WEBRTC_KEY].sessions.get(request.match_info["sessionId"])
    if session is None or session.closing:
        return json_error(404, "unknown session")
    if session._ws is not None:
        return json_error(409, "the session's events socket is already open")
    ws = web.WebSocketResponse(compress=False, max_msg_size=4096, autoping=True, timeout=2.0)
    await ws.prepare(request)
    session.attach_events(ws, request.transport)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and '"hangup"' in msg.data:
                break
            if msg.type is WSMsgType.ERROR:
                break
    finally:
        await session.close("page-closed")
    return ws


async def handle_config(request: web.Request) -> web.Response:
    """The page's settings: ICE servers for its RTCPeerConnection (the engine's own), the name."""
    from engine.server import json_response

    sessions = request.app[WEBRTC_KEY]
    servers = []
    for server in sessions.configuration.iceServers or []:
        entry: dict[str, Any] = {"urls": server.urls}
        if server.username:
            entry.update(username=server.username, credential=server.credential)
        servers.append(entry)
    assistant = getattr(getattr(sessions.engine, "assistant", None), "name", None)
    return json_response({"iceServers": servers, "assistant": assistant})


async def handle_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def setup_routes(app: web.Application, *, media: str | None = None) -> None:
    """Adds `POST /webrtc/offer`, `GET /webrtc/events/{sessionId}`, `GET /webrtc/config`, the
    page (`GET /`, `/web/*`) and the cleanup that ends every session. `media` ("engine" or
    "aiortc", default: the `webrtc_media` setting) picks the media path for measurements."""
    from engine.server import ENGINE_KEY

    if WEBRTC_KEY in app:
        return
    engine = app[ENGINE_KEY]
    sessions = WebRTCSessions(engine, MediaPath.named(media or engine.settings.webrtc_media))
    app[WEBRTC_KEY] = sessions
    app.router.add_post("/webrtc/offer", handle_offer)
    app.router.add_get("/webrtc/events/{sessionId}", handle_events)
    app.router.add_get("/webrtc/config", handle_config)
    app.router.add_get("/", handle_index)
    app.router.add_static("/web/", WEB_DIR, append_version=False)

    async def close_sessions(app: web.Application) -> None:
        await sessions.close_all("engine-stopping")

    # At cleanup, not shutdown: the engine's drain (on_shutdown) lets live calls finish within
    # its grace period first, whichever order the hooks were added in.
    app.on_cleanup.append(close_sessions)
