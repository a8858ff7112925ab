"""Shared fixtures: a database on SQLite and PostgreSQL, pforte and the simulator wired in-process.

Every test that touches the database runs twice (``db_kind`` = sqlite, postgresql). PostgreSQL must
be reachable (127.0.0.1:5432 or ``PFORTE_TEST_PG``); if it is not, these tests fail loudly rather
than skip, in CI and locally alike.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.helpers import seed_clinic

from pforte import migrate
from pforte.app import create_app
from pforte.bootstrap import Services, build_services
from pforte.channels.simulator import SimulatorConfig, create_simulator_app
from pforte.clock import SystemClock
from pforte.config import Settings
from pforte.models import Base
from pforte.orgs import service as orgs
from pforte.staff import service as staff

PG_ADMIN = os.environ.get("PFORTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
PASSWORD = "correct horse battery"
APP_SECRET = "sim-app-secret-123"
ACCESS_TOKEN = "sim-access-token-abc"
PNID = "106540352242922"


def _pg_exec(sql: str, dbname: str = "test") -> None:
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + dbname

    async def _run() -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(_run())


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this test run, migrated to head."""
    name = f"pforte_test_{uuid.uuid4().hex[:10]}"
    try:
        _pg_exec(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # fail loudly: PostgreSQL is a required part of the test suite
        pytest.fail(
            f"PostgreSQL is unreachable at {PG_ADMIN} ({type(exc).__name__}); tests need it", pytrace=False
        )
    url = "postgresql+asyncpg://" + PG_ADMIN.split("://", 1)[1].rsplit("/", 1)[0] + "/" + name
    migrate.upgrade(url)
    yield url
    _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.sqlite3"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_kind(request: pytest.FixtureRequest) -> str:
    """Which database this test runs on."""
    return str(request.param)


@pytest.fixture
def db_url(db_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A clean migrated database of the requested kind."""
    if db_kind == "sqlite":
        target = tmp_path / "pforte.sqlite3"
        shutil.copy(request.getfixturevalue("sqlite_template"), target)
        yield f"sqlite+aiosqlite:///{target}"
        return
    url = request.getfixturevalue("pg_url")
    yield url
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    _pg_exec(f"TRUNCATE {tables} CASCADE", dbname=url.rsplit("/", 1)[1])


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    """Settings for a test instance with its own data directory."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        base_url="https://testserver",
        outbox_poll_seconds=0.05,
        group_commit_window_ms=1.0,
        run_workers=True,
        dek_cache_seconds=300.0,
    )


class LazyASGI:
    """An ASGI app whose target is set later (pforte and the simulator point at each other)."""

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Forward to the target app."""
        await self.app(scope, receive, send)


@dataclass
class World:
    """A running pforte with an organisation, users, a channel wired to the simulator, a patient."""

    services: Services
    app: Any
    client: httpx.AsyncClient
    sim_app: Any
    sim: Any
    org_id: str
    channel_id: str
    admin_email: str
    staff_email: str
    staff_id: str
    template_id: str
    patient: Any

    async def login(self, email: str | None = None, password: str = PASSWORD) -> httpx.Response:
        """Log the test client in (default: the staff user)."""
        page = await self.client.get("/login")
        assert page.status_code == 200
        return await self.client.post(
            "/login", data={"email": email or self.staff_email, "password": password}
        )

    async def add_other_org(self, email: str, role: str = "staff", slug: str = "andere") -> str:
        """Another organisation with one user (for scoping tests); returns its id."""
        now = self.services.clock.now()
        async with self.services.db.transaction() as s:
            other = await orgs.create(
                session=s, keys=self.services.keys, name=slug.title(), slug=slug, now=now
            )
            await staff.create(
                session=s,
                org_id=other.id,
                email=email,
                display_name=slug,
                password=PASSWORD,
                role=role,
                now=now,
            )
            return other.id

    async def settle(self, rounds: int = 5) -> None:
        """Let webhooks and outbox jobs run until both are quiet."""
        for _ in range(rounds):
            await self._drain_sim()
            await self.services.outbox.drain()
            await asyncio.sleep(0)
        await self._drain_sim()
        await self.services.outbox.drain()  # its periodic pass reconciles statuses parked meanwhile

    async def _drain_sim(self) -> None:
        """The simulator's drain; when it times out, say why (deliveries, database waits)."""
        try:
            await self.sim.drain(timeout=5.0)
        except TimeoutError:
            raise AssertionError(await self._why_not_idle()) from None

    async def _why_not_idle(self) -> str:
        queue = self.sim.queue
        lines = [f"simulator not idle after 5 s: {queue.pending} pending"]
        for d in queue.log[-10:]:
            tries = ", ".join(f"{a.status_code or a.error}" for a in d.attempts) or "none"
            lines.append(f"  delivery {d.id}: {d.update_count} update(s), {d.state}, attempts: {tries}")
        db = self.services.db
        if db.dialect == "postgresql":
            from sqlalchemy import text

            async with db.engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        "SELECT pid, state, wait_event_type, wait_event, pg_blocking_pids(pid),"
                        " now() - xact_start, left(query, 120) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND state <> 'idle'"
                    )
                )
                lines += [f"  backend {tuple(r)}" for r in rows]
        return "\n".join(lines)


@pytest.fixture
async def world(settings: Settings) -> AsyncIterator[World]:
    """pforte and the simulator talking to each other in-process over real HTTP semantics."""
    pforte_proxy = LazyASGI()
    sim_app = create_simulator_app(
        SimulatorConfig(public_base_url="https://graph.test", deliver_delay_s=0.0),
        webhook_transport=httpx.ASGITransport(app=pforte_proxy),
    )
    sim = sim_app.state.sim
    settings = settings.model_copy(update={"run_workers": False})
    services = build_services(settings, clock=SystemClock(), graph_transport=httpx.ASGITransport(app=sim_app))
    app = create_app(services, manage_lifespan=False)
    pforte_proxy.app = app
    await services.start()
    await sim.start()
    clinic = await seed_clinic(
        services,
        sim,
        graph_base_url="https://graph.test",
        pforte_base_url="https://testserver",
        pnid=PNID,
        access_token=ACCESS_TOKEN,
        app_secret=APP_SECRET,
        password=PASSWORD,
    )
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="https://testserver",
        headers={"accept-language": "de-DE,de;q=0.9"},
    )
    w = World(
        services=services,
        app=app,
        client=client,
        sim_app=sim_app,
        sim=sim,
        org_id=clinic.org_id,
        channel_id=clinic.channel_id,
        admin_email=clinic.admin_email,
        staff_email=clinic.staff_email,
        staff_id=clinic.staff_id,
        template_id=clinic.template_id,
        patient=clinic.patient,
    )
    try:
        yield w
    finally:
        await client.aclose()
        await sim.stop()
        await services.stop()
