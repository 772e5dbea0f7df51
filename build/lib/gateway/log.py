"""Application logging: human-readable in development, one JSON object per line in production.

Every record made while the control plane handles a request carries that request's id (the
``X-Request-Id`` the edge gave it, also in the edge's access-log line), through a context variable that
the API's middleware sets. Secrets never reach a log call: keys, tokens, cookies and credentials are not
passed to loggers anywhere in the gateway.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import TextIO

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "type": "log",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self.converter = time.localtime

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [rid={request_id}]" if request_id else text


def _add_request_id(record: logging.LogRecord) -> bool:
    record.request_id = REQUEST_ID.get()
    return True


def configure_logging(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Route every log record to stderr (or ``stream``) in ``fmt``; replaces any handlers set before."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_add_request_id)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
