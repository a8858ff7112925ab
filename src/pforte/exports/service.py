"""Signed conversation export (DSK II.2, I.5): one conversation as a ZIP whose manifest is signed.

The archive holds exactly these files::

    manifest.json               what the archive holds: every other file's SHA-256 and size, the
                                organisation, conversation, period, time, signing key and the list
                                of messages with their content hashes and part counts
    signature.json              an Ed25519 signature over the exact bytes of manifest.json
    messages.json               every message, decrypted, numbered "x of N" (shape below)
    transcript.html             the same for people: one standalone page (inline CSS, no scripts,
                                no external resources; images shown from attachments/)
    attachments/<id>-<name>     the files that are still stored, decrypted

Why it is built this way:

* **One signature covers everything.** Only manifest.json is signed; it names every other file by
  SHA-256 and size, and each message by its content hash, so a changed byte anywhere breaks either a
  file hash or the signature. ``signed_at`` in signature.json is not signed itself, so the manifest
  repeats it as ``created_at`` and :mod:`pforte.exports.verify` requires both to agree: the time
  a revocation is judged against is a signed one.
* **Nothing wrong is signed.** Every message's content hash is recomputed from the decrypted
  content (:mod:`pforte.conversations.parts`) and compared to the hash stored with it; so is every
  included file against the SHA-256 its message declared. A mismatch aborts the whole export with
  :class:`ExportIntegrityError` before anything is signed or audited. Messages stored before hashes
  existed carry the hash recomputed now (``hash_check`` = ``not_stored``); a message whose file was
  deleted keeps its stored hash, which can no longer be recomputed (``file_deleted``).
* **No key, no export.** The organisation's active signing key is looked up first; without one the
  export stops with ``ConflictError`` (``no_signing_key``) before any content is decrypted.
* **Audited on the caller's transaction.** :func:`create` records ``conversation.export`` (ids,
  period, counts, the manifest's SHA-256 and the key id; never content) on the session it was given;
  the route or command commits. A file exists only if its entry is committed (the command removes
  its file when the commit fails).
* **Built in memory.** The archive is returned as bytes and never written to the server's disk;
  blob reads and compression run in a worker thread. The archive is as large as the conversation's
  files, so very large conversations are better exported by period (``since``/``until``).

``messages.json`` (``format`` = ``pforte.conversation-export/1``; times ISO 8601 UTC)::

    {"format", "organisation_id", "conversation_id", "contact_id", "channel": {"id", "kind", "name"},
     "range": {"from", "until"}, "count": N,
     "messages": [
       {"index" (1..N), "of" (N), "id", "external_id", "direction" ("in" | "out"),
        "sender": {"kind" ("patient" | "staff" | "system"), "staff_id", "name"},
        "type", "template", "text", "details", "forwarded",
        "created_at", "provider_time", "sent_at", "delivered_at", "read_at", "failed_at",
        "status", "error": null | {"reason", "code", "title"}, "review_reason",
        "reply_to": null | {"external_id", "message_id", "index" (null if outside the export)},
        "sha256", "hash_check" ("match" | "not_stored" | "file_deleted"),
        "part_count": null | y,
        "parts": [{"index", "of", "id", "external_id", "type", "text", "sha256", "hash_check",
                   "status", "sent_at", "delivered_at", "read_at", "failed_at",
                   "error": null | {"reason", "code", "title"}}],
        "attachments": [{"id", "kind", "mime_type", "file_name", "media_sha256", "state"
                         ("included" | "pending" | "failed" | "deleted" | "unreadable"),
                         "size", "sha256", "path", "error_reason"}]}]}

A message's ``sha256`` is :func:`pforte.conversations.parts.content_hash` of ``direction``,
``type``, ``text``, ``details`` and its attachments' ``(media_sha256, file_name)``; a part's is the
same with type ``text``, its own text and no details or files. ``media_sha256`` is the file's SHA-256
as the message declared it (base64, as WhatsApp sends it); ``sha256`` of an attachment is the hex
SHA-256 of the file in the archive.

The staff member's display name is in the record on purpose: the export documents who told the
patient what, and an id means nothing to a reader outside pforte or after the account is gone. The
patient is named only by contact id: the export is filed with the patient's record, which names
them, and a copy that leaves the system should carry no more personal data than it needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pforte import documents
from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.channels.base import decode_sha256
from pforte.channels.models import Channel
from pforte.contacts.export import INLINE_IMAGES, safe_filename
from pforte.contacts.models import Contact
from pforte.conversations import parts as parts_policy
from pforte.conversations.models import Attachment, Conversation, Message
from pforte.crypto import signing
from pforte.crypto.blobs import BlobStore
from pforte.crypto.envelope import FieldCipher
from pforte.crypto.keys import KeyService
from pforte.errors import ConflictError, CryptoError, NotFoundError, ValidationError
from pforte.i18n import LOCALES
from pforte.orgs.models import Organisation
from pforte.staff.models import StaffUser

log = logging.getLogger(__name__)

FORMAT = "pforte.conversation-export"
VERSION = 1
MESSAGES_FORMAT = f"{FORMAT}/{VERSION}"
SIGNATURE_FORMAT = "pforte.export-signature/1"
ACTION = "conversation.export"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
MESSAGES = "messages.json"
TRANSCRIPT = "transcript.html"
ATTACHMENTS = "attachments/"
# Same as the inbox: organisations have no time-zone setting yet.
DISPLAY_TZ = ZoneInfo("Europe/Berlin")


class ExportIntegrityError(ConflictError):
    """Stored content no longer matches its stored hash: the export is refused, nothing is signed."""

    code = "export_integrity"

    def __init__(self, message: str, *, message_id: str) -> None:
        super().__init__(message)
        self.message_id = message_id


@dataclass(frozen=True)
class SignedExport:
    """A finished export: the archive and the facts the caller reports."""

    data: bytes
    conversation_id: str
    messages: int
    attachments: int  # files included in the archive
    manifest_sha256: str
    key_id: str
    fingerprint: str
    created_at: datetime

    @property
    def archive_name(self) -> str:
        """A download name without names or numbers in it (it ends up in browser histories)."""
        return f"conversation-{self.conversation_id}-{self.created_at.astimezone(UTC):%Y%m%d-%H%M%S}.zip"


# -- small pure helpers ----------------------------------------------------------------------------


def _iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat() if dt else None


def json_bytes(doc: Any) -> bytes:
    """The JSON encoding every file of the archive uses (UTF-8, non-ASCII kept, indented)."""
    return json.dumps(doc, ensure_ascii=False, indent=1).encode()


def day_range(
    first: str | date | None, last: str | date | None, tz: tzinfo = DISPLAY_TZ
) -> tuple[datetime | None, datetime | None]:
    """The instants [start of ``first``, start of the day after ``last``) in a time zone."""

    def day(value: str | date | None, name: str) -> date | None:
        if value is None or value == "":
            return None
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise ValidationError(f"{name}: not a date (expected YYYY-MM-DD)", code="bad_date") from None

    start, end = day(first, "from"), day(last, "to")
    since = datetime(start.year, start.month, start.day, tzinfo=tz).astimezone(UTC) if start else None
    until = None
    if end is not None:
        after = end + timedelta(days=1)
        until = datetime(after.year, after.month, after.day, tzinfo=tz).astimezone(UTC)
    if since and until and since >= until:
        raise ValidationError("the period ends before it starts", code="bad_range")
    return since, until


# -- loading ---------------------------------------------------------------------------------------


async def _load(
    session: AsyncSession, org_id: str, conversation_id: str
) -> tuple[Conversation, Contact, Channel]:
    row = (
        await session.execute(
            select(Conversation, Contact, Channel)
            .join(Contact, Contact.id == Conversation.contact_id)
            .join(Channel, Channel.id == Conversation.channel_id)
            .where(
                Conversation.id == conversation_id,
                Conversation.org_id == org_id,
                Contact.erased_at.is_(None),
            )
        )
    ).first()
    if row is None:
        raise NotFoundError("conversation not found")
    return row.Conversation, row.Contact, row.Channel


@dataclass
class _File:
    """An attachment row with its decrypted name and, once read, its bytes."""

    row: Attachment
    file_name: str | None
    data: bytes | None = None
    state: str = ""
    path: str | None = None


def _read_files(blobs: BlobStore, cipher: FieldCipher, files: list[_File]) -> None:
    """Read and decrypt the stored files (in a worker thread); a vanished file becomes "unreadable"."""
    for f in files:
        a = f.row
        if a.state != "stored" or not a.blob_name:
            f.state = a.state
            continue
        try:
            f.data = blobs.get(cipher=cipher, attachment_id=a.id, name=a.blob_name)
        except (OSError, CryptoError) as exc:
            log.warning(
                "conversation export: attachment file unreadable",
                extra={"attachment_id": a.id, "error": type(exc).__name__},
            )
            f.state = "unreadable"
            continue
        declared = decode_sha256(a.expected_sha256)
        if declared is not None and hashlib.sha256(f.data).digest() != declared:
            raise ExportIntegrityError(
                f"attachment {a.id} of message {a.message_id}: the stored file no longer matches the "
                "SHA-256 its message declared; nothing was exported",
                message_id=a.message_id,
            )
        f.state = "included"
        f.path = ATTACHMENTS + a.id + "-" + safe_filename(f.file_name, a.mime_type, a.kind)


def _hash_check(
    cipher: FieldCipher,
    row: Message,
    *,
    text: str | None,
    details: dict[str, Any],
    media: Iterable[tuple[str | None, str | None]],
    file_deleted: bool,
) -> tuple[str, str]:
    """The content hash to list and how it was checked; ExportIntegrityError on a mismatch."""
    stored = cipher.open_text(row.content_hash_enc, "messages", "content_hash", row.id)
    again = parts_policy.content_hash(
        direction=row.direction, type_=row.type, body=text, details=details, media=media
    )
    if stored is None:
        return again, "not_stored"  # stored before content hashes existed
    if file_deleted:
        return stored, "file_deleted"  # the hash covers a file that is gone on purpose
    if again != stored:
        raise ExportIntegrityError(
            f"message {row.id}: its content no longer matches the SHA-256 stored with it; nothing was "
            "exported",
            message_id=row.id,
        )
    return stored, "match"


def _error(row: Message) -> dict[str, Any] | None:
    if row.error_reason or row.error_code is not None or row.error_title:
        return {"reason": row.error_reason, "code": row.error_code, "title": row.error_title}
    return None


# -- the export ------------------------------------------------------------------------------------


async def create(
    session: AsyncSession,
    keys: KeyService,
    blobs: BlobStore,
    *,
    org_id: str,
    conversation_id: str,
    actor: Actor,
    now: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
    lang: str = "de",
    tz: tzinfo = DISPLAY_TZ,
) -> SignedExport:
    """Export one conversation (or the messages created in [since, until)) signed and audited."""
    if lang not in LOCALES:
        raise ValidationError(f"the language must be one of {', '.join(LOCALES)}", code="bad_lang")
    if since and until and since >= until:
        raise ValidationError("the period ends before it starts", code="bad_range")
    conv, contact, channel = await _load(session, org_id, conversation_id)
    key = await signing.active_key(session, org_id, now)
    if key is None:
        raise ConflictError(
            "the organisation has no active signing key (pforte keys signing create); nothing was exported",
            code="no_signing_key",
        )
    org = await session.get(Organisation, org_id)
    assert org is not None  # the conversation's foreign key guarantees it
    cipher = await keys.cipher(session, contact.dek_id)

    q = select(Message).where(
        Message.conversation_id == conv.id, Message.org_id == org_id, Message.parent_id.is_(None)
    )
    if since is not None:
        q = q.where(Message.created_at >= since)
    if until is not None:
        q = q.where(Message.created_at < until)
    rows = list((await session.execute(q.order_by(Message.created_at, Message.id))).scalars())
    ids = [m.id for m in rows]
    part_rows: dict[str, list[Message]] = {}
    files: dict[str, list[_File]] = {}
    if ids:
        split = [m.id for m in rows if m.part_count]
        if split:
            for p in (
                await session.execute(
                    select(Message)
                    .where(Message.parent_id.in_(split), Message.org_id == org_id)
                    .order_by(Message.part_index, Message.id)
                )
            ).scalars():
                part_rows.setdefault(p.parent_id or "", []).append(p)
        for a in (
            await session.execute(
                select(Attachment)
                .where(Attachment.message_id.in_(ids), Attachment.org_id == org_id)
                .order_by(Attachment.created_at, Attachment.id)
            )
        ).scalars():
            name = cipher.open_text(a.filename_enc, "attachments", "filename", a.id)
            files.setdefault(a.message_id, []).append(_File(a, name))
    # A reply names the quoted message by the provider's id; a reply to a part quotes its message.
    quoted: dict[str, str] = {}
    for mid, ext, parent in await session.execute(
        select(Message.id, Message.external_id, Message.parent_id).where(
            Message.conversation_id == conv.id, Message.external_id.is_not(None)
        )
    ):
        quoted[str(ext)] = str(parent or mid)
    sender_ids = {m.sender_user_id for m in rows if m.sender_user_id}
    names: dict[str, str] = {}
    if sender_ids:
        names = {
            str(i): str(n)
            for i, n in await session.execute(
                select(StaffUser.id, StaffUser.display_name).where(
                    StaffUser.id.in_(sender_ids), StaffUser.org_id == org_id
                )
            )
        }
    all_files = [f for fs in files.values() for f in fs]
    await asyncio.to_thread(_read_files, blobs, cipher, all_files)

    index_of = {m.id: i for i, m in enumerate(rows, start=1)}
    total = len(rows)
    messages = [
        _message(cipher, m, i, total, part_rows.get(m.id, []), files.get(m.id, []), quoted, index_of, names)
        for i, m in enumerate(rows, start=1)
    ]
    period = {"from": _iso(since), "until": _iso(until)}
    doc = {
        "format": MESSAGES_FORMAT,
        "organisation_id": org_id,
        "conversation_id": conv.id,
        "contact_id": contact.id,
        "channel": {"id": channel.id, "kind": channel.kind, "name": channel.name},
        "range": period,
        "count": total,
        "messages": messages,
    }
    included = [f for f in all_files if f.state == "included" and f.data is not None and f.path]
    content: dict[str, bytes] = {MESSAGES: json_bytes(doc)}
    content[TRANSCRIPT] = transcript(
        doc, org_name=org.name, fingerprint=key.fingerprint, created_at=now, lang=lang, tz=tz
    )
    for f in included:
        assert f.path is not None and f.data is not None
        content[f.path] = f.data
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "organisation_id": org_id,
        "conversation_id": conv.id,
        "contact_id": contact.id,
        "range": period,
        "created_at": _iso(now),
        "exported_by": {"kind": actor.kind, "id": actor.id},
        "language": lang,
        "signed_by": {"key_id": key.id, "fingerprint": key.fingerprint},
        "message_count": total,
        "attachment_count": len(included),
        "files": [
            {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for path, data in content.items()
        ],
        "messages": [
            {"index": m["index"], "id": m["id"], "sha256": m["sha256"], "parts": m["part_count"]}
            for m in messages
        ],
    }
    manifest_bytes = json_bytes(manifest)
    sig = await signing.sign(session, keys, org_id=org_id, data=manifest_bytes, now=now)
    if sig.key_id != key.id:  # the key changed between the look-up and the signature
        raise ConflictError("the signing key changed during the export; please try again", code="key_changed")
    signature = {
        "format": SIGNATURE_FORMAT,
        "signed_file": MANIFEST,
        "algorithm": sig.algorithm,
        "key_id": sig.key_id,
        "fingerprint": sig.fingerprint,
        "public_key": sig.public_key,
        "signed_at": _iso(sig.signed_at),
        "signature": sig.signature,
    }
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    entries = {MANIFEST: manifest_bytes, SIGNATURE: json_bytes(signature), **content}
    data = await asyncio.to_thread(_zip, entries, now)
    # The only write, last: on SQLite the write lock is then held for the entry alone.
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action=ACTION,
        now=now,
        object_kind="conversation",
        object_id=conv.id,
        details={
            "from": period["from"],
            "until": period["until"],
            "messages": total,
            "attachments": len(included),
            "manifest_sha256": manifest_sha,
            "key_id": key.id,
        },
    )
    return SignedExport(
        data=data,
        conversation_id=conv.id,
        messages=total,
        attachments=len(included),
        manifest_sha256=manifest_sha,
        key_id=key.id,
        fingerprint=key.fingerprint,
        created_at=now,
    )


async def build(
    session: AsyncSession,
    keys: KeyService,
    blobs: BlobStore,
    *,
    org_id: str,
    conversation_id: str,
    actor: Actor,
    now: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
    lang: str = "de",
) -> bytes:
    """The signed, audited export of a conversation as the bytes of one ZIP file."""
    made = await create(
        session,
        keys,
        blobs,
        org_id=org_id,
        conversation_id=conversation_id,
        actor=actor,
        now=now,
        since=since,
        until=until,
        lang=lang,
    )
    return made.data


def _message(
    cipher: FieldCipher,
    m: Message,
    index: int,
    total: int,
    part_rows: list[Message],
    files: list[_File],
    quoted: dict[str, str],
    index_of: dict[str, int],
    names: dict[str, str],
) -> dict[str, Any]:
    """One entry of messages.json (see the module docstring)."""
    text = cipher.open_text(m.body_enc, "messages", "body", m.id)
    details = json.loads(cipher.open_text(m.details_enc, "messages", "details", m.id) or "{}")
    digest, check = _hash_check(
        cipher,
        m,
        text=text,
        details=details,
        media=[(f.row.expected_sha256, f.file_name) for f in files],
        file_deleted=any(f.row.state == "deleted" for f in files),
    )
    parts: list[dict[str, Any]] = []
    for p in part_rows:
        p_text = cipher.open_text(p.body_enc, "messages", "body", p.id)
        p_details = json.loads(cipher.open_text(p.details_enc, "messages", "details", p.id) or "{}")
        p_digest, p_check = _hash_check(
            cipher, p, text=p_text, details=p_details, media=(), file_deleted=False
        )
        parts.append(
            {
                "index": p.part_index,
                "of": p.part_count,
                "id": p.id,
                "external_id": p.external_id,
                "type": p.type,
                "text": p_text,
                "sha256": p_digest,
                "hash_check": p_check,
                "status": p.status,
                "sent_at": _iso(p.sent_at),
                "delivered_at": _iso(p.delivered_at),
                "read_at": _iso(p.read_at),
                "failed_at": _iso(p.failed_at),
                "error": _error(p),
            }
        )
    status, error = m.status, _error(m)
    if m.part_count:
        derived = parts_policy.logical_status(
            [parts_policy.PartState(p.part_index or 0, p.status, p.error_reason) for p in part_rows],
            m.part_count,
        )
        status = derived.status
        if derived.error_reason and error is None:
            error = {"reason": derived.error_reason, "code": None, "title": None}
    if m.direction == "in":
        sender: dict[str, Any] = {"kind": "patient", "staff_id": None, "name": None}
    elif m.sender_user_id:
        sender = {"kind": "staff", "staff_id": m.sender_user_id, "name": names.get(m.sender_user_id)}
    else:
        sender = {"kind": "system", "staff_id": None, "name": None}
    reply_to = None
    if m.context_external_id:
        target = quoted.get(m.context_external_id)
        reply_to = {
            "external_id": m.context_external_id,
            "message_id": target,
            "index": index_of.get(target) if target else None,
        }
    return {
        "index": index,
        "of": total,
        "id": m.id,
        "external_id": m.external_id,
        "direction": m.direction,
        "sender": sender,
        "type": m.type,
        "template": m.template_name,
        "text": text,
        "details": details,
        "forwarded": bool(m.forwarded),
        "created_at": _iso(m.created_at),
        "provider_time": _iso(m.provider_ts),
        "sent_at": _iso(m.sent_at),
        "delivered_at": _iso(m.delivered_at),
        "read_at": _iso(m.read_at),
        "failed_at": _iso(m.failed_at),
        "status": status,
        "error": error,
        "review_reason": m.review_reason,
        "reply_to": reply_to,
        "sha256": digest,
        "hash_check": check,
        "part_count": m.part_count,
        "parts": parts,
        "attachments": [
            {
                "id": f.row.id,
                "kind": f.row.kind,
                "mime_type": f.row.mime_type,
                "file_name": f.file_name,
                "media_sha256": f.row.expected_sha256,
                "state": f.state,
                "size": len(f.data) if f.data is not None else f.row.size,
                "sha256": hashlib.sha256(f.data).hexdigest() if f.data is not None else None,
                "path": f.path,
                "error_reason": f.row.error_reason,
            }
            for f in files
        ],
    }


def _zip(entries: dict[str, bytes], now: datetime) -> bytes:
    """The archive: the files in the given order, all dated with the export's time (UTC)."""
    stamp = now.astimezone(UTC)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(
                name,
                date_time=(
                    max(stamp.year, 1980),
                    stamp.month,
                    stamp.day,
                    stamp.hour,
                    stamp.minute,
                    stamp.second,
                ),
            )
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o600 << 16
            zf.writestr(info, data)
    return buf.getvalue()


