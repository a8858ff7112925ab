"""The ``pforte`` command against a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pforte.cli import app


@pytest.fixture
def cli(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("PFORTE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PFORTE_DATABASE_URL", db_url)
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(app, list(args))
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def test_org_user_channel_round_trip(cli):
    assert "up to date" in cli("migrate").output
    org_id = cli("org", "create", "--name", "Praxis Dr. Roth", "--slug", "praxis-roth").output.strip()
    assert len(org_id) == 32
    assert cli(
        "user",
        "create",
        "--org",
        "praxis-roth",
        "--email",
        "mfa@roth.test",
        "--role",
        "staff",
        "--password",
        "lang-genug-123",
    ).output.strip()
    added = json.loads(
        cli(
            "channel",
            "add-whatsapp",
            "--org",
            "praxis-roth",
            "--name",
            "Praxis",
            "--phone-number-id",
            "123456789",
            "--display-phone-number",
            "+49 89 1",
            "--access-token",
            "tok-SECRET-1",
            "--app-secret",
            "app-SECRET-2",
        ).output
    )
    assert added["webhook_path"] == f"/webhooks/whatsapp/{added['id']}"
    listed = cli("channel", "list", "--json").output
    rows = json.loads(listed)
    assert [(r["id"], r["phone_number_id"], r["webhook_path"]) for r in rows] == [
        (added["id"], "123456789", added["webhook_path"])
    ]
    assert "SECRET" not in listed
    secret_rows = json.loads(cli("channel", "list", "--json", "--show-secrets").output)
    assert secret_rows[0]["access_token"] == "tok-SECRET-1" and secret_rows[0]["app_secret"] == "app-SECRET-2"


def test_bad_input_is_one_clear_line_and_exit_2(cli):
    cli("migrate")
    r = cli("org", "create", "--name", "X", "--slug", "Not A Slug", ok=False)
    assert r.exit_code == 2 and r.output.strip().startswith("pforte: slug must")
    cli("org", "create", "--name", "X", "--slug", "x-org")
    r = cli(
        "user",
        "create",
        "--org",
        "x-org",
        "--email",
        "a@b.test",
        "--role",
        "root",
        "--password",
        "p" * 12,
        ok=False,
    )
    assert r.exit_code == 2 and "role must be one of" in r.output
    r = cli("user", "create", "--org", "nope", "--email", "a@b.test", "--password", "p" * 12, ok=False)
    assert r.exit_code == 2 and "organisation not found" in r.output


def test_bad_setting_stops_start_up_with_one_line(cli, monkeypatch):
    monkeypatch.setenv("PFORTE_PORT", "not-a-port")
    r = cli("migrate", ok=False)
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "PFORTE_PORT" in r.output
