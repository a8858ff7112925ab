"""Conversations for the inbox: list, open, send (text, reply, template, media), mark read.

Services never commit. A staff send writes the message row and its outbox job in the caller's
transaction (DESIGN 5, persist then send); the network call happens later in the outbox worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.channels.models import Channel
from pforte.contacts.models import Contact
from pforte.conversations.models import Attachment, Conversation, Message, MessageTemplate
from pforte.crypto.blobs import BlobStore
from pforte.crypto.envelope import FieldCipher
from pforte.crypto.keys import KeyService
from pforte.db import new_id
from pforte.errors import ConflictError, NotFoundError, ValidationError
from pforte.orgs import service as orgs
from pforte.orgs.models import Organisation
from pforte.outbox import service as outbox

WINDOW = timedelta(hours=24)
TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
OUTBOUND_MEDIA = {
    "image/jpeg": "image",
    "image/png": "image",
    "application/pdf": "document",
    "text/plain": "document",
}


@dataclass(frozen=True, slots=True)
class ConversationRow:
    """One line of the inbox list."""

    id: str
    contact_name: str
    channel_name: str
    channel_state: str
    unread_count: int
    last_activity_at: datetime
    last_direction: str | None
    last_status: str | None
    window_open: bool
    window_ends_at: datetime | None


@dataclass(frozen=True, slots=True)
class AttachmentView:
    """An attachment as the conversation view shows it."""

    id: str
    kind: str
    mime_type: str | None
    filename: str | None
    state: str  # pending | stored | failed
    error_reason: str | None
    size: int | None


@dataclass(frozen=True, slots=True)
class MessageView:
    """A decrypted message for the conversation view."""

    id: str
    direction: str
    type: str
    text: str | None
    details: dict[str, Any]
    status: str
    created_at: datetime
    provider_ts: datetime | None
    sent_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    failed_at: datetime | None
    error_code: int | None
    error_reason: str | None
    error_title: str | None
    review_reason: str | None
    template_name: str | None
    context_text: str | None
    forwarded: bool
    attachments: list[AttachmentView] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ConversationView:
    """A whole conversation for the detail page."""

    id: str
    org_id: str
    contact_id: str
    contact_name: str
    contact_phone: str | None
    channel_id: str
    channel_name: str
    channel_state: str
    channel_state_reason: str | None
    unread_count: int
    window_open: bool
    window_ends_at: datetime | None
    messages: list[MessageView]
    templates: list[MessageTemplate]


def window_state(last_inbound_at: datetime | None, now: datetime) -> tuple[bool, datetime | None]:
    """Whether the 24-hour customer-service window is open, and when it closes."""
    if last_inbound_at is None:
        return False, None
    ends = last_inbound_at + WINDOW
    return ends > now, ends


def contact_display_name(cipher: FieldCipher, c: Any) -> str:
    """Staff-given name, else WhatsApp profile name, else username, else a masked number."""
    for col, sealed in (
        ("name", c.name_enc),
        ("profile_name", c.profile_name_enc),
        ("username", c.username_enc),
    ):
        value = cipher.open_text(sealed, "contacts", col, c.id)
        if value:
            return value
    phone = cipher.open_text(c.phone_enc, "contacts", "phone", c.id)
    if phone:
        return "+" + phone[:-4] + "····" if len(phone) > 4 else "+" + phone
    return "Patient " + c.id[-6:]


async def list_(
    *,
    session: AsyncSession,
    keys: KeyService,
    org_id: str,
    now: datetime,
    limit: int = 50,
    before: datetime | None = None,
) -> list[ConversationRow]:
    """The newest conversations of an organisation, newest activity first."""
    q = (
        select(Conversation, Contact, Channel.name, Channel.state, Message.direction, Message.status)
        .join(Contact, Contact.id == Conversation.contact_id)
        .join(Channel, Channel.id == Conversation.channel_id)
        .outerjoin(Message, Message.id == Conversation.last_message_id)
        .where(Conversation.org_id == org_id, Contact.erased_at.is_(None))
        .order_by(Conversation.last_activity_at.desc(), Conversation.id.desc())
        .limit(limit)
    )
    if before is not None:
        q = q.where(Conversation.last_activity_at < before)
    rows = (await session.execute(q)).all()
    ciphers = await keys.ciphers(session, {r.Contact.dek_id for r in rows})
    out = []
    for conv, contact, ch_name, ch_state, last_dir, last_status in rows:
        is_open, ends = window_state(conv.last_inbound_at, now)
        out.append(
            ConversationRow(
                id=conv.id,
                contact_name=contact_display_name(ciphers[contact.dek_id], contact),
                channel_name=ch_name,
                channel_state=ch_state,
                unread_count=conv.unread_count,
                last_activity_at=conv.last_activity_at,
                last_direction=last_dir,
                last_status=last_status,
                window_open=is_open,
                window_ends_at=ends,
            )
        )
    return out


async def _load(
    session: AsyncSession, org_id: str, conversation_id: str
) -> tuple[Conversation, Contact, Channel]:
    row = (
        await session.execute(
            select(Conversation, Contact, Channel)
            .join(Contact, Contact.id == Conversation.contact_id)
            .join(Channel, Channel.id == Conversation.channel_id)
            .where(
                Conversation.id == conversation_id, Conversation.org_id == org_id, Contact.erased_at.is_(None)
            )
        )
    ).first()
    if row is None:
        raise NotFoundError("conversation not found")
    return row.Conversation, row.Contact, row.Channel


async def get(
    *,
    session: AsyncSession,
    keys: KeyService,
    org_id: str,
    conversation_id: str,
    now: datetime,
    limit: int = 200,
) -> ConversationView:
    """A conversation with its newest messages, decrypted, oldest first."""
    conv, contact, channel = await _load(session, org_id, conversation_id)
    cipher = await keys.cipher(session, contact.dek_id)
    msgs = list(
        (
            await session.execute(
                select(Message)
                .where(Message.conversation_id == conv.id)
                .order_by(Message.created_at.desc(), Message.id.desc())
                .limit(limit)
            )
        ).scalars()
    )
    msgs.reverse()
    atts: dict[str, list[AttachmentView]] = {}
    if msgs:
        for a in (
            await session.execute(select(Attachment).where(Attachment.message_id.in_([m.id for m in msgs])))
        ).scalars():
            atts.setdefault(a.message_id, []).append(
                AttachmentView(
                    id=a.id,
                    kind=a.kind,
                    mime_type=a.mime_type,
                    filename=cipher.open_text(a.filename_enc, "attachments", "filename", a.id),
                    state=a.state,
                    error_reason=a.error_reason,
                    size=a.size,
                )
            )
    by_ext = {m.external_id: m for m in msgs if m.external_id}
    views = []
    for m in msgs:
        text = cipher.open_text(m.body_enc, "messages", "body", m.id)
        details = json.loads(cipher.open_text(m.details_enc, "messages", "details", m.id) or "{}")
        quoted = by_ext.get(m.context_external_id) if m.context_external_id else None
        views.append(
            MessageView(
                id=m.id,
                direction=m.direction,
                type=m.type,
                text=text,
                details=details,
                status=m.status,
                created_at=m.created_at,
                provider_ts=m.provider_ts,
                sent_at=m.sent_at,
                delivered_at=m.delivered_at,
                read_at=m.read_at,
                failed_at=m.failed_at,
                error_code=m.error_code,
                error_reason=m.error_reason,
                error_title=m.error_title,
                review_reason=m.review_reason,
                template_name=m.template_name,
                context_text=cipher.open_text(quoted.body_enc, "messages", "body", quoted.id)
                if quoted
                else None,
                forwarded=m.forwarded,
                attachments=atts.get(m.id, []),
            )
        )
    is_open, ends = window_state(conv.last_inbound_at, now)
    templates = list(
        (
            await session.execute(
                select(MessageTemplate).where(MessageTemplate.org_id == org_id).order_by(MessageTemplate.name)
            )
        ).scalars()
    )
    return ConversationView(
        id=conv.id,
        org_id=org_id,
        contact_id=contact.id,
        contact_name=contact_display_name(cipher, contact),
        contact_phone=cipher.open_text(contact.phone_enc, "contacts", "phone", contact.id),
        channel_id=channel.id,
        channel_name=channel.name,
        channel_state=channel.state,
        channel_state_reason=channel.state_reason,
        unread_count=conv.unread_count,
        window_open=is_open,
        window_ends_at=ends,
        messages=views,
        templates=templates,
    )


async def mark_seen(*, session: AsyncSession, org_id: str, conversation_id: str, now: datetime) -> None:
    """Staff opened the conversation: clear the unread count; send a read receipt only if the org allows."""
    conv, _, channel = await _load(session, org_id, conversation_id)
    if conv.unread_count == 0:
        return
    conv.unread_count = 0
    org = await session.get(Organisation, org_id)
    if org is not None and orgs.setting(org, "send_read_receipts"):
        last_in = (
            await session.execute(
                select(Message.external_id)
                .where(Message.conversation_id == conv.id, Message.direction == "in")
                .order_by(Message.created_at.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        if last_in:
            await outbox.enqueue(
                session=session,
                org_id=org_id,
                kind="mark_read",
                channel_id=channel.id,
                payload={"external_id": last_in},
                now=now,
            )


class DuplicateSubmission(ConflictError):
    """The same composer form arrived again; its message is already queued (nothing new was made)."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        super().__init__("this message was already sent", code="duplicate")


