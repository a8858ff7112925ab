"""Wrapped data keys. A DEK exists here only wrapped by its organisation's KEK."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, LargeBinary, String
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


class SigningKey(Base):
    """An Ed25519 key that signs audit checkpoints and exports (DSK I.4, I.5).

    Bound to an organisation and to the admin who created or imported it; valid for a period; may be
    revoked with a reason. The private key exists here only wrapped under the organisation's KEK and
    is destroyed on revocation; the public key stays so that earlier signatures remain checkable.
    """

    __tablename__ = "signing_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    algorithm: Mapped[str] = mapped_column(String(16), default="ed25519")
    public_key: Mapped[str] = mapped_column(String(64))  # raw 32 bytes, hex
    fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256 of the raw public key, hex
    kek_id: Mapped[str] = mapped_column(String(64))
    private_wrapped: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # None once revoked
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the owning admin (staff id)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    imported: Mapped[bool] = mapped_column(Boolean, default=False)
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime)
    valid_until: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    revoked_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
