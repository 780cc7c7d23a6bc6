# cython: language_level=3, binding=False, always_allow_keywords=False
"""The VAD's per-sample loop: the energy of one frame of int16 little-endian PCM, in dBFS.

Behind engine.audio.vad. A 20 ms frame is 320 samples, so call overhead matters as much as the
loop: a plain METH_O builtin, exact `bytes` read without acquiring a buffer, integer sum of
squares (exact; 320 squares of int16 cannot overflow 64 bits).
"""
import sys

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.math cimport log10
from libc.stdint cimport int16_t, int64_t, uint8_t

#: what a frame with no energy at all reports (digital silence has no finite dB value)
cdef double SILENCE_DBFS = -100.0

cdef bint LITTLE_ENDIAN = sys.byteorder == "little"


cdef double _energy_dbfs(const uint8_t* data, Py_ssize_t nbytes) noexcept nogil:
    cdef Py_ssize_t n = nbytes // 2
    cdef Py_ssize_t i
    cdef int64_t acc = 0
    cdef int64_t s
    cdef const int16_t* samples = <const int16_t*> data
    if n == 0:
        return SILENCE_DBFS
    if LITTLE_ENDIAN:
        for i in range(n):
            s = samples[i]
            acc += s * s
    else:
        for i in range(n):
            s = <int16_t> (data[2 * i] | (data[2 * i + 1] << 8))
            acc += s * s
    if acc == 0:
        return SILENCE_DBFS
    cdef double db = 10.0 * log10(<double> acc / (<double> n * 1073741824.0))
    return db if db > SILENCE_DBFS else SILENCE_DBFS


def frame_energy_dbfs(pcm):
    """Mean power of int16 LE `pcm` relative to a full-scale square wave, in dB (>= -100)."""
    cdef Py_buffer view
    cdef double db
    if PyBytes_CheckExact(pcm):
        return _energy_dbfs(<const uint8_t*> PyBytes_AS_STRING(pcm), PyBytes_GET_SIZE(pcm))
    PyObject_GetBuffer(pcm, &view, PyBUF_SIMPLE)
    try:
        db = _energy_dbfs(<const uint8_t*> view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return db
