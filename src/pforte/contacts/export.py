"""Data-subject export (GDPR Art. 15 access, Art. 20 portability): one patient's data as a ZIP.

The archive holds::

    README.txt                  what the archive holds, in the requester's language
    attachments/<id>-<name>     the decrypted files that are still stored
    data.json                   everything, machine-readable (shape below, versioned by ``format``)
    transcript.html             the same for people: one self-contained page (inline CSS, no
                                scripts, no external resources), images shown from attachments/

Why it is built this way:

* **Plaintext leaves the system here.** Everything pforte stores is ciphertext (DESIGN 1); an export
  is the one place where a whole patient history is decrypted into one file. So the archive is
  never written to the server's disk: :func:`stream` yields it chunk by chunk, straight into the
  HTTP response or into the file an operator named, and decrypts the files one at a time.
* **Two steps on the caller's transaction, then the stream.** :func:`collect` reads and decrypts
  everything but the files and returns plain data; :func:`record` adds the ``contact.export`` audit
  entry (ids and counts only) to the same transaction. The web route commits and then streams; the
  command line writes its file first and records last, so an entry exists exactly when a file does.
  :func:`stream` never touches the database: it may run after the transaction and in a thread.
* **Files first, index last.** Attachments are written before ``data.json`` and the transcript, so
  the index states each file's real size and SHA-256, and a file that cannot be read any more (its
  blob was deleted meanwhile) is listed as ``unreadable`` rather than promised.
* **Scoped and shredding-aware.** Another organisation's contact and an erased contact (key
  destroyed) are both "not found".

``data.json`` (``format`` = ``pforte.subject-export/1``; times are ISO 8601 in UTC)::

    {"format", "generated_at", "language",
     "organisation": {"id", "name"},
     "contact": {"id", "phone" ("+<digits>"), "bsuid", "profile_name", "username",
                 "name" (given by staff), "created_at"},
     "conversations": [
       {"id", "created_at", "last_activity_at",
        "channel": {"id", "kind", "name", "phone_number_id", "display_phone_number"},
        "messages": [
          {"id", "external_id", "direction" ("in" from the patient | "out" to the patient), "type",
           "status", "created_at", "provider_time", "sent_at", "delivered_at", "read_at", "failed_at",
           "text" (body or caption), "template" (name), "details" (type-specific: location, shared
           contacts, chosen option, reaction, template parameters …), "forwarded",
           "reply_to": null | {"external_id", "message_id" (null if not part of the export)},
           "error": null | {"reason" (pforte's code), "code" (provider's), "title" (provider's)},
           "review_reason", "raw" (the provider's payload, kept only for unsupported types),
           "attachments": [
             {"id", "kind", "mime_type", "file_name", "size", "sha256",
              "state" ("included" | "pending" | "failed" | "deleted" | "unreadable"),
              "path" (inside the ZIP when included, else null), "error_reason"}]}]}],
     "consent": [{"state" ("notice_sent" | "requested" | "given" | "refused" | "withdrawn"),
                  "notice_version", "via", "at", "conversation_id", "message_id", "external_id"}],
     "totals": {"conversations", "messages", "attachments", "files"}}

Values that are unknown are ``null``; keys are always present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import re
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pforte import documents
from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.channels.models import Channel
from pforte.contacts import service as contacts
from pforte.conversations.models import Attachment, Conversation, Message
from pforte.crypto.blobs import BlobStore
from pforte.crypto.envelope import FieldCipher
from pforte.crypto.keys import KeyService
from pforte.errors import CryptoError
from pforte.i18n import translations
from pforte.orgs.models import Organisation
from pforte.privacy import service as privacy

log = logging.getLogger(__name__)

FORMAT = "pforte.subject-export/1"
ACTION = "contact.export"
CHUNK = 64 * 1024
# Shown inline in the transcript; every other file is a link.
INLINE_IMAGES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
# mimetypes' answers depend on the host's /etc/mime.types; these do not.
_EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "application/pdf": ".pdf",
    "text/plain": ".txt",
    "audio/ogg": ".ogg",
    "audio/mpeg": ".mp3",
    "audio/mp4": ".m4a",
    "audio/aac": ".aac",
    "audio/amr": ".amr",
    "video/mp4": ".mp4",
    "video/3gpp": ".3gp",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class FileRecord:
    """An attachment as the export lists it (the bytes are read while streaming)."""

    id: str
    message_id: str
    kind: str
    mime_type: str | None
    file_name: str | None
    state: str  # pending | stored | failed | deleted
    error_reason: str | None
    size: int | None
    blob_name: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One decrypted message."""

    id: str
    external_id: str | None
    direction: str
    type: str
    status: str
    created_at: datetime
    provider_ts: datetime | None
    sent_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    failed_at: datetime | None
    text: str | None
    template_name: str | None
    details: dict[str, Any]
    raw: Any
    forwarded: bool
    context_external_id: str | None
    context_message_id: str | None
    error_reason: str | None
    error_code: int | None
    error_title: str | None
    review_reason: str | None
    attachments: tuple[FileRecord, ...]


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    """One conversation with its channel and messages, oldest first."""

    id: str
    created_at: datetime
    last_activity_at: datetime
    channel_id: str
    channel_kind: str
    channel_name: str
    phone_number_id: str
    display_phone_number: str
    messages: tuple[MessageRecord, ...]


