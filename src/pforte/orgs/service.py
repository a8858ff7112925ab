"""Organisations: creation with their own KEK and keys, lookup, settings."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.crypto.keys import KeyService
from pforte.crypto.models import DataKey
from pforte.db import take_write_lock
from pforte.errors import ConflictError, NotFoundError, ValidationError
from pforte.orgs.models import Organisation

DEFAULT_SETTINGS: dict[str, Any] = {
    "send_read_receipts": False,  # privacy by default: patients see no read receipts unless enabled
    "link_previews": False,
    # Retention (I.7, IV.8): on by default, conversations go 180 days after their last activity.
    "retention_enabled": True,
    "retention_days": 180,
    # Metadata minimisation (II.3): days each class of organisation metadata is kept.
    "metadata_days": {"delivery_timestamps": 7, "webhook_metadata": 7, "job_records": 7},
    # Privacy in the chat (I.1, Art. 9(2)(a)): staff send nothing before the patient consents.
    "consent_required": True,
    "notice_keywords": ["datenschutz", "privacy"],
    "withdraw_keywords": ["stop", "stopp", "widerruf"],
    # II.1: when on, staff may send only over channels whose encryption ends at our own server.
    "own_server_encryption_only": False,
    # II.2: minutes to wait for a missing "(x/y)" part of an incoming sequence before flagging the gap.
    "incoming_parts_wait_minutes": 10,
}
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


async def create(
    *, session: AsyncSession, keys: KeyService, name: str, slug: str, now: datetime
) -> Organisation:
    """Create an organisation with a new KEK, an org data key and a blind-index key."""
    if not _SLUG.match(slug):
        raise ValidationError("slug must be 2-63 lower-case letters, digits or dashes")
    if not name.strip():
        raise ValidationError("name must not be empty")
    if await find_by_slug(session=session, slug=slug):
        raise ConflictError("an organisation with this slug exists")
    kek_id = keys.provider.create_kek()
    org = Organisation(
        name=name.strip(),
        slug=slug,
        kek_id=kek_id,
        org_key_id="",
        index_key_id="",
        settings=dict(DEFAULT_SETTINGS),
        created_at=now,
    )
    session.add(org)
    await session.flush()
    org_key, _ = keys.new_data_key(org_id=org.id, kek_id=kek_id, purpose="org", now=now)
    index_key, _ = keys.new_data_key(org_id=org.id, kek_id=kek_id, purpose="blind_index", now=now)
    await session.execute(insert(DataKey), [org_key, index_key])
    org.org_key_id = org_key["id"]
    org.index_key_id = index_key["id"]
    await session.flush()
    return org


async def get(*, session: AsyncSession, org_id: str, for_update: bool = False) -> Organisation:
    """One organisation by id; ``for_update`` to change it: the row is locked and read afresh.

    Settings are one JSON value rewritten whole, so a change must start from the row as it is
    now; two admins saving different settings at once each kept only their own otherwise.
    """
    if for_update:
        await take_write_lock(session)  # SQLite; PostgreSQL locks the row
    org = await session.get(Organisation, org_id, with_for_update=for_update, populate_existing=for_update)
    if org is None:
        raise NotFoundError("organisation not found")
    return org


async def find_by_slug(*, session: AsyncSession, slug: str) -> Organisation | None:
    """One organisation by slug, or None."""
    return (await session.execute(select(Organisation).where(Organisation.slug == slug))).scalar_one_or_none()


async def get_by_slug(*, session: AsyncSession, slug: str) -> Organisation:
    """One organisation by slug; NotFoundError if there is none."""
    org = await find_by_slug(session=session, slug=slug)
    if org is None:
        raise NotFoundError("organisation not found")
    return org


async def list_(*, session: AsyncSession) -> list[Organisation]:
    """All organisations."""
    return list((await session.execute(select(Organisation).order_by(Organisation.slug))).scalars())


def setting(org: Organisation, name: str) -> Any:
    """An organisation setting with its default."""
    return (org.settings or {}).get(name, DEFAULT_SETTINGS.get(name))


async def update_settings(
    *, session: AsyncSession, org_id: str, changes: dict[str, Any], actor: Actor, now: datetime
) -> Organisation:
    """Change known settings (type-checked against the defaults) and audit before/after."""
    org = await get(session=session, org_id=org_id, for_update=True)
    before: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in DEFAULT_SETTINGS:
            raise ValidationError(f"unknown setting {name!r}")
        default = DEFAULT_SETTINGS[name]
        if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, type(default)):
            raise ValidationError(f"setting {name!r} must be of type {type(default).__name__}")
        before[name] = setting(org, name)
    org.settings = {**(org.settings or {}), **changes}
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="settings.update",
        now=now,
        details={"before": before, "after": changes},
    )
    return org
