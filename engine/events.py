"""The engine's vocabulary: what a backend tells a call, and what the turn machine asks of it.

Every event is a small frozen dataclass. Times are monotonic milliseconds, passed in by the caller
(the turn machine never reads a clock).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------------
# Backend → call
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transcript:
    """Speech recognised by the backend."""

    text: str  #: the words heard so far (partial) or for the whole turn (final)
    final: bool  #: True once the recogniser has committed to this text
    role: str = "user"  #: "user" or "assistant"


@dataclass(frozen=True, slots=True)
class AssistantText:
    """The text of a reply the assistant is about to speak."""

    text: str  #: the reply, as written
    generation: int  #: the utterance it belongs to


@dataclass(slots=True)  # not frozen: one per 20 ms of speech, and a frozen __init__ costs 3x
class AudioChunk:
    """Assistant speech: 16 kHz mono int16 PCM, any length, as fast as the backend makes it."""

    pcm: bytes  #: the samples
    generation: int  #: the utterance it belongs to; chunks of a cancelled generation are dropped


@dataclass(frozen=True, slots=True)
class UtteranceEnd:
    """The backend has produced all audio of one utterance."""

    generation: int  #: the utterance that is complete


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The backend itself decided the assistant was interrupted; its queued audio is stale."""

    generation: int | None = None  #: the utterance cut, when the backend knows it


@dataclass(frozen=True, slots=True)
class BackendError:
    """The backend failed; `fatal` ends the call after an apology."""

    message: str  #: what went wrong, for logs
    fatal: bool = False  #: whether the call can go on


@dataclass(frozen=True, slots=True)
class HangUp:
    """The assistant ended the call."""

    reason: str = "assistant-hangup"  #: why, for logs and the end-of-call record


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """The assistant asks to hand the caller to a person."""

    destination: str  #: a phone number (E.164) or an operator queue name
    message: str = "Please hold while I connect you to a person."  #: the hand-off line


@dataclass(frozen=True, slots=True)
class Status:
    """Anything else worth showing on a browser page (speech updates, tool calls, ...)."""

    kind: str  #: e.g. "speech-update"
    data: dict[str, Any] = field(default_factory=dict)  #: the details


BackendEvent = (
    Transcript | AssistantText | AudioChunk | UtteranceEnd | Interrupted | BackendError | HangUp
    | TransferRequest | Status
)

# ---------------------------------------------------------------------------------------------
# Turn machine → call (actions)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserSpeechStarted:
    """The caller started a turn (speech lasted the start debounce)."""

    onset: float  #: when the first speech frame arrived


@dataclass(frozen=True, slots=True)
class EndOfTurn:
    """The caller's turn is over: the backend should answer."""

    at: float  #: when the turn was judged over
    speech_end: float  #: when the last speech frame arrived
    reason: str  #: "silence" or "transcript"


@dataclass(frozen=True, slots=True)
class PauseOutput:
    """Speech over the assistant: stop playback now, keep what the caller has not heard."""

    generation: int  #: the utterance paused
    onset: float  #: the first speech frame that caused it


@dataclass(frozen=True, slots=True)
class ResumeOutput:
    """The speech that paused output did not last: play on from where the caller stopped hearing."""

    generation: int  #: the utterance resumed


@dataclass(frozen=True, slots=True)
class CancelOutput:
    """Barge-in confirmed: drop the utterance and tell the backend to stop."""

    generation: int  #: the utterance cancelled (and every older one)
    onset: float  #: the first speech frame of the interruption
    by_backend: bool = False  #: the backend interrupted itself; no need to tell it


TurnAction = UserSpeechStarted | EndOfTurn | PauseOutput | ResumeOutput | CancelOutput
