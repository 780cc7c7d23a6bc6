"""Start the real engine on a free loopback port for a test."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

from aiohttp import web

from engine.backends.base import BackendFactory
from engine.config import Settings
from engine.runtime import Engine
from engine.server import ENGINE_KEY, create_app


@dataclass
class Served:
    url: str  #: http://127.0.0.1:PORT
    engine: Engine  #: the engine behind it, for assertions on its state
    app: web.Application

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:]


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, **runner_options: object) -> AsyncIterator[str]:
    """Runs any aiohttp app on a free loopback port; yields its base URL (http://127.0.0.1:PORT)."""
    runner = web.AppRunner(app, access_log=None, **runner_options)  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve_engine(settings: Settings | None = None, backend: BackendFactory | None = None,
                       **overrides: object) -> AsyncIterator[Served]:
    """The engine serving on a real loopback socket, and the engine object itself. `backend`
    replaces the factory the settings would choose (to tune a real backend's timeouts)."""
    settings = (settings or Settings(backend="echo")).with_overrides(port=0, **overrides)
    app = create_app(settings, Engine(settings, backend=backend))
    async with serve_app(app) as url:
        engine = app[ENGINE_KEY]
        engine.base_url = url
        yield Served(url, engine, app)


@contextlib.asynccontextmanager
async def running_engine(
    settings: Settings | None = None, **overrides: object
) -> AsyncIterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT) of an engine serving on a real socket."""
    async with serve_engine(settings, **overrides) as served:
        yield served.url
