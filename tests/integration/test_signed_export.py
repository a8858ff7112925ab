"""Signed conversation export and its verification (DSK II.2, I.5), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select, update
from tests.conftest import PNID
from tests.unit.test_parts import long_text
from tests.web.test_inbox import png
from typer.testing import CliRunner

from pforte.audit import service as audit
from pforte.audit.service import CLI, Actor
from pforte.cli import app
from pforte.contacts.models import Contact
from pforte.conversations import parts
from pforte.conversations import service as conv
from pforte.conversations.models import Attachment, Conversation, Message
from pforte.crypto import signing
from pforte.deletion import service as deletion
from pforte.errors import ConflictError, NotFoundError, ValidationError
from pforte.exports import service as exports
from pforte.exports.verify import Result, verify
from pforte.staff.models import StaffUser

pytestmark = pytest.mark.dsk("II.2")

IMAGE = png(3, 2)
MARKUP = '<script>alert("x")</script> & <b>fett</b> Fieber'
CAPTION = "Mein Ausschlag"
REPLY = "Bitte kommen Sie morgen um 9 Uhr."
UNDELIVERED = "Erinnerung: Termin morgen"
LONG = long_text()


@dataclass(frozen=True)
class Story:
    """The conversation ``story`` built, and the organisation's signing key."""

    conversation_id: str
    contact_id: str
    admin_id: str
    key: Any  # signing.KeyInfo, None without a key


async def _send(world: Any, conversation_id: str, text: str, reply_to: str | None = None) -> None:
    async with world.services.db.transaction() as s:
        await conv.send_text(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=conversation_id,
            user_id=world.staff_id,
            text=text,
            now=world.services.clock.now(),
            reply_to_message_id=reply_to,
        )
    await world.settle()


async def add_key(world: Any, admin_id: str, now: datetime) -> signing.KeyInfo:
    """A signing key of the test organisation, owned by its admin."""
    async with world.services.db.transaction() as s:
        return await signing.create(
            s, world.services.keys, org_id=world.org_id, owner_id=admin_id, now=now, actor=CLI
        )


async def admin_id_of(world: Any) -> str:
    """The test organisation's admin."""
    async with world.services.db.transaction() as s:
        return str(
            (await s.execute(select(StaffUser.id).where(StaffUser.email == world.admin_email))).scalar_one()
        )


async def story(world: Any, *, with_key: bool = True) -> Story:
    """A patient text (with markup) and image; a quoting reply, a 10,000-character text sent in three
    parts and read, and a failed send by staff; a signing key created two days ago."""
    sim, patient = world.sim, world.patient
    await sim.patient_send_text(user=patient, phone_number_id=PNID, text=MARKUP)
    await world.settle()
    await sim.patient_send_media(
        user=patient, phone_number_id=PNID, kind="image", data=IMAGE, mime_type="image/png", caption=CAPTION
    )
    await world.settle()
    async with world.services.db.transaction() as s:
        c = (await s.execute(select(Conversation))).scalars().one()
        first = (
            await s.execute(select(Message.id).order_by(Message.created_at, Message.id).limit(1))
        ).scalar_one()
    await _send(world, c.id, REPLY, reply_to=first)
    await _send(world, c.id, LONG)
    await sim.patient_read(user=patient, phone_number_id=PNID)
    await world.settle()
    sim.fail_next_send(PNID, 131026)
    await _send(world, c.id, UNDELIVERED)
    admin = await admin_id_of(world)
    key = await add_key(world, admin, world.services.clock.now() - timedelta(days=2)) if with_key else None
    return Story(conversation_id=c.id, contact_id=c.contact_id, admin_id=admin, key=key)


async def export(world: Any, st: Story, *, now: datetime | None = None, **kw: Any) -> exports.SignedExport:
    """Export the story's conversation in its own committed transaction."""
    async with world.services.db.transaction() as s:
        return await exports.create(
            s,
            world.services.keys,
            world.services.blobs,
            org_id=kw.pop("org_id", world.org_id),
            conversation_id=st.conversation_id,
            actor=kw.pop("actor", Actor.staff(st.admin_id)),
            now=now or world.services.clock.now(),
            **kw,
        )


async def check(world: Any, data: bytes) -> Result:
    """Verify against the instance's key registry."""
    async with world.services.db.transaction() as s:
        return await verify(data, registry=s)


