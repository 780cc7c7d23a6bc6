"""Start-up from the command line, several workers on one port, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp

from bench.twilio import free_port
from bench.twilio_caller import Ticker, TwilioCaller
from engine.config import Settings
from tests.servers import serve_engine
from tests.twilio_helpers import until


async def wait_healthy(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with aiohttp.ClientSession() as http, http.get(url + "/health") as resp:
                return await resp.json()
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_cli_serves_with_two_workers_on_one_port_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            "--backend",
            "echo",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "SHUTDOWN_GRACE_S": "1"},
        start_new_session=True,  # its own process group: a failed test takes the workers too
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url)
        workers = set()
        for _ in range(60):
            # a new connection each time, so the kernel may pick either worker
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as http:
                async with http.get(url + "/health") as resp:
                    body = await resp.json()
            assert body["status"] == "ok"
            workers.add(body["worker"])
            if len(workers) == 2:
                break
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_draining_refuses_new_calls_and_ends_live_ones_after_the_grace() -> None:
    async with serve_engine(Settings(backend="echo")) as served:
        ticker = Ticker()
        caller = TwilioCaller(served.ws_url + "/twilio/stream", ticker)
        await caller.connect()
        await until(lambda: len(served.engine.calls) == 1, what="call up")
        drained = asyncio.create_task(served.engine.drain(0.5))
        await asyncio.sleep(0.1)
        assert served.engine.overloaded()  # new calls are refused while draining
        assert len(served.engine.calls) == 1  # the live call goes on during the grace
        await drained
        assert served.engine.calls == {}
        await until(lambda: caller.closed_at is not None, what="caller hung up by the engine")
        await ticker.close()
