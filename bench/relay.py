"""The trivial relay: the least a Twilio Media Streams server can do, measured beside the engine.

`GET /twilio/stream` parses every text frame and answers each `media` at once with a `media`
carrying the same payload (no pacing, no transcoding, no jitter buffer); `mark` gets no answer;
`stop` ends the stream. The engine's relay latency and CPU per call are compared against this.

Run it: `python -m bench.relay --port P` (uvloop).
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import WSMsgType, web

MEDIA_REPLY = '{"event":"media","streamSid":"%s","media":{"payload":"%s"}}'


async def stream(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024, compress=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue  # Twilio never sends binary frames; a relay has nothing to do with them
        try:
            data = orjson.loads(msg.data)
            event = data["event"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if event == "media":
            try:
                reply = MEDIA_REPLY % (data["streamSid"], data["media"]["payload"])
            except (KeyError, TypeError):
                continue
            await ws.send_str(reply)
        elif event == "stop":
            break
    await ws.close()
    return ws


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/twilio/stream", stream)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.relay", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # the relay still works, only slower
        loop = asyncio.new_event_loop()
    web.run_app(
        create_app(), host=args.host, port=args.port, access_log=None, print=None, loop=loop
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
