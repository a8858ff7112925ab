"""Database plumbing: the declarative base, id and time types, engine and sessions.

SQLite (WAL) is the embedded default, PostgreSQL the production choice; the same models and
statements run on both. Services take an ``AsyncSession`` and never commit: the request, job or
command that opened the session owns the transaction.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    DateTime,
    MetaData,
    Result,
    Select,
    String,
    Table,
    bindparam,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every table."""

    metadata = MetaData(naming_convention=NAMING)


def new_id() -> str:
    """A time-ordered 128-bit id (UUIDv7 layout) as 32 hex characters."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 4 & ((1 << 12) - 1)) << 64
    value |= 0b10 << 62 | (rand & ((1 << 62) - 1))
    return f"{value:032x}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both SQLite (stored naive) and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        """timestamptz on PostgreSQL, naive text on SQLite."""
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.TIMESTAMP(timezone=True))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Normalise to UTC; naive on SQLite."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use aware UTC")
        if value.tzinfo is not UTC:  # pforte's clock gives UTC already
            value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Any:
        """On SQLite, one function from an aware datetime to the stored text.

        SQLAlchemy's own path there runs ``process_bind_param`` and then its SQLite DATETIME
        processor, which builds a dict and %-formats it: about 3.4 µs per value, 8 % of pforte's
        CPU when SQLite ingests 4,000 messages/s (docs/performance.md, "Datetimes on SQLite").
        ``isoformat`` writes the same text ("2026-11-24 01:30:05.149081") in C.
        """
        if dialect.name == "sqlite":
            return _sqlite_text
        return super().bind_processor(dialect)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Always return aware UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_last_sqlite_text: tuple[datetime | None, str | None] = (None, None)


def _sqlite_text(value: datetime | None) -> str | None:
    """UTCDateTime's bound value on SQLite: naive UTC as text, microseconds always written.

    The last value's text is kept: the rows of one transaction share its ``now`` (one object),
    so most values are the one before. The pair is replaced whole, and holds its datetime, so
    an identical object is the same instant.
    """
    global _last_sqlite_text
    last = _last_sqlite_text
    if value is last[0]:
        return last[1]
    if value is None:
        return None
    if value.tzinfo is not UTC:
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use aware UTC")
        value = value.astimezone(UTC)
    text = value.isoformat(" ", "microseconds")[:-6]  # without "+00:00"
    _last_sqlite_text = (value, text)
    return text


def table_of(model: type[Base]) -> Table:
    """A model's Core table, typed as a Table (``__table__`` is typed as a plain FromClause)."""
    return cast(Table, model.__table__)


def upsert_insert(dialect_name: str, table: Any) -> Any:
    """A dialect-specific INSERT that supports ON CONFLICT on SQLite and PostgreSQL."""
    return (postgresql.insert if dialect_name == "postgresql" else sqlite.insert)(table)


def _unsized(type_: Any) -> Any:
    """A column type for an array parameter: VARCHAR without its length.

    Two reasons. An explicit cast to ``varchar(n)`` silently cuts longer text, where an INSERT of
    the same value fails: the length must be checked by the column, not the cast. And in a generic
    plan (asyncpg prepares; from the sixth run PostgreSQL may reuse one plan) ``$1::varchar(n)[]``
    is a coercion of every element that is evaluated again for every row the filter looks at:
    measured 140 ms instead of 5 ms for 600 ids against 4,000 rows.
    """
    return String() if isinstance(type_, String) and type_.length else type_