async def export_entries(world: Any) -> list[Any]:
    """The ``conversation.export`` audit entries of the test organisation."""
    async with world.services.db.transaction() as s:
        return await audit.list_(s, org_id=world.org_id, action="conversation.export")


# -- tampering, as someone without the signing key would ----------------------------------------


def entries(data: bytes) -> dict[str, bytes]:
    """Every file of an archive, in order."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    return {n: zf.read(n) for n in zf.namelist()}


def rezip(files: dict[str, bytes]) -> bytes:
    """A new archive with exactly these files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def edit_messages(data: bytes, fn: Callable[[dict[str, Any]], None], *, rehash: bool = False) -> bytes:
    """Change messages.json; with ``rehash`` also fix the manifest's hashes (the signature stays)."""
    files = entries(data)
    doc = json.loads(files["messages.json"])
    fn(doc)
    files["messages.json"] = exports.json_bytes(doc)
    if rehash:
        files["manifest.json"] = rehashed_manifest(files, doc)
    return rezip(files)


def rehashed_manifest(files: dict[str, bytes], doc: dict[str, Any] | None = None) -> bytes:
    """The manifest with every file's SHA-256 and size (and the messages' hashes) recomputed."""
    manifest = json.loads(files["manifest.json"])
    for f in manifest["files"]:
        if f["path"] in files:
            f["sha256"] = hashlib.sha256(files[f["path"]]).hexdigest()
            f["size"] = len(files[f["path"]])
    if doc is not None:
        by_index = {m["index"]: m for m in doc["messages"]}
        for e in manifest["messages"]:
            if e["index"] in by_index:
                e["sha256"] = by_index[e["index"]]["sha256"]
    return exports.json_bytes(manifest)


def _message_hash(m: dict[str, Any]) -> str:
    return parts.content_hash(
        direction=m["direction"],
        type_=m["type"],
        body=m["text"],
        details=m["details"],
        media=[(a["media_sha256"], a["file_name"]) for a in m["attachments"]],
    )


# -- the round trip --------------------------------------------------------------------------------


