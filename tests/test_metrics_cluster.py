"""/metrics across `serve --workers N`: the cluster view sums every worker, `?scope=worker` shows
the answering worker alone, and one process behaves as before.

prometheus-client's value class is process-wide, so the publishing tests run each "worker" in a
subprocess of its own; this test process only reads the shared files.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import AsyncIterator

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from bench.twilio_caller import Ticker, TwilioCaller
from tests.servers import running_engine
from tests.test_workers import free_port, wait_healthy

CHECKOUT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str | bytes) -> Samples:
    """Prometheus text → {(sample name, sorted labels): value}."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str | bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


# -- publishing, one subprocess per worker ----------------------------------------------------

WORKER = textwrap.dedent("""
    import json, os, sys
    from engine.metrics import Metrics, enable_multiprocess
    from engine.webhooks import WebhookCollector, WebhookStats

    path, frames, bad, updates = sys.argv[1], *map(int, sys.argv[2:])
    enable_multiprocess(path)
    metrics = Metrics()
    webhook_stats = WebhookStats()
    metrics.registry.register(WebhookCollector(webhook_stats))
    stats = metrics.call_started("call")  # left live: this worker's gauge counts it
    stats.frames_in = frames
    webhook_stats.by_type["status-update"] = updates
    metrics.bad_messages = bad - 1
    metrics.shared.publish()
    metrics.bad_messages = bad  # only the increase since the last publish may be added
    metrics.shared.publish()
    metrics.shared.publish()
    print(json.dumps({"pid": os.getpid(), "cluster": metrics.render("cluster").decode(),
                      "worker": metrics.render("worker").decode()}))
""")


def run_worker(path: Path, frames: int, bad: int, updates: int) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(path), str(frames), str(bad), str(updates)],
        capture_output=True, text=True, cwd=CHECKOUT, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def read_shared(path: Path) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(path))
    return generate_latest(registry)


def test_cluster_view_sums_published_workers_and_worker_view_is_its_own(tmp_path: Path) -> None:
    run_worker(tmp_path, frames=7, bad=2, updates=1)
    second = run_worker(tmp_path, frames=3, bad=5, updates=2)
    cluster, worker = second["cluster"], second["worker"]
    assert isinstance(cluster, str) and isinstance(worker, str)
    assert value(cluster, "engine_frames_in_total") == 10
    assert value(cluster, "engine_bad_messages_total") == 7
    assert value(cluster, "engine_calls_total") == 2
    assert value(cluster, "engine_active_calls") == 2  # the first worker is not marked dead
    assert value(cluster, "engine_vapi_messages_total", type="status-update") == 3
    assert value(cluster, "engine_event_loop_lag_seconds_count") == 0  # histograms are shared
    assert value(worker, "engine_frames_in_total") == 3
    assert value(worker, "engine_bad_messages_total") == 5
    assert value(worker, "engine_active_calls") == 1
    assert value(worker, "engine_vapi_messages_total", type="status-update") == 2


def test_a_dead_workers_gauges_leave_the_sum_and_its_counters_stay(tmp_path: Path) -> None:
    first = run_worker(tmp_path, frames=7, bad=2, updates=0)
    run_worker(tmp_path, frames=3, bad=5, updates=0)
    assert value(read_shared(tmp_path), "engine_active_calls") == 2
    pid = first["pid"]
    assert isinstance(pid, int)
    mark_process_dead(pid, str(tmp_path))
    shared = read_shared(tmp_path)
    assert value(shared, "engine_active_calls") == 1
    assert value(shared, "engine_bad_messages_total") == 7
    assert value(shared, "engine_calls_total") == 2


# -- one process: unchanged ---------------------------------------------------------------------

async def test_one_process_answers_its_own_metrics_for_either_scope() -> None:
    async with running_engine() as base, aiohttp.ClientSession() as http:
        views = []
        for query in ("", "?scope=cluster", "?scope=worker"):
            async with http.get(f"{base}/metrics{query}") as resp:
                assert resp.status == 200
                views.append(samples(await resp.text()))
    for view in views:
        del view[("engine_uptime_seconds", ())]
        del view[("engine_event_loop_tasks", ())]  # the scrapes' own tasks come and go
    assert views[0] == views[1] == views[2]
    assert ("engine_bad_messages_total", ()) in views[0]


