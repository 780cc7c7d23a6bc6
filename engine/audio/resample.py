"""Streaming int16 resamplers: one `Resampler` per direction per call, state kept across chunks.

Two engines sit behind one face, chosen by `quality`:

- ``"fir"``: a polyphase windowed-sinc FIR for integer ratios (8k<->16k, 16k<->48k, 8k<->48k):
  within 0.005 dB up to 85 % of the lower rate's Nyquist (3.4 kHz at 8 kHz), at least 65 dB down
  beyond 115 % of it. Every input sample produces its output at once; the only delay is the
  filter's group delay, 14 samples at the lower rate. The taps are designed here (`fir_taps`,
  once per ratio); the per-sample work runs in `engine._native.resample.PolyphaseFir`.
- ``"QQ" | "LQ" | "MQ" | "HQ" | "VHQ"``: `soxr.ResampleStream` at that quality, for any ratio.

``"auto"`` (the default) picks ``"fir"`` for integer ratios and ``"LQ"`` otherwise.

Why not soxr everywhere: soxr filters in DFT blocks and holds output back until a block is full,
so its stream delay is a sawtooth, not a small start-up constant. Measured here with 20 ms
chunks (worst / best hold-back over a second of audio, in ms of output):

    ratio        QQ     LQ            MQ             HQ             fir (group delay)
    8k -> 16k    0.25   61.3 / 3.8    117.5 / 10.5   115.0 / 12.5   1.75
    16k -> 8k    0.12   61.3 / 3.8    117.5 / 10.5   115.0 / 12.5   1.75
    48k -> 16k   0.00   20.0 / 2.5     37.6 /  5.1    36.6 /  6.1   0.875
    16k -> 48k   0.10   20.0 / 2.5     37.7 /  5.2    36.6 /  6.1   0.875
    24k -> 16k   0.06   20.0 / 2.5     37.6 /  5.1    36.6 /  6.1   (not integer)

An 8k -> 16k -> 8k round trip therefore costs ~120 ms of worst-case delay with soxr LQ and
~230 ms with HQ (over the engine's whole 60 ms relay budget), 3.5 ms with the FIR. soxr's QQ
has no delay but no anti-aliasing filter either (a 4.5 kHz tone resampled 16k -> 8k comes out
unattenuated at 3.5 kHz), so it is not a default. soxr LQ is flat to 3.4 kHz for non-integer
ratios to 16 kHz (-0.3 dB at 6 kHz) and keeps the worst case to ~20 ms. (soxr's variable-rate
mode holds back a constant 30 / 15 / 12.5 ms for 8k->16k / 16k->8k / 48k->16k: still too much.)

Cost per 20 ms frame through `Resampler.process`, in ns (best of 15 interleaved runs on a
2-core AMD EPYC Zen 4 VM; `python -m bench.kernels --only resample` times the same groups).
"numpy FIR" is the engine this module ran before the native kernel (one strided BLAS product
per chunk), kept as `bench.kernels_g711.numpy_fir`; the native kernel runs its AVX2 build where
the CPU has AVX2, else the baseline (SSE2 on x86-64) build:

    ratio        numpy FIR   native AVX2   native SSE2   soxr LQ
    8k -> 16k      8,600         535           750        4,300
    16k -> 8k      8,000         490           720        3,900
    48k -> 16k    12,300       1,240         2,190        5,800
    16k -> 48k    11,600       1,520         2,170        6,700

The native FIR computes in float32 like the numpy one (float32 taps and sums, round half to
even, saturate to int16) but adds the products in another order, so the two agree to +-1 LSB:
over 5 s of 20 ms frames, 1 output sample in 1,000-3,000 differs for loud noise and 1 in
1,700-20,000 for speech-like audio, by exactly 1. Its AVX2 and SSE2 builds agree bit for bit,
and its output does not depend on how the input is cut into chunks.

`delay_ms` is the FIR's group delay, or for soxr the worst hold-back measured once per
(rates, quality) on 20 ms chunks.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import soxr

from engine._native.resample import PolyphaseFir

if TYPE_CHECKING:
    from typing import Any

    from numpy.typing import NDArray
    from typing_extensions import Buffer

    # numpy arrays export buffers, but numpy's stubs only say so from Python 3.12 on.
    BytesLike = Buffer | NDArray[Any]

SOXR_QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")
QUALITIES = ("auto", "fir", *SOXR_QUALITIES)

# FIR design: the transition band is +-15 % of the lower Nyquist around it (3.4-4.6 kHz for
# telephony), ~66 dB of stopband. The filter has 2 * 14 * R + 1 taps for a ratio R, stored as 30
# taps per polyphase branch (zero-padded), so its group delay is exactly 14 samples at the
# lower rate (1.75 ms at 8 kHz, 0.875 ms at 16 kHz) and outputs line up with whole samples.
_FIR_ATTENUATION_DB = 66.0
_FIR_DELAY_LOW_RATE = 14
_FIR_TAPS_PER_PHASE = 30


class _Engine(Protocol):
    def process(self, pcm: BytesLike, /) -> bytes: ...

    def flush(self) -> bytes: ...


class Resampler:
    """Streams int16 mono PCM from `in_rate` to `out_rate`; one object per direction per call.

    `process(pcm)` may be fed chunks of any even length, as bytes, bytearray, memoryview or
    any C-contiguous buffer (bytes is the fastest); `flush()` returns what is still inside the
    filter and readies the object for a fresh stream.
    """

    __slots__ = ("_delay_ms", "_engine", "in_rate", "out_rate", "process", "quality")

    #: Resample one chunk of int16 little-endian samples (same-rate bytes come back as is). The
    #: kernel's own method, bound per object: this runs for every frame of every call.
    process: Callable[[BytesLike], bytes]

    def __init__(self, in_rate: int, out_rate: int, quality: str = "auto") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"rates must be positive, got {in_rate} -> {out_rate}")
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        if quality == "auto":
            quality = "fir" if _integer_ratio(in_rate, out_rate) else "LQ"
        self.quality = quality
        self._engine: _Engine
        if in_rate == out_rate:
            self._engine = _Passthrough()
            self._delay_ms = 0.0
        elif quality == "fir":
            ratio = _integer_ratio(in_rate, out_rate)
            if ratio is None:
                raise ValueError(
                    f"quality 'fir' needs an integer ratio, got {in_rate} -> {out_rate}"
                )
            self._engine = _fir(*ratio)
            self._delay_ms = _FIR_DELAY_LOW_RATE / min(in_rate, out_rate) * 1000
        else:
            self._engine = _Soxr(in_rate, out_rate, quality)
            self._delay_ms = _soxr_worst_delay_ms(in_rate, out_rate, quality)
        self.process = self._engine.process

    @property
    def delay_ms(self) -> float:
        """Latency this resampler adds: FIR group delay, or soxr's worst hold-back."""
        return self._delay_ms

    def flush(self) -> bytes:
        """End the stream: return the audio still held inside the filter, then start afresh."""
        return self._engine.flush()

    def __repr__(self) -> str:
        return (
            f"Resampler({self.in_rate}, {self.out_rate}, quality={self.quality!r}, "
            f"delay_ms={self.delay_ms:.2f})"
        )


