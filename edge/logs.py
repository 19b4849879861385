"""Structured logs: one JSON object per line on stderr, quiet (warnings and up) by default."""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER_NAME = "meridian.edge"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, event, then the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record`; fields passed as `extra={"fields": {...}}` are merged in."""
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str = "warning") -> logging.Logger:
    """Send our logger's records to stderr as JSON lines at `level`; returns the logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries (grpclib, asyncio) stay at warning whatever our level is: their debug is noise here.
    root.setLevel(logging.WARNING)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    return logger


def get_logger() -> logging.Logger:
    """The edge worker's logger."""
    return logging.getLogger(LOGGER_NAME)


def elapsed_ms(started: float) -> float:
    """Milliseconds since `started` (a time.perf_counter() value), rounded for logs."""
    return round((time.perf_counter() - started) * 1000, 2)
