"""Conversations for the inbox: list, open, send (text, reply, template, media), mark read.

Services never commit. A staff send writes the message row and its outbox job in the caller's
transaction (DESIGN 5, persist then send); the network call happens later in the outbox worker.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, literal_column, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from pforte.audit import service as audit
from pforte.audit.service import SYSTEM, Actor
from pforte.channels.models import Channel
from pforte.contacts.models import Contact
from pforte.conversations import parts as parts_policy
from pforte.conversations.models import Attachment, Conversation, Message, MessageTemplate
from pforte.crypto.blobs import BlobStore
from pforte.crypto.envelope import FieldCipher
from pforte.crypto.keys import KeyService
from pforte.db import new_id
from pforte.errors import ConflictError, NotFoundError, ValidationError
from pforte.orgs import service as orgs
from pforte.orgs.models import Organisation
from pforte.outbox import service as outbox
from pforte.privacy import service as privacy

WINDOW = timedelta(hours=24)
TEXT_LIMIT = parts_policy.MAX_TEXT_LENGTH  # longer than a channel allows: sent in parts
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
    content_hash: str | None = None  # SHA-256 over the canonical content (see conversations/parts.py)
    hash_state: str = "missing"  # match | mismatch | missing (stored before hashes) | file_deleted
    # A split outgoing message: its parts by index and the status derived from them.
    parts: list[PartView] = field(default_factory=list)
    split: parts_policy.LogicalStatus | None = None
    review_id: str | None = None  # the row a review decision applies to (a part, for a split message)
    # An incoming "(x/y)" sequence: the first member carries it (and every member's view); the other
    # members name that first one and are shown inside it.
    assembly: parts_policy.Assembly | None = None
    members: list[MessageView] = field(default_factory=list)
    assembled_into: str | None = None


@dataclass(frozen=True, slots=True)
class PartView:
    """One part of a split outgoing message."""

    id: str
    index: int
    status: str
    error_reason: str | None
    content_hash: str | None
    hash_state: str


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
        select(
            Conversation,
            Contact,
            Channel.name,
            Channel.state,
            Message.direction,
            Message.status,
            Message.part_count,
        )
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
    split = await _split_statuses(
        session, {r.Conversation.last_message_id: r.part_count for r in rows if r.part_count}
    )
    out = []
    for conv, contact, ch_name, ch_state, last_dir, last_status, _ in rows:
        is_open, ends = window_state(conv.last_inbound_at, now)
        if conv.last_message_id in split:
            last_status = split[conv.last_message_id].status
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


async def _split_statuses(
    session: AsyncSession, logical: dict[str | None, int]
) -> dict[str, parts_policy.LogicalStatus]:
    """The derived status of split messages, given their ids and part counts (one query)."""
    ids = [i for i in logical if i]
    if not ids:
        return {}
    found: dict[str, list[parts_policy.PartState]] = {i: [] for i in ids}
    rows = await session.execute(
        select(Message.parent_id, Message.part_index, Message.status, Message.error_reason).where(
            Message.parent_id.in_(ids)
        )
    )
    for parent, index, status, reason in rows:
        found[str(parent)].append(parts_policy.PartState(index or 0, status, reason))
    return {i: parts_policy.logical_status(ps, logical[i]) for i, ps in found.items()}


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
                .where(Message.conversation_id == conv.id, Message.parent_id.is_(None))
                .order_by(Message.created_at.desc(), Message.id.desc())
                .limit(limit)
            )
        ).scalars()
    )
    msgs.reverse()
    part_rows: dict[str, list[Message]] = {}
    split_ids = [m.id for m in msgs if m.part_count]
    if split_ids:
        for p in (
            await session.execute(
                select(Message).where(Message.parent_id.in_(split_ids)).order_by(Message.part_index)
            )
        ).scalars():
            part_rows.setdefault(p.parent_id or "", []).append(p)
    atts: dict[str, list[AttachmentView]] = {}
    media: dict[str, list[tuple[str | None, str | None]]] = {}
    if msgs:
        for a in (
            await session.execute(select(Attachment).where(Attachment.message_id.in_([m.id for m in msgs])))
        ).scalars():
            filename = cipher.open_text(a.filename_enc, "attachments", "filename", a.id)
            atts.setdefault(a.message_id, []).append(
                AttachmentView(
                    id=a.id,
                    kind=a.kind,
                    mime_type=a.mime_type,
                    filename=filename,
                    state=a.state,
                    error_reason=a.error_reason,
                    size=a.size,
                )
            )
            media.setdefault(a.message_id, []).append((a.expected_sha256, filename))
    by_ext = {m.external_id: m for m in msgs if m.external_id}
    by_ext.update({p.external_id: p for ps in part_rows.values() for p in ps if p.external_id})
    views = []
    for m in msgs:
        text = cipher.open_text(m.body_enc, "messages", "body", m.id)
        details = json.loads(cipher.open_text(m.details_enc, "messages", "details", m.id) or "{}")
        quoted = by_ext.get(m.context_external_id) if m.context_external_id else None
        digest, hash_state = _check_hash(cipher, m, text, details, media.get(m.id, []), atts.get(m.id, []))
        part_views = [_part_view(cipher, p) for p in part_rows.get(m.id, [])]
        split = (
            parts_policy.logical_status(
                [parts_policy.PartState(p.index, p.status, p.error_reason) for p in part_views], m.part_count
            )
            if m.part_count
            else None
        )
        views.append(
            MessageView(
                id=m.id,
                direction=m.direction,
                type=m.type,
                text=text,
                details=details,
                status=split.status if split else m.status,
                created_at=m.created_at,
                provider_ts=m.provider_ts,
                sent_at=m.sent_at,
                delivered_at=m.delivered_at,
                read_at=m.read_at,
                failed_at=m.failed_at,
                error_code=m.error_code,
                error_reason=split.error_reason if split else m.error_reason,
                error_title=m.error_title,
                review_reason=m.review_reason,
                template_name=m.template_name,
                context_text=cipher.open_text(quoted.body_enc, "messages", "body", quoted.id)
                if quoted
                else None,
                forwarded=m.forwarded,
                attachments=atts.get(m.id, []),
                content_hash=digest,
                hash_state=hash_state,
                parts=part_views,
                split=split,
                review_id=next((p.id for p in part_views if p.status == "review"), None) if split else m.id,
            )
        )
    org = await session.get(Organisation, org_id)
    name = "incoming_parts_wait_minutes"  # how long a missing incoming part is waited for
    wait = orgs.setting(org, name) if org is not None else orgs.DEFAULT_SETTINGS[name]
    views = _assemble(views, now=now, wait=timedelta(minutes=int(wait)))
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


def _check_hash(
    cipher: FieldCipher,
    row: Message,
    text: str | None,
    details: dict[str, Any],
    media: list[tuple[str | None, str | None]],
    atts: list[AttachmentView],
) -> tuple[str | None, str]:
    """The stored content hash and whether the decrypted content still hashes to it."""
    stored = cipher.open_text(row.content_hash_enc, "messages", "content_hash", row.id)
    if stored is None:
        return None, "missing"
    if any(a.state == "deleted" for a in atts):
        return stored, "file_deleted"  # the hash covers the file, which is gone on purpose
    again = parts_policy.content_hash(
        direction=row.direction, type_=row.type, body=text, details=details, media=media
    )
    return stored, "match" if again == stored else "mismatch"


def _part_view(cipher: FieldCipher, p: Message) -> PartView:
    text = cipher.open_text(p.body_enc, "messages", "body", p.id)
    details = json.loads(cipher.open_text(p.details_enc, "messages", "details", p.id) or "{}")
    digest, state = _check_hash(cipher, p, text, details, [], [])
    return PartView(
        id=p.id,
        index=p.part_index or 0,
        status=p.status,
        error_reason=p.error_reason,
        content_hash=digest,
        hash_state=state,
    )


def _assemble(views: list[MessageView], *, now: datetime, wait: timedelta) -> list[MessageView]:
    """Mark incoming "(x/y)" sequences: the first member shows them all, the others are folded in."""
    groups = parts_policy.assemble(
        [parts_policy.ThreadItem(v.id, v.direction, v.type, v.text, v.created_at) for v in views],
        now=now,
        wait=wait,
    )
    if not groups:
        return views
    by_id = {v.id: v for v in views}
    changed: dict[str, MessageView] = {}
    for g in groups:
        head = g.ids[0]
        order = [p.message_id for p in g.parts] + list(g.duplicates)
        changed[head] = replace(by_id[head], assembly=g, members=[by_id[i] for i in order])
        for other in g.ids[1:]:
            changed[other] = replace(by_id[other], assembled_into=head)
    return [changed.get(v.id, v) for v in views]


async def mark_seen(
    *, session: AsyncSession, org_id: str, conversation_id: str, now: datetime, shown: int | None = None
) -> None:
    """Staff opened the conversation: clear the unread count; send a read receipt only if the org allows.

    ``shown`` is the unread count the page read with the thread it shows; only that many are
    taken off, in SQL, so a patient message committed since (the page waits for the audit head,
    which the ingest holds) stays unread. Setting the column to 0 lost the ingest's increment.
    Without ``shown`` (the CLI, tests) everything counts as seen.
    """
    conv, _, channel = await _load(session, org_id, conversation_id)
    seen = conv.unread_count if shown is None else shown
    if seen <= 0:
        return
    unread = Conversation.unread_count
    left = (
        await session.execute(
            update(Conversation)
            .where(Conversation.id == conv.id)
            .values(unread_count=case((unread > seen, unread - seen), else_=0))
            .returning(unread)
            .execution_options(synchronize_session=False)
        )
    ).scalar_one()
    set_committed_value(conv, "unread_count", left)
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
    user_id: str | None,
    type_: str,
    text: str | None,
    now: datetime,
    reply_to_message_id: str | None = None,
    template_name: str | None = None,
    details: dict[str, Any] | None = None,
    require_window: bool = True,
    upload: bool = False,
    client_key: str | None = None,
    system: bool = False,
) -> tuple[Message, FieldCipher, Conversation]:
    conv, contact, channel = await _load(session, org_id, conversation_id)
    if not system:  # pforte's own privacy messages go out before consent; staff messages do not
        await privacy.check_staff_may_send(session, org_id=org_id, contact=contact, channel=channel)
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
    # Longer than the channel takes: "message x of y" (II.2), see conversations/parts.py.
    chunks = (
        parts_policy.split_text(text, parts_policy.text_limit(channel.kind))
        if type_ == "text" and text
        else []
    )
    split = len(chunks) > 1
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
        status="split" if split else "queued",  # a logical message is never sent; its parts are
        body_enc=cipher.seal_text(text, "messages", "body", mid),
        details_enc=cipher.seal_text(json.dumps(details), "messages", "details", mid) if details else None,
        context_external_id=context_ext,
        forwarded=False,
        sender_user_id=user_id,
        template_name=template_name,
        created_at=now,
        client_key=client_key or None,
        part_count=len(chunks) if split else None,
        content_hash_enc=_seal_hash(cipher, mid, type_=type_, body=text, details=details),
    )
    session.add(msg)
    sendable = [msg]
    if split:
        sendable = []
        for index, chunk in enumerate(chunks, start=1):
            pid = new_id()
            part = Message(
                id=pid,
                org_id=org_id,
                conversation_id=conv.id,
                channel_id=channel.id,
                contact_id=contact.id,
                direction="out",
                type="text",
                external_id=None,
                status="queued",
                body_enc=cipher.seal_text(chunk, "messages", "body", pid),
                context_external_id=context_ext if index == 1 else None,
                forwarded=False,
                sender_user_id=user_id,
                created_at=now,
                parent_id=mid,
                part_index=index,
                part_count=len(chunks),
                content_hash_enc=_seal_hash(cipher, pid, type_="text", body=chunk),
            )
            session.add(part)
            sendable.append(part)
    conv.last_activity_at = now
    conv.last_message_id = mid
    await session.flush()
    # Who sent what, in the send's transaction: a staff member, or pforte itself (no user).
    sent: dict[str, Any] = {"conversation_id": conv.id, "type": type_}
    if split:
        sent["parts"] = len(chunks)
    await audit.record(
        session,
        org_id=org_id,
        actor=Actor.staff(user_id) if user_id else SYSTEM,
        action="message.send",
        now=now,
        object_kind="message",
        object_id=mid,
        details=sent,
    )
    for row in sendable:  # each part is sent exactly like a single text
        await outbox.enqueue(
            session=session,
            org_id=org_id,
            kind="send_message",
            channel_id=channel.id,
            payload={"message_id": row.id, "upload": True} if upload else {"message_id": row.id},
            now=now,
        )
    return msg, cipher, conv


def _seal_hash(
    cipher: FieldCipher,
    message_id: str,
    *,
    type_: str,
    body: str | None,
    details: dict[str, Any] | None = None,
    media: list[tuple[str | None, str | None]] | None = None,
) -> bytes | None:
    """An outgoing message's content hash, sealed like its body (associated data names the row)."""
    digest = parts_policy.content_hash(
        direction="out", type_=type_, body=body, details=details, media=media or ()
    )
    return cipher.seal_text(digest, "messages", "content_hash", message_id)


