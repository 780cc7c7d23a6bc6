# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Adaptive jitter buffer for PCM frames: reorder, drop duplicates and late packets, conceal gaps.

Owns the per-packet work of turning an unreliable packet stream (RTP, Twilio media messages) into
an in-order frame stream whose clock never stalls. Sans-IO: arrival time is an argument, nothing
here reads a clock. The model, the policies and how to drive it are documented in
engine/audio/jitter.py; this file holds the mechanism.

Memory: one ring of `capacity` fixed-size slots, allocated once in __cinit__. Nothing is allocated
per packet except by the convenience method pop(), which returns a new bytes object.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport INFINITY, fabs, pow
from libc.stdint cimport int16_t, int64_t, uint8_t
from libc.string cimport memcpy, memset

cimport cython

# push() statuses
ACCEPTED = 0  # stored; it comes out of pop() in sequence order
DUPLICATE = 1  # this sequence number is already held or was just released: dropped
LATE = 2  # its turn has passed (released past it or concealed it): dropped
RESET = 3  # a jump the window cannot span: the window restarted at this packet (stored)
INVALID = 4  # payload length is not frame_bytes: dropped, nothing else changes

# pop() / pop_into() kinds
PACKET = 1  # a received packet, in sequence order
CONCEALED = 2  # stands in for a missing packet: faded repeat of the last packet, then silence

cdef enum:
    C_ACCEPTED = 0
    C_DUPLICATE = 1
    C_LATE = 2
    C_RESET = 3
    C_INVALID = 4
    C_PACKET = 1
    C_CONCEALED = 2
    C_NOTHING = -1

    SLOT_EMPTY = 0
    SLOT_HELD = 1  # waiting to be released
    SLOT_DONE = 2  # released; kept so a duplicate of it is recognised until the slot is reused

    # RFC 3550 smoothing: J += (|D| - J) / 16
    JITTER_GAIN_INV = 16
    # The arrival baseline is the minimum transit over the last one to two blocks of this many
    # packets (about 1-2 s of 20 ms frames): it follows clock drift and a lengthened network path
    # within two blocks, and a shortened one at once.
    ANCHOR_BLOCK = 50
    # Consecutive late packets that make a restart: max(capacity, this), so that a small window
    # does not restart on a couple of stragglers.
    LATE_RUN_MIN = 8

# Extended sequence numbers and timestamps start far from zero so they stay positive whichever way
# the first packets unwrap; only differences are ever used.
cdef int64_t SEQ_BASE = (<int64_t>1) << 32
cdef int64_t TS_BASE = (<int64_t>1) << 40
# 32-bit timestamp arithmetic, as C constants (a bare literal this large would be a Python int)
cdef int64_t TS_MOD = (<int64_t>1) << 32
cdef int64_t TS_MASK = TS_MOD - 1
cdef int64_t TS_HALF = (<int64_t>1) << 31
# Per packet pushed, the lateness peak decays by this factor: half-life ~140 packets (~2.8 s).
cdef double PEAK_DECAY = 0.995


cdef object _too_small(Py_ssize_t have, Py_ssize_t need):
    return ValueError(f"out holds {have} bytes, a frame needs {need}")


@cython.final
cdef class JitterFrame:
    """One frame out of the buffer.

    kind: PACKET or CONCEALED. seq: 16-bit sequence number of the packet (for CONCEALED, of the
    packet it stands in for). timestamp: 32-bit media timestamp, clock units. data: frame_bytes of
    16-bit PCM.
    """

    cdef readonly int kind
    cdef readonly int seq
    cdef readonly long long timestamp
    cdef readonly bytes data

    def __repr__(self) -> str:
        name = "PACKET" if self.kind == C_PACKET else "CONCEALED"
        return (
            f"JitterFrame({name}, seq={self.seq}, timestamp={self.timestamp},"
            f" {len(self.data)} bytes)"
        )


