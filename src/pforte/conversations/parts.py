"""Message x of y and content integrity (DSK II.2). Pure: no database, no clock, no I/O.

Three things live here, because each needs the same precise definition in more than one place:

**Splitting.** A channel accepts texts up to a limit (``TEXT_LIMITS``, per channel kind). A longer
staff text is cut at word boundaries into parts that each start with a marker ``"(x/y) "``; the
marker counts against the limit. Only a single word longer than the room left is cut inside the
word. The service stores one logical message (the whole text, never sent itself) and one row per
part (each sent like any text); :func:`logical_status` derives what staff see from the parts.

**Assembling.** Patients' apps split long texts too. Consecutive inbound texts of a conversation
that carry ``(x/y)`` markers (at the start or the end) form one sequence; parts may arrive out of
order or twice. :func:`assemble` groups them into one view and flags a gap once the newest part is
older than the organisation's ``incoming_parts_wait_minutes``.

**Canonical content.** Every message carries a SHA-256 over its canonical content, version 1:
UTF-8 JSON with sorted keys, no insignificant whitespace, non-ASCII kept as is, of the object ::

    {"v": 1, "direction": "in"|"out", "type": <message type>, "body": <text, caption or null>,
     "details": <type-specific details: template name, language and params, location, ...; {} if none>,
     "media": [{"sha256": <provider's base64 SHA-256 of the file>, "filename": <name or null>}, ...]}

Row ids, timestamps, delivery state and wamids are not content: they change on restore, on
retries and over time, so they are left out. A part's body includes its marker, so the marker is
covered by the part's hash; the logical message's hash covers the whole text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

# Longest text body per channel kind, in characters (WhatsApp Cloud API: text.body <= 4096).
TEXT_LIMITS: dict[str, int] = {"whatsapp": 4096}
DEFAULT_TEXT_LIMIT = 4096
# The longest text staff may send at all (split into parts); more is refused, not truncated.
MAX_TEXT_LENGTH = 20_000
CANONICAL_VERSION = 1
DELIVERED = frozenset({"delivered", "read", "played"})
WAITING = frozenset({"queued", "sending"})

_PREFIX = re.compile(r"^\s*\((\d{1,3})\s*/\s*(\d{1,3})\)\s*(.*?)\s*$", re.S)
_SUFFIX = re.compile(r"^\s*(.*?)\s*\((\d{1,3})\s*/\s*(\d{1,3})\)\s*$", re.S)


def text_limit(channel_kind: str) -> int:
    """The longest text one message of this channel kind may carry."""
    return TEXT_LIMITS.get(channel_kind, DEFAULT_TEXT_LIMIT)


def marker(index: int, count: int) -> str:
    """The marker a part starts with, e.g. ``"(2/3) "``."""
    return f"({index}/{count}) "


def _chunks(text: str, budget: int) -> list[str]:
    """Cut a text into pieces of at most ``budget`` characters, at whitespace where possible."""
    out: list[str] = []
    rest = text.strip()
    while rest:
        if len(rest) <= budget:
            out.append(rest)
            break
        window = rest[: budget + 1]  # whitespace right after the budget is a clean cut too
        cut = max(window.rfind(c) for c in (" ", "\n", "\t", "\r"))
        if cut <= 0:
            out.append(rest[:budget])  # one word longer than the room: the only hard split
            rest = rest[budget:].lstrip()
            continue
        out.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return out


def split_text(text: str, limit: int) -> list[str]:
    """The parts of a text, each at most ``limit`` characters with its marker; ``[text]`` if it fits."""
    if len(text) <= limit:
        return [text]
    count = 2
    while True:
        budget = limit - len(marker(count, count))
        if budget < 1:
            raise ValueError("the limit leaves no room for text")
        pieces = _chunks(text, budget)
        if len(pieces) <= count:
            break
        count = len(pieces)  # more parts than assumed: the marker may grow a digit, try again
    total = len(pieces)
    return [marker(i, total) + p for i, p in enumerate(pieces, start=1)]


# -- the status of a split message ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartState:
    """What the logical message needs to know about one of its parts."""

    index: int
    status: str
    error_reason: str | None = None


@dataclass(frozen=True, slots=True)
class LogicalStatus:
    """The status staff see for a split message, derived from its parts."""

    status: str  # complete | failed | review | sending | sent
    delivered: int
    total: int
    failed_index: int | None = None
    error_reason: str | None = None


def logical_status(parts: Sequence[PartState], total: int | None = None) -> LogicalStatus:
    """ "complete" only when every part is delivered (or read); a failed part fails the whole."""
    total = total if total is not None else len(parts)
    ordered = sorted(parts, key=lambda p: p.index)
    delivered = sum(1 for p in ordered if p.status in DELIVERED)
    failed = next((p for p in ordered if p.status == "failed"), None)
    if failed is not None:
        return LogicalStatus("failed", delivered, total, failed.index, failed.error_reason or "failed")
    if any(p.status == "review" for p in ordered):
        status = "review"
    elif delivered == total and len(ordered) == total:
        status = "complete"
    elif len(ordered) < total or any(p.status in WAITING for p in ordered):
        status = "sending"
    else:
        status = "sent"
    return LogicalStatus(status, delivered, total)


# -- canonical content and its hash --------------------------------------------------------------


def canonical_content(
    *,
    direction: str,
    type_: str,
    body: str | None,
    details: Mapping[str, Any] | None = None,
    media: Iterable[tuple[str | None, str | None]] = (),
) -> bytes:
    """The canonical bytes of a message's content (see the module docstring; ``media``: (sha256, name))."""
    doc = {
        "v": CANONICAL_VERSION,
        "direction": direction,
        "type": type_,
        "body": body,
        "details": dict(details or {}),
        "media": [
            {"sha256": sha, "filename": name}
            for sha, name in sorted(media, key=lambda m: (m[0] or "", m[1] or ""))
        ],
    }
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def content_hash(
    *,
    direction: str,
    type_: str,
    body: str | None,
    details: Mapping[str, Any] | None = None,
    media: Iterable[tuple[str | None, str | None]] = (),
) -> str:
    """SHA-256 (hex) over the canonical content."""
    data = canonical_content(direction=direction, type_=type_, body=body, details=details, media=media)
    return hashlib.sha256(data).hexdigest()


