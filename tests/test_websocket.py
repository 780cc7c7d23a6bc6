"""The server WebSocket under the Media Streams path: the native frame parser on its own (any
split, any garbage, every protocol error with its close code) and `ServerWebSocket` on a real
loopback socket against aiohttp's client and a raw TCP peer."""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import random
import weakref

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from engine._native.wsframe import FrameParser, text_frame_b64
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.wsclient import client_frame, upgrade_request
from engine.transports.base import ws_text_frame
from engine.transports.wsserver import ServerWebSocket, accept_key, close_frame
from tests.servers import serve_app
from tests.twilio_helpers import until


class Collect:
    def __init__(self) -> None:
        self.messages: list[tuple[int, bytes]] = []

    def __call__(self, opcode: int, payload: bytes) -> None:
        self.messages.append((opcode, payload))


def feed_in_pieces(parser: FrameParser, data: bytes, cuts: list[int]) -> int:
    code = 0
    last = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        code = parser.feed(data[last:cut]) or code
        last = cut
    return code


# -- the parser -------------------------------------------------------------------------------

message_st = st.one_of(
    st.tuples(st.just(1), st.text(max_size=300).map(lambda t: t.encode())),
    st.tuples(st.just(2), st.binary(max_size=70_000)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(message_st, st.integers(1, 3), st.booleans()), max_size=6),
       st.lists(st.integers(0, 10**6), max_size=12))
def test_messages_come_out_whole_however_the_bytes_are_split(
    plan: list[tuple[tuple[int, bytes], int, bool]], cuts: list[int]
) -> None:
    wire = b""
    expected: list[tuple[int, bytes]] = []
    for (opcode, payload), pieces, ping_between in plan:
        step = max(1, len(payload) // pieces + 1)
        parts = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
        for k, part in enumerate(parts):
            wire += client_frame(opcode if k == 0 else 0, part, fin=k == len(parts) - 1)
            if ping_between and k == 0 and len(parts) > 1:
                # a control frame may sit between the fragments of a message
                wire += client_frame(9, b"p")
                expected.append((9, b"p"))
        expected.append((opcode, payload))
    # a ping inside a fragmented message comes out before the message it interrupted
    ordered: list[tuple[int, bytes]] = []
    pending_pings: list[tuple[int, bytes]] = []
    for item in expected:
        (pending_pings if item[0] == 9 else ordered).append(item)
        if item[0] != 9:
            ordered[-1:-1] = pending_pings
            pending_pings = []
    out = Collect()
    parser = FrameParser(70_000, out)
    assert feed_in_pieces(parser, wire, cuts) == 0
    assert out.messages == ordered
    assert parser.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_garbage_never_raises_and_never_holds_more_than_one_message(
    data: bytes, cuts: list[int]
) -> None:
    parser = FrameParser(200, Collect())
    code = feed_in_pieces(parser, data, cuts)
    assert code in (0, 1002, 1007, 1009)
    assert parser.buffered <= 2 * 200 + 14
    if code:
        assert parser.feed(client_frame(1, b"after")) == code  # a failed parser stays failed


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (client_frame(1, b"x", masked=False), 1002),  # clients must mask
        (client_frame(1, b"x", rsv=4), 1002),  # no extension was negotiated
        (client_frame(3, b"x"), 1002),  # reserved data opcode
        (client_frame(11, b"x"), 1002),  # reserved control opcode
        (client_frame(9, b"x", fin=False), 1002),  # a fragmented control frame
        (client_frame(9, b"x" * 126), 1002),  # a control frame over 125 bytes
        (client_frame(0, b"x"), 1002),  # a continuation with nothing to continue
        (client_frame(1, b"a", fin=False) + client_frame(1, b"b"), 1002),  # message in a message
        (client_frame(1, b"\xff\xfe"), 1007),  # text that is not UTF-8
        (client_frame(1, b"x" * 101, fin=False) + client_frame(0, b"x" * 100), 1009),
    ],
)
def test_protocol_errors_fail_with_their_close_code(wire: bytes, code: int) -> None:
    out = Collect()
    parser = FrameParser(200, out)
    assert parser.feed(wire) == code
    assert parser.error == code and out.messages == []


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    parser = FrameParser(1000, Collect())
    header = client_frame(2, bytes(5000))[:8]  # 2 + 2 length bytes + 4 mask bytes
    assert parser.feed(header) == 1009
    assert parser.buffered == 0


