"""``pforte contact`` commands: find a patient's id, export a patient's data (GDPR Art. 15/20).

Nothing here prints message content, names or phone numbers: ``show`` prints ids and counts, and
``export`` writes the archive only to the file the operator names (mode 0600, never overwritten).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import typer

from pforte import clikit

contact_app = typer.Typer(no_args_is_help=True, help="Patients (contacts): data-subject export")

# Same as the inbox: organisations have no time-zone setting yet.
DISPLAY_TZ = ZoneInfo("Europe/Berlin")


def _write_new_file(path: Path, chunks: Iterator[bytes]) -> None:
    """Write chunks to a file that must not exist yet (mode 0600), synced; nothing is left on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _one_of(contact: str | None, phone: str | None) -> None:
    if (contact is None) == (phone is None):
        clikit.fail("give exactly one of --contact ID or --phone NUMBER")


async def _find(session: Any, sv: Any, org: str, contact: str | None, phone: str | None) -> tuple[str, Any]:
    """The organisation's id and the contact chosen by id or by phone number."""
    from pforte.contacts import service as contacts
    from pforte.orgs import service as orgs

    o = await orgs.get_by_slug(session=session, slug=org)
    if contact is not None:
        return o.id, await contacts.get(session=session, org_id=o.id, contact_id=contact)
    assert phone is not None
    return o.id, await contacts.get_by_phone(session=session, keys=sv.keys, org_id=o.id, phone=phone)


@contact_app.command("show")
def show(
    org: str = typer.Option(..., help="organisation slug"),
    phone: str | None = typer.Option(None, help="phone number in international form, e.g. +49151…"),
    contact: str | None = typer.Option(None, help="contact id"),
) -> None:
    """Print the id and counts of the contacts with this phone number (or id); never their content."""
    from pforte.contacts import service as contacts
    from pforte.orgs import service as orgs

    _one_of(contact, phone)

    async def _do(sv: Any) -> list[str]:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            if contact is not None:
                found = [await contacts.get(session=session, org_id=o.id, contact_id=contact)]
            else:
                assert phone is not None
                found = await contacts.list_by_phone(session=session, keys=sv.keys, org_id=o.id, phone=phone)
            lines = []
            for c in found:
                n = await contacts.counts(session=session, contact_id=c.id)
                lines.append(
                    f"{c.id}  conversations={n['conversations']}  messages={n['messages']}  "
                    f"attachments={n['attachments']}  created={c.created_at:%Y-%m-%d}"
                )
            return lines

    lines = clikit.run(clikit.settings(), _do)
    if not lines:
        clikit.fail("no contact with this phone number in the organisation")
    for line in lines:
        typer.echo(line)


@contact_app.command("export")
def export(
    org: str = typer.Option(..., help="organisation slug"),
    out: Path = typer.Option(..., help="the ZIP file to write (must not exist yet)"),
    contact: str | None = typer.Option(None, help="contact id"),
    phone: str | None = typer.Option(None, help="phone number in international form, e.g. +49151…"),
    lang: str | None = typer.Option(None, help="de | en for the transcript (default PFORTE_DEFAULT_LOCALE)"),
) -> None:
    """Export one patient's data as a ZIP (Art. 15/20 GDPR); audited as done by the command line."""
    from pforte.audit.service import CLI
    from pforte.contacts import export as subject_export
    from pforte.i18n import LOCALES

    _one_of(contact, phone)
    if lang is not None and lang not in LOCALES:
        clikit.fail(f"--lang must be one of {', '.join(LOCALES)}")
    if out.exists():
        clikit.fail(f"{out} exists; choose another --out")
    if not out.parent.is_dir():
        clikit.fail(f"directory {out.parent} does not exist")
    settings = clikit.settings()
    language = lang or settings.default_locale

    async def _do(sv: Any) -> tuple[int, int, int]:
        created = False
        try:
            async with sv.db.transaction() as session:
                org_id, c = await _find(session, sv, org, contact, phone)
                now = sv.clock.now()
                data = await subject_export.collect(
                    session=session, keys=sv.keys, org_id=org_id, contact_id=c.id, now=now
                )
                # The file first, the audit entry last: the entry commits only with a complete file,
                # and on SQLite the write lock is held for the entry alone, not for the whole export.
                chunks = subject_export.stream(data, blobs=sv.blobs, lang=language, tz=DISPLAY_TZ)
                await asyncio.to_thread(_write_new_file, out, chunks)
                created = True
                await subject_export.record(session, data, actor=CLI, now=now)
        except BaseException:
            if created:  # no file without its audit entry
                await asyncio.to_thread(out.unlink, True)
            raise
        return len(data.conversations), data.messages, data.files

    try:
        n_conv, n_msg, n_files = clikit.run(settings, _do)
    except FileExistsError:
        clikit.fail(f"{out} exists; choose another --out")
    except OSError as exc:
        clikit.fail(f"cannot write {out}: {exc.strerror or type(exc).__name__}")
    typer.echo(f"{out}: {n_conv} conversations, {n_msg} messages, {n_files} files")