# -- assembling incoming "(x/y)" sequences ---------------------------------------------------------


def parse_marker(text: str | None) -> tuple[int, int, str] | None:
    """(x, y, text without the marker) if a text starts or ends with a valid "(x/y)" marker."""
    if not text:
        return None
    found = _PREFIX.match(text)
    if found:
        x, y, rest = int(found.group(1)), int(found.group(2)), found.group(3)
    else:
        found = _SUFFIX.match(text)
        if not found:
            return None
        rest, x, y = found.group(1), int(found.group(2)), int(found.group(3))
    if not 2 <= y <= 100 or not 1 <= x <= y:
        return None
    return x, y, rest


@dataclass(frozen=True, slots=True)
class ThreadItem:
    """One message of a thread as assembly sees it (in thread order)."""

    id: str
    direction: str
    type: str
    text: str | None
    at: datetime  # when we received it


@dataclass(frozen=True, slots=True)
class AssembledPart:
    """One part of an incoming sequence."""

    index: int
    message_id: str
    text: str


@dataclass(frozen=True, slots=True)
class Assembly:
    """Consecutive incoming "(x/y)" messages shown as one."""

    ids: tuple[str, ...]  # every member in thread order, duplicates included
    count: int
    parts: tuple[AssembledPart, ...]  # by index, first arrival of each
    missing: tuple[int, ...]
    duplicates: tuple[str, ...]  # ids of parts that arrived again
    gap: bool  # parts are missing and the newest is older than the wait

    @property
    def complete(self) -> bool:
        """Every part 1..y arrived."""
        return not self.missing

    @property
    def text(self) -> str:
        """The parts' texts in order (a part that is missing is left out)."""
        return "\n".join(p.text for p in self.parts)


def _close(
    members: list[tuple[ThreadItem, int, str]], count: int, now: datetime, wait: timedelta
) -> Assembly:
    first: dict[int, AssembledPart] = {}
    dupes: list[str] = []
    for item, x, rest in members:
        if x in first:
            dupes.append(item.id)
        else:
            first[x] = AssembledPart(x, item.id, rest)
    missing = tuple(i for i in range(1, count + 1) if i not in first)
    newest = max(item.at for item, _, _ in members)
    return Assembly(
        ids=tuple(item.id for item, _, _ in members),
        count=count,
        parts=tuple(first[i] for i in sorted(first)),
        missing=missing,
        duplicates=tuple(dupes),
        gap=bool(missing) and now - newest >= wait,
    )


def assemble(items: Sequence[ThreadItem], *, now: datetime, wait: timedelta) -> list[Assembly]:
    """Group consecutive inbound "(x/y)" texts (any order, repeats tolerated) into sequences.

    A sequence ends at any other message, at a marker with another y, and once it is complete (a
    new "(1/y)" then starts the next one). A part index seen again while incomplete is a duplicate.
    """
    out: list[Assembly] = []
    members: list[tuple[ThreadItem, int, str]] = []
    count = 0
    seen: set[int] = set()
    for item in items:
        parsed = parse_marker(item.text) if item.direction == "in" and item.type == "text" else None
        if members and (parsed is None or parsed[1] != count or len(seen) == count):
            out.append(_close(members, count, now, wait))
            members, seen = [], set()
        if parsed is None:
            continue
        x, y, rest = parsed
        count = y
        seen.add(x)
        members.append((item, x, rest))
    if members:
        out.append(_close(members, count, now, wait))
    return out
