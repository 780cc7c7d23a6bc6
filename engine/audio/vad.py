"""Voice activity detection on the engine's 20 ms frames (16 kHz mono int16): per-frame speech
decisions (`EnergyVad`, `WebRtcVad`, one face) and the speech segments built from them
(`SpeechSegmenter`: start debounce, end hangover, sans-IO).

`EnergyVad` judges a frame by how far its energy (dBFS) stands above an adaptive noise floor,
and by its absolute level, so that breathing into a quiet line is not speech:

- the floor follows the frame energy down quickly (40 ms time constant) and up slowly (1 s,
  6 s while speech is declared), so it sits on the troughs between words and climbs with a
  rising background instead of with the talker;
- probability = logistic((margin - 5 dB) / 2 dB) x logistic((level + 55 dBFS) / 3 dB);
- the decision threshold on that probability is 0.3 over a quiet floor (-65 dBFS and below) and
  rises linearly to 0.5 over a noisy one (-35 dBFS and above): a fixed 0.3 lets noise bursts
  through once the background is loud.

The per-sample loop (frame energy) is native (engine._native.vadkern); the rest is a dozen float
operations per frame and allocates nothing. `WebRtcVad` wraps webrtcvad's GMM detector behind the
same face (its probability is 0 or 1). Both keep a few numbers of state per call; nothing is
loaded per call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import webrtcvad

from engine._native.vadkern import frame_energy_dbfs

SAMPLE_RATE = 16000
FRAME_MS = 20.0


class Vad(Protocol):
    """A per-frame speech detector; one instance per call (it keeps state across frames)."""

    #: the decision for the last frame
    speech: bool
    #: the speech probability of the last frame, 0..1
    probability: float

    def process(self, frame: bytes) -> bool:
        """Judges one 20 ms frame; returns (and stores) the speech decision."""
        ...

    def reset(self) -> None:
        """Forgets everything learned (a new call or a new audio path)."""
        ...


@dataclass(frozen=True)
class EnergyVadConfig:
    frame_ms: float = FRAME_MS
    #: time constants of the noise floor: falling, rising, rising while speech is declared
    floor_down_ms: float = 40.0
    floor_up_ms: float = 1000.0
    floor_up_speech_ms: float = 6000.0
    #: at the start of a call the floor follows the level both ways quickly for this long
    warmup_ms: float = 300.0
    #: margin over the floor where the probability is 0.5, and the logistic's scale
    margin_db: float = 5.0
    margin_scale_db: float = 2.0
    #: absolute level where the level gate is 0.5, and its scale
    min_level_dbfs: float = -55.0
    level_scale_db: float = 3.0
    #: the decision threshold over a quiet floor and over a noisy one, with linear steps between
    threshold_quiet: float = 0.3
    threshold_noisy: float = 0.5
    quiet_floor_dbfs: float = -65.0
    noisy_floor_dbfs: float = -35.0


def _alpha(frame_ms: float, tau_ms: float) -> float:
    """The per-frame step of a one-pole follower with time constant `tau_ms`."""
    return 1.0 - math.exp(-frame_ms / tau_ms)


class EnergyVad:
    """Energy over an adaptive noise floor; see the module notes for the rule."""

    __slots__ = ("config", "speech", "probability", "level_dbfs", "noise_floor_dbfs", "threshold",
                 "_frames", "_warmup_frames", "_down", "_up", "_up_speech", "_warm",
                 "_thr_slope")

    def __init__(self, config: EnergyVadConfig | None = None) -> None:
        c = self.config = config or EnergyVadConfig()
        self._down = _alpha(c.frame_ms, c.floor_down_ms)
        self._up = _alpha(c.frame_ms, c.floor_up_ms)
        self._up_speech = _alpha(c.frame_ms, c.floor_up_speech_ms)
        self._warm = _alpha(c.frame_ms, c.floor_down_ms)
        self._warmup_frames = int(c.warmup_ms / c.frame_ms)
        self._thr_slope = (c.threshold_noisy - c.threshold_quiet) / (
            c.noisy_floor_dbfs - c.quiet_floor_dbfs)
        self.reset()

    def reset(self) -> None:
        self.speech = False
        self.probability = 0.0
        self.level_dbfs = -100.0
        self.noise_floor_dbfs = self.config.quiet_floor_dbfs
        self.threshold = self.config.threshold_quiet
        self._frames = 0

    def process(self, frame: bytes) -> bool:
        c = self.config
        level = frame_energy_dbfs(frame)
        floor = self.noise_floor_dbfs
        if self._frames < self._warmup_frames:
            floor = level if self._frames == 0 else floor + (level - floor) * self._warm
            self._frames += 1
        margin = level - floor
        # the exponent is clamped so a frame of digital silence cannot overflow exp()
        x = (c.margin_db - margin) / c.margin_scale_db
        p = 1.0 / (1.0 + math.exp(x if x < 50.0 else 50.0))
        x = (c.min_level_dbfs - level) / c.level_scale_db
        p /= 1.0 + math.exp(x if x < 50.0 else 50.0)
        if margin < 0.0:
            floor += margin * self._down
        else:
            floor += margin * (self._up_speech if self.speech else self._up)
        self.noise_floor_dbfs = floor
        t = c.threshold_quiet + (floor - c.quiet_floor_dbfs) * self._thr_slope
        if t < c.threshold_quiet:
            t = c.threshold_quiet
        elif t > c.threshold_noisy:
            t = c.threshold_noisy
        self.threshold = t
        self.level_dbfs = level
        self.probability = p
        self.speech = p >= t
        return self.speech


class WebRtcVad:
    """webrtcvad's detector behind the `Vad` face; `mode` 0 (lenient) .. 3 (aggressive)."""

    __slots__ = ("mode", "speech", "probability", "_vad")

    def __init__(self, mode: int = 2) -> None:
        self.mode = mode
        self._vad = webrtcvad.Vad(mode)
        self.speech = False
        self.probability = 0.0

    def reset(self) -> None:
        self._vad = webrtcvad.Vad(self.mode)
        self.speech = False
        self.probability = 0.0

    def process(self, frame: bytes) -> bool:
        speech = self._vad.is_speech(frame, SAMPLE_RATE)
        self.speech = speech
        self.probability = 1.0 if speech else 0.0
        return speech


