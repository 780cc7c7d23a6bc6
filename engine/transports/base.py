"""What a call asks of its transport, and the small pieces transports share."""
from __future__ import annotations

import struct
from typing import Any, Protocol


class CallTransport(Protocol):
    """The caller's side of a call, as the call sees it."""

    kind: str

    def kick(self) -> None:
        """New audio is queued in the call's output stream: start sending it."""

    def pause(self, now: float) -> None:
        """Stop playback at once; what the caller has not heard goes back in the queue."""

    def resume(self, now: float) -> None:
        """Play on from where the caller stopped hearing."""

    def cancel(self, now: float) -> None:
        """The queued utterance was dropped: make sure nothing of it is still playing."""

    def notify(self, event: dict[str, Any]) -> None:
        """An event for the caller's page (transcripts, turn state); transports without one
        ignore it."""

    def hangup(self, reason: str) -> None:
        """End the call from the engine's side."""

    async def transfer(self, destination: str) -> bool:
        """Hand the caller to a person; True when the carrier accepted."""


class Reframer:
    """Cuts a byte stream into fixed-size frames (resamplers return variable-length chunks)."""

    __slots__ = ("frame_bytes", "_buf")

    def __init__(self, frame_bytes: int) -> None:
        self.frame_bytes = frame_bytes
        self._buf = bytearray()

    def push(self, data: bytes) -> None:
        self._buf += data

    def pop(self) -> bytes | None:
        n = self.frame_bytes
        if len(self._buf) < n:
            return None
        frame = bytes(self._buf[:n])
        del self._buf[:n]
        return frame

    def pending(self) -> int:
        return len(self._buf)

    def clear(self) -> None:
        self._buf.clear()


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A complete unmasked server-to-client WebSocket frame, final (RFC 6455 §5.2)."""
    first = 0x80 | opcode
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def ws_text_frame(payload: bytes) -> bytes:
    """A complete unmasked server-to-client WebSocket text frame."""
    return ws_frame(0x1, payload)