@dataclass(frozen=True)
class SubjectExport:
    """Everything about one contact, decrypted, except the attachment files themselves."""

    org_id: str
    org_name: str
    contact_id: str
    phone: str | None
    bsuid: str | None
    profile_name: str | None
    username: str | None
    name: str | None
    contact_created_at: datetime
    generated_at: datetime
    conversations: tuple[ConversationRecord, ...]
    cipher: FieldCipher = field(repr=False)
    consent: tuple[dict[str, Any], ...] = ()  # the consent ledger, oldest first

    @property
    def messages(self) -> int:
        """How many messages the export holds."""
        return sum(len(c.messages) for c in self.conversations)

    @property
    def attachments(self) -> list[FileRecord]:
        """Every attachment listed, whatever its state."""
        return [a for c in self.conversations for m in c.messages for a in m.attachments]

    @property
    def files(self) -> int:
        """How many attachment files are stored and so go into the archive."""
        return sum(1 for a in self.attachments if a.state == "stored" and a.blob_name)

    @property
    def archive_name(self) -> str:
        """A download name without names or numbers in it (it ends up in browser histories)."""
        return f"patient-export-{self.contact_id}-{self.generated_at.astimezone(UTC):%Y%m%d-%H%M%S}.zip"


# -- collect and record (on the caller's transaction) ----------------------------------------------


