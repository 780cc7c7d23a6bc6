"""G.711: bit-exact with audioop on every sample and code, both laws, both directions."""

from __future__ import annotations

import base64
import binascii
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.audio import g711

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop
    except ImportError:  # Python 3.13+ without the audioop-lts backport
        audioop = None  # type: ignore[assignment]

# The reference comparisons need audioop; the buffer and error tests below run without it.
needs_audioop = pytest.mark.skipif(audioop is None, reason="audioop (the reference) is missing")

ALL_PCM = np.arange(-32768, 32768, dtype="<i2").tobytes()
ALL_CODES = bytes(range(256))

ENCODERS = [
    pytest.param(
        g711.ulaw_encode, lambda b: audioop.lin2ulaw(b, 2), id="mu-law", marks=needs_audioop
    ),
    pytest.param(
        g711.alaw_encode, lambda b: audioop.lin2alaw(b, 2), id="A-law", marks=needs_audioop
    ),
]
DECODERS = [
    pytest.param(
        g711.ulaw_decode, lambda b: audioop.ulaw2lin(b, 2), id="mu-law", marks=needs_audioop
    ),
    pytest.param(
        g711.alaw_decode, lambda b: audioop.alaw2lin(b, 2), id="A-law", marks=needs_audioop
    ),
]
ENCODE_INTO = [
    pytest.param(g711.ulaw_encode_into, g711.ulaw_encode, id="mu-law"),
    pytest.param(g711.alaw_encode_into, g711.alaw_encode, id="A-law"),
]
DECODE_INTO = [
    pytest.param(g711.ulaw_decode_into, g711.ulaw_decode, id="mu-law"),
    pytest.param(g711.alaw_decode_into, g711.alaw_decode, id="A-law"),
]

Codec = Callable[[Any], bytes]
Into = Callable[[Any, Any], int]


def speech_like(samples: int, seed: int = 7) -> bytes:
    """Noise shaped like speech levels: mostly quiet, some loud, a few clipped peaks."""
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0.01, 1.0, samples // 160 + 1), 160)[:samples]
    x = rng.standard_normal(samples) * 12000 * envelope
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


@pytest.mark.parametrize("native, reference", ENCODERS)
def test_encode_matches_audioop_on_every_sample(native: Codec, reference: Codec) -> None:
    assert native(ALL_PCM) == reference(ALL_PCM)


@pytest.mark.parametrize("native, reference", DECODERS)
def test_decode_matches_audioop_on_every_code(native: Codec, reference: Codec) -> None:
    assert native(ALL_CODES) == reference(ALL_CODES)


@pytest.mark.parametrize("native, reference", ENCODERS)
def test_encode_matches_audioop_on_frames_of_every_small_length(
    native: Codec, reference: Codec
) -> None:
    # Lengths that are not multiples of the four-sample inner loop exercise the scalar tail.
    pcm = speech_like(400)
    for samples in range(13):
        frame = pcm[2 * samples : 2 * samples + 2 * samples]
        assert native(frame) == reference(frame)


@pytest.mark.parametrize("native, reference", DECODERS)
def test_decode_matches_audioop_on_odd_code_counts(native: Codec, reference: Codec) -> None:
    for count in (0, 1, 3, 5, 7, 161):
        codes = ALL_CODES[count : 2 * count]
        assert native(codes) == reference(codes)


@pytest.mark.parametrize("native, reference", ENCODERS)
def test_encode_of_a_large_buffer_releasing_the_gil_matches_audioop(
    native: Codec, reference: Codec
) -> None:
    pcm = speech_like(8000 * 10)
    expected = reference(pcm)
    assert native(pcm) == expected
    assert native(bytearray(pcm)) == expected


@pytest.mark.parametrize("into, whole", ENCODE_INTO)
def test_encode_into_of_a_large_buffer_matches_the_allocating_form(
    into: Into, whole: Codec
) -> None:
    pcm = speech_like(8000 * 10)
    out = bytearray(8000 * 10)
    assert into(bytearray(pcm), out) == 80000
    assert out == whole(pcm)


@pytest.mark.parametrize("into, whole", DECODE_INTO)
def test_decode_into_of_a_large_buffer_matches_the_allocating_form(
    into: Into, whole: Codec
) -> None:
    codes = bytes(range(256)) * 300
    out = bytearray(2 * len(codes))
    assert into(bytearray(codes), memoryview(out)) == 2 * len(codes)
    assert out == whole(codes)


@pytest.mark.parametrize("native, reference", ENCODERS)
def test_encode_accepts_any_bytes_like(native: Codec, reference: Codec) -> None:
    pcm = speech_like(160)
    expected = reference(pcm)
    assert native(bytearray(pcm)) == expected
    assert native(memoryview(pcm)) == expected
    assert native(np.frombuffer(pcm, "<i2")) == expected
    # An unaligned slice of a larger buffer: the loop must not assume alignment.
    shifted = bytearray(1) + bytearray(pcm)
    assert native(memoryview(shifted)[1:]) == expected


