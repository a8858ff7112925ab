"""The Alembic migrations build exactly the schema the models describe (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_migrated_schema_matches_the_models(db_url, tmp_path):
    env = {**os.environ, "PFORTE_DATA_DIR": str(tmp_path / "data"), "PFORTE_DATABASE_URL": db_url}
    pforte = str(Path(sys.executable).parent / "pforte")
    alembic = str(Path(sys.executable).parent / "alembic")
    subprocess.run([pforte, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
    check = subprocess.run([alembic, "check"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
