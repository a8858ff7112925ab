"""The instance's error-reporting setting: read, enable with a DSN, disable; each change audited.

Error reporting is instance-wide (one Sentry client per process), so its audit entries go to the
instance chain. The DSN's public key is stored but never audited or shown: entries and pages name
the host only. Services never commit; the caller applies the setting to the process after commit
(see :mod:`pforte.reporting.reporter`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.db import take_write_lock
from pforte.errors import ValidationError
from pforte.reporting.models import ErrorReporting

ROW_ID = 1
MAX_DSN = 500
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}")
_PROJECT = re.compile(r"[0-9]{1,20}")
_KEY = re.compile(r"[0-9A-Za-z]{8,64}")


@dataclass(frozen=True)
class State:
    """The setting as the process and the pages see it."""

    enabled: bool
    dsn: str | None
    changed_by: str | None = None
    changed_at: datetime | None = None

    @property
    def host(self) -> str | None:
        """The DSN's host (what pages and audit entries show), or None."""
        return dsn_host(self.dsn) if self.dsn else None


OFF = State(enabled=False, dsn=None)


def dsn_host(dsn: str) -> str:
    """The host (and port, if any) a DSN sends to."""
    return urlsplit(dsn).netloc.rsplit("@", 1)[-1]


def validate_dsn(raw: str) -> str:
    """A Sentry DSN ``https://<public key>@<host>[:port][/path]/<project id>``; ValidationError otherwise."""
    dsn = raw.strip()
    if not dsn:
        raise ValidationError("please enter the DSN of the error-reporting service", code="bad_dsn")
    if len(dsn) > MAX_DSN or any(c.isspace() for c in dsn):
        raise ValidationError("the DSN is too long or contains spaces", code="bad_dsn")
    try:
        parts = urlsplit(dsn)
        port = parts.port
    except ValueError:
        raise ValidationError("the DSN is not a valid address", code="bad_dsn") from None
    if parts.scheme != "https":
        raise ValidationError("the DSN must start with https:// (reports are sent encrypted)", code="bad_dsn")
    if parts.query or parts.fragment or parts.password is not None:
        raise ValidationError("the DSN must not contain a secret key, query or fragment", code="bad_dsn")
    if not parts.username or not _KEY.fullmatch(parts.username):
        raise ValidationError("the DSN has no valid public key before the @", code="bad_dsn")
    if not parts.hostname or not _HOST.fullmatch(parts.hostname) or port == 0:
        raise ValidationError("the DSN has no valid host", code="bad_dsn")
    project = parts.path.rstrip("/").rsplit("/", 1)[-1]
    if not _PROJECT.fullmatch(project):
        raise ValidationError("the DSN must end with a numeric project id", code="bad_dsn")
    return dsn


async def get(*, session: AsyncSession) -> State:
    """The current setting (off when it was never set)."""
    row = await session.get(ErrorReporting, ROW_ID)
    if row is None:
        return OFF
    return State(
        enabled=bool(row.enabled and row.dsn),
        dsn=row.dsn,
        changed_by=row.changed_by,
        changed_at=row.changed_at,
    )


async def _row(session: AsyncSession) -> ErrorReporting:
    await take_write_lock(session)  # SQLite; PostgreSQL locks the row
    row = await session.get(ErrorReporting, ROW_ID, with_for_update=True)
    if row is None:
        row = ErrorReporting(id=ROW_ID, enabled=False, dsn=None)
        session.add(row)
    return row


async def enable(*, session: AsyncSession, dsn: str, actor: Actor, now: datetime) -> State:
    """Switch error reporting on (or move it to another DSN) and audit the host it now sends to."""
    dsn = validate_dsn(dsn)
    row = await _row(session)
    before = dsn_host(row.dsn) if row.enabled and row.dsn else None
    row.enabled, row.dsn, row.changed_by, row.changed_at = True, dsn, actor.id, now
    await session.flush()
    await audit.record(
        session,
        org_id=None,
        actor=actor,
        action="error_reporting.enable",
        now=now,
        object_kind="error_reporting",
        details={"host": dsn_host(dsn), "previous_host": before},
    )
    return await get(session=session)


async def disable(*, session: AsyncSession, actor: Actor, now: datetime) -> State:
    """Switch error reporting off; the DSN is forgotten so that nothing can send by mistake."""
    row = await _row(session)
    before = dsn_host(row.dsn) if row.enabled and row.dsn else None
    row.enabled, row.dsn, row.changed_by, row.changed_at = False, None, actor.id, now
    await session.flush()
    await audit.record(
        session,
        org_id=None,
        actor=actor,
        action="error_reporting.disable",
        now=now,
        object_kind="error_reporting",
        details={"previous_host": before},
    )
    return await get(session=session)