@pytest.mark.parametrize("native, reference", DECODERS)
def test_decode_accepts_any_bytes_like(native: Codec, reference: Codec) -> None:
    expected = reference(ALL_CODES)
    assert native(bytearray(ALL_CODES)) == expected
    assert native(memoryview(ALL_CODES)) == expected


@pytest.mark.parametrize("native", [p.values[0] for p in ENCODERS])
def test_encode_rejects_odd_length_pcm(native: Codec) -> None:
    with pytest.raises(ValueError, match="even"):
        native(b"\x00\x01\x02")


@pytest.mark.parametrize("into, whole", ENCODE_INTO)
def test_encode_into_fills_the_buffer_and_returns_bytes_written(into: Into, whole: Codec) -> None:
    pcm = speech_like(160)
    out = bytearray(b"\xaa" * 170)
    assert into(pcm, out) == 160
    assert bytes(out[:160]) == whole(pcm)
    assert out[160:] == b"\xaa" * 10  # nothing written past the frame


@pytest.mark.parametrize("into, whole", DECODE_INTO)
def test_decode_into_fills_the_buffer_and_returns_bytes_written(into: Into, whole: Codec) -> None:
    codes = ALL_CODES[:160]
    out = np.full(170, 0x5A5A, dtype="<i2")
    assert into(codes, out) == 320
    assert out[:160].tobytes() == whole(codes)
    assert (out[160:] == 0x5A5A).all()


@pytest.mark.parametrize("into, whole", ENCODE_INTO)
def test_encode_into_writes_through_a_memoryview_slice(into: Into, whole: Codec) -> None:
    pcm = speech_like(160)
    out = bytearray(200)
    assert into(pcm, memoryview(out)[20:180]) == 160
    assert bytes(out[20:180]) == whole(pcm)


@pytest.mark.parametrize("into", [p.values[0] for p in ENCODE_INTO])
def test_encode_into_rejects_a_short_buffer(into: Into) -> None:
    out = bytearray(159)
    with pytest.raises(ValueError, match="160 needed"):
        into(speech_like(160), out)
    assert out == bytearray(159)


@pytest.mark.parametrize("into", [p.values[0] for p in DECODE_INTO])
def test_decode_into_rejects_a_short_buffer(into: Into) -> None:
    with pytest.raises(ValueError, match="320 needed"):
        into(ALL_CODES[:160], bytearray(319))


@pytest.mark.parametrize("into", [p.values[0] for p in ENCODE_INTO])
def test_encode_into_rejects_odd_length_pcm(into: Into) -> None:
    with pytest.raises(ValueError, match="even"):
        into(b"\x00\x01\x02", bytearray(8))


@pytest.mark.parametrize(
    "into", [p.values[0] for p in ENCODE_INTO] + [p.values[0] for p in DECODE_INTO]
)
def test_into_refuses_a_read_only_buffer(into: Into) -> None:
    with pytest.raises(BufferError):
        into(b"\x00\x00", bytes(8))


def test_round_trip_keeps_speech_within_the_codec_step() -> None:
    pcm = np.frombuffer(speech_like(8000), "<i2").astype(np.int32)
    for encode, decode in (
        (g711.ulaw_encode, g711.ulaw_decode),
        (g711.alaw_encode, g711.alaw_decode),
    ):
        back = np.frombuffer(decode(encode(pcm.astype("<i2").tobytes())), "<i2").astype(np.int32)
        # G.711 steps are at most 1/16 of the magnitude (plus a small floor near zero).
        assert (np.abs(back - pcm) <= np.abs(pcm) // 16 + 64).all()


# -- base64 of mu-law straight to PCM (a Media Streams payload) -----------------------------------

B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


@given(st.binary(max_size=400))
def test_b64_decode_equals_base64_then_ulaw_decode(codes: bytes) -> None:
    text = base64.b64encode(codes).decode()
    assert g711.ulaw_decode_b64(text) == g711.ulaw_decode(codes)


@given(st.text(alphabet=B64_ALPHABET + " \n-_é", max_size=24))
def test_b64_decode_accepts_nothing_that_strict_binascii_refuses(text: str) -> None:
    try:
        strict = g711.ulaw_decode(binascii.a2b_base64(text, strict_mode=True))
    except (binascii.Error, ValueError):
        strict = None
    try:
        ours = g711.ulaw_decode_b64(text)
    except ValueError:
        return  # refused (it may refuse a little more: a length that is not a multiple of 4)
    assert ours == strict


@pytest.mark.parametrize(
    "text", ["@@not base64!!", "AAA", "AA=A", "=AAA", "AAAA=", "A===", "AA\nAA", "AAé=", "AA-_"]
)
def test_b64_decode_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ValueError):
        g711.ulaw_decode_b64(text)


def test_b64_decode_takes_only_text() -> None:
    with pytest.raises(TypeError):
        g711.ulaw_decode_b64(b"AAAA")  # type: ignore[arg-type]