def test_64_bit_lengths_and_valid_utf8_text_pass() -> None:
    out = Collect()
    parser = FrameParser(100_000, out)
    big = os.urandom(70_000)
    text = "héllo wörld ☎".encode()
    assert parser.feed(client_frame(2, big) + client_frame(1, text)) == 0
    assert out.messages == [(2, big), (1, text)]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.binary(max_size=130), st.binary(max_size=8))
def test_a_base64_media_frame_matches_the_plain_construction(
    data: bytes, prefix: bytes, suffix: bytes
) -> None:
    assert text_frame_b64(prefix, data, suffix) == ws_text_frame(
        prefix + base64.b64encode(data) + suffix
    )


def test_server_frames_are_unmasked_with_the_right_length_forms() -> None:
    assert ws_text_frame(b"abc") == b"\x81\x03abc"
    assert ws_text_frame(b"x" * 300)[:4] == b"\x81\x7e\x01\x2c"
    assert ws_text_frame(b"x" * 70_000)[:10] == b"\x81\x7f" + (70_000).to_bytes(8, "big")
    assert close_frame(1000, b"bye") == b"\x88\x05\x03\xe8bye"


# -- on a real socket -------------------------------------------------------------------------


class Echo:
    """A handler that echoes text, and holds delivery for a moment after a message "hold"."""

    def __init__(self) -> None:
        self.ws: ServerWebSocket | None = None
        self.received: list[bytes] = []
        self.binary: list[bytes] = []

    def on_text(self, data: bytes) -> None:
        assert self.ws is not None
        self.received.append(data)
        if data == b"hold":
            self.ws.hold()
            asyncio.get_running_loop().call_later(0.1, self.ws.release)
        elif data == b"close-me":
            self.ws.close(4000, "asked to")
        elif data == b"boom":
            raise RuntimeError("the handler failed")
        else:
            self.ws.transport.write(ws_text_frame(b"echo:" + data))  # type: ignore[union-attr]

    def on_binary(self, data: bytes) -> None:
        self.binary.append(data)


class App:
    def __init__(self) -> None:
        self.handlers: list[Echo] = []
        self.closed: list[int | None] = []

    async def route(self, request: web.Request) -> web.StreamResponse:
        handler = Echo()
        self.handlers.append(handler)
        ws = ServerWebSocket(request, handler, max_message=1000)
        handler.ws = ws
        response = await ws.accept()
        await ws.wait_closed()
        self.closed.append(ws.close_code)
        return response

    def make(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.route)
        return app


async def test_messages_pings_and_a_client_close_over_loopback() -> None:
    app = App()
    async with serve_app(app.make()) as url, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/ws", autoping=False) as ws:
            await ws.send_str("one")
            await ws.send_bytes(b"\x00\x01")
            await ws.send_str("two")
            assert (await ws.receive()).data == "echo:one"
            assert (await ws.receive()).data == "echo:two"
            await ws.ping(b"are you there")
            pong = await ws.receive()
            assert pong.type is WSMsgType.PONG and pong.data == b"are you there"
            await ws.close(code=4100)
        await until(lambda: app.closed == [4100])
    assert app.handlers[0].received == [b"one", b"two"]
    assert app.handlers[0].binary == [b"\x00\x01"]


async def test_held_messages_wait_and_keep_their_order() -> None:
    app = App()
    async with serve_app(app.make()) as url, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/ws") as ws:
            await ws.send_str("hold")
            for k in range(5):
                await ws.send_str(f"m{k}")
            await asyncio.sleep(0.03)
            assert app.handlers[0].received == [b"hold"]  # still held
            echoes = [(await ws.receive()).data for _ in range(5)]
            assert echoes == [f"echo:m{k}" for k in range(5)]


async def test_server_close_and_oversized_message_reach_the_client_with_their_codes() -> None:
    app = App()
    async with serve_app(app.make()) as url, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/ws") as ws:
            await ws.send_str("close-me")
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE and ws.close_code == 4000
        async with http.ws_connect(f"{url}/ws") as ws:
            # refused from its header while its 4 MB are still on the way: the close frame
            # must still reach the client (a reset would destroy it unread)
            await ws.send_str("x" * 4_000_000)
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE and ws.close_code == 1009
            assert msg.extra == "message too big"
        await until(lambda: sorted(app.closed) == [1009, 4000])


