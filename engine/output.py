"""The call's cancellable output stream: assistant speech queued for the caller.

Audio is 16 kHz mono int16, held in the native `OutputRing` with three cursors:
heard (acknowledged) ≤ sent (read by the transport) ≤ written. Each utterance has a generation;
`cancel(g)` drops everything of generations ≤ g in O(1) and makes later writes of them vanish, so
the tail of an interrupted reply can never leak out. `rewind()` puts what was sent but not heard
back in the queue, which is how a paused reply resumes exactly where the caller stopped hearing.

This module also keeps the utterance boundaries (where each generation ends), so a transport can
mark the end of each utterance and learn when the caller has heard it.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

from engine.audio.ring import OutputRing

RATE = 16000
FRAME_SAMPLES = 320  # 20 ms
FRAME_BYTES = FRAME_SAMPLES * 2


class OutputStream:
    def __init__(self, capacity_s: float = 30.0) -> None:
        self.ring = OutputRing(int(capacity_s * RATE))
        #: (end position, generation) of utterances whose last audio has been written, oldest first
        self._ends: deque[tuple[int, int]] = deque()
        #: generation of the newest audio written (-1 before any)
        self.generation = -1
        self._open = False  # the newest generation is still being written
        #: (write position, monotonic ms) of audio being timed through the stream; see `probe`
        self._probe: tuple[int, float] | None = None
        #: called with the milliseconds a probed sample waited between written and read
        self.on_probe: Callable[[float], None] | None = None

    # -- the backend's side --------------------------------------------------------------------

    def write(self, pcm: bytes, generation: int) -> int:
        """Queue audio of `generation`; returns samples accepted (0 for a cancelled generation)."""
        if generation <= self.ring.cancelled_generation:
            self.ring.write(pcm, generation)  # counted as discarded by the ring
            return 0
        if generation != self.generation:
            if self._open and self.generation >= 0:
                # A new utterance began without an explicit end: the old one ends here.
                self._ends.append((self.ring.write_pos, self.generation))
            self.generation = generation
        self._open = True
        return self.ring.write(pcm, generation)

    def end(self, generation: int) -> None:
        """All audio of `generation` has been written."""
        if generation == self.generation and self._open:
            self._open = False
            self._ends.append((self.ring.write_pos, generation))

    # -- the transport's side ------------------------------------------------------------------

    def frame_available(self) -> bool:
        """A whole frame is queued, or the rest of a finished utterance is."""
        queued = self.ring.queued
        if queued >= FRAME_SAMPLES:
            return True
        if queued == 0:
            return False
        end = self._next_end_pos()
        return end is not None and end <= self.ring.write_pos

    def read_frame(self, out: bytearray) -> int:
        """Fills `out` (640 bytes) with the next frame, silence-padded at an utterance's end.

        Returns the generation of the audio read, or -1 when no frame is available. A frame never
        spans two utterances.
        """
        ring = self.ring
        if not self.frame_available():
            return -1
        generation = ring.read_generation
        limit = FRAME_SAMPLES
        end = self._next_end_pos()
        if end is not None and end > ring.read_pos:
            limit = min(limit, end - ring.read_pos)
        n = ring.read_into(out, limit)
        if n < FRAME_SAMPLES:
            out[n * 2:] = bytes(FRAME_BYTES - n * 2)
        if self._probe is not None and ring.read_pos >= self._probe[0]:
            written = self._probe[1]
            self._probe = None
            if self.on_probe is not None:
                self.on_probe(time.monotonic() * 1000.0 - written)
        return generation

    def probe(self, now: float) -> None:
        """Times the audio just written (at `now`, monotonic ms) until the transport reads its
        last sample, then reports the wait to `on_probe`. One probe at a time."""
        if self._probe is None:
            self._probe = (self.ring.write_pos, now)

    def finished_at_read(self) -> int | None:
        """The generation whose last sample has just been read (the transport marks it), if any."""
        for end_pos, generation in self._ends:
            if end_pos == self.ring.read_pos:
                return generation
            if end_pos > self.ring.read_pos:
                break
        return None

    def heard(self, samples: int) -> None:
        """The caller has heard `samples` more samples."""
        self.ring.ack(samples)
        self._forget_heard()

    def heard_up_to(self, position: int) -> None:
        """The caller has heard everything before absolute `position`."""
        if position > self.ring.ack_pos:
            self.ring.ack(position - self.ring.ack_pos)
            self._forget_heard()

    def rewind(self) -> int:
        """Re-queue what was sent but not heard; returns samples rewound."""
        return self.ring.rewind()

    def cancel(self, generation: int) -> int:
        """Drop every queued sample of generations ≤ `generation`; returns samples dropped."""
        dropped = self.ring.cancel(generation)
        self._probe = None
        while self._ends and self._ends[0][1] <= generation:
            self._ends.popleft()
        if self.generation <= generation:
            self._open = False
        return dropped

    @property
    def unheard(self) -> int:
        """Samples written but not yet heard."""
        return self.ring.write_pos - self.ring.ack_pos

    # -- internals -----------------------------------------------------------------------------

    def _next_end(self) -> tuple[int, int] | None:
        read = self.ring.read_pos
        for item in self._ends:
            if item[0] > read:
                return item
        return None

    def _next_end_pos(self) -> int | None:
        item = self._next_end()
        return None if item is None else item[0]

    def _forget_heard(self) -> None:
        ack = self.ring.ack_pos
        while self._ends and self._ends[0][0] <= ack and self._ends[0][0] < self.ring.read_pos:
            self._ends.popleft()
