"""The Alembic migrations build exactly the schema the models describe (SQLite and PostgreSQL), and a
start only runs them when the database is behind."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import PG_ADMIN, _pg_exec

from pforte import migrate

ROOT = Path(__file__).resolve().parents[2]


def test_migrated_schema_matches_the_models(db_url, tmp_path):
    env = {**os.environ, "PFORTE_DATA_DIR": str(tmp_path / "data"), "PFORTE_DATABASE_URL": db_url}
    pforte = str(Path(sys.executable).parent / "pforte")
    alembic = str(Path(sys.executable).parent / "alembic")
    subprocess.run([pforte, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
    check = subprocess.run([alembic, "check"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr


@pytest.fixture
def empty_db_url(db_kind: str, tmp_path: Path) -> Iterator[str]:
    """A database no migration has touched yet."""
    if db_kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    name = f"pforte_empty_{uuid.uuid4().hex[:10]}"
    _pg_exec(f'CREATE DATABASE "{name}"')
    yield "postgresql+asyncpg://" + PG_ADMIN.split("://", 1)[1].rsplit("/", 1)[0] + "/" + name
    _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_head_read_from_the_migration_files_is_alembics_head():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert migrate.head_revision() == script.get_current_head()


def _upgrade_in_a_new_process(url: str) -> list[str]:
    """``migrate.upgrade`` as ``pforte serve`` runs it: was Alembic imported, and the revision after."""
    code = (
        "import sys; from pforte import migrate; migrate.upgrade(sys.argv[1]); "
        "print('alembic' in sys.modules, migrate.current_revision(sys.argv[1]))"
    )
    done = subprocess.run([sys.executable, "-c", code, url], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_database_behind_the_head_is_upgraded_and_one_at_the_head_needs_no_alembic(empty_db_url):
    head = migrate.head_revision()
    assert head is not None and migrate.current_revision(empty_db_url) is None
    migrate.upgrade(empty_db_url, "0006")
    assert migrate.current_revision(empty_db_url) == "0006"
    assert _upgrade_in_a_new_process(empty_db_url) == ["True", head]  # behind: Alembic upgrades
    assert _upgrade_in_a_new_process(empty_db_url) == ["False", head]  # at the head: a look is enough