@cython.final
cdef class JitterBuffer:
    """Reorders fixed-size 16-bit PCM frames by sequence number; see engine/audio/jitter.py."""

    cdef:
        # configuration
        Py_ssize_t fb  # frame_bytes
        int64_t spf  # samples_per_frame, in timestamp units
        int64_t cap, mask
        double rate, ms_per_unit, min_delay, max_delay, k_jitter
        int fade_frames
        bint ordered  # the transport never reorders (TCP): a gap is proven by a later packet

        # the ring, allocated once
        uint8_t* data  # cap * fb payload bytes
        int64_t* slot_seq  # extended seq held in the slot
        int64_t* slot_ts  # extended timestamp of that packet
        uint8_t* slot_state
        uint8_t* last_good  # copy of the last released frame once its slot is reused

        # stream position
        bint started  # a packet has been seen since construction / reset()
        bint played  # the frame clock has run: a packet below the window start is judged late
        int64_t next_seq  # extended seq of the next frame to pop
        int64_t play_ts  # extended timestamp of the next frame to pop (the frame clock)
        int64_t highest  # highest extended seq seen: the reference for unwrapping
        int64_t highest_ts
        int64_t last_ts  # last extended timestamp seen: the reference for unwrapping
        int64_t ts_origin
        int64_t last_released  # extended seq of the last PACKET popped
        bint have_good  # a frame has been released: concealment has something to repeat
        bint good_in_slot  # it still sits in its ring slot (no copy made yet)
        int conceal_run  # CONCEALED frames since the last PACKET
        int64_t late_run, late_run_next  # consecutive LATE packets with consecutive seqs

        # timing
        double anchor_cur, anchor_prev  # block minima of transit (arrival - media time), ms
        int block_n
        double prev_transit
        bint have_transit
        double jitter_ms_  # RFC 3550 interarrival jitter, ms
        double peak_ms  # decaying peak lateness of reordered and late packets, ms
        double target_ms

        # the last frame popped (for pop_into callers)
        int64_t out_seq, out_ts

        # counters
        int64_t n_received, n_released, n_lost, n_concealed, n_late, n_dup, n_reordered
        int64_t n_resets, n_invalid, n_depth

    def __cinit__(
        self,
        int frame_bytes,
        int samples_per_frame,
        int clock_rate,
        int capacity=64,
        double min_delay_ms=0.0,
        double max_delay_ms=200.0,
        double jitter_factor=4.0,
        int fade_frames=4,
        bint ordered=False,
    ):
        if frame_bytes <= 0 or frame_bytes % 2:
            raise ValueError(
                f"frame_bytes must be a positive even number (16-bit PCM), got {frame_bytes}"
            )
        if samples_per_frame <= 0:
            raise ValueError(f"samples_per_frame must be positive, got {samples_per_frame}")
        if clock_rate <= 0:
            raise ValueError(f"clock_rate must be positive, got {clock_rate}")
        # The window must stay well inside half the 16-bit sequence space for unwrapping to be
        # unambiguous.
        if capacity < 1 or capacity > 16384 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two in 1..16384, got {capacity}")
        if not 0.0 <= min_delay_ms <= max_delay_ms:
            raise ValueError(
                f"need 0 <= min_delay_ms <= max_delay_ms, got {min_delay_ms}, {max_delay_ms}"
            )
        if jitter_factor < 0.0:
            raise ValueError(f"jitter_factor must be >= 0, got {jitter_factor}")
        if fade_frames < 0:
            raise ValueError(f"fade_frames must be >= 0, got {fade_frames}")
        self.fb = frame_bytes
        self.spf = samples_per_frame
        self.rate = clock_rate
        self.ms_per_unit = 1000.0 / clock_rate
        self.cap = capacity
        self.mask = capacity - 1
        self.min_delay = min_delay_ms
        self.max_delay = max_delay_ms
        self.k_jitter = jitter_factor
        self.fade_frames = fade_frames
        self.ordered = ordered

        self.data = <uint8_t*>PyMem_Malloc(capacity * frame_bytes)
        self.slot_seq = <int64_t*>PyMem_Malloc(capacity * sizeof(int64_t))
        self.slot_ts = <int64_t*>PyMem_Malloc(capacity * sizeof(int64_t))
        self.slot_state = <uint8_t*>PyMem_Malloc(capacity)
        self.last_good = <uint8_t*>PyMem_Malloc(frame_bytes)
        if (
            self.data == NULL or self.slot_seq == NULL or self.slot_ts == NULL
            or self.slot_state == NULL or self.last_good == NULL
        ):
            raise MemoryError()
        memset(self.data, 0, capacity * frame_bytes)
        memset(self.last_good, 0, frame_bytes)
        self._clear()

    def __dealloc__(self):
        PyMem_Free(self.data)
        PyMem_Free(self.slot_seq)
        PyMem_Free(self.slot_ts)
        PyMem_Free(self.slot_state)
        PyMem_Free(self.last_good)

    cdef void _clear(self) noexcept:
        cdef int64_t i
        for i in range(self.cap):
            self.slot_seq[i] = -1
            self.slot_ts[i] = 0
            self.slot_state[i] = SLOT_EMPTY
        self.started = False
        self.played = False
        self.have_good = False
        self.good_in_slot = False
        self.conceal_run = 0
        self.late_run = 0
        self.late_run_next = -1
        self.next_seq = self.highest = self.last_released = 0
        self.play_ts = self.highest_ts = self.last_ts = self.ts_origin = 0
        self.anchor_cur = self.anchor_prev = INFINITY
        self.block_n = 0
        self.have_transit = False
        self.prev_transit = 0.0
        self.jitter_ms_ = 0.0
        self.peak_ms = 0.0
        self.target_ms = self.min_delay
        self.out_seq = self.out_ts = -1
        self.n_depth = 0

    def reset(self) -> None:
        """Forget the stream (e.g. a new SSRC): the next packet starts a new one. Counters stay."""
        self._clear()

    # ---- push ---------------------------------------------------------------------------------

    def push(self, long long seq, long long timestamp, payload, double now_ms) -> int:
        """Offer one packet that arrived at now_ms.

        Returns ACCEPTED, DUPLICATE, LATE, RESET or INVALID. seq is taken modulo 2**16 and
        timestamp modulo 2**32 (both may wrap). payload is any bytes-like of frame_bytes.
        """
        cdef const uint8_t* src
        cdef Py_ssize_t n
        cdef Py_buffer view
        cdef int status
        if PyBytes_CheckExact(payload):
            src = <const uint8_t*>PyBytes_AS_STRING(payload)
            n = PyBytes_GET_SIZE(payload)
            return self._push(<int64_t>(seq & 0xFFFF), <int64_t>timestamp & TS_MASK, src, n, now_ms)
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            status = self._push(
                <int64_t>(seq & 0xFFFF), <int64_t>timestamp & TS_MASK,
                <const uint8_t*>view.buf, view.len, now_ms,
            )
        finally:
            PyBuffer_Release(&view)
        return status

    cdef int _push(
        self, int64_t seq16, int64_t ts32, const uint8_t* src, Py_ssize_t n, double now
    ) noexcept:
        cdef int64_t d, ext, ts_ext, i
        cdef double transit
        if n != self.fb:
            self.n_invalid += 1
            return C_INVALID
        if not self.started:
            self.started = True
            self.ts_origin = TS_BASE + ts32
            self._restart(SEQ_BASE + seq16, TS_BASE + ts32, now)
            self._store(SEQ_BASE + seq16, TS_BASE + ts32, src)
            self.n_received += 1
            return C_ACCEPTED

        # RFC 3550 A.1-style extension: the 16-bit delta from the highest seq seen, taken signed.
        d = (seq16 - (self.highest & 0xFFFF)) & 0xFFFF
        if d >= 32768:
            d -= 65536
        ext = self.highest + d
        d = (ts32 - (self.last_ts & TS_MASK)) & TS_MASK
        if d >= TS_HALF:
            d -= TS_MOD
        ts_ext = self.last_ts + d
        self.last_ts = ts_ext
        self.n_received += 1
        transit = now - <double>(ts_ext - self.ts_origin) * self.ms_per_unit

        i = ext & self.mask
        if self.slot_seq[i] == ext and self.slot_state[i] != SLOT_EMPTY:
            self.n_dup += 1
            return C_DUPLICATE

        if ext >= self.next_seq:
            if ext - self.next_seq >= self.cap:
                return self._jump(ext, ts_ext, src, transit)
            self._accept(ext, ts_ext, src, transit)
            return C_ACCEPTED

        # Behind the window start. Accept it anyway (moving the start back) when no frame of its
        # media time has been produced yet: before the first pop (packets of the first burst
        # arriving out of order), or after a sender pause (DTX, a timestamp jump) during which the
        # frame clock concealed sequence numbers the sender never used. The window must still
        # cover everything held.
        if self.highest - ext < self.cap:
            if not self.played:
                self.last_released = ext - 1
                self.play_ts = ts_ext
                self.next_seq = ext
                self._accept(ext, ts_ext, src, transit)
                return C_ACCEPTED
            if ext > self.last_released and 2 * ts_ext >= 2 * self.play_ts - self.spf:
                self.next_seq = ext
                self._accept(ext, ts_ext, src, transit)
                return C_ACCEPTED

        self._timing(transit, True)
        self.n_late += 1
        # A long run of consecutive late packets means the stream is not behind us by accident
        # but restarted at lower numbers (or stalled for longer than the window): restart on it.
        if ext == self.late_run_next:
            self.late_run += 1
        else:
            self.late_run = 1
        self.late_run_next = ext + 1
        if self.late_run >= self.cap and self.late_run >= LATE_RUN_MIN:
            self.n_late -= 1
            return self._jump(ext, ts_ext, src, transit)
        return C_LATE

    cdef inline void _accept(
        self, int64_t ext, int64_t ts_ext, const uint8_t* src, double transit
    ) noexcept:
        cdef bint reordered = ext < self.highest
        self._timing(transit, reordered)
        self._store(ext, ts_ext, src)
        self.late_run = 0
        if reordered:
            self.n_reordered += 1
        else:
            self.highest = ext
            self.highest_ts = ts_ext

    cdef inline void _store(self, int64_t ext, int64_t ts_ext, const uint8_t* src) noexcept:
        cdef int64_t i = ext & self.mask
        cdef uint8_t* slot = self.data + i * self.fb
        if self.good_in_slot and i == (self.last_released & self.mask):
            # concealment may still need the last released frame: keep a copy before reuse
            memcpy(self.last_good, slot, self.fb)
            self.good_in_slot = False
        memcpy(slot, src, self.fb)
        self.slot_seq[i] = ext
        self.slot_ts[i] = ts_ext
        self.slot_state[i] = SLOT_HELD
        self.n_depth += 1

    cdef int _jump(self, int64_t ext, int64_t ts_ext, const uint8_t* src, double transit) noexcept:
        """The packet is beyond what the window can span: restart the window on it.

        Held packets are dropped and every sequence number between the last released packet and
        this one counts as lost. The frame clock is not rewound: concealment already produced
        stays produced, and the next pop returns this packet.
        """
        cdef int64_t gone
        if ext > self.last_released:
            gone = ext - self.last_released - 1
        else:
            gone = (self.next_seq - self.last_released - 1) + self.n_depth
        if gone > 0:
            self.n_lost += gone
        self._restart(ext, ts_ext, transit)
        # The frame clock is not rewound: numbers below this one are late from now on (and the
        # ones skipped were counted as lost above).
        self.played = True
        self._store(ext, ts_ext, src)
        self.n_resets += 1
        return C_RESET

    cdef void _restart(self, int64_t ext, int64_t ts_ext, double transit) noexcept:
        if self.good_in_slot:
            memcpy(self.last_good, self.data + (self.last_released & self.mask) * self.fb, self.fb)
            self.good_in_slot = False
        memset(self.slot_state, SLOT_EMPTY, self.cap)
        self.n_depth = 0
        self.next_seq = ext
        self.highest = ext
        self.highest_ts = ts_ext
        self.last_released = ext - 1
        self.last_ts = ts_ext
        self.play_ts = ts_ext
        self.played = False
        self.late_run = 0
        self.late_run_next = -1
        # The timeline may have jumped: re-anchor on this packet, keep the network's jitter.
        self.anchor_cur = self.anchor_prev = transit
        self.block_n = 0
        self.prev_transit = transit
        self.have_transit = True
        self._update_target()

    cdef inline void _timing(self, double transit, bint out_of_order) noexcept:
        cdef double d, lateness
        if self.have_transit:
            d = fabs(transit - self.prev_transit)
            self.jitter_ms_ += (d - self.jitter_ms_) / JITTER_GAIN_INV
        self.prev_transit = transit
        self.have_transit = True
        if transit < self.anchor_cur:
            self.anchor_cur = transit
        self.block_n += 1
        if self.block_n >= ANCHOR_BLOCK:
            self.anchor_prev = self.anchor_cur
            self.anchor_cur = INFINITY
            self.block_n = 0
        self.peak_ms *= PEAK_DECAY
        if out_of_order:
            # how long after its expected arrival it came: the delay that would have caught it
            lateness = transit - self._anchor()
            if lateness > self.peak_ms:
                self.peak_ms = lateness
        self._update_target()

    cdef inline double _anchor(self) noexcept:
        return self.anchor_cur if self.anchor_cur < self.anchor_prev else self.anchor_prev

    cdef inline void _update_target(self) noexcept:
        cdef double t = self.k_jitter * self.jitter_ms_
        # Reordered and late packets measure the needed delay directly, in the same unit; adding
        # them to k*J would count the same delay spread twice.
        if self.peak_ms > t:
            t = self.peak_ms
        if t < self.min_delay:
            t = self.min_delay
        elif t > self.max_delay:
            t = self.max_delay
        self.target_ms = t

    # ---- pop ----------------------------------------------------------------------------------

    cdef inline int _ready(self, double now) noexcept:
        """What the next pop yields at `now`: C_PACKET, C_CONCEALED or C_NOTHING."""
        cdef int64_t i
        if not self.started:
            return C_NOTHING
        i = self.next_seq & self.mask
        if self.slot_state[i] == SLOT_HELD and self.slot_seq[i] == self.next_seq:
            return C_PACKET
        if self.ordered:
            # In order or not at all: a later packet proves the gap at once; with none held, the
            # next one is merely late (a stalled socket delivers it later), not lost.
            return C_CONCEALED if self.n_depth > 0 else C_NOTHING
        if now < self._deadline():
            return C_NOTHING
        return C_CONCEALED

    cdef inline int64_t _missing_ts(self) noexcept:
        """Media timestamp of the missing next frame: the clock, or earlier than a held packet."""
        cdef int64_t est = self.play_ts
        cdef int64_t est2
        if self.n_depth > 0:
            est2 = self.highest_ts - (self.highest - self.next_seq) * self.spf
            if est2 > est:
                est = est2
        return est

    cdef inline double _deadline(self) noexcept:
        return (
            self._anchor()
            + <double>(self._missing_ts() - self.ts_origin) * self.ms_per_unit
            + self.target_ms
        )

    cdef inline const uint8_t* _release(self) noexcept:
        """Advance past the held next packet; returns its payload (valid until the slot's reuse)."""
        cdef int64_t s = self.next_seq
        cdef int64_t i = s & self.mask
        self.slot_state[i] = SLOT_DONE
        self.n_depth -= 1
        self.n_lost += s - self.last_released - 1
        self.n_released += 1
        self.last_released = s
        self.have_good = True
        self.good_in_slot = True
        self.conceal_run = 0
        self.out_seq = s
        self.out_ts = self.slot_ts[i]
        self.play_ts = self.slot_ts[i] + self.spf
        self.next_seq = s + 1
        self.played = True
        return self.data + i * self.fb

    cdef void _conceal(self, uint8_t* out) noexcept:
        """Write the concealment frame for the missing next packet and advance past it."""
        cdef int64_t ts = self._missing_ts()
        cdef int k, j, n
        cdef double g0, g1, step
        cdef const int16_t* src
        cdef int16_t* dst = <int16_t*>out
        if self.conceal_run <= self.fade_frames:  # saturates: a silence run may last forever
            self.conceal_run += 1
        k = self.conceal_run
        n = <int>(self.fb // 2)
        if not self.have_good or k > self.fade_frames:
            memset(out, 0, self.fb)
        else:
            if self.good_in_slot:
                src = <const int16_t*>(self.data + (self.last_released & self.mask) * self.fb)
            else:
                src = <const int16_t*>self.last_good
            # -6 dB per frame, linear within the frame; the last fading frame ends at zero so
            # the step into silence makes no click.
            g0 = pow(0.5, k - 1)
            g1 = g0 * 0.5 if k < self.fade_frames else 0.0
            step = (g1 - g0) / n
            for j in range(n):
                dst[j] = <int16_t>(src[j] * (g0 + step * j))
        self.n_concealed += 1
        self.out_seq = self.next_seq
        self.out_ts = ts
        self.play_ts = ts + self.spf
        self.next_seq += 1
        self.played = True

    def pop(self, double now_ms):
        """The next frame due at now_ms, PACKET or CONCEALED, as a JitterFrame; None if none is."""
        cdef int kind = self._ready(now_ms)
        cdef bytes data
        cdef JitterFrame frame
        if kind == C_NOTHING:
            return None
        if kind == C_PACKET:
            data = PyBytes_FromStringAndSize(<const char*>self._release(), self.fb)
        else:
            data = PyBytes_FromStringAndSize(NULL, self.fb)
            self._conceal(<uint8_t*>PyBytes_AS_STRING(data))
        frame = JitterFrame.__new__(JitterFrame)
        frame.kind = kind
        frame.seq = <int>(self.out_seq & 0xFFFF)
        frame.timestamp = self.out_ts & TS_MASK
        frame.data = data
        return frame

    cdef inline void _emit(self, int kind, uint8_t* dst) noexcept:
        if kind == C_PACKET:
            memcpy(dst, self._release(), self.fb)
        else:
            self._conceal(dst)

    cdef Py_ssize_t _drain(
        self, uint8_t* dst, Py_ssize_t room, uint8_t* kinds, double now
    ) noexcept:
        cdef int kind
        cdef Py_ssize_t n = 0
        while n < room:
            kind = self._ready(now)
            if kind == C_NOTHING:
                break
            self._emit(kind, dst + n * self.fb)
            if kinds != NULL:
                kinds[n] = <uint8_t>kind
            n += 1
        return n

    def pop_into(self, out, double now_ms) -> int:
        """Like pop(), writing the frame into the writable buffer `out` (>= frame_bytes).

        Returns PACKET or CONCEALED, or -1 when nothing is due (out untouched). No allocation.
        """
        cdef int kind = self._ready(now_ms)
        cdef Py_buffer view
        if kind == C_NOTHING:
            return C_NOTHING
        if PyByteArray_CheckExact(out):
            # the common case, without the buffer protocol's acquire and release
            if PyByteArray_GET_SIZE(out) < self.fb:
                raise _too_small(PyByteArray_GET_SIZE(out), self.fb)
            self._emit(kind, <uint8_t*>PyByteArray_AS_STRING(out))
            return kind
        PyObject_GetBuffer(out, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if view.len < self.fb:
                raise _too_small(view.len, self.fb)
            self._emit(kind, <uint8_t*>view.buf)
        finally:
            PyBuffer_Release(&view)
        return kind

    def drain_into(self, out, double now_ms, kinds=None) -> int:
        """Pop every frame due at now_ms into `out`, back to back; returns how many were written.

        At most len(out) // frame_bytes frames: when the return value equals that, call again.
        If `kinds` (a writable buffer of at least that many bytes) is given, kinds[i] is the kind
        of frame i. One call per drain instead of one per frame, and no allocation: the frames
        go to the next stage (a resampler) as one chunk.
        """
        cdef Py_buffer view, kview
        cdef Py_ssize_t room, n
        if kinds is None and PyByteArray_CheckExact(out):
            room = PyByteArray_GET_SIZE(out) // self.fb
            if room == 0:
                raise _too_small(PyByteArray_GET_SIZE(out), self.fb)
            return self._drain(<uint8_t*>PyByteArray_AS_STRING(out), room, NULL, now_ms)
        PyObject_GetBuffer(out, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            room = view.len // self.fb
            if room == 0:
                raise _too_small(view.len, self.fb)
            if kinds is None:
                return self._drain(<uint8_t*>view.buf, room, NULL, now_ms)
            PyObject_GetBuffer(kinds, &kview, PyBUF_SIMPLE | PyBUF_WRITABLE)
            try:
                if kview.len < room:
                    raise ValueError(
                        f"kinds holds {kview.len} bytes, out has room for {room} frames"
                    )
                n = self._drain(<uint8_t*>view.buf, room, <uint8_t*>kview.buf, now_ms)
            finally:
                PyBuffer_Release(&kview)
        finally:
            PyBuffer_Release(&view)
        return n

    def next_deadline(self) -> float | None:
        """When (ms) the missing next frame will be given up on; None if no frame is missing.

        A caller with its own timer can sleep until then instead of polling every frame.
        """
        if not self.started or self._ready(-INFINITY) == C_PACKET or self.ordered:
            return None
        return self._deadline()

    # ---- configuration and statistics ---------------------------------------------------------

    @property
    def frame_bytes(self) -> int:
        return self.fb

    @property
    def samples_per_frame(self) -> int:
        return self.spf

    @property
    def clock_rate(self) -> int:
        return <int>self.rate

    @property
    def capacity(self) -> int:
        return self.cap

    @property
    def frame_ms(self) -> float:
        return self.spf * self.ms_per_unit

    @property
    def last_seq(self) -> int:
        """16-bit seq of the last frame popped (-1 before any)."""
        return -1 if self.out_seq < 0 else <int>(self.out_seq & 0xFFFF)

    @property
    def last_timestamp(self) -> int:
        """32-bit media timestamp of the last frame popped (-1 before any)."""
        return -1 if self.out_seq < 0 else self.out_ts & TS_MASK

    @property
    def received(self) -> int:
        """Packets pushed with a valid payload, whatever became of them."""
        return self.n_received

    @property
    def released(self) -> int:
        """PACKET frames popped."""
        return self.n_released

    @property
    def lost(self) -> int:
        """Sequence numbers never released (concealed or skipped), once the stream moves past."""
        return self.n_lost

    @property
    def concealed(self) -> int:
        """CONCEALED frames popped."""
        return self.n_concealed

    @property
    def late(self) -> int:
        return self.n_late

    @property
    def duplicates(self) -> int:
        return self.n_dup

    @property
    def reordered(self) -> int:
        """Packets accepted after a higher sequence number had arrived."""
        return self.n_reordered

    @property
    def resets(self) -> int:
        return self.n_resets

    @property
    def invalid(self) -> int:
        return self.n_invalid

    @property
    def depth(self) -> int:
        """Packets currently held (never more than capacity)."""
        return self.n_depth

    @property
    def jitter_ms(self) -> float:
        return self.jitter_ms_

    @property
    def target_delay_ms(self) -> float:
        return self.target_ms

    def stats(self) -> dict:
        return {
            "received": self.n_received,
            "released": self.n_released,
            "lost": self.n_lost,
            "concealed": self.n_concealed,
            "late": self.n_late,
            "duplicates": self.n_dup,
            "reordered": self.n_reordered,
            "resets": self.n_resets,
            "invalid": self.n_invalid,
            "depth": self.n_depth,
            "jitter_ms": self.jitter_ms_,
            "target_delay_ms": self.target_ms,
        }