async def _new_outgoing(
    session: AsyncSession,
    keys: KeyService,
    *,
    org_id: str,
    conversation_id: str,
    user_id: str,
    type_: str,
    text: str | None,
    now: datetime,
    reply_to_message_id: str | None = None,
    template_name: str | None = None,
    details: dict[str, Any] | None = None,
    require_window: bool = True,
    upload: bool = False,
    client_key: str | None = None,
) -> tuple[Message, FieldCipher, Conversation]:
    conv, contact, channel = await _load(session, org_id, conversation_id)
    if client_key:
        if len(client_key) > 64:
            raise ValidationError("the form's key is too long")
        first = (
            await session.execute(
                select(Message.id).where(Message.conversation_id == conv.id, Message.client_key == client_key)
            )
        ).scalar_one_or_none()
        if first is not None:
            raise DuplicateSubmission(first)
    if require_window and not window_state(conv.last_inbound_at, now)[0]:
        raise ConflictError("the 24-hour window is closed: only templates can be sent", code="needs_template")
    cipher = await keys.cipher(session, contact.dek_id)
    context_ext = None
    if reply_to_message_id:
        context_ext = (
            await session.execute(
                select(Message.external_id).where(
                    Message.id == reply_to_message_id, Message.conversation_id == conv.id
                )
            )
        ).scalar_one_or_none()
        if context_ext is None:
            raise ValidationError("the quoted message is not part of this conversation or was not delivered")
    mid = new_id()
    msg = Message(
        id=mid,
        org_id=org_id,
        conversation_id=conv.id,
        channel_id=channel.id,
        contact_id=contact.id,
        direction="out",
        type=type_,
        external_id=None,
        status="queued",
        body_enc=cipher.seal_text(text, "messages", "body", mid),
        details_enc=cipher.seal_text(json.dumps(details), "messages", "details", mid) if details else None,
        context_external_id=context_ext,
        forwarded=False,
        sender_user_id=user_id,
        template_name=template_name,
        created_at=now,
        client_key=client_key or None,
    )
    session.add(msg)
    conv.last_activity_at = now
    conv.last_message_id = mid
    await session.flush()
    await outbox.enqueue(
        session=session,
        org_id=org_id,
        kind="send_message",
        channel_id=channel.id,
        payload={"message_id": mid, "upload": True} if upload else {"message_id": mid},
        now=now,
    )
    return msg, cipher, conv


