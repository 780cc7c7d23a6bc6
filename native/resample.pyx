# cython: language_level=3, binding=False, always_allow_keywords=False
"""PolyphaseFir: streaming int16 resampling by an integer factor through one FIR filter, the
per-sample loops behind engine.audio.resample's "fir" quality.

The filter (the prototype low-pass at the high rate, gain included) is designed in Python and
handed over once; this module only runs it. Up by L: each input sample yields L outputs, output
i*L+p being the last K inputs weighed by polyphase branch p. Down by M: output j is the whole
filter over the high-rate samples of its window, evaluated only where an output falls.

Arithmetic is float32 like the numpy engine this replaced (int16 in, float32 taps and sums,
round half to even, saturate to int16), so outputs agree with it to +-1 LSB: the two add the
same products in a different order, which moves a sum across a .5 boundary only rarely.

How the work is laid out: every output is a sum over taps of c * x[offset + i], with i the
output's place in its block, so the kernel (fir_* in the C block below) keeps 32 outputs in
vector registers and adds one tap to all of them at a time. Each output's sum stays in tap
order, so no float sum is reordered, yet 4 (SSE2, NEON) or 8 (AVX2) outputs advance per
instruction. Up by L runs the kernel once per branch over the input; down by M first
deinterleaves the block into M phase arrays (sample m*M + r to array r, element m), which turns
the stride-M window reads into contiguous ones. Taps that are exactly zero (the design pads
each branch) are dropped, which changes no result.

State is the last K-1 input samples (up, as floats), or the part of the next output's window
that has arrived, taps-M to taps-1 samples (down, as int16). Buffers are sized once at construction;
a call allocates nothing beyond the returned bytes, and long inputs run in blocks of BLOCK
outputs (down) or inputs (up), so the scratch stays in L1. The GIL is released for long inputs
only; a resampler used from two threads at once raises RuntimeError rather than mixing streams.
"""
import sys

from cpython.buffer cimport PyBuffer_Release
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport int16_t, int32_t, uint8_t, uint16_t, uint32_t
from libc.math cimport fabs
from libc.string cimport memcpy, memmove, memset

from buffers cimport DIRECT_MUTABLE, EXPORTED, open_buffer, pcm_samples

