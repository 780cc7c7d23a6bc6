"""`serve --workers N`: N engine processes on one port.

Each worker is a whole engine on its own uvloop, bound to the same port with SO_REUSEPORT so the
kernel spreads new connections across them; they share nothing but Redis (when configured). The
parent only supervises: it forwards SIGTERM/SIGINT (each worker then drains its calls), restarts
a worker that dies, and gives up if workers keep dying at start (a port taken by another program,
say).

/metrics answers for all workers: the parent makes a private directory for prometheus-client's
multi-process files (removed when it exits), each worker writes its metrics there (see
engine/metrics.py), and the parent retires a dead worker's live gauges.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from typing import Callable

from prometheus_client.multiprocess import mark_process_dead

from engine.config import Settings
from engine.log import get_logger
from engine.metrics import enable_multiprocess

log = get_logger("workers")

RESTART_WINDOW_S = 5.0  # a worker that dies sooner than this after starting counts as a failure
MAX_QUICK_FAILURES = 3


def run_workers(settings: Settings, serve_one: Callable[[Settings, int], None]) -> int:
    from engine.transports.twilio import process_secret

    process_secret()  # made before the fork: a stream token from one worker is good on all
    metrics_dir = tempfile.mkdtemp(prefix="voice-engine-metrics-")  # mode 0700
    try:
        return _supervise(settings, serve_one, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(settings: Settings, serve_one: Callable[[Settings, int], None],
               metrics_dir: str) -> int:
    children: dict[int, tuple[int, float]] = {}  # pid → (worker index, started)
    stopping = False
    quick_failures = 0

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                enable_multiprocess(metrics_dir)
                serve_one(settings, index)
            except BaseException:  # noqa: BLE001 - the parent logs and restarts
                log.exception("worker.crashed", worker=index)
                code = 1
            os._exit(code)
        children[pid] = (index, time.monotonic())
        log.info("worker.started", worker=index, pid=pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(settings.workers):
        spawn(index)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index, started = children.pop(pid, (-1, 0.0))
        code = os.waitstatus_to_exitcode(status)
        mark_process_dead(pid, metrics_dir)  # its counters stay in the sums, its gauges go
        log.info("worker.exited", worker=index, pid=pid, code=code)
        if stopping or index < 0:
            continue
        if time.monotonic() - started < RESTART_WINDOW_S:
            quick_failures += 1
            if quick_failures >= MAX_QUICK_FAILURES:
                log.error("workers.giving_up", reason="workers keep dying at start")
                forward(signal.SIGTERM, None)
                stopping = True
                continue
        spawn(index)
    return 1 if quick_failures >= MAX_QUICK_FAILURES else 0
