"""HTTP and WebSocket routes on one port (CONTRACT.md); start-up on uvloop."""
from __future__ import annotations

from typing import Awaitable, Callable

import orjson
from aiohttp import web

from engine.config import Settings
from engine.log import get_logger
from engine.runtime import Engine

log = get_logger("server")

ENGINE_KEY = web.AppKey("engine", Engine)


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def json_error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it is known to exceed `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as `{"error": ...}` with its status, never as an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return json_error(exc.status, exc.reason)
    except Exception:
        log.exception("http.unhandled", path=request.path)
        return json_error(500, "internal error")


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = engine.health()
    if engine.cluster is not None:  # every worker sharing Redis, from a cache
        body["cluster"] = engine.cluster.view()
    return json_response(body)


async def metrics(request: web.Request) -> web.Response:
    """Every worker's metrics combined (any worker answers a scrape of the shared port), or
    with `?scope=worker` only the answering worker's."""
    from engine.metrics import SCOPES

    scope = request.query.get("scope", "cluster")
    if scope not in SCOPES:
        return json_error(400, f"scope must be one of {', '.join(SCOPES)}")
    body = request.app[ENGINE_KEY].metrics.render(scope)
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def create_app(settings: Settings, engine: Engine | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=1024 * 1024)
    engine = engine or Engine(settings)
    app[ENGINE_KEY] = engine
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    from engine import chat, webhooks
    from engine.transports import twilio, webrtc

    twilio.setup_routes(app)
    webrtc.setup_routes(app)
    chat.setup_routes(app)
    app[webhooks.VAPI_CALLS_KEY] = engine.vapi_calls
    webhooks.setup_routes(app)

    async def on_startup(app: web.Application) -> None:
        await engine.start()

    async def on_shutdown(app: web.Application) -> None:
        await engine.drain(settings.shutdown_grace_s)

    async def on_cleanup(app: web.Application) -> None:
        await engine.stop()

    app.on_shutdown.append(on_shutdown)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def quiet_garbage_collector() -> None:
    """Keeps the cyclic garbage collector from pausing every call.

    Each media message allocates a few dicts; with CPython's default thresholds that triggers a
    full collection about once a second at a few hundred calls, and a full collection walks every
    object of the process (tens of milliseconds with aiohttp, numpy and the models loaded): long
    enough to make every caller's playout buffer run dry. Objects made at start-up are frozen out
    of collection, and the thresholds are raised so young garbage is collected in larger, rarer
    batches. Audio objects are freed by reference counting anyway; only cycles wait for the
    collector.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def prefer_the_event_loop() -> None:
    """Recognition and synthesis run on worker threads; a short GIL switch interval lets the event
    loop take the GIL back within a fraction of a millisecond when a caller's frame arrives,
    instead of after CPython's default 5 ms."""
    import sys

    sys.setswitchinterval(0.0005)


def serve_one(settings: Settings, worker: int = 0) -> None:
    """One engine process on uvloop; SIGTERM drains its calls, then it exits."""
    import uvloop

    app = create_app(settings)
    quiet_garbage_collector()
    prefer_the_event_loop()
    log.info("server.listen", host=settings.host, port=settings.port, worker=worker,
             url=f"http://{settings.host}:{settings.port}")
    web.run_app(
        app, host=settings.host, port=settings.port, print=None, access_log=None,
        loop=uvloop.new_event_loop(), handle_signals=True, reuse_port=settings.workers > 1,
        shutdown_timeout=settings.shutdown_grace_s + 5.0,
    )


def serve(settings: Settings) -> int:
    if settings.workers > 1:
        from engine.workers import run_workers

        return run_workers(settings, serve_one)
    serve_one(settings)
    return 0


