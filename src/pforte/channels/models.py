"""Channels: a WhatsApp business number (and later Matrix/XMPP endpoints) of an organisation."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id


class Channel(Base):
    """One business number. Secrets are ciphertext under the organisation's key."""

    __tablename__ = "channels"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="whatsapp")
    name: Mapped[str] = mapped_column(String(200))
    phone_number_id: Mapped[str] = mapped_column(String(64))
    display_phone_number: Mapped[str] = mapped_column(String(32))
    waba_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    graph_base_url: Mapped[str] = mapped_column(String(300))
    graph_version: Mapped[str] = mapped_column(String(16))
    access_token_enc: Mapped[bytes] = mapped_column(LargeBinary)
    app_secret_enc: Mapped[bytes] = mapped_column(LargeBinary)
    verify_token_enc: Mapped[bytes] = mapped_column(LargeBinary)
    rate_limit_per_s: Mapped[int] = mapped_column(Integer, default=80)
    storage_region: Mapped[str] = mapped_column(String(16), default="default")
    state: Mapped[str] = mapped_column(String(8), default="UP")  # UP | DOWN
    state_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    state_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("kind", "phone_number_id"),)
