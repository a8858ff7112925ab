"""What may leave pforte in an error report: an allow-list over Sentry's event dict (DSK I.8).

An error report goes to a third party. Everything a request, a job or the SDK itself can put into
an event (request headers, cookies, query strings, bodies, local variables, breadcrumbs, log
messages, the exception's message, user and server fields, tags, contexts) may carry a message
body, a patient's name or number, or a token. So the scrubber does not look for bad values in a
good event: it builds a new event from the few fields that are known to be harmless:

* the event's id, time, level, platform and release (the pforte version);
* per exception: its type, its module and how it was caught (``mechanism.type``/``handled``);
* per stack frame: module, function, file name relative to the package, line number, ``in_app``.

The exception's message is dropped (``ValueError(f"bad number {phone}")`` is easy to write), and
so are all breadcrumbs. As a second line, every string that is kept is passed through
:func:`clean_text`, which blanks anything shaped like a phone number, e-mail address or token.
Events that are not errors (transactions, sessions, check-ins) are dropped whole.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

REDACTED = "[redacted]"
# Top-level fields kept only in their expected shape (free text there is not expected, so not kept).
_TOP_LEVEL = {
    "event_id": re.compile(r"[0-9a-f]{32}"),
    "timestamp": re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?"),
    "level": re.compile(r"fatal|error|warning|info|debug"),
    "platform": re.compile(r"python"),
    "release": re.compile(r"pforte@[0-9A-Za-z.+-]{1,40}"),
}
_FRAME_FIELDS = ("module", "function", "filename", "lineno", "in_app")
_MAX_FRAMES = 100
_MAX_EXCEPTIONS = 10
_MAX_TEXT = 300

# A phone number: optional "+" or "00", then at least seven digits that may be separated by spaces,
# dots, dashes, slashes or brackets (E.164 "+4915123456789", national "0151 234 567 89", "(030) 1234-567").
_PHONE = re.compile(r"(?:\+|\b00)?\(?\d(?:[\s./()-]{0,2}\d){6,}")
_EMAIL = re.compile(r"[^\s@]+@[^\s@]+\.[^\s@]+")
_AUTH = re.compile(r"(?i)\b(bearer|basic|token)\s+[^\s,;]+")
_SECRET_PARAM = re.compile(
    r"(?i)\b(access_token|token|secret|password|passwd|signature|session|api_key|apikey|key|code)"
    r"\s*[=:]\s*[^\s&,;]+"
)
_SIGNATURE = re.compile(r"(?i)\bsha(?:1|256)=[0-9a-f]+")
# Long random-looking runs (session ids, API keys): 20+ url-safe characters with a digit among them.
_TOKEN = re.compile(r"\b(?=[A-Za-z0-9_\-]*\d)(?=[A-Za-z0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{20,}\b")


def clean_text(value: str) -> str:
    """Blank phone numbers, e-mail addresses and tokens in a string that is otherwise kept."""
    value = value[:_MAX_TEXT]
    for pattern in (_SIGNATURE, _AUTH, _SECRET_PARAM, _EMAIL, _TOKEN, _PHONE):
        value = pattern.sub(REDACTED, value)
    return value


def _text(value: Any) -> str | None:
    return clean_text(value) if isinstance(value, str) else None


def _frame(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    frame: dict[str, Any] = {}
    for name in _FRAME_FIELDS:
        value = raw.get(name)
        if name == "lineno":
            if isinstance(value, int) and not isinstance(value, bool):
                frame[name] = value
        elif name == "in_app":
            if isinstance(value, bool):
                frame[name] = value
        elif (text := _text(value)) is not None:
            frame[name] = text
    return frame or None


def _exception(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    exc: dict[str, Any] = {}
    for name in ("type", "module"):
        if (text := _text(raw.get(name))) is not None:
            exc[name] = text
    mechanism = raw.get("mechanism")
    if isinstance(mechanism, dict):
        kept: dict[str, Any] = {}
        if (kind := _text(mechanism.get("type"))) is not None:
            kept["type"] = kind
        if isinstance(mechanism.get("handled"), bool):
            kept["handled"] = mechanism["handled"]
        for name in ("exception_id", "parent_id"):  # how chained exceptions hang together: small ints
            if isinstance(mechanism.get(name), int) and not isinstance(mechanism.get(name), bool):
                kept[name] = mechanism[name]
        if kept:
            exc["mechanism"] = kept
    stack = raw.get("stacktrace")
    if isinstance(stack, dict) and isinstance(stack.get("frames"), list):
        frames = [f for f in (_frame(f) for f in stack["frames"][-_MAX_FRAMES:]) if f]
        if frames:
            exc["stacktrace"] = {"frames": frames}
    return exc or None


def scrub_event(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The Sentry ``before_send`` hook: a new event with only the allowed fields, or None to drop it."""
    if not isinstance(event, dict) or event.get("type") not in (None, "error"):
        return None
    out: dict[str, Any] = {}
    for name, shape in _TOP_LEVEL.items():
        value = event.get(name)
        if isinstance(value, str) and shape.fullmatch(value):
            out[name] = value
        elif (
            name == "timestamp" and isinstance(value, datetime | int | float) and not isinstance(value, bool)
        ):
            out[name] = value
    container = event.get("exception")
    values = container.get("values") if isinstance(container, dict) else None
    if isinstance(values, list):
        kept = [e for e in (_exception(v) for v in values[-_MAX_EXCEPTIONS:]) if e]
        if kept:
            out["exception"] = {"values": kept}
    if "exception" not in out:
        return None  # a bare message or log line: its text is all it has, and text is not sent
    return out


def scrub_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any] | None = None) -> None:
    """The Sentry ``before_breadcrumb`` hook: no breadcrumb is kept (they describe what people did)."""
    return None