cdef extern from *:
    """
    /* The two loops that carry the work, in C for one reason: x86 builds target the baseline
     * (SSE2), and only a function-level target attribute lets the same loops also be built for
     * AVX2 and picked at run time. FIR_FUNCTIONS defines both loops for one vector width; the
     * builds do the same float operations in the same order for every output (no FMA), so their
     * results are identical.
     *
     * fir: acc[i] = sum over q of c[q] * src[off[q] + i], for i < n, summed in q order. The
     * compiler will not vectorise that reduction itself without reordering the sums
     * (-ffast-math), so it is written with generic vectors of W floats: a block of 32 outputs
     * lives in 32 / W accumulators while every tap is added, the independent chains hiding the
     * add latency, and acc is stored once per block instead of once per tap. The last block is
     * whole too, even past n (a partial one would leave too few chains to hide the latency): the
     * caller guarantees that src + off[q] + i and acc + i stay inside its buffers, which hold
     * finite floats, for i < n rounded up to 32, and never uses what is computed past n.
     *
     * deinterleave: int16 sample m*down + r to float element m of phase array r (phases +
     * r*stride), for m < rows. Fixed strides for the common factors vectorise (the run-time
     * stride of the general case does not). */
    #include <string.h>

    typedef float fir_v4 __attribute__((vector_size(16)));
    typedef float fir_v8 __attribute__((vector_size(32)));
    typedef void (*fir_fn)(const float *, const Py_ssize_t *, const float *, Py_ssize_t,
                           float *, Py_ssize_t);
    typedef void (*deinterleave_fn)(const int16_t *, float *, Py_ssize_t, int, Py_ssize_t);

    #define FIR_FUNCTIONS(SUFFIX, VEC, ATTR)                                                  \\
    ATTR static void fir_##SUFFIX(const float *src, const Py_ssize_t *off, const float *c,    \\
                                  Py_ssize_t ntaps, float *acc, Py_ssize_t n)                 \\
    {                                                                                         \\
        enum { W = sizeof(VEC) / sizeof(float), A = 32 / W };                                 \\
        Py_ssize_t i, q;                                                                      \\
        int j;                                                                                \\
        for (i = 0; i < n; i += 32) {                                                         \\
            VEC a[A], x;                                                                      \\
            for (j = 0; j < A; j++)                                                           \\
                a[j] = (VEC){0};                                                              \\
            for (q = 0; q < ntaps; q++) {                                                     \\
                const float *s = src + off[q] + i;                                            \\
                const float k = c[q];                                                         \\
                for (j = 0; j < A; j++) {                                                     \\
                    memcpy(&x, s + j * W, sizeof x); /* an unaligned vector load */           \\
                    a[j] += k * x;                                                            \\
                }                                                                             \\
            }                                                                                 \\
            memcpy(acc + i, a, sizeof a);                                                     \\
        }                                                                                     \\
    }                                                                                         \\
    ATTR static void deinterleave_##SUFFIX(const int16_t *pcm, float *phases, Py_ssize_t rows,\\
                                           int down, Py_ssize_t stride)                       \\
    {                                                                                         \\
        float *restrict p0 = phases, *restrict p1 = phases + stride;                          \\
        float *restrict p2 = phases + 2 * stride;                                             \\
        Py_ssize_t m;                                                                         \\
        int r;                                                                                \\
        if (down == 2) {                                                                      \\
            for (m = 0; m < rows; m++) {                                                      \\
                p0[m] = pcm[2 * m];                                                           \\
                p1[m] = pcm[2 * m + 1];                                                       \\
            }                                                                                 \\
        } else if (down == 3) {                                                               \\
            for (m = 0; m < rows; m++) {                                                      \\
                p0[m] = pcm[3 * m];                                                           \\
                p1[m] = pcm[3 * m + 1];                                                       \\
                p2[m] = pcm[3 * m + 2];                                                       \\
            }                                                                                 \\
        } else {                                                                              \\
            for (r = 0; r < down; r++)                                                        \\
                for (m = 0; m < rows; m++)                                                    \\
                    phases[r * stride + m] = pcm[m * down + r];                               \\
        }                                                                                     \\
    }

    FIR_FUNCTIONS(portable, fir_v4, )

    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    FIR_FUNCTIONS(avx2, fir_v8, __attribute__((target("avx2"))))

    static int fir_has_avx2(void)
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2");
    }
    #else
    #define fir_avx2 fir_portable
    #define deinterleave_avx2 deinterleave_portable
    static int fir_has_avx2(void) { return 0; }
    #endif
    """
    ctypedef void (*fir_fn)(const float*, const Py_ssize_t*, const float*, Py_ssize_t,
                            float*, Py_ssize_t) noexcept nogil
    ctypedef void (*deinterleave_fn)(const int16_t*, float*, Py_ssize_t, int,
                                     Py_ssize_t) noexcept nogil
    void fir_portable(const float*, const Py_ssize_t*, const float*, Py_ssize_t,
                      float*, Py_ssize_t) noexcept nogil
    void fir_avx2(const float*, const Py_ssize_t*, const float*, Py_ssize_t,
                  float*, Py_ssize_t) noexcept nogil
    void deinterleave_portable(const int16_t*, float*, Py_ssize_t, int, Py_ssize_t) noexcept nogil
    void deinterleave_avx2(const int16_t*, float*, Py_ssize_t, int, Py_ssize_t) noexcept nogil
    bint fir_has_avx2() noexcept nogil

cdef enum:
    # Outputs (down) or inputs (up) per pass of the kernel: a 20 ms frame of any rate used here
    # fits one pass, and the scratch (at most factor * BLOCK floats) stays in L1.
    BLOCK = 512
    # Input at least this long is resampled with the GIL released (a 20 ms frame is far below).
    NOGIL_SAMPLES = 16384
    # Rounding float32 to the nearest integer, ties to even, without a libm call: adding
    # 1.5 * 2**23 leaves no fraction bits for |v| < 2**22 (the sum is rounded in the current,
    # round-to-nearest-even mode) and subtracting it back is exact. Matches numpy.rint.
    ROUNDER = 12582912
    # Sums of |taps| up to this keep every |sum| of int16 samples below 2**22 (see ROUNDER).
    MAX_GAIN = 128

cdef bint LITTLE_ENDIAN = sys.byteorder == "little"

