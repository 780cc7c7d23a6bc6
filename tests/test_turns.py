"""The turn machine's transitions, on a synthetic clock (no sleeps, no sockets)."""
from __future__ import annotations

import pytest

from engine.events import CancelOutput, EndOfTurn, PauseOutput, ResumeOutput, UserSpeechStarted
from engine.turns import TurnConfig, TurnMachine, TurnState, looks_complete

FRAME = 20.0


class Clock:
    """Feeds frames to a machine 20 ms apart and collects every action."""

    def __init__(self, machine: TurnMachine, start: float = 1000.0) -> None:
        self.m = machine
        self.now = start
        self.actions: list[object] = []

    def frames(self, speech: bool, ms: float) -> list[object]:
        out: list[object] = []
        for _ in range(int(ms // FRAME)):
            self.now += FRAME
            out += self.m.on_frame(speech, self.now)
        self.actions += out
        return out

    def speech(self, ms: float) -> list[object]:
        return self.frames(True, ms)

    def silence(self, ms: float) -> list[object]:
        return self.frames(False, ms)


def speaking_machine(generation: int = 7) -> tuple[TurnMachine, Clock]:
    """A machine whose assistant is mid-reply, generation `generation`."""
    m = TurnMachine()
    c = Clock(m)
    c.speech(300)
    c.silence(600)
    assert m.state is TurnState.THINKING
    m.expect_reply(generation)
    m.on_reply_started(generation, c.now)
    assert m.state is TurnState.ASSISTANT_SPEAKING
    c.actions.clear()
    return m, c


def kinds(actions: list[object]) -> list[type]:
    return [type(a) for a in actions]


def test_speech_then_silence_ends_turn_after_endpoint_silence() -> None:
    m = TurnMachine()
    c = Clock(m)
    started = c.speech(400)
    assert kinds(started) == [UserSpeechStarted]
    assert m.state is TurnState.USER_SPEAKING
    speech_end = c.now
    assert c.silence(480) == []
    ended = c.silence(40)
    assert kinds(ended) == [EndOfTurn]
    turn = ended[0]
    assert isinstance(turn, EndOfTurn)
    assert turn.reason == "silence" and turn.speech_end == speech_end
    assert turn.at - turn.speech_end == pytest.approx(500, abs=FRAME)
    assert m.state is TurnState.THINKING


def test_short_blip_does_not_start_a_turn() -> None:
    m = TurnMachine()
    c = Clock(m)
    assert c.speech(40) == []
    assert c.silence(1000) == []
    assert m.state is TurnState.LISTENING


def test_pauses_inside_a_word_do_not_break_the_turn() -> None:
    m = TurnMachine()
    c = Clock(m)
    c.speech(200)
    c.silence(40)
    c.speech(200)
    c.silence(300)
    assert m.state is TurnState.USER_SPEAKING
    assert kinds(c.actions) == [UserSpeechStarted]


def test_complete_final_transcript_ends_the_turn_early() -> None:
    m = TurnMachine()
    c = Clock(m)
    c.speech(400)
    c.silence(100)
    assert m.on_transcript("what are your opening hours", final=True, now=c.now) == []
    ended = c.silence(100)
    assert kinds(ended) == [EndOfTurn]
    assert ended[0].reason == "transcript"  # type: ignore[attr-defined]


def test_final_transcript_after_enough_silence_ends_the_turn_at_once() -> None:
    m = TurnMachine()
    c = Clock(m)
    c.speech(400)
    c.silence(240)
    ended = m.on_transcript("I would like to book an appointment.", final=True, now=c.now)
    assert kinds(ended) == [EndOfTurn]


def test_trailing_final_transcript_waits_for_full_silence() -> None:
    m = TurnMachine()
    c = Clock(m)
    c.speech(400)
    m.on_transcript("I would like to book and", final=True, now=c.now)
    assert c.silence(400) == []
    assert kinds(c.silence(120)) == [EndOfTurn]


@pytest.mark.parametrize(
    "text, complete",
    [("what are your hours", True), ("book it.", True), ("and then um", False),
     ("I want to", False), ("", False), ("hello,", False), ("is it open?", True)],
)
def test_looks_complete(text: str, complete: bool) -> None:
    assert looks_complete(text) is complete


def test_first_speech_frame_pauses_the_reply() -> None:
    m, c = speaking_machine()
    paused = c.speech(20)
    assert paused == [PauseOutput(7, c.now)]
    assert m.state is TurnState.PAUSED


def test_speech_lasting_the_debounce_cancels_the_reply_once() -> None:
    m, c = speaking_machine()
    onset = c.now + FRAME
    c.speech(600)
    assert kinds(c.actions) == [PauseOutput, CancelOutput, UserSpeechStarted]
    cancel = c.actions[1]
    assert cancel == CancelOutput(7, onset, by_backend=False)
    # the cancel came once the run of speech reached the debounce, not before
    assert m.cancelled_generation == 7
    assert m.state is TurnState.USER_SPEAKING


def test_cancel_happens_exactly_at_the_debounce() -> None:
    m, c = speaking_machine()
    c.speech(140)  # seven frames: 140 ms of speech, short of the 150 ms debounce
    assert kinds(c.actions) == [PauseOutput]
    c.speech(20)  # the eighth frame makes 160 ms
    assert kinds(c.actions) == [PauseOutput, CancelOutput, UserSpeechStarted]


def test_short_noise_burst_pauses_then_resumes_the_reply() -> None:
    m, c = speaking_machine()
    c.speech(60)
    c.silence(280)
    assert kinds(c.actions) == [PauseOutput]  # still paused: a pause between words is not the end
    c.silence(20)
    assert c.actions == [PauseOutput(7, c.actions[0].onset), ResumeOutput(7)]  # type: ignore[attr-defined]
    assert m.state is TurnState.ASSISTANT_SPEAKING
    assert m.cancelled_generation == -1


def test_two_short_bursts_within_200ms_are_one_pause_and_cancel_nothing() -> None:
    m, c = speaking_machine()
    c.speech(60)
    c.silence(100)
    c.speech(60)
    c.silence(400)
    assert kinds(c.actions) == [PauseOutput, ResumeOutput]
    assert m.cancelled_generation == -1


def test_speech_broken_by_pauses_between_words_still_cancels() -> None:
    m, c = speaking_machine()
    onset = c.now + FRAME
    for _ in range(3):  # three 60 ms syllables with 100 ms gaps: never 150 ms in one run
        c.speech(60)
        c.silence(100)
    assert kinds(c.actions) == [PauseOutput, CancelOutput, UserSpeechStarted]
    assert c.actions[1] == CancelOutput(7, onset, by_backend=False)


def test_double_interrupt_within_200ms_is_coalesced_into_one_cancel() -> None:
    m, c = speaking_machine()
    c.speech(200)
    # the backend notices the same interruption 40 ms later: nothing more to do
    assert m.on_backend_interrupted(7, c.now + 40) == []
    c.silence(40)
    c.speech(200)
    cancels = [a for a in c.actions if isinstance(a, CancelOutput)]
    assert len(cancels) == 1


def test_backend_interrupt_cancels_a_speaking_reply() -> None:
    m, c = speaking_machine()
    actions = m.on_backend_interrupted(None, c.now)
    assert kinds(actions) == [CancelOutput]
    assert actions[0].generation == 7 and actions[0].by_backend  # type: ignore[attr-defined]
    assert m.state is TurnState.LISTENING
    assert m.on_backend_interrupted(None, c.now + 20) == []


def test_reply_heard_to_its_end_returns_to_listening() -> None:
    m, c = speaking_machine()
    m.on_reply_heard(7, c.now)
    assert m.state is TurnState.LISTENING
    assert m.generation is None


def test_reply_heard_of_another_generation_changes_nothing() -> None:
    m, c = speaking_machine()
    m.on_reply_heard(6, c.now)
    assert m.state is TurnState.ASSISTANT_SPEAKING


def test_audio_of_a_cancelled_generation_does_not_restart_speaking() -> None:
    m, c = speaking_machine()
    c.speech(300)
    assert m.cancelled_generation == 7
    m.on_reply_started(7, c.now)
    assert m.state is TurnState.USER_SPEAKING
    m.on_reply_started(6, c.now)
    assert m.state is TurnState.USER_SPEAKING


def test_speech_while_thinking_cancels_the_pending_reply() -> None:
    m = TurnMachine()
    c = Clock(m)
    c.speech(300)
    c.silence(520)
    assert m.state is TurnState.THINKING
    m.expect_reply(3)
    c.actions.clear()
    c.speech(200)
    assert kinds(c.actions) == [CancelOutput, UserSpeechStarted]
    assert m.cancelled_generation == 3
    assert m.state is TurnState.USER_SPEAKING


def test_short_sound_while_thinking_keeps_the_pending_reply() -> None:
    m = TurnMachine()
    c = Clock(m)
    c.speech(300)
    c.silence(520)
    m.expect_reply(3)
    c.actions.clear()
    c.speech(60)
    c.silence(200)
    assert c.actions == []
    assert m.state is TurnState.THINKING


def test_greeting_plays_from_listening() -> None:
    m = TurnMachine()
    m.on_reply_started(1, 0.0)
    assert m.state is TurnState.ASSISTANT_SPEAKING
    assert m.generation == 1


def test_debounce_is_configurable() -> None:
    m = TurnMachine(TurnConfig(barge_in_debounce_ms=60))
    m.on_reply_started(1, 0.0)
    c = Clock(m, start=0.0)
    c.speech(60)
    assert kinds(c.actions) == [PauseOutput, CancelOutput, UserSpeechStarted]
