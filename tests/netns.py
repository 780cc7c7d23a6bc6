"""An impaired network link between two fresh network namespaces, for tests and benchmarks.

    with ImpairedLink(loss=0.05, delay_ms=30.0, jitter_ms=10.0) as link:
        server = subprocess.Popen(link.run_in(link.engine_ns, [python, "-m", ...]))
        ...  # the engine listens on link.engine_ip; the client: link.run_in(link.client_ns, ...)

Each direction loses `loss` of its packets at random and delays the rest by delay ± jitter
(uniform, per packet, so late packets may overtake: netem's own model). Two ways to build it:

- `netem`: a veth pair, one end in each namespace, with `tc qdisc ... netem` on both ends.
- `userspace`, when the kernel has no netem (sch_netem not built, as on some VM kernels): a TUN
  device in each namespace, and a forwarder process (`python -m tests.netns forward`, below) that
  reads IP packets from one device and writes them to the other with the same loss and delay.

Both namespaces are private to the link and deleted on exit, whatever happened; the only addresses
used are the link's own (10.209.x.1 and .2) and loopback. Needs root and iproute2: `LinkUnavailable`
says why not otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import os
import random
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


class LinkUnavailable(RuntimeError):
    """The impaired link cannot be built here (not root, no iproute2, no namespaces)."""


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20)


def _check(*cmd: str) -> None:
    done = _run(*cmd)
    if done.returncode != 0:
        raise LinkUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")


def unavailable_reason() -> str | None:
    """Why an impaired link cannot be built on this machine, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


class ImpairedLink:
    """Two namespaces joined by a lossy, jittery link (see the module docstring)."""

    def __init__(
        self,
        loss: float = 0.05,
        delay_ms: float = 30.0,
        jitter_ms: float = 10.0,
        seed: int | None = None,
        prefer: str = "netem",
    ) -> None:
        self.loss = loss
        self.delay_ms = delay_ms
        self.jitter_ms = jitter_ms
        self.seed = seed if seed is not None else secrets.randbelow(2**31)
        self.prefer = prefer
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.engine_ns = f"h8e{tag}"
        self.client_ns = f"h8c{tag}"
        octet = secrets.randbelow(250) + 1
        self.engine_ip = f"10.209.{octet}.1"
        self.client_ip = f"10.209.{octet}.2"
        self.kind: str | None = None  # "netem" or "userspace" once built
        self._dev = f"h8l{tag}"[:15]
        self._forwarder: subprocess.Popen[bytes] | None = None

    # -- building ----------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        reason = unavailable_reason()
        if reason is not None:
            raise LinkUnavailable(reason)
        try:
            for ns in (self.engine_ns, self.client_ns):
                _check("ip", "netns", "add", ns)
                _check("ip", "-n", ns, "link", "set", "lo", "up")
            if self.prefer == "netem" and self._build_netem():
                self.kind = "netem"
            else:
                self._build_userspace()
                self.kind = "userspace"
        except BaseException:
            self.close()
            raise
        return self

    def _build_netem(self) -> bool:
        a, b = self._dev[:13] + "a", self._dev[:13] + "b"
        _check(
            "ip",
            "link",
            "add",
            a,
            "netns",
            self.engine_ns,
            "type",
            "veth",
            "peer",
            "name",
            b,
            "netns",
            self.client_ns,
        )
        for ns, dev, ip in (
            (self.engine_ns, a, self.engine_ip),
            (self.client_ns, b, self.client_ip),
        ):
            _check("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _check("ip", "-n", ns, "link", "set", dev, "up")
        for ns, dev in ((self.engine_ns, a), (self.client_ns, b)):
            done = _run(
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "netem",
                "loss",
                f"{self.loss * 100:g}%",
                "delay",
                f"{self.delay_ms:g}ms",
                f"{self.jitter_ms:g}ms",
            )
            if done.returncode != 0:
                # No netem in this kernel (or no tc): fall back to the userspace forwarder.
                _run("ip", "-n", self.engine_ns, "link", "del", a)
                return False
        return True

    def _build_userspace(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tests.netns",
            "forward",
            "--ns-a",
            self.engine_ns,
            "--ns-b",
            self.client_ns,
            "--dev",
            self._dev,
            "--ip-a",
            self.engine_ip,
            "--ip-b",
            self.client_ip,
            "--loss",
            str(self.loss),
            "--delay-ms",
            str(self.delay_ms),
            "--jitter-ms",
            str(self.jitter_ms),
            "--seed",
            str(self.seed),
        ]
        repo = Path(__file__).resolve().parent.parent
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
        )
        proc = subprocess.Popen(
            cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._forwarder = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(b"READY"):
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise LinkUnavailable(
                f"the userspace link forwarder failed: {(line.decode() + err).strip()[-400:]}"
            )

    def run_in(self, ns: str, cmd: list[str]) -> list[str]:
        """`cmd` run inside namespace `ns`."""
        return ["ip", "netns", "exec", ns, *cmd]

    def describe(self) -> str:
        return (
            f"{self.kind} link {self.engine_ip} <-> {self.client_ip}: loss {self.loss:.0%}, "
            f"delay {self.delay_ms:g} ms ± {self.jitter_ms:g} ms each way"
        )

    # -- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        proc = self._forwarder
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            self._forwarder = None
        for ns in (self.engine_ns, self.client_ns):
            _run("ip", "netns", "del", ns)  # takes its devices with it

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The userspace link: two TUN devices and a forwarder between them
# ---------------------------------------------------------------------------------------------


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)


