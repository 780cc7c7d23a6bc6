"""One conversation: a transport, the VAD and turn machine, the output stream and a backend.

Everything here runs on the event loop and is synchronous per event: a caller frame, a backend
event and a mark from the transport are each handled to the end before the next, so two
interruptions can never race; the turn machine coalesces them. The call parses no wire format.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from engine.backends.base import Backend, CallInfo
from engine.events import (
    AssistantText,
    AudioChunk,
    BackendError,
    BackendEvent,
    CancelOutput,
    EndOfTurn,
    HangUp,
    Interrupted,
    PauseOutput,
    ResumeOutput,
    Status,
    Transcript,
    TransferRequest,
    TurnAction,
    UserSpeechStarted,
    UtteranceEnd,
)
from engine.log import get_logger
from engine.output import OutputStream
from engine.turns import TurnMachine

if TYPE_CHECKING:
    from engine.runtime import Engine
    from engine.transports.base import CallTransport

log = get_logger("call")

HANGUP_GRACE_S = 15.0  # longest wait for a goodbye to be heard before the line is closed
#: on a relaying backend (echo), one chunk in this many is timed through the output stream
RELAY_PROBE_EVERY = 50


def now_ms() -> float:
    return time.monotonic() * 1000.0


def _ignore(event: BackendEvent) -> None:
    """Where a closed call's backend events go."""


