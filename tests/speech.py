"""Real-speech fixtures for tests and benchmarks: eSpeak NG speech, noise, mixes at a given SNR,
phone-path conversions, and where the speech onsets are.

All audio is 16 kHz mono int16 little-endian bytes unless a name says otherwise.
"""
from __future__ import annotations

import functools
import math
import warnings
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soxr

from engine.speech.tts import synthesize

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # a reference codec for the phone path; fine in test code

RATE = 16000
FRAME_BYTES = 640  # 20 ms at 16 kHz
FULL_SCALE = 32768.0

#: the help-desk demo's caller phrases
DEMO_PHRASES = (
    "what are your opening hours",
    "how much does it cost",
    "I would like to book an appointment",
    "goodbye",
)


@functools.lru_cache(maxsize=256)
def speech(text: str, voice: str = "en-us", rate_wpm: int = 175) -> bytes:
    """`text` spoken by eSpeak NG (cached per text, voice and rate for the process)."""
    return synthesize(text, voice=voice, rate_wpm=rate_wpm)


def silence(ms: float) -> bytes:
    return bytes(2 * int(RATE * ms / 1000))


def noise(duration_s: float, level_dbfs: float, seed: int = 0, color: str = "pink",
          rise_db: float = 0.0) -> bytes:
    """Noise at an RMS of `level_dbfs`; with `rise_db` the level climbs linearly (in dB) by that
    much over the duration, ending `rise_db` above where it started."""
    n = int(duration_s * RATE)
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(n)
    if color == "pink":
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n, 1 / RATE)
        spectrum /= np.sqrt(np.maximum(freqs, 20.0))  # 1/f power, flat below 20 Hz
        shaped = np.fft.irfft(spectrum, n)
    elif color == "white":
        shaped = white
    else:
        raise ValueError(f"unknown noise color {color!r}")
    shaped /= math.sqrt(float(np.mean(shaped**2)))
    gain_db = level_dbfs + np.linspace(0.0, rise_db, n) if rise_db else np.full(n, level_dbfs)
    samples = shaped * FULL_SCALE * 10 ** (gain_db / 20)
    return _to_pcm(samples)


def active_power(pcm: bytes, below_peak_db: float = 30.0) -> float:
    """Mean power of the 20 ms frames within `below_peak_db` of the loudest one (active speech)."""
    x = _samples(pcm)
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    power = np.mean(frames**2, axis=1)
    active = power[power >= power.max() * 10 ** (-below_peak_db / 10)]
    return float(np.mean(active))


def mix_at_snr(speech_pcm: bytes, noise_pcm: bytes, snr_db: float) -> bytes:
    """Speech plus noise scaled so that active speech power over mean noise power is `snr_db`.

    The noise is looped or cut to the speech's length; its own level shape (a rise) is kept.
    """
    s = _samples(speech_pcm)
    nz = _samples(noise_pcm)
    if len(nz) == 0:
        raise ValueError("empty noise")
    nz = np.resize(nz, len(s))
    gain = math.sqrt(active_power(speech_pcm) / (float(np.mean(nz**2)) * 10 ** (snr_db / 10)))
    return _to_pcm(s + gain * nz)


def speech_onset_ms(pcm: bytes, threshold_dbfs: float = -45.0) -> float:
    """Where speech starts in a clean signal: the first 5 ms window above `threshold_dbfs`."""
    x = _samples(pcm)
    win = 80
    windows = x[: len(x) // win * win].reshape(-1, win)
    level = 10 * np.log10(np.mean(windows**2, axis=1) / FULL_SCALE**2 + 1e-12)
    loud = np.flatnonzero(level > threshold_dbfs)
    if len(loud) == 0:
        raise ValueError("no speech in the signal")
    return float(loud[0] * win * 1000 / RATE)


def utterance_with_pauses(texts: Sequence[str], pause_ms: float = 1500.0, lead_ms: float = 1000.0,
                          voice: str = "en-us", rate_wpm: int = 175) -> tuple[bytes, list[float]]:
    """`texts` spoken one after another with silences between; returns the PCM and each
    utterance's speech onset in ms from the start."""
    parts = [silence(lead_ms)]
    onsets: list[float] = []
    at_ms = lead_ms
    for text in texts:
        clip = speech(text, voice, rate_wpm)
        onsets.append(at_ms + speech_onset_ms(clip))
        parts += [clip, silence(pause_ms)]
        at_ms += len(clip) * 1000 / (2 * RATE) + pause_ms
    return b"".join(parts), onsets


def frames(pcm: bytes, frame_bytes: int = FRAME_BYTES) -> list[bytes]:
    """`pcm` as whole 20 ms frames (a short tail is dropped)."""
    return [pcm[i:i + frame_bytes] for i in range(0, len(pcm) - frame_bytes + 1, frame_bytes)]


def write_wav(path: str | Path, pcm: bytes, rate: int = RATE) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


def to_8k_mulaw(pcm16k: bytes) -> bytes:
    """16 kHz int16 PCM as 8 kHz G.711 mu-law, as a phone line carries it."""
    pcm8k = soxr.resample(np.frombuffer(pcm16k, dtype=np.int16), RATE, 8000)
    return audioop.lin2ulaw(np.asarray(pcm8k, dtype=np.int16).tobytes(), 2)


def _samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype=np.int16).astype(np.float64)


def _to_pcm(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()