async def send_text(
    *,
    session: AsyncSession,
    keys: KeyService,
    org_id: str,
    conversation_id: str,
    user_id: str,
    text: str,
    now: datetime,
    reply_to_message_id: str | None = None,
    client_key: str | None = None,
) -> Message:
    """Queue a free-form text (inside the 24-hour window only)."""
    text = text.strip()
    if not text:
        raise ValidationError("the message is empty", code="empty")
    if len(text) > TEXT_LIMIT:
        raise ValidationError(f"the message is longer than {TEXT_LIMIT} characters", code="too_long")
    msg, _, _ = await _new_outgoing(
        session,
        keys,
        org_id=org_id,
        conversation_id=conversation_id,
        user_id=user_id,
        type_="text",
        text=text,
        now=now,
        reply_to_message_id=reply_to_message_id,
        client_key=client_key,
    )
    return msg


async def send_template(
    *,
    session: AsyncSession,
    keys: KeyService,
    org_id: str,
    conversation_id: str,
    user_id: str,
    template_id: str,
    params: list[str],
    now: datetime,
    client_key: str | None = None,
) -> Message:
    """Queue an approved template (allowed inside and outside the window)."""
    tpl = (
        await session.execute(
            select(MessageTemplate).where(MessageTemplate.id == template_id, MessageTemplate.org_id == org_id)
        )
    ).scalar_one_or_none()
    if tpl is None:
        raise NotFoundError("template not found")
    params = [p.strip() for p in params]
    if len(params) != tpl.param_count or any(not p for p in params):
        raise ValidationError(
            f"the template needs exactly {tpl.param_count} filled parameters", code="template_params"
        )
    text = tpl.body
    for i, p in enumerate(params, start=1):
        text = text.replace("{{" + str(i) + "}}", p)
    msg, _, _ = await _new_outgoing(
        session,
        keys,
        org_id=org_id,
        conversation_id=conversation_id,
        user_id=user_id,
        type_="template",
        text=text,
        now=now,
        template_name=tpl.name,
        details={"template": {"name": tpl.name, "language": tpl.language, "params": params}},
        require_window=False,  # templates are the one kind allowed outside the window
        client_key=client_key,
    )
    return msg


