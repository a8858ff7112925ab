"""The ``pforte`` command: serve, demo, migrate, organisations, users, channels, simulator."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import typer

from pforte import clikit, logs, migrate
from pforte.audit.cli import audit_app
from pforte.backup.cli import backup_app
from pforte.compliance.cli import compliance_app
from pforte.config import load_settings
from pforte.contacts.cli import contact_app
from pforte.crypto.cli import keys_app
from pforte.deletion.cli import delete_app
from pforte.errors import PforteError
from pforte.exports.cli import export_app, verify_export
from pforte.retention.cli import retention_app

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="pforte — the messaging gate for care providers"
)
org_app = typer.Typer(no_args_is_help=True, help="Organisations")
user_app = typer.Typer(no_args_is_help=True, help="Staff accounts")
channel_app = typer.Typer(no_args_is_help=True, help="Channels (WhatsApp numbers)")
app.add_typer(org_app, name="org")
app.add_typer(user_app, name="user")
app.add_typer(channel_app, name="channel")
app.add_typer(contact_app, name="contact")
app.add_typer(delete_app, name="delete")
app.add_typer(retention_app, name="retention")
app.add_typer(backup_app, name="backup")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(export_app, name="export")
app.add_typer(compliance_app, name="compliance")
app.command("verify-export")(verify_export)

_fail = clikit.fail
_settings = clikit.settings
_run = clikit.run


@app.command("migrate")
def migrate_cmd() -> None:
    """Bring the database schema up to date."""
    s = _settings()
    logs.configure(s.log_level, s.log_format)
    migrate.upgrade(s.effective_database_url)
    typer.echo("database is up to date")


@app.command()
def serve(
    host: str | None = typer.Option(None, help="bind address (PFORTE_HOST)"),
    port: int | None = typer.Option(None, help="port (PFORTE_PORT)"),
    workers: int = typer.Option(1, min=1, help="worker processes"),
    no_migrate: bool = typer.Option(False, "--no-migrate", help="do not migrate on start"),
) -> None:
    """Run pforte (webhooks, inbox, outbox worker)."""
    import uvicorn

    s = _settings(host=host, port=port)
    logs.configure(s.log_level, s.log_format)
    if workers > 1 and s.is_sqlite:
        _fail("several worker processes need PostgreSQL (PFORTE_DATABASE_URL); SQLite runs in one process")
    if not no_migrate:
        migrate.upgrade(s.effective_database_url)
    for key, value in (("PFORTE_HOST", s.host), ("PFORTE_PORT", str(s.port))):
        os.environ[key] = value
    uvicorn.run(
        "pforte.cli:app_factory",
        factory=True,
        host=s.host,
        port=s.port,
        workers=workers,
        access_log=False,
        log_config=None,
        proxy_headers=False,
    )


def app_factory() -> Any:
    """Build the ASGI app from the environment (used by uvicorn workers)."""
    from pforte.app import create_app
    from pforte.bootstrap import build_services

    s = load_settings()
    logs.configure(s.log_level, s.log_format)
    return create_app(build_services(s), server_gc=True)


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", help="bind address"),
    port: int = typer.Option(8080, help="inbox port; the simulator uses port+1"),
    data_dir: Path = typer.Option(Path("./pforte-data"), help="where the SQLite file, keys and blobs go"),
) -> None:
    """Start pforte with SQLite and the built-in WhatsApp simulator, ready to try in two browser tabs."""
    from pforte.demo import run_demo

    s = _settings(
        data_dir=data_dir,
        host=host,
        port=port,
        base_url=f"http://{host}:{port}",
        cookie_secure=host in ("127.0.0.1", "localhost", "::1"),
        log_format="text",
    )
    logs.configure("WARNING", "text")
    try:
        asyncio.run(run_demo(s))
    except KeyboardInterrupt:
        pass
    except PforteError as exc:
        _fail(exc.message)


@app.command()
def simulator(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8090),
) -> None:
    """Run the WhatsApp Cloud API simulator on its own (register numbers via POST /_sim/numbers)."""
    from pforte.channels.simulator import SimulatorConfig, run

    run(host=host, port=port, config=SimulatorConfig(public_base_url=f"http://{host}:{port}"))


@org_app.command("create")
def org_create(name: str = typer.Option(...), slug: str = typer.Option(...)) -> None:
    """Create an organisation (with its own key-encryption key)."""
    from pforte.orgs import service as orgs

    async def _do(sv: Any) -> str:
        async with sv.db.transaction() as session:
            org = await orgs.create(session=session, keys=sv.keys, name=name, slug=slug, now=sv.clock.now())
            return org.id

    typer.echo(_run(_settings(), _do))


@org_app.command("set")
def org_set(
    org: str = typer.Option(..., help="organisation slug"),
    name: str = typer.Argument(..., help="setting name, e.g. consent_required"),
    value: str = typer.Argument(..., help="JSON value, e.g. false, 30 or '[\"stop\"]'"),
) -> None:
    """Change one organisation setting (audited); `pforte org settings` lists them."""
    from pforte.audit.service import CLI
    from pforte.orgs import service as orgs

    try:
        parsed = json.loads(value)
    except ValueError:
        clikit.fail("the value must be JSON (true, false, a number, a quoted string or a list)")

    async def _do(sv: Any) -> None:
        async with sv.db.transaction() as session:
            found = await orgs.get_by_slug(session=session, slug=org)
            await orgs.update_settings(
                session=session, org_id=found.id, changes={name: parsed}, actor=CLI, now=sv.clock.now()
            )

    _run(_settings(), _do)


@org_app.command("settings")
def org_settings(org: str = typer.Option(..., help="organisation slug")) -> None:
    """Print an organisation's settings with their defaults filled in (JSON)."""
    from pforte.orgs import service as orgs

    async def _do(sv: Any) -> dict[str, Any]:
        async with sv.db.transaction() as session:
            found = await orgs.get_by_slug(session=session, slug=org)
            return {k: orgs.setting(found, k) for k in orgs.DEFAULT_SETTINGS}

    typer.echo(json.dumps(_run(_settings(), _do), indent=1, sort_keys=True))