async def test_export_holds_every_message_numbered_hashed_and_verifies(world):
    st = await story(world)
    made = await export(world, st)
    files = entries(made.data)
    image_path = next(n for n in files if n.startswith("attachments/"))
    assert set(files) == {"manifest.json", "signature.json", "messages.json", "transcript.html", image_path}

    doc = json.loads(files["messages.json"])
    assert doc["format"] == "pforte.conversation-export/1" and doc["count"] == 5
    assert (doc["organisation_id"], doc["conversation_id"], doc["contact_id"]) == (
        world.org_id,
        st.conversation_id,
        st.contact_id,
    )
    msgs = doc["messages"]
    assert [(m["index"], m["of"]) for m in msgs] == [(i, 5) for i in range(1, 6)]
    assert [(m["direction"], m["type"], m["text"]) for m in msgs] == [
        ("in", "text", MARKUP),
        ("in", "image", CAPTION),
        ("out", "text", REPLY),
        ("out", "text", LONG),
        ("out", "text", UNDELIVERED),
    ]
    assert msgs[0]["sender"] == {"kind": "patient", "staff_id": None, "name": None}
    assert msgs[2]["sender"] == {"kind": "staff", "staff_id": world.staff_id, "name": "Dr. Weiss"}
    assert msgs[2]["reply_to"]["index"] == 1 and msgs[2]["reply_to"]["message_id"] == msgs[0]["id"]
    assert msgs[2]["status"] in ("delivered", "read") and msgs[2]["sent_at"] and msgs[2]["delivered_at"]
    assert msgs[4]["status"] == "failed" and msgs[4]["error"]["code"] == 131026 and msgs[4]["failed_at"]
    for m in msgs:
        assert m["hash_check"] == "match" and m["sha256"] == _message_hash(m)

    split = msgs[3]
    assert split["part_count"] == 3 and split["status"] == "complete"
    assert [(p["index"], p["of"], p["status"]) for p in split["parts"]] == [(i, 3, "read") for i in (1, 2, 3)]
    for p in split["parts"]:
        assert p["text"].startswith(f"({p['index']}/3) ") and p["read_at"]
        assert p["sha256"] == parts.content_hash(direction="out", type_="text", body=p["text"])
        assert p["hash_check"] == "match"

    [image] = msgs[1]["attachments"]
    assert image["state"] == "included" and image["path"] == image_path
    assert image_path.startswith(f"attachments/{image['id']}-") and image_path.endswith(".png")
    assert files[image_path] == IMAGE
    assert (image["sha256"], image["size"]) == (hashlib.sha256(IMAGE).hexdigest(), len(IMAGE))

    manifest = json.loads(files["manifest.json"])
    assert (manifest["format"], manifest["version"]) == ("pforte.conversation-export", 1)
    assert manifest["message_count"] == 5 and manifest["attachment_count"] == 1
    assert manifest["range"] == {"from": None, "until": None}
    assert manifest["signed_by"] == {"key_id": st.key.id, "fingerprint": st.key.fingerprint}
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(files) - {"manifest.json", "signature.json"}
    for path, f in listed.items():
        assert (f["sha256"], f["size"]) == (hashlib.sha256(files[path]).hexdigest(), len(files[path]))
    assert [(e["index"], e["id"], e["sha256"], e["parts"]) for e in manifest["messages"]] == [
        (m["index"], m["id"], m["sha256"], m["part_count"]) for m in msgs
    ]
    assert [e["parts"] for e in manifest["messages"]] == [None, None, None, 3, None]

    sig = json.loads(files["signature.json"])
    assert (sig["algorithm"], sig["key_id"], sig["fingerprint"], sig["public_key"]) == (
        "ed25519",
        st.key.id,
        st.key.fingerprint,
        st.key.public_key,
    )
    assert datetime.fromisoformat(sig["signed_at"]) == datetime.fromisoformat(manifest["created_at"])
    assert signing.signature_matches(st.key.public_key, files["manifest.json"], sig["signature"])
    assert made.manifest_sha256 == hashlib.sha256(files["manifest.json"]).hexdigest()

    html = files["transcript.html"].decode()
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;fett&lt;/b&gt;" in html
    assert "<script" not in html and "<b>fett" not in html
    assert "http://" not in html and "https://" not in html and "<link" not in html
    for text in (CAPTION, REPLY, UNDELIVERED, LONG, "Dr. Weiss", "Nachricht 4 von 5", "Teil 3 von 3"):
        assert text in html
    assert f'<img src="{image_path}"' in html and msgs[3]["sha256"] in html

    result = await check(world, made.data)
    assert result.ok, result.problems
    assert result.problems == [] and result.notes == []
    assert result.summary.startswith(
        f"valid: 5 messages, 1 attachments, signed by key {st.key.fingerprint[:16]} "
        f"(owner {world.admin_email}) on "
    )


async def test_the_transcript_follows_the_language(world):
    st = await story(world)
    html = entries((await export(world, st, lang="en")).data)["transcript.html"].decode()
    assert '<html lang="en">' in html and "Message 4 of 5" in html and "Part 2 of 3" in html
    assert "Nachricht" not in html


async def test_a_period_exports_the_messages_created_in_it_numbered_from_one(world):
    st = await story(world)
    now = world.services.clock.now()
    async with world.services.db.transaction() as s:
        old = list(
            (
                await s.execute(
                    select(Message.id)
                    .where(Message.parent_id.is_(None))
                    .order_by(Message.created_at, Message.id)
                    .limit(2)
                )
            ).scalars()
        )
        await s.execute(update(Message).where(Message.id.in_(old)).values(created_at=now - timedelta(days=3)))
    made = await export(world, st, since=now - timedelta(days=1), until=now + timedelta(minutes=1))
    doc = json.loads(entries(made.data)["messages.json"])
    assert [(m["index"], m["of"], m["text"]) for m in doc["messages"]] == [
        (1, 3, REPLY),
        (2, 3, LONG),
        (3, 3, UNDELIVERED),
    ]
    # The quoted message is outside the period: named, but without a number.
    assert doc["messages"][0]["reply_to"] == {
        "external_id": doc["messages"][0]["reply_to"]["external_id"],
        "message_id": old[0],
        "index": None,
    }
    manifest = json.loads(entries(made.data)["manifest.json"])
    assert manifest["range"]["from"] == (now - timedelta(days=1)).isoformat()
    assert manifest["message_count"] == 3 and manifest["attachment_count"] == 0
    result = await check(world, made.data)
    assert result.ok and result.summary.startswith("valid: 3 messages, 0 attachments")
    [entry] = await export_entries(world)
    assert entry.details["messages"] == 3 and entry.details["from"] == manifest["range"]["from"]


