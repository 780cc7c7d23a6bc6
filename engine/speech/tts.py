"""Speech synthesis with eSpeak NG: the one eSpeak instance of the process and its worker thread.

eSpeak NG comes from the `espeakng-loader` wheel (its shared library and data; no system package)
and is driven through ctypes on the C API of `speak_lib.h` in AUDIO_OUTPUT_SYNCHRONOUS mode:
`espeak_Synth` returns when the text is spoken, and the synth callback hands over audio on the
calling thread as it is produced (about every 60 ms of audio; eSpeak ignores shorter buffers).

eSpeak keeps global state (the voice, the rate, the callback) and is not thread-safe, so all
synthesis runs on ONE worker thread owned by the process-wide `Synthesizer`. ctypes releases the GIL
around `espeak_Synth`, so the event loop keeps running while eSpeak works.

Scheduling: an utterance is split into sentences and the worker takes one sentence at a time from
a FIFO. After a sentence it puts the utterance back at the end of the FIFO, so concurrent streams
are served in turn, sentence by sentence: a new utterance waits for at most one sentence of each
utterance ahead of it, not for whole replies (eSpeak runs a few hundred times faster than real
time, so a sentence takes a millisecond or two).

Audio leaves at 16 kHz mono int16: each utterance has its own soxr stream resampler (eSpeak speaks
at 22050 Hz), so the chunks of one utterance join without clicks at chunk and sentence boundaries.
"""
from __future__ import annotations

import asyncio
import atexit
import ctypes
import re
import threading
from collections import deque
from collections.abc import Callable
from typing import Final

import numpy as np
import soxr

from engine.log import get_logger

log = get_logger("tts")

OUTPUT_RATE: Final = 16000
DEFAULT_VOICE: Final = "en-us"
DEFAULT_RATE_WPM: Final = 175

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS: Final = 2
_POS_CHARACTER: Final = 1
_CHARS_UTF8: Final = 1
_ENDPAUSE: Final = 0x1000
_RATE: Final = 1
_PITCH: Final = 3
_EE_OK: Final = 0
_RATE_MIN, _RATE_MAX = 80, 450
#: buflength for espeak_Initialize; eSpeak rounds it up to its own 60 ms minimum
_BUFFER_MS: Final = 20

#: audio of one utterance gathered before it is handed on; the first buffer leaves at once so the
#: first sound is not delayed, later ones are batched to keep thread hand-offs few
_FLUSH_MS: Final = 100

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")

_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