@org_app.command("list")
def org_list() -> None:
    """List organisations."""
    from pforte.orgs import service as orgs

    async def _do(sv: Any) -> list[dict[str, str]]:
        async with sv.db.transaction() as session:
            return [{"id": o.id, "slug": o.slug, "name": o.name} for o in await orgs.list_(session=session)]

    typer.echo(json.dumps(_run(_settings(), _do), indent=1))


@user_app.command("create")
def user_create(
    org: str = typer.Option(..., help="organisation slug"),
    email: str = typer.Option(...),
    name: str = typer.Option("", help="display name"),
    role: str = typer.Option("staff", help="admin | staff | auditor"),
    password: str | None = typer.Option(None, help="omit to read PFORTE_NEW_PASSWORD or generate one"),
) -> None:
    """Create a staff account; a generated password is printed once."""
    from pforte.orgs import service as orgs
    from pforte.staff import service as staff

    pw = password or os.environ.get("PFORTE_NEW_PASSWORD") or secrets.token_urlsafe(12)

    async def _do(sv: Any) -> str:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            u = await staff.create(
                session=session,
                org_id=o.id,
                email=email,
                display_name=name or email,
                password=pw,
                role=role,
                now=sv.clock.now(),
            )
            return u.id

    uid = _run(_settings(), _do)
    typer.echo(uid)
    if not password and "PFORTE_NEW_PASSWORD" not in os.environ:
        typer.echo(f"password: {pw}", err=True)


@channel_app.command("add-whatsapp")
def channel_add_whatsapp(
    org: str = typer.Option(..., help="organisation slug"),
    name: str = typer.Option(...),
    phone_number_id: str = typer.Option(...),
    display_phone_number: str = typer.Option(...),
    access_token: str = typer.Option(..., envvar="PFORTE_WA_ACCESS_TOKEN"),
    app_secret: str = typer.Option(..., envvar="PFORTE_WA_APP_SECRET"),
    verify_token: str | None = typer.Option(None, envvar="PFORTE_WA_VERIFY_TOKEN"),
    graph_base_url: str = typer.Option("https://graph.facebook.com"),
    graph_version: str = typer.Option("v25.0"),
    rate_limit: int = typer.Option(80, help="messages per second for this number"),
    storage_region: str = typer.Option("default", help="default | DE | no_storage"),
) -> None:
    """Register a WhatsApp business number; prints the webhook path to configure at Meta."""
    from pforte.channels import service as channels
    from pforte.orgs import service as orgs

    async def _do(sv: Any) -> dict[str, str]:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            ch = await channels.add_whatsapp(
                session=session,
                keys=sv.keys,
                org=o,
                name=name,
                phone_number_id=phone_number_id,
                display_phone_number=display_phone_number,
                access_token=access_token,
                app_secret=app_secret,
                verify_token=verify_token,
                graph_base_url=graph_base_url,
                graph_version=graph_version,
                rate_limit_per_s=rate_limit,
                storage_region=storage_region,
                now=sv.clock.now(),
            )
            return {"id": ch.id, "webhook_path": f"/webhooks/whatsapp/{ch.id}"}

    typer.echo(json.dumps(_run(_settings(), _do)))


@channel_app.command("list")
def channel_list(
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    show_secrets: bool = typer.Option(False, "--show-secrets", help="include tokens and secrets"),
) -> None:
    """List channels (secrets only with --show-secrets)."""
    from pforte.channels import service as channels

    async def _do(sv: Any) -> list[dict[str, Any]]:
        out = []
        async with sv.db.transaction() as session:
            for ch in await channels.list_(session=session):
                item: dict[str, Any] = {
                    "id": ch.id,
                    "org_id": ch.org_id,
                    "kind": ch.kind,
                    "name": ch.name,
                    "phone_number_id": ch.phone_number_id,
                    "display_phone_number": ch.display_phone_number,
                    "webhook_path": f"/webhooks/whatsapp/{ch.id}",
                    "state": ch.state,
                    "state_reason": ch.state_reason,
                    "rate_limit_per_s": ch.rate_limit_per_s,
                }
                if show_secrets:
                    rt = await channels.runtime(session=session, keys=sv.keys, channel_id=ch.id)
                    item.update(
                        access_token=rt.access_token,
                        app_secret=rt.app_secret.decode(),
                        verify_token=rt.verify_token,
                    )
                out.append(item)
        return out

    rows = _run(_settings(), _do)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        typer.echo(f"{r['id']}  {r['state']:4}  {r['phone_number_id']}  {r['name']}  {r['webhook_path']}")


def main() -> None:
    """Entry point of the console script."""
    try:
        app()
    except PforteError as exc:  # pragma: no cover - last resort; commands catch their own
        typer.echo(f"pforte: {exc.message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
