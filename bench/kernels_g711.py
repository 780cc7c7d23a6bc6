"""Kernel cases for G.711, the output ring and the resamplers, for `python -m bench.kernels`.

Each group times one unit of work (a 20 ms frame or a 60 s buffer) through the native code and
through the alternatives a reader would otherwise reach for: CPython's audioop (the baseline,
deprecated and gone in 3.13, so skipped where missing) and a numpy lookup table. The resampler
groups take as baseline `numpy_fir`, the numpy polyphase FIR the native one replaced, kept here
(and used by tests/test_resample.py as the reference the native output must match to +-1 LSB).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import numpy as np
from engine._native.resample import KERNEL as FIR_KERNEL
from engine._native.resample import PolyphaseFir
from numpy.lib.stride_tricks import as_strided

from bench.kernel_case import Case
from engine.audio import g711
from engine.audio.resample import Resampler, fir_taps
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

# Targets: speed-up over audioop that the native kernel must reach: a frame encoded at least as
# fast, decoding within 20 %, a 60 s buffer encoded at least 5x as fast.
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


# --- the numpy polyphase FIR: the resamplers' baseline and reference ----------------------------

# The engine's FIR design (engine.audio.resample): 30 taps per branch, 14 samples of group
# delay at the lower rate.
_FIR_TAPS_PER_PHASE = 30
_FIR_DELAY_LOW_RATE = 14


def _check_even(pcm: bytes) -> int:
    size = len(pcm)
    if size & 1:
        raise ValueError(f"PCM length must be even (int16 samples), got {size} bytes")
    return size >> 1


class _FirOutput:
    """Float -> int16 conversion in buffers that only grow, so steady chunks allocate nothing
    here but the returned bytes."""

    __slots__ = ("_acc", "_count", "_pcm")

    def __init__(self) -> None:
        self._acc = np.empty(0, np.float32)
        self._pcm = np.empty(0, "<i2")
        self._count = 0

    def buffer(self, n: int) -> np.ndarray:
        """A float32 accumulator of n samples for the filter to write into."""
        if self._acc.size < n:
            self._acc = np.empty(n, np.float32)
            self._pcm = np.empty(n, "<i2")
        self._count = n
        return self._acc[:n]

    def to_bytes(self) -> bytes:
        acc = self._acc[: self._count]
        pcm = self._pcm[: self._count]
        np.rint(acc, out=acc)
        np.clip(acc, -32768.0, 32767.0, out=acc)
        np.copyto(pcm, acc, casting="unsafe")
        return pcm.tobytes()


class _NumpyFirUp:
    """Interpolation by `factor`: each input sample yields `factor` outputs at once.

    Polyphase: output i*L + p is a dot product of the last K inputs with branch p, so one
    (n x K) @ (K x L) product over a strided window view gives the interleaved output.
    """

    def __init__(self, factor: int) -> None:
        h = fir_taps(factor, 1)  # float32, gain `factor` included
        k = _FIR_TAPS_PER_PHASE
        self._k = k
        self._factor = factor
        # branches[t, p] multiplies input x[i - (K-1) + t] for output phase p.
        self._branches = np.ascontiguousarray(h.reshape(k, factor)[::-1], dtype=np.float32)
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
        work[k1 : k1 + n] = np.frombuffer(pcm, "<i2")
        acc = self._out.buffer(n * self._factor)
        np.dot(win, self._branches, out=acc.reshape(n, self._factor))
        work[:k1] = work[n : n + k1]
        return self._out.to_bytes()

    def flush(self) -> bytes:
        tail = self.process(bytes(2 * _FIR_DELAY_LOW_RATE))
        self._work[:] = 0.0
        return tail


class _NumpyFirDown:
    """Decimation by `factor`: output j is the filter over inputs up to j*M.

    Inputs that do not yet complete an output wait in the work buffer (at most M-1 of them).
    """

    def __init__(self, factor: int) -> None:
        h = fir_taps(1, factor)
        self._taps = h.size
        self._factor = factor
        self._h = np.ascontiguousarray(h[::-1], dtype=np.float32)
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
        work[fill:end] = np.frombuffer(pcm, "<i2")
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


def numpy_fir(in_rate: int, out_rate: int) -> _NumpyFirUp | _NumpyFirDown:
    """The numpy FIR engine that `Resampler(..., quality="fir")` ran before the native kernel,
    unchanged but for taking its taps from `fir_taps`: float32 sums by BLAS, then rint and clip."""
    if out_rate > in_rate and out_rate % in_rate == 0:
        return _NumpyFirUp(out_rate // in_rate)
    if in_rate > out_rate and in_rate % out_rate == 0:
        return _NumpyFirDown(in_rate // out_rate)
    raise ValueError(f"the FIR needs an integer ratio, got {in_rate} -> {out_rate}")


RESAMPLE_RATES = ((8000, 16000), (16000, 8000), (48000, 16000), (16000, 48000))


def _resample_cases() -> list[Case]:
    cases: list[Case] = []
    for in_rate, out_rate in RESAMPLE_RATES:
        group = f"resample {in_rate // 1000}k→{out_rate // 1000}k, 20 ms frame"
        frame = speech_like_pcm(in_rate // 50, rate=in_rate)
        up, down = max(1, out_rate // in_rate), max(1, in_rate // out_rate)
        kernel = PolyphaseFir(fir_taps(up, down), up=up, down=down)
        buf = bytearray(kernel.output_size(len(frame)))
        numpy_process = numpy_fir(in_rate, out_rate).process
        native_process = Resampler(in_rate, out_rate, "fir").process
        lq_process = Resampler(in_rate, out_rate, "LQ").process
        hq_process = Resampler(in_rate, out_rate, "HQ").process
        cases += [
            Case(group, "numpy fir", partial(numpy_process, frame), baseline=True),
            # The engine's face (Resampler.process: one Python call over the kernel), and the
            # bare kernel writing into a reused buffer.
            Case(group, f"native fir ({FIR_KERNEL})", partial(native_process, frame)),
            Case(
                group, f"native fir into ({FIR_KERNEL})", partial(kernel.process_into, frame, buf)
            ),
            Case(group, "soxr LQ stream", partial(lq_process, frame)),
            Case(group, "soxr HQ stream", partial(hq_process, frame)),
        ]
    return cases


def cases() -> list[Case]:
    """Every case, built fresh (streams and rings carry state between calls)."""
    return [*_g711_cases(), _ring_case(), *_resample_cases()]
