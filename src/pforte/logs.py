"""Structured logs. Only ids, codes and counts are logged: never message content, names, phone
numbers or tokens. ``extra`` fields are passed through an allow-list to make that hard to break."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

ALLOWED_EXTRA = frozenset(
    {
        "channel_id",
        "conversation_id",
        "message_id",
        "job_id",
        "kind",
        "error",
        "provider_code",
        "status",
        "count",
        "duration_ms",
        "org_id",
        "path",
        "method",
        "attempt",
    }
)
_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line with allow-listed extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record."""
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and key in ALLOWED_EXTRA:
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__  # the type only: exception text may carry data
        return json.dumps(out, default=str)


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a test runner may swap and close it)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Emit to the current standard error."""
        self.stream = sys.stderr
        super().emit(record)


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Set up root logging once; uvicorn's access log is silenced (it would log paths with ids)."""
    handler = _CurrentStderr(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
