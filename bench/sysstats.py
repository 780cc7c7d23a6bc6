"""CPU and memory of a process over time, sampled with psutil from inside an asyncio program.

Owns `ProcessSampler`: every `interval` seconds it records the process's CPU (percent of one core,
so 100 = one core busy; children included, for servers that fork workers) and resident memory,
tagged with a caller-supplied label (the harness passes the number of connected calls), and sums
them up over a time window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic seconds
    cpu: float  # percent of one core since the previous sample
    rss_mb: float  # resident set size, MiB
    calls: int  # the label given by `label()` at sampling time (connected calls)
    system_cpu: float  # the whole machine's busy CPU, percent of one core (other load included)


class ProcessSampler:
    def __init__(
        self,
        pid: int,
        interval: float = 0.5,
        label: Callable[[], int] = lambda: 0,
        include_children: bool = True,
    ) -> None:
        self.pid = pid
        self.interval = interval
        self.label = label
        self.include_children = include_children
        self.samples: list[Sample] = []
        self._proc = psutil.Process(pid)
        self._children: dict[int, psutil.Process] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_cpu = 0.0
        self._last_t = 0.0
        self._last_busy = 0.0
        self._first_cpu: float | None = None  # CPU seconds at the first sample (the baseline)

    def _processes(self) -> list[psutil.Process]:
        procs = [self._proc]
        if self.include_children:
            try:
                for child in self._proc.children(recursive=True):
                    # Keep one Process object per child so its CPU times stay comparable.
                    procs.append(self._children.setdefault(child.pid, child))
            except psutil.Error:
                pass
        return procs

    def _totals(self) -> tuple[float, float]:
        cpu = 0.0
        rss = 0.0
        for proc in self._processes():
            try:
                times = proc.cpu_times()
                cpu += times.user + times.system
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
        return cpu, rss

    @staticmethod
    def _machine_busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def sample(self) -> Sample | None:
        """Take one sample now (the first call only sets the baseline and returns None)."""
        now = time.monotonic()
        cpu, rss = self._totals()
        busy = self._machine_busy()
        if self._last_t == 0.0:
            self._last_cpu, self._last_t, self._last_busy = cpu, now, busy
            self._first_cpu = cpu
            return None
        dt = now - self._last_t
        if dt <= 0:
            return None
        # A child that exited takes its CPU time with it; never report negative use.
        percent = max(0.0, 100.0 * (cpu - self._last_cpu) / dt)
        machine = max(0.0, 100.0 * (busy - self._last_busy) / dt)
        self._last_cpu, self._last_t, self._last_busy = cpu, now, busy
        s = Sample(
            t=now, cpu=percent, rss_mb=rss / (1024 * 1024), calls=self.label(), system_cpu=machine
        )
        self.samples.append(s)
        return s

    def start(self) -> None:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sampler-{self.pid}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(psutil.Error):
            self.sample()

    async def _run(self) -> None:
        next_t = time.monotonic() + self.interval
        while True:
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            next_t += self.interval
            try:
                self.sample()
            except psutil.Error:
                return  # the process is gone

    @property
    def cpu_seconds(self) -> float:
        """CPU time the process used between the first and the last sample."""
        return 0.0 if self._first_cpu is None else self._last_cpu - self._first_cpu

    def summary(self, t0: float = float("-inf"), t1: float = float("inf")) -> dict[str, float]:
        """Mean and peak CPU (% of one core) and RSS (MiB) of the samples taken in [t0, t1]."""
        window = [s for s in self.samples if t0 <= s.t <= t1] or self.samples
        if not window:
            return {
                "cpu_mean": 0.0,
                "cpu_peak": 0.0,
                "rss_mean_mb": 0.0,
                "rss_peak_mb": 0.0,
                "system_cpu_mean": 0.0,
                "samples": 0,
            }
        return {
            "cpu_mean": sum(s.cpu for s in window) / len(window),
            "cpu_peak": max(s.cpu for s in window),
            "rss_mean_mb": sum(s.rss_mb for s in window) / len(window),
            "rss_peak_mb": max(s.rss_mb for s in window),
            "system_cpu_mean": sum(s.system_cpu for s in window) / len(window),
            "samples": len(window),
        }

    def series(self, t_origin: float) -> list[dict[str, float]]:
        """The samples as JSON-ready dicts, with times relative to `t_origin`."""
        out = []
        for s in self.samples:
            d = asdict(s)
            d["t"] = round(s.t - t_origin, 3)
            d["cpu"] = round(s.cpu, 2)
            d["rss_mb"] = round(s.rss_mb, 2)
            d["system_cpu"] = round(s.system_cpu, 2)
            out.append(d)
        return out
