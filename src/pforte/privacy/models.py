"""The privacy notice (Art. 13) an organisation publishes, and the patient's consent ledger (Art. 9(2)(a))."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id

CONSENT_STATES = ("none", "requested", "given", "refused", "withdrawn")
CONSENT_VIA = ("button", "text", "system", "staff")


class PrivacyNotice(Base):
    """One published version of the notice, German and English; never edited, a change is a new version."""

    __tablename__ = "privacy_notices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    body_de: Mapped[str] = mapped_column(Text)  # public text, deliberately not encrypted
    body_en: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)  # staff user id
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("org_id", "version"),)


class ConsentEvent(Base):
    """One consent ledger entry: what happened, for which notice version, when and how."""

    __tablename__ = "consent_events"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))
    contact_id: Mapped[str] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    channel_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    conversation_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    state: Mapped[str] = mapped_column(String(16))  # requested | given | refused | withdrawn | notice_sent
    notice_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    via: Mapped[str] = mapped_column(String(16))
    message_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # our message row
    external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the provider's id (wamid)
    at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_consent_events_contact_at", "contact_id", "at"),)
