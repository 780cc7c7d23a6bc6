"""Streaming resamplers: tones keep frequency and level, chunk edges leave no trace, delay is low;
the native FIR agrees with the numpy engine it replaced (bench.kernels_g711.numpy_fir) to 1 LSB."""

from __future__ import annotations

import array
from typing import Any

import numpy as np
import pytest
import soxr

from bench.kernels_g711 import numpy_fir
from engine._native import resample as native
from engine.audio.resample import Resampler, fir_taps

CHUNK_MS = 20


def tone(rate: int, freq: float, seconds: float = 1.0, amplitude: float = 10000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2")


def noise(rate: int, seconds: float, seed: int = 3) -> np.ndarray:
    """Band-limited noise (well inside every Nyquist used here) for delay measurements."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(int(rate * seconds))
    spectrum = np.fft.rfft(white)
    spectrum[np.fft.rfftfreq(white.size, 1 / rate) > 3000] = 0
    x = np.fft.irfft(spectrum, white.size)
    return np.round(x / np.abs(x).max() * 12000).astype("<i2")


def stream(resampler: Resampler, pcm: np.ndarray, rate: int, flush: bool = False) -> np.ndarray:
    chunk = rate * CHUNK_MS // 1000
    data = pcm.tobytes()
    parts = [resampler.process(data[2 * i : 2 * (i + chunk)]) for i in range(0, pcm.size, chunk)]
    if flush:
        parts.append(resampler.flush())
    return np.frombuffer(b"".join(parts), "<i2")


def level_db(x: np.ndarray, amplitude: float = 10000.0) -> float:
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
    return float(20 * np.log10(rms / (amplitude / np.sqrt(2))))


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / rate)[np.argmax(spectrum)])


def delay_samples(out: np.ndarray, ref: np.ndarray, max_lag: int = 200) -> int:
    """Lag at which `out` best matches `ref` (same rate)."""
    n = min(out.size, ref.size) - max_lag
    scores = [
        np.dot(out[lag : lag + n].astype(float), ref[:n].astype(float)) for lag in range(max_lag)
    ]
    return int(np.argmax(scores))


def max_step(x: np.ndarray) -> float:
    return float(np.abs(np.diff(x.astype(np.float64))).max())


def test_a_tone_through_8k_16k_8k_keeps_its_frequency_and_level() -> None:
    up, down = Resampler(8000, 16000), Resampler(16000, 8000)
    x = tone(8000, 1000)
    wide = stream(up, x, 8000)
    back = stream(down, wide, 16000)
    assert wide.size == 16000 and back.size == 8000
    settle = 8 * 10  # 10 ms, well past the filters' start-up
    assert peak_hz(wide[2 * settle :], 16000) == pytest.approx(1000, abs=2)
    assert peak_hz(back[settle:], 8000) == pytest.approx(1000, abs=2)
    assert abs(level_db(wide[2 * settle :])) < 0.5
    assert abs(level_db(back[settle:])) < 0.5


def test_streaming_8k_16k_8k_has_no_discontinuity_at_chunk_edges() -> None:
    x = tone(8000, 1000)
    wide = stream(Resampler(8000, 16000), x, 8000)
    back = stream(Resampler(16000, 8000), wide, 16000)
    # A 1 kHz sine of amplitude A moves at most 2*pi*f*A/fs per sample; a click would jump far
    # beyond that at a 20 ms boundary.
    assert max_step(wide[80:]) < 2 * np.pi * 1000 * 10000 / 16000 * 1.05
    assert max_step(back[40:]) < 2 * np.pi * 1000 * 10000 / 8000 * 1.05


@pytest.mark.parametrize("in_rate, out_rate", [(8000, 16000), (16000, 8000), (48000, 16000)])
def test_streamed_output_equals_converting_the_whole_signal_at_once(
    in_rate: int, out_rate: int
) -> None:
    x = noise(in_rate, 0.5)
    chunked = stream(Resampler(in_rate, out_rate), x, in_rate)
    whole = np.frombuffer(Resampler(in_rate, out_rate).process(x.tobytes()), "<i2")
    assert chunked.size == whole.size
    assert np.abs(chunked.astype(int) - whole.astype(int)).max() <= 1


@pytest.mark.parametrize("in_rate, out_rate", [(16000, 8000), (48000, 16000), (8000, 48000)])
def test_ragged_chunk_sizes_give_the_same_stream(in_rate: int, out_rate: int) -> None:
    # Chunks that do not divide by the decimation factor leave samples waiting between calls.
    x = noise(in_rate, 0.2)
    data = x.tobytes()
    resampler = Resampler(in_rate, out_rate)
    parts, pos = [], 0
    for size in [7, 101, 1, 0, 333, 2, 960] * 40:
        parts.append(resampler.process(data[2 * pos : 2 * (pos + size)]))
        pos += size
    ragged = np.frombuffer(b"".join(parts), "<i2")
    whole = np.frombuffer(Resampler(in_rate, out_rate).process(data), "<i2")
    assert ragged.size == whole.size
    assert np.abs(ragged.astype(int) - whole.astype(int)).max() <= 1


@pytest.mark.parametrize("in_rate, out_rate", [(8000, 16000), (16000, 8000), (48000, 16000)])
def test_streamed_output_matches_soxr_one_shot_after_the_filter_delay(
    in_rate: int, out_rate: int
) -> None:
    x = noise(in_rate, 0.5)
    resampler = Resampler(in_rate, out_rate)
    ours = stream(resampler, x, in_rate).astype(np.float64)
    reference = soxr.resample(x, in_rate, out_rate, quality="HQ").astype(np.float64)
    lag = round(resampler.delay_ms * out_rate / 1000)
    n = reference.size - lag
    error = ours[lag : lag + n] - reference[:n]
    snr = 10 * np.log10(np.mean(reference[:n] ** 2) / np.mean(error**2))
    assert snr > 40


def test_a_tone_from_48k_to_16k_keeps_its_frequency_level_and_smoothness() -> None:
    x = tone(48000, 1000)
    out = stream(Resampler(48000, 16000), x, 48000)
    assert out.size == 16000
    body = out[160:]
    assert peak_hz(body, 16000) == pytest.approx(1000, abs=2)
    assert abs(level_db(body)) < 0.5
    assert max_step(body) < 2 * np.pi * 1000 * 10000 / 16000 * 1.05


def test_downsampling_to_8k_removes_what_would_alias_into_the_phone_band() -> None:
    out = stream(Resampler(16000, 8000), tone(16000, 5000), 16000)
    assert level_db(out[80:]) < -60


@pytest.mark.parametrize(
    "in_rate, out_rate", [(8000, 16000), (16000, 8000), (48000, 16000), (16000, 48000)]
)
def test_delay_ms_is_the_delay_the_signal_actually_sees(in_rate: int, out_rate: int) -> None:
    resampler = Resampler(in_rate, out_rate)
    out = stream(resampler, noise(in_rate, 0.3), in_rate)
    reference = soxr.resample(noise(in_rate, 0.3), in_rate, out_rate, quality="HQ")
    measured_ms = delay_samples(out, reference) / out_rate * 1000
    assert measured_ms == pytest.approx(resampler.delay_ms, abs=1000 / out_rate)


def test_an_8k_16k_8k_round_trip_adds_only_a_few_ms() -> None:
    up, down = Resampler(8000, 16000), Resampler(16000, 8000)
    x = noise(8000, 0.5)
    back = stream(down, stream(up, x, 8000), 16000)
    measured_ms = delay_samples(back, x) / 8
    assert measured_ms < 5
    assert measured_ms == pytest.approx(up.delay_ms + down.delay_ms, abs=0.25)


def test_flush_returns_the_tail_still_inside_the_filter_and_resets() -> None:
    resampler = Resampler(16000, 8000)
    x = tone(16000, 1000, seconds=0.1)
    out = stream(resampler, x, 16000, flush=True)
    lag = round(resampler.delay_ms * 8)
    assert out.size >= 800 + lag
    # The last input samples made it out: the tail is not silent.
    assert np.abs(out[800 : 800 + lag].astype(int)).max() > 1000
    # After a flush the next stream starts from silence, not from the old tail.
    again = stream(resampler, x, 16000)
    assert np.array_equal(again, out[: again.size])


def test_a_soxr_stream_carries_state_across_chunks_for_non_integer_ratios() -> None:
    resampler = Resampler(24000, 16000)
    assert resampler.quality == "LQ"
    x = noise(24000, 0.5)
    out = stream(resampler, x, 24000, flush=True).astype(np.float64)
    reference = soxr.resample(x, 24000, 16000, quality="LQ").astype(np.float64)
    n = min(out.size, reference.size)
    assert abs(out.size - reference.size) <= 1
    error = out[:n] - reference[:n]
    # A chunk edge that lost the filter state would be off by thousands; rounding differs by a few.
    assert np.abs(error).max() <= 4
    assert resampler.delay_ms > 0


def test_same_rate_is_a_pass_through() -> None:
    resampler = Resampler(16000, 16000)
    pcm = tone(16000, 440, 0.02).tobytes()
    assert resampler.process(pcm) is pcm
    assert resampler.delay_ms == 0.0
    assert resampler.flush() == b""


def test_empty_chunks_are_harmless() -> None:
    for rates in ((8000, 16000), (16000, 8000), (24000, 16000)):
        assert Resampler(*rates).process(b"") == b""


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="quality"):
        Resampler(8000, 16000, quality="best")
    with pytest.raises(ValueError, match="integer ratio"):
        Resampler(24000, 16000, quality="fir")
    with pytest.raises(ValueError):
        Resampler(0, 16000)
    for rates in ((8000, 16000), (16000, 8000), (24000, 16000), (16000, 16000)):
        with pytest.raises(ValueError, match="even"):
            Resampler(*rates).process(b"\x00\x00\x00")


# --- the native FIR kernel against the numpy engine it replaced --------------------------------

FIR_RATES = [
    (8000, 16000),
    (16000, 8000),
    (48000, 16000),
    (16000, 48000),
    (8000, 48000),
    (48000, 8000),
]
RAGGED_SIZES = [7, 101, 1, 0, 333, 2, 960, 513, 1600]


def loud(rate: int, seconds: float, seed: int = 5) -> np.ndarray:
    """Noise, a full-scale square wave and a tone back to back: rounding, overshoot, clipping."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    hiss = np.clip(rng.standard_normal(n) * 16000, -32768, 32767)
    square = np.where(np.arange(n) // (rate // 200) % 2 == 0, 32767, -32768)
    return np.concatenate([hiss, square, tone(rate, 440, seconds)]).astype("<i2")


def feed(resampler: Any, pcm: np.ndarray, sizes: list[int]) -> np.ndarray:
    """pcm in chunks of the given sizes (cycled), then flush()."""
    data, parts, pos, k = pcm.tobytes(), [], 0, 0
    while pos < pcm.size:
        size = sizes[k % len(sizes)]
        parts.append(resampler.process(data[2 * pos : 2 * (pos + size)]))
        pos, k = pos + size, k + 1
    parts.append(resampler.flush())
    return np.frombuffer(b"".join(parts), "<i2")


@pytest.mark.parametrize("in_rate, out_rate", FIR_RATES)
def test_native_fir_matches_the_numpy_engine_to_one_lsb(in_rate: int, out_rate: int) -> None:
    x = loud(in_rate, 0.2)
    ours = feed(Resampler(in_rate, out_rate), x, RAGGED_SIZES)
    reference = feed(numpy_fir(in_rate, out_rate), x, RAGGED_SIZES)
    assert ours.size == reference.size
    diff = np.abs(ours.astype(int) - reference.astype(int))
    assert diff.max() <= 1
    # Both sum the same float32 products, in a different order: only sums within rounding of a
    # .5 boundary can land on the other side. A wrong rounding rule or tap would show everywhere.
    assert np.count_nonzero(diff) <= ours.size // 200


@pytest.mark.parametrize("in_rate, out_rate", [(8000, 16000), (48000, 16000)])
def test_overshoot_saturates_at_the_int16_limits(in_rate: int, out_rate: int) -> None:
    square = np.where(np.arange(in_rate // 10) // (in_rate // 100) % 2 == 0, 32767, -32768)
    out = feed(Resampler(in_rate, out_rate), square.astype("<i2"), [in_rate // 50])
    # The filter rings past full scale at every edge of a full-scale square wave.
    assert out.max() == 32767 and out.min() == -32768
    reference = feed(numpy_fir(in_rate, out_rate), square.astype("<i2"), [in_rate // 50])
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1


@pytest.mark.parametrize("in_rate, out_rate", FIR_RATES)
def test_native_fir_output_does_not_depend_on_how_the_input_is_cut(
    in_rate: int, out_rate: int
) -> None:
    # Chunks across the kernel's internal blocks, waiting samples between calls, one long call
    # with the GIL released: every output is computed the same way, so they agree bit for bit.
    x = loud(in_rate, 0.15)
    whole = feed(Resampler(in_rate, out_rate), x, [x.size])
    assert np.array_equal(feed(Resampler(in_rate, out_rate), x, RAGGED_SIZES), whole)
    assert np.array_equal(feed(Resampler(in_rate, out_rate), x, [in_rate // 50]), whole)


@pytest.mark.parametrize(
    "in_rate, out_rate", [(8000, 16000), (48000, 16000), (24000, 16000), (16000, 16000)]
)
def test_bytes_bytearray_memoryview_and_arrays_resample_alike(in_rate: int, out_rate: int) -> None:
    frame = noise(in_rate, 0.02)
    raw = frame.tobytes()
    # A memoryview one byte into a buffer: the samples are not 2-byte aligned.
    shifted = memoryview(b"\x00" + raw)[1:]
    inputs: list[Any] = [
        raw,
        bytearray(raw),
        memoryview(raw),
        shifted,
        frame,
        array.array("h", raw),
    ]
    outputs = [Resampler(in_rate, out_rate).process(pcm) for pcm in inputs]
    assert all(type(out) is bytes for out in outputs)
    assert all(out == outputs[0] for out in outputs)


def test_flush_after_upsampling_returns_the_tail_and_starts_afresh() -> None:
    resampler = Resampler(8000, 16000)
    x = tone(8000, 1000, seconds=0.05)
    out = stream(resampler, x, 8000, flush=True)
    lag = round(resampler.delay_ms * 16)
    assert out.size == 2 * x.size + lag
    assert np.abs(out[-lag:].astype(int)).max() > 1000
    assert np.array_equal(stream(resampler, x, 8000), out[: 2 * x.size])


def kernel(up: int, down: int) -> native.PolyphaseFir:
    return native.PolyphaseFir(fir_taps(up, down), up=up, down=down)


@pytest.mark.parametrize("up, down", [(2, 1), (1, 2), (1, 3), (3, 1)])
def test_process_into_writes_what_process_returns(up: int, down: int) -> None:
    x = noise(16000, 0.1).tobytes()
    into, plain = kernel(up, down), kernel(up, down)
    out = bytearray(2 * 1000 * up)
    pos = 0
    for size in [7, 101, 1, 0, 333, 2, 320] * 3:
        chunk = x[2 * pos : 2 * (pos + size)]
        pos += size
        expected = plain.process(chunk)
        assert into.output_size(len(chunk)) == len(expected)
        written = into.process_into(chunk, out)
        assert written == len(expected)
        assert out[:written] == expected


def test_process_into_refuses_a_short_or_overlapping_buffer_and_keeps_its_state() -> None:
    x = noise(16000, 0.04).tobytes()
    fir, reference = kernel(1, 2), kernel(1, 2)
    with pytest.raises(ValueError, match="needed"):
        fir.process_into(x[:640], bytearray(100))
    shared = bytearray(x[:640])
    with pytest.raises(ValueError, match="overlaps"):
        fir.process_into(memoryview(shared)[:640], memoryview(shared)[160:])
    with pytest.raises(ValueError, match="even"):
        fir.process_into(x[:3], bytearray(10))
    # Nothing refused reached the filter.
    assert fir.process(x) == reference.process(x)


def test_reset_forgets_the_stream() -> None:
    x = noise(16000, 0.05).tobytes()
    fir = kernel(1, 3)
    first = fir.process(x[: 1001 * 2])
    fir.reset()
    assert fir.process(x[: 1001 * 2]) == first


def test_the_portable_and_avx2_builds_give_identical_output() -> None:
    x = loud(48000, 0.05)
    try:
        previous = native.select_kernel("avx2")
    except ValueError:
        pytest.skip("this CPU has no AVX2")
    try:
        fast = [feed(Resampler(*rates), x, RAGGED_SIZES) for rates in FIR_RATES[:4]]
        native.select_kernel("portable")
        portable = [feed(Resampler(*rates), x, RAGGED_SIZES) for rates in FIR_RATES[:4]]
    finally:
        native.select_kernel(previous)
    for a, b in zip(fast, portable, strict=True):
        assert np.array_equal(a, b)


def test_the_kernel_refuses_filters_it_cannot_run() -> None:
    taps = fir_taps(1, 2)
    with pytest.raises(ValueError, match="one of them 1"):
        native.PolyphaseFir(taps, up=2, down=2)
    with pytest.raises(ValueError, match="empty"):
        native.PolyphaseFir(np.zeros(0, np.float32), down=2)
    # A gain that could push a sum of int16 samples past where float32 rounds exactly.
    with pytest.raises(ValueError, match="gain"):
        native.PolyphaseFir(np.full(60, 4.0, np.float32), down=2)
    with pytest.raises(ValueError):
        native.select_kernel("fastest")
