"""Kernel benchmark of the jitter buffer: one packet pushed and popped, native against aiortc's.

Both sides get the same stream: 20 ms packets on a 48 kHz clock (Opus-like: seq +1, timestamp
+960, arrival +20 ms), in order, a 320-byte payload, built before timing. One call of a case's
func is one packet through the buffer, in the way each buffer is driven in practice:

- native: ``push`` then ``drain_into`` a reused buffer with room for four frames (one call
  per drain, the way the pipeline hands frames to its resampler in one chunk); the case
  "native, pop_into per frame" drains with ``pop_into`` until it returns -1 instead (one
  frame out, then one empty poll), for the per-frame interface's cost;
- aiortc: ``add(packet)``, which returns the frame that packet completes, configured as
  aiortc's own RTCRtpReceiver configures it for audio (capacity 16, prefetch 4).

The stream cycles through 65536 packets, so sequence numbers wrap 65535 -> 0 as on the wire and
neither buffer's state degenerates however many calls the runner makes. At the cycle's end the
timestamp and the arrival time jump back together (by 65536 frames), so each packet's transit
time, and with it the native buffer's timing model, is unchanged.

Run standalone for a quick reading: ``python -m bench.kernels_jitter``.
"""

from __future__ import annotations

import itertools
import timeit
from collections.abc import Callable

from aiortc.jitterbuffer import JitterBuffer as AiortcJitterBuffer
from aiortc.rtp import RtpPacket

from bench.kernel_case import Case
from engine.audio.jitter import JitterBuffer

GROUP = "jitter buffer push+pop per packet"
CLOCK_RATE = 48_000
SAMPLES_PER_FRAME = 960  # 20 ms at 48 kHz
FRAME_MS = 20.0
PAYLOAD_BYTES = 320
CYCLE = 65_536  # one full turn of the 16-bit sequence number


def _payload() -> bytes:
    # neither buffer looks into the payload, both copy or keep it: any fixed bytes will do
    return bytes(range(256)) + bytes(range(PAYLOAD_BYTES - 256))


def _stream() -> list[tuple[int, int, float]]:
    return [(i & 0xFFFF, (i * SAMPLES_PER_FRAME) & 0xFFFFFFFF, i * FRAME_MS) for i in range(CYCLE)]


def native_drain_case() -> Callable[[], object]:
    payload = _payload()
    jb = JitterBuffer(PAYLOAD_BYTES, SAMPLES_PER_FRAME, CLOCK_RATE)
    out = bytearray(4 * PAYLOAD_BYTES)
    packets = itertools.cycle(_stream())
    push, drain_into = jb.push, jb.drain_into

    def one_packet() -> object:
        seq, ts, now = next(packets)
        push(seq, ts, payload, now)
        return drain_into(out, now)

    return one_packet


def native_pop_case() -> Callable[[], object]:
    payload = _payload()
    jb = JitterBuffer(PAYLOAD_BYTES, SAMPLES_PER_FRAME, CLOCK_RATE)
    out = bytearray(PAYLOAD_BYTES)
    packets = itertools.cycle(_stream())
    push, pop_into = jb.push, jb.pop_into

    def one_packet() -> object:
        seq, ts, now = next(packets)
        push(seq, ts, payload, now)
        while pop_into(out, now) >= 0:
            pass
        return None

    return one_packet


def aiortc_case() -> Callable[[], object]:
    payload = _payload()
    jb = AiortcJitterBuffer(capacity=16, prefetch=4)
    built = []
    shared = RtpPacket()
    for seq, ts, _now in _stream():
        packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=ts, payload=payload)
        # aiortc's receiver attaches the depayloaded frame as _data before add(); so do we
        packet._data = payload  # type: ignore[attr-defined]
        # add() never reads these: share one of each to keep 65536 packets small in memory
        packet.extensions, packet.csrc = shared.extensions, shared.csrc
        built.append(packet)
    packets = itertools.cycle(built)
    add = jb.add

    def one_packet() -> object:
        return add(next(packets))

    return one_packet


def cases() -> list[Case]:
    return [
        Case(GROUP, "aiortc", aiortc_case(), baseline=True),
        Case(GROUP, "native", native_drain_case(), target=10.0),
        Case(GROUP, "native, pop_into per frame", native_pop_case()),
    ]


def _measure(all_cases: list[Case], number: int = 100_000, repeat: int = 15) -> dict[str, float]:
    """Best ns per call of each case; repeats interleaved so a noisy machine hits all alike."""
    best = {case.name: float("inf") for case in all_cases}
    for _ in range(repeat):
        for case in all_cases:
            seconds = timeit.timeit(case.func, number=number)
            best[case.name] = min(best[case.name], seconds / number * 1e9)
    return best


if __name__ == "__main__":
    timings = _measure(cases())
    for name, ns in timings.items():
        print(f"{GROUP}: {name:>27} {ns:6.0f} ns/packet  {timings['aiortc'] / ns:5.1f}x aiortc")
