"""Helpers for audit-chain and signing-key tests: an organisation with an admin, entries written the
way pforte writes them, and tampering done the way someone with database access would do it (plain
SQL on ``audit_events``, ``audit_heads`` and ``audit_checkpoints``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from pforte.audit import service as audit
from pforte.audit.models import AuditEvent
from pforte.audit.service import CLI
from pforte.bootstrap import Services, build_services
from pforte.cli import app
from pforte.clock import FakeClock
from pforte.config import Settings
from pforte.db import table_of
from pforte.orgs import service as orgs
from pforte.staff import service as staff

START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"
AE = table_of(AuditEvent)
CANONICAL = (
    "chain",
    "seq",
    "at",
    "org_id",
    "actor_kind",
    "actor_id",
    "action",
    "object_kind",
    "object_id",
    "details",
)


@dataclass
class Org:
    """An organisation with one admin and one staff member."""

    id: str
    slug: str
    admin_id: str
    admin_email: str
    staff_id: str
    staff_email: str


async def make_org(sv: Services, slug: str = "klinikum") -> Org:
    """An organisation (own KEK), an admin and a staff member."""
    now = sv.clock.now()
    async with sv.db.transaction() as s:
        org = await orgs.create(session=s, keys=sv.keys, name=slug.title(), slug=slug, now=now)
        admin = await staff.create(
            session=s,
            org_id=org.id,
            email=f"admin@{slug}.test",
            display_name="Admin",
            password=PASSWORD,
            role="admin",
            now=now,
        )
        member = await staff.create(
            session=s,
            org_id=org.id,
            email=f"pflege@{slug}.test",
            display_name="Pflege",
            password=PASSWORD,
            role="staff",
            now=now,
        )
        return Org(org.id, slug, admin.id, admin.email, member.id, member.email)


async def record_many(sv: Services, org_id: str | None, n: int, *, step_minutes: float = 1.0) -> None:
    """``n`` entries, one transaction each, the clock moving on between them (if it is a FakeClock)."""
    for i in range(n):
        if isinstance(sv.clock, FakeClock):
            sv.clock.advance(minutes=step_minutes)
        async with sv.db.transaction() as s:
            await audit.record(
                s,
                org_id=org_id,
                actor=CLI,
                action="test.step",
                now=sv.clock.now(),
                object_kind="test",
                object_id=f"obj-{i}",
                details={"i": i},
            )


async def head_seq(sv: Services, chain: str) -> int:
    """The chain head's sequence number (0 for a chain not started)."""
    async with sv.db.engine.connect() as c:
        got = (await c.execute(text("SELECT seq FROM audit_heads WHERE chain = :c"), {"c": chain})).scalar()
    return int(got or 0)


async def rows(sv: Services, chain: str) -> list[dict[str, Any]]:
    """Every entry of a chain, in sequence order."""
    async with sv.db.engine.connect() as c:
        got = await c.execute(select(AE).where(AE.c.chain == chain).order_by(AE.c.seq, AE.c.id))
        return [dict(r) for r in got.mappings()]


async def row(sv: Services, chain: str, seq: int) -> dict[str, Any]:
    """One entry by sequence number."""
    (found,) = [r for r in await rows(sv, chain) if r["seq"] == seq]
    return found


async def sql(sv: Services, *statements: str, **params: Any) -> None:
    """Run SQL statements in one transaction, as an intruder at a database prompt would."""
    async with sv.db.engine.begin() as c:
        for st in statements:
            await c.execute(text(st), params)


async def verify(sv: Services, chain: str) -> audit.VerifyResult:
    """``audit.verify`` on a fresh connection."""
    async with sv.db.engine.connect() as c:
        return await audit.verify(c, chain)


def entry(chain: str, seq: int, at: datetime, action: str = "forged.entry") -> dict[str, Any]:
    """The canonical fields of a made-up entry."""
    return {
        "chain": chain,
        "seq": seq,
        "at": at,
        "org_id": chain,
        "actor_kind": "cli",
        "actor_id": None,
        "action": action,
        "object_kind": None,
        "object_id": None,
        "details": None,
    }


async def insert_forged(sv: Services, chain: str, seq: int, prev_hash: str, *, id: str, at: datetime) -> str:
    """Insert a well-formed entry (correct hash over ``prev_hash``) that pforte never wrote."""
    e = entry(chain, seq, at)
    digest = audit.chain_hash(prev_hash, e)
    async with sv.db.engine.begin() as c:
        await c.execute(AE.insert().values(id=id, prev_hash=prev_hash, hash=digest, **e))
    return digest


async def shift(sv: Services, chain: str, from_seq: int, by: int) -> None:
    """Renumber the entries from ``from_seq`` on by ``by`` (in two steps: seq is unique)."""
    await sql(
        sv,
        "UPDATE audit_events SET seq = seq + 1000000 WHERE chain = :c AND seq >= :s",
        "UPDATE audit_events SET seq = seq - 1000000 + :by WHERE chain = :c AND seq >= 1000000",
        c=chain,
        s=from_seq,
        by=by,
    )


async def rewrite_from(sv: Services, chain: str, seq: int, action: str = "rewritten") -> None:
    """What a database intruder who knows the scheme does: change entry ``seq`` and recompute the
    hash and link of it and every later entry, and the head, so that every link is consistent."""
    entries = await rows(sv, chain)
    prev = audit.GENESIS
    async with sv.db.engine.begin() as c:
        for r in entries:
            if r["seq"] == seq:
                r["action"] = action
            if r["seq"] >= seq:
                digest = audit.chain_hash(prev, {k: r[k] for k in CANONICAL})
                await c.execute(
                    AE.update()
                    .where(AE.c.id == r["id"])
                    .values(action=r["action"], prev_hash=prev, hash=digest)
                )
                r["hash"] = digest
            prev = r["hash"]
        await c.execute(text("UPDATE audit_heads SET hash = :h WHERE chain = :c"), {"h": prev, "c": chain})


async def drop_seq_unique(sv: Services) -> None:
    """Remove the (chain, seq) uniqueness, as only someone with schema rights could."""
    if sv.db.dialect == "postgresql":
        await sql(sv, "ALTER TABLE audit_events DROP CONSTRAINT uq_audit_events_chain_seq")
        return
    await sql(
        sv,
        "CREATE TABLE audit_events_loose AS SELECT * FROM audit_events",
        "DROP TABLE audit_events",
        "ALTER TABLE audit_events_loose RENAME TO audit_events",
    )


async def restore_seq_unique(sv: Services, chain: str, intruder_id: str) -> None:
    """Undo ``drop_seq_unique`` (the PostgreSQL test database is shared by the whole run)."""
    await sql(sv, "DELETE FROM audit_events WHERE id = :i", i=intruder_id)
    if sv.db.dialect == "postgresql":
        await sql(sv, "ALTER TABLE audit_events ADD CONSTRAINT uq_audit_events_chain_seq UNIQUE (chain, seq)")


@pytest.fixture
def cli(db_url, settings, monkeypatch):
    """``pforte …`` against the test's database and data directory; asserts the exit code."""
    monkeypatch.setenv("PFORTE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("PFORTE_DATABASE_URL", db_url)
    runner = CliRunner()

    def run(*args: str, code: int = 0):
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, result.output
        return result

    return run


def with_services(settings: Settings, fn: Any) -> Any:
    """Run ``await fn(services)`` on fresh services outside the test's event loop (next to the CLI)."""

    async def main() -> Any:
        services = build_services(settings.model_copy(update={"run_workers": False}), clock=FakeClock(START))
        try:
            return await fn(services)
        finally:
            await services.stop()

    return asyncio.run(main())
