"""Wrapped data keys. A DEK exists here only wrapped by its organisation's KEK."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id


class DataKey(Base):
    """A per-contact (or per-organisation) AES-256 key, wrapped with AES key wrap under a KEK."""

    __tablename__ = "data_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(16))  # contact | org | blind_index
    kek_id: Mapped[str] = mapped_column(String(64))
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # None once destroyed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    destroyed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    # (kek_id, id): rotation walks the keys of one KEK in id order, batch by batch.
    __table_args__ = (Index("ix_data_keys_kek_id", "kek_id", "id"),)
