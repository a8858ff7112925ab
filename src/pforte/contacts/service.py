"""Patients: look-ups inside one organisation, by id, by conversation and by phone (blind index).

An erased contact (``erased_at`` set: its data key is destroyed, its rows wait for the clean-up) is
invisible here: every function treats it as not found. Services never commit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.contacts.models import Contact
from pforte.conversations.models import Attachment, Conversation, Message
from pforte.crypto.blind_index import blind_index, normalise_phone
from pforte.crypto.keys import KeyService
from pforte.db import Executor, read_locked
from pforte.errors import ConflictError, NotFoundError, ValidationError
from pforte.orgs.models import Organisation

# What people type around a number: "+49 (151) 123-45/67" or "0049 151 …". Letters are refused.
_PHONE_CHARS = re.compile(r"^\+?[0-9 ()./-]+$")


def parse_phone(phone: str) -> str:
    """The digits of an international phone number (as WhatsApp's wa_id has them), else ValidationError."""
    text = phone.strip()
    if not _PHONE_CHARS.match(text):
        raise ValidationError("not a phone number: give it in international form, e.g. +49 151 …")
    digits = normalise_phone(text)
    if digits.startswith("0"):
        raise ValidationError("give the phone number in international form with its country code (+49 …)")
    if not 7 <= len(digits) <= 15:
        raise ValidationError("not a phone number: an international number has 7 to 15 digits")
    return digits


async def lock(db: Executor, contact_ids: Iterable[str], mode: str = "update") -> list[str]:
    """Lock patients' rows (in id order); returns the ids that still exist.

    A patient's row is the lock for their data as a whole (docs/scaling.md, "Concurrent
    transactions"): every deletion of a patient's data locks it ("update") before it reads the
    holds, placing a hold locks it ("no_key_update") before it checks its target, and the ingest
    read-locks it ("key_share") when it finds the patient of a new message. So a deletion never
    misses a hold placed at the same moment, and a message never lands on a patient being erased.
    """
    ids = sorted(set(contact_ids))
    if not ids:
        return []
    q = select(Contact.id).where(Contact.id.in_(ids)).order_by(Contact.id)
    return [str(i) for i in (await read_locked(db, q, mode)).scalars()]


async def get(*, session: AsyncSession, org_id: str, contact_id: str) -> Contact:
    """One visible contact of the organisation; NotFoundError otherwise (also for another org's)."""
    contact = (
        await session.execute(
            select(Contact).where(
                Contact.id == contact_id, Contact.org_id == org_id, Contact.erased_at.is_(None)
            )
        )
    ).scalar_one_or_none()
    if contact is None:
        raise NotFoundError("contact not found")
    return contact


async def get_by_conversation(*, session: AsyncSession, org_id: str, conversation_id: str) -> Contact:
    """The visible contact a conversation of the organisation belongs to."""
    contact = (
        await session.execute(
            select(Contact)
            .join(Conversation, Conversation.contact_id == Contact.id)
            .where(
                Conversation.id == conversation_id,
                Conversation.org_id == org_id,
                Contact.org_id == org_id,
                Contact.erased_at.is_(None),
            )
        )
    ).scalar_one_or_none()
    if contact is None:
        raise NotFoundError("conversation not found")
    return contact


async def list_by_phone(*, session: AsyncSession, keys: KeyService, org_id: str, phone: str) -> list[Contact]:
    """Visible contacts with this phone number (through the blind index), newest first."""
    digits = parse_phone(phone)
    index_key_id = (
        await session.execute(select(Organisation.index_key_id).where(Organisation.id == org_id))
    ).scalar_one_or_none()
    if index_key_id is None:
        raise NotFoundError("organisation not found")
    token = blind_index(await keys.raw_key(session, index_key_id), "phone", digits)
    return list(
        (
            await session.execute(
                select(Contact)
                .where(Contact.org_id == org_id, Contact.phone_index == token, Contact.erased_at.is_(None))
                .order_by(Contact.created_at.desc(), Contact.id.desc())
            )
        ).scalars()
    )


async def get_by_phone(*, session: AsyncSession, keys: KeyService, org_id: str, phone: str) -> Contact:
    """The one visible contact with this phone number; NotFoundError if none, ConflictError if several."""
    found = await list_by_phone(session=session, keys=keys, org_id=org_id, phone=phone)
    if not found:
        raise NotFoundError("no contact with this phone number in the organisation")
    if len(found) > 1:
        raise ConflictError(
            f"{len(found)} contacts have this phone number; choose one by id (pforte contact show)",
            code="ambiguous",
        )
    return found[0]


async def counts(*, session: AsyncSession, contact_id: str) -> dict[str, int]:
    """How many conversations, messages and attachments a contact has (no content)."""
    n_conv = (
        await session.execute(
            select(func.count()).select_from(Conversation).where(Conversation.contact_id == contact_id)
        )
    ).scalar_one()
    n_msg = (
        await session.execute(
            select(func.count()).select_from(Message).where(Message.contact_id == contact_id)
        )
    ).scalar_one()
    n_att = (
        await session.execute(
            select(func.count()).select_from(Attachment).where(Attachment.contact_id == contact_id)
        )
    ).scalar_one()
    return {"conversations": int(n_conv), "messages": int(n_msg), "attachments": int(n_att)}