cdef fir_fn _fir = fir_avx2 if fir_has_avx2() else fir_portable
cdef deinterleave_fn _deinterleave = deinterleave_avx2 if fir_has_avx2() else deinterleave_portable
KERNEL = "avx2" if fir_has_avx2() else "portable"  # which build of the loops runs here


def select_kernel(str name):
    """select_kernel(name) -> str: run every PolyphaseFir on the "portable" or "avx2" build of
    the loops ("auto": the best this CPU has); returns the previous choice. For tests and
    benchmarks: the builds give identical results."""
    global _fir, _deinterleave, KERNEL
    previous = KERNEL
    if name == "auto":
        name = "avx2" if fir_has_avx2() else "portable"
    if name == "portable":
        _fir = fir_portable
        _deinterleave = deinterleave_portable
    elif name == "avx2" and fir_has_avx2():
        _fir = fir_avx2
        _deinterleave = deinterleave_avx2
    else:
        raise ValueError(f"kernel must be 'auto', 'portable' or 'avx2' (if the CPU has it), "
                         f"got {name!r}")
    KERNEL = name
    return previous


# --- the loops ----------------------------------------------------------------------------------

cdef inline void _load(const uint8_t* src, float* dst, Py_ssize_t n) noexcept nogil:
    """int16 little-endian samples to floats; no source means silence."""
    cdef Py_ssize_t i
    cdef int16_t v
    if src == NULL:
        memset(dst, 0, n * sizeof(float))
    elif LITTLE_ENDIAN:
        for i in range(n):
            memcpy(&v, src + 2 * i, 2)
            dst[i] = v
    else:
        for i in range(n):
            dst[i] = <int16_t>(src[2 * i] | (src[2 * i + 1] << 8))


cdef inline void _copy_in(const uint8_t* src, int16_t* dst, Py_ssize_t n) noexcept nogil:
    """int16 little-endian samples in; no source means silence."""
    cdef Py_ssize_t i
    if src == NULL:
        memset(dst, 0, n * sizeof(int16_t))
    elif LITTLE_ENDIAN:
        memcpy(dst, src, 2 * n)
    else:
        for i in range(n):
            dst[i] = <int16_t>(src[2 * i] | (src[2 * i + 1] << 8))


cdef inline void _round(const float* acc, int16_t* out, Py_ssize_t n) noexcept nogil:
    """Round n sums half to even and saturate them to int16."""
    cdef Py_ssize_t i
    cdef int32_t r
    for i in range(n):
        # Saturating in int32 after rounding: the compiler will not vectorise a float
        # compare-and-select (it might trap), but does the int32 one. The constructor bounds
        # the taps' gain so that |acc| < 2**22, where the rounding is exact and int32 is safe.
        r = <int32_t>((acc[i] + <float>ROUNDER) - <float>ROUNDER)
        r = r if r < 32767 else 32767
        r = r if r > -32768 else -32768
        out[i] = <int16_t>r