def _integer_ratio(in_rate: int, out_rate: int) -> tuple[int, int] | None:
    """(up, down) when one rate is a whole multiple of the other, else None."""
    if out_rate % in_rate == 0:
        return out_rate // in_rate, 1
    if in_rate % out_rate == 0:
        return 1, in_rate // out_rate
    return None


def _check_even(pcm: bytes) -> None:
    if len(pcm) & 1:
        raise ValueError(f"PCM length must be even (int16 samples), got {len(pcm)} bytes")


class _Passthrough:
    def process(self, pcm: BytesLike) -> bytes:
        data = pcm if type(pcm) is bytes else bytes(pcm)
        _check_even(data)
        return data

    def flush(self) -> bytes:
        return b""


@lru_cache(maxsize=16)
def fir_taps(up: int, down: int) -> NDArray[np.float32]:
    """The FIR's float32 taps for a rate change by up/down (one of them 1), as the kernel runs
    them: the low-pass at the high rate, times `up` when interpolating (zero-stuffing divides
    the level by it). Designed once per ratio; the array is shared, so it is read-only."""
    factor = max(up, down)
    taps = 2 * _FIR_DELAY_LOW_RATE * factor + 1
    beta = 0.1102 * (_FIR_ATTENUATION_DB - 8.7)
    cutoff = 0.5 / factor  # in cycles per high-rate sample
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, beta)
    h /= h.sum()
    # Zero-padded to whole branches of _FIR_TAPS_PER_PHASE; the gain is applied in float64
    # before the one rounding to float32.
    padded = np.zeros(_FIR_TAPS_PER_PHASE * factor)
    padded[:taps] = h * up
    out = padded.astype(np.float32)
    out.flags.writeable = False
    return out


def _fir(up: int, down: int) -> PolyphaseFir:
    # flush() pushes out what is still in the filter: up, the group delay's worth of input;
    # down, enough input for the last real sample to reach the centre of an output's window.
    zeros = _FIR_DELAY_LOW_RATE if up > 1 else (_FIR_DELAY_LOW_RATE + 1) * down - 1
    return PolyphaseFir(fir_taps(up, down), up=up, down=down, flush_samples=zeros)


class _Soxr:
    def __init__(self, in_rate: int, out_rate: int, quality: str) -> None:
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)

    def process(self, pcm: BytesLike) -> bytes:
        data = np.frombuffer(pcm, np.uint8)  # type: ignore[arg-type]  # stubs predate Buffer
        if data.size & 1:
            raise ValueError(f"PCM length must be even (int16 samples), got {data.size} bytes")
        out: np.ndarray = self._stream.resample_chunk(data.view("<i2"))
        return out.tobytes()

    def flush(self) -> bytes:
        out: np.ndarray = self._stream.resample_chunk(np.empty(0, np.int16), last=True)
        self._stream.clear()
        return out.tobytes()


@lru_cache(maxsize=64)
def _soxr_worst_delay_ms(in_rate: int, out_rate: int, quality: str) -> float:
    """The most output soxr holds back while fed 20 ms chunks for one second, in ms."""
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)
    chunk = max(1, in_rate // 50)
    silence = np.zeros(chunk, np.int16)
    fed = produced = 0
    worst = 0.0
    for _ in range(50):
        produced += len(stream.resample_chunk(silence))
        fed += chunk
        worst = max(worst, fed * out_rate / in_rate - produced)
    return worst / out_rate * 1000
