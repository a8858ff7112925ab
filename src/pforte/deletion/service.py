"""Deleting patient data so that it is gone: targeted, general, and provably.

Deleting is the most dangerous thing pforte does, so every path here follows the same order:

1. **Refuse early.** The object must belong to the caller's organisation and no active hold
   (legal hold, "treatment-relevant, not yet documented", …) may cover it or anything it contains.
   A refusal names the hold's kind and changes nothing. The patient's row is locked before the
   holds are read (:func:`pforte.contacts.service.lock`) and placing a hold locks it too, so a
   hold placed at the same moment is either seen here or waits and then finds its target gone.
2. **Remember outside.** The ids of what goes are appended to the erasure ledger (outside the
   database and outside every backup) *before* the transaction commits, so a restore of an older
   backup erases them again. A ledger entry for a deletion that then failed only repeats a deletion
   someone asked for.
3. **Destroy the key, then the copies.** Erasing a contact first destroys its data key (one row):
   from that moment every ciphertext of the contact, backups included, is unreadable. Rows and blob
   files are removed afterwards in batches (:func:`purge_erased`), each batch its own transaction;
   blob files go before their rows, so a crash leaves at worst rows without files, never a readable
   file without a row. Other processes drop the key from their caches through a system event.
4. **Leave a tombstone and an audit entry** in the same transaction: what kind, which id, when, by
   whom, why (a reason code, never free text), and counts.

Services never commit; the caller owns the transaction. Messages, attachments and conversations
are deleted directly (their contact's key lives on); contacts and organisations are shredded.

A message split into parts ("message x of y") is one logical row plus part rows pointing to it
through ``parent_id`` (no foreign key, on purpose): :func:`_drop_message_rows`, the one place that
drops message rows by id, always takes the parts along, and deleting a part deletes the whole
message. Deletions by conversation or contact cover parts because parts share both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.contacts import service as contacts
from pforte.contacts.models import Contact
from pforte.conversations.models import Attachment, Conversation, Message
from pforte.crypto.blobs import BlobStore
from pforte.crypto.keys import KeyService
from pforte.crypto.models import DataKey
from pforte.db import Executor, new_id, read_locked, table_of
from pforte.deletion.ledger import Erasure, Ledger
from pforte.deletion.models import REASONS, Tombstone
from pforte.errors import ConflictError, NotFoundError, ValidationError
from pforte.events import KEY_DESTROYED, EventBus, LiveEvent
from pforte.orgs.models import Organisation
from pforte.retention.models import Hold


class HeldError(ConflictError):
    """Deletion refused because an active hold covers the object."""

    def __init__(self, kinds: Iterable[str]) -> None:
        self.kinds = sorted(set(kinds))
        super().__init__("deletion refused: on hold (" + ", ".join(self.kinds) + ")")


@dataclass
class Eraser:
    """What deleting needs besides the transaction: keys, blob files, the ledger, live events."""

    keys: KeyService
    blobs: BlobStore
    ledger: Ledger
    bus: EventBus | None = None

    def unlink(self, names: Iterable[str | None]) -> int:
        """Remove blob files now (before the rows; see the module's order)."""
        n = 0
        for name in names:
            if name:
                self.blobs.delete(name)
                n += 1
        return n

    def forget_keys(self, org_id: str, dek_ids: Iterable[str]) -> None:
        """Drop destroyed keys from this process's cache and tell the other processes."""
        for dek_id in dek_ids:
            self.keys.forget(dek_id)
            if self.bus is not None:
                self.bus.publish(LiveEvent(org_id=org_id, type=KEY_DESTROYED, ref=dek_id))


@dataclass(frozen=True)
class Deleted:
    """What one deletion removed (for the caller's message and the tests)."""

    kind: str
    object_id: str
    counts: dict[str, int]


def _count(result: Any) -> int:
    """Rows a DELETE or UPDATE touched."""
    return int(result.rowcount or 0)


def _check_reason(reason: str) -> None:
    if reason not in REASONS:
        raise ValidationError(f"unknown deletion reason {reason!r}; one of {', '.join(REASONS)}")


async def active_holds(
    db: Executor,
    *,
    org_id: str,
    message_ids: Iterable[str] = (),
    conversation_ids: Iterable[str] = (),
    contact_ids: Iterable[str] = (),
) -> list[str]:
    """Kinds of the active holds on any of the given objects."""
    conds = []
    for kind, ids in (("message", message_ids), ("conversation", conversation_ids), ("contact", contact_ids)):
        ids = list(ids)
        if ids:
            conds.append((Hold.target_kind == kind) & Hold.target_id.in_(ids))
    if not conds:
        return []
    rows = await db.execute(
        select(Hold.kind).where(Hold.org_id == org_id, Hold.released_at.is_(None), or_(*conds))
    )
    return [str(k) for k in rows.scalars()]


async def message_hold_kinds(db: Executor, *, org_id: str, conversation_ids: Iterable[str]) -> list[str]:
    """Kinds of the active holds on single messages inside the given conversations."""
    ids = list(conversation_ids)
    if not ids:
        return []
    rows = await db.execute(
        select(Hold.kind)
        .join(Message, (Message.id == Hold.target_id) & (Hold.target_kind == "message"))
        .where(Hold.org_id == org_id, Hold.released_at.is_(None), Message.conversation_id.in_(ids))
    )
    return [str(k) for k in rows.scalars()]


def tombstone_row(
    *,
    org_id: str,
    kind: str,
    object_id: str,
    reason: str,
    actor: Actor,
    now: datetime,
    details: dict[str, Any] | None,
) -> dict[str, Any]:
    """The values of one tombstone row (for single and bulk inserts)."""
    return {
        "id": new_id(),
        "org_id": org_id,
        "kind": kind,
        "object_id": object_id,
        "reason": reason,
        "actor_kind": actor.kind,
        "actor_id": actor.id,
        "deleted_at": now,
        "details": details,
    }


async def _tombstone(
    db: Executor,
    *,
    org_id: str,
    kind: str,
    object_id: str,
    reason: str,
    actor: Actor,
    now: datetime,
    details: dict[str, Any] | None,
    instance_chain: bool = False,
) -> None:
    row = tombstone_row(
        org_id=org_id, kind=kind, object_id=object_id, reason=reason, actor=actor, now=now, details=details
    )
    await db.execute(table_of(Tombstone).insert().values(**row))
    await audit.record(
        db,
        org_id=None if instance_chain else org_id,
        actor=actor,
        action=f"{kind}.delete",
        now=now,
        object_kind=kind,
        object_id=object_id,
        details={"reason": reason, **(details or {})},
    )


def _iso(now: datetime) -> str:
    return now.isoformat(timespec="seconds")


async def _visible_message(db: Executor, org_id: str, message_id: str) -> Any:
    """The message (for a part: the logical message it belongs to) if the organisation may see it."""
    row = (
        await db.execute(
            select(Message.id, Message.conversation_id, Message.contact_id, Message.parent_id)
            .join(Contact, Contact.id == Message.contact_id)
            .where(Message.id == message_id, Message.org_id == org_id, Contact.erased_at.is_(None))
        )
    ).first()
    if row is None:
        raise NotFoundError("message not found")
    if row.parent_id is not None:
        return await _visible_message(db, org_id, row.parent_id)
    return row


async def _locked_message(db: Executor, org_id: str, message_id: str) -> Any:
    """The visible message, read again once its patient's row is locked (contacts.lock)."""
    m = await _visible_message(db, org_id, message_id)
    await contacts.lock(db, [m.contact_id])
    return await _visible_message(db, org_id, message_id)


async def _part_ids(db: Executor, message_ids: list[str]) -> list[str]:
    """The parts of split messages among the given ones."""
    return list((await db.execute(select(Message.id).where(Message.parent_id.in_(message_ids)))).scalars())


async def _refresh_last_message(db: Executor, conversation_id: str) -> None:
    latest = (
        select(Message.id)
        .where(Message.conversation_id == conversation_id, Message.parent_id.is_(None))
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    await db.execute(
        update(Conversation).where(Conversation.id == conversation_id).values(last_message_id=latest)
    )


async def _refuse_if_held(db: Executor, org_id: str, m: Any, part_ids: Iterable[str] = ()) -> None:
    """A hold on the message (or a part), its conversation or its contact refuses the deletion, naming it."""
    holds = await active_holds(
        db,
        org_id=org_id,
        message_ids=[m.id, *part_ids],
        conversation_ids=[m.conversation_id],
        contact_ids=[m.contact_id],
    )
    if holds:
        raise HeldError(holds)


async def _drop_message_rows(db: Executor, er: Eraser, message_ids: list[str]) -> tuple[int, int]:
    """Files, then attachments, then messages with their parts (no checks, no records); (messages, files)."""
    message_ids = list(message_ids) + await _part_ids(db, message_ids)
    blobs = (
        await db.execute(select(Attachment.blob_name).where(Attachment.message_id.in_(message_ids)))
    ).scalars()
    files = er.unlink(blobs)
    await db.execute(delete(Attachment).where(Attachment.message_id.in_(message_ids)))
    return _count(await db.execute(delete(Message).where(Message.id.in_(message_ids)))), files


async def _forget_attachment(db: Executor, er: Eraser, attachment_id: str, blob_name: str | None) -> int:
    """Remove an attachment's file and everything naming it; the row stays as "deleted"."""
    files = er.unlink([blob_name])
    await db.execute(
        update(Attachment)
        .where(Attachment.id == attachment_id)
        .values(state="deleted", blob_name=None, filename_enc=None, media_id=None, expected_sha256=None)
    )
    return files


async def delete_message(
    db: Executor, er: Eraser, *, org_id: str, message_id: str, actor: Actor, reason: str, now: datetime
) -> Deleted:
    """Delete one message with its attachments and their files."""
    _check_reason(reason)
    m = await _locked_message(db, org_id, message_id)
    parts = await _part_ids(db, [m.id])
    await _refuse_if_held(db, org_id, m, parts)
    atts = (
        await db.execute(select(Attachment.id, Attachment.blob_name).where(Attachment.message_id == m.id))
    ).all()
    er.ledger.append(
        [Erasure("message", i, org_id, _iso(now)) for i in (m.id, *parts)]
        + [Erasure("attachment", a.id, org_id, _iso(now)) for a in atts]
    )
    _, files = await _drop_message_rows(db, er, [m.id])
    await _refresh_last_message(db, m.conversation_id)
    counts = {"attachments": len(atts), "files": files}
    if parts:
        counts["parts"] = len(parts)
    await _tombstone(
        db,
        org_id=org_id,
        kind="message",
        object_id=m.id,
        reason=reason,
        actor=actor,
        now=now,
        details={"conversation_id": m.conversation_id, **counts},
    )
    return Deleted("message", m.id, counts)


async def delete_attachment(
    db: Executor, er: Eraser, *, org_id: str, attachment_id: str, actor: Actor, reason: str, now: datetime
) -> Deleted:
    """Delete one attachment's file and name; the message stays and shows "attachment deleted"."""
    _check_reason(reason)
    q = select(Attachment.id, Attachment.message_id, Attachment.blob_name, Attachment.state).where(
        Attachment.id == attachment_id, Attachment.org_id == org_id
    )
    a = (await db.execute(q)).first()
    if a is None or a.state == "deleted":
        raise NotFoundError("attachment not found")
    m = await _locked_message(db, org_id, a.message_id)
    a = (await db.execute(q)).first()  # as it is now, under the lock
    if a is None or a.state == "deleted":
        raise NotFoundError("attachment not found")
    await _refuse_if_held(db, org_id, m)
    er.ledger.append([Erasure("attachment", a.id, org_id, _iso(now))])
    files = await _forget_attachment(db, er, a.id, a.blob_name)
    await _tombstone(
        db,
        org_id=org_id,
        kind="attachment",
        object_id=a.id,
        reason=reason,
        actor=actor,
        now=now,
        details={"message_id": m.id, "files": files},
    )
    return Deleted("attachment", a.id, {"files": files})


async def _drop_conversation_rows(db: Executor, er: Eraser, conversation_ids: list[str]) -> dict[str, int]:
    """Files first, then attachments, messages and the conversations (no checks, no records)."""
    if not conversation_ids:
        return {"messages": 0, "attachments": 0, "files": 0}
    blobs = (
        await db.execute(
            select(Attachment.blob_name)
            .join(Message, Message.id == Attachment.message_id)
            .where(Message.conversation_id.in_(conversation_ids))
        )
    ).scalars()
    files = er.unlink(blobs)
    msg_ids = select(Message.id).where(Message.conversation_id.in_(conversation_ids))
    n_att = _count(await db.execute(delete(Attachment).where(Attachment.message_id.in_(msg_ids))))
    n_msg = _count(await db.execute(delete(Message).where(Message.conversation_id.in_(conversation_ids))))
    await db.execute(delete(Conversation).where(Conversation.id.in_(conversation_ids)))
    return {"messages": int(n_msg or 0), "attachments": int(n_att or 0), "files": files}


async def delete_conversation(
    db: Executor,
    er: Eraser,
    *,
    org_id: str,
    conversation_id: str,
    actor: Actor,
    reason: str,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> Deleted:
    """Delete a conversation with all its messages and attachments; the contact stays."""
    _check_reason(reason)
    q = (
        select(Conversation.id, Conversation.contact_id)
        .join(Contact, Contact.id == Conversation.contact_id)
        .where(Conversation.id == conversation_id, Conversation.org_id == org_id, Contact.erased_at.is_(None))
    )
    c: Any = (await db.execute(q)).first()
    if c is not None:
        await contacts.lock(db, [c.contact_id])
        # Locked too: a reply being stored in it finishes first and is deleted (and counted) here,
        # instead of going uncounted in the conversation's cascade.
        c = (await read_locked(db, q)).first()
    if c is None:
        raise NotFoundError("conversation not found")
    holds = await active_holds(db, org_id=org_id, conversation_ids=[c.id], contact_ids=[c.contact_id])
    holds += await message_hold_kinds(db, org_id=org_id, conversation_ids=[c.id])
    if holds:
        raise HeldError(holds)
    er.ledger.append([Erasure("conversation", c.id, org_id, _iso(now))])
    counts = await _drop_conversation_rows(db, er, [c.id])
    await _tombstone(
        db,
        org_id=org_id,
        kind="conversation",
        object_id=c.id,
        reason=reason,
        actor=actor,
        now=now,
        details={"contact_id": c.contact_id, **counts, **(details or {})},
    )
    return Deleted("conversation", c.id, counts)


async def erase_contact(
    db: Executor,
    er: Eraser,
    *,
    org_id: str,
    contact_id: str,
    actor: Actor,
    reason: str,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> Deleted:
    """Crypto-shred a contact: destroy its data key, hide it; :func:`purge_erased` removes the rows.

    The cost does not depend on how many messages the contact has.
    """
    _check_reason(reason)
    await contacts.lock(db, [contact_id])
    c = (
        await db.execute(
            select(Contact.id, Contact.dek_id).where(
                Contact.id == contact_id, Contact.org_id == org_id, Contact.erased_at.is_(None)
            )
        )
    ).first()
    if c is None:
        raise NotFoundError("contact not found")
    conv_ids = list(
        (await db.execute(select(Conversation.id).where(Conversation.contact_id == c.id))).scalars()
    )
    holds = await active_holds(db, org_id=org_id, contact_ids=[c.id], conversation_ids=conv_ids)
    holds += await message_hold_kinds(db, org_id=org_id, conversation_ids=conv_ids)
    if holds:
        raise HeldError(holds)
    er.ledger.append(
        [Erasure("data_key", c.dek_id, org_id, _iso(now)), Erasure("contact", c.id, org_id, _iso(now))]
    )
    await db.execute(update(DataKey).where(DataKey.id == c.dek_id).values(wrapped=None, destroyed_at=now))
    await db.execute(
        update(Contact)
        .where(Contact.id == c.id)
        .values(
            erased_at=now,
            bsuid_index=None,
            phone_index=None,
            bsuid_enc=None,
            phone_enc=None,
            name_enc=None,
            profile_name_enc=None,
            username_enc=None,
        )
    )
    await _tombstone(
        db,
        org_id=org_id,
        kind="contact",
        object_id=c.id,
        reason=reason,
        actor=actor,
        now=now,
        details={"conversations": len(conv_ids), **(details or {})},
    )
    er.forget_keys(org_id, [c.dek_id])
    return Deleted("contact", c.id, {"conversations": len(conv_ids)})


async def erased_contacts(db: Executor, limit: int = 100) -> list[str]:
    """Contacts whose key is destroyed but whose rows are not yet removed."""
    rows = await db.execute(select(Contact.id).where(Contact.erased_at.is_not(None)).limit(limit))
    return [str(r) for r in rows.scalars()]


async def purge_erased_step(db: Executor, er: Eraser, contact_id: str, batch: int = 500) -> tuple[bool, int]:
    """One batch of the physical clean-up of an erased contact.

    Removes up to ``batch`` conversations' worth of rows (messages in chunks), or, when none are
    left, the contact and its key row. Returns (finished, rows removed). Run each step in its own
    transaction; a crash between steps leaves a consistent state the next step continues from.
    """
    conv = (
        await db.execute(select(Conversation.id).where(Conversation.contact_id == contact_id).limit(1))
    ).scalar()
    if conv is not None:
        msg_ids = list(
            (
                await db.execute(select(Message.id).where(Message.conversation_id == conv).limit(batch))
            ).scalars()
        )
        if msg_ids:
            n, _ = await _drop_message_rows(db, er, msg_ids)
            return False, n
        await db.execute(delete(Conversation).where(Conversation.id == conv))
        return False, 1
    dek = (await db.execute(select(Contact.dek_id).where(Contact.id == contact_id))).scalar()
    await db.execute(delete(Attachment).where(Attachment.contact_id == contact_id))
    await db.execute(delete(Message).where(Message.contact_id == contact_id))
    await db.execute(delete(Contact).where(Contact.id == contact_id))
    if dek is not None:
        await db.execute(delete(DataKey).where(DataKey.id == dek))
    return True, 1


async def organisation_holds(db: Executor, org_id: str) -> list[str]:
    """Kinds of every active hold in an organisation."""
    rows = await db.execute(select(Hold.kind).where(Hold.org_id == org_id, Hold.released_at.is_(None)))
    return [str(k) for k in rows.scalars()]


async def delete_organisation(
    db: Executor, er: Eraser, *, org_id: str, actor: Actor, reason: str, now: datetime
) -> tuple[Deleted, list[str]]:
    """Shred everything of an organisation: every data key, then every row and file.

    Returns the deletion and the ids of every KEK the organisation used (the current one and any
    left from an unfinished rotation), which the caller destroys in the key provider after commit
    (a KEK removed before a failed commit would leave the rest unreadable but present).
    """
    _check_reason(reason)
    org = (
        await read_locked(db, select(Organisation.id, Organisation.kek_id).where(Organisation.id == org_id))
    ).first()
    if org is None:
        raise NotFoundError("organisation not found")
    holds = await organisation_holds(db, org_id)
    if holds:
        raise HeldError(holds)
    deks = list((await db.execute(select(DataKey.id).where(DataKey.org_id == org_id))).scalars())
    keks = {str(org.kek_id)} | {
        str(k)
        for k in (
            await db.execute(select(DataKey.kek_id).where(DataKey.org_id == org_id).distinct())
        ).scalars()
    }
    er.ledger.append(
        [Erasure("data_key", d, org_id, _iso(now)) for d in deks]
        + [Erasure("organisation", org_id, org_id, _iso(now))]
    )
    await db.execute(update(DataKey).where(DataKey.org_id == org_id).values(wrapped=None, destroyed_at=now))
    er.forget_keys(org_id, deks)
    counts = {
        "contacts": int(
            (
                await db.execute(select(func.count()).select_from(Contact).where(Contact.org_id == org_id))
            ).scalar()
            or 0
        ),
        "messages": int(
            (
                await db.execute(select(func.count()).select_from(Message).where(Message.org_id == org_id))
            ).scalar()
            or 0
        ),
    }
    blobs = (await db.execute(select(Attachment.blob_name).where(Attachment.org_id == org_id))).scalars()
    counts["files"] = er.unlink(blobs)
    await _drop_org_rows(db, org_id)
    await _tombstone(
        db,
        org_id=org_id,
        kind="organisation",
        object_id=org_id,
        reason=reason,
        actor=actor,
        now=now,
        details=counts,
        instance_chain=True,
    )
    return Deleted("organisation", org_id, counts), sorted(keks)


async def _drop_org_rows(db: Executor, org_id: str) -> None:
    """Delete the organisation row; foreign keys cascade to everything it owns."""
    # Children first where a foreign key does not cascade (messages → staff sender, contacts → keys).
    await db.execute(delete(Attachment).where(Attachment.org_id == org_id))
    await db.execute(delete(Message).where(Message.org_id == org_id))
    await db.execute(delete(Conversation).where(Conversation.org_id == org_id))
    await db.execute(delete(Contact).where(Contact.org_id == org_id))
    await db.execute(delete(Organisation).where(Organisation.id == org_id))


async def reapply(db: Executor, er: Eraser, entries: Iterable[Erasure]) -> dict[str, int]:
    """Erase again what the ledger names (after a restore); silent about what is already gone."""
    done: dict[str, int] = {}

    def bump(kind: str, n: int) -> None:
        if n:
            done[kind] = done.get(kind, 0) + n

    for e in entries:
        if e.kind == "data_key":
            result = await db.execute(
                update(DataKey)
                .where(DataKey.id == e.id, DataKey.wrapped.is_not(None))
                .values(wrapped=None, destroyed_at=func.coalesce(DataKey.destroyed_at, DataKey.created_at))
            )
            bump("data_key", _count(result))
        elif e.kind == "contact":
            exists = (await db.execute(select(Contact.id).where(Contact.id == e.id))).scalar()
            if exists:
                conv_ids = list(
                    (
                        await db.execute(select(Conversation.id).where(Conversation.contact_id == e.id))
                    ).scalars()
                )
                await _drop_conversation_rows(db, er, conv_ids)
                finished = False
                while not finished:
                    finished, _ = await purge_erased_step(db, er, e.id)
                bump("contact", 1)
        elif e.kind == "conversation":
            if await _exists(db, Conversation, e.id):
                await _drop_conversation_rows(db, er, [e.id])
                bump("conversation", 1)
        elif e.kind == "message":
            if await _exists(db, Message, e.id):
                await _drop_message_rows(db, er, [e.id])
                bump("message", 1)
        elif e.kind == "attachment":
            row = (
                await db.execute(select(Attachment.blob_name, Attachment.state).where(Attachment.id == e.id))
            ).first()
            if row is not None and row.state != "deleted":
                await _forget_attachment(db, er, e.id, row.blob_name)
                bump("attachment", 1)
        elif e.kind == "organisation":
            if await _exists(db, Organisation, e.id):
                er.unlink(
                    (
                        await db.execute(select(Attachment.blob_name).where(Attachment.org_id == e.id))
                    ).scalars()
                )
                await _drop_org_rows(db, e.id)
                bump("organisation", 1)
    return done


async def _exists(db: Executor, model: Any, object_id: str) -> bool:
    return (await db.execute(select(model.id).where(model.id == object_id))).scalar() is not None


async def tombstones(db: Executor, *, org_id: str, limit: int = 200) -> list[Tombstone]:
    """An organisation's tombstones, newest first."""
    if not isinstance(db, AsyncSession):
        raise TypeError("tombstones needs an ORM session")
    q = select(Tombstone).where(Tombstone.org_id == org_id).order_by(Tombstone.deleted_at.desc()).limit(limit)
    return list((await db.execute(q)).scalars())
