# cython: language_level=3
"""FrameParser: the server side of RFC 6455 framing, client frames in, whole messages out.

Bytes from the socket go in as they arrive (any split); each complete message comes out through
one call of `on_message(opcode, payload)`: text (1) and binary (2) messages reassembled from their
fragments, and the control frames close (8), ping (9) and pong (10) as they come. Payloads are
unmasked into a fresh `bytes` in one pass, eight bytes at a time.

A frame that breaks the protocol stops the parser: `feed` returns the close code the connection
must be failed with (1002 protocol error, 1007 text that is not UTF-8, 1009 message too big) and
every later `feed` returns it again. The frame header is checked before its payload is buffered,
so an oversized message costs no memory: what is held is bounded by one header plus
`max_message` bytes of partial frame and `max_message` bytes of partial message.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove

from buffers cimport EXPORTED, open_buffer
from cpython.buffer cimport PyBuffer_Release

cdef enum:
    OP_CONTINUATION = 0
    OP_TEXT = 1
    OP_BINARY = 2
    OP_CLOSE = 8
    OP_PING = 9
    OP_PONG = 10
    PROTOCOL_ERROR = 1002
    INVALID_TEXT = 1007
    TOO_BIG = 1009


cdef inline void unmask(uint8_t* dst, const uint8_t* src, Py_ssize_t n, const uint8_t* key) noexcept:
    cdef uint64_t key64
    cdef uint64_t word
    cdef Py_ssize_t i = 0
    cdef uint8_t* k8 = <uint8_t*>&key64
    cdef int j
    for j in range(8):
        k8[j] = key[j & 3]
    while i + 8 <= n:
        memcpy(&word, src + i, 8)
        word ^= key64
        memcpy(dst + i, &word, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1


cdef inline bint all_ascii(const uint8_t* data, Py_ssize_t n) noexcept:
    cdef uint64_t word
    cdef uint64_t acc = 0
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&word, data + i, 8)
        acc |= word
        i += 8
    while i < n:
        acc |= data[i]
        i += 1
    return (acc & 0x8080808080808080ULL) == 0


cdef class FrameParser:
    cdef readonly Py_ssize_t max_message
    cdef object _on_message
    # bytes of a frame that has not fully arrived yet
    cdef uint8_t* _held
    cdef Py_ssize_t _held_len
    cdef Py_ssize_t _held_cap
    # a fragmented text or binary message being reassembled
    cdef uint8_t* _partial
    cdef Py_ssize_t _partial_len
    cdef Py_ssize_t _partial_cap
    cdef int _partial_opcode  # -1: none open
    cdef readonly int error  # 0, or the close code the connection failed with

    def __cinit__(self, Py_ssize_t max_message, on_message):
        if max_message < 125:
            raise ValueError("max_message must be at least 125 bytes")
        self.max_message = max_message
        self._on_message = on_message
        self._held = NULL
        self._held_len = 0
        self._held_cap = 0
        self._partial = NULL
        self._partial_len = 0
        self._partial_cap = 0
        self._partial_opcode = -1
        self.error = 0

    def __dealloc__(self):
        PyMem_Free(self._held)
        PyMem_Free(self._partial)

    @property
    def buffered(self):
        """Bytes held for frames and messages not yet complete."""
        return self._held_len + self._partial_len

    def feed(self, data):
        """feed(data) -> int: parse what arrived; 0, or the close code to fail the connection with.

        `on_message` is called once per complete message, in order, before this returns.
        """
        cdef Py_buffer view
        cdef uint8_t* src
        cdef Py_ssize_t size, used
        cdef int how
        if self.error:
            return self.error
        how = open_buffer(data, &view, &src, &size, False, 0)
        try:
            if size == 0:
                return 0
            if self._held_len == 0:
                used = self._parse(src, size)
                if used < 0:
                    return self.error
                if used < size:
                    self._hold(src + used, size - used)
            else:
                self._hold(src, size)
                used = self._parse(self._held, self._held_len)
                if used < 0:
                    return self.error
                if used:
                    memmove(self._held, self._held + used, self._held_len - used)
                    self._held_len -= used
            return 0
        finally:
            if how == EXPORTED:
                PyBuffer_Release(&view)

    cdef int _hold(self, const uint8_t* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t need = self._held_len + n
        cdef uint8_t* grown
        if need > self._held_cap:
            grown = <uint8_t*>PyMem_Realloc(self._held, need + 256)
            if grown == NULL:
                raise MemoryError()
            self._held = grown
            self._held_cap = need + 256
        memcpy(self._held + self._held_len, data, n)
        self._held_len = need
        return 0

    cdef Py_ssize_t _fail(self, int code) noexcept:
        self.error = code
        self._held_len = 0
        self._partial_len = 0
        self._partial_opcode = -1
        return -1

    cdef Py_ssize_t _parse(self, const uint8_t* buf, Py_ssize_t size) except? -2:
        """Hands out every complete frame in buf[:size]; returns the bytes consumed, or -1 after
        a protocol failure (self.error set)."""
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t header, start
        cdef uint64_t length
        cdef uint8_t b0, b1
        cdef int opcode
        cdef bint fin
        cdef const uint8_t* key
        cdef object payload
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            fin = (b0 & 0x80) != 0
            opcode = b0 & 0x0F
            if b0 & 0x70:
                return self._fail(PROTOCOL_ERROR)  # no extension was negotiated
            if not (b1 & 0x80):
                return self._fail(PROTOCOL_ERROR)  # client frames must be masked
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (<uint64_t>buf[pos + 2] << 8) | buf[pos + 3]
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = 0
                for start in range(8):
                    length = (length << 8) | buf[pos + 2 + start]
                if length >> 63:
                    return self._fail(PROTOCOL_ERROR)
                header = 10
            if opcode >= 8:
                if opcode > OP_PONG or not fin or length > 125:
                    return self._fail(PROTOCOL_ERROR)
            elif opcode > OP_BINARY:
                return self._fail(PROTOCOL_ERROR)
            elif length > <uint64_t>self.max_message or (
                opcode == OP_CONTINUATION
                and <uint64_t>self._partial_len + length > <uint64_t>self.max_message
            ):
                return self._fail(TOO_BIG)
            if size - pos < header + 4 + <Py_ssize_t>length:
                break  # the rest of this frame has not arrived
            key = buf + pos + header
            start = pos + header + 4
            pos = start + <Py_ssize_t>length
            if opcode >= 8:
                self._on_message(opcode, self._unmasked(buf + start, <Py_ssize_t>length, key))
                if self.error:
                    return -1
                continue
            if opcode == OP_CONTINUATION:
                if self._partial_opcode < 0:
                    return self._fail(PROTOCOL_ERROR)  # nothing to continue
                self._append_partial(buf + start, <Py_ssize_t>length, key)
                if not fin:
                    continue
                opcode = self._partial_opcode
                payload = PyBytes_FromStringAndSize(<char*>self._partial, self._partial_len)
                self._partial_len = 0
                self._partial_opcode = -1
            else:
                if self._partial_opcode >= 0:
                    return self._fail(PROTOCOL_ERROR)  # a new message inside a fragmented one
                if not fin:
                    self._partial_opcode = opcode
                    self._append_partial(buf + start, <Py_ssize_t>length, key)
                    continue
                payload = self._unmasked(buf + start, <Py_ssize_t>length, key)
            if opcode == OP_TEXT and not self._valid_text(payload):
                return self._fail(INVALID_TEXT)
            self._on_message(opcode, payload)
            if self.error:
                return -1
        return pos

    cdef object _unmasked(self, const uint8_t* src, Py_ssize_t n, const uint8_t* key):
        cdef object out = PyBytes_FromStringAndSize(NULL, n)
        unmask(<uint8_t*>PyBytes_AS_STRING(out), src, n, key)
        return out

    cdef int _append_partial(self, const uint8_t* src, Py_ssize_t n, const uint8_t* key) except -1:
        cdef Py_ssize_t need = self._partial_len + n
        cdef uint8_t* grown
        if need > self._partial_cap:
            grown = <uint8_t*>PyMem_Realloc(self._partial, need + 256)
            if grown == NULL:
                raise MemoryError()
            self._partial = grown
            self._partial_cap = need + 256
        unmask(self._partial + self._partial_len, src, n, key)
        self._partial_len = need
        return 0

    cdef bint _valid_text(self, bytes payload) except -1:
        cdef const uint8_t* data = <const uint8_t*>PyBytes_AS_STRING(payload)
        cdef Py_ssize_t n = len(payload)
        if all_ascii(data, n):
            return True
        try:
            PyUnicode_DecodeUTF8(<const char*>data, n, NULL)
        except UnicodeDecodeError:
            return False
        return True

    def fail(self, int code):
        """Stops the parser from the outside (the handler found the peer unfit to talk to)."""
        self._fail(code)


cdef const char* B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def text_frame_b64(bytes prefix, data, bytes suffix):
    """text_frame_b64(prefix, data, suffix) -> bytes: one server text frame whose payload is
    prefix + base64(data) + suffix (standard alphabet, padded), built in a single allocation.

    This is how a media message leaves: the JSON around the audio is a fixed prefix and suffix.
    """
    cdef Py_buffer view
    cdef uint8_t* src
    cdef Py_ssize_t n
    cdef int how = open_buffer(data, &view, &src, &n, False, 0)
    cdef Py_ssize_t np = len(prefix)
    cdef Py_ssize_t ns = len(suffix)
    cdef Py_ssize_t nb = 4 * ((n + 2) // 3)
    cdef Py_ssize_t payload = np + nb + ns
    cdef Py_ssize_t header = 2 if payload < 126 else (4 if payload < 65536 else 10)
    cdef bytes out
    cdef uint8_t* dst
    cdef Py_ssize_t i
    cdef uint32_t v
    cdef int k
    try:
        out = PyBytes_FromStringAndSize(NULL, header + payload)
        dst = <uint8_t*>PyBytes_AS_STRING(out)
        dst[0] = 0x81
        if header == 2:
            dst[1] = <uint8_t>payload
        elif header == 4:
            dst[1] = 126
            dst[2] = <uint8_t>(payload >> 8)
            dst[3] = <uint8_t>payload
        else:
            dst[1] = 127
            for k in range(8):
                dst[2 + k] = <uint8_t>((<uint64_t>payload) >> (8 * (7 - k)))
        dst += header
        memcpy(dst, PyBytes_AS_STRING(prefix), np)
        dst += np
        i = 0
        while i + 3 <= n:
            v = (<uint32_t>src[i] << 16) | (<uint32_t>src[i + 1] << 8) | src[i + 2]
            dst[0] = B64[(v >> 18) & 63]
            dst[1] = B64[(v >> 12) & 63]
            dst[2] = B64[(v >> 6) & 63]
            dst[3] = B64[v & 63]
            dst += 4
            i += 3
        if n - i == 1:
            v = <uint32_t>src[i] << 16
            dst[0] = B64[(v >> 18) & 63]
            dst[1] = B64[(v >> 12) & 63]
            dst[2] = 61  # '='
            dst[3] = 61
            dst += 4
        elif n - i == 2:
            v = (<uint32_t>src[i] << 16) | (<uint32_t>src[i + 1] << 8)
            dst[0] = B64[(v >> 18) & 63]
            dst[1] = B64[(v >> 12) & 63]
            dst[2] = B64[(v >> 6) & 63]
            dst[3] = 61
            dst += 4
        memcpy(dst, PyBytes_AS_STRING(suffix), ns)
        return out
    finally:
        if how == EXPORTED:
            PyBuffer_Release(&view)