async def test_unknown_scope_is_a_json_400() -> None:
    async with running_engine() as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/metrics?scope=everything") as resp:
            assert resp.status == 400
            assert (await resp.json()) == {"error": "scope must be one of cluster, worker"}


# -- the real CLI with two workers --------------------------------------------------------------

@contextlib.asynccontextmanager
async def two_workers(tmp: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--port", str(port), "--workers", "2",
         "--backend", "echo"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=CHECKOUT,
        env={**os.environ, "SHUTDOWN_GRACE_S": "1", "TMPDIR": str(tmp)},
        start_new_session=True,  # so a failed test can end the workers along with the parent
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url)
        yield proc, url
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left after a clean stop
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def pin_both_workers(url: str) -> dict[int, aiohttp.ClientSession]:
    """One kept-alive connection to each worker (a connection stays with the worker that
    accepted it), by worker pid."""
    pinned: dict[int, aiohttp.ClientSession] = {}
    for _ in range(60):
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with http.get(url + "/health") as resp:
            pid = (await resp.json())["worker"]
        if pid in pinned:
            await http.close()
        else:
            pinned[pid] = http
        if len(pinned) == 2:
            return pinned
    raise AssertionError("the kernel never picked the second worker")


async def scrape(http: aiohttp.ClientSession, url: str, scope: str) -> str:
    async with http.get(f"{url}/metrics?scope={scope}") as resp:
        assert resp.status == 200
        return await resp.text()


async def settle(http: aiohttp.ClientSession, url: str, scope: str, name: str,
                 expected: float, timeout: float = 5.0) -> None:
    """Waits until `name` reads `expected` (the cluster view lags by up to a second)."""
    deadline = time.monotonic() + timeout
    while (got := value(await scrape(http, url, scope), name)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is {got} in the {scope} view, expected {expected}")
        await asyncio.sleep(0.1)


async def test_two_workers_answer_for_each_other_and_each_for_itself(tmp_path: Path) -> None:
    ticker = Ticker()
    callers: list[TwilioCaller] = []
    async with two_workers(tmp_path) as (proc, url):
        files_dir, = tmp_path.iterdir()  # the workers' multi-process files
        assert files_dir.name.startswith("voice-engine-metrics-")
        pinned = await pin_both_workers(url)
        (pid_a, http_a), (pid_b, http_b) = pinned.items()
        try:
            share: dict[int, float] = {}
            while not (share.get(pid_a) and share.get(pid_b)):  # calls on both workers
                assert len(callers) < 16, "every call went to one worker"
                caller = TwilioCaller(url.replace("http", "ws") + "/twilio/stream", ticker)
                await caller.connect()
                callers.append(caller)
                deadline = time.monotonic() + 5.0
                while sum(share.values()) != len(callers) and time.monotonic() < deadline:
                    for pid, http in pinned.items():
                        text = await scrape(http, url, "worker")
                        share[pid] = value(text, "engine_calls_total") or 0
                    await asyncio.sleep(0.02)
            calls = len(callers)
            assert share[pid_a] + share[pid_b] == calls
            for http in (http_a, http_b):  # whichever worker answers, it answers for both
                await settle(http, url, "cluster", "engine_calls_total", calls)
                await settle(http, url, "cluster", "engine_active_calls", calls)
            assert value(await scrape(http_a, url, "worker"), "engine_active_calls") == share[pid_a]

            os.kill(pid_b, signal.SIGKILL)  # its calls drop; the parent marks it dead
            await settle(http_a, url, "cluster", "engine_active_calls", share[pid_a])
            assert value(await scrape(http_a, url, "cluster"), "engine_calls_total") == calls
        finally:
            for caller in callers:
                if caller.active:
                    await caller.hangup()
            await ticker.close()
            for http in pinned.values():
                await http.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    assert list(tmp_path.iterdir()) == []  # the parent removed the multi-process files