async def collect(
    *, session: AsyncSession, keys: KeyService, org_id: str, contact_id: str, now: datetime
) -> SubjectExport:
    """Load and decrypt one visible contact of the organisation with all its conversations."""
    contact = await contacts.get(session=session, org_id=org_id, contact_id=contact_id)
    org = await session.get(Organisation, org_id)
    assert org is not None  # the contact's foreign key guarantees it
    cipher = await keys.cipher(session, contact.dek_id)

    def text(sealed: bytes | None, table: str, column: str, row_id: str) -> str | None:
        return cipher.open_text(sealed, table, column, row_id)

    convs = (
        await session.execute(
            select(Conversation, Channel)
            .join(Channel, Channel.id == Conversation.channel_id)
            .where(Conversation.contact_id == contact.id, Conversation.org_id == org_id)
            .order_by(Conversation.created_at, Conversation.id)
        )
    ).all()
    conv_ids = [c.Conversation.id for c in convs]
    msgs: list[Message] = []
    files: dict[str, list[FileRecord]] = {}
    if conv_ids:
        msgs = list(
            (
                await session.execute(
                    select(Message)
                    .where(Message.conversation_id.in_(conv_ids), Message.org_id == org_id)
                    .order_by(Message.created_at, Message.id)
                )
            ).scalars()
        )
        atts = await session.execute(
            select(Attachment)
            .where(
                Attachment.message_id.in_(select(Message.id).where(Message.conversation_id.in_(conv_ids))),
                Attachment.org_id == org_id,
            )
            .order_by(Attachment.created_at, Attachment.id)
        )
        for a in atts.scalars():
            files.setdefault(a.message_id, []).append(
                FileRecord(
                    id=a.id,
                    message_id=a.message_id,
                    kind=a.kind,
                    mime_type=a.mime_type,
                    file_name=text(a.filename_enc, "attachments", "filename", a.id),
                    state=a.state,
                    error_reason=a.error_reason,
                    size=a.size,
                    blob_name=a.blob_name,
                    created_at=a.created_at,
                )
            )
    # A reply names the quoted message by the provider's id, unique per channel.
    by_external = {(m.channel_id, m.external_id): m.id for m in msgs if m.external_id}
    # A long text sent in parts is one message; its parts are listed in its details, not repeated.
    parts: dict[str, list[dict[str, Any]]] = {}
    for m in msgs:
        if m.parent_id:
            if m.external_id:  # a reply to a part quotes the whole message
                by_external[(m.channel_id, m.external_id)] = m.parent_id
            parts.setdefault(m.parent_id, []).append(
                {
                    "part": m.part_index,
                    "of": m.part_count,
                    "external_id": m.external_id,
                    "status": m.status,
                    "sent_at": _iso(m.sent_at),
                    "delivered_at": _iso(m.delivered_at),
                    "read_at": _iso(m.read_at),
                    "failed_at": _iso(m.failed_at),
                }
            )
    per_conv: dict[str, list[MessageRecord]] = {}
    for m in msgs:
        if m.parent_id:
            continue
        raw = text(m.raw_enc, "messages", "raw", m.id)
        per_conv.setdefault(m.conversation_id, []).append(
            MessageRecord(
                id=m.id,
                external_id=m.external_id,
                direction=m.direction,
                type=m.type,
                status=m.status,
                created_at=m.created_at,
                provider_ts=m.provider_ts,
                sent_at=m.sent_at,
                delivered_at=m.delivered_at,
                read_at=m.read_at,
                failed_at=m.failed_at,
                text=text(m.body_enc, "messages", "body", m.id),
                template_name=m.template_name,
                details={
                    **json.loads(text(m.details_enc, "messages", "details", m.id) or "{}"),
                    **({"parts": sorted(parts[m.id], key=lambda p: p["part"] or 0)} if m.id in parts else {}),
                },
                raw=json.loads(raw) if raw else None,
                forwarded=bool(m.forwarded),
                context_external_id=m.context_external_id,
                context_message_id=by_external.get((m.channel_id, m.context_external_id))
                if m.context_external_id
                else None,
                error_reason=m.error_reason,
                error_code=m.error_code,
                error_title=m.error_title,
                review_reason=m.review_reason,
                attachments=tuple(files.get(m.id, ())),
            )
        )
    return SubjectExport(
        org_id=org_id,
        org_name=org.name,
        contact_id=contact.id,
        phone=text(contact.phone_enc, "contacts", "phone", contact.id),
        bsuid=text(contact.bsuid_enc, "contacts", "bsuid", contact.id),
        profile_name=text(contact.profile_name_enc, "contacts", "profile_name", contact.id),
        username=text(contact.username_enc, "contacts", "username", contact.id),
        name=text(contact.name_enc, "contacts", "name", contact.id),
        contact_created_at=contact.created_at,
        generated_at=now,
        conversations=tuple(
            ConversationRecord(
                id=conv.id,
                created_at=conv.created_at,
                last_activity_at=conv.last_activity_at,
                channel_id=ch.id,
                channel_kind=ch.kind,
                channel_name=ch.name,
                phone_number_id=ch.phone_number_id,
                display_phone_number=ch.display_phone_number,
                messages=tuple(per_conv.get(conv.id, ())),
            )
            for conv, ch in convs
        ),
        cipher=cipher,
        consent=tuple(
            {
                "state": e.state,
                "notice_version": e.notice_version,
                "via": e.via,
                "at": _iso(e.at),
                "conversation_id": e.conversation_id,
                "message_id": e.message_id,
                "external_id": e.external_id,
            }
            for e in await privacy.history(session, org_id=org_id, contact_id=contact.id)
        ),
    )


async def record(session: AsyncSession, export: SubjectExport, *, actor: Actor, now: datetime) -> None:
    """The ``contact.export`` audit entry: who exported which contact, how many messages and files."""
    await audit.record(
        session,
        org_id=export.org_id,
        actor=actor,
        action=ACTION,
        now=now,
        object_kind="contact",
        object_id=export.contact_id,
        details={"messages": export.messages, "attachments": export.files},
    )


