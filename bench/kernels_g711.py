"""Kernel cases for G.711, the output ring and the resamplers, for `python -m bench.kernels`.

Each group times one unit of work (a 20 ms frame or a 60 s buffer) through the native code and
through the alternatives a reader would otherwise reach for: CPython's audioop (the baseline,
deprecated and gone in 3.13, so skipped where missing) and a numpy lookup table.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import numpy as np

from bench.kernel_case import Case
from engine.audio import g711
from engine.audio.resample import Resampler
from engine.audio.ring import OutputRing

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop as _audioop

        audioop: ModuleType | None = _audioop
    except ImportError:  # Python 3.13+
        audioop = None

FRAME_SAMPLES_8K = 160  # 20 ms at 8 kHz: one Twilio / RTP PCMU payload
BUFFER_SAMPLES_8K = 8000 * 60

# Targets: speed-up over audioop that the native kernel must reach (see the g711 brief).
TARGET_ENCODE_FRAME = 1.0
TARGET_DECODE = 1 / 1.2  # within 20 % of audioop
TARGET_ENCODE_BUFFER = 5.0


def speech_like_pcm(samples: int, rate: int = 8000, seed: int = 11) -> bytes:
    """Voiced-speech-like int16: a few harmonics under a syllable-rate envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.2 + 0.8 * np.abs(np.sin(2 * np.pi * 3 * t))
    x = 6000 * voiced * envelope + 300 * rng.standard_normal(samples)
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


# --- numpy lookup tables: the "just use numpy" alternative ---------------------------------------

_ALL_PCM = np.arange(-32768, 32768, dtype="<i2").tobytes()
# Indexed by the sample read as uint16 (so negative samples land in the upper half).
_NP_ULAW_ENC = np.roll(np.frombuffer(g711.ulaw_encode(_ALL_PCM), np.uint8), -32768)
_NP_ALAW_ENC = np.roll(np.frombuffer(g711.alaw_encode(_ALL_PCM), np.uint8), -32768)
_NP_ULAW_DEC = np.frombuffer(g711.ulaw_decode(bytes(range(256))), "<i2").copy()
_NP_ALAW_DEC = np.frombuffer(g711.alaw_decode(bytes(range(256))), "<i2").copy()


def _np_encoder(table: np.ndarray) -> Callable[[bytes], bytes]:
    def encode(pcm: bytes) -> bytes:
        return table[np.frombuffer(pcm, "<u2")].tobytes()

    return encode


def _np_decoder(table: np.ndarray) -> Callable[[bytes], bytes]:
    def decode(codes: bytes) -> bytes:
        return table[np.frombuffer(codes, np.uint8)].tobytes()

    return decode


@dataclass(frozen=True)
class _Law:
    name: str
    encode: Callable[[bytes], bytes]
    decode: Callable[[bytes], bytes]
    encode_into: Callable[[bytes, bytearray], int]
    decode_into: Callable[[bytes, bytearray], int]
    np_encode_table: np.ndarray
    np_decode_table: np.ndarray
    audioop_encode: str
    audioop_decode: str


LAWS = (
    _Law(
        "mu-law",
        g711.ulaw_encode,
        g711.ulaw_decode,
        g711.ulaw_encode_into,
        g711.ulaw_decode_into,
        _NP_ULAW_ENC,
        _NP_ULAW_DEC,
        "lin2ulaw",
        "ulaw2lin",
    ),
    _Law(
        "A-law",
        g711.alaw_encode,
        g711.alaw_decode,
        g711.alaw_encode_into,
        g711.alaw_decode_into,
        _NP_ALAW_ENC,
        _NP_ALAW_DEC,
        "lin2alaw",
        "alaw2lin",
    ),
)


def _g711_cases() -> list[Case]:
    frame = speech_like_pcm(FRAME_SAMPLES_8K)
    buffer = speech_like_pcm(BUFFER_SAMPLES_8K)
    cases: list[Case] = []
    for law in LAWS:
        np_encode, np_decode = _np_encoder(law.np_encode_table), _np_decoder(law.np_decode_table)
        for unit, pcm, enc_target in (
            ("20 ms frame", frame, TARGET_ENCODE_FRAME),
            ("60 s buffer", buffer, TARGET_ENCODE_BUFFER),
        ):
            codes = law.encode(pcm)
            codes_out = bytearray(len(codes))
            pcm_out = bytearray(len(pcm))
            enc_group = f"{law.name} encode, {unit}"
            dec_group = f"{law.name} decode, {unit}"
            if audioop is not None:
                ref_enc = getattr(audioop, law.audioop_encode)
                ref_dec = getattr(audioop, law.audioop_decode)
                cases += [
                    Case(enc_group, "audioop", partial(ref_enc, pcm, 2), baseline=True),
                    Case(dec_group, "audioop", partial(ref_dec, codes, 2), baseline=True),
                ]
            # "native" allocates its result like audioop does; "native _into" writes into a
            # reused buffer, the way a transport converts frames (and, for 60 s buffers, the
            # kernel without the page faults of a fresh megabyte).
            cases += [
                Case(enc_group, "native", partial(law.encode, pcm), target=enc_target),
                Case(enc_group, "native _into", partial(law.encode_into, pcm, codes_out)),
                Case(enc_group, "numpy LUT", partial(np_encode, pcm)),
                Case(dec_group, "native", partial(law.decode, codes), target=TARGET_DECODE),
                Case(dec_group, "native _into", partial(law.decode_into, codes, pcm_out)),
                Case(dec_group, "numpy LUT", partial(np_decode, codes)),
            ]
    return cases


def _ring_case() -> Case:
    # One 20 ms engine frame (16 kHz) queued, handed to the transport and acknowledged.
    ring = OutputRing(16000 * 2)
    frame = speech_like_pcm(320, rate=16000)
    out = bytearray(640)

    def write_read_ack() -> None:
        ring.write(frame, 1)
        ring.read_into(out, 320)
        ring.ack(320)

    return Case("ring write+read+ack, 20 ms frame", "native", write_read_ack)


def _resample_cases() -> list[Case]:
    cases: list[Case] = []
    for in_rate, out_rate in ((8000, 16000), (16000, 8000), (48000, 16000)):
        group = f"resample {in_rate // 1000}k→{out_rate // 1000}k, 20 ms frame"
        frame = speech_like_pcm(in_rate // 50, rate=in_rate)
        for name, quality, baseline in (
            ("soxr HQ stream", "HQ", True),
            ("soxr LQ stream", "LQ", False),
            ("fir (default)", "fir", False),
        ):
            process = Resampler(in_rate, out_rate, quality=quality).process
            cases.append(Case(group, name, partial(process, frame), baseline=baseline))
    return cases


def cases() -> list[Case]:
    """Every case, built fresh (streams and rings carry state between calls)."""
    return [*_g711_cases(), _ring_case(), *_resample_cases()]
