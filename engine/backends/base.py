"""The interface every assistant backend implements.

A backend receives the caller's audio (16 kHz mono int16, 20 ms frames) and the turn boundaries the
call decides, and emits `engine.events` through the `emit` callback it was given. It never touches
a transport. `emit` must be called on the event loop's thread; a backend doing blocking work runs
it off the loop and hands results back with `loop.call_soon_threadsafe`.

Generations: each assistant utterance carries a generation number, increasing through the call.
`interrupt(g)` means every utterance up to `g` is stale; the call has already dropped its queued
audio, and audio the backend still emits for it is discarded, so stopping promptly saves work but
is not needed for correctness.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.events import BackendEvent

Emit = Callable[[BackendEvent], None]


@dataclass
class CallInfo:
    """What a backend may know about the call it serves."""

    session_id: str  #: the engine's session id
    transport: str  #: "twilio", "webrtc", ...
    caller: str | None = None  #: the caller's number or name, when known
    call_sid: str | None = None  #: the carrier's call id (Twilio CallSid), when there is one
    metadata: dict[str, Any] = field(default_factory=dict)  #: anything else worth passing on


class Backend(abc.ABC):
    #: whether the call should run VAD and the turn machine for this backend
    turn_taking: bool = True
    #: how much assistant audio the call may hold ahead of playback (a reply arrives faster than
    #: real time; the ring's pages are only touched as they fill)
    output_capacity_s: float = 30.0
    #: the backend sends caller audio straight back (echo): the call times that relay path
    relays_audio: bool = False

    def __init__(self, info: CallInfo, emit: Emit) -> None:
        self.info = info
        self.emit = emit

    async def start(self) -> None:
        """Connect; may emit the assistant's first message."""

    @abc.abstractmethod
    def send_audio(self, frame: bytes, now: float) -> None:
        """One 20 ms caller frame. Must not block; a backend that cannot keep up drops the oldest
        audio and counts it."""

    def user_turn_started(self, onset: float) -> None:
        """The caller started speaking (the frames since `onset` were already sent)."""

    def user_turn_ended(self, at: float) -> None:
        """The caller's turn is over: answer."""

    def interrupt(self, generation: int) -> None:
        """Utterances up to `generation` were cancelled by the caller."""

    def dtmf(self, digit: str) -> None:
        """The caller pressed a key."""

    async def close(self) -> None:
        """Hang up and release everything."""


BackendFactory = Callable[[CallInfo, Emit], Backend]