def any_of(dialect_name: str, col: Any, values: Any) -> ColumnElement[bool]:
    """``col IN values`` for a list of any length.

    On PostgreSQL it is ``col IN (SELECT unnest(one array parameter))``:
    - the statement's text does not depend on the number of values, so asyncpg prepares it once.
      An IN list renders one placeholder per value, and each new length is a new statement for
      the server to parse and plan (the hot path sees every length from 1 to a few hundred);
    - the planner joins against the list: an index look-up per value, or one hash of the list.
      With stale statistics it may hash the list and read every row of the filtered range once
      per statement; for look-ups in a big, fast-growing table use a LATERAL look-up per value
      instead (``conversations.ingest._messages_by_wamid``).
    - ``col = ANY($1)`` was tried first. In the generic plan PostgreSQL switches to after five
      runs of a prepared statement, ANY over a parameter is not hashed: every row the filter
      looks at is compared with every value, so the cost grows with the table. Measured on one
      connection, 600 ids: 5 ms for the first runs, 125–170 ms per run after, with 4,000–12,000
      rows in the channel.
    SQLite keeps the plain IN list.
    """
    values = list(values)
    if dialect_name == "postgresql":
        array = bindparam(None, values, type_=postgresql.ARRAY(_unsized(col.type)))
        return cast(ColumnElement[bool], col.in_(select(func.unnest(array))))
    return cast(ColumnElement[bool], col.in_(values))


def any_of_param(dialect_name: str, col: Any, name: str) -> ColumnElement[bool]:
    """:func:`any_of` with a named parameter ``name`` (a list) instead of the values, for a
    statement that is built once and executed with new lists: an expanding IN on SQLite."""
    if dialect_name == "postgresql":
        array = bindparam(name, type_=postgresql.ARRAY(_unsized(col.type)))
        return cast(ColumnElement[bool], col.in_(select(func.unnest(array))))
    return cast(ColumnElement[bool], col.in_(bindparam(name, expanding=True)))


_BULK_SQL: dict[tuple[str, tuple[str, ...], tuple[str, ...], str | None], tuple[str, list[Any]]] = {}


async def bulk_insert(
    conn: AsyncConnection,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    conflict: tuple[str, ...] = (),
    returning: str | None = None,
) -> list[Any]:
    """INSERT ``rows`` (dicts with the same keys) in one statement; ``conflict`` names a unique key
    whose duplicates are skipped (ON CONFLICT DO NOTHING). Returns the ``returning`` column of the
    rows actually inserted, else ``[]``.

    On PostgreSQL the rows travel column-wise, one array parameter per column, and the statement is
    ``INSERT … SELECT * FROM unnest($1::type[], …)``: its text is the same for 1 or 1,000 rows, so
    it is prepared once per connection. SQLAlchemy's multi-row VALUES sends one placeholder per
    cell (15,000 for 550 messages) in a text that changes with the row count; measured on the
    messages table, 550 rows: 17 ms against 34–59 ms. SQLite keeps the Core INSERT.
    """
    if not rows:
        return []
    dialect = conn.dialect
    if dialect.name != "postgresql":
        ins = upsert_insert(dialect.name, table)
        if conflict:
            ins = ins.on_conflict_do_nothing(index_elements=list(conflict))
        if returning is None:
            await conn.execute(ins, rows)
            return []
        return [r[0] for r in await conn.execute(ins.returning(table.c[returning]), rows)]
    cols = tuple(rows[0])
    key = (table.name, cols, conflict, returning)
    cached = _BULK_SQL.get(key)
    if cached is None:
        # Every name is looked up in the Table (KeyError otherwise) and quoted: no outside text.
        quote = dialect.identifier_preparer.quote
        types = [_unsized(table.c[c].type).dialect_impl(dialect) for c in cols]
        names = ", ".join(quote(table.c[c].name) for c in cols)
        casts = ", ".join(f"${i}::{t.compile(dialect=dialect)}[]" for i, t in enumerate(types, 1))
        sql = f"INSERT INTO {quote(table.name)} ({names}) SELECT * FROM unnest({casts})"  # noqa: S608
        if conflict:
            sql += f" ON CONFLICT ({', '.join(quote(table.c[c].name) for c in conflict)}) DO NOTHING"
        if returning:
            sql += f" RETURNING {quote(table.c[returning].name)}"
        cached = (sql, [t.bind_processor(dialect) for t in types])
        _BULK_SQL[key] = cached
    sql, procs = cached
    params = tuple(
        [proc(r[c]) for r in rows] if proc else [r[c] for r in rows]
        for c, proc in zip(cols, procs, strict=True)
    )
    result = await conn.exec_driver_sql(sql, params)
    return [r[0] for r in result] if returning else []


