"""Logging: one structured line per request, as JSON for machines or plain text for a terminal.

Log lines carry ids, states, counts and durations only: never a credential, a body or prompt text.
Fields ride on the record as ``extra={"fields": {...}}``; both formatters render them.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final

import orjson

ACCESS: Final = logging.getLogger("specproxy.access")
KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


def method_label(method: str) -> str:
    """The method for a log line: any other token is ``OTHER`` (a client may put anything there)."""
    return method if method in KNOWN_METHODS else "OTHER"


class JSONFormatter(logging.Formatter):
    """``{"time", "level", "logger", "msg", ...fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = record.exc_info[0].__name__  # the type only: messages may quote data
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: msg key=value …`` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return line


def configure(level: str, fmt: str) -> None:
    """Install one handler on the ``specproxy`` logger tree (idempotent)."""
    root = logging.getLogger("specproxy")
    for h in list(root.handlers):
        if getattr(h, "_specproxy", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler._specproxy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def access(fields: dict[str, Any]) -> None:
    """Log one request's line (level info)."""
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info("request", extra={"fields": fields})
