"""The server's own routes: health and metrics, over a real socket."""
from __future__ import annotations

import aiohttp

from tests.servers import running_engine


async def test_health_reports_counts_and_uptime() -> None:
    async with running_engine() as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body["status"] == "ok"
    assert body["activeSessions"] == 0 and body["activeCalls"] == 0
    assert body["uptime"] >= 0


async def test_metrics_are_prometheus_text() -> None:
    async with running_engine() as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    assert "engine_active_calls 0.0" in text
    assert "engine_event_loop_tasks " in text and "engine_event_loop_tasks 0.0" not in text
    assert "# TYPE engine_frames_in_total counter" in text


async def test_unknown_route_is_a_json_404() -> None:
    async with running_engine() as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/nope") as resp:
            assert resp.status == 404
            assert (await resp.json()) == {"error": "Not Found"}
