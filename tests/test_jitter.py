"""Behaviour of the adaptive jitter buffer (engine.audio.jitter), on a synthetic clock.

Time is an argument everywhere: no sleeps, no timing assertions. Payloads are real-looking
16-bit PCM (a voiced tone with vibrato and noise), every frame distinct, so each frame that comes
out can be traced to the packet that went in.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.audio.jitter import (
    ACCEPTED,
    CONCEALED,
    DUPLICATE,
    INVALID,
    LATE,
    PACKET,
    RESET,
    JitterBuffer,
    JitterFrame,
)

RATE = 8000
SPF = 160  # 20 ms at 8 kHz
FRAME_BYTES = 2 * SPF
FRAME_MS = 20.0
CAPACITY = 64
N_FRAMES = 512


def _voice(n_frames: int) -> np.ndarray:
    """A voiced-speech-like signal: harmonics of a wandering pitch, plus a little noise."""
    t = np.arange(n_frames * SPF) / RATE
    f0 = 140.0 + 25.0 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    signal = sum(np.sin(k * phase) / k for k in range(1, 6))
    noise = np.random.default_rng(7).normal(0.0, 0.02, t.size)
    return (6000.0 * (signal + noise)).astype(np.int16).reshape(n_frames, SPF)


VOICE = _voice(N_FRAMES)
FRAMES = [row.tobytes() for row in VOICE]
FRAME_ID = {payload: i for i, payload in enumerate(FRAMES)}
assert len(FRAME_ID) == N_FRAMES, "every test frame must be distinct"


def make(**kwargs: object) -> JitterBuffer:
    return JitterBuffer(FRAME_BYTES, SPF, RATE, **kwargs)  # type: ignore[arg-type]


def packet(i: int, seq0: int = 0, ts0: int = 0) -> tuple[int, int, bytes]:
    """Packet i of a stream: (seq, timestamp, payload), both counters wrapping."""
    return (seq0 + i) & 0xFFFF, (ts0 + i * SPF) & 0xFFFFFFFF, FRAMES[i % N_FRAMES]


def push(jb: JitterBuffer, i: int, now: float, seq0: int = 0, ts0: int = 0) -> int:
    seq, ts, payload = packet(i, seq0, ts0)
    return jb.push(seq, ts, payload, now)


def drain(jb: JitterBuffer, now: float) -> list[JitterFrame]:
    """Everything due at `now`. Bounded: the frame clock runs up to `now`, so a far-future `now`
    would be a flood of concealment frames."""
    frames = []
    while (frame := jb.pop(now)) is not None:
        frames.append(frame)
        assert len(frames) <= 10_000, "drained far past the stream: use a nearer now"
    return frames


def released_ids(frames: list[JitterFrame]) -> list[int]:
    return [FRAME_ID[f.data] for f in frames if f.kind == PACKET]


def expected_fade(last_good: bytes, k: int, fade_frames: int = 4) -> np.ndarray:
    """Concealment frame k (1-based) after last_good: -6 dB per frame, linear within it."""
    src = np.frombuffer(last_good, dtype=np.int16).astype(np.float64)
    if k > fade_frames:
        return np.zeros(src.size, dtype=np.int16)
    g0 = 0.5 ** (k - 1)
    g1 = g0 * 0.5 if k < fade_frames else 0.0
    gains = g0 + ((g1 - g0) / src.size) * np.arange(src.size)
    return (src * gains).astype(np.int16)  # truncates toward zero, like the C cast


# ---- ordering, duplicates, wrap ------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    seq0=st.integers(0, 0xFFFF),
    ts0=st.integers(0, 0xFFFFFFFF),
    data=st.data(),
)
def test_any_arrival_order_within_the_window_releases_every_packet_once_in_order(
    seq0: int, ts0: int, data: st.DataObject
) -> None:
    n = data.draw(st.integers(1, CAPACITY), label="packets")
    order = data.draw(st.permutations(range(n)), label="arrival order")
    repeats = data.draw(st.lists(st.integers(0, n - 1), max_size=n), label="duplicates")
    arrivals = list(order) + repeats
    times = data.draw(
        st.lists(st.floats(0, 5_000), min_size=len(arrivals), max_size=len(arrivals)),
        label="arrival times",
    )
    jb = make()
    for i, now in zip(arrivals, times, strict=True):
        assert push(jb, i, now, seq0, ts0) in (ACCEPTED, DUPLICATE)

    # long after every deadline: the held packets come out first, then the clock conceals on
    popped = [jb.pop(1e12) for _ in range(n + 1)]
    frames = [f for f in popped if f is not None]

    assert [f.kind for f in frames] == [PACKET] * n + [CONCEALED]
    frames = frames[:n]
    assert released_ids(frames) == list(range(n))
    assert [f.seq for f in frames] == [(seq0 + i) & 0xFFFF for i in range(n)]
    assert [f.timestamp for f in frames] == [(ts0 + i * SPF) & 0xFFFFFFFF for i in range(n)]
    assert jb.duplicates == len(repeats)
    assert jb.depth == 0 and jb.late == 0 and jb.lost == 0


@settings(max_examples=100, deadline=None)
@given(seq0=st.integers(0, 0xFFFF), data=st.data())
def test_packets_held_behind_a_gap_come_out_in_order_as_soon_as_it_fills(
    seq0: int, data: st.DataObject
) -> None:
    n = data.draw(st.integers(2, CAPACITY), label="packets")
    rest = data.draw(st.permutations(range(1, n)), label="arrival order after the first")
    # a delay long enough that no gap is given up on during the test
    jb = make(min_delay_ms=10_000.0, max_delay_ms=10_000.0)
    out: list[JitterFrame] = []
    for step, i in enumerate([0, *rest]):
        now = step * FRAME_MS
        push(jb, i, now, seq0)
        out += drain(jb, now)
        # everything contiguous from the start has come out, nothing beyond it
        assert released_ids(out) == list(range(len(out)))
    assert released_ids(out) == list(range(n))
    assert all(f.kind == PACKET for f in out)


@settings(max_examples=150, deadline=None)
@given(
    seq0=st.integers(0, 0xFFFF),
    events=st.lists(
        st.tuples(st.integers(0, 40), st.floats(0, 60), st.booleans()), min_size=1, max_size=150
    ),
)
def test_duplicates_never_come_out_twice(seq0: int, events: list[tuple[int, float, bool]]) -> None:
    jb = make()
    now = 0.0
    out: list[JitterFrame] = []
    for i, dt, poll in events:
        now += dt
        push(jb, i, now, seq0)
        if poll:
            out += drain(jb, now)
    out += drain(jb, now)
    ids = released_ids(out)
    assert ids == sorted(set(ids))


def test_sequence_and_timestamp_wrap_is_an_ordinary_step() -> None:
    seq0, ts0 = 65530, 2**32 - 3 * SPF
    jb = make()
    out: list[JitterFrame] = []
    for i in range(20):
        now = 1000.0 + i * FRAME_MS
        assert push(jb, i, now, seq0, ts0) == ACCEPTED
        out += drain(jb, now)

    assert [f.kind for f in out] == [PACKET] * 20
    assert [f.seq for f in out] == [*range(65530, 65536), *range(14)]
    assert [f.timestamp for f in out][2:5] == [2**32 - SPF, 0, SPF]
    assert (jb.late, jb.lost, jb.resets, jb.jitter_ms) == (0, 0, 0, 0.0)


def test_reordered_pair_across_the_wrap_comes_out_in_order() -> None:
    jb = make(min_delay_ms=100.0)
    for i in (0, 1, 3, 2, 4):  # seq 65534, 65535, 1, 0, 2
        push(jb, i, i * FRAME_MS, seq0=65534, ts0=2**32 - 2 * SPF)
    frames = drain(jb, 80.0)
    assert released_ids(frames) == [0, 1, 2, 3, 4]
    assert [f.seq for f in frames] == [65534, 65535, 0, 1, 2]
    assert jb.reordered == 1


def test_twilio_chunk_counters_past_65535_stay_in_order() -> None:
    # Twilio media: chunk counts from 1 and never wraps; timestamp is ms since the stream began
    jb = JitterBuffer(FRAME_BYTES, 20, 1000)
    out = []
    for chunk in range(65530, 65545):
        ms = (chunk - 1) * 20
        assert jb.push(chunk, ms, FRAMES[chunk % N_FRAMES], float(ms)) == ACCEPTED
        out += drain(jb, float(ms))
    assert [FRAME_ID[f.data] for f in out] == [c % N_FRAMES for c in range(65530, 65545)]
    assert (jb.late, jb.lost, jb.resets) == (0, 0, 0)


# ---- loss, concealment, the frame clock ----------------------------------------------------------


def test_a_lost_run_is_concealed_with_a_fade_then_silence_and_the_stream_resumes() -> None:
    jb = make()
    lost = set(range(10, 20))
    ticks: list[list[JitterFrame]] = []
    for i in range(30):
        now = i * FRAME_MS
        if i not in lost:
            push(jb, i, now)
        ticks.append(drain(jb, now))

    assert [len(t) for t in ticks] == [1] * 30  # one frame per frame time, gap or not
    frames = [t[0] for t in ticks]
    assert [f.kind for f in frames] == [CONCEALED if i in lost else PACKET for i in range(30)]
    assert all(len(f.data) == FRAME_BYTES for f in frames)
    assert [f.seq for f in frames] == list(range(30))
    for k, frame in enumerate(frames[10:20], start=1):
        got = np.frombuffer(frame.data, dtype=np.int16)
        np.testing.assert_allclose(got, expected_fade(FRAMES[9], k), atol=1)
    energies = [np.abs(np.frombuffer(f.data, dtype=np.int16)).sum() for f in frames[10:15]]
    assert energies[0] > energies[1] > energies[2] > energies[3] > energies[4] == 0
    assert released_ids(frames[20:]) == list(range(20, 30))
    assert (jb.concealed, jb.lost, jb.late) == (10, 10, 0)


def test_the_frame_clock_keeps_going_when_packets_stop() -> None:
    jb = make()
    for i in range(5):
        push(jb, i, i * FRAME_MS)
        drain(jb, i * FRAME_MS)
    per_tick = []
    for tick in range(5, 105):
        per_tick.append(len(drain(jb, tick * FRAME_MS)))
        # between frame times nothing more is due
        assert jb.pop(tick * FRAME_MS + FRAME_MS / 2) is None
    assert per_tick == [1] * 100
    assert jb.concealed == 100


def test_a_coarse_poller_gets_every_frame_that_came_due() -> None:
    jb = make()
    push(jb, 0, 0.0)
    assert len(drain(jb, 0.0)) == 1
    assert len(drain(jb, 100.0)) == 5  # frames 1..5 were due at 20, 40, ..., 100 ms
    assert len(drain(jb, 119.0)) == 0
    assert len(drain(jb, 120.0)) == 1


def test_next_deadline_says_when_a_missing_packet_is_given_up_on() -> None:
    jb = make(min_delay_ms=30.0)
    push(jb, 0, 0.0)
    assert jb.next_deadline() is None  # the next frame is here
    drain(jb, 0.0)
    assert jb.next_deadline() == pytest.approx(FRAME_MS + 30.0)
    assert jb.pop(49.9) is None
    frame = jb.pop(50.0)
    assert frame is not None and frame.kind == CONCEALED


def test_nothing_comes_out_before_the_first_packet() -> None:
    jb = make()
    out = bytearray(FRAME_BYTES)
    assert jb.pop(1e9) is None
    assert jb.pop_into(out, 1e9) == -1
    assert jb.drain_into(out, 1e9) == 0
    assert jb.next_deadline() is None
    assert out == bytearray(FRAME_BYTES)


def test_a_sender_pause_with_a_timestamp_jump_is_not_mistaken_for_loss() -> None:
    # DTX, or a Twilio timestamp jump: seq stays contiguous while media time skips 1 s
    jb = make()
    out: list[JitterFrame] = []
    for i in range(10):
        push(jb, i, i * FRAME_MS)
        out += drain(jb, i * FRAME_MS)
    for tick in range(10, 60):  # the consumer's timer keeps polling through the pause
        out += drain(jb, tick * FRAME_MS)
    for i in range(10, 20):  # seq 10.. carries media time 60..: 50 frames later
        now = (i + 50) * FRAME_MS
        status = jb.push(i, (i + 50) * SPF, FRAMES[i], now)
        assert status == ACCEPTED
        out += drain(jb, now)

    assert released_ids(out) == list(range(20))
    assert sum(f.kind == CONCEALED for f in out) == 50
    assert (jb.late, jb.lost) == (0, 0)


# ---- late, jumps, restarts, bounded memory -------------------------------------------------------


def test_late_packets_are_counted_and_dropped() -> None:
    jb = make()
    out: list[JitterFrame] = []
    for i in (0, 1, 2, 4):
        push(jb, i, i * FRAME_MS)
        out += drain(jb, i * FRAME_MS)  # at 80 ms packet 3 is overdue: concealed
    assert push(jb, 3, 85.0) == LATE
    assert push(jb, 1, 86.0) == DUPLICATE  # released, slot not reused yet
    out += drain(jb, 200.0)
    assert released_ids(out) == [0, 1, 2, 4]
    assert [f.kind for f in out[:5]] == [PACKET, PACKET, PACKET, CONCEALED, PACKET]
    assert (jb.late, jb.duplicates, jb.lost) == (1, 1, 1)


def test_a_jump_beyond_the_window_resets_and_counts_the_skipped_range_as_lost() -> None:
    jb = make(min_delay_ms=10_000.0, max_delay_ms=10_000.0)
    for i in (0, 1, 3):
        push(jb, i, i * FRAME_MS)
    assert [f.kind for f in drain(jb, 60.0)] == [PACKET, PACKET]
    assert push(jb, 1000, 80.0) == RESET
    assert jb.depth == 1
    frames = drain(jb, 80.0)
    assert released_ids(frames) == [1000 % N_FRAMES]
    assert (jb.resets, jb.lost) == (1, 998)  # seq 2..999: concealed, dropped (3) or skipped
    assert push(jb, 1001, 100.0) == ACCEPTED
    assert released_ids(drain(jb, 100.0)) == [1001 % N_FRAMES]


def test_a_sender_restart_at_lower_numbers_is_followed_after_a_window_of_late_packets() -> None:
    cap = 8
    jb = make(capacity=cap)
    for i in range(100, 110):
        push(jb, i, i * FRAME_MS)
        drain(jb, i * FRAME_MS)
    # the sender restarts 1000 numbers and 1000 frames back in both seq and timestamp
    statuses = []
    for k in range(cap + 3):
        now = (110 + k) * FRAME_MS
        seq, ts, payload = packet(k)
        statuses.append(jb.push(seq - 1000 + 65536, ts, payload, now))
        drain(jb, now)
    assert statuses[: cap - 1] == [LATE] * (cap - 1)
    assert statuses[cap - 1] == RESET
    assert statuses[cap:] == [ACCEPTED] * 3
    assert jb.resets == 1


@settings(max_examples=150, deadline=None)
@given(
    cap=st.sampled_from([1, 4, 8, 64]),
    events=st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFFFFFF),
            st.floats(-1e6, 1e6),
            st.booleans(),
        ),
        min_size=1,
        max_size=200,
    ),
)
def test_memory_is_bounded_whatever_is_pushed(
    cap: int, events: list[tuple[int, int, float, bool]]
) -> None:
    jb = make(capacity=cap)
    out = bytearray(FRAME_BYTES)
    for k, (seq, ts, now, poll) in enumerate(events):
        assert jb.push(seq, ts, FRAMES[k % N_FRAMES], now) in (
            ACCEPTED,
            DUPLICATE,
            LATE,
            RESET,
        )
        assert 0 <= jb.depth <= cap
        if poll:
            polled = 0
            while jb.pop_into(out, now) >= 0 and polled < 10 * cap:
                polled += 1
            assert 0 <= jb.depth <= cap


def test_far_seq_jumps_keep_depth_bounded() -> None:
    jb = make(capacity=16)
    for k in range(2000):
        seq = (k * 7919) & 0xFFFF  # strides far beyond the window
        jb.push(seq, k * SPF, FRAMES[k % N_FRAMES], k * FRAME_MS)
        assert jb.depth <= 16
    assert jb.resets > 0


def test_a_payload_of_the_wrong_length_is_rejected_and_counted() -> None:
    jb = make()
    assert jb.push(0, 0, FRAMES[0][:-2], 0.0) == INVALID
    assert jb.push(0, 0, FRAMES[0] + b"\0\0", 0.0) == INVALID
    assert jb.invalid == 2 and jb.received == 0 and jb.pop(1e9) is None
    assert jb.push(0, 0, memoryview(FRAMES[0]), 0.0) == ACCEPTED  # any bytes-like payload
    assert released_ids(drain(jb, 0.0)) == [0]


# ---- adaptation ----------------------------------------------------------------------------------


def _run(jb: JitterBuffer, delays_ms: np.ndarray) -> None:
    for i, delay in enumerate(delays_ms):
        now = i * FRAME_MS + float(delay)
        push(jb, i, now)
        drain(jb, now)


def test_jitter_estimate_grows_under_jittered_arrival() -> None:
    steady, jittery = make(max_delay_ms=200.0), make(max_delay_ms=200.0)
    _run(steady, np.zeros(300))
    _run(jittery, np.random.default_rng(3).uniform(0.0, 40.0, 300))
    assert steady.jitter_ms == 0.0 and steady.target_delay_ms == 0.0
    assert jittery.jitter_ms > 5.0
    assert 0.0 < jittery.target_delay_ms <= 200.0
    assert jittery.target_delay_ms >= 4.0 * jittery.jitter_ms - 1e-9  # k*J with k = 4


@settings(max_examples=60, deadline=None)
@given(
    min_delay=st.floats(0.0, 100.0),
    span=st.floats(0.0, 200.0),
    delays=st.lists(st.floats(0.0, 2_000.0), min_size=2, max_size=120),
)
def test_target_delay_stays_within_its_bounds(
    min_delay: float, span: float, delays: list[float]
) -> None:
    jb = make(min_delay_ms=min_delay, max_delay_ms=min_delay + span)
    for i, delay in enumerate(delays):
        now = i * FRAME_MS + delay
        push(jb, i, now)
        drain(jb, now)
        assert min_delay <= jb.target_delay_ms <= min_delay + span


def test_reordering_raises_the_target_delay_enough_to_wait_for_the_straggler() -> None:
    jb = make()
    # every 10th packet arrives 30 ms late, after its successor
    arrivals = sorted((i * FRAME_MS + (30.0 if i % 10 == 5 else 0.0), i) for i in range(200))
    out: list[JitterFrame] = []
    for now, i in arrivals:
        push(jb, i, now)
        out += drain(jb, now)
    assert jb.reordered > 0
    assert jb.target_delay_ms >= 30.0 * 0.9
    # once the target has adapted, stragglers are waited for rather than concealed
    assert all(f.kind == PACKET for f in out[-50:])


# ---- interfaces ----------------------------------------------------------------------------------


def test_pop_into_and_drain_into_yield_what_pop_yields() -> None:
    script = [(i, i * FRAME_MS + (7.0 if i % 4 == 1 else 0.0)) for i in range(40) if i % 9 != 3]
    a, b, c = make(), make(), make()
    by_pop: list[tuple[int, bytes]] = []
    by_pop_into: list[tuple[int, bytes]] = []
    by_drain: list[tuple[int, bytes]] = []
    one = bytearray(FRAME_BYTES)
    many = bytearray(3 * FRAME_BYTES)
    kinds = bytearray(3)
    for i, now in script:
        for jb in (a, b, c):
            push(jb, i, now)
        by_pop += [(f.kind, f.data) for f in drain(a, now)]
        while (kind := b.pop_into(one, now)) >= 0:
            by_pop_into.append((kind, bytes(one)))
        while n := c.drain_into(many, now, kinds):
            by_drain += [
                (kinds[j], bytes(many[j * FRAME_BYTES : (j + 1) * FRAME_BYTES])) for j in range(n)
            ]
    assert CONCEALED in {k for k, _ in by_pop}
    assert by_pop_into == by_pop
    assert by_drain == by_pop
    assert a.stats() == b.stats() == c.stats()


def test_buffers_too_small_for_a_frame_are_refused() -> None:
    jb = make()
    push(jb, 0, 0.0)
    with pytest.raises(ValueError):
        jb.pop_into(bytearray(FRAME_BYTES - 1), 0.0)
    with pytest.raises(ValueError):
        jb.drain_into(bytearray(FRAME_BYTES - 1), 0.0)
    with pytest.raises(ValueError):
        jb.drain_into(bytearray(2 * FRAME_BYTES), 0.0, bytearray(1))
    assert jb.depth == 1  # nothing was consumed by the refused calls


def test_stats_report_every_counter() -> None:
    jb = make()
    push(jb, 0, 0.0)
    drain(jb, 0.0)
    assert jb.stats() == {
        "received": 1,
        "released": 1,
        "lost": 0,
        "concealed": 0,
        "late": 0,
        "duplicates": 0,
        "reordered": 0,
        "resets": 0,
        "invalid": 0,
        "depth": 0,
        "jitter_ms": 0.0,
        "target_delay_ms": 0.0,
    }


def test_reset_forgets_the_stream_but_keeps_the_counters() -> None:
    jb = make()
    push(jb, 5, 0.0)
    jb.reset()
    assert jb.pop(1e9) is None and jb.depth == 0 and jb.received == 1
    assert push(jb, 40000, 0.0) == ACCEPTED  # any seq starts the new stream
    assert released_ids(drain(jb, 0.0)) == [40000 % N_FRAMES]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frame_bytes": 0},
        {"frame_bytes": 321},
        {"samples_per_frame": 0},
        {"clock_rate": 0},
        {"capacity": 48},
        {"capacity": 0},
        {"min_delay_ms": 50.0, "max_delay_ms": 10.0},
        {"min_delay_ms": -1.0},
        {"jitter_factor": -1.0},
        {"fade_frames": -1},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "frame_bytes": FRAME_BYTES,
        "samples_per_frame": SPF,
        "clock_rate": RATE,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        JitterBuffer(**args)  # type: ignore[arg-type]


# -- ordered transports (TCP) -------------------------------------------------------------------


def ordered_buffer() -> JitterBuffer:
    return JitterBuffer(FRAME_BYTES_ORDERED, 160, 8000, capacity=64, min_delay_ms=0.0, ordered=True)


FRAME_BYTES_ORDERED = 320


def pcm_frame(i: int) -> bytes:
    return bytes([i % 251, (i * 7) % 251]) * (FRAME_BYTES_ORDERED // 2)


def test_ordered_stream_loses_nothing_to_a_stall_and_burst() -> None:
    jb = ordered_buffer()
    out = bytearray(FRAME_BYTES_ORDERED)
    kinds: list[int] = []
    frames: list[bytes] = []
    arrival = 0.0
    for seq in range(1, 200):
        # the socket stalls for 300 ms after packet 49; the 15 packets sent meanwhile arrive at once
        arrival = max(arrival, 64 * 20.0 + 10.0 if 50 <= seq < 65 else seq * 20.0)
        jb.push(seq, seq * 160, pcm_frame(seq), arrival)
        while (kind := jb.pop_into(out, arrival)) >= 0:
            kinds.append(kind)
            frames.append(bytes(out))
    assert kinds == [PACKET] * 199
    assert frames == [pcm_frame(s) for s in range(1, 200)]
    assert jb.late == 0 and jb.lost == 0


def test_ordered_stream_conceals_a_skipped_packet_as_soon_as_the_next_arrives() -> None:
    jb = ordered_buffer()
    out = bytearray(FRAME_BYTES_ORDERED)
    jb.push(1, 160, pcm_frame(1), 20.0)
    assert jb.pop_into(out, 20.0) == PACKET
    # packet 2 never comes; 3 arrives on time: 2 is concealed at once, then 3 follows
    assert jb.pop_into(out, 1000.0) == -1  # lateness alone is not loss on an ordered transport
    jb.push(3, 480, pcm_frame(3), 60.0)
    assert jb.pop_into(out, 60.0) == CONCEALED
    assert jb.pop_into(out, 60.0) == PACKET and bytes(out) == pcm_frame(3)
    assert jb.next_deadline() is None
