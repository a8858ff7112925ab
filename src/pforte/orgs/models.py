"""Organisations (tenants): a hospital, practice or insurer with its own keys and settings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id


class Organisation(Base):
    """A tenant. Everything that belongs to one carries its ``org_id``."""

    __tablename__ = "organisations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kek_id: Mapped[str] = mapped_column(String(64))
    org_key_id: Mapped[str] = mapped_column(String(32))  # DataKey for org-level secrets
    index_key_id: Mapped[str] = mapped_column(String(32))  # DataKey for blind indexes
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
