"""Streaming int16 resamplers: one `Resampler` per direction per call, state kept across chunks.

Two engines sit behind one face, chosen by `quality`:

- ``"fir"``: a polyphase windowed-sinc FIR for integer ratios (8k<->16k, 16k<->48k, 8k<->48k):
  within 0.005 dB up to 85 % of the lower rate's Nyquist (3.4 kHz at 8 kHz), at least 65 dB down
  beyond 115 % of it. Every input sample produces its output at once; the only delay is the
  filter's group delay, 14 samples at the lower rate.
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

Cost per 20 ms frame, unloaded: soxr 3.5-6 us, the numpy FIR 8-13 us (one strided matrix
product plus the int16 conversion; a Cython kernel in native/ would bring it near 1 us).

`delay_ms` is the FIR's group delay, or for soxr the worst hold-back measured once per
(rates, quality) on 20 ms chunks.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import numpy as np
import soxr
from numpy.lib.stride_tricks import as_strided

SOXR_QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")
QUALITIES = ("auto", "fir", *SOXR_QUALITIES)

# FIR design: the transition band is +-15 % of the lower Nyquist around it (3.4-4.6 kHz for
# telephony), ~66 dB of stopband. The filter has 2 * 14 * R + 1 taps for a ratio R, stored as 30
# taps per polyphase branch (zero-padded), so its group delay is exactly 14 samples at the
# lower rate (1.75 ms at 8 kHz, 0.875 ms at 16 kHz) and outputs line up with whole samples.
_FIR_ATTENUATION_DB = 66.0
_FIR_DELAY_LOW_RATE = 14
_FIR_TAPS_PER_PHASE = 30

_I16 = np.dtype("<i2")


class _Engine(Protocol):
    delay_ms: float

    def process(self, pcm: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class Resampler:
    """Streams int16 mono PCM from `in_rate` to `out_rate`; one object per direction per call.

    `process(pcm)` may be fed chunks of any even length; `flush()` returns what is still inside
    the filter and readies the object for a fresh stream.
    """

    __slots__ = ("_engine", "in_rate", "out_rate", "quality")

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
        elif quality == "fir":
            up, down = _integer_ratio(in_rate, out_rate) or (0, 0)
            if up > 1:
                self._engine = _FirUp(up, in_rate)
            elif down > 1:
                self._engine = _FirDown(down, in_rate)
            else:
                raise ValueError(
                    f"quality 'fir' needs an integer ratio, got {in_rate} -> {out_rate}"
                )
        else:
            self._engine = _Soxr(in_rate, out_rate, quality)

    @property
    def delay_ms(self) -> float:
        """Latency this resampler adds: FIR group delay, or soxr's worst hold-back."""
        return self._engine.delay_ms

    def process(self, pcm: bytes) -> bytes:
        """Resample one chunk of int16 little-endian samples (same-rate input comes back as is)."""
        return self._engine.process(pcm)

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


def _check_even(pcm: bytes) -> int:
    size = len(pcm)
    if size & 1:
        raise ValueError(f"PCM length must be even (int16 samples), got {size} bytes")
    return size >> 1


class _Passthrough:
    delay_ms = 0.0

    def process(self, pcm: bytes) -> bytes:
        _check_even(pcm)
        return pcm

    def flush(self) -> bytes:
        return b""


def _lowpass(factor: int) -> np.ndarray:
    """Kaiser-windowed sinc at the high rate, cut at the lower rate's Nyquist, DC gain 1.

    Returned zero-padded to _FIR_TAPS_PER_PHASE * factor taps; the real filter is the first
    2 * _FIR_DELAY_LOW_RATE * factor + 1 of them.
    """
    taps = 2 * _FIR_DELAY_LOW_RATE * factor + 1
    beta = 0.1102 * (_FIR_ATTENUATION_DB - 8.7)
    cutoff = 0.5 / factor  # in cycles per high-rate sample
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, beta)
    h /= h.sum()
    padded = np.zeros(_FIR_TAPS_PER_PHASE * factor)
    padded[:taps] = h
    return padded


class _FirOutput:
    """Float -> int16 conversion in buffers that only grow, so steady chunks allocate nothing
    here but the returned bytes."""

    __slots__ = ("_acc", "_count", "_pcm")

    def __init__(self) -> None:
        self._acc = np.empty(0, np.float32)
        self._pcm = np.empty(0, _I16)
        self._count = 0

    def buffer(self, n: int) -> np.ndarray:
        """A float32 accumulator of n samples for the filter to write into."""
        if self._acc.size < n:
            self._acc = np.empty(n, np.float32)
            self._pcm = np.empty(n, _I16)
        self._count = n
        return self._acc[:n]

    def to_bytes(self) -> bytes:
        acc = self._acc[: self._count]
        pcm = self._pcm[: self._count]
        np.rint(acc, out=acc)
        np.clip(acc, -32768.0, 32767.0, out=acc)
        np.copyto(pcm, acc, casting="unsafe")
        return pcm.tobytes()


