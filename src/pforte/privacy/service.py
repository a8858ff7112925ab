"""Privacy notices, the consent ledger and the staff-send gate. Services never commit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.channels.kinds import ends_at_own_server
from pforte.channels.models import Channel
from pforte.contacts.models import Contact
from pforte.db import read_locked
from pforte.errors import ConflictError, NotFoundError, ValidationError
from pforte.orgs import service as orgs
from pforte.orgs.models import Organisation
from pforte.privacy.models import ConsentEvent, PrivacyNotice
from pforte.privacy.policy import OrgPrivacy, SendBlock, staff_send_block

NOTICE_MAX = 20_000


class ConsentBlockedError(ConflictError):
    """Staff may not send to this patient now; ``code`` says why (consent_*, channel_not_own_server)."""

    def __init__(self, block: SendBlock) -> None:
        super().__init__(block.reason, code=block.code)


async def current_notice(session: AsyncSession, *, org_id: str) -> PrivacyNotice | None:
    """The newest published notice of an organisation, or None."""
    return (
        await session.execute(
            select(PrivacyNotice)
            .where(PrivacyNotice.org_id == org_id)
            .order_by(PrivacyNotice.version.desc())
            .limit(1)
        )
    ).scalar_one_or_none()


async def list_notices(session: AsyncSession, *, org_id: str) -> list[PrivacyNotice]:
    """Every published version, newest first."""
    return list(
        (
            await session.execute(
                select(PrivacyNotice)
                .where(PrivacyNotice.org_id == org_id)
                .order_by(PrivacyNotice.version.desc())
            )
        ).scalars()
    )


async def publish_notice(
    session: AsyncSession, *, org_id: str, body_de: str, body_en: str, actor: Actor, now: datetime
) -> PrivacyNotice:
    """Publish a new version; patients get it with their next message. Identical text is refused."""
    body_de, body_en = body_de.strip().replace("\r\n", "\n"), body_en.strip().replace("\r\n", "\n")
    if not body_de or not body_en:
        raise ValidationError("the notice needs a German and an English text", code="notice_empty")
    if len(body_de) > NOTICE_MAX or len(body_en) > NOTICE_MAX:
        raise ValidationError(
            f"a notice text may have at most {NOTICE_MAX} characters", code="notice_too_long"
        )
    await read_locked(session, select(Organisation.id).where(Organisation.id == org_id))
    latest = await current_notice(session, org_id=org_id)
    if latest is not None and latest.body_de == body_de and latest.body_en == body_en:
        raise ConflictError("this text is already the current version", code="notice_unchanged")
    notice = PrivacyNotice(
        org_id=org_id,
        version=(latest.version if latest else 0) + 1,
        body_de=body_de,
        body_en=body_en,
        created_by=actor.id if actor.kind == "staff" else None,
        created_at=now,
    )
    session.add(notice)
    await session.flush()
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="privacy.notice_published",
        now=now,
        object_kind="privacy_notice",
        object_id=notice.id,
        details={"version": notice.version},
    )
    return notice


def org_privacy_from(settings: dict[str, Any] | None, version: int | None) -> OrgPrivacy:
    """The chat policy's view of an organisation: its settings JSON and current notice version."""

    def get(name: str) -> Any:
        return (settings or {}).get(name, orgs.DEFAULT_SETTINGS[name])

    return OrgPrivacy(
        notice_version=version,
        consent_required=bool(get("consent_required")),
        notice_keywords=tuple(get("notice_keywords")),
        withdraw_keywords=tuple(get("withdraw_keywords")),
    )


async def record(
    session: AsyncSession,
    *,
    contact: Contact,
    state: str,
    version: int | None,
    via: str,
    now: datetime,
    actor: Actor,
    channel_id: str | None = None,
    conversation_id: str | None = None,
    message_id: str | None = None,
    external_id: str | None = None,
) -> ConsentEvent:
    """Append a ledger entry, move the contact's current state (for consent states) and audit it."""
    event = ConsentEvent(
        org_id=contact.org_id,
        contact_id=contact.id,
        channel_id=channel_id,
        conversation_id=conversation_id,
        state=state,
        notice_version=version,
        via=via,
        message_id=message_id,
        external_id=external_id,
        at=now,
    )
    session.add(event)
    if state == "notice_sent":
        contact.notice_version_sent = version
    else:
        contact.consent_state, contact.consent_version, contact.consent_at = state, version, now
    await session.flush()
    await audit.record(
        session,
        org_id=contact.org_id,
        actor=actor,
        action=f"consent.{state}",
        now=now,
        object_kind="contact",
        object_id=contact.id,
        details={"version": version, "via": via, "message_id": message_id},
    )
    return event


async def history(session: AsyncSession, *, org_id: str, contact_id: str) -> list[ConsentEvent]:
    """The consent ledger of one patient, oldest first."""
    return list(
        (
            await session.execute(
                select(ConsentEvent)
                .where(ConsentEvent.org_id == org_id, ConsentEvent.contact_id == contact_id)
                .order_by(ConsentEvent.at, ConsentEvent.id)
            )
        ).scalars()
    )


def send_block(org: Organisation, contact: Contact, channel: Channel) -> SendBlock | None:
    """Why staff may not send to this contact over this channel, or None."""
    return staff_send_block(
        consent_required=bool(orgs.setting(org, "consent_required")),
        consent_state=contact.consent_state,
        own_server_only=bool(orgs.setting(org, "own_server_encryption_only")),
        encryption_ends_at_own_server=ends_at_own_server(channel.kind),
    )


async def check_staff_may_send(
    session: AsyncSession, *, org_id: str, contact: Contact, channel: Channel
) -> None:
    """Raise ConsentBlockedError when a staff message must not go out (called before anything is queued)."""
    org = await orgs.get(session=session, org_id=org_id)
    block = send_block(org, contact, channel)
    if block is not None:
        raise ConsentBlockedError(block)


@dataclass(frozen=True, slots=True)
class ConsentView:
    """What the conversation page shows about a patient's consent."""

    state: str
    version: int | None
    at: datetime | None
    notice_version_sent: int | None
    current_version: int | None
    block: SendBlock | None


async def consent_view(
    session: AsyncSession, *, org_id: str, contact_id: str, channel_id: str
) -> ConsentView:
    """The consent state of a conversation's patient and whether staff may send there."""
    org = await orgs.get(session=session, org_id=org_id)
    contact = await session.get(Contact, contact_id)
    channel = await session.get(Channel, channel_id)
    if contact is None or channel is None or contact.org_id != org_id:
        raise NotFoundError("conversation not found")
    version = (
        await session.execute(select(func.max(PrivacyNotice.version)).where(PrivacyNotice.org_id == org_id))
    ).scalar_one_or_none()
    return ConsentView(
        state=contact.consent_state,
        version=contact.consent_version,
        at=contact.consent_at,
        notice_version_sent=contact.notice_version_sent,
        current_version=version,
        block=send_block(org, contact, channel),
    )