@dataclass(frozen=True, slots=True)
class SpeechStart:
    """Speech has lasted the start debounce."""

    #: stamp of the first speech frame of the run (where the talker began)
    onset_ms: float
    #: stamp of the frame that confirmed it
    at_ms: float


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    """Silence has lasted the hangover."""

    #: stamp of the last speech frame (speech ended one frame after it)
    last_speech_ms: float
    #: stamp of the frame that confirmed it
    at_ms: float


class SpeechSegmenter:
    """Speech segments from per-frame decisions, with times passed in (sans-IO).

    `process(frame, now_ms)` runs the VAD on the frame stamped `now_ms` and returns a
    `SpeechStart` once `start_ms` of speech has accumulated (gaps up to `gap_ms` do not break a
    run), a `SpeechEnd` once `hangover_ms` has passed since the last speech frame, and otherwise
    None. The frame's own decision stays readable as `speech` and `probability`.

    The onset a `SpeechStart` reports is the first frame of the run, moved back over the frames
    just before it whose probability was at least `weak_probability`: a word's soft first sound
    (the /w/ of "what") is often below the decision threshold in noise, yet it is where the
    talker began.
    """

    __slots__ = ("vad", "start_ms", "hangover_ms", "gap_ms", "frame_ms", "weak_probability",
                 "in_speech", "_onset", "_run_ms", "_last_speech", "_weak_since")

    def __init__(self, vad: Vad | None = None, start_ms: float = 150.0, hangover_ms: float = 300.0,
                 gap_ms: float = 100.0, frame_ms: float = FRAME_MS,
                 weak_probability: float = 0.3) -> None:
        self.vad: Vad = vad if vad is not None else EnergyVad()
        self.start_ms = start_ms
        self.hangover_ms = hangover_ms
        self.gap_ms = gap_ms
        self.frame_ms = frame_ms
        self.weak_probability = weak_probability
        self.reset()

    def reset(self) -> None:
        self.in_speech = False
        self._onset: float | None = None  # first frame of the candidate run
        self._run_ms = 0.0  # speech accumulated in the candidate run
        self._last_speech: float | None = None
        self._weak_since: float | None = None  # first frame of the current weak-or-better run

    @property
    def speech(self) -> bool:
        return self.vad.speech

    @property
    def probability(self) -> float:
        return self.vad.probability

    def process(self, frame: bytes, now_ms: float) -> SpeechStart | SpeechEnd | None:
        speech = self.vad.process(frame)
        if self.vad.probability >= self.weak_probability:
            if self._weak_since is None:
                self._weak_since = now_ms
        else:
            self._weak_since = None
        last = self._last_speech
        if self.in_speech:
            if speech:
                self._last_speech = now_ms
                return None
            if last is not None and now_ms - last >= self.hangover_ms:
                self.in_speech = False
                self._onset = None
                self._run_ms = 0.0
                return SpeechEnd(last, now_ms)
            return None
        if speech:
            if self._onset is None or last is None or now_ms - last > self.gap_ms + self.frame_ms:
                weak = self._weak_since
                self._onset = weak if weak is not None else now_ms
                self._run_ms = 0.0
            self._run_ms += self.frame_ms
            self._last_speech = now_ms
            if self._run_ms >= self.start_ms:
                self.in_speech = True
                return SpeechStart(self._onset, now_ms)
        elif self._onset is not None and last is not None and now_ms - last > self.gap_ms:
            self._onset = None
            self._run_ms = 0.0
        return None