class _FirUp:
    """Interpolation by `factor`: each input sample yields `factor` outputs at once.

    Polyphase: output i*L + p is a dot product of the last K inputs with branch p, so one
    (n x K) @ (K x L) product over a strided window view gives the interleaved output.
    """

    def __init__(self, factor: int, in_rate: int) -> None:
        h = _lowpass(factor) * factor  # zero-stuffing divides the level by the factor
        k = _FIR_TAPS_PER_PHASE
        self._k = k
        self._factor = factor
        # branches[t, p] multiplies input x[i - (K-1) + t] for output phase p.
        self._branches = np.ascontiguousarray(h.reshape(k, factor)[::-1], dtype=np.float32)
        self.delay_ms = _FIR_DELAY_LOW_RATE / in_rate * 1000
        self._work = np.zeros(k - 1, np.float32)
        self._windows: dict[int, np.ndarray] = {}
        self._out = _FirOutput()

    def _window(self, n: int) -> np.ndarray:
        win = self._windows.get(n)
        if win is None:
            need = self._k - 1 + n
            if self._work.size < need:
                work = np.zeros(need, np.float32)
                work[: self._k - 1] = self._work[: self._k - 1]
                self._work = work
                self._windows.clear()
            if len(self._windows) >= 8:  # chunk sizes vary: keep the cache small
                self._windows.clear()
            step = self._work.strides[0]
            win = as_strided(self._work, shape=(n, self._k), strides=(step, step), writeable=False)
            self._windows[n] = win
        return win

    def process(self, pcm: bytes) -> bytes:
        n = _check_even(pcm)
        if n == 0:
            return b""
        win = self._window(n)
        k1 = self._k - 1
        work = self._work
        work[k1 : k1 + n] = np.frombuffer(pcm, _I16)
        acc = self._out.buffer(n * self._factor)
        np.dot(win, self._branches, out=acc.reshape(n, self._factor))
        work[:k1] = work[n : n + k1]
        return self._out.to_bytes()

    def flush(self) -> bytes:
        tail = self.process(bytes(2 * _FIR_DELAY_LOW_RATE))
        self._work[:] = 0.0
        return tail


class _FirDown:
    """Decimation by `factor`: output j is the filter over inputs up to j*M.

    Inputs that do not yet complete an output wait in the work buffer (at most M-1 of them).
    """

    def __init__(self, factor: int, in_rate: int) -> None:
        h = _lowpass(factor)
        self._taps = h.size
        self._factor = factor
        self._h = np.ascontiguousarray(h[::-1], dtype=np.float32)
        self.delay_ms = _FIR_DELAY_LOW_RATE * factor / in_rate * 1000
        self._work = np.zeros(h.size - 1, np.float32)
        self._fill = h.size - 1  # samples in the work buffer; starts as the filter's history
        self._windows: dict[int, np.ndarray] = {}
        self._out = _FirOutput()

    def _window(self, count: int) -> np.ndarray:
        win = self._windows.get(count)
        if win is None:
            if len(self._windows) >= 8:
                self._windows.clear()
            step = self._work.strides[0]
            win = as_strided(
                self._work,
                shape=(count, self._taps),
                strides=(step * self._factor, step),
                writeable=False,
            )
            self._windows[count] = win
        return win

    def process(self, pcm: bytes) -> bytes:
        n = _check_even(pcm)
        fill = self._fill
        end = fill + n
        if self._work.size < end:
            work = np.zeros(end + self._factor, np.float32)
            work[:fill] = self._work[:fill]
            self._work = work
            self._windows.clear()
        work = self._work
        work[fill:end] = np.frombuffer(pcm, _I16)
        count = (end - self._taps) // self._factor + 1 if end >= self._taps else 0
        if count == 0:
            self._fill = end
            return b""
        acc = self._out.buffer(count)
        np.dot(self._window(count), self._h, out=acc)
        used = count * self._factor
        keep = end - used
        work[:keep] = work[used:end]
        self._fill = keep
        return self._out.to_bytes()

    def flush(self) -> bytes:
        zeros = (_FIR_DELAY_LOW_RATE + 1) * self._factor - 1
        tail = self.process(bytes(2 * zeros))
        self._work[:] = 0.0
        self._fill = self._taps - 1
        return tail


class _Soxr:
    def __init__(self, in_rate: int, out_rate: int, quality: str) -> None:
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)
        self.delay_ms = _soxr_worst_delay_ms(in_rate, out_rate, quality)

    def process(self, pcm: bytes) -> bytes:
        _check_even(pcm)
        out: np.ndarray = self._stream.resample_chunk(np.frombuffer(pcm, np.int16))
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
