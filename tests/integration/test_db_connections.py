"""Pooled PostgreSQL connections: pinged only after sitting idle, replaced when found dead.

pforte no longer pings on every checkout (``pool_pre_ping``: three round trips per transaction).
These tests kill the server side of pooled connections and check what a user of the pool sees.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

from pforte import db as dbmod
from pforte.db import Database


async def _backend_pid(database: Database) -> int:
    async with database.engine.connect() as conn:
        return int((await conn.execute(text("select pg_backend_pid()"))).scalar_one())


async def _terminate(database: Database, pid: int) -> None:
    async with database.engine.connect() as conn:
        killed = (await conn.execute(text("select pg_terminate_backend(:p)"), {"p": pid})).scalar_one()
    assert killed is True


async def test_a_connection_killed_while_idle_is_replaced_before_use(pg_url, monkeypatch):
    database = Database(pg_url, pool_size=1)
    other = Database(pg_url, pool_size=1)
    try:
        before = await _backend_pid(database)  # the pool now holds this one idle connection
        await _terminate(other, before)
        monkeypatch.setattr(dbmod, "PING_IDLE_S", 0.0)  # it has been idle "long enough"
        after = await _backend_pid(database)  # no error: the ping found it dead, the pool reconnected
        assert after != before
    finally:
        await database.dispose()
        await other.dispose()


async def test_a_recently_used_connection_is_not_pinged(pg_url):
    """The point of the change: under load a checkout costs no extra round trip."""
    database = Database(pg_url, pool_size=1)
    statements: list[str] = []
    try:
        await _backend_pid(database)

        def _seen(conn, cursor, statement, *_):  # every statement SQLAlchemy sends
            statements.append(statement)

        event.listen(database.engine.sync_engine, "before_cursor_execute", _seen)
        pings: list[int] = []
        real_ping = database.engine.dialect.do_ping

        def _counting_ping(dbapi_conn):
            pings.append(1)
            return real_ping(dbapi_conn)

        database.engine.dialect.do_ping = _counting_ping  # type: ignore[method-assign]
        for _ in range(5):
            await _backend_pid(database)
        assert pings == []
        assert statements == ["select pg_backend_pid()"] * 5
    finally:
        await database.dispose()


async def test_a_connection_killed_in_use_fails_once_and_the_pool_recovers(pg_url):
    """No ping for a connection used a moment ago: the first statement on it fails with a clear
    error, and the next checkout gets a fresh connection (SQLAlchemy renews the pool)."""
    database = Database(pg_url, pool_size=2)
    other = Database(pg_url, pool_size=1)
    try:
        before = await _backend_pid(database)
        await _terminate(other, before)
        with pytest.raises(DBAPIError) as caught:
            await _backend_pid(database)
        assert caught.value.connection_invalidated
        after = await _backend_pid(database)
        assert after != before
    finally:
        await database.dispose()
        await other.dispose()
