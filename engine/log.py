"""Structured logs: one JSON object per line, one line per event,
with the session id when there is one.

    log = get_logger("twilio")
    log.info("stream.start", session=sid, call_sid=call_sid)
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "t": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class EventLogger:
    """A thin face over `logging` that takes an event name and keyword fields."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc_info=True)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - mirrors logging
        return self._logger.isEnabledFor(level)


def get_logger(component: str) -> EventLogger:
    return EventLogger(logging.getLogger(f"engine.{component}"))


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request; keep it, but as JSON through the same handler.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def ms(t: float) -> float:
    """A monotonic time in milliseconds, rounded for logs."""
    return round(t * 1000.0, 1)


def now_ms() -> float:
    return ms(time.monotonic())