def test_day_range_covers_whole_days_in_the_display_time_zone():
    since, until = exports.day_range("2025-03-01", "2025-03-31")
    assert since.isoformat() == "2025-02-28T23:00:00+00:00"
    assert until.isoformat() == "2025-03-31T22:00:00+00:00"  # 1 April, 00:00 summer time
    assert exports.day_range(None, None) == (None, None)
    with pytest.raises(ValidationError, match="not a date"):
        exports.day_range("31.03.2025", None)
    with pytest.raises(ValidationError, match="ends before it starts"):
        exports.day_range("2025-03-02", "2025-03-01")


async def test_a_deleted_file_is_listed_as_deleted_and_its_stored_hash_kept(world):
    st = await story(world)
    async with world.services.db.transaction() as s:
        image = (await s.execute(select(Attachment))).scalars().one()
        await deletion.delete_attachment(
            s,
            world.services.eraser,
            org_id=world.org_id,
            attachment_id=image.id,
            actor=Actor.staff(st.admin_id),
            reason="staff",
            now=world.services.clock.now(),
        )
    made = await export(world, st)
    files = entries(made.data)
    assert not [n for n in files if n.startswith("attachments/")]
    msg = json.loads(files["messages.json"])["messages"][1]
    assert msg["hash_check"] == "file_deleted"
    assert [(a["id"], a["state"], a["path"], a["sha256"]) for a in msg["attachments"]] == [
        (image.id, "deleted", None, None)
    ]
    assert "Die Datei wurde gelöscht." in files["transcript.html"].decode()
    result = await check(world, made.data)
    assert result.ok, result.problems
    assert result.notes == [
        "1 message(s) had a file deleted before the export; their content hashes are as stored and "
        "could not be recomputed"
    ]


# -- refusing to sign what is wrong ----------------------------------------------------------------


async def test_a_stored_hash_that_no_longer_matches_aborts_the_export(world):
    st = await story(world)
    async with world.services.db.transaction() as s:
        contact = await s.get(Contact, st.contact_id)
        cipher = await world.services.keys.cipher(s, contact.dek_id)
        target = (
            (await s.execute(select(Message).where(Message.direction == "out", Message.parent_id.is_(None))))
            .scalars()
            .first()
        )
        target.content_hash_enc = cipher.seal_text("0" * 64, "messages", "content_hash", target.id)
    with pytest.raises(exports.ExportIntegrityError) as err:
        await export(world, st)
    assert err.value.message_id == target.id and target.id in err.value.message
    assert err.value.code == "export_integrity" and REPLY not in err.value.message
    assert await export_entries(world) == []


async def test_without_an_active_signing_key_nothing_is_exported_or_audited(world):
    st = await story(world, with_key=False)
    with pytest.raises(ConflictError) as err:
        await export(world, st)
    assert err.value.code == "no_signing_key" and "no active signing key" in err.value.message
    now = world.services.clock.now()
    key = await add_key(world, st.admin_id, now - timedelta(days=1))
    async with world.services.db.transaction() as s:
        await signing.revoke(
            s, org_id=world.org_id, key_id=key.id, reason="test", now=now - timedelta(minutes=1), actor=CLI
        )
    with pytest.raises(ConflictError) as err:
        await export(world, st)
    assert err.value.code == "no_signing_key"
    assert await export_entries(world) == []


async def test_another_organisations_conversation_is_not_found(world):
    st = await story(world)
    other = await world.add_other_org("admin@andere.test", role="admin")
    with pytest.raises(NotFoundError):
        await export(world, st, org_id=other)
    assert await export_entries(world) == []


# -- the audit entry -------------------------------------------------------------------------------


