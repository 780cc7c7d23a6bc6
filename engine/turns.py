"""Turn taking: who holds the floor, as a sans-IO state machine.

Inputs are per-frame VAD decisions, transcripts, and what the output side reports (a reply started,
a reply was heard to its end, the backend interrupted itself). Outputs are actions for the call
(`engine.events`). Time is always an argument, in monotonic milliseconds: the machine never reads
a clock, sleeps or does I/O, so tests drive it on a synthetic clock.

    state               input                          → state               actions
    ─────────────────── ────────────────────────────── ─ ─────────────────── ─────────────────────
    LISTENING           speech ≥ start_debounce         → USER_SPEAKING       UserSpeechStarted
    LISTENING           reply started                   → ASSISTANT_SPEAKING
    USER_SPEAKING       silence ≥ endpoint_silence      → THINKING            EndOfTurn(silence)
    USER_SPEAKING       complete final transcript and
                        silence ≥ early_silence         → THINKING            EndOfTurn(transcript)
    USER_SPEAKING       reply started                   → ASSISTANT_SPEAKING
    THINKING            reply started                   → ASSISTANT_SPEAKING
    THINKING            speech ≥ barge_in_debounce      → USER_SPEAKING       CancelOutput (of the
                                                                              reply in the making),
                                                                              UserSpeechStarted
    ASSISTANT_SPEAKING  one speech frame                → PAUSED              PauseOutput
    ASSISTANT_SPEAKING  reply heard to its end          → LISTENING
    PAUSED              speech since the pause adds up
                        to ≥ barge_in_debounce          → USER_SPEAKING       CancelOutput,
                                                                              UserSpeechStarted
    PAUSED              speech stopped (silence ≥
                        resume_silence)                 → ASSISTANT_SPEAKING  ResumeOutput
    any but LISTENING   backend interrupted             → USER_SPEAKING or    CancelOutput
                                                          LISTENING           (by_backend)

Barge-in is two steps so the caller is never talked over, yet a cough does not kill a reply: the
first speech frame pauses playback at once; only speech that lasts the debounce cancels the reply.
A second interruption while one is in hand is coalesced: a paused reply is not paused again, and a
generation is cancelled at most once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.events import (
    CancelOutput,
    EndOfTurn,
    PauseOutput,
    ResumeOutput,
    TurnAction,
    UserSpeechStarted,
)


class TurnState(enum.Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user-speaking"
    THINKING = "thinking"
    ASSISTANT_SPEAKING = "assistant-speaking"
    PAUSED = "paused"


@dataclass(frozen=True)
class TurnConfig:
    frame_ms: float = 20.0
    #: speech needed before a turn starts while nobody speaks
    start_debounce_ms: float = 60.0
    #: speech needed over the assistant before its reply is cancelled (not just paused)
    barge_in_debounce_ms: float = 150.0
    #: silence that ends the caller's turn
    endpoint_silence_ms: float = 500.0
    #: silence that ends the turn early when the final transcript looks complete
    early_silence_ms: float = 200.0
    #: non-speech frames inside a word or between words that do not break a run of speech
    gap_tolerance_ms: float = 60.0
    #: silence after which speech that paused the assistant is judged over, and playback resumes
    #: (longer than the pauses between words, so a reply never slips out between two of them)
    resume_silence_ms: float = 300.0


INCOMPLETE_ENDINGS = frozenset(
    "and but or so because um uh er the a an to of with my your for if that".split()
)


def looks_complete(text: str) -> bool:
    """A final transcript that ends a sentence, not one that trails off mid-thought."""
    text = text.strip()
    if not text:
        return False
    if text[-1] in ".?!":
        return True
    if text[-1] in ",;:-":
        return False
    return text.split()[-1].lower() not in INCOMPLETE_ENDINGS


class TurnMachine:
    def __init__(self, config: TurnConfig | None = None) -> None:
        self.config = config or TurnConfig()
        self.state = TurnState.LISTENING
        #: the assistant utterance being prepared, played or paused
        self.generation: int | None = None
        #: every generation up to this one has been cancelled
        self.cancelled_generation = -1
        self._onset: float | None = None  # first frame of the current run of speech
        self._last_speech: float | None = None  # last speech frame seen
        self._complete_final = False  # a final transcript that looks complete, this turn
        self._paused_at: float | None = None  # the speech onset that paused the assistant
        self._paused_speech_ms = 0.0  # speech heard since the pause, gaps between words excluded

    # -- speech runs ---------------------------------------------------------------------------

    def _track(self, speech: bool, now: float) -> None:
        gap = self.config.gap_tolerance_ms
        if speech:
            if self._onset is None or self._last_speech is None or now - self._last_speech > gap:
                self._onset = now
            self._last_speech = now
        elif (
            self._onset is not None
            and self._last_speech is not None
            and now - self._last_speech > gap
        ):
            self._onset = None

    def _run_ms(self) -> float:
        """How long the current run of speech has lasted (0 when there is none)."""
        if self._onset is None or self._last_speech is None:
            return 0.0
        return self._last_speech - self._onset + self.config.frame_ms

    def _silence_ms(self, now: float) -> float:
        return float("inf") if self._last_speech is None else now - self._last_speech

    # -- inputs --------------------------------------------------------------------------------

    def on_frame(self, speech: bool, now: float) -> list[TurnAction]:
        """One caller frame arrived at `now`, classified by the VAD."""
        self._track(speech, now)
        cfg = self.config
        state = self.state
        if state is TurnState.LISTENING:
            if self._run_ms() >= cfg.start_debounce_ms:
                return self._user_started()
        elif state is TurnState.USER_SPEAKING:
            silence = self._silence_ms(now)
            if silence >= cfg.endpoint_silence_ms:
                return self._end_turn(now, "silence")
            if self._complete_final and silence >= cfg.early_silence_ms:
                return self._end_turn(now, "transcript")
        elif state is TurnState.THINKING:
            if self._run_ms() >= cfg.barge_in_debounce_ms:
                actions: list[TurnAction] = []
                if self.generation is not None:
                    actions.append(self._cancel(self.generation, by_backend=False))
                return actions + self._user_started()
        elif state is TurnState.ASSISTANT_SPEAKING:
            if speech and self.generation is not None:
                assert self._onset is not None
                self.state = TurnState.PAUSED
                self._paused_at = self._onset
                self._paused_speech_ms = cfg.frame_ms
                return [PauseOutput(self.generation, self._onset)]
        elif state is TurnState.PAUSED:
            assert self.generation is not None
            if speech:
                self._paused_speech_ms += cfg.frame_ms
            if self._paused_speech_ms >= cfg.barge_in_debounce_ms:
                self._onset = self._paused_at
                return [self._cancel(self.generation, by_backend=False)] + self._user_started()
            if self._silence_ms(now) >= cfg.resume_silence_ms:
                self._onset = None
                self.state = TurnState.ASSISTANT_SPEAKING
                return [ResumeOutput(self.generation)]
        return []

    def on_transcript(self, text: str, final: bool, now: float) -> list[TurnAction]:
        """A transcript of the caller's speech."""
        if final and self.state is TurnState.USER_SPEAKING:
            self._complete_final = looks_complete(text)
            if self._complete_final and self._silence_ms(now) >= self.config.early_silence_ms:
                return self._end_turn(now, "transcript")
        return []

    def on_reply_started(self, generation: int, now: float) -> list[TurnAction]:
        """The first audio of an assistant utterance is on its way to the caller."""
        if generation <= self.cancelled_generation:
            return []
        self.generation = generation
        if self.state is not TurnState.PAUSED:
            self.state = TurnState.ASSISTANT_SPEAKING
        return []

    def on_reply_heard(self, generation: int, now: float) -> list[TurnAction]:
        """The caller has heard an utterance to its end."""
        if generation == self.generation and self.state is TurnState.ASSISTANT_SPEAKING:
            self.generation = None
            self.state = TurnState.LISTENING
        return []

    def on_backend_interrupted(self, generation: int | None, now: float) -> list[TurnAction]:
        """The backend decided by itself that the assistant was interrupted."""
        target = self.generation if generation is None else generation
        if (
            target is None
            or target <= self.cancelled_generation
            or self.state is TurnState.LISTENING
        ):
            return []
        action = self._cancel(target, by_backend=True)
        if self._run_ms() > 0:
            self.state = TurnState.USER_SPEAKING
            self._complete_final = False
        else:
            self.state = TurnState.LISTENING
        return [action]

    def expect_reply(self, generation: int) -> None:
        """The backend has started preparing utterance `generation` (it may be cancelled before
        its first audio)."""
        if generation > self.cancelled_generation:
            self.generation = generation

    # -- transitions ---------------------------------------------------------------------------

    def _user_started(self) -> list[TurnAction]:
        assert self._onset is not None
        self.state = TurnState.USER_SPEAKING
        self._complete_final = False
        return [UserSpeechStarted(self._onset)]

    def _end_turn(self, now: float, reason: str) -> list[TurnAction]:
        assert self._last_speech is not None
        self.state = TurnState.THINKING
        self.generation = None
        speech_end = self._last_speech
        self._onset = None
        self._complete_final = False
        return [EndOfTurn(now, speech_end, reason)]

    def _cancel(self, generation: int, by_backend: bool) -> CancelOutput:
        onset = self._onset if self._onset is not None else (self._last_speech or 0.0)
        self.cancelled_generation = max(self.cancelled_generation, generation)
        self.generation = None
        return CancelOutput(generation, onset, by_backend)
