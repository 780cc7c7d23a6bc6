# cython: language_level=3
"""Buffer plumbing shared by the native modules (inline: nothing of it exists at run time).

A per-frame call spends more time acquiring buffers than converting, so `bytes` and small
`bytearray`s are read directly; everything else goes through the buffer protocol, whose export
also pins the memory while the GIL is released.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t

# How open_buffer reached an object's memory.
cdef enum:
    DIRECT_IMMUTABLE  # bytes: safe without the GIL
    DIRECT_MUTABLE    # bytearray read in place: only while the GIL is held (no export pins it)
    EXPORTED          # Py_buffer acquired: release it when done


cdef inline int open_buffer(object obj, Py_buffer* view, uint8_t** data, Py_ssize_t* size,
                            bint writable, Py_ssize_t direct_limit) except -1:
    """Points `data`/`size` at `obj`'s bytes; a bytearray is read in place below `direct_limit`
    bytes (larger ones are exported, so the GIL can be released while they are converted)."""
    if not writable and PyBytes_CheckExact(obj):
        data[0] = <uint8_t*>PyBytes_AS_STRING(obj)
        size[0] = PyBytes_GET_SIZE(obj)
        return DIRECT_IMMUTABLE
    if PyByteArray_CheckExact(obj) and PyByteArray_GET_SIZE(obj) < direct_limit:
        data[0] = <uint8_t*>PyByteArray_AS_STRING(obj)
        size[0] = PyByteArray_GET_SIZE(obj)
        return DIRECT_MUTABLE
    PyObject_GetBuffer(obj, view, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
    data[0] = <uint8_t*>view.buf
    size[0] = view.len
    return EXPORTED


cdef inline Py_ssize_t pcm_samples(Py_ssize_t size) except -1:
    """Samples in `size` bytes of int16 PCM; an odd length is an error."""
    if size & 1:
        raise ValueError(f"PCM length must be even (int16 samples), got {size} bytes")
    return size >> 1