Executor = AsyncSession | AsyncConnection

# How a locking read locks on PostgreSQL. "update" is what a DELETE takes; "no_key_update" keeps
# others from changing or locking the row but lets them insert rows referring to it ("key_share",
# what a foreign key check takes); "share" lets others read-lock, not change.
LOCK_MODES: dict[str, tuple[bool, bool]] = {  # mode -> (read, key_share) of with_for_update
    "update": (False, False),
    "no_key_update": (False, True),
    "share": (True, False),
    "key_share": (True, True),
}


def dialect_of(db: Executor) -> str:
    """'sqlite' or 'postgresql', for a session or a connection."""
    bind = db.get_bind() if isinstance(db, AsyncSession) else db
    return bind.dialect.name


async def take_write_lock(db: Executor) -> None:
    """SQLite: take the database's write lock now, for the rest of the transaction.

    The driver begins SQLite's transaction only at the first write, so reads before it see each
    commit as it happens, and a decision taken on them can be stale by the time its write runs.
    An UPDATE that matches nothing begins the transaction and takes the write lock without
    writing a page: nobody else writes until this transaction ends, and what it reads from now on
    is the latest commit. A no-op on PostgreSQL, which locks rows instead (:func:`read_locked`).
    """
    if dialect_of(db) == "sqlite":
        await db.execute(text("UPDATE organisations SET id = id WHERE 0"))


async def read_locked(db: Executor, q: Select[*tuple[Any, ...]], mode: str = "update") -> Result[Any]:
    """Run ``q`` so that the rows it returns stay as read until the transaction ends.

    PostgreSQL locks them in ``mode`` (see LOCK_MODES), in the order ``q`` sorts them (sort by id
    where several rows are locked, so that two transactions lock in one order); rows changed by a
    transaction it waited for are read as that one left them. SQLite has no row locks: the whole
    database's write lock is taken first (:func:`take_write_lock`).
    """
    if dialect_of(db) == "postgresql":
        read, key_share = LOCK_MODES[mode]
        return await db.execute(q.with_for_update(read=read, key_share=key_share))
    await take_write_lock(db)
    return await db.execute(q)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    # Deleted rows are overwritten with zeros, not left in free pages for a forensic reader.
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()


PING_IDLE_S = 5.0  # a pooled server connection unused for longer is pinged before it is handed out


def _ping_when_idle(engine: AsyncEngine) -> None:
    """Ping a pooled connection before use only if it sat idle for ``PING_IDLE_S``.

    ``pool_pre_ping`` pings on every checkout: on asyncpg three round trips (BEGIN, ``;``,
    ROLLBACK) and about 4 % of the process's CPU under load, for connections used a few
    milliseconds before. A connection that went stale
    (the server restarted, a firewall dropped it) went stale while it sat idle, so that is when to
    look. A dead one is replaced before anyone uses it (``DisconnectionError`` makes the pool
    connect anew). If the server goes away while connections are in use, the statement that meets
    a closed connection fails once and SQLAlchemy renews the whole pool; the webhook answers 503
    (re-delivered), a job is retried, a page shows the error.
    """
    pool = engine.sync_engine.pool
    dialect = engine.dialect

    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < PING_IDLE_S:
            return
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as exc:
            if dialect.is_disconnect(cast(Any, exc), dbapi_conn, None):
                raise DisconnectionError("pooled connection was closed while idle") from exc
            raise

    event.listen(pool, "checkin", _checkin)
    event.listen(pool, "checkout", _checkout)


class Database:
    """Owns the engine and hands out sessions; created in bootstrap, disposed at shutdown."""

    def __init__(self, url: str, *, echo: bool = False, pool_size: int = 20) -> None:
        self.url = url
        # Sized for the outbox's concurrent jobs plus requests; each job holds a connection only briefly.
        kwargs: dict[str, Any] = {"echo": echo, "pool_size": pool_size, "max_overflow": pool_size}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            _ping_when_idle(self.engine)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self.sessionmaker() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        """Close all pooled connections."""
        await self.engine.dispose()
