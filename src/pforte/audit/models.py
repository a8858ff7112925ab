"""The audit log: append-only, hash-chained per organisation.

No foreign key to the organisation: the record of what happened outlives what it happened to
(an organisation's deletion is itself an audit entry).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id


class AuditEvent(Base):
    """One action: who, what, on which object, when. Ids only, never content."""

    __tablename__ = "audit_events"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    chain: Mapped[str] = mapped_column(String(32))  # the organisation's id, or "instance"
    seq: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    org_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    actor_kind: Mapped[str] = mapped_column(String(16))  # staff | system | cli
    actor_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    object_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    object_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        UniqueConstraint("chain", "seq"),
        Index("ix_audit_events_org_at", "org_id", "at"),
        Index("ix_audit_events_object", "object_kind", "object_id"),
    )


class AuditHead(Base):
    """The newest entry of each chain; its row is the lock that keeps the chain linear."""

    __tablename__ = "audit_heads"

    chain: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """A chain head signed with the organisation's signing key at some moment.

    Whoever can write to the database can rewrite the whole chain and recompute every hash; they
    cannot forge these signatures without the private key, which lives wrapped under the KEK.
    """

    __tablename__ = "audit_checkpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    chain: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    key_id: Mapped[str] = mapped_column(String(32))
    signature: Mapped[str] = mapped_column(String(128))  # Ed25519, hex

    __table_args__ = (UniqueConstraint("chain", "seq"),)
