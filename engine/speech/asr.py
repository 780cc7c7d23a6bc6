"""Streaming speech recognition with pocketsphinx 5: the process's decoder pool and the per-call
`Recognizer`.

Decoders are expensive to make and hold, so they live in one process-wide, bounded `DecoderPool`
and are lent to a call for one utterance at a time. Two kinds of model (`LanguageModel`):

- `LanguageModel.general()`: the English n-gram model and the full CMU dictionary that ship in the
  pocketsphinx wheel. It accepts anything but is slow to load (0.3 s on an idle core, more under
  load), large (~90 MB private memory a decoder), runs at ~0.3-0.7x real time, and on eSpeak's
  voice gets ~73 % of the demo phrases' words right.
- `LanguageModel.from_phrases(phrases)`: a small trigram model built from what the assistant
  expects to hear, with a dictionary of just those words. It loads in 15-60 ms, takes ~4 MB a
  decoder, decodes ~8x faster, and gets ~96 % of the words right; speech outside the domain
  comes out as in-domain words. (Passing the full dictionary with a small model is a trap:
  pocketsphinx then takes ~8 s to build the search.)

pocketsphinx holds the GIL while it decodes, so a worker thread does not give the event loop more
CPU; what it does give is short stalls: audio goes to the decoder in 20 ms pieces, so the loop
waits at most one piece's decoding (~0.3 ms with a phrase model on an idle core) before it runs
again. Frames are batched so there is one thread hop per partial interval (200 ms of audio), not
one per frame.

Phrase-model decoders run with `PHRASE_DECODER_OPTIONS`: acoustic scores every second frame
(`ds=2`), 3 instead of 4 Gaussians per codebook (`topn=3`), no phone-loop lookahead
(`pl_window=0`: with ~50 words the tree search is already small, and the lookahead scores every
CI phone each frame), and a heavier language weight (`lw=12`, up from 6.5), which wins back the
words frame skipping loses: the model only knows the domain's phrases, so trusting it costs
little. CPU per second of audio (RTF; x20 = ms per 20 ms frame) and word accuracy (1 - WER),
45 utterances = 15 phrases x 3 eSpeak voices (en-us 175 wpm, en 150, en-us+f3 200) with 300 ms
of lead/tail silence at a -60 dB noise floor, streamed in 20 ms pieces through one reused
decoder; "phone" = the same audio through 8 kHz mu-law and the FIR back to 16 kHz. Idle 2-core
AMD EPYC VM:

    options                                   wideband RTF   acc     phone RTF   acc
    before (defaults, fwdflat off)            0.0324        96.2 %   0.0337     80.1 %
      warm CMN (3rd pass over the set)        0.0318        97.4 %   0.0326     86.5 %
    after (ds=2 topn=3 pl_window=0 lw=12)     0.0142        96.2 %   0.0152     80.1 %
      warm CMN (3rd pass over the set)        0.0149        96.8 %   0.0157     89.7 %

That is ~2.2x less CPU a frame. Accuracy moves between runs of the same setting (the chosen
one scored 96.2-96.8 % wideband, 80.1-84.0 % phone), so a point's difference is noise. Beyond
it, accuracy goes first: the front end alone (MFCC, measured with `ds=50`) costs 0.0055, so 3x
would leave ~0.005 for scoring and search; `topn=2` drops phone audio to 77 %, `ds=3` wideband
to 89 %, `topn=1` or tighter `beam`s lose 4-30 points; `maxhmmpf`/`maxwpf` change nothing (the
search is tiny). The `fwdflat` second pass buys ~2 points for +50 % CPU.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pocketsphinx

from engine.log import get_logger

log = get_logger("asr")

SAMPLE_RATE: Final = 16000
_BYTES_PER_MS: Final = SAMPLE_RATE * 2 // 1000
#: audio handed to pocketsphinx per call: how long the event loop may wait for the GIL
_PIECE_BYTES: Final = 20 * _BYTES_PER_MS
_WORD = re.compile(r"[a-z']+")
#: decoders the shared pool may hold, over all models (ASR_DECODERS in the environment): one per
#: caller speaking at once. A phrase-model decoder takes ~4 MB, so this bounds memory to ~250 MB;
#: a caller who finds the pool empty waits for a decoder, and their turn is answered late.
DEFAULT_POOL_SIZE: Final = 64
#: pocketsphinx options for phrase-model decoders (measured in the module docstring)
PHRASE_DECODER_OPTIONS: Final[dict[str, int | float]] = {
    "ds": 2, "topn": 3, "pl_window": 0, "lw": 12.0,
}


def _normalize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class LanguageModel:
    """What a decoder listens for; decoders are pooled per model `key`."""

    key: str
    #: ARPA text of the n-gram model; None for the general model shipped with pocketsphinx
    arpa: str | None = None
    #: pronunciation dictionary lines for the model's words; None with the general model
    dictionary: str | None = None
    #: words of the phrases that the dictionary lacks (they cannot be recognized)
    unknown_words: tuple[str, ...] = ()
    #: pocketsphinx's second (flat-lexicon) pass at the end of an utterance: about 2 points of
    #: word accuracy for a phrase model (7 for the general one), but `end()` then holds the GIL
    #: for ~50 ms (~90-200 ms general) instead of ~3 ms, stalling every call of the process
    second_pass: bool = False

    @classmethod
    def general(cls, second_pass: bool = False) -> LanguageModel:
        return cls(key=f"general{'+flat' if second_pass else ''}", second_pass=second_pass)

    @classmethod
    def from_phrases(cls, phrases: Iterable[str], second_pass: bool = False) -> LanguageModel:
        """A trigram model of `phrases` (one sentence each) with a dictionary of their words."""
        from pocketsphinx.lm import ArpaBoLM

        sentences = [words for words in (_normalize(p) for p in phrases) if words]
        vocabulary = sorted({w for words in sentences for w in words})
        pronunciations = _lookup_pronunciations(vocabulary)
        unknown = tuple(w for w in vocabulary if w not in pronunciations)
        if unknown:
            log.warning("asr.unknown_words", words=list(unknown))
        sentences = [[w for w in words if w in pronunciations] for words in sentences]
        corpus = "\n".join(" ".join(words) for words in sentences if words)
        if not corpus:
            raise ValueError("no phrase has a word the pronunciation dictionary knows")
        lm = ArpaBoLM(text=corpus, add_start=True, discount_mass=0.5)
        lm.compute()
        arpa = _arpa_text(lm)
        dictionary = "".join(line for w in sorted(pronunciations) for line in pronunciations[w])
        key = "phrases:" + hashlib.sha1(corpus.encode()).hexdigest()[:16]
        if second_pass:
            key += "+flat"
        return cls(key=key, arpa=arpa, dictionary=dictionary, unknown_words=unknown,
                   second_pass=second_pass)

    def make_decoder(self) -> pocketsphinx.Decoder:
        """A new decoder for this model (blocking: 15 ms for phrases, 0.3 s for the general one)."""
        if self.arpa is None or self.dictionary is None:
            return pocketsphinx.Decoder(samprate=SAMPLE_RATE, loglevel="FATAL",
                                        fwdflat=self.second_pass)
        # pocketsphinx reads models only from files; both are parsed into memory at once
        with tempfile.TemporaryDirectory(prefix="asr-") as tmp:
            lm_path, dict_path = Path(tmp, "model.arpa"), Path(tmp, "model.dict")
            lm_path.write_text(self.arpa)
            dict_path.write_text(self.dictionary)
            return pocketsphinx.Decoder(samprate=SAMPLE_RATE, loglevel="FATAL",
                                        fwdflat=self.second_pass, lm=str(lm_path),
                                        dict=str(dict_path), **PHRASE_DECODER_OPTIONS)


def _arpa_text(lm: object) -> str:
    import io

    out = io.StringIO()
    lm.write(out)  # type: ignore[attr-defined]
    return out.getvalue()


def _lookup_pronunciations(words: list[str]) -> dict[str, list[str]]:
    """Dictionary lines (all variants) for `words` from the CMU dictionary in the wheel."""
    wanted = set(words)
    found: dict[str, list[str]] = {}
    path = pocketsphinx.get_model_path("en-us/cmudict-en-us.dict")
    with open(path, encoding="utf-8") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            word = head.split("(", 1)[0]
            if word in wanted:
                found.setdefault(word, []).append(line if line.endswith("\n") else line + "\n")
    return found


class DecoderPool:
    """A bounded, lazily filled pool of decoders shared by every call of the process.

    `acquire` hands out an idle decoder of the wanted model, or makes one while the pool holds
    fewer than `max_decoders`, or replaces an idle decoder of another model; otherwise it waits
    for a release. Safe to use from several event loops (waiters are per-loop futures).
    """

    def __init__(self, max_decoders: int = DEFAULT_POOL_SIZE,
                 executor: ThreadPoolExecutor | None = None) -> None:
        if max_decoders < 1:
            raise ValueError("max_decoders must be at least 1")
        self.max_decoders = max_decoders
        self._executor = executor
        self._lock = threading.Lock()
        self._idle: dict[str, list[pocketsphinx.Decoder]] = {}
        self._count = 0  # decoders that exist or are being made
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self.created = 0

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = _shared_executor()
        return self._executor

    @property
    def size(self) -> int:
        """Decoders held (busy, idle, or being made)."""
        return self._count

    def idle(self, model: LanguageModel) -> int:
        with self._lock:
            return len(self._idle.get(model.key, ()))

    async def acquire(self, model: LanguageModel) -> pocketsphinx.Decoder:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                idle = self._idle.get(model.key)
                if idle:
                    return idle.pop()
                make = self._count < self.max_decoders
                if not make:
                    make = self._evict_one_locked()
                if make:
                    self._count += 1
                else:
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._waiters.append((loop, waiter))
            if make:
                try:
                    decoder = await loop.run_in_executor(self.executor, model.make_decoder)
                except BaseException:
                    self._forget_one()
                    raise
                self.created += 1
                log.info("asr.decoder_created", model=model.key, pool=self._count)
                return decoder
            await waiter

    def release(self, model: LanguageModel, decoder: pocketsphinx.Decoder) -> None:
        """Returns a decoder that is out of any utterance."""
        with self._lock:
            self._idle.setdefault(model.key, []).append(decoder)
        self._wake_one()

    def discard(self) -> None:
        """Forgets a decoder that is lost (its utterance failed); frees its place in the pool."""
        self._forget_one()

    def prewarm(self, model: LanguageModel, count: int = 1) -> None:
        """Makes decoders now (blocking), so the first calls do not pay the load time."""
        for _ in range(count):
            with self._lock:
                if self._count >= self.max_decoders:
                    return
                self._count += 1
            try:
                decoder = model.make_decoder()
            except BaseException:
                self._forget_one()
                raise
            self.created += 1
            self.release(model, decoder)

    def _evict_one_locked(self) -> bool:
        for decoders in self._idle.values():
            if decoders:
                decoders.pop()
                self._count -= 1
                return True
        return False

    def _forget_one(self) -> None:
        with self._lock:
            self._count -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while True:
            with self._lock:
                if not self._waiters:
                    return
                loop, waiter = self._waiters.popleft()
            if loop.is_closed():
                continue
            # a woken waiter loops back and competes again; a cancelled one passes the turn on
            loop.call_soon_threadsafe(self._resolve, waiter)
            return

    def _resolve(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            self._wake_one()
        else:
            waiter.set_result(None)


_executor: ThreadPoolExecutor | None = None
_pool: DecoderPool | None = None
_globals_lock = threading.Lock()


def _shared_executor() -> ThreadPoolExecutor:
    global _executor
    with _globals_lock:
        if _executor is None:
            # pocketsphinx holds the GIL, so more threads than cores buy nothing
            _executor = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                           thread_name_prefix="asr")
        return _executor


def shared_pool() -> DecoderPool:
    """The process-wide pool; its size comes from ASR_DECODERS (default 64)."""
    global _pool
    with _globals_lock:
        if _pool is None:
            _pool = DecoderPool(int(os.environ.get("ASR_DECODERS") or DEFAULT_POOL_SIZE))
        return _pool


def _decode(decoder: pocketsphinx.Decoder, audio: bytes, final: bool) -> str:
    """Runs on an executor thread: feeds `audio` in short pieces, returns the hypothesis."""
    for start in range(0, len(audio), _PIECE_BYTES):
        decoder.process_raw(audio[start:start + _PIECE_BYTES])
    if final:
        decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


def _abandon(decoder: pocketsphinx.Decoder) -> None:
    decoder.end_utt()


class Recognizer:
    """One utterance of one call, streamed through a pooled decoder.

        rec = Recognizer(model)
        await rec.begin()                 # borrows a decoder (may wait for a free one)
        for frame in frames:
            partial = rec.feed(frame)     # never blocks; a new partial or None
        text = await rec.end()            # final text; the decoder goes back to the pool

    `feed` is synchronous so the per-frame path costs no coroutine and no thread hop: it buffers,
    and every `partial_interval_ms` of audio hands the batch to a worker thread. The partial that
    batch produces is returned by a later `feed`, once, when it differs from the last one returned.
    If decoding falls behind by more than `max_backlog_ms`, the oldest unsent audio is dropped and
    counted in `dropped_ms`.
    """

    def __init__(self, model: LanguageModel | None = None, *, pool: DecoderPool | None = None,
                 partial_interval_ms: int = 200, max_backlog_ms: int = 5000) -> None:
        self.model = model if model is not None else LanguageModel.general()
        self.pool = pool if pool is not None else shared_pool()
        self._batch_bytes = max(1, partial_interval_ms) * _BYTES_PER_MS
        self._max_backlog = max_backlog_ms * _BYTES_PER_MS
        self._decoder: pocketsphinx.Decoder | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = bytearray()
        self._inflight: asyncio.Future[str] | None = None
        self._error: BaseException | None = None
        self._partial = ""
        self._reported = ""
        self._closed = False
        self.dropped_ms = 0
        self.audio_ms = 0

    @property
    def active(self) -> bool:
        return self._decoder is not None and not self._closed

    async def begin(self) -> None:
        if self._decoder is not None or self._closed:
            raise RuntimeError("a Recognizer serves one utterance")
        self._loop = asyncio.get_running_loop()
        decoder = await self.pool.acquire(self.model)
        if self._closed:  # cancelled while waiting for a decoder
            self.pool.release(self.model, decoder)
            return
        decoder.start_utt()
        self._decoder = decoder

    def feed(self, frame: bytes) -> str | None:
        """Buffers 16 kHz mono int16 audio; returns a new partial hypothesis when there is one."""
        if self._error is not None:
            raise self._error
        if self._decoder is None or self._closed:
            raise RuntimeError("feed() outside begin()..end()")
        self._pending += frame
        self.audio_ms += len(frame) // _BYTES_PER_MS
        if len(self._pending) > self._max_backlog:
            excess = len(self._pending) - self._max_backlog
            excess -= excess % 2
            del self._pending[:excess]
            self.dropped_ms += excess // _BYTES_PER_MS
        if self._inflight is None and len(self._pending) >= self._batch_bytes:
            self._submit()
        if self._partial != self._reported:
            self._reported = self._partial
            return self._partial
        return None

    @property
    def partial(self) -> str:
        """The latest partial hypothesis (possibly not yet returned by `feed`)."""
        return self._partial

    async def flush(self) -> str:
        """Waits until all audio fed so far is decoded; returns the partial hypothesis.

        For callers that feed faster than real time (files, tests); a live call never needs it.
        """
        if self._decoder is None or self._closed:
            raise RuntimeError("flush() outside begin()..end()")
        while self._inflight is not None or self._pending:
            if self._inflight is None:
                self._submit()
            assert self._inflight is not None
            await asyncio.shield(self._inflight)
            if self._error is not None:
                raise self._error
        return self._partial

    async def end(self) -> str:
        """Decodes what is left and returns the final text; the decoder goes back to the pool."""
        if self._decoder is None or self._closed:
            raise RuntimeError("end() outside begin()..end()")
        self._closed = True
        decoder = self._decoder
        try:
            if self._inflight is not None:
                await asyncio.shield(self._inflight)
            if self._error is not None:
                raise self._error
            audio = bytes(self._pending)
            self._pending.clear()
            assert self._loop is not None
            text = await self._loop.run_in_executor(self.pool.executor, _decode, decoder, audio,
                                                    True)
        except BaseException:
            self._decoder = None
            self.pool.discard()  # its state is unknown: never lend it again
            raise
        self._decoder = None
        self.pool.release(self.model, decoder)
        return text

    def cancel(self) -> None:
        """Drops the utterance; the decoder returns to the pool once its current batch is done."""
        if self._closed:
            return
        self._closed = True
        decoder, self._decoder = self._decoder, None
        self._pending.clear()
        if decoder is None:
            return
        assert self._loop is not None
        if self._loop.is_closed():
            self.pool.discard()
            return
        inflight = self._inflight
        if inflight is None:
            self._return_after_abandon(decoder)
        else:
            inflight.add_done_callback(lambda _: self._return_after_abandon(decoder))

    # -- internals -----------------------------------------------------------------------------

    def _submit(self) -> None:
        assert self._loop is not None and self._decoder is not None
        audio = bytes(self._pending)
        self._pending.clear()
        inflight = self._loop.run_in_executor(self.pool.executor, _decode, self._decoder, audio,
                                              False)
        self._inflight = inflight
        inflight.add_done_callback(self._on_batch)

    def _on_batch(self, future: asyncio.Future[str]) -> None:
        self._inflight = None
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._error = error
            return
        self._partial = future.result()
        # audio that arrived while this batch was decoded goes at once, so the decoder catches up
        if not self._closed and len(self._pending) >= self._batch_bytes:
            self._submit()

    def _return_after_abandon(self, decoder: pocketsphinx.Decoder) -> None:
        assert self._loop is not None
        future = self._loop.run_in_executor(self.pool.executor, _abandon, decoder)

        def done(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                self.pool.discard()
            else:
                self.pool.release(self.model, decoder)

        future.add_done_callback(done)
