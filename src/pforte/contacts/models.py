"""Patients. Identifiers and names are ciphertext; lookups go through blind indexes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id


class Contact(Base):
    """A patient known to one organisation, keyed on the BSUID first, phone optional."""

    __tablename__ = "contacts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))
    dek_id: Mapped[str] = mapped_column(ForeignKey("data_keys.id"))
    bsuid_index: Mapped[str | None] = mapped_column(String(64), nullable=True)
    phone_index: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bsuid_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    phone_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    name_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # staff-given name
    profile_name_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    username_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Set when the contact's key is destroyed; its rows wait for the physical clean-up, invisible.
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Privacy in the chat (privacy/): the current state; the history is the consent_events ledger.
    consent_state: Mapped[str] = mapped_column(String(16), default="none", server_default="none")
    consent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    consent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    notice_version_sent: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (
        UniqueConstraint("org_id", "bsuid_index"),
        Index("ix_contacts_org_phone", "org_id", "phone_index"),
        Index("ix_contacts_dek", "dek_id"),
    )
