"""Kernel benchmark of the Media Streams WebSocket path, per message, native against aiohttp's.

- parse: one masked client frame carrying a Twilio `media` message (the bytes a socket read
  delivers) through the native `FrameParser` into a callback, against aiohttp's compiled
  `WebSocketReader` into its message queue (emptied as the application would read it). This is
  only the parsing; the larger saving on a live socket is that the engine hands each message to
  the call synchronously, with no future resolved and no task woken per message, which the
  end-to-end benchmark (`voice-engine bench twilio`) measures.
- build: one outgoing `media` message from 160 bytes of mu-law (base64, the JSON around it, the
  frame header): native `text_frame_b64` against `binascii` + concatenation + a Python header.
- payload: an incoming message's base64 payload to 16-bit PCM: native `ulaw_decode_b64` (one
  pass) against strict `binascii.a2b_base64` then `ulaw_decode`.

Run standalone for a quick reading: ``python -m bench.kernels_ws``.
"""

from __future__ import annotations

import asyncio
import binascii
import os
import timeit

from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from engine._native.wsframe import FrameParser, text_frame_b64

from bench.kernel_case import Case
from bench.wsclient import client_frame
from engine.audio.g711 import ulaw_decode, ulaw_decode_b64
from engine.transports.base import ws_text_frame

PREFIX = b'{"event":"media","streamSid":"MZ0123456789abcdef0123456789abcdef","media":{"payload":"'
SUFFIX = b'"}}'


def media_frame() -> bytes:
    """A masked client frame with a Twilio media message, as a socket read delivers it."""
    mulaw = os.urandom(160)
    text = (
        b'{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"2",'
        b'"timestamp":"40","payload":"' + binascii.b2a_base64(mulaw, newline=False) + b'"},'
        b'"streamSid":"MZ0123456789abcdef0123456789abcdef"}'
    )
    return client_frame(1, text)


class _Protocol:
    """What aiohttp's queue asks of the connection: whether reading is paused."""

    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def cases() -> list[Case]:
    wire = media_frame()
    parser = FrameParser(65536, lambda opcode, payload: None)

    def native_parse() -> None:
        parser.feed(wire)

    loop = asyncio.new_event_loop()
    queue = WebSocketDataQueue(_Protocol(), 2**16, loop=loop)  # type: ignore[arg-type]
    reader = WebSocketReader(queue, 65536, compress=False, decode_text=True)  # its server default
    def take() -> object:
        """`await queue.read()` for a message already queued (it returns without suspending)."""
        coro = queue.read()
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        raise RuntimeError("aiohttp's reader queued nothing")

    def aiohttp_parse() -> None:
        reader.feed_data(wire)
        take()

    mulaw = os.urandom(160)

    def native_build() -> bytes:
        return text_frame_b64(PREFIX, mulaw, SUFFIX)

    def python_build() -> bytes:
        return ws_text_frame(PREFIX + binascii.b2a_base64(mulaw, newline=False) + SUFFIX)

    # both parsers must agree on what they parsed before they are timed
    got: list[bytes] = []
    FrameParser(65536, lambda opcode, payload: got.append(payload)).feed(wire)
    reader.feed_data(wire)
    message = take()
    data = message.data  # type: ignore[attr-defined]
    data = data if isinstance(data, bytes) else data.encode()
    assert got == [data], "the parsers disagree"
    assert native_build() == python_build()
    payload = binascii.b2a_base64(mulaw, newline=False).decode()

    def native_payload() -> bytes:
        return ulaw_decode_b64(payload)

    def python_payload() -> bytes:
        return ulaw_decode(binascii.a2b_base64(payload, strict_mode=True))

    assert native_payload() == python_payload()
    return [
        Case("Media Streams payload: base64 to PCM", "native", native_payload, target=2.0),
        Case("Media Streams payload: base64 to PCM", "binascii + ulaw_decode", python_payload,
             baseline=True),
        Case("WebSocket: parse a media message", "native", native_parse, target=2.0),
        Case("WebSocket: parse a media message", "aiohttp reader", aiohttp_parse, baseline=True),
        Case("WebSocket: build a media message", "native", native_build, target=1.5),
        Case("WebSocket: build a media message", "python", python_build, baseline=True),
    ]


if __name__ == "__main__":
    for case in cases():
        number = 200_000
        seconds = min(timeit.repeat(case.func, number=number, repeat=5))
        print(f"{case.group:40} {case.name:16} {seconds / number * 1e9:8.0f} ns")