async def test_the_export_is_audited_in_the_same_transaction(world):
    st = await story(world)

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with world.services.db.transaction() as s:
            await exports.build(
                s,
                world.services.keys,
                world.services.blobs,
                org_id=world.org_id,
                conversation_id=st.conversation_id,
                actor=Actor.staff(st.admin_id),
                now=world.services.clock.now(),
            )
            raise Abort
    assert await export_entries(world) == []  # rolled back with the transaction

    made = await export(world, st)
    [entry] = await export_entries(world)
    assert (entry.actor_kind, entry.actor_id) == ("staff", st.admin_id)
    assert (entry.object_kind, entry.object_id) == ("conversation", st.conversation_id)
    assert entry.details == {
        "from": None,
        "until": None,
        "messages": 5,
        "attachments": 1,
        "manifest_sha256": hashlib.sha256(entries(made.data)["manifest.json"]).hexdigest(),
        "key_id": st.key.id,
    }
    async with world.services.db.transaction() as s:
        assert (await audit.verify(s, world.org_id)).ok


# -- what verification catches ---------------------------------------------------------------------


async def test_a_changed_byte_in_messages_json_fails_naming_the_file(world):
    st = await story(world)
    data = (await export(world, st)).data

    def change(doc: dict[str, Any]) -> None:
        doc["messages"][0]["text"] = doc["messages"][0]["text"].replace("Fieber", "Fiebex")

    result = await check(world, edit_messages(data, change))
    assert not result.ok and result.summary.startswith("invalid:")
    assert (
        "messages.json does not match its SHA-256 in the manifest (the file was changed)" in result.problems
    )
    assert (
        "message 1 of 5: its content does not match its SHA-256 (the message was changed)" in result.problems
    )
    assert not any("signature" in p for p in result.problems)  # the manifest itself is intact


async def test_a_changed_text_with_a_rehashed_manifest_fails_the_signature(world):
    """An attacker without the key changes a text and fixes every hash: only the signature can tell."""
    st = await story(world)
    data = (await export(world, st)).data

    def change(doc: dict[str, Any]) -> None:
        m = doc["messages"][2]
        m["text"] = "Bitte kommen Sie nicht."
        m["sha256"] = _message_hash(m)

    result = await check(world, edit_messages(data, change, rehash=True))
    assert not result.ok
    assert result.problems == [
        f"signature refused: the signature does not match (key {st.key.fingerprint[:16]})"
    ]


async def test_a_removed_message_is_named_as_a_gap(world):
    st = await story(world)
    data = (await export(world, st)).data
    result = await check(world, edit_messages(data, lambda d: d["messages"].pop(1), rehash=True))
    assert not result.ok
    assert "message 2 of 5 is missing (a gap in the numbering)" in result.problems
    assert any(p.startswith("attachments/") and p.endswith("belongs to no message") for p in result.problems)


async def test_a_renumbered_or_repeated_message_is_named(world):
    st = await story(world)
    data = (await export(world, st)).data

    def repeat(doc: dict[str, Any]) -> None:
        doc["messages"][4]["index"] = 4

    result = await check(world, edit_messages(data, repeat, rehash=True))
    assert "message 4 of 5 appears more than once" in result.problems
    assert "message 5 of 5 is missing (a gap in the numbering)" in result.problems


async def test_a_missing_part_of_a_split_message_is_named(world):
    st = await story(world)
    data = (await export(world, st)).data
    result = await check(world, edit_messages(data, lambda d: d["messages"][3]["parts"].pop(1), rehash=True))
    assert not result.ok
    assert "message 4 of 5: part 2 of 3 is missing" in result.problems


async def test_a_removed_or_altered_attachment_is_named(world):
    st = await story(world)
    data = (await export(world, st)).data
    files = entries(data)
    path = next(n for n in files if n.startswith("attachments/"))
    image_id = path.split("/", 1)[1].split("-", 1)[0]

    removed = await check(world, rezip({n: b for n, b in files.items() if n != path}))
    assert not removed.ok
    assert f"{path} is missing (listed in the manifest)" in removed.problems
    assert f"message 2 of 5: attachment {image_id} ({path}) is missing from the archive" in removed.problems

    altered = await check(world, rezip({**files, path: png(4, 4)}))
    assert not altered.ok
    assert f"{path} does not match its SHA-256 in the manifest (the file was changed)" in altered.problems
    assert f"message 2 of 5: attachment {image_id} ({path}) does not match its SHA-256 and size" in (
        altered.problems
    )


