"""The transactional outbox: a job row committed together with the change that needs it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id

JOB_STATES = ("queued", "running", "done", "failed", "review")


class Job(Base):
    """A unit of background work. The payload holds ids only, never content."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str | None] = mapped_column(
        ForeignKey("organisations.id", ondelete="CASCADE"), nullable=True
    )
    kind: Mapped[str] = mapped_column(String(32))  # send_message | download_media | mark_read
    channel_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime)
    locked_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # network call began
    last_error: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_jobs_state_run_after", "state", "run_after"),)


class PeriodicRun(Base):
    """When a periodic task last ran; claimed atomically so it runs once per interval across processes."""

    __tablename__ = "periodic_runs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_run_at: Mapped[datetime] = mapped_column(UTCDateTime)
    runs: Mapped[int] = mapped_column(Integer, default=0)


class SendSlot(Base):
    """The next free send slot of a channel (seconds since the epoch, database clock), shared by processes."""

    __tablename__ = "send_slots"

    channel_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_slot: Mapped[float] = mapped_column(Float, default=0.0)


class SendPlace(Base):
    """One of a channel's ``rate`` places in the provider's one-second window, shared by processes.

    A send holds a place from just before it starts until its answer is back; the place is free
    again one window later (``free_at``, seconds since the epoch on the database clock). A holder
    that never gives it back (a killed process) loses it at ``held_until``.
    """

    __tablename__ = "send_places"

    channel_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True)
    free_at: Mapped[float] = mapped_column(Float, default=0.0)
    holder: Mapped[str | None] = mapped_column(String(32), nullable=True)
    held_until: Mapped[float | None] = mapped_column(Float, nullable=True)