def _open_tun(ns: str, dev: str) -> int:
    """A TUN device named `dev` inside namespace `ns` (it lives as long as the returned fd)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _setns(f"/run/netns/{ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", dev.encode(), IFF_TUN | IFF_NO_PI))
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(home, CLONE_NEWNET)
        os.close(home)
    os.set_blocking(fd, False)
    return fd


class _Direction:
    """One direction of the link: loss, then a uniform delay, per packet."""

    def __init__(
        self,
        src: int,
        dst: int,
        loss: float,
        delay_ms: float,
        jitter_ms: float,
        rng: random.Random,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.src, self.dst = src, dst
        self.loss, self.rng, self.loop = loss, rng, loop
        self.low = max(0.0, delay_ms - jitter_ms) / 1000.0
        self.high = (delay_ms + jitter_ms) / 1000.0
        self.passed = self.dropped = 0

    def on_readable(self) -> None:
        while True:
            try:
                packet = os.read(self.src, 65535)
            except BlockingIOError:
                return
            if self.rng.random() < self.loss:
                self.dropped += 1
                continue
            self.passed += 1
            self.loop.call_later(self.rng.uniform(self.low, self.high), self._deliver, packet)

    def _deliver(self, packet: bytes) -> None:
        try:
            os.write(self.dst, packet)
        except OSError:
            pass  # the device is gone or its queue is full: a loss like any other


def forward(args: argparse.Namespace) -> int:
    fd_a = _open_tun(args.ns_a, args.dev)
    fd_b = _open_tun(args.ns_b, args.dev)
    for ns, ip in ((args.ns_a, args.ip_a), (args.ns_b, args.ip_b)):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", args.dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", args.dev, "up"], check=True)
    loop = asyncio.new_event_loop()
    rng = random.Random(args.seed)
    a_to_b = _Direction(fd_a, fd_b, args.loss, args.delay_ms, args.jitter_ms, rng, loop)
    b_to_a = _Direction(fd_b, fd_a, args.loss, args.delay_ms, args.jitter_ms, rng, loop)
    loop.add_reader(fd_a, a_to_b.on_readable)
    loop.add_reader(fd_b, b_to_a.on_readable)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    started = time.monotonic()
    loop.run_until_complete(stop.wait())
    sys.stderr.write(
        f"link forwarder: {time.monotonic() - started:.1f} s, a->b passed {a_to_b.passed} dropped "
        f"{a_to_b.dropped}, b->a passed {b_to_a.passed} dropped {b_to_a.dropped}\n"
    )
    os.close(fd_a)
    os.close(fd_b)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns")
    sub = parser.add_subparsers(dest="command", required=True)
    fwd = sub.add_parser("forward", help="forward IP packets between TUN devices in two namespaces")
    fwd.add_argument("--ns-a", required=True)
    fwd.add_argument("--ns-b", required=True)
    fwd.add_argument("--dev", required=True)
    fwd.add_argument("--ip-a", required=True)
    fwd.add_argument("--ip-b", required=True)
    fwd.add_argument("--loss", type=float, default=0.05)
    fwd.add_argument("--delay-ms", type=float, default=30.0)
    fwd.add_argument("--jitter-ms", type=float, default=10.0)
    fwd.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    return forward(args)


if __name__ == "__main__":
    raise SystemExit(main())
