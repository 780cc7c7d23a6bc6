"""G.711 mu-law and A-law for int16 little-endian PCM: the face over engine._native.g711.

Bit-exact with CPython's audioop (lin2ulaw/ulaw2lin/lin2alaw/alaw2lin at width 2) on every
sample and code. Inputs are any bytes-like object; `bytes` is the fastest. The `*_into`
variants write into a caller-owned buffer (bytearray, memoryview, numpy array) so a transport
can convert every frame without allocating; they return the bytes written and raise ValueError
when the output is too small. PCM of odd length raises ValueError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "alaw_decode",
    "alaw_decode_into",
    "alaw_encode",
    "alaw_encode_into",
    "ulaw_decode",
    "ulaw_decode_b64",
    "ulaw_decode_into",
    "ulaw_encode",
    "ulaw_encode_into",
]

if TYPE_CHECKING:
    # Signatures for type checkers; at run time the native builtins are used directly so a
    # 160-sample frame pays no extra Python call.
    from typing import Any

    from numpy.typing import NDArray
    from typing_extensions import Buffer

    # numpy arrays export buffers, but numpy's stubs only say so from Python 3.12 on.
    BytesLike = Buffer | NDArray[Any]

    def ulaw_encode(pcm: BytesLike, /) -> bytes:
        """int16 PCM -> one mu-law code per sample."""

    def ulaw_decode(codes: BytesLike, /) -> bytes:
        """mu-law codes -> int16 PCM (two bytes per code)."""

    def ulaw_decode_b64(text: str, /) -> bytes:
        """base64 text of mu-law codes -> int16 PCM, in one pass (strict base64; ValueError)."""

    def alaw_encode(pcm: BytesLike, /) -> bytes:
        """int16 PCM -> one A-law code per sample."""

    def alaw_decode(codes: BytesLike, /) -> bytes:
        """A-law codes -> int16 PCM (two bytes per code)."""

    def ulaw_encode_into(pcm: BytesLike, out: BytesLike, /) -> int:
        """Encode into `out`; returns len(pcm) // 2."""

    def ulaw_decode_into(codes: BytesLike, out: BytesLike, /) -> int:
        """Decode into `out`; returns 2 * len(codes)."""

    def alaw_encode_into(pcm: BytesLike, out: BytesLike, /) -> int:
        """Encode into `out`; returns len(pcm) // 2."""

    def alaw_decode_into(codes: BytesLike, out: BytesLike, /) -> int:
        """Decode into `out`; returns 2 * len(codes)."""

else:
    from engine._native.g711 import (
        alaw_decode,
        alaw_decode_into,
        alaw_encode,
        alaw_encode_into,
        ulaw_decode,
        ulaw_decode_b64,
        ulaw_decode_into,
        ulaw_encode,
        ulaw_encode_into,
    )
