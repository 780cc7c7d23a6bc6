"""pocketsphinx recognition of synthesized speech: phrase models, partials, the decoder pool."""
from __future__ import annotations

import asyncio
import warnings

import pytest

from engine.audio.resample import Resampler
from engine.speech.asr import PHRASE_DECODER_OPTIONS, DecoderPool, LanguageModel, Recognizer
from tests.speech import DEMO_PHRASES, frames, mix_at_snr, noise, silence, speech, to_8k_mulaw

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # a reference mu-law decoder; fine in test code

PHRASES = [
    *DEMO_PHRASES,
    "when are you open",
    "are you open on saturday",
    "what is the price",
    "I want to book an appointment for tomorrow",
    "can I speak to a person",
    "thank you goodbye",
    "hello",
]


@pytest.fixture(scope="module")
def model() -> LanguageModel:
    return LanguageModel.from_phrases(PHRASES)


@pytest.fixture(scope="module")
def pool() -> DecoderPool:
    return DecoderPool(max_decoders=2)


def caller_audio(text: str) -> bytes:
    # a real line is never digitally silent: a faint noise floor under the speech
    pcm = silence(300) + speech(text) + silence(300)
    return mix_at_snr(pcm, noise(1.0, -60, seed=11), 35)


def phone_audio(text: str) -> bytes:
    """`caller_audio` as it reaches the recognizer from a phone: 8 kHz mu-law, back to 16 kHz."""
    return Resampler(8000, 16000).process(audioop.ulaw2lin(to_8k_mulaw(caller_audio(text)), 2))


async def recognize(text: str, model: LanguageModel, pool: DecoderPool,
                    audio: bytes | None = None) -> tuple[str, list[str]]:
    rec = Recognizer(model, pool=pool)
    await rec.begin()
    partials: list[str] = []
    for i, frame in enumerate(frames(caller_audio(text) if audio is None else audio)):
        partial = rec.feed(frame)
        if partial is not None:
            partials.append(partial)
        if i % 10 == 9:  # tests feed faster than real time: let decoding catch up now and then
            await rec.flush()
    return await rec.end(), partials


@pytest.mark.parametrize("text", DEMO_PHRASES)
async def test_phrase_model_recognizes_the_demo_phrases(text: str, model: LanguageModel,
                                                        pool: DecoderPool) -> None:
    final, _ = await recognize(text, model, pool)
    expected = text.lower().split()
    got = final.split()
    hits = sum(1 for w in expected if w in got)
    assert hits >= len(expected) - 1, final


@pytest.mark.parametrize("text", DEMO_PHRASES)
async def test_phrase_model_recognizes_the_demo_phrases_over_a_phone_line(
        text: str, model: LanguageModel, pool: DecoderPool) -> None:
    final, _ = await recognize(text, model, pool, phone_audio(text))
    expected = text.lower().split()
    got = final.split()
    hits = sum(1 for w in expected if w in got)
    assert hits >= len(expected) - 1, final


def test_phrase_decoders_use_the_fast_decoding_options(model: LanguageModel) -> None:
    decoder = model.make_decoder()
    for name, value in PHRASE_DECODER_OPTIONS.items():
        assert decoder.config[name] == value, name


async def test_partials_arrive_before_the_final_and_grow(model: LanguageModel,
                                                         pool: DecoderPool) -> None:
    final, partials = await recognize("I would like to book an appointment", model, pool)
    assert len(partials) >= 3
    assert "appointment" in final
    assert any("book" in p for p in partials)
    assert len(set(partials)) == len(partials)  # only changes are reported


async def test_recognizers_reuse_pooled_decoders(model: LanguageModel) -> None:
    pool = DecoderPool(max_decoders=2)
    for _ in range(3):
        await recognize("goodbye", model, pool)
    assert pool.created == 1
    assert pool.idle(model) == 1


async def test_pool_bound_makes_a_third_call_wait(model: LanguageModel) -> None:
    pool = DecoderPool(max_decoders=2)
    first, second, third = (Recognizer(model, pool=pool) for _ in range(3))
    await first.begin()
    await second.begin()
    waiting = asyncio.create_task(third.begin())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    first.cancel()
    await asyncio.wait_for(waiting, 5.0)
    assert pool.size == 2
    assert pool.created == 2  # the third call got the first one's decoder, not a new one
    assert third.active
    third.cancel()
    second.cancel()


async def test_cancelled_recognizer_returns_its_decoder(model: LanguageModel) -> None:
    pool = DecoderPool(max_decoders=1)
    rec = Recognizer(model, pool=pool)
    await rec.begin()
    for frame in frames(caller_audio("how much does it cost"))[:30]:
        rec.feed(frame)
    rec.cancel()
    # the decoder comes back after its batch: the next call gets it, out of the old utterance
    final, _ = await asyncio.wait_for(recognize("goodbye", model, pool), 10.0)
    assert "goodbye" in final or "bye" in final
    assert pool.created == 1


def test_phrase_model_reports_words_it_cannot_pronounce() -> None:
    model = LanguageModel.from_phrases(["book a zzyzxqq appointment"])
    assert model.unknown_words == ("zzyzxqq",)
    assert model.dictionary is not None and "appointment" in model.dictionary


def test_phrase_model_needs_some_known_word() -> None:
    with pytest.raises(ValueError):
        LanguageModel.from_phrases(["zzyzxqq"])


async def test_feed_outside_an_utterance_is_an_error(model: LanguageModel,
                                                     pool: DecoderPool) -> None:
    rec = Recognizer(model, pool=pool)
    with pytest.raises(RuntimeError):
        rec.feed(bytes(640))