class Call:
    def __init__(self, engine: "Engine", info: CallInfo, transport: "CallTransport") -> None:
        self.engine = engine
        self.info = info
        self.session_id = info.session_id
        self.transport = transport
        self.stats = engine.metrics.call_started(info.session_id)
        self.backend: Backend = engine.backend_factory(info, self.on_backend_event)
        self.output = OutputStream(self.backend.output_capacity_s)
        # A backend that relays caller audio as it comes (echo) feeds the relay-latency
        # histogram: written by the backend -> read by the transport to send, sampled.
        self._probe_countdown = RELAY_PROBE_EVERY if self.backend.relays_audio else 0
        if self._probe_countdown:
            # not a method of the call: the output stream must not point back at it (a cycle
            # would keep an ended call alive until a rare full garbage collection)
            histogram = engine.metrics.relay_latency
            self.output.on_probe = lambda waited_ms: histogram.observe(waited_ms / 1000.0)
        self.turn_taking = self.backend.turn_taking
        self.turns = TurnMachine(engine.turn_config)
        self.vad = engine.new_vad() if self.turn_taking else None
        self.started = now_ms()
        self.closed = False
        self._turn_speech_end: float | None = None  # the caller's last turn, awaiting a reply
        self._onset: float | None = None  # barge-in in progress: its first speech frame
        self._ending: str | None = None  # the call ends once the caller has heard everything
        self._tasks: set[asyncio.Task[Any]] = set()
        self._announcement = -1  # generation of an announcement the engine speaks itself
        self.dtmf: list[str] = []  # keys the caller pressed
        self.vapi_call_id: str | None = None  # the VAPI call behind this one, if any
        self._heard: dict[int, asyncio.Event] = {}  # announcements awaiting the caller's ear
        engine.calls[self.session_id] = self

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        log.info("call.start", session=self.session_id, transport=self.info.transport,
                 backend=type(self.backend).__name__)
        try:
            await self.backend.start()
        except Exception as exc:  # the backend could not be reached: apologise and end
            log.exception("call.backend_start_failed", session=self.session_id)
            self.on_backend_event(BackendError(f"backend start failed: {exc}", fatal=True))
            return
        self.vapi_call_id = getattr(self.backend, "call_id", None)
        if self.vapi_call_id and not self.closed:
            self.engine.vapi_calls[self.vapi_call_id] = self
            if self.engine.cluster is not None:  # so other workers can route its webhooks here
                self.engine.cluster.register_call(self.vapi_call_id)

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        try:
            await self.backend.close()
        except Exception:
            log.exception("call.backend_close_failed", session=self.session_id)
        # What the backend dropped on its side counts with the call's own losses.
        self.stats.frames_dropped_in += getattr(self.backend, "dropped_frames", 0)
        self.stats.frames_stale += getattr(self.backend, "discarded_chunks", 0)
        self.engine.calls.pop(self.session_id, None)
        if self.vapi_call_id:
            self.engine.vapi_calls.pop(self.vapi_call_id, None)
            if self.engine.cluster is not None:
                self.engine.cluster.unregister_call(self.vapi_call_id)
        self.engine.metrics.call_ended(self.session_id)
        log.info("call.end", session=self.session_id, reason=reason,
                 duration_s=round((now_ms() - self.started) / 1000.0, 2), **self.stats.as_dict())
        # The backend's callback is the call itself: cut that loop so an ended call is freed by
        # reference counting at once, not by a (rare, by design) full garbage collection.
        self.backend.emit = _ignore

    # -- caller → engine -----------------------------------------------------------------------

    def on_frame(self, frame: bytes, now: float) -> None:
        """One 20 ms caller frame, 16 kHz, arrived at `now`."""
        self.stats.frames_in += 1
        vad = self.vad
        if vad is not None:
            actions = self.turns.on_frame(vad.process(frame), now)
            if actions:
                self._act(actions, now)
        self.backend.send_audio(frame, now)

    def on_dtmf(self, digit: str) -> None:
        self.dtmf.append(digit)
        log.info("call.dtmf", session=self.session_id, digit=digit)
        self.transport.notify({"type": "dtmf", "digit": digit})
        self.backend.dtmf(digit)

    # -- output side ---------------------------------------------------------------------------

    def on_output_started(self, generation: int, now: float) -> None:
        """The transport is sending the first audio of `generation`."""
        if self._turn_speech_end is not None:
            latency = now - self._turn_speech_end
            self._turn_speech_end = None
            self.engine.metrics.response_latency.observe(latency / 1000.0)
            log.info("reply.first_audio", session=self.session_id, generation=generation,
                     latency_ms=round(latency, 1))
            self.transport.notify({"type": "latency", "responseMs": round(latency, 1)})
        if self.turn_taking:
            self.turns.on_reply_started(generation, now)
        self.transport.notify({"type": "turn", "state": self.turns.state.value})

    def on_heard(self, generation: int, now: float) -> None:
        """The caller has heard utterance `generation` to its end."""
        heard = self._heard.pop(generation, None)
        if heard is not None:
            heard.set()
        if self.turn_taking:
            self.turns.on_reply_heard(generation, now)
            self.transport.notify({"type": "turn", "state": self.turns.state.value})
        if self._ending is not None and self.output.unheard == 0:
            self.transport.hangup(self._ending)

    # -- backend → engine ----------------------------------------------------------------------

    def on_backend_event(self, event: BackendEvent) -> None:
        if self.closed:
            return
        kind = type(event)
        if kind is AudioChunk:
            chunk: AudioChunk = event  # type: ignore[assignment]  # tested above, no call per frame
            if self.output.write(chunk.pcm, chunk.generation):
                if self._probe_countdown:
                    self._probe_countdown -= 1
                    if not self._probe_countdown:
                        self._probe_countdown = RELAY_PROBE_EVERY
                        self.output.probe(now_ms())
                self.transport.kick()
            elif chunk.generation <= self.output.ring.cancelled_generation:
                self.stats.frames_stale += 1
        elif kind is UtteranceEnd:
            self.output.end(event.generation)  # type: ignore[union-attr, arg-type]
            self.transport.kick()
        elif kind is Transcript:
            assert isinstance(event, Transcript)
            now = now_ms()
            if event.role == "user":
                actions = self.turns.on_transcript(event.text, event.final, now)
                if actions:
                    self._act(actions, now)
            self.transport.notify({"type": "transcript", "role": event.role, "text": event.text,
                                   "final": event.final})
            if event.final:
                log.info("call.transcript", session=self.session_id, role=event.role,
                         text=event.text)
        elif kind is AssistantText:
            assert isinstance(event, AssistantText)
            if self.turn_taking:
                self.turns.expect_reply(event.generation)
            self.transport.notify({"type": "assistant", "text": event.text,
                                   "generation": event.generation})
            log.info("call.reply", session=self.session_id, generation=event.generation,
                     text=event.text)
        elif kind is Interrupted:
            assert isinstance(event, Interrupted)
            now = now_ms()
            self._act(self.turns.on_backend_interrupted(event.generation, now), now)
        elif kind is HangUp:
            assert isinstance(event, HangUp)
            self.end_after_heard(event.reason)
        elif kind is TransferRequest:
            assert isinstance(event, TransferRequest)
            self._spawn(self._transfer(event))
        elif kind is BackendError:
            assert isinstance(event, BackendError)
            self.engine.metrics.backend_errors += 1
            log.error("call.backend_error", session=self.session_id, message=event.message,
                      fatal=event.fatal)
            if event.fatal:
                self._spawn(self._announce(self.engine.assistant.apology,
                                           then_end="backend-failed"))
        elif kind is Status:
            assert isinstance(event, Status)
            self.transport.notify({"type": event.kind, **event.data})

    def on_vapi_message(self, message: dict[str, Any]) -> None:
        """A VAPI server message (webhook) about this call."""
        kind = message.get("type")
        if kind == "transfer-request":
            destination = message.get("destination") or {}
            number = destination.get("number") if isinstance(destination, dict) else None
            if isinstance(number, str) and number:
                self.on_backend_event(TransferRequest(number, self.engine.assistant.handoff))
            return
        self.transport.notify({"type": "vapi", "event": kind,
                               **{k: message[k] for k in ("status", "role", "transcript")
                                  if k in message}})

    # -- turn actions --------------------------------------------------------------------------

    def _act(self, actions: list[TurnAction], now: float) -> None:
        for action in actions:
            kind = type(action)
            if kind is PauseOutput:
                assert isinstance(action, PauseOutput)
                log.info("barge_in.detected", session=self.session_id, t=round(action.onset, 3),
                         generation=action.generation)
                self.transport.pause(now)
                self.engine.metrics.barge_in_latency.observe(
                    max(0.0, now_ms() - action.onset) / 1000.0)
                self.transport.notify({"type": "barge-in", "step": "paused"})
            elif kind is ResumeOutput:
                self.transport.resume(now)
                self.transport.notify({"type": "barge-in", "step": "resumed"})
            elif kind is CancelOutput:
                assert isinstance(action, CancelOutput)
                dropped = self.output.cancel(action.generation)
                self.transport.cancel(now)
                if not action.by_backend:
                    self.backend.interrupt(action.generation)
                log.info("barge_in.cancelled", session=self.session_id, t=round(now, 1),
                         generation=action.generation, dropped_ms=dropped // 16,
                         by_backend=action.by_backend)
                self.transport.notify({"type": "barge-in", "step": "cancelled",
                                       "generation": action.generation})
            elif kind is EndOfTurn:
                assert isinstance(action, EndOfTurn)
                self._turn_speech_end = action.speech_end
                log.info("turn.end", session=self.session_id, reason=action.reason,
                         silence_ms=round(action.at - action.speech_end, 1))
                self.backend.user_turn_ended(action.at)
            elif kind is UserSpeechStarted:
                assert isinstance(action, UserSpeechStarted)
                self._turn_speech_end = None
                self.backend.user_turn_started(action.onset)
            self.transport.notify({"type": "turn", "state": self.turns.state.value})

    # -- things the engine says itself ---------------------------------------------------------

    def end_after_heard(self, reason: str) -> None:
        """Hang up once the caller has heard what is queued (bounded by a grace period)."""
        self._ending = reason
        if self.output.unheard == 0 and self.output.ring.queued == 0:
            self.transport.hangup(reason)
        else:
            self._spawn(self._hangup_later(reason))

    async def _hangup_later(self, reason: str) -> None:
        await asyncio.sleep(HANGUP_GRACE_S)
        self.transport.hangup(reason)

    async def _announce(
        self, text: str, then_end: str | None = None, wait_heard: bool = False
    ) -> None:
        """Speak `text` with the local synthesizer, cutting whatever the backend was saying;
        with `wait_heard`, return once the caller has heard it (bounded)."""
        from engine.speech.tts import stream

        generation = max(self.output.generation, self.output.ring.cancelled_generation,
                         self._announcement) + 1
        self._announcement = generation
        heard = self._heard[generation] = asyncio.Event()
        if self.output.generation >= 0:
            self.output.cancel(self.output.generation)
            self.transport.cancel(now_ms())
        voice = self.engine.assistant
        async for chunk in stream(text, voice=voice.voice, rate_wpm=voice.rate_wpm):
            if self.output.write(chunk, generation):
                self.transport.kick()
        self.output.end(generation)
        self.transport.kick()
        if wait_heard:
            queued_s = self.output.unheard / 16000.0
            try:
                await asyncio.wait_for(heard.wait(), timeout=queued_s + 2.0)
            except asyncio.TimeoutError:
                log.warning("call.announcement_not_confirmed", session=self.session_id)
        if then_end is not None:
            self.end_after_heard(then_end)

    async def _transfer(self, request: TransferRequest) -> None:
        self.engine.metrics.transfers += 1
        log.info("transfer.requested", session=self.session_id, destination=request.destination)
        self.transport.notify({"type": "transfer", "state": "connecting",
                               "destination": request.destination})
        # The redirect stops the stream at once: the caller must have heard the hand-off first.
        await self._announce(request.message, wait_heard=True)
        ok = await self.transport.transfer(request.destination)
        log.info("transfer.result", session=self.session_id, ok=ok)
        self.transport.notify({"type": "transfer", "state": "connected" if ok else "failed"})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
