"""The embedded default assistant: offline recognition, the scripted responder, offline speech.

Per call: while the caller speaks, frames stream into a pooled pocketsphinx decoder (with the
~300 ms before the turn started, so the first syllable is not lost); partials go out as they
change. At the end of the turn the final text goes to the responder, and its answer is spoken by
eSpeak NG in chunks, so the first audio leaves within tens of milliseconds. Recognition and
synthesis run off the event loop. Each answer is one generation; `interrupt` stops its synthesis.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from engine.backends.base import Backend, BackendFactory, CallInfo, Emit
from engine.events import (
    AssistantText,
    AudioChunk,
    BackendError,
    HangUp,
    Transcript,
    TransferRequest,
    UtteranceEnd,
)
from engine.log import get_logger

if TYPE_CHECKING:
    from engine.runtime import Engine
    from engine.speech.asr import LanguageModel, Recognizer

log = get_logger("local")

PREROLL_FRAMES = 15  # 300 ms of audio kept from before the turn started


_models: dict[tuple[str, tuple[str, ...]], "LanguageModel"] = {}


def recognition_model(engine: "Engine") -> "LanguageModel":
    """The process's language model for the assistant (built once, shared by every call)."""
    from engine.speech.asr import LanguageModel

    config = engine.assistant
    phrases = tuple(engine.responder.phrases()) + config.recognition_examples
    key = (config.recognition_model, phrases)
    model = _models.get(key)
    if model is None:
        model = (
            LanguageModel.general()
            if config.recognition_model == "general"
            else LanguageModel.from_phrases(phrases)
        )
        _models[key] = model
    return model


class LocalBackend(Backend):
    def __init__(self, info: CallInfo, emit: Emit, engine: "Engine") -> None:
        super().__init__(info, emit)
        self.engine = engine
        self.config = engine.assistant
        self.responder = engine.responder
        self.generation = 0
        self._preroll: deque[bytes] = deque(maxlen=PREROLL_FRAMES)
        self._waiting: list[bytes] = []  # frames of a turn whose recognizer is not ready yet
        self._recognizer: "Recognizer | None" = None
        self._previous_intent: str | None = None
        self._turn: asyncio.Task[None] | None = None
        self._speaking: asyncio.Task[None] | None = None
        self._closed = False
        self._cancelled = -1  # every answer up to this generation was interrupted

    @classmethod
    def factory(cls, engine: "Engine", **_: Any) -> BackendFactory:
        def make(info: CallInfo, emit: Emit) -> Backend:
            return cls(info, emit, engine)

        return make

    async def start(self) -> None:
        if self.config.first_message:
            self._say(self.config.first_message)

    # -- the caller's turn ---------------------------------------------------------------------

    def send_audio(self, frame: bytes, now: float) -> None:
        recognizer = self._recognizer
        if recognizer is None:
            self._preroll.append(frame)
        elif recognizer.active:
            partial = recognizer.feed(frame)
            if partial:
                self.emit(Transcript(partial, final=False))
        else:
            self._waiting.append(frame)  # the recognizer is still getting its decoder

    def user_turn_started(self, onset: float) -> None:
        from engine.speech.asr import Recognizer

        # The caller spoke again: an answer still being prepared or spoken is for a stale turn.
        if self._speaking is not None and not self._speaking.done():
            self._cancelled = max(self._cancelled, self.generation)
            self._speaking.cancel()
        if self._recognizer is not None:
            self._recognizer.cancel()
        recognizer = Recognizer(recognition_model(self.engine))
        self._recognizer = recognizer
        self._waiting = list(self._preroll)
        self._preroll.clear()

        async def begin() -> None:
            await recognizer.begin()
            waiting, self._waiting = self._waiting, []
            for frame in waiting:
                if recognizer.active:
                    recognizer.feed(frame)

        self._turn = asyncio.get_running_loop().create_task(begin())

    def user_turn_ended(self, at: float) -> None:
        recognizer, self._recognizer = self._recognizer, None
        started = self._turn
        self.generation += 1
        generation = self.generation
        self._speaking = asyncio.get_running_loop().create_task(
            self._answer(recognizer, started, generation)
        )

    async def _answer(
        self, recognizer: "Recognizer | None", started: asyncio.Task[None] | None, generation: int
    ) -> None:
        text = ""
        if recognizer is not None:
            try:
                if started is not None:
                    await started
                text = await recognizer.end() if recognizer.active else ""
            except Exception as exc:
                log.exception("local.asr_failed", session=self.info.session_id)
                self.emit(BackendError(f"speech recognition failed: {exc}"))
        self.emit(Transcript(text, final=True))
        reply = self.responder.reply(text, self._previous_intent)
        self._previous_intent = reply.intent
        log.info("local.reply", session=self.info.session_id, heard=text, intent=reply.intent)
        await self._speak(reply.text, generation)
        if reply.transfer:
            self.emit(
                TransferRequest(
                    self.engine.settings.transfer_number or "operator", self.config.handoff
                )
            )
        elif reply.hangup:
            self.emit(HangUp("assistant-goodbye"))

    def dtmf(self, digit: str) -> None:
        if digit == self.config.transfer_digit:
            log.info("local.transfer_key", session=self.info.session_id, digit=digit)
            self.emit(
                TransferRequest(
                    self.engine.settings.transfer_number or "operator", self.config.handoff
                )
            )

    # -- speaking ------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        self.generation += 1
        self._speaking = asyncio.get_running_loop().create_task(self._speak(text, self.generation))

    async def _speak(self, text: str, generation: int) -> None:
        from engine.speech.tts import stream

        self.emit(AssistantText(text, generation))
        try:
            async for chunk in stream(text, voice=self.config.voice, rate_wpm=self.config.rate_wpm):
                if self._closed or generation <= self._cancelled:
                    return
                self.emit(AudioChunk(chunk, generation))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("local.tts_failed", session=self.info.session_id)
            self.emit(BackendError(f"speech synthesis failed: {exc}"))
            return
        self.emit(UtteranceEnd(generation))

    def interrupt(self, generation: int) -> None:
        self._cancelled = max(self._cancelled, generation)
        task = self._speaking
        if task is not None and not task.done() and generation >= self.generation:
            task.cancel()

    async def close(self) -> None:
        self._closed = True
        if self._recognizer is not None:
            self._recognizer.cancel()
            self._recognizer = None
        for task in (self._turn, self._speaking):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
