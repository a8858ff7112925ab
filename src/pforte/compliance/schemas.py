"""The compliance report's shape: rows, the record of processing, the report, and what changed.

Everything here is plain data with a JSON form (``as_dict``/``from_dict``), because a report is
stored, downloaded and compared with an older one that an earlier pforte may have written. A report
holds no personal data: ids, counts, dates, settings, host names and pforte's own sentences.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pforte.compliance.catalog import Text

Status = Literal["met", "partly", "not_met", "organisational"]
STATUSES: tuple[Status, ...] = ("met", "partly", "not_met", "organisational")
FORMAT = 1


@dataclass(frozen=True, slots=True)
class Item:
    """One evidence sentence. A volatile one (a count, a time) is shown but not compared."""

    text: Text
    volatile: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        out: dict[str, Any] = self.text.as_dict()
        if self.volatile:
            out["volatile"] = True
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Item:
        """Read the JSON form back."""
        return cls(Text.from_dict(data), bool(isinstance(data, dict) and data.get("volatile")))


@dataclass(frozen=True, slots=True)
class Row:
    """One catalog row as assessed on this instance."""

    id: str
    section: str
    level: str
    kind: str
    status: Status
    requirement: Text
    evidence: tuple[Item, ...] = ()
    gaps: tuple[Text, ...] = ()  # what pforte plans for this row but has not built
    controller: tuple[Text, ...] = ()  # what the controller must do
    tests: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "id": self.id,
            "section": self.section,
            "level": self.level,
            "kind": self.kind,
            "status": self.status,
            "requirement": self.requirement.as_dict(),
            "evidence": [i.as_dict() for i in self.evidence],
            "gaps": [t.as_dict() for t in self.gaps],
            "controller": [t.as_dict() for t in self.controller],
            "tests": list(self.tests),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """Read the JSON form back."""
        status = data.get("status")
        return cls(
            id=str(data["id"]),
            section=str(data.get("section", "")),
            level=str(data.get("level", "")),
            kind=str(data.get("kind", "")),
            status=status if status in STATUSES else "not_met",
            requirement=Text.from_dict(data.get("requirement", "")),
            evidence=tuple(Item.from_dict(i) for i in data.get("evidence", ())),
            gaps=tuple(Text.from_dict(t) for t in data.get("gaps", ())),
            controller=tuple(Text.from_dict(t) for t in data.get("controller", ())),
            tests=tuple(str(t) for t in data.get("tests", ())),
        )

    def compared(self) -> tuple[str, ...]:
        """The evidence that counts for "what changed" (English, volatile sentences left out)."""
        return tuple(i.text.en for i in self.evidence if not i.volatile)


@dataclass(frozen=True, slots=True)
class RecordSection:
    """One part of the record of processing activities (Art. 30 GDPR)."""

    key: str
    title: Text
    items: tuple[Text, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"key": self.key, "title": self.title.as_dict(), "items": [t.as_dict() for t in self.items]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecordSection:
        """Read the JSON form back."""
        return cls(
            key=str(data.get("key", "")),
            title=Text.from_dict(data.get("title", "")),
            items=tuple(Text.from_dict(t) for t in data.get("items", ())),
        )


@dataclass(frozen=True, slots=True)
class Report:
    """The whole report for one organisation at one moment."""

    generated_at: datetime
    org_id: str
    org_slug: str
    version: str
    schema: str | None
    rows: tuple[Row, ...]
    record: tuple[RecordSection, ...] = ()
    format: int = FORMAT

    @property
    def counts(self) -> dict[str, int]:
        """How many rows have each status."""
        found = Counter(r.status for r in self.rows)
        return {s: found.get(s, 0) for s in STATUSES}

    def row(self, row_id: str) -> Row:
        """One row by catalog id (KeyError if absent)."""
        for r in self.rows:
            if r.id == row_id:
                return r
        raise KeyError(row_id)

    def as_dict(self) -> dict[str, Any]:
        """JSON form (what is stored and downloaded)."""
        return {
            "format": self.format,
            "generated_at": self.generated_at.isoformat(timespec="seconds"),
            "org": {"id": self.org_id, "slug": self.org_slug},
            "pforte": {"version": self.version, "schema": self.schema},
            "summary": self.counts,
            "rows": [r.as_dict() for r in self.rows],
            "record_of_processing": [s.as_dict() for s in self.record],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Read the JSON form back."""
        org = data.get("org") or {}
        meta = data.get("pforte") or {}
        return cls(
            generated_at=datetime.fromisoformat(str(data["generated_at"])),
            org_id=str(org.get("id", "")),
            org_slug=str(org.get("slug", "")),
            version=str(meta.get("version", "")),
            schema=meta.get("schema"),
            rows=tuple(Row.from_dict(r) for r in data.get("rows", ())),
            record=tuple(RecordSection.from_dict(s) for s in data.get("record_of_processing", ())),
            format=int(data.get("format", FORMAT)),
        )


@dataclass(frozen=True, slots=True)
class Change:
    """How one row differs from the previous report."""

    id: str
    change: Literal["added", "removed", "changed"]
    status_before: str | None = None
    status_after: str | None = None
    evidence_added: tuple[str, ...] = ()
    evidence_removed: tuple[str, ...] = ()
    tests_added: tuple[str, ...] = ()
    tests_removed: tuple[str, ...] = ()

    @property
    def status_changed(self) -> bool:
        """Whether the status differs (always so for added and removed rows)."""
        return self.status_before != self.status_after

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "id": self.id,
            "change": self.change,
            "status_before": self.status_before,
            "status_after": self.status_after,
            "evidence_added": list(self.evidence_added),
            "evidence_removed": list(self.evidence_removed),
            "tests_added": list(self.tests_added),
            "tests_removed": list(self.tests_removed),
        }


@dataclass(frozen=True, slots=True)
class Diff:
    """What changed between two reports (``previous_at`` None: there was no previous report)."""

    previous_at: datetime | None
    changes: tuple[Change, ...] = field(default_factory=tuple)

    @property
    def ids(self) -> list[str]:
        """The ids of the rows that changed, in catalog order."""
        return [c.id for c in self.changes]

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "previous_at": self.previous_at.isoformat(timespec="seconds") if self.previous_at else None,
            "changes": [c.as_dict() for c in self.changes],
        }


@dataclass(frozen=True, slots=True)
class Saved:
    """A stored report with its row's facts."""

    id: str
    created_at: datetime
    trigger: str
    report: Report
