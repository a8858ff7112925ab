"""``pforte backup`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pforte import clikit
from pforte.errors import PforteError

backup_app = typer.Typer(no_args_is_help=True, help="Encrypted backups to the controller's age public key")


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


@backup_app.command("set-recipient")
def set_recipient(
    recipient: str = typer.Argument(
        ..., help="the controller's age public key (age1…), never the secret key"
    ),
) -> None:
    """Store the age public key backups are encrypted to (the secret key stays with the controller)."""
    from pforte.backup import service

    s = clikit.settings()
    try:
        value = service.set_recipient(s, recipient)
    except PforteError as exc:
        clikit.fail(exc.message)
    typer.echo(f"backup recipient set: {value}")
    typer.echo(f"fingerprint: {service.fingerprint(value)}  (stored in {s.effective_backup_recipient_file})")


@backup_app.command("show-recipient")
def show_recipient() -> None:
    """Print the age public key backups are encrypted to."""
    from pforte.backup import service

    try:
        value = service.get_recipient(clikit.settings())
    except PforteError as exc:
        clikit.fail(exc.message)
    if value is None:
        clikit.fail("no backup recipient set; run pforte backup set-recipient age1…")
    typer.echo(value)
    typer.echo(f"fingerprint: {service.fingerprint(value)}")


@backup_app.command("create")
def create(
    out: Path = typer.Option(..., "--out", help="the backup file to write (must not exist)"),
) -> None:
    """Write one encrypted file: every table from one snapshot, the blob files, the key ring."""
    from pforte.backup import service

    async def _do(sv: Any) -> service.Created:
        return await service.create(sv, out)

    r = clikit.run(clikit.settings(), _do)
    typer.echo(
        f"backup written: {r.path} ({_mb(r.size)}; {sum(r.rows.values())} rows in {len(r.rows)} tables, "
        f"{r.blobs} blob files, {r.keks} keys; schema {r.revision})"
    )
    typer.echo(f"sha256: {r.sha256}")
    if r.missing_blobs:
        typer.echo(
            f"{r.missing_blobs} blob files were deleted during the backup (erased meanwhile)", err=True
        )


@backup_app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="the backup file"),
    identity: Path = typer.Option(..., "--identity", "-i", help="the controller's age identity file"),
) -> None:
    """Decrypt and check a backup completely without restoring anything."""
    from pforte.backup import service
    from pforte.backup.archive import load_identities

    async def _do(sv: Any) -> service.Verified:
        return await service.verify(file, load_identities(identity))

    v = clikit.run(clikit.settings(), _do)
    rows = sum(v.manifest["tables"].values())
    typer.echo(
        f"backup ok: created {v.header['created_at']} on {v.header['source_dialect']}, schema {v.revision}; "
        f"{rows} rows, {v.manifest['blobs']['count']} blob files, {len(v.keyring)} keys"
    )
    typer.echo(f"sha256: {v.sha256}  (compare with the one backup create printed and audited)")


@backup_app.command("restore")
def restore(
    file: Path = typer.Argument(..., help="the backup file"),
    identity: Path = typer.Option(..., "--identity", "-i", help="the controller's age identity file"),
    force: bool = typer.Option(False, "--force", help="replace a database that already holds data"),
) -> None:
    """Restore a backup (pforte stopped); erasures recorded since the backup are applied again."""
    from pforte.backup import service
    from pforte.backup.archive import load_identities

    async def _do(sv: Any) -> service.Restored:
        return await service.restore(sv, file, load_identities(identity), force=force)

    r = clikit.run(clikit.settings(), _do)
    schema = r.revision + (f" (migrated to {r.upgraded_to})" if r.upgraded_to else "")
    erased = ", ".join(f"{k} {v}" for k, v in sorted(r.reapplied.items())) or "nothing to erase"
    typer.echo(
        f"restored: {sum(r.rows.values())} rows in {len(r.rows)} tables, {r.blobs} blob files, "
        f"{r.keys_added} keys added; schema {schema}"
    )
    typer.echo(f"erasure ledger: {r.ledger_entries} entries re-applied ({erased})")
    q = r.quiesced
    typer.echo(
        f"sessions ended: {q.get('sessions_ended', 0)}; messages waiting to be sent put up for review: "
        f"{q.get('messages_to_review', 0)}"
    )
    typer.echo(f"sha256 of the backup: {r.sha256}")
    if r.missing_blobs:
        typer.echo(f"{r.missing_blobs} attachments have no blob file in the backup", err=True)