# -- the archive (no database) ---------------------------------------------------------------------


def safe_filename(name: str | None, mime_type: str | None, fallback: str) -> str:
    """An ASCII file name without path parts, keeping (or adding) a fitting extension."""
    plain = unicodedata.normalize("NFKD", name or "").encode("ascii", "ignore").decode()
    plain = _UNSAFE.sub("_", plain).strip("._-")
    stem, dot, ext = plain.rpartition(".")
    if not dot or not stem or len(ext) > 8:
        stem, ext = plain, ""
    base_mime = (mime_type or "").split(";")[0].strip().lower()
    suffix = "." + ext if ext else _EXTENSIONS.get(base_mime) or mimetypes.guess_extension(base_mime) or ""
    return (stem[:80].rstrip("._-") or fallback) + suffix


@dataclass(frozen=True, slots=True)
class _Written:
    path: str | None
    size: int | None
    sha256: str | None
    state: str


class _Sink:
    """A write-only, unseekable file for ZipFile; the generator hands on what was written so far."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        """Keep a copy of the bytes until the next :meth:`take`."""
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered below us."""

    def take(self) -> bytes:
        """Everything written since the last call."""
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def _zip_time(dt: datetime, tz: tzinfo) -> tuple[int, int, int, int, int, int]:
    local = dt.astimezone(tz)
    return (max(local.year, 1980), local.month, local.day, local.hour, local.minute, local.second)


def _entry(name: str, dt: datetime, tz: tzinfo) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_zip_time(dt, tz))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o600 << 16
    return info


