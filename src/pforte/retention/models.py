"""Retention rules that override the organisation's default, and holds that stop deletion."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id

SCOPES = ("channel", "tag")
TARGETS = ("message", "conversation", "contact")
# Hold kinds known so far; later features add theirs (a hold is released, never edited).
HOLD_KINDS = ("legal", "treatment_undocumented")


class RetentionRule(Base):
    """Keep conversations on a channel, or with a tag, for ``days`` after their last activity.

    ``days`` None means "never delete automatically" for that scope.
    """

    __tablename__ = "retention_rules"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))
    scope: Mapped[str] = mapped_column(String(16))
    scope_ref: Mapped[str] = mapped_column(String(64))  # channel id or tag
    days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("org_id", "scope", "scope_ref"),)


class Hold(Base):
    """Stops every deletion of its target (and what the target contains) while active."""

    __tablename__ = "holds"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))
    target_kind: Mapped[str] = mapped_column(String(16))
    target_id: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))
    placed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    placed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    released_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_holds_target", "org_id", "target_kind", "target_id"),)
