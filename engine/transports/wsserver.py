"""A server WebSocket for many small messages a second: each message is one synchronous call.

aiohttp answers the HTTP upgrade; from then on the connection's bytes go to the native
`FrameParser` (engine/_native/wsframe), which hands every complete message to the handler's
`on_text` / `on_binary` straight from the socket's `data_received`: no task, future, queue or
message object per message. The handler writes its answers straight to the transport. This is
what lets one process carry hundreds of Media Streams calls (50 messages a second each in both
directions) at the cost of a bare relay.

The rest of RFC 6455 is handled here: pings are answered, the close handshake is done in both
directions (a peer that never answers our close is cut off after `CLOSE_TIMEOUT_S`), and a
protocol error, an oversized message or a text that is not UTF-8 fails the connection with its
close code (1002, 1009, 1007).

A handler that must await something before the next message (a call starting) calls `hold()`:
messages that arrive meanwhile wait, in order, and reading from the socket pauses; `release()`
delivers them and resumes.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections import deque
from typing import Protocol

from aiohttp import web

from engine._native.wsframe import FrameParser
from engine.transports.base import ws_frame

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLOSE_TIMEOUT_S = 2.0  # how long a peer gets to answer our close before the socket is cut
NO_STATUS = 1005  # the peer closed without a code
ABNORMAL = 1006  # the connection dropped without a close frame
INTERNAL_ERROR = 1011

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10
#: the reason sent with the close code when the connection fails
FAILURE_REASONS = {
    1002: b"protocol error",
    1007: b"text message is not UTF-8",
    1009: b"message too big",
    INTERNAL_ERROR: b"internal error",
}


class MessageHandler(Protocol):
    def on_text(self, data: bytes) -> None: ...

    def on_binary(self, data: bytes) -> None: ...


class _Gone:
    """Where messages go once the socket is gone (none should come)."""

    def on_text(self, data: bytes) -> None:
        pass

    def on_binary(self, data: bytes) -> None:
        pass


_GONE = _Gone()
#: the parser of every closed socket: already failed, it holds nothing and calls nothing
_SPENT_PARSER = FrameParser(125, lambda opcode, payload: None)
_SPENT_PARSER.fail(1000)


class HandshakeError(web.HTTPBadRequest):
    pass


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def _check_handshake(request: web.Request) -> str:
    headers = request.headers
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        raise HandshakeError(text="expected a WebSocket upgrade")
    if "upgrade" not in headers.get("Connection", "").lower():
        raise HandshakeError(text="expected Connection: Upgrade")
    if headers.get("Sec-WebSocket-Version", "") != "13":
        raise HandshakeError(text="only WebSocket version 13 is supported",
                             headers={"Sec-WebSocket-Version": "13"})
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HandshakeError(text="bad Sec-WebSocket-Key") from None
    return key


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """A server close frame: the code, then the reason (cut to fit a control frame)."""
    return ws_frame(OP_CLOSE, code.to_bytes(2, "big") + reason[:123])


def _sendable_close_code(code: int) -> bool:
    """Codes a peer may put in a close frame (RFC 6455 §7.4): not the reserved 1004-1006 and
    1015, nor anything outside the defined, registered and private ranges."""
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


class ServerWebSocket:
    """One accepted WebSocket; `handler` gets every message synchronously, in order."""

    def __init__(self, request: web.Request, handler: MessageHandler, max_message: int) -> None:
        self.request = request
        self.handler = handler
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None  #: the code the connection closed with
        self.closed = False  #: the socket is gone
        self._parser = FrameParser(max_message, self._on_message)
        #: our close frame has been sent (a close has begun, from either side, or the
        #: connection failed): nothing more may be written
        self.closing = False
        self._held: deque[tuple[int, bytes]] | None = None
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._close_timer: asyncio.TimerHandle | None = None

    async def accept(self) -> web.StreamResponse:
        """Answers the upgrade (400 on a bad handshake) and starts feeding the parser."""
        key = _check_handshake(self.request)
        response = web.StreamResponse(
            status=101,
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Accept": accept_key(key),
            },
        )
        response.force_close()
        await response.prepare(self.request)
        protocol = self.request.protocol
        self.transport = protocol.transport  # type: ignore[assignment]
        if self.transport is None or self.transport.is_closing():
            self._lost()
            return response
        # The request handler hands every later byte to `feed_data` and calls `feed_eof` when
        # the connection is lost.
        protocol.set_parser(self)  # type: ignore[arg-type]
        protocol.keep_alive(False)
        return response

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)

    # -- what the request handler calls ---------------------------------------------------------

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if not self.closed:
            code = self._parser.feed(data)
            if code:
                self._fail(code)
        return False, b""

    def feed_eof(self) -> None:
        self._lost()

    # -- messages --------------------------------------------------------------------------------

    def _on_message(self, opcode: int, payload: bytes) -> None:
        if opcode <= OP_BINARY:
            if self.closing:
                return  # after our close frame the handler has said its last word
            if self._held is not None:
                self._held.append((opcode, payload))
                return
        try:
            if opcode == OP_TEXT:
                self.handler.on_text(payload)
            elif opcode == OP_BINARY:
                self.handler.on_binary(payload)
            elif opcode == OP_PING:
                self._write(ws_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self._on_close_frame(payload)
            # a pong needs nothing
        except Exception:
            from engine.log import get_logger

            get_logger("websocket").exception(
                "websocket.handler_failed", session=getattr(self.handler, "session_id", "-"))
            self._fail(INTERNAL_ERROR)

    def _on_close_frame(self, payload: bytes) -> None:
        if len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
            if not _sendable_close_code(code):
                self._fail(1002)
                return
        elif not payload:
            code = NO_STATUS
        else:
            self._fail(1002)
            return
        if self.close_code is None:
            self.close_code = code
        if not self.closing:
            self.closing = True
            self._write(close_frame(1000 if code == NO_STATUS else code))
        self._parser.fail(1000)  # nothing after a close frame is read
        if self.transport is not None:
            self.transport.close()

    def hold(self) -> None:
        """Keep later messages back (in order) until `release()`; reading pauses meanwhile."""
        if self._held is None:
            self._held = deque()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()

    def release(self) -> None:
        """Deliver what was held, then resume reading."""
        held, self._held = self._held, None
        while held:
            if self.closed or self.closing:
                return
            opcode, payload = held.popleft()
            self._on_message(opcode, payload)
            if self._held is not None:  # the handler held again: keep the rest for later
                self._held.extendleft(reversed(held))
                return
        self._resume_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _drop_held(self) -> None:
        """Closing: held messages will never be delivered, and the peer's close must be read."""
        if self._held is not None:
            self._held = None
            self._resume_reading()

    # -- sending and closing -----------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Writes a whole frame (see `ws_text_frame`) unless a close has begun."""
        if not self.closing:
            self._write(frame)

    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Starts the close handshake; the socket is cut if the peer does not answer in time."""
        if not self.closing:
            self._begin_close(code, reason.encode()[:120])

    def _fail(self, code: int) -> None:
        """Fails the connection: nothing more is read as messages, a close frame says why."""
        if self.closed:
            return
        self._parser.fail(code)
        if not self.closing:
            self._begin_close(code, FAILURE_REASONS.get(code, b""))

    def _begin_close(self, code: int, reason: bytes) -> None:
        """Our close frame, and nothing more is sent. Reading goes on (data is discarded) until
        the peer closes or `CLOSE_TIMEOUT_S` passes: closing the socket while the peer's data is
        still arriving would reset the connection, and the reset would destroy our close frame,
        unread, on the peer's side. (Ending our side with a FIN is no better: clients then fail
        to send their own close and report 1006.)"""
        self.closing = True
        if self.close_code is None:
            self.close_code = code
        self._drop_held()
        self._write(close_frame(code, reason))
        if self.transport is None or self.transport.is_closing():
            self._cut()
        else:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self._cut)

    def _cut(self) -> None:
        if self.transport is not None:
            self.transport.close()  # feed_eof follows from connection_lost
        else:
            self._lost()

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.closing = True
        self._held = None
        if self.close_code is None:
            self.close_code = ABNORMAL
        # Cut the cycles (handler <-> socket, parser <-> socket) so an ended call is freed by
        # reference counting at once rather than by a rare full garbage collection.
        self.handler = _GONE
        self._parser = _SPENT_PARSER
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self._done.done():
            self._done.set_result(None)