def stream(export: SubjectExport, *, blobs: BlobStore, lang: str, tz: tzinfo) -> Iterator[bytes]:
    """The ZIP archive as chunks of bytes; reads and decrypts attachment files one at a time."""
    sink = _Sink()
    written: dict[str, _Written] = {}
    with zipfile.ZipFile(cast(Any, sink), "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        zf.writestr(_entry("README.txt", export.generated_at, tz), readme(export, lang=lang, tz=tz))
        yield sink.take()
        for att in export.attachments:
            if att.state != "stored" or not att.blob_name:
                written[att.id] = _Written(None, att.size, None, att.state)
                continue
            try:
                data = blobs.get(cipher=export.cipher, attachment_id=att.id, name=att.blob_name)
            except (OSError, CryptoError) as exc:
                log.warning(
                    "export: attachment file unreadable",
                    extra={"message_id": att.message_id, "error": type(exc).__name__},
                )
                written[att.id] = _Written(None, att.size, None, "unreadable")
                continue
            path = "attachments/" + att.id + "-" + safe_filename(att.file_name, att.mime_type, att.kind)
            with zf.open(_entry(path, att.created_at, tz), "w") as dest:
                for start in range(0, len(data), CHUNK):
                    dest.write(data[start : start + CHUNK])
                    yield sink.take()
            written[att.id] = _Written(path, len(data), hashlib.sha256(data).hexdigest(), "included")
            del data
        doc = document(export, written, lang=lang)
        zf.writestr(
            _entry("data.json", export.generated_at, tz),
            json.dumps(doc, ensure_ascii=False, indent=1).encode(),
        )
        yield sink.take()
        zf.writestr(
            _entry("transcript.html", export.generated_at, tz), transcript(export, doc, lang=lang, tz=tz)
        )
        yield sink.take()
    yield sink.take()  # the central directory


def _iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat() if dt else None


def document(export: SubjectExport, written: dict[str, _Written], *, lang: str) -> dict[str, Any]:
    """The ``data.json`` content (see the module docstring for its shape)."""

    def att(a: FileRecord) -> dict[str, Any]:
        w = written.get(a.id) or _Written(None, a.size, None, a.state)
        return {
            "id": a.id,
            "kind": a.kind,
            "mime_type": a.mime_type,
            "file_name": a.file_name,
            "size": w.size,
            "sha256": w.sha256,
            "state": w.state,
            "path": w.path,
            "error_reason": a.error_reason,
        }

    def msg(m: MessageRecord) -> dict[str, Any]:
        has_error = m.error_reason or m.error_code is not None or m.error_title
        return {
            "id": m.id,
            "external_id": m.external_id,
            "direction": m.direction,
            "type": m.type,
            "status": m.status,
            "created_at": _iso(m.created_at),
            "provider_time": _iso(m.provider_ts),
            "sent_at": _iso(m.sent_at),
            "delivered_at": _iso(m.delivered_at),
            "read_at": _iso(m.read_at),
            "failed_at": _iso(m.failed_at),
            "text": m.text,
            "template": m.template_name,
            "details": m.details,
            "forwarded": m.forwarded,
            "reply_to": {"external_id": m.context_external_id, "message_id": m.context_message_id}
            if m.context_external_id
            else None,
            "error": {"reason": m.error_reason, "code": m.error_code, "title": m.error_title}
            if has_error
            else None,
            "review_reason": m.review_reason,
            "raw": m.raw,
            "attachments": [att(a) for a in m.attachments],
        }

    return {
        "format": FORMAT,
        "generated_at": _iso(export.generated_at),
        "language": lang,
        "organisation": {"id": export.org_id, "name": export.org_name},
        "contact": {
            "id": export.contact_id,
            "phone": "+" + export.phone if export.phone else None,
            "bsuid": export.bsuid,
            "profile_name": export.profile_name,
            "username": export.username,
            "name": export.name,
            "created_at": _iso(export.contact_created_at),
        },
        "conversations": [
            {
                "id": c.id,
                "created_at": _iso(c.created_at),
                "last_activity_at": _iso(c.last_activity_at),
                "channel": {
                    "id": c.channel_id,
                    "kind": c.channel_kind,
                    "name": c.channel_name,
                    "phone_number_id": c.phone_number_id,
                    "display_phone_number": c.display_phone_number,
                },
                "messages": [msg(m) for m in c.messages],
            }
            for c in export.conversations
        ],
        "consent": list(export.consent),
        "totals": {
            "conversations": len(export.conversations),
            "messages": export.messages,
            "attachments": len(export.attachments),
            "files": sum(1 for w in written.values() if w.state == "included"),
        },
    }


# -- human-readable parts --------------------------------------------------------------------------


def _local_time(value: datetime | str | None, lang: str, tz: tzinfo) -> str:
    if not value:
        return ""
    dt = datetime.fromisoformat(value) if isinstance(value, str) else value
    local = dt.astimezone(tz)
    return local.strftime("%d.%m.%Y %H:%M" if lang == "de" else "%Y-%m-%d %H:%M")


def transcript(export: SubjectExport, doc: dict[str, Any], *, lang: str, tz: tzinfo) -> bytes:
    """``transcript.html``: the export for people, rendered from the same document as ``data.json``."""
    gettext, ngettext = documents.gettext_for(lang)
    texts = {m["id"]: m["text"] for c in doc["conversations"] for m in c["messages"]}
    html = (
        documents.environment()
        .get_template("export/transcript.html")
        .render(
            doc=doc,
            lang=lang,
            quoted=texts,
            inline_images=INLINE_IMAGES,
            tz_name=str(tz),
            when=lambda v: _local_time(v, lang, tz),
            gettext=gettext,
            ngettext=ngettext,
            _=gettext,
        )
    )
    return html.encode()


def readme(export: SubjectExport, *, lang: str, tz: tzinfo) -> bytes:
    """``README.txt``: what the archive holds."""
    _ = translations(lang).gettext
    lines = [
        _("Copy of the data %(org)s holds about one patient (GDPR Art. 15 and 20)")
        % {"org": export.org_name},
        _("Created on %(time)s (time zone %(tz)s).")
        % {"time": _local_time(export.generated_at, lang, tz), "tz": str(tz)},
        "",
        _("This archive contains:"),
        "",
        "  transcript.html  "
        + _("all conversations to read in a web browser; unpack the archive first so that images show"),
        "  data.json        "
        + _("the same data in a machine-readable form (JSON, format %(format)s)") % {"format": FORMAT},
        "  attachments/     "
        + _(
            "the files (photos, documents, voice messages) exchanged in the conversations; "
            "files that are no longer stored are listed with their state"
        ),
        "  README.txt       " + _("this file"),
        "",
        _(
            "The archive is not encrypted and contains health data: keep it safe and delete it "
            "when it is no longer needed."
        ),
        "",
    ]
    return "\n".join(lines).encode()
