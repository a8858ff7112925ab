"""The erasure ledger: ids of what was erased, kept outside the database and outside backups.

A backup taken before an erasure still holds the erased rows and the wrapped key. Restoring it must
not bring them back, so every erasure is also appended here (ids only, never content) before its
transaction commits, and a restore re-applies the whole ledger. The file is append-only JSON lines,
fsynced per append and locked with ``flock`` so several processes on one box can share it. A torn
last line (a crash mid-write) is skipped on reading.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

KINDS = ("data_key", "message", "attachment", "conversation", "contact", "organisation")


@dataclass(frozen=True)
class Erasure:
    """One erased object: its kind, id, organisation and when (ISO 8601 UTC)."""

    kind: str
    id: str
    org_id: str
    at: str


class Ledger(Protocol):
    """Where erasures are remembered across restores."""

    def append(self, entries: Iterable[Erasure]) -> None:
        """Persist entries durably before returning."""

    def read(self) -> list[Erasure]:
        """Every entry, oldest first."""


class FileLedger:
    """JSON lines in a 0600 file beside the key ring."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entries: Iterable[Erasure]) -> None:
        """Append and fsync; a no-op for no entries."""
        lines = "".join(json.dumps(asdict(e), separators=(",", ":")) + "\n" for e in entries)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, lines.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[Erasure]:
        """Parse every complete line; skip a torn or foreign one."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                doc = json.loads(line)
                out.append(Erasure(kind=doc["kind"], id=doc["id"], org_id=doc["org_id"], at=doc["at"]))
            except (ValueError, KeyError, TypeError):
                continue
        return out


class MemoryLedger:
    """The fake: a list in memory."""

    def __init__(self) -> None:
        self.entries: list[Erasure] = []

    def append(self, entries: Iterable[Erasure]) -> None:
        """Remember the entries."""
        self.entries.extend(entries)

    def read(self) -> list[Erasure]:
        """Everything appended so far."""
        return list(self.entries)
