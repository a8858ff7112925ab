"""Error reporting to a third party (I.8): off unless an admin enters a DSN; one row for the instance."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime


class ErrorReporting(Base):
    """The instance's error-reporting setting (a single row, id 1); absent or disabled means off."""

    __tablename__ = "error_reporting"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, default=1)
    enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    dsn: Mapped[str | None] = mapped_column(String(500), nullable=True)
    changed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)  # staff user id
    changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
