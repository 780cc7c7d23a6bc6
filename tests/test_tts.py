"""eSpeak NG synthesis: whole utterances, streamed chunks, cancellation, concurrent streams."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from engine.speech import tts
from tests.speech import active_power

SENTENCE = "We are open Monday to Friday from nine in the morning to six in the evening."
TWO_SENTENCES = (
    "A standard visit costs forty dollars. A full service costs one hundred and twenty dollars."
)


def duration_s(pcm: bytes) -> float:
    return len(pcm) / (2 * tts.OUTPUT_RATE)


def test_synthesize_gives_audible_16k_speech_of_plausible_length() -> None:
    pcm = tts.synthesize(SENTENCE)
    # 14 words at 175 words a minute is about 4.8 s; eSpeak adds little padding
    assert 3.0 < duration_s(pcm) < 7.0
    level_dbfs = 10 * np.log10(active_power(pcm) / 32768**2)
    assert level_dbfs > -35.0
    assert len(pcm) % 2 == 0


def test_faster_rate_gives_shorter_audio() -> None:
    slow = tts.synthesize(SENTENCE, rate_wpm=130)
    fast = tts.synthesize(SENTENCE, rate_wpm=260)
    assert duration_s(fast) < 0.75 * duration_s(slow)


def test_pitch_changes_the_audio() -> None:
    low = np.frombuffer(tts.synthesize("hello", pitch=10), dtype=np.int16)
    high = np.frombuffer(tts.synthesize("hello", pitch=90), dtype=np.int16)
    n = min(len(low), len(high))
    assert not np.array_equal(low[:n], high[:n])


def test_unknown_voice_is_an_error() -> None:
    with pytest.raises(ValueError, match="voice"):
        tts.synthesize("hello", voice="no-such-voice")


def test_empty_text_gives_no_audio() -> None:
    assert tts.synthesize("   ") == b""


async def test_stream_yields_several_chunks_that_join_to_the_utterance() -> None:
    chunks = [chunk async for chunk in tts.stream(TWO_SENTENCES)]
    whole = tts.synthesize(TWO_SENTENCES)
    joined = b"".join(chunks)
    assert len(chunks) >= 5
    assert all(len(c) % 2 == 0 and c for c in chunks)
    # eSpeak's output length varies by a few ms from run to run; the content is the same speech
    assert abs(duration_s(joined) - duration_s(whole)) < 0.05
    assert abs(active_power(joined) / active_power(whole) - 1.0) < 0.1


async def test_cancelling_the_reader_stops_synthesis() -> None:
    long_text = " ".join(f"This is sentence number {i} of a long reply." for i in range(40))
    got: list[bytes] = []

    async def read() -> None:
        async for chunk in tts.stream(long_text):
            got.append(chunk)
            if len(got) == 2:
                await asyncio.Event().wait()  # stalls here until cancelled

    task = asyncio.create_task(read())
    while len(got) < 2:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the worker drops the rest: a short utterance queued now is served at once and in full
    after = tts.synthesize("goodbye")
    assert duration_s(after) > 0.3
    assert sum(len(c) for c in got) < len(tts.synthesize(long_text)) // 4


async def test_cancel_ends_the_iteration() -> None:
    speech = tts.stream(" ".join(["Thank you for calling."] * 20))
    seen = 0
    async for _ in speech:
        seen += 1
        if seen == 1:
            speech.cancel()
    assert seen == 1


def test_concurrent_utterances_are_served_sentence_by_sentence() -> None:
    arrivals: list[str] = []  # which utterance each item came from, in the worker's order
    done = threading.Semaphore(0)

    def sink_for(name: str) -> tts.Sink:
        def sink(item: tts.Item) -> bool:
            arrivals.append(name if isinstance(item, bytes) else f"{name}-end")
            if not isinstance(item, bytes):
                done.release()
            return True
        return sink

    synth = tts.Synthesizer.shared()
    synth.submit(" ".join(["This reply has many sentences."] * 60), "en-us", 175, None,
                 sink_for("long"))
    synth.submit("Hello there.", "en-us", 175, None, sink_for("short"))
    done.acquire()
    done.acquire()
    assert arrivals.index("short-end") < arrivals.index("long-end")
    # the short reply waited for at most a couple of the long one's sentences, not all sixty
    long_before_short = arrivals[: arrivals.index("short-end")].count("long")
    assert long_before_short < arrivals.count("long") // 10


def test_split_sentences_keeps_punctuation_and_drops_blanks() -> None:
    assert tts.split_sentences("Hi!  How are you? Fine.  ") == ["Hi!", "How are you?", "Fine."]