async def send_text(
    *,
    session: AsyncSession,
    keys: KeyService,
    org_id: str,
    conversation_id: str,
    user_id: str | None,
    text: str,
    now: datetime,
    reply_to_message_id: str | None = None,
    client_key: str | None = None,
    system: bool = False,
) -> Message:
    """Queue a free-form text (inside the 24-hour window only); ``system`` marks pforte's own replies."""
    text = text.strip()
    if not text:
        raise ValidationError("the message is empty", code="empty")
    if len(text) > TEXT_LIMIT:  # up to the channel's limit it is one message, beyond it parts
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
        system=system,
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
    # The file's SHA-256 in WhatsApp's form (base64), so the message's content hash covers the file.
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    msg.content_hash_enc = _seal_hash(cipher, msg.id, type_=kind, body=caption, media=[(sha, filename[:200])])
    session.add(
        Attachment(
            id=aid,
            org_id=org_id,
            message_id=msg.id,
            contact_id=msg.contact_id,
            kind=kind,
            media_id=None,
            mime_type=mime_type,
            expected_sha256=sha,
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


async def record_opened(
    *, session: AsyncSession, org_id: str, conversation_id: str, contact_id: str, actor: Actor, now: datetime
) -> None:
    """Audit that someone opened a conversation (who saw what, DSK I.11); ids only."""
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="conversation.open",
        now=now,
        object_kind="conversation",
        object_id=conversation_id,
        details={"contact_id": contact_id},
    )


async def record_attachment_opened(
    *, session: AsyncSession, org_id: str, attachment_id: str, disposition: str, actor: Actor, now: datetime
) -> None:
    """Audit that someone fetched an attachment's bytes, shown in the page or downloaded."""
    row = (
        await session.execute(
            select(Message.id, Message.conversation_id)
            .join(Attachment, Attachment.message_id == Message.id)
            .where(Attachment.id == attachment_id, Attachment.org_id == org_id)
        )
    ).first()
    if row is None:
        raise NotFoundError("attachment not available")
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="attachment.open",
        now=now,
        object_kind="attachment",
        object_id=attachment_id,
        details={"message_id": row[0], "conversation_id": row[1], "disposition": disposition},
    )


