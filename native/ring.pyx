# cython: language_level=3, always_allow_keywords=False
"""OutputRing: the sample ring behind a cancellable output stream (faced by engine.audio.ring).

Three absolute 64-bit cursors split the audio an assistant has produced:

    ack_pos <= read_pos <= write_pos
    [ack_pos, read_pos)    handed to the transport, not yet confirmed heard (kept for rewind)
    [read_pos, write_pos)  queued, not yet handed out

Every write carries a generation (one per utterance, written in non-decreasing order), so the
audio of generations <= g is always a prefix of [ack_pos, write_pos). A small table of segment
boundaries (generation, first absolute position) recorded at each generation change lets
cancel(g) find the end of that prefix without looking at the samples. Writes of a cancelled
generation are discarded on arrival, which is what keeps a cut utterance's late TTS chunks from
ever reaching the caller.

No allocation per call beyond the returned ints; a wrapped write or read is at most two memcpy.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int16_t, int64_t
from libc.string cimport memcpy

cdef enum:
    # How many generation changes can be queued at once. Each utterance adds one, so this is
    # only reached if 64 utterances pile up unheard; see _push_segment for what happens then.
    MAX_SEGMENTS = 64


cdef class OutputRing:
    cdef int16_t* _buf
    cdef int64_t _cap
    cdef int64_t _write
    cdef int64_t _read
    cdef int64_t _ack
    cdef int64_t _cancelled
    cdef int64_t _newest
    cdef int64_t _discarded
    cdef int64_t _overflow
    cdef int64_t _dropped
    # Circular table of segments, oldest first: _seg_gen[k] starts at absolute _seg_start[k].
    # Invariant: the head segment starts at or before ack_pos (it holds the sample at ack_pos)
    # whenever anything is unacked or queued; starts are strictly increasing.
    cdef int64_t _seg_gen[MAX_SEGMENTS]
    cdef int64_t _seg_start[MAX_SEGMENTS]
    cdef int _seg_head
    cdef int _seg_count

    def __cinit__(self, Py_ssize_t capacity):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._buf = <int16_t*>PyMem_Malloc(capacity * sizeof(int16_t))
        if self._buf == NULL:
            raise MemoryError()
        self._cap = capacity
        self._cancelled = -1
        self._newest = -1

    def __dealloc__(self):
        PyMem_Free(self._buf)

    # --- segments -------------------------------------------------------------------------------

    cdef inline int _slot(self, int k) noexcept:
        return (self._seg_head + k) % MAX_SEGMENTS

    cdef void _push_segment(self, int64_t generation, int64_t start) noexcept:
        cdef int s0, s1
        if self._seg_count == MAX_SEGMENTS:
            # Full: merge the two oldest segments under the OLDER generation. A later cancel of
            # that generation then also drops the newer one's audio. That errs towards silence,
            # never towards replaying cancelled audio; read_generation reports the older
            # generation for the merged span.
            s0 = self._slot(0)
            s1 = self._slot(1)
            self._seg_gen[s1] = self._seg_gen[s0]
            self._seg_start[s1] = self._seg_start[s0]
            self._seg_head = s1
            self._seg_count -= 1
        s0 = self._slot(self._seg_count)
        self._seg_gen[s0] = generation
        self._seg_start[s0] = start
        self._seg_count += 1

    cdef void _prune_segments(self) noexcept:
        """Forget segments that end at or before ack_pos (nothing of them can be read again)."""
        while self._seg_count >= 2 and self._seg_start[self._slot(1)] <= self._ack:
            self._seg_head = self._slot(1)
            self._seg_count -= 1

    # --- data path ------------------------------------------------------------------------------

    def write(self, pcm, int64_t generation):
        """write(pcm, generation) -> int: append int16 samples of one generation.

        Returns the samples accepted. Discarded whole (counted in discarded_samples) when the
        generation is cancelled, or older than the newest one written (a stale chunk arriving
        after its successor started). What does not fit in free space is counted in
        overflow_samples.
        """
        cdef Py_buffer view
        cdef const char* data
        cdef Py_ssize_t size
        cdef bint release = False
        if PyBytes_CheckExact(pcm):
            data = PyBytes_AS_STRING(pcm)
            size = PyBytes_GET_SIZE(pcm)
        elif PyByteArray_CheckExact(pcm):
            data = PyByteArray_AS_STRING(pcm)
            size = PyByteArray_GET_SIZE(pcm)
        else:
            PyObject_GetBuffer(pcm, &view, PyBUF_SIMPLE)
            release = True
            data = <const char*>view.buf
            size = view.len
        try:
            if size & 1:
                raise ValueError(f"PCM length must be even (int16 samples), got {size} bytes")
            return self._write_samples(data, size >> 1, generation)
        finally:
            if release:
                PyBuffer_Release(&view)

    cdef int64_t _write_samples(self, const char* data, int64_t n, int64_t generation) noexcept:
        cdef int64_t accepted, offset, first
        if generation <= self._cancelled or generation < self._newest:
            self._discarded += n
            return 0
        accepted = self._cap - (self._write - self._ack)
        if accepted > n:
            accepted = n
        self._overflow += n - accepted
        if accepted == 0:
            return 0
        if generation > self._newest or self._seg_count == 0:
            self._push_segment(generation, self._write)
            self._newest = generation
        offset = self._write % self._cap
        first = self._cap - offset
        if first >= accepted:
            memcpy(self._buf + offset, data, accepted * sizeof(int16_t))
        else:
            memcpy(self._buf + offset, data, first * sizeof(int16_t))
            memcpy(self._buf, data + first * sizeof(int16_t), (accepted - first) * sizeof(int16_t))
        self._write += accepted
        return accepted

    def read_into(self, out, int64_t n):
        """read_into(out, n) -> int: copy up to n queued samples into the writable buffer out.

        Advances read_pos by the count returned. ValueError when out holds fewer than n samples.
        """
        cdef Py_buffer view
        cdef char* dst
        cdef Py_ssize_t room
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        # A bytearray is written in place: nothing here releases the GIL, so it cannot be
        # resized underneath, and skipping the buffer export halves a frame's cost.
        if PyByteArray_CheckExact(out):
            dst = PyByteArray_AS_STRING(out)
            room = PyByteArray_GET_SIZE(out)
            if room < n * <int64_t>sizeof(int16_t):
                raise ValueError(f"output buffer holds {room} bytes, {2 * n} needed")
            return self._read_samples(dst, n)
        PyObject_GetBuffer(out, &view, PyBUF_WRITABLE)
        try:
            if view.len < n * <int64_t>sizeof(int16_t):
                raise ValueError(f"output buffer holds {view.len} bytes, {2 * n} needed")
            return self._read_samples(<char*>view.buf, n)
        finally:
            PyBuffer_Release(&view)

    cdef int64_t _read_samples(self, char* dst, int64_t n) noexcept:
        cdef int64_t count, offset, first
        count = self._write - self._read
        if count > n:
            count = n
        offset = self._read % self._cap
        first = self._cap - offset
        if first >= count:
            memcpy(dst, self._buf + offset, count * sizeof(int16_t))
        else:
            memcpy(dst, self._buf + offset, first * sizeof(int16_t))
            memcpy(dst + first * sizeof(int16_t), self._buf, (count - first) * sizeof(int16_t))
        self._read += count
        return count

    def ack(self, int64_t n):
        """ack(n) -> int: the caller heard n more samples; ack_pos advances, clamped to read_pos."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > self._read - self._ack:
            n = self._read - self._ack
        self._ack += n
        self._prune_segments()
        return n

    def rewind(self):
        """rewind() -> int: re-queue what was sent but not heard (read_pos back to ack_pos)."""
        cdef int64_t n = self._read - self._ack
        self._read = self._ack
        return n

    def cancel(self, int64_t generation):
        """cancel(generation) -> int: drop every sample of generations <= generation.

        Sent-but-unheard and queued audio alike; later writes of those generations are
        discarded. Newer generations queued behind stay. Returns the samples dropped.
        """
        cdef int64_t boundary, dropped
        cdef int k, s
        if generation > self._cancelled:
            self._cancelled = generation
        if generation >= self._newest:
            # The common barge-in: the newest utterance is cut, so everything goes.
            boundary = self._write
            self._seg_count = 0
        else:
            boundary = self._write
            for k in range(self._seg_count):
                s = self._slot(k)
                if self._seg_gen[s] > generation:
                    boundary = self._seg_start[s]
                    break
            if boundary < self._ack:
                boundary = self._ack
        dropped = boundary - self._ack
        self._ack = boundary
        if self._read < boundary:
            self._read = boundary
        self._prune_segments()
        self._dropped += dropped
        return dropped

    def clear(self):
        """clear() -> int: drop everything unacked and queued; generations stay as they were."""
        cdef int64_t dropped = self._write - self._ack
        self._ack = self._write
        self._read = self._write
        self._seg_count = 0
        self._dropped += dropped
        return dropped

    # --- state ----------------------------------------------------------------------------------

    @property
    def read_generation(self):
        """Generation of the sample at read_pos; -1 when nothing is queued."""
        cdef int k, s
        cdef int64_t generation = -1
        if self._read == self._write:
            return -1
        for k in range(self._seg_count):
            s = self._slot(k)
            if self._seg_start[s] > self._read:
                break
            generation = self._seg_gen[s]
        return generation

    @property
    def capacity(self):
        """Samples the ring holds (unacked plus queued)."""
        return self._cap

    @property
    def write_pos(self):
        """Absolute position just past the last queued sample."""
        return self._write

    @property
    def read_pos(self):
        """Absolute position of the next sample read_into hands out."""
        return self._read

    @property
    def ack_pos(self):
        """Absolute position up to which the caller has heard (or audio was dropped)."""
        return self._ack

    @property
    def queued(self):
        """Samples written but not yet read (write_pos - read_pos)."""
        return self._write - self._read

    @property
    def unacked(self):
        """Samples read but not yet heard (read_pos - ack_pos)."""
        return self._read - self._ack

    @property
    def free(self):
        """Samples a write can still take (capacity - (write_pos - ack_pos))."""
        return self._cap - (self._write - self._ack)

    @property
    def cancelled_generation(self):
        """Highest generation cancelled so far; -1 before any cancel."""
        return self._cancelled

    @property
    def newest_generation(self):
        """Highest generation accepted by a write; -1 before any."""
        return self._newest

    @property
    def discarded_samples(self):
        """Samples refused on arrival because their generation was cancelled or stale."""
        return self._discarded

    @property
    def overflow_samples(self):
        """Samples refused because the ring was full."""
        return self._overflow

    @property
    def dropped_samples(self):
        """Samples removed from the ring by cancel() and clear()."""
        return self._dropped

    def __repr__(self):
        return (
            f"OutputRing(capacity={self._cap}, ack_pos={self._ack}, read_pos={self._read}, "
            f"write_pos={self._write}, newest_generation={self._newest}, "
            f"cancelled_generation={self._cancelled})"
        )
