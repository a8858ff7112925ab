"""Tombstones: what was deleted, when, by whom and why. Never what it said."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id

KINDS = ("message", "attachment", "conversation", "contact", "organisation")
REASONS = ("staff", "erasure_request", "retention", "organisation_closed")


class Tombstone(Base):
    """One deletion. Outlives the organisation it belongs to, like the audit log."""

    __tablename__ = "tombstones"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))
    object_id: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(32))
    actor_kind: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    deleted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # counts, rule, parent ids

    __table_args__ = (Index("ix_tombstones_org_at", "org_id", "deleted_at"),)