async def test_an_added_file_or_a_missing_signature_is_named(world):
    st = await story(world)
    files = entries((await export(world, st)).data)
    added = await check(world, rezip({**files, "notes.txt": b"hello"}))
    assert added.problems == ["unexpected file notes.txt (not listed in the manifest)"]
    unsigned = await check(world, rezip({n: b for n, b in files.items() if n != "signature.json"}))
    assert unsigned.problems == ["signature.json is missing: the export is not signed"]
    broken = await check(world, b"PK\x03\x04 not really a zip")
    assert broken.problems == ["the file is not a readable ZIP archive"]


@pytest.mark.dsk("I.5")
async def test_a_key_revoked_after_the_export_leaves_it_valid(world):
    st = await story(world)
    now = world.services.clock.now()
    data = (await export(world, st, now=now)).data
    async with world.services.db.transaction() as s:
        await signing.revoke(
            s,
            org_id=world.org_id,
            key_id=st.key.id,
            reason="rotated",
            now=now + timedelta(hours=1),
            actor=CLI,
        )
    result = await check(world, data)
    assert result.ok, result.problems
    assert len(result.notes) == 1 and "was revoked on" in result.notes[0] and "(rotated)" in result.notes[0]
    assert "signed before that and stays valid" in result.notes[0]


@pytest.mark.dsk("I.5")
async def test_an_export_signed_after_the_revocation_is_refused_with_the_reason(world):
    st = await story(world)
    now = world.services.clock.now()
    data = (await export(world, st, now=now)).data
    # The key is found to have been compromised since an hour before this export was signed.
    async with world.services.db.transaction() as s:
        await signing.revoke(
            s,
            org_id=world.org_id,
            key_id=st.key.id,
            reason="compromised",
            now=now - timedelta(hours=1),
            actor=CLI,
        )
    result = await check(world, data)
    assert not result.ok
    [problem] = result.problems
    assert problem.startswith("signature refused: signed on ")
    assert "which was revoked on" in problem and "(compromised)" in problem
    assert "signatures made after a revocation are refused" in problem


@pytest.mark.dsk("I.5")
async def test_a_moved_signing_time_does_not_escape_the_revocation(world):
    """signed_at in signature.json is not signed; the manifest's signed created_at is what counts."""
    st = await story(world)
    now = world.services.clock.now()
    files = entries((await export(world, st, now=now)).data)
    async with world.services.db.transaction() as s:
        await signing.revoke(
            s,
            org_id=world.org_id,
            key_id=st.key.id,
            reason="compromised",
            now=now - timedelta(hours=1),
            actor=CLI,
        )
    sig = json.loads(files["signature.json"])
    sig["signed_at"] = (now - timedelta(hours=2)).isoformat()
    result = await check(world, rezip({**files, "signature.json": exports.json_bytes(sig)}))
    assert not result.ok
    assert "signature.json: signed_at differs from the manifest's (signed) created_at" in result.problems
    assert any("signatures made after a revocation are refused" in p for p in result.problems)


async def test_a_signature_by_another_organisations_key_is_refused(world):
    st = await story(world)
    now = world.services.clock.now()
    files = entries((await export(world, st, now=now)).data)
    other = await world.add_other_org("admin@andere.test", role="admin")
    async with world.services.db.transaction() as s:
        owner = (
            await s.execute(select(StaffUser.id).where(StaffUser.email == "admin@andere.test"))
        ).scalar_one()
        key = await signing.create(
            s, world.services.keys, org_id=other, owner_id=owner, now=now - timedelta(days=1), actor=CLI
        )
        sig = await signing.sign(s, world.services.keys, org_id=other, data=files["manifest.json"], now=now)
    doc = json.loads(files["signature.json"])
    doc.update(key_id=key.id, fingerprint=key.fingerprint, public_key=key.public_key, signature=sig.signature)
    result = await check(world, rezip({**files, "signature.json": exports.json_bytes(doc)}))
    assert not result.ok
    assert "signature refused: the key belongs to another organisation than the export" in result.problems


