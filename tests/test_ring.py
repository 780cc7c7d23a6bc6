"""OutputRing: cursors, wrap-around, cancel by generation, and a model-based check of them all."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.audio.ring import OutputRing


def ramp(start: int, count: int) -> bytes:
    """Distinct sample values, so every sample read back can be traced to its write."""
    return (np.arange(start, start + count) % 32768).astype("<i2").tobytes()


def samples(data: bytes | bytearray) -> list[int]:
    return np.frombuffer(bytes(data), "<i2").tolist()


def read(ring: OutputRing, n: int) -> list[int]:
    out = bytearray(2 * n)
    got = ring.read_into(out, n)
    return samples(out[: 2 * got])


def test_write_read_ack_move_the_three_cursors() -> None:
    ring = OutputRing(100)
    assert ring.write(ramp(0, 30), generation=1) == 30
    assert (ring.ack_pos, ring.read_pos, ring.write_pos) == (0, 0, 30)
    assert read(ring, 20) == list(range(20))
    assert (ring.queued, ring.unacked, ring.free) == (10, 20, 70)
    assert ring.ack(15) == 15
    assert (ring.ack_pos, ring.unacked, ring.free) == (15, 5, 85)


def test_ack_is_clamped_to_what_was_read() -> None:
    ring = OutputRing(100)
    ring.write(ramp(0, 30), 1)
    read(ring, 10)
    assert ring.ack(25) == 10
    assert ring.ack_pos == ring.read_pos == 10


def test_read_stops_at_the_end_of_queued_audio() -> None:
    ring = OutputRing(100)
    ring.write(ramp(0, 5), 1)
    assert read(ring, 160) == list(range(5))
    assert read(ring, 160) == []
    assert ring.read_generation == -1


def test_audio_survives_wrapping_around_the_end_of_the_ring() -> None:
    ring = OutputRing(8)
    ring.write(ramp(0, 6), 1)
    read(ring, 6)
    ring.ack(6)
    assert ring.write(ramp(6, 8), 1) == 8  # positions 6..13 wrap at 8
    assert read(ring, 3) == [6, 7, 8]
    assert read(ring, 5) == [9, 10, 11, 12, 13]


def test_rewind_requeues_what_was_sent_but_not_heard() -> None:
    ring = OutputRing(100)
    ring.write(ramp(0, 40), 1)
    read(ring, 30)
    ring.ack(10)
    assert ring.rewind() == 20
    assert ring.read_pos == ring.ack_pos == 10
    assert read(ring, 40) == list(range(10, 40))


def test_rewind_after_wrapping_replays_the_unheard_samples() -> None:
    ring = OutputRing(10)
    ring.write(ramp(0, 8), 1)
    read(ring, 8)
    ring.ack(8)
    ring.write(ramp(8, 10), 1)
    read(ring, 7)
    ring.ack(2)
    ring.rewind()
    assert read(ring, 10) == list(range(10, 18))


def test_write_beyond_free_space_is_truncated_and_counted() -> None:
    ring = OutputRing(50)
    assert ring.write(ramp(0, 40), 1) == 40
    assert ring.write(ramp(40, 40), 1) == 10
    assert ring.overflow_samples == 30
    # Unacked audio still occupies the ring: reading alone frees nothing.
    read(ring, 50)
    assert ring.write(ramp(50, 5), 1) == 0
    assert ring.overflow_samples == 35
    ring.ack(20)
    assert ring.write(ramp(50, 5), 1) == 5


def test_cancel_of_the_newest_generation_drops_all_of_it_sent_and_queued() -> None:
    ring = OutputRing(1000)
    ring.write(ramp(0, 300), generation=3)
    read(ring, 120)
    ring.ack(40)
    assert ring.cancel(3) == 260  # 80 sent-but-unheard + 180 queued
    assert ring.ack_pos == ring.read_pos == ring.write_pos == 300
    assert ring.cancelled_generation == 3
    assert ring.rewind() == 0
    assert read(ring, 500) == []


def test_late_writes_of_a_cancelled_generation_never_come_out() -> None:
    ring = OutputRing(1000)
    ring.write(ramp(0, 100), 1)
    ring.cancel(1)
    assert ring.write(ramp(100, 160), 1) == 0
    assert ring.write(ramp(260, 160), 0) == 0
    assert ring.discarded_samples == 320
    assert ring.write(ramp(1000, 50), 2) == 50
    assert read(ring, 500) == list(range(1000, 1050))


def test_cancel_of_an_older_generation_keeps_the_newer_one_queued_behind() -> None:
    ring = OutputRing(1000)
    ring.write(ramp(0, 100), 1)
    ring.write(ramp(100, 50), 2)
    ring.write(ramp(150, 60), 3)
    read(ring, 30)
    assert ring.read_generation == 1
    assert ring.cancel(1) == 100
    assert ring.read_generation == 2
    assert ring.newest_generation == 3
    assert read(ring, 1000) == list(range(100, 210))


def test_cancel_of_an_older_generation_already_partly_sent_keeps_the_newer_one_sent() -> None:
    ring = OutputRing(1000)
    ring.write(ramp(0, 100), 1)
    ring.write(ramp(100, 100), 2)
    read(ring, 150)  # all of generation 1 and half of 2 are with the transport
    assert ring.cancel(1) == 100
    assert (ring.ack_pos, ring.read_pos) == (100, 150)
    ring.rewind()  # generation 2's unheard part is replayed, generation 1 is gone
    assert read(ring, 1000) == list(range(100, 200))


def test_cancel_covers_every_older_generation_up_to_the_one_named() -> None:
    ring = OutputRing(1000)
    for generation in range(1, 5):
        ring.write(ramp(100 * generation, 10), generation)
    assert ring.cancel(3) == 30
    assert read(ring, 100) == list(range(400, 410))


def test_cancel_of_a_generation_with_nothing_queued_drops_nothing_but_blocks_it() -> None:
    ring = OutputRing(100)
    ring.write(ramp(0, 10), 1)
    assert ring.cancel(5) == 10
    assert ring.cancel(2) == 0
    assert ring.cancelled_generation == 5
    assert ring.write(ramp(0, 10), 4) == 0


def test_a_chunk_older_than_the_newest_generation_is_stale_and_discarded() -> None:
    ring = OutputRing(100)
    ring.write(ramp(0, 10), 2)
    assert ring.write(ramp(10, 10), 1) == 0
    assert ring.discarded_samples == 10
    assert read(ring, 100) == list(range(10))


def test_read_generation_follows_the_segment_boundaries() -> None:
    ring = OutputRing(100)
    ring.write(ramp(0, 3), 7)
    ring.write(ramp(3, 2), 9)
    seen = []
    while ring.queued:
        seen.append(ring.read_generation)
        read(ring, 1)
    assert seen == [7, 7, 7, 9, 9]


def test_clear_drops_everything_but_keeps_the_generations() -> None:
    ring = OutputRing(100)
    ring.write(ramp(0, 50), 2)
    read(ring, 20)
    assert ring.clear() == 50
    assert (ring.queued, ring.unacked, ring.free) == (0, 0, 100)
    assert ring.dropped_samples == 50
    assert ring.write(ramp(0, 5), 2) == 5
    assert ring.read_generation == 2


def test_more_queued_generations_than_the_segment_table_holds_never_leak_cancelled_audio() -> None:
    ring = OutputRing(10_000)
    for generation in range(70):
        ring.write(ramp(10 * generation, 10), generation)
    ring.cancel(0)
    out = read(ring, 10_000)
    # Merging kept the oldest generation's label, so the cut errs towards dropping a little
    # newer audio, never towards replaying generation 0.
    # 64 slots for 70 generations: the six extra changes folded generations 1-6 into 0.
    assert out == list(range(70, 700))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        OutputRing(0)
    ring = OutputRing(10)
    with pytest.raises(ValueError, match="even"):
        ring.write(b"\x00\x00\x00", 1)
    ring.write(ramp(0, 5), 1)
    with pytest.raises(ValueError, match="needed"):
        ring.read_into(bytearray(7), 4)
    with pytest.raises(ValueError):
        ring.read_into(bytearray(8), -1)
    with pytest.raises(ValueError):
        ring.ack(-1)
    with pytest.raises(BufferError):
        ring.read_into(bytes(8), 4)
    assert ring.read_pos == 0


def test_write_accepts_bytearray_memoryview_and_numpy_inputs() -> None:
    ring = OutputRing(100)
    assert ring.write(bytearray(ramp(0, 3)), 1) == 3
    assert ring.write(memoryview(ramp(3, 3)), 1) == 3
    assert ring.write(np.arange(6, 9, dtype="<i2"), 1) == 3
    assert read(ring, 100) == list(range(9))


def test_read_into_accepts_memoryview_and_numpy_outputs() -> None:
    ring = OutputRing(100)
    ring.write(ramp(0, 10), 1)
    arr: Any = np.zeros(4, "<i2")
    assert ring.read_into(arr, 4) == 4
    assert arr.tolist() == [0, 1, 2, 3]
    buf = bytearray(20)
    assert ring.read_into(memoryview(buf)[4:], 6) == 6
    assert samples(buf[4:16]) == [4, 5, 6, 7, 8, 9]


# --- model-based: the ring against a list that remembers every sample's generation ---------------


class RingModel:
    """The ring's contract written the slow, obvious way."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ack_pos = self.read_pos = self.write_pos = 0
        self.items: list[tuple[int, int]] = []  # (generation, sample) for [ack_pos, write_pos)
        self.cancelled = -1
        self.newest = -1
        self.discarded = self.overflow = self.dropped = 0

    def write(self, values: list[int], generation: int) -> int:
        if generation <= self.cancelled or generation < self.newest:
            self.discarded += len(values)
            return 0
        accepted = min(len(values), self.capacity - (self.write_pos - self.ack_pos))
        self.overflow += len(values) - accepted
        if accepted:
            self.newest = max(self.newest, generation)
            self.items += [(generation, v) for v in values[:accepted]]
            self.write_pos += accepted
        return accepted

    def read(self, n: int) -> list[int]:
        start = self.read_pos - self.ack_pos
        count = min(n, self.write_pos - self.read_pos)
        self.read_pos += count
        return [v for _, v in self.items[start : start + count]]

    def ack(self, n: int) -> int:
        moved = min(n, self.read_pos - self.ack_pos)
        del self.items[:moved]
        self.ack_pos += moved
        return moved

    def rewind(self) -> int:
        moved = self.read_pos - self.ack_pos
        self.read_pos = self.ack_pos
        return moved

    def cancel(self, generation: int) -> int:
        self.cancelled = max(self.cancelled, generation)
        prefix = 0
        while prefix < len(self.items) and self.items[prefix][0] <= generation:
            prefix += 1
        del self.items[:prefix]
        self.ack_pos += prefix
        self.read_pos = max(self.read_pos, self.ack_pos)
        self.dropped += prefix
        return prefix

    def clear(self) -> int:
        dropped = len(self.items)
        self.items.clear()
        self.ack_pos = self.read_pos = self.write_pos
        self.dropped += dropped
        return dropped

    @property
    def read_generation(self) -> int:
        if self.read_pos == self.write_pos:
            return -1
        return self.items[self.read_pos - self.ack_pos][0]


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ring: OutputRing | None = None
        self.model: RingModel | None = None
        self.next_value = 0

    @precondition(lambda self: self.ring is None)
    @rule(capacity=st.integers(1, 40))
    def create(self, capacity: int) -> None:
        self.ring = OutputRing(capacity)
        self.model = RingModel(capacity)

    @precondition(lambda self: self.ring is not None)
    @rule(count=st.integers(0, 25), step=st.sampled_from([0, 0, 0, 1, 1, 2, -1]))
    def write(self, count: int, step: int) -> None:
        assert self.ring is not None and self.model is not None
        generation = max(self.model.newest, 0) + step
        values = [(self.next_value + i) % 32768 for i in range(count)]
        self.next_value += count
        pcm = np.array(values, dtype="<i2").tobytes()
        assert self.ring.write(pcm, generation) == self.model.write(values, generation)

    @precondition(lambda self: self.ring is not None)
    @rule(n=st.integers(0, 30))
    def read(self, n: int) -> None:
        assert self.ring is not None and self.model is not None
        assert read(self.ring, n) == self.model.read(n)

    @precondition(lambda self: self.ring is not None)
    @rule(n=st.integers(0, 30))
    def ack(self, n: int) -> None:
        assert self.ring is not None and self.model is not None
        assert self.ring.ack(n) == self.model.ack(n)

    @precondition(lambda self: self.ring is not None)
    @rule()
    def rewind(self) -> None:
        assert self.ring is not None and self.model is not None
        assert self.ring.rewind() == self.model.rewind()

    @precondition(lambda self: self.ring is not None)
    @rule(back=st.integers(-1, 3))
    def cancel(self, back: int) -> None:
        assert self.ring is not None and self.model is not None
        generation = self.model.newest - back
        assert self.ring.cancel(generation) == self.model.cancel(generation)

    @precondition(lambda self: self.ring is not None)
    @rule()
    def clear(self) -> None:
        assert self.ring is not None and self.model is not None
        assert self.ring.clear() == self.model.clear()

    @invariant()
    def same_state(self) -> None:
        if self.ring is None or self.model is None:
            return
        ring, model = self.ring, self.model
        assert (ring.ack_pos, ring.read_pos, ring.write_pos) == (
            model.ack_pos,
            model.read_pos,
            model.write_pos,
        )
        assert ring.ack_pos <= ring.read_pos <= ring.write_pos
        assert ring.free == model.capacity - (model.write_pos - model.ack_pos)
        assert ring.read_generation == model.read_generation
        assert ring.cancelled_generation == model.cancelled
        assert ring.newest_generation == model.newest
        assert (ring.discarded_samples, ring.overflow_samples, ring.dropped_samples) == (
            model.discarded,
            model.overflow,
            model.dropped,
        )


RingMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_ring_matches_its_model = RingMachine.TestCase