async def test_a_bad_handshake_gets_400() -> None:
    async with serve_app(App().make()) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/ws") as resp:
            assert resp.status == 400
        headers = {"Upgrade": "websocket", "Connection": "Upgrade",
                   "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "short"}
        async with http.get(f"{url}/ws", headers=headers) as resp:
            assert resp.status == 400


async def raw_peer(
    port: int,
) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A TCP peer that has asked for the upgrade by hand: its key, streams and the answer's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(random.randbytes(16)).decode()
    writer.write(upgrade_request("/ws", key))
    return key, reader, writer, await reader.readuntil(b"\r\n\r\n")


async def test_a_raw_peer_breaking_the_protocol_gets_1002_and_others_carry_on() -> None:
    app = App()
    async with serve_app(app.make()) as url, aiohttp.ClientSession() as http:
        port = int(url.rsplit(":", 1)[1])
        async with http.ws_connect(f"{url}/ws") as good:
            key, reader, writer, head = await raw_peer(port)
            assert head.startswith(b"HTTP/1.1 101")
            assert f"Sec-WebSocket-Accept: {accept_key(key)}".encode() in head
            writer.write(client_frame(1, b"unmasked", masked=False))
            header = await asyncio.wait_for(reader.readexactly(2), 5)
            assert header[0] == 0x88  # a close frame
            body = await reader.readexactly(header[1])
            assert body == (1002).to_bytes(2, "big") + b"protocol error"  # code and reason
            writer.close()  # the peer hangs up: the server's side goes at once
            await good.send_str("still here")
            assert (await good.receive()).data == "echo:still here"
        await until(lambda: 1002 in app.closed)


async def test_a_closed_socket_is_freed_without_the_garbage_collector() -> None:
    # The engine runs with a garbage collector tuned for latency (rare full collections): an
    # ended call must not wait for one to give its memory back.
    app = App()
    gc.collect()
    gc.disable()
    try:
        async with serve_app(app.make()) as url, aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{url}/ws") as ws:
                await ws.send_str("one")
                assert (await ws.receive()).data == "echo:one"
            await until(lambda: len(app.closed) == 1)
            handler = app.handlers.pop()
            gone = weakref.ref(handler.ws)  # type: ignore[arg-type]
            del handler
            await asyncio.sleep(0.05)
            assert gone() is None
    finally:
        gc.enable()


async def test_a_close_while_messages_are_held_still_completes_the_handshake_at_once() -> None:
    # The handler holds delivery (a call starting), then refuses the call: the close handshake
    # must not wait out the timeout because reading was paused.
    app = App()
    async with serve_app(app.make()) as url, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/ws") as ws:
            await ws.send_str("hold")
            await until(lambda: app.handlers and app.handlers[0].ws._held is not None)
            started = asyncio.get_running_loop().time()
            app.handlers[0].ws.close(4001, "refused")  # type: ignore[union-attr]
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE and ws.close_code == 4001
        await until(lambda: app.closed == [4001], timeout=1.0)
        assert asyncio.get_running_loop().time() - started < 1.0


@pytest.mark.parametrize("code", [999, 1005, 1006, 1015, 2000, 5000])
async def test_a_close_frame_with_a_reserved_code_is_a_protocol_error(code: int) -> None:
    app = App()
    async with serve_app(app.make()) as url:
        port = int(url.rsplit(":", 1)[1])
        _, reader, writer, _ = await raw_peer(port)
        writer.write(client_frame(8, code.to_bytes(2, "big")))
        header = await asyncio.wait_for(reader.readexactly(2), 5)
        body = await reader.readexactly(header[1])
        assert header[0] == 0x88 and body[:2] == (1002).to_bytes(2, "big")
        writer.close()
        await until(lambda: app.closed == [1002])


async def test_a_failing_handler_fails_only_its_connection_with_1011() -> None:
    app = App()
    async with serve_app(app.make()) as url, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}/ws") as other, http.ws_connect(f"{url}/ws") as ws:
            await ws.send_str("boom")
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE and ws.close_code == 1011
            assert msg.extra == "internal error"
            await other.send_str("still here")
            assert (await other.receive()).data == "echo:still here"