#: what a sink receives: a chunk of 16 kHz PCM, None at the end, or the error that stopped it
Item = bytes | BaseException | None
#: takes an item on the worker thread; returns False when nobody will read any more
Sink = Callable[[Item], bool]


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, the unit of fair sharing between utterances."""
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


class _Utterance:
    """One text being spoken: its settings, the sentences still to do, and where audio goes."""

    __slots__ = ("voice", "rate_wpm", "pitch", "sentences", "sink", "cancelled", "resampler",
                 "pending", "flush_bytes", "sent_first")

    def __init__(self, text: str, voice: str, rate_wpm: int, pitch: int | None,
                 sink: Sink, espeak_rate: int) -> None:
        self.voice = voice
        self.rate_wpm = rate_wpm
        self.pitch = pitch
        self.sentences = deque(split_sentences(text))
        self.sink = sink
        self.cancelled = False
        self.resampler = soxr.ResampleStream(espeak_rate, OUTPUT_RATE, 1, dtype="int16",
                                             quality="HQ")
        self.pending = bytearray()  # eSpeak-rate audio not yet resampled
        self.flush_bytes = espeak_rate * 2 * _FLUSH_MS // 1000
        self.sent_first = False

    def take(self, wav: bytes) -> None:
        self.pending += wav
        if not self.sent_first or len(self.pending) >= self.flush_bytes:
            self.flush(last=False)

    def flush(self, last: bool) -> None:
        samples = np.frombuffer(self.pending, dtype=np.int16)
        out = self.resampler.resample_chunk(samples, last=last)
        del samples  # releases the view so the buffer can be cleared
        self.pending.clear()
        if len(out):
            self.sent_first = True
            self.emit(out.tobytes())

    def emit(self, item: Item) -> None:
        if not self.sink(item):
            self.cancelled = True


class Synthesizer:
    """The process's eSpeak NG: one worker thread, a FIFO of sentences, per-utterance resamplers."""

    _shared: Synthesizer | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._jobs: deque[_Utterance] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._lib: ctypes.CDLL | None = None
        self._espeak_rate = 0
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        self._current: _Utterance | None = None
        self._settings: tuple[str, int, int | None] | None = None
        self._default_pitch = 50
        # ctypes must keep the callback object alive for as long as eSpeak may call it
        self._callback = _Callback(self._on_audio)
        self._thread = threading.Thread(target=self._run, name="espeak", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> Synthesizer:
        """The process-wide synthesizer, started on first use."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
                atexit.register(cls._close_shared)
            return cls._shared

    @property
    def espeak_rate(self) -> int:
        """eSpeak's native sample rate (22050 Hz for the bundled voices)."""
        self._wait_ready()
        return self._espeak_rate

    # -- public API ----------------------------------------------------------------------------

    def synthesize(self, text: str, voice: str = DEFAULT_VOICE, rate_wpm: int = DEFAULT_RATE_WPM,
                   pitch: int | None = None) -> bytes:
        """The whole utterance as 16 kHz mono int16 PCM; blocks (for tests and tools)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("synthesize() called on the eSpeak worker thread")
        chunks: list[bytes] = []
        done = threading.Event()
        failure: list[BaseException] = []

        def sink(item: Item) -> bool:
            if isinstance(item, bytes):
                chunks.append(item)
                return True
            if item is not None:
                failure.append(item)
            done.set()
            return True

        self.submit(text, voice, rate_wpm, pitch, sink)
        done.wait()
        if failure:
            raise failure[0]
        return b"".join(chunks)

    def stream(self, text: str, voice: str = DEFAULT_VOICE, rate_wpm: int = DEFAULT_RATE_WPM,
               pitch: int | None = None) -> SpeechStream:
        """An async iterator of 16 kHz PCM chunks as eSpeak produces them.

        Call it with the event loop running: synthesis starts at once, so the first chunk is
        usually waiting by the time the reader asks for it. Cancelling the task that iterates,
        `cancel()`, `aclose()` or dropping the stream stops synthesis of the rest within one eSpeak
        buffer.
        """
        return SpeechStream(self, text, voice, rate_wpm, pitch)

    def close(self) -> None:
        """Stops the worker: queued utterances fail, the one being spoken stops at its next
        buffer."""
        with self._cond:
            self._closed = True
            dropped = list(self._jobs)
            self._jobs.clear()
            current = self._current
            self._cond.notify()
        if current is not None:
            current.cancelled = True
        for utt in dropped:
            utt.cancelled = True
            utt.emit(RuntimeError("the synthesizer is closed"))
        self._thread.join(timeout=5.0)

    @classmethod
    def _close_shared(cls) -> None:
        # joined before the interpreter tears down, so a daemon worker is never frozen mid-job
        if cls._shared is not None:
            cls._shared.close()

    # -- worker side ---------------------------------------------------------------------------

    def submit(self, text: str, voice: str, rate_wpm: int, pitch: int | None,
               sink: Sink) -> _Utterance:
        """Queues `text`; `sink` gets each 16 kHz chunk, then None (or the error), on the worker
        thread, and returns False to stop synthesis; setting `cancelled` on the returned handle
        stops it too. The low-level face under `stream`."""
        if not _RATE_MIN <= rate_wpm <= _RATE_MAX:
            raise ValueError(f"rate_wpm must be within {_RATE_MIN}..{_RATE_MAX}, got {rate_wpm}")
        if pitch is not None and not 0 <= pitch <= 100:
            raise ValueError(f"pitch must be within 0..100, got {pitch}")
        self._wait_ready()
        utt = _Utterance(text, voice, rate_wpm, pitch, sink, self._espeak_rate)
        if not utt.sentences:
            sink(None)
            return utt
        with self._cond:
            if self._closed:
                raise RuntimeError("the synthesizer is closed")
            self._jobs.append(utt)
            self._cond.notify()
        return utt

    def _wait_ready(self) -> None:
        self._ready.wait()
        if self._init_error is not None:
            raise RuntimeError("eSpeak NG failed to start") from self._init_error

    def _run(self) -> None:
        try:
            self._start_espeak()
        except BaseException as exc:  # noqa: BLE001 - reported to every caller instead
            self._init_error = exc
            log.error("tts.init_failed", error=repr(exc))
            return
        finally:
            self._ready.set()
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                utt = self._jobs.popleft()
            if self._speak_one_sentence(utt):
                with self._cond:
                    self._jobs.append(utt)
            # an idle worker must not keep the last utterance (and its resampler) alive
            del utt

    def _start_espeak(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_Callback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_GetParameter.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.espeak_GetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS,
                                     espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize returned {rate}")
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib
        self._espeak_rate = rate
        self._default_pitch = lib.espeak_GetParameter(_PITCH, 0)
        log.info("tts.ready", sample_rate=rate)

    def _apply_settings(self, utt: _Utterance) -> None:
        """Voice, rate and pitch are eSpeak globals: set them only when they change."""
        wanted = (utt.voice, utt.rate_wpm, utt.pitch)
        if wanted == self._settings:
            return
        assert self._lib is not None
        self._settings = None
        if self._lib.espeak_SetVoiceByName(utt.voice.encode()) != _EE_OK:
            raise ValueError(f"unknown eSpeak voice {utt.voice!r}")
        # a voice change may reset the prosody, so both are always set after it
        self._lib.espeak_SetParameter(_RATE, utt.rate_wpm, 0)
        pitch = self._default_pitch if utt.pitch is None else utt.pitch
        self._lib.espeak_SetParameter(_PITCH, pitch, 0)
        self._settings = wanted

    def _speak_one_sentence(self, utt: _Utterance) -> bool:
        """Speaks the utterance's next sentence; True when it has more to speak."""
        assert self._lib is not None
        try:
            if utt.cancelled:
                return False
            self._apply_settings(utt)
            sentence = utt.sentences.popleft()
            more = bool(utt.sentences)
            data = sentence.encode()
            self._current = utt
            try:
                # ENDPAUSE keeps the natural pause between sentences; the last one ends at once
                flags = _CHARS_UTF8 | (_ENDPAUSE if more else 0)
                status = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, flags,
                                                None, None)
            finally:
                self._current = None
            if status != _EE_OK:
                raise RuntimeError(f"espeak_Synth returned {status}")
            if utt.cancelled:
                return False
            if more:
                utt.flush(last=False)
                return True
            utt.flush(last=True)
            utt.emit(None)
            return False
        except Exception as exc:  # noqa: BLE001 - the caller of this utterance gets it
            utt.cancelled = True
            utt.emit(exc)
            return False

    def _on_audio(self, wav: ctypes._Pointer[ctypes.c_short], count: int, events: int) -> int:
        """eSpeak's synth callback, on the worker thread: 0 goes on, 1 aborts this text."""
        utt = self._current
        if utt is None or utt.cancelled:
            return 1
        if wav and count > 0:
            try:
                utt.take(ctypes.string_at(wav, count * 2))
            except Exception as exc:  # noqa: BLE001 - an exception must not cross into C
                utt.cancelled = True
                utt.emit(exc)
                return 1
        return 0


