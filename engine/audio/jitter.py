"""The adaptive jitter buffer: Python face of engine._native.jitter, which does the per-packet work.

It turns an unreliable stream of fixed-size 16-bit PCM frames (decoded RTP G.711, Twilio media
messages) into an in-order frame stream whose clock never stalls. Sans-IO: the arrival time is an
argument; nothing here reads a clock or sleeps.

Model
-----
Sequence numbers decide order; time decides only when to give up on a missing packet.

- A packet is released as soon as it is the next expected one, whatever the time: consumers
  (VAD, recognition, the assistant) process audio rather than play it, so a packet already here
  is never held back to smooth playout.
- When the next expected packet is missing, it is waited for until its deadline, then replaced
  by a CONCEALED frame and the stream moves on. deadline = expected arrival + target delay, where
  expected arrival = anchor + media time of the frame (from RTP timestamps, not from sequence
  numbers, so a sender pause with contiguous numbers is not mistaken for a run of late packets).
  The anchor is the minimum transit time (arrival minus media time) over the last 50-100
  packets: the earliest-arriving baseline. It drops at once when packets start arriving earlier
  and follows clock drift or a lengthened path upwards within two blocks of 50 packets.
- Target delay = clamp(max(jitter_factor * J, P), min_delay_ms, max_delay_ms). J is the RFC 3550
  interarrival jitter (J += (|D| - J) / 16 over transit differences, in ms). P is the peak lateness
  (arrival after the expected arrival) of packets that came out of order or too late, decaying by
  half in about 140 packets: it measures the delay that would have caught them directly, so it is
  a floor under k*J rather than added to it. In-order TCP input (Twilio) has J ~ 0, so with
  min_delay_ms = 0 a gap is given up on as soon as the next packet is overdue.
- Concealment repeats the last released frame faded by -6 dB per frame (linear within the frame,
  the last of `fade_frames` frames ending at zero), then silence. Payloads are therefore 16-bit
  PCM (native byte order, mono or interleaved); decode G.711 before pushing.

Policies
--------
- Wrap: seq is extended RFC 3550 A.1-style (signed 16-bit distance from the highest seen) and the
  timestamp likewise over 32 bits, so 65535 -> 0 and 2**32 -> 0 are ordinary steps. Callers may
  pass larger counters (Twilio's `chunk` grows past 65535): they are taken modulo 2**16 / 2**32.
- Payload length != frame_bytes: the packet is dropped and push returns INVALID (counted in
  `invalid`); it changes nothing else, so the gap it leaves is concealed like a loss. Truncating
  or padding would hide a frame-size mismatch (say ptime 30 against 20) behind broken audio.
- DUPLICATE: a packet already held, or already released less than `capacity` numbers ago.
  Dropped (an older copy is judged LATE, which drops it all the same).
- LATE: a packet behind the next expected one whose media time has already been produced
  (released past or concealed). Dropped. The window start may move back instead, accepting it,
  when no frame of its media time was produced yet: before the first pop (the first packets
  arrived out of order), or after a sender pause where the frame clock concealed sequence numbers
  the sender never used (DTX; a Twilio `timestamp` jump with contiguous `chunk`).
- RESET: the window is `capacity` packets from the next expected one. A packet beyond it (a long
  outage nobody polled through, or the sender jumping its numbers) restarts the window on that
  packet: held packets are dropped, every number skipped counts as lost, the timing anchor is
  re-established, and the frame clock is not rewound or filled: the next pop returns the packet.
  max(capacity, 8) consecutive LATE packets with consecutive numbers are taken the same way
  (the sender restarted at lower numbers, or a stall outlasted the window; the rest of a stalled
  burst is then released rather than dropped). Memory never grows: depth <= capacity whatever
  is pushed.
- A timestamp gap with contiguous seq is not filled afterwards: if the consumer polled through
  it, concealment already filled it in real time; if not, no audio is invented.

Ordered transports
------------------
`ordered=True` is for streams carried over TCP (Twilio Media Streams): packets can arrive late in
a burst after a stall, but never out of order and never after a later one. There, a missing packet
is concealed at once when a later packet is held (the sender skipped it: a proven loss) and never
for lateness alone, so a stall followed by a burst loses nothing. `next_deadline()` is then None.

Driving it
----------
One buffer per inbound stream, on the stream's task::

    jb = JitterBuffer(frame_bytes=320, samples_per_frame=160, clock_rate=8000)
    out = bytearray(jb.frame_bytes)

    # for each packet received:
    jb.push(seq, timestamp, pcm, now_ms)
    while (kind := jb.pop_into(out, now_ms)) >= 0:   # drain: in-order packets come out at once
        consume(out, kind)

    # and from the call's frame timer (every frame_ms, or at jb.next_deadline()):
    while (kind := jb.pop_into(out, now_ms)) >= 0:   # gives up on overdue packets; when the
        consume(out, kind)                           # stream stops, one frame per frame_ms

drain_into(buf, now_ms, kinds=None) does the whole drain in one call, writing the due frames
back to back into buf (as many as fit; call again if it comes back full) and returning how many:
the cheapest way to hand them to the next stage as one chunk. pop(now_ms) returns a JitterFrame
(kind, seq, timestamp, data) or None, at the cost of one bytes object per frame.

Before the first packet nothing comes out. `now_ms` is any monotonic clock in ms (e.g.
time.monotonic() * 1000) used consistently for push and pop. A drain yields as many frames as
frame times have passed, so a timer that stalled for 2 s gets 100 frames on its next tick.
next_deadline() says when the missing next frame will be given up on, for a caller that would
rather arm a timer than poll. Call reset() when the stream changes identity (a new SSRC);
counters survive it.

Statistics are cheap properties and `stats()`: received (valid pushes, whatever became of
them), released, lost (numbers never released, counted once the stream moves past them),
concealed (frames), late, duplicates, reordered, resets, invalid, depth (packets held),
jitter_ms, target_delay_ms.
"""

from __future__ import annotations

from engine._native.jitter import (
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

__all__ = [
    "ACCEPTED",
    "CONCEALED",
    "DUPLICATE",
    "INVALID",
    "LATE",
    "PACKET",
    "RESET",
    "JitterBuffer",
    "JitterFrame",
]
