"""The canned backend, for benchmarks: turn taking on, and every caller turn is answered at once
with the same pre-synthesized utterance.

It measures what the engine itself costs with VAD, endpointing, barge-in and paced replies at
hundreds of calls, without speech recognition (which no small machine runs for hundreds of
callers): the reply is synthesized once per process and shared by every call.
"""
from __future__ import annotations

import asyncio
from typing import Any

from engine.backends.base import Backend, BackendFactory, CallInfo, Emit
from engine.events import AssistantText, AudioChunk, Transcript, UtteranceEnd

REPLY = (
    "Thank you. This is a prepared answer, long enough to be interrupted,"
    " and the same for everyone."
)
CHUNK_BYTES = 3200  # 100 ms of 16 kHz PCM per chunk, as a streaming synthesizer would hand it over

_reply_pcm: bytes | None = None


async def reply_audio() -> bytes:
    """The reply as 16 kHz PCM, synthesized once per process."""
    global _reply_pcm
    if _reply_pcm is None:
        from engine.speech.tts import synthesize

        _reply_pcm = await asyncio.get_running_loop().run_in_executor(None, synthesize, REPLY)
    return _reply_pcm


class CannedBackend(Backend):
    def __init__(self, info: CallInfo, emit: Emit) -> None:
        super().__init__(info, emit)
        self.generation = 0
        self._pcm = b""

    @classmethod
    def factory(cls, **_: Any) -> BackendFactory:
        def make(info: CallInfo, emit: Emit) -> Backend:
            return cls(info, emit)

        return make

    async def start(self) -> None:
        self._pcm = await reply_audio()

    def send_audio(self, frame: bytes, now: float) -> None:
        pass

    def user_turn_ended(self, at: float) -> None:
        self.generation += 1
        generation = self.generation
        self.emit(Transcript("(speech)", final=True))
        self.emit(AssistantText(REPLY, generation))
        pcm = self._pcm
        for start in range(0, len(pcm), CHUNK_BYTES):
            self.emit(AudioChunk(pcm[start:start + CHUNK_BYTES], generation))
        self.emit(UtteranceEnd(generation))