cdef inline void _store(const int16_t* pcm, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    """n samples out as little-endian int16."""
    cdef Py_ssize_t i
    if LITTLE_ENDIAN:
        memcpy(dst, pcm, 2 * n)
    else:
        for i in range(n):
            dst[2 * i] = pcm[i] & 0xFF
            dst[2 * i + 1] = (pcm[i] >> 8) & 0xFF


cdef inline void _interleave(const int16_t* phases, uint8_t* dst, Py_ssize_t n,
                             Py_ssize_t factor) noexcept nogil:
    """Sample i of phase p (phases[p * BLOCK + i]) to little-endian output sample i*factor + p."""
    cdef Py_ssize_t i, p
    cdef uint32_t pair
    cdef int16_t w
    if LITTLE_ENDIAN and factor == 2:
        # The common case (8k -> 16k) as one 32-bit store per input, which vectorises.
        for i in range(n):
            pair = <uint16_t>phases[i] | (<uint32_t><uint16_t>phases[BLOCK + i] << 16)
            memcpy(dst + 4 * i, &pair, 4)
    elif LITTLE_ENDIAN and factor == 3:
        # 16k -> 48k: a fixed stride the compiler unrolls, not a loop over phases per sample.
        for i in range(n):
            memcpy(dst + 6 * i, &phases[i], 2)
            memcpy(dst + 6 * i + 2, &phases[BLOCK + i], 2)
            memcpy(dst + 6 * i + 4, &phases[2 * BLOCK + i], 2)
    elif LITTLE_ENDIAN:
        for p in range(factor):
            for i in range(n):
                memcpy(dst + 2 * (i * factor + p), &phases[p * BLOCK + i], 2)
    else:
        for i in range(n):
            for p in range(factor):
                w = phases[p * BLOCK + i]
                dst[2 * (i * factor + p)] = w & 0xFF
                dst[2 * (i * factor + p) + 1] = (w >> 8) & 0xFF




# --- the resampler ------------------------------------------------------------------------------

cdef class PolyphaseFir:
    """PolyphaseFir(taps, up=1, down=1, flush_samples=0): int16 PCM through `taps` (float32, the
    low-pass at the high rate, gain included) while changing the rate by up/down (one of them 1).

    process(pcm) -> bytes and process_into(pcm, out) -> int take any bytes-like int16
    little-endian PCM of even length. flush() feeds `flush_samples` silent input samples,
    returns what they push out and resets to silence; reset() resets without output.
    """

    cdef readonly int up
    cdef readonly int down
    cdef readonly Py_ssize_t flush_samples
    cdef readonly Py_ssize_t taps_per_phase  # K: window length in low-rate samples
    cdef int _factor
    cdef Py_ssize_t _taps        # K * factor, the zero-padded filter length
    cdef Py_ssize_t _history     # silent samples a stream starts with: K-1 (up), taps-1 (down)
    cdef Py_ssize_t _fill        # down: samples in _pcm (taps-M .. taps-1 between calls)
    cdef Py_ssize_t _stride      # down: floats per phase array in _scratch
    cdef float* _work            # up: recent input, oldest first, then the block
    cdef int16_t* _pcm           # down: the same, kept as int16 until deinterleaved
    cdef float* _scratch         # up: factor * BLOCK sums; down: factor phase arrays
    cdef float* _acc             # down: BLOCK sums
    cdef int16_t* _tmp           # factor * BLOCK rounded outputs on their way out
    cdef float* _coefs           # non-zero taps in loop order
    cdef Py_ssize_t* _offsets    # where each of them reads, relative to the block's first output
    cdef Py_ssize_t _phase_taps[64]  # up: how many of _coefs belong to each output phase
    cdef Py_ssize_t _ntaps
    cdef bint _busy              # a call is running with the GIL released

    def __cinit__(self, const float[::1] taps not None, int up=1, int down=1,
                  Py_ssize_t flush_samples=0):
        cdef Py_ssize_t n = taps.shape[0]
        cdef Py_ssize_t k, t, p, r, q, q0 = 0
        cdef float c
        cdef double gain, worst = 0
        if up < 1 or down < 1 or (up > 1 and down > 1):
            raise ValueError(f"need up >= 1 and down >= 1, one of them 1; got {up}, {down}")
        if up > 64:
            raise ValueError(f"up is at most 64, got {up}")
        if n == 0:
            raise ValueError("taps must not be empty")
        if flush_samples < 0:
            raise ValueError(f"flush_samples must be >= 0, got {flush_samples}")
        self.up = up
        self.down = down
        self.flush_samples = flush_samples
        self._factor = up if up > 1 else down
        k = (n + self._factor - 1) // self._factor
        self.taps_per_phase = k
        self._taps = k * self._factor
        self._coefs = <float*>PyMem_Malloc(self._taps * sizeof(float))
        self._offsets = <Py_ssize_t*>PyMem_Malloc(self._taps * sizeof(Py_ssize_t))
        self._tmp = <int16_t*>PyMem_Malloc(self._factor * BLOCK * sizeof(int16_t))
        if self._coefs == NULL or self._offsets == NULL or self._tmp == NULL:
            raise MemoryError()
        if up > 1 or down == 1:
            # Input i's window is _work[i : i + K] (oldest first) behind K-1 history samples;
            # branch p weighs window position t with taps[(K-1-t) * L + p].
            self._history = k - 1
            # Zeroed: the kernel's last vector may read (and discard) past the block's end.
            self._work = <float*>PyMem_Calloc(k - 1 + BLOCK, sizeof(float))
            self._scratch = <float*>PyMem_Malloc(self._factor * BLOCK * sizeof(float))
            if self._work == NULL or self._scratch == NULL:
                raise MemoryError()
            q = 0
            for p in range(self._factor):
                self._phase_taps[p] = 0
                for t in range(k):
                    r = (k - 1 - t) * self._factor + p
                    c = taps[r] if r < n else 0
                    if c != 0:
                        self._coefs[q] = c
                        self._offsets[q] = t
                        self._phase_taps[p] += 1
                        q += 1
            self._ntaps = q
            for p in range(self._factor):
                gain = 0
                for q in range(q0, q0 + self._phase_taps[p]):
                    gain += fabs(self._coefs[q])
                worst = gain if gain > worst else worst
                q0 += self._phase_taps[p]
        else:
            # Output j's window is _pcm[j*M : j*M + taps] (oldest first), weighed by the
            # reversed filter. Phase array r of _scratch holds _pcm[r], _pcm[M + r], ...,
            # so window position t = k*M + r is element j + k of phase array r.
            self._history = self._taps - 1
            self._stride = BLOCK + k - 1
            self._pcm = <int16_t*>PyMem_Malloc((self._taps - 1 + BLOCK * down) * sizeof(int16_t))
            # Zeroed: the kernel's last vector may read (and discard) past a phase's rows.
            self._scratch = <float*>PyMem_Calloc(down * self._stride, sizeof(float))
            self._acc = <float*>PyMem_Malloc(BLOCK * sizeof(float))
            if self._pcm == NULL or self._scratch == NULL or self._acc == NULL:
                raise MemoryError()
            q = 0
            for t in range(self._taps):
                r = self._taps - 1 - t
                c = taps[r] if r < n else 0
                if c != 0:
                    self._coefs[q] = c
                    self._offsets[q] = (t % down) * self._stride + t // down
                    worst += fabs(c)
                    q += 1
            self._ntaps = q
        if not worst < MAX_GAIN:
            raise ValueError(f"the taps' gain (sum of |taps| into one output) must be below "
                             f"{MAX_GAIN}, got {worst}")
        self._reset()

    def __dealloc__(self):
        PyMem_Free(self._coefs)
        PyMem_Free(self._offsets)
        PyMem_Free(self._tmp)
        PyMem_Free(self._work)
        PyMem_Free(self._pcm)
        PyMem_Free(self._scratch)
        PyMem_Free(self._acc)

    cdef void _reset(self) noexcept:
        if self._work != NULL:
            memset(self._work, 0, self._history * sizeof(float))
        else:
            memset(self._pcm, 0, self._history * sizeof(int16_t))
        self._fill = self._history

    cdef Py_ssize_t _out_samples(self, Py_ssize_t n) noexcept:
        """Outputs that n more input samples complete (down: counting those waiting)."""
        cdef Py_ssize_t end
        if self.down == 1:
            return n * self.up
        end = self._fill + n
        return (end - self._taps) // self.down + 1 if end >= self._taps else 0

    cdef void _run_up(self, const uint8_t* src, Py_ssize_t n, uint8_t* dst) noexcept nogil:
        cdef Py_ssize_t pos = 0, nb, p, q
        cdef Py_ssize_t hist = self._history
        cdef int factor = self._factor
        cdef float* work = self._work
        while pos < n:
            nb = n - pos if n - pos < BLOCK else BLOCK
            _load(src + 2 * pos if src != NULL else NULL, work + hist, nb)
            q = 0
            for p in range(factor):
                _fir(work, self._offsets + q, self._coefs + q, self._phase_taps[p],
                     self._scratch + p * BLOCK, nb)
                q += self._phase_taps[p]
            for p in range(factor):
                _round(self._scratch + p * BLOCK, self._tmp + p * BLOCK, nb)
            _interleave(self._tmp, dst + 2 * pos * factor, nb, factor)
            memmove(work, work + nb, hist * sizeof(float))
            pos += nb

    cdef void _run_down(self, const uint8_t* src, Py_ssize_t n, uint8_t* dst) noexcept nogil:
        cdef Py_ssize_t pos = 0, done = 0, take, end, count, used
        cdef int down = self.down
        cdef int16_t* pcm = self._pcm
        while pos < n:
            # The buffer holds at most taps-1 waiting samples plus BLOCK * M new ones, which
            # complete at most BLOCK outputs.
            take = self._taps - 1 + BLOCK * down - self._fill
            if take > n - pos:
                take = n - pos
            _copy_in(src + 2 * pos if src != NULL else NULL, pcm + self._fill, take)
            end = self._fill + take
            pos += take
            if end < self._taps:
                self._fill = end
                continue
            count = (end - self._taps) // down + 1
            _deinterleave(pcm, self._scratch, count + self.taps_per_phase - 1, down,
                          self._stride)
            _fir(self._scratch, self._offsets, self._coefs, self._ntaps, self._acc, count)
            _round(self._acc, self._tmp, count)
            _store(self._tmp, dst + 2 * done, count)
            done += count
            used = count * down
            memmove(pcm, pcm + used, (end - used) * sizeof(int16_t))
            self._fill = end - used

    cdef int _run(self, const uint8_t* src, Py_ssize_t n, uint8_t* dst, bint nogil_ok) except -1:
        if self._busy:
            raise RuntimeError("PolyphaseFir is already resampling in another thread")
        if n >= NOGIL_SAMPLES and nogil_ok:
            self._busy = True
            try:
                with nogil:
                    if self.down == 1:
                        self._run_up(src, n, dst)
                    else:
                        self._run_down(src, n, dst)
            finally:
                self._busy = False
        elif self.down == 1:
            self._run_up(src, n, dst)
        else:
            self._run_down(src, n, dst)
        return 0

    def process(self, pcm):
        """process(pcm) -> bytes: resample one chunk; the filter state carries to the next."""
        cdef Py_buffer view
        cdef uint8_t* src
        cdef Py_ssize_t size, n, nout
        cdef int access = open_buffer(pcm, &view, &src, &size, False, 2 * NOGIL_SAMPLES)
        try:
            n = pcm_samples(size)
            nout = self._out_samples(n)
            result = PyBytes_FromStringAndSize(NULL, 2 * nout)
            if n:
                self._run(src, n, <uint8_t*>PyBytes_AS_STRING(result), access != DIRECT_MUTABLE)
            return result
        finally:
            if access == EXPORTED:
                PyBuffer_Release(&view)

    def process_into(self, pcm, out):
        """process_into(pcm, out) -> int: resample into the writable buffer out (which must not
        overlap pcm and must hold output_size(len(pcm)) bytes); returns the bytes written."""
        cdef Py_buffer view, oview
        cdef uint8_t* src
        cdef uint8_t* dst
        cdef Py_ssize_t size, n, nout, room
        cdef int access = open_buffer(pcm, &view, &src, &size, False, 2 * NOGIL_SAMPLES)
        cdef int oaccess
        try:
            n = pcm_samples(size)
            nout = self._out_samples(n)
            oaccess = open_buffer(out, &oview, &dst, &room, True, 2 * NOGIL_SAMPLES)
            try:
                if room < 2 * nout:
                    raise ValueError(f"output buffer holds {room} bytes, {2 * nout} needed")
                if n and dst < src + size and src < dst + 2 * nout:
                    raise ValueError("output buffer overlaps the input")
                if n:
                    self._run(src, n, dst,
                              access != DIRECT_MUTABLE and oaccess != DIRECT_MUTABLE)
            finally:
                if oaccess == EXPORTED:
                    PyBuffer_Release(&oview)
            return 2 * nout
        finally:
            if access == EXPORTED:
                PyBuffer_Release(&view)

    def output_size(self, Py_ssize_t nbytes):
        """output_size(nbytes) -> int: bytes the next process() of nbytes of input returns."""
        return 2 * self._out_samples(pcm_samples(nbytes))

    def flush(self):
        """flush() -> bytes: feed flush_samples of silence, return their output, then reset."""
        cdef Py_ssize_t nout
        if self._busy:
            raise RuntimeError("PolyphaseFir is already resampling in another thread")
        nout = self._out_samples(self.flush_samples)
        result = PyBytes_FromStringAndSize(NULL, 2 * nout)
        if self.flush_samples:
            self._run(NULL, self.flush_samples, <uint8_t*>PyBytes_AS_STRING(result), False)
        self._reset()
        return result

    def reset(self):
        """reset() -> None: forget the stream; the next input starts after silence."""
        if self._busy:
            raise RuntimeError("PolyphaseFir is already resampling in another thread")
        self._reset()