async def test_offline_verification_with_the_public_key(world):
    st = await story(world)
    data = (await export(world, st)).data
    result = await verify(data, public_key_hex=st.key.public_key)
    assert result.ok, result.problems
    assert result.summary.startswith(
        f"valid: 5 messages, 1 attachments, signed by the given key {st.key.fingerprint[:16]}"
    )
    assert result.summary.endswith("(revocation not checked)")
    assert result.notes == [
        "checked offline against the given public key: whether the key was revoked or valid at the signing "
        "time could not be checked"
    ]
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    wrong = await verify(data, public_key_hex=other)
    assert not wrong.ok
    assert wrong.problems == [
        "signature.json names another public key than the given one",
        "the signature over manifest.json does not match the given public key "
        f"{signing.fingerprint_of(bytes.fromhex(other))[:16]}",
    ]
    with pytest.raises(ValueError, match="64 hexadecimal"):
        await verify(data, public_key_hex="abc")


# -- command line ----------------------------------------------------------------------------------


@pytest.fixture
def cli(world, monkeypatch):
    """``pforte …`` on the world's database and data directory (in a thread: it runs its own loop)."""
    monkeypatch.setenv("PFORTE_DATA_DIR", str(world.services.settings.data_dir))
    monkeypatch.setenv("PFORTE_DATABASE_URL", world.services.settings.database_url)
    runner = CliRunner()

    async def run(*args: str) -> Any:
        return await asyncio.to_thread(runner.invoke, app, list(args))

    return run


async def test_cli_exports_and_verifies(world, cli, tmp_path: Path):
    st = await story(world)
    out = tmp_path / "export.zip"
    args = ["export", "conversation", "--org", "klinikum", "--conversation", st.conversation_id]
    r = await cli(*args, "--out", str(out), "--lang", "en")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"{out}: 5 messages, 1 attachments, signed by key {st.key.fingerprint[:16]}")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert MARKUP not in r.output and "Erika" not in r.output
    [entry] = await export_entries(world)
    assert (entry.actor_kind, entry.actor_id, entry.object_id) == ("cli", None, st.conversation_id)

    ok = await cli("verify-export", str(out))
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith(f"valid: 5 messages, 1 attachments, signed by key {st.key.fingerprint[:16]}")
    as_json = await cli("verify-export", str(out), "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.output)["ok"] is True
    offline = await cli("verify-export", str(out), "--public-key", st.key.public_key)
    assert offline.exit_code == 0 and "(revocation not checked)" in offline.output

    bad = tmp_path / "bad.zip"
    bad.write_bytes(edit_messages(out.read_bytes(), lambda d: d["messages"].pop(0), rehash=True))
    refused = await cli("verify-export", str(bad))
    assert refused.exit_code == 1
    assert refused.output.startswith("invalid: ")
    assert "  - message 1 of 5 is missing (a gap in the numbering)" in refused.output
    listed = json.loads((await cli("verify-export", str(bad), "--json")).output)
    assert (
        listed["ok"] is False and "message 1 of 5 is missing (a gap in the numbering)" in listed["problems"]
    )

    again = await cli(*args, "--out", str(out))
    assert again.exit_code == 2 and "exists" in again.output
    wrong_key = await cli("verify-export", str(out), "--public-key", "xyz")
    assert wrong_key.exit_code == 2 and "64 hexadecimal" in wrong_key.output
    assert len(await export_entries(world)) == 1


async def test_cli_period_and_its_errors(world, cli, tmp_path: Path):
    st = await story(world)
    out = tmp_path / "export.zip"
    base = ["export", "conversation", "--org", "klinikum", "--conversation", st.conversation_id]
    today = world.services.clock.now().astimezone(exports.DISPLAY_TZ).date()
    r = await cli(
        *base,
        "--from",
        (today - timedelta(days=30)).isoformat(),
        "--to",
        today.isoformat(),
        "--out",
        str(out),
    )
    assert r.exit_code == 0, r.output
    assert json.loads(entries(out.read_bytes())["manifest.json"])["message_count"] == 5
    bad = await cli(*base, "--from", "gestern", "--out", str(tmp_path / "b.zip"))
    assert bad.exit_code == 2 and "from: not a date" in bad.output
    unknown = await cli(
        "export",
        "conversation",
        "--org",
        "klinikum",
        "--conversation",
        "0" * 32,
        "--out",
        str(tmp_path / "c.zip"),
    )
    assert unknown.exit_code == 2 and "conversation not found" in unknown.output
    assert not (tmp_path / "b.zip").exists() and not (tmp_path / "c.zip").exists()
    assert len(await export_entries(world)) == 1
