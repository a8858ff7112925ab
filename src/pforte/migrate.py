"""Run Alembic migrations programmatically (``pforte migrate``, tests, the demo).

``upgrade`` to the head first asks the database which revision it is at: a database already at
the newest schema (every restart but the first after an update) needs no Alembic, whose import
and script directory took about 0.3–0.7 s of every ``pforte serve`` start (docs/performance.md,
"Restart after a crash").
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import String, column, inspect, select, table
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

if TYPE_CHECKING:
    from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ROOT / "migrations" / "versions"
_REVISION = re.compile(r'^revision: str = "(\w+)"$', re.MULTILINE)
_DOWN = re.compile(r'^down_revision: str \| None = (?:None|"(\w+)")$', re.MULTILINE)


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at our migrations and the given database."""
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    """The newest revision, read from the migration files' ``revision``/``down_revision`` lines.

    None when a file does not have the plain one-parent form (a merge, say): then Alembic decides.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in VERSIONS.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        rev, down = _REVISION.search(source), _DOWN.search(source)
        if rev is None or down is None:
            return None
        revisions.add(rev.group(1))
        if down.group(1):
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


async def revision_of(conn: AsyncConnection) -> str | None:
    """The Alembic revision of a database (None if it was never migrated)."""
    if not await conn.run_sync(lambda c: inspect(c).has_table("alembic_version")):
        return None
    version = await conn.execute(select(column("version_num", String)).select_from(table("alembic_version")))
    value = version.scalar()
    return None if value is None else str(value)


def current_revision(url: str) -> str | None:
    """``revision_of`` the database at ``url``, from code that has no event loop running."""

    async def read() -> str | None:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return await revision_of(conn)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database to the newest schema (creates a SQLite file's directory if needed)."""
    if url.startswith("sqlite") and ":///" in url:
        Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    if revision == "head":
        head = head_revision()
        if head is not None and current_revision(url) == head:
            return
    from alembic import command

    command.upgrade(alembic_config(url), revision)
