"""``pforte export conversation`` and ``pforte verify-export``: signed conversation exports.

Nothing here prints message content, names or phone numbers: the export command prints ids and
counts and writes the archive only to the file the operator names (mode 0600, never overwritten);
verification prints what it found wrong by file, message number and id.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import typer

from pforte import clikit

export_app = typer.Typer(no_args_is_help=True, help="Signed conversation exports")


def _write_new_file(path: Path, data: bytes) -> None:
    """Write bytes to a file that must not exist yet (mode 0600), synced; nothing is left on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@export_app.command("conversation")
def conversation(
    org: str = typer.Option(..., help="organisation slug"),
    conversation_id: str = typer.Option(..., "--conversation", help="conversation id"),
    out: Path = typer.Option(..., help="the ZIP file to write (must not exist yet)"),
    first: str | None = typer.Option(None, "--from", help="first day to include, e.g. 2025-03-01"),
    last: str | None = typer.Option(None, "--to", help="last day to include (whole day), e.g. 2025-03-31"),
    lang: str | None = typer.Option(None, help="de | en for the transcript (default PFORTE_DEFAULT_LOCALE)"),
) -> None:
    """Export one conversation as a signed ZIP; audited as done by the command line."""
    from pforte.audit.service import CLI
    from pforte.errors import PforteError
    from pforte.exports import service as exports
    from pforte.i18n import LOCALES
    from pforte.orgs import service as orgs

    if lang is not None and lang not in LOCALES:
        clikit.fail(f"--lang must be one of {', '.join(LOCALES)}")
    if out.exists():
        clikit.fail(f"{out} exists; choose another --out")
    if not out.parent.is_dir():
        clikit.fail(f"directory {out.parent} does not exist")
    try:
        since, until = exports.day_range(first, last)
    except PforteError as exc:
        clikit.fail(exc.message)
    settings = clikit.settings()
    language = lang or settings.default_locale

    async def _do(sv: Any) -> exports.SignedExport:
        created = False
        try:
            async with sv.db.transaction() as session:
                o = await orgs.get_by_slug(session=session, slug=org)
                made = await exports.create(
                    session,
                    sv.keys,
                    sv.blobs,
                    org_id=o.id,
                    conversation_id=conversation_id,
                    actor=CLI,
                    now=sv.clock.now(),
                    since=since,
                    until=until,
                    lang=language,
                )
                # The audit entry is in this transaction; the file is written before it commits,
                # and removed again if the commit fails: a file exists only with its entry.
                await asyncio.to_thread(_write_new_file, out, made.data)
                created = True
        except BaseException:
            if created:
                await asyncio.to_thread(out.unlink, True)
            raise
        return made

    try:
        made = clikit.run(settings, _do)
    except FileExistsError:
        clikit.fail(f"{out} exists; choose another --out")
    except OSError as exc:
        clikit.fail(f"cannot write {out}: {exc.strerror or type(exc).__name__}")
    typer.echo(
        f"{out}: {made.messages} messages, {made.attachments} attachments, signed by key "
        f"{made.fingerprint[:16]}, manifest sha256 {made.manifest_sha256}"
    )


def verify_export(
    file: Path = typer.Argument(..., help="the export (ZIP) to check"),
    public_key: str | None = typer.Option(
        None,
        "--public-key",
        help="check offline against this Ed25519 public key (64 hex characters) instead of this "
        "instance's key registry; revocation cannot be checked then",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Check a signed conversation export: signature, key state, every file's hash, completeness."""
    from pforte.exports.verify import Result, verify

    try:
        data = file.read_bytes()
    except OSError as exc:
        clikit.fail(f"cannot read {file}: {exc.strerror or type(exc).__name__}")
    if public_key is not None:
        try:
            result: Result = asyncio.run(verify(data, public_key_hex=public_key))
        except ValueError as exc:
            clikit.fail(str(exc))
    else:

        async def _do(sv: Any) -> Result:
            async with sv.db.transaction() as session:
                return await verify(data, registry=session)

        result = clikit.run(clikit.settings(), _do)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), ensure_ascii=False, indent=1))
    else:
        typer.echo(result.summary)
        for p in result.problems:
            typer.echo(f"  - {p}")
        for n in result.notes:
            typer.echo(f"  note: {n}")
    if not result.ok:
        raise typer.Exit(1)