async def counts(*, session: AsyncSession, org_id: str) -> dict[str, int]:
    """Totals for the inbox header: unread messages, messages needing review.

    The unread total reads only conversations with something unread (``ix_conversations_unread``,
    a partial index; the condition is a literal so that PostgreSQL's generic plan can use it),
    not all of the organisation's conversations as a count of them would.
    """
    unread = (
        await session.execute(
            select(func.coalesce(func.sum(Conversation.unread_count), 0)).where(
                Conversation.org_id == org_id, Conversation.unread_count > literal_column("0")
            )
        )
    ).scalar_one()
    review = (
        await session.execute(
            select(func.count())
            .select_from(Message)
            .where(and_(Message.org_id == org_id, Message.status == "review"))
        )
    ).scalar_one()
    return {"unread": int(unread), "review": review}


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
    # The decision is taken only while the message is still in review, in the UPDATE itself: two
    # staff (or one double click) deciding at once must not queue two sends of one message. The
    # second UPDATE waits for the first's row lock, then finds the status changed.
    decided = await session.execute(
        update(Message)
        .where(Message.id == msg.id, Message.status == "review")
        .values(
            {"status": "queued", "review_reason": None}
            if action == "resend"
            else {
                "status": "failed",
                "error_reason": "not_sent_after_review",
                "failed_at": now,
                "review_reason": None,
            }
        )
        .execution_options(synchronize_session="fetch")
    )
    if decided.rowcount != 1:  # type: ignore[attr-defined]
        raise NotFoundError("no message awaiting review")
    if action == "resend":
        await outbox.enqueue(
            session=session,
            org_id=org_id,
            kind="send_message",
            channel_id=msg.channel_id,
            payload={"message_id": msg.id},
            now=now,
        )


async def ensure(*, session: AsyncSession, org_id: str, conversation_id: str) -> None:
    """NotFoundError unless the conversation exists in this organisation (cheap check before heavy work)."""
    found = await session.execute(
        select(Conversation.id).where(Conversation.id == conversation_id, Conversation.org_id == org_id)
    )
    if found.first() is None:
        raise NotFoundError("conversation not found")


async def send_buttons(
    *,
    session: AsyncSession,
    keys: KeyService,
    org_id: str,
    conversation_id: str,
    text: str,
    buttons: list[tuple[str, str]],
    now: datetime,
) -> Message:
    """Queue pforte's own interactive message with reply buttons (id, title); not a staff send."""
    msg, _, _ = await _new_outgoing(
        session,
        keys,
        org_id=org_id,
        conversation_id=conversation_id,
        user_id=None,
        type_="interactive",
        text=text,
        now=now,
        details={"buttons": [{"id": i, "title": t} for i, t in buttons]},
        system=True,
    )
    return msg
