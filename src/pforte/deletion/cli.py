"""``pforte delete``: targeted and general deletion from the command line (audited as ``cli``)."""

from __future__ import annotations

from typing import Any

import typer

from pforte import clikit
from pforte.audit.service import CLI
from pforte.deletion import service
from pforte.orgs import service as orgs
from pforte.retention import sweeper

delete_app = typer.Typer(
    no_args_is_help=True, help="Delete messages, attachments, conversations, contacts, organisations"
)

REASON = typer.Option("staff", help="staff | erasure_request (Art. 17)")


def _delete(org: str, kind: str, object_id: str, reason: str) -> None:
    async def _do(sv: Any) -> service.Deleted:
        now = sv.clock.now()
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            fn: Any = {
                "message": service.delete_message,
                "attachment": service.delete_attachment,
                "conversation": service.delete_conversation,
            }.get(kind)
            if fn is not None:
                key = f"{kind}_id"
                return await fn(
                    session, sv.eraser, org_id=o.id, actor=CLI, reason=reason, now=now, **{key: object_id}
                )
            done = await service.erase_contact(
                session, sv.eraser, org_id=o.id, contact_id=object_id, actor=CLI, reason=reason, now=now
            )
        await sweeper.purge_erased(sv.db, sv.eraser, report=sweeper.SweepReport())
        return done

    done = clikit.run(clikit.settings(), _do)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(done.counts.items()))
    typer.echo(f"deleted {done.kind} {done.object_id}" + (f" ({counts})" if counts else ""))


@delete_app.command("message")
def message(
    org: str = typer.Option(..., help="organisation slug"),
    message_id: str = typer.Argument(...),
    reason: str = REASON,
) -> None:
    """Delete one message with its attachments."""
    _delete(org, "message", message_id, reason)


@delete_app.command("attachment")
def attachment(
    org: str = typer.Option(..., help="organisation slug"),
    attachment_id: str = typer.Argument(...),
    reason: str = REASON,
) -> None:
    """Delete one attachment's file; the message stays."""
    _delete(org, "attachment", attachment_id, reason)


@delete_app.command("conversation")
def conversation(
    org: str = typer.Option(..., help="organisation slug"),
    conversation_id: str = typer.Argument(...),
    reason: str = REASON,
) -> None:
    """Delete a conversation with all its messages."""
    _delete(org, "conversation", conversation_id, reason)


@delete_app.command("contact")
def contact(
    org: str = typer.Option(..., help="organisation slug"),
    contact_id: str = typer.Argument(...),
    reason: str = REASON,
) -> None:
    """Erase a patient: destroy the data key (crypto-shredding), then remove every row and file."""
    _delete(org, "contact", contact_id, reason)


@delete_app.command("organisation")
def organisation(
    slug: str = typer.Argument(..., help="organisation slug"),
    confirm: str = typer.Option(..., help="repeat the slug to confirm"),
) -> None:
    """Erase everything of an organisation: its keys, rows, files and its KEK."""
    if confirm != slug:
        clikit.fail("--confirm must repeat the organisation's slug")

    async def _do(sv: Any) -> service.Deleted:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=slug)
            done, kek_ids = await service.delete_organisation(
                session, sv.eraser, org_id=o.id, actor=CLI, reason="organisation_closed", now=sv.clock.now()
            )
        for kek_id in kek_ids:
            sv.keys.provider.destroy_kek(kek_id)
        return done

    done = clikit.run(clikit.settings(), _do)
    typer.echo(
        f"deleted organisation {slug}: " + ", ".join(f"{k} {v}" for k, v in sorted(done.counts.items()))
    )