# -- the transcript --------------------------------------------------------------------------------


def transcript(
    doc: dict[str, Any], *, org_name: str, fingerprint: str, created_at: datetime, lang: str, tz: tzinfo
) -> bytes:
    """``transcript.html``: the export for people, rendered from the same document as messages.json."""
    gettext, ngettext = documents.gettext_for(lang)

    def when(value: str | None) -> str:
        if not value:
            return ""
        local = datetime.fromisoformat(value).astimezone(tz)
        return local.strftime("%d.%m.%Y %H:%M:%S" if lang == "de" else "%Y-%m-%d %H:%M:%S")

    def day(value: str | None) -> str:
        if not value:
            return ""
        local = datetime.fromisoformat(value).astimezone(tz)
        return local.strftime("%d.%m.%Y %H:%M" if lang == "de" else "%Y-%m-%d %H:%M")

    html = (
        documents.environment()
        .get_template("export/conversation_transcript.html")
        .render(
            doc=doc,
            lang=lang,
            org_name=org_name,
            fingerprint=fingerprint,
            created_at=_iso(created_at),
            texts={m["id"]: m["text"] for m in doc["messages"]},
            inline_images=INLINE_IMAGES,
            tz_name=str(tz),
            when=when,
            day=day,
            gettext=gettext,
            ngettext=ngettext,
            _=gettext,
        )
    )
    return html.encode()
