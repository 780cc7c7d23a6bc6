"""Start the real engine on a free loopback port for a test."""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

from aiohttp import web

from engine.config import Settings
from engine.server import ENGINE_KEY, create_app


@contextlib.asynccontextmanager
async def running_engine(settings: Settings | None = None, **overrides: object) -> AsyncIterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT) of an engine serving on a real socket."""
    settings = (settings or Settings(backend="echo")).with_overrides(port=0, **overrides)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    app[ENGINE_KEY].base_url = f"http://127.0.0.1:{port}"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
