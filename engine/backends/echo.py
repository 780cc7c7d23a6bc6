"""The echo backend, for benchmarks: every caller frame goes straight back out, turn taking off."""
from __future__ import annotations

from typing import Any

from engine.backends.base import Backend, BackendFactory, CallInfo, Emit
from engine.events import AudioChunk


class EchoBackend(Backend):
    turn_taking = False
    output_capacity_s = 2.0  # audio leaves as it arrives
    relays_audio = True

    def send_audio(self, frame: bytes, now: float) -> None:
        self.emit(AudioChunk(frame, 0))

    @classmethod
    def factory(cls, **_: Any) -> BackendFactory:
        def make(info: CallInfo, emit: Emit) -> Backend:
            return cls(info, emit)

        return make
