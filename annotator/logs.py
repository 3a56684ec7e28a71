"""Structured log events and the logging setup shared by the CLI and the web app.

Library code logs through module loggers. An *event* is one log record whose message is a
``key=value`` line, with the same fields attached as ``record.fields`` so a JSON handler
can emit them unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, str) and (" " in value or not value):
        return json.dumps(value)
    return str(value)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event: ``event=<name> key=value ...``."""
    message = " ".join([f"event={event}"] + [f"{k}={_format_value(v)}" for k, v in fields.items()])
    logger.log(level, message, extra={"fields": {"event": event, **fields}})


class JsonFormatter(logging.Formatter):
    """Format records as one JSON object per line, with an event's fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            payload.update(fields)
        else:
            payload["message"] = record.getMessage()
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO", *, json_format: bool = False) -> None:
    """Send annotator's logs to stderr, as text or JSON lines; quiet noisy dependencies."""
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("annotator")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
