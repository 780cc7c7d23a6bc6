"""What a WebSocket client puts on the wire (RFC 6455), for harness parts and tests that drive a
socket by hand: the upgrade request and masked client frames. Frames can be built wrong on
purpose (unmasked, reserved bits, fragments) to test how a server refuses them."""

from __future__ import annotations

import secrets


def upgrade_request(path: str, key: str, host: str = "127.0.0.1") -> bytes:
    """The HTTP request that opens a WebSocket; `key` is the base64 of 16 random bytes."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True,
                 rsv: int = 0) -> bytes:
    """One client-to-server frame: masked with a fresh key unless told otherwise."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 65536:
        header = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return header + payload
    key = secrets.token_bytes(4)
    return header + key + _mask(payload, key)


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    n = len(payload)
    stream = int.from_bytes((key * ((n + 3) // 4))[:n], "big")
    return (int.from_bytes(payload, "big") ^ stream).to_bytes(n, "big")
