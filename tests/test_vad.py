"""VAD on real speech: onsets in noise at several SNRs, quiet on noise alone, the adaptive
threshold, the segmenter's debounce and hangover, and the native frame energy."""
from __future__ import annotations

import math

import numpy as np
import pytest
from engine._native.vadkern import frame_energy_dbfs

from engine.audio.vad import (
    EnergyVad,
    SpeechEnd,
    SpeechSegmenter,
    SpeechStart,
    Vad,
    WebRtcVad,
)
from tests.speech import (
    DEMO_PHRASES,
    frames,
    mix_at_snr,
    noise,
    silence,
    speech,
    utterance_with_pauses,
)


@pytest.fixture(scope="module")
def demo() -> tuple[bytes, list[float]]:
    return utterance_with_pauses(list(DEMO_PHRASES), pause_ms=1500, lead_ms=1500)


def segment(pcm: bytes, vad: Vad | None = None) -> list[SpeechStart | SpeechEnd]:
    seg = SpeechSegmenter(vad)
    events = []
    for i, frame in enumerate(frames(pcm)):
        event = seg.process(frame, i * 20.0)
        if event is not None:
            events.append(event)
    return events


def onset_errors(events: list[SpeechStart | SpeechEnd], onsets: list[float]) -> list[float | None]:
    """For each true onset, the reported onset's error in ms (None when nothing is near)."""
    starts = [e.onset_ms for e in events if isinstance(e, SpeechStart)]
    errors: list[float | None] = []
    for onset in onsets:
        near = [s - onset for s in starts if abs(s - onset) <= 500]
        errors.append(near[0] if near else None)
    return errors


@pytest.mark.parametrize("color", ["pink", "white"])
@pytest.mark.parametrize("snr_db", [20, 10])
def test_energy_vad_finds_each_onset_within_200ms(demo: tuple[bytes, list[float]], color: str,
                                                  snr_db: float) -> None:
    clean, onsets = demo
    pcm = mix_at_snr(clean, noise(len(clean) / 32000, -40, seed=3, color=color), snr_db)
    events = segment(pcm)
    errors = onset_errors(events, onsets)
    assert all(e is not None and abs(e) <= 200 for e in errors), errors
    starts = [e for e in events if isinstance(e, SpeechStart)]
    assert len(starts) == len(onsets)  # one start per utterance, no extra ones in the pauses


def test_energy_vad_finds_most_onsets_at_5db(demo: tuple[bytes, list[float]]) -> None:
    clean, onsets = demo
    pcm = mix_at_snr(clean, noise(len(clean) / 32000, -40, seed=3, color="pink"), 5)
    errors = onset_errors(segment(pcm), onsets)
    found = [e for e in errors if e is not None]
    assert len(found) >= 3 and all(abs(e) <= 250 for e in found), errors


@pytest.mark.parametrize("color", ["pink", "white"])
@pytest.mark.parametrize(("level_dbfs", "rise_db"),
                         [(-70, 0), (-45, 0), (-25, 0), (-60, 20), (-45, 20)])
def test_energy_vad_stays_quiet_on_noise_alone(color: str, level_dbfs: float,
                                               rise_db: float) -> None:
    events = segment(noise(10.0, level_dbfs, seed=5, color=color, rise_db=rise_db))
    assert not [e for e in events if isinstance(e, SpeechStart)]


def test_threshold_rises_with_the_noise_floor() -> None:
    quiet, noisy = EnergyVad(), EnergyVad()
    for frame in frames(noise(2.0, -70, seed=1)):
        quiet.process(frame)
    for frame in frames(noise(2.0, -30, seed=1)):
        noisy.process(frame)
    assert quiet.threshold == pytest.approx(0.3)
    assert noisy.threshold > 0.45
    assert noisy.noise_floor_dbfs > quiet.noise_floor_dbfs + 30


def test_noise_floor_follows_a_drop_quickly_and_a_rise_slowly() -> None:
    vad = EnergyVad()
    for frame in frames(noise(2.0, -30, seed=2)):
        vad.process(frame)
    for frame in frames(noise(0.2, -60, seed=2)):
        vad.process(frame)
    assert vad.noise_floor_dbfs < -55  # 200 ms after the drop
    for frame in frames(noise(0.2, -30, seed=3)):
        vad.process(frame)
    assert vad.noise_floor_dbfs < -50  # 200 ms after the rise it has barely moved


def test_quiet_breathing_level_sound_is_not_speech() -> None:
    # a -60 dBFS burst over a -80 dBFS line stands 20 dB above the floor but is too faint to be
    # a talker: the absolute-level gate keeps it out
    pcm = noise(1.0, -80, seed=4) + noise(0.4, -60, seed=5, color="white") + noise(1.0, -80, seed=6)
    assert not [e for e in segment(pcm) if isinstance(e, SpeechStart)]


def test_segmenter_debounces_start_and_reports_the_first_speech_frame() -> None:
    pcm = silence(500) + speech("I would like to book an appointment") + silence(1000)
    pcm = mix_at_snr(pcm, noise(1.0, -60, seed=7), 30)
    events = segment(pcm)
    start = events[0]
    assert isinstance(start, SpeechStart)
    assert start.at_ms - start.onset_ms >= 150 - 20
    assert abs(start.onset_ms - 500) <= 120
    end = events[-1]
    assert isinstance(end, SpeechEnd)
    assert end.at_ms - end.last_speech_ms >= 300
    assert len([e for e in events if isinstance(e, SpeechStart)]) == 1


def test_segmenter_ignores_a_click_shorter_than_the_debounce() -> None:
    click = mix_at_snr(speech("hello")[:1600 * 2], noise(1.0, -60, seed=8), 30)  # 100 ms
    pcm = mix_at_snr(silence(1000), noise(1.0, -60, seed=8), 0) + click + noise(1.0, -60, seed=9)
    assert segment(pcm) == []


def test_webrtc_vad_behind_the_same_face_finds_clean_speech(
        demo: tuple[bytes, list[float]]) -> None:
    clean, onsets = demo
    pcm = mix_at_snr(clean, noise(len(clean) / 32000, -40, seed=3, color="white"), 20)
    errors = onset_errors(segment(pcm, WebRtcVad(2)), onsets)
    assert all(e is not None and abs(e) <= 200 for e in errors), errors
    vad = WebRtcVad()
    assert vad.process(frames(pcm)[0]) in (True, False)
    assert vad.probability in (0.0, 1.0)


def test_frame_energy_matches_the_definition() -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(0, 3000, 320).astype("<i2")
    expected = 10 * math.log10(float(np.mean(samples.astype(np.float64) ** 2)) / 32768**2)
    assert frame_energy_dbfs(samples.tobytes()) == pytest.approx(expected, abs=1e-9)
    assert frame_energy_dbfs(bytearray(samples.tobytes())) == pytest.approx(expected, abs=1e-9)
    assert frame_energy_dbfs(bytes(640)) == -100.0
    assert frame_energy_dbfs(b"") == -100.0
    full = np.full(320, -32768, dtype="<i2").tobytes()
    assert frame_energy_dbfs(full) == pytest.approx(0.0, abs=1e-9)