async def send_media(
    *,
    session: AsyncSession,
    keys: KeyService,
    blobs: BlobStore,
    org_id: str,
    conversation_id: str,
    user_id: str,
    data: bytes,
    mime_type: str,
    filename: str,
    caption: str | None,
    now: datetime,
    max_bytes: int,
    client_key: str | None = None,
) -> Message:
    """Queue an image or document: stored encrypted now, uploaded and sent by the outbox."""
    kind = OUTBOUND_MEDIA.get(mime_type)
    if kind is None:
        raise ValidationError("only JPEG, PNG, PDF and plain text files can be sent", code="media_type")
    if not data:
        raise ValidationError("the file is empty", code="empty")
    if len(data) > max_bytes or (kind == "image" and len(data) > 5 * 1024 * 1024):
        raise ValidationError("the file is too large", code="too_large")
    caption = (caption or "").strip() or None
    if caption and len(caption) > CAPTION_LIMIT:
        raise ValidationError(f"the caption is longer than {CAPTION_LIMIT} characters", code="too_long")
    msg, cipher, _ = await _new_outgoing(
        session,
        keys,
        org_id=org_id,
        conversation_id=conversation_id,
        user_id=user_id,
        type_=kind,
        text=caption,
        now=now,
        upload=True,
        client_key=client_key,
    )
    aid = new_id()
    blob = blobs.put(cipher=cipher, attachment_id=aid, data=data)
    session.add(
        Attachment(
            id=aid,
            org_id=org_id,
            message_id=msg.id,
            contact_id=msg.contact_id,
            kind=kind,
            media_id=None,
            mime_type=mime_type,
            expected_sha256=None,
            filename_enc=cipher.seal_text(filename[:200], "attachments", "filename", aid),
            size=len(data),
            state="stored",
            attempts=0,
            blob_name=blob,
            created_at=now,
        )
    )
    await session.flush()
    return msg


async def read_attachment(
    *, session: AsyncSession, keys: KeyService, blobs: BlobStore, org_id: str, attachment_id: str
) -> tuple[bytes, str, str | None]:
    """Decrypted bytes, MIME type and file name of a stored attachment."""
    a = (
        await session.execute(
            select(Attachment).where(Attachment.id == attachment_id, Attachment.org_id == org_id)
        )
    ).scalar_one_or_none()
    if a is None or a.state != "stored" or a.blob_name is None:
        raise NotFoundError("attachment not available")
    contact = await session.get(Contact, a.contact_id)
    assert contact is not None
    cipher = await keys.cipher(session, contact.dek_id)
    data = blobs.get(cipher=cipher, attachment_id=a.id, name=a.blob_name)
    return (
        data,
        a.mime_type or "application/octet-stream",
        cipher.open_text(a.filename_enc, "attachments", "filename", a.id),
    )


async def counts(*, session: AsyncSession, org_id: str) -> dict[str, int]:
    """Totals for the inbox header: conversations, unread, messages needing review."""
    conv = (
        await session.execute(
            select(func.count(), func.coalesce(func.sum(Conversation.unread_count), 0)).where(
                Conversation.org_id == org_id
            )
        )
    ).one()
    review = (
        await session.execute(
            select(func.count())
            .select_from(Message)
            .where(and_(Message.org_id == org_id, Message.status == "review"))
        )
    ).scalar_one()
    return {"conversations": conv[0], "unread": int(conv[1]), "review": review}


async def resolve_review(
    *, session: AsyncSession, org_id: str, conversation_id: str, message_id: str, action: str, now: datetime
) -> None:
    """Staff decide on a message whose send outcome was unknown: "resend" it, or "discard" (not sent)."""
    msg = (
        await session.execute(
            select(Message).where(
                Message.id == message_id, Message.org_id == org_id, Message.conversation_id == conversation_id
            )
        )
    ).scalar_one_or_none()
    if msg is None or msg.status != "review":
        raise NotFoundError("no message awaiting review")
    if action not in ("resend", "discard"):
        raise ValidationError("unknown action", code="invalid_action")
    if action == "resend":
        msg.status, msg.review_reason = "queued", None
        await outbox.enqueue(
            session=session,
            org_id=org_id,
            kind="send_message",
            channel_id=msg.channel_id,
            payload={"message_id": msg.id},
            now=now,
        )
    else:
        await session.execute(
            update(Message)
            .where(Message.id == msg.id)
            .values(status="failed", error_reason="not_sent_after_review", failed_at=now, review_reason=None)
        )


async def ensure(*, session: AsyncSession, org_id: str, conversation_id: str) -> None:
    """NotFoundError unless the conversation exists in this organisation (cheap check before heavy work)."""
    found = await session.execute(
        select(Conversation.id).where(Conversation.id == conversation_id, Conversation.org_id == org_id)
    )
    if found.first() is None:
        raise NotFoundError("conversation not found")
