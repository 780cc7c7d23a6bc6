"""The one retry helper every outbound HTTP call goes through (VAPI calls and chats, Twilio REST).

Policy, in one place so every client behaves the same:

- Retried: statuses in `retry_on` (429 and 5xx gateway/server errors by default), connection
  errors (refused, reset, DNS) and timeouts. Everything else, including every other 4xx, is
  returned to the caller at once: a wrong key or a malformed body does not get better by asking
  again.
- Backoff: exponential, `base_delay * 2**n` (1 s, 2 s, 4 s, ... capped at `max_delay`), with
  *equal jitter*: the delay is drawn from [d/2, d]. Half of the delay is kept so a rate-limited
  server is never hammered by a zero draw (full jitter can draw 0), and the other half spreads
  many calls retrying at once.
- `Retry-After` on 429 and 503, in seconds or as an HTTP date, replaces the computed delay
  (without jitter: the server named the time), capped by `max_delay` and by what is left of the
  budget.
- Bounded: at most `attempts` requests and `total_timeout` seconds overall, sleeps included; each
  attempt's own timeout is what is left of the budget (or `attempt_timeout`, if smaller). A retry
  whose sleep would end past the budget is not attempted.
- Giving up raises `RetryError` with the last status (or the connection error) and a short
  excerpt of the last answer.

Time is injected (`sleep`, `clock`, `rng`) so tests check the delays without waiting.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from engine.log import get_logger

log = get_logger("retry")

DEFAULT_RETRY_ON: tuple[int, ...] = (429, 500, 502, 503, 504)
#: statuses whose Retry-After header is honoured
RETRY_AFTER_STATUSES = frozenset({429, 503})
#: a retry that would leave less than this much budget for its own request is not worth making
MIN_ATTEMPT_BUDGET_S = 0.05

OnRetry = Callable[[int, float, str], None]
"""Called before each retry sleep with (the attempt that failed, 1-based; the delay; why)."""


@dataclass(frozen=True, slots=True)
class HttpResult:
    """A complete answer: its status, headers and the whole body."""

    status: int  #: the HTTP status
    headers: Mapping[str, str]  #: the response headers (case-insensitive mapping)
    body: bytes  #: the body, read in full
    attempts: int  #: how many requests it took

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body parsed as JSON; raises `ValueError` if it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"answer is not JSON: {excerpt(self.body)!r}") from exc


class RetryError(Exception):
    """The request did not succeed within the attempts and time allowed."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        attempts: int,
        elapsed: float,
        body: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.status = status  #: the last HTTP status, or None if the last failure was no answer
        self.attempts = attempts  #: requests made
        self.elapsed = elapsed  #: seconds spent, sleeps included
        self.body = body  #: the last answer's body, if there was one


def backoff_delay(
    retry_index: int, base_delay: float, max_delay: float, rng: Callable[[], float]
) -> float:
    """Equal jitter: uniform in [d/2, d] where d = min(max_delay, base_delay * 2**retry_index)."""
    nominal = min(max_delay, base_delay * (2.0**retry_index))
    half = nominal / 2.0
    return half + half * rng()


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        return max(0.0, when.timestamp() - now_wall)
    if seconds != seconds or seconds < 0:  # NaN or negative: not a usable instruction
        return None
    return seconds


def excerpt(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return text + ("…" if len(body) > limit else "")


async def request_with_retry(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    attempts: int = 4,
    base_delay: float = 1.0,
    max_delay: float = 8.0,
    total_timeout: float = 20.0,
    attempt_timeout: float | None = None,
    retry_on: Collection[int] = DEFAULT_RETRY_ON,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rng: Callable[[], float] = random.random,
    on_retry: OnRetry | None = None,
    **kwargs: Any,
) -> HttpResult:
    """Make the request, retrying as the module docstring says. `kwargs` go to
    `session.request` (json=, data=, headers=, params=...).

    Returns the first answer that is not retried (any 2xx/3xx, and 4xx other than 429). Raises
    `RetryError` when the attempts or the time run out.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    start = clock()
    deadline = start + total_timeout
    status: int | None = None
    body = b""
    reason = ""
    attempt = 0
    while True:
        attempt += 1
        # never 0: aiohttp reads a zero timeout as "no timeout"
        remaining = max(deadline - clock(), 0.001)
        timeout = remaining if attempt_timeout is None else min(remaining, attempt_timeout)
        retry_after: float | None = None
        try:
            async with session.request(
                method, url, timeout=aiohttp.ClientTimeout(total=timeout), **kwargs
            ) as resp:
                body = await resp.read()
                status = resp.status
                if status not in retry_on:
                    return HttpResult(status, resp.headers, body, attempt)
                if status in RETRY_AFTER_STATUSES:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), wall_clock())
                reason = f"HTTP {status}"
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # ServerTimeoutError and connection resets land here too
            status, body = None, b""
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except TimeoutError:
            status, body = None, b""
            reason = f"timed out after {timeout:.2f} s"

        elapsed = clock() - start
        if attempt >= attempts:
            raise _give_up(method, url, reason, status, attempt, elapsed, body, "attempts used")
        if retry_after is not None:
            delay = min(retry_after, max_delay)
        else:
            delay = backoff_delay(attempt - 1, base_delay, max_delay, rng)
        remaining = deadline - clock()
        if delay + MIN_ATTEMPT_BUDGET_S > remaining:
            # Sleeping to (or past) the deadline only to fail there: give up now instead.
            raise _give_up(method, url, reason, status, attempt, elapsed, body, "time budget used")
        log.info("http.retry", method=method, url=url, attempt=attempt, reason=reason,
                 delay_s=round(delay, 3))
        if on_retry is not None:
            on_retry(attempt, delay, reason)
        await sleep(delay)


def _give_up(
    method: str, url: str, reason: str, status: int | None, attempts: int, elapsed: float,
    body: bytes, why: str,
) -> RetryError:
    detail = f": {excerpt(body)}" if body else ""
    message = (f"{method} {url} failed after {attempts} attempt(s) in {elapsed:.1f} s "
               f"({why}); last: {reason}{detail}")
    log.warning("http.give_up", method=method, url=url, attempts=attempts, reason=reason,
                status=status)
    return RetryError(message, status=status, attempts=attempts, elapsed=elapsed, body=body)