class SpeechStream:
    """The chunks of one utterance, delivered to the event loop; see `Synthesizer.stream`."""

    def __init__(self, synth: Synthesizer, text: str, voice: str, rate_wpm: int,
                 pitch: int | None) -> None:
        self._synth = synth
        self._args = (text, voice, rate_wpm, pitch)
        self._utt: _Utterance | None = None
        self._queue: asyncio.Queue[Item] | None = None
        self._done = False
        self._start()

    def __aiter__(self) -> SpeechStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        assert self._queue is not None
        try:
            item = await self._queue.get()
        except BaseException:
            self.cancel()
            raise
        if isinstance(item, bytes) and not self._done:
            return item
        self._done = True
        if isinstance(item, BaseException):
            raise item
        raise StopAsyncIteration

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._queue = queue

        # the sink must not refer back to this stream: the utterance holds the sink, and a cycle
        # would keep the resampler alive after the reader has gone
        def sink(item: Item) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody will read the rest
                return False
            return True

        text, voice, rate_wpm, pitch = self._args
        self._utt = self._synth.submit(text, voice, rate_wpm, pitch, sink)

    def cancel(self) -> None:
        """Stops synthesis of the rest; the iteration ends."""
        self._done = True
        if self._utt is not None:
            self._utt.cancelled = True
        if self._queue is not None:
            self._queue.put_nowait(None)  # wakes a reader waiting for the next chunk

    async def aclose(self) -> None:
        self.cancel()

    def __del__(self) -> None:
        utt = getattr(self, "_utt", None)
        if utt is not None:
            utt.cancelled = True


def synthesize(text: str, voice: str = DEFAULT_VOICE, rate_wpm: int = DEFAULT_RATE_WPM,
               pitch: int | None = None) -> bytes:
    """The whole utterance from the shared synthesizer, as 16 kHz mono int16 PCM (blocking)."""
    return Synthesizer.shared().synthesize(text, voice, rate_wpm, pitch)


def stream(text: str, voice: str = DEFAULT_VOICE, rate_wpm: int = DEFAULT_RATE_WPM,
           pitch: int | None = None) -> SpeechStream:
    """Chunks of 16 kHz PCM from the shared synthesizer as they are produced (`async for`);
    call it with the event loop running."""
    return Synthesizer.shared().stream(text, voice, rate_wpm, pitch)
