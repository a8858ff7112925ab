"""Data-subject export (GDPR Art. 15/20): the archive, file states, scoping, the CLI (SQLite and PG)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update
from tests.conftest import PNID
from tests.web.test_inbox import png
from typer.testing import CliRunner

from pforte.audit import service as audit
from pforte.audit.models import AuditEvent
from pforte.audit.service import Actor
from pforte.cli import app
from pforte.contacts import export as subject_export
from pforte.contacts.models import Contact
from pforte.conversations import service as conv
from pforte.conversations.models import Attachment, Conversation, Message
from pforte.deletion import service as deletion
from pforte.errors import NotFoundError

BERLIN = ZoneInfo("Europe/Berlin")
IMAGE = png(3, 2)
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"
FEVER = "Guten Tag, ich habe seit gestern Fieber."
MARKUP = '<script>alert("x")</script> & <b>fett</b>'
CAPTION = "Mein Ausschlag"
REPLY = "Bitte kommen Sie morgen um 9 Uhr."
UNDELIVERED = "Erinnerung: Termin morgen"
PHONE = "4915112345678"


@dataclass(frozen=True)
class Story:
    """What ``patient_story`` produced."""

    conversation_id: str
    contact_id: str
    first_message_id: str


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


async def patient_story(world: Any) -> Story:
    """Two texts (one with markup), an image with caption, a PDF, a quoting reply, a failed send."""
    sim, patient = world.sim, world.patient
    await sim.patient_send_text(user=patient, phone_number_id=PNID, text=FEVER)
    await world.settle()
    await sim.patient_send_text(user=patient, phone_number_id=PNID, text=MARKUP)
    await world.settle()
    await sim.patient_send_media(
        user=patient, phone_number_id=PNID, kind="image", data=IMAGE, mime_type="image/png", caption=CAPTION
    )
    await world.settle()
    await sim.patient_send_media(
        user=patient,
        phone_number_id=PNID,
        kind="document",
        data=PDF,
        mime_type="application/pdf",
        filename="Befund März.pdf",
    )
    await world.settle()
    async with world.services.db.transaction() as s:
        c = (await s.execute(select(Conversation))).scalars().one()
        first = (
            await s.execute(select(Message.id).order_by(Message.created_at, Message.id).limit(1))
        ).scalar_one()
    await _send(world, c.id, REPLY, reply_to=first)
    world.sim.fail_next_send(PNID, 131026)
    await _send(world, c.id, UNDELIVERED)
    return Story(conversation_id=c.id, contact_id=c.contact_id, first_message_id=first)


def unzip(blob: bytes) -> zipfile.ZipFile:
    """Open an archive and check every entry's CRC."""
    zf = zipfile.ZipFile(io.BytesIO(blob))
    assert zf.testzip() is None
    return zf


async def export_bytes(world: Any, contact_id: str, lang: str = "de", org_id: str | None = None) -> bytes:
    """Collect (and record) an export as a staff member would, then build the archive."""
    async with world.services.db.transaction() as s:
        now = world.services.clock.now()
        data = await subject_export.collect(
            session=s, keys=world.services.keys, org_id=org_id or world.org_id, contact_id=contact_id, now=now
        )
        await subject_export.record(s, data, actor=Actor.staff(world.staff_id), now=now)
    return b"".join(subject_export.stream(data, blobs=world.services.blobs, lang=lang, tz=BERLIN))


async def export_entries(world: Any) -> list[AuditEvent]:
    """The ``contact.export`` audit entries of the test organisation."""
    async with world.services.db.transaction() as s:
        return await audit.list_(s, org_id=world.org_id, action="contact.export")


async def test_the_archive_holds_every_message_decrypted_and_every_file_intact(world):
    story = await patient_story(world)
    zf = unzip(await export_bytes(world, story.contact_id))
    names = zf.namelist()
    assert names[0] == "README.txt" and names[-2:] == ["data.json", "transcript.html"]
    doc = json.loads(zf.read("data.json"))
    assert doc["format"] == "pforte.subject-export/1" and doc["language"] == "de"
    assert doc["organisation"] == {"id": world.org_id, "name": "Klinikum Test"}
    contact = doc["contact"]
    assert contact["id"] == story.contact_id
    assert contact["phone"] == "+" + PHONE
    assert contact["bsuid"] == world.patient.user_id
    assert contact["profile_name"] == "Erika Mustermann"
    assert contact["name"] is None
    [c] = doc["conversations"]
    assert c["id"] == story.conversation_id
    assert c["channel"] == {
        "id": world.channel_id,
        "kind": "whatsapp",
        "name": "Station 3",
        "phone_number_id": PNID,
        "display_phone_number": "+49 30 1234567",
    }
    msgs = c["messages"]
    assert [(m["direction"], m["type"], m["text"]) for m in msgs] == [
        ("in", "text", FEVER),
        ("in", "text", MARKUP),
        ("in", "image", CAPTION),
        ("in", "document", None),
        ("out", "text", REPLY),
        ("out", "text", UNDELIVERED),
    ]
    assert all(m["external_id"] for m in msgs[:5])
    assert msgs[4]["reply_to"]["message_id"] == story.first_message_id == msgs[0]["id"]
    assert msgs[4]["status"] in ("sent", "delivered") and msgs[4]["error"] is None
    assert msgs[5]["status"] == "failed"
    assert msgs[5]["error"] == {"reason": "undeliverable", "code": 131026, "title": msgs[5]["error"]["title"]}
    image, pdf = msgs[2]["attachments"][0], msgs[3]["attachments"][0]
    for att, content, mime in ((image, IMAGE, "image/png"), (pdf, PDF, "application/pdf")):
        assert att["state"] == "included" and att["mime_type"] == mime
        assert att["path"] == f"attachments/{att['id']}-" + att["path"].split("-", 1)[1]
        assert zf.read(att["path"]) == content
        assert att["sha256"] == hashlib.sha256(content).hexdigest() and att["size"] == len(content)
    assert pdf["file_name"] == "Befund März.pdf" and pdf["path"].endswith("-Befund_Marz.pdf")
    assert image["path"].endswith(".png")
    assert doc["totals"] == {"conversations": 1, "messages": 6, "attachments": 2, "files": 2}
    assert sorted(n for n in names if n.startswith("attachments/")) == sorted([image["path"], pdf["path"]])

    html = zf.read("transcript.html").decode()
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;fett&lt;/b&gt;" in html
    assert "<script" not in html and "<b>fett" not in html
    for text in (FEVER, CAPTION, REPLY, UNDELIVERED, "Erika Mustermann", "+" + PHONE):
        assert text in html
    assert f'<img src="{image["path"]}"' in html and f'href="{pdf["path"]}"' in html
    assert "http://" not in html and "https://" not in html and "<link" not in html
    assert "Export der Patientendaten" in html and "Unterhaltung über „Station 3“" in html
    readme = zf.read("README.txt").decode()
    assert "Dieses Archiv enthält:" in readme and "data.json" in readme


async def test_the_transcript_and_readme_follow_the_language(world):
    story = await patient_story(world)
    zf = unzip(await export_bytes(world, story.contact_id, lang="en"))
    assert json.loads(zf.read("data.json"))["language"] == "en"
    html = zf.read("transcript.html").decode()
    assert '<html lang="en">' in html and "Patient data export" in html
    assert "Conversation over “Station 3”" in html
    assert "This archive contains:" in zf.read("README.txt").decode()


@pytest.mark.dsk("I.7")
async def test_files_that_are_not_stored_are_listed_with_their_state_and_not_included(world):
    story = await patient_story(world)
    async with world.services.db.transaction() as s:
        image, pdf = (
            await s.execute(select(Attachment).order_by(Attachment.created_at, Attachment.id))
        ).scalars()
        await deletion.delete_attachment(
            s,
            world.services.eraser,
            org_id=world.org_id,
            attachment_id=image.id,
            actor=Actor.staff(world.staff_id),
            reason="staff",
            now=world.services.clock.now(),
        )
        await s.execute(
            update(Attachment)
            .where(Attachment.id == pdf.id)
            .values(state="failed", error_reason="media_integrity", blob_name=None)
        )
    zf = unzip(await export_bytes(world, story.contact_id))
    assert [n for n in zf.namelist() if n.startswith("attachments/")] == []
    msgs = json.loads(zf.read("data.json"))["conversations"][0]["messages"]
    listed = [a for m in msgs for a in m["attachments"]]
    assert [(a["id"], a["state"], a["path"], a["sha256"]) for a in listed] == [
        (image.id, "deleted", None, None),
        (pdf.id, "failed", None, None),
    ]
    assert listed[1]["error_reason"] == "media_integrity"
    html = zf.read("transcript.html").decode()
    assert "Die Datei wurde gelöscht." in html
    assert "Die Datei wurde bei der Übertragung beschädigt." in html


async def test_a_vanished_file_is_listed_as_unreadable_not_promised(world):
    story = await patient_story(world)
    async with world.services.db.transaction() as s:
        image = (
            await s.execute(select(Attachment).order_by(Attachment.created_at, Attachment.id).limit(1))
        ).scalar_one()
    world.services.blobs.delete(image.blob_name)
    zf = unzip(await export_bytes(world, story.contact_id))
    doc = json.loads(zf.read("data.json"))
    states = [a["state"] for m in doc["conversations"][0]["messages"] for a in m["attachments"]]
    assert states == ["unreadable", "included"]
    assert doc["totals"]["files"] == 1
    assert len([n for n in zf.namelist() if n.startswith("attachments/")]) == 1


async def test_the_export_is_recorded_in_the_audit_log_with_counts_only(world):
    story = await patient_story(world)
    await export_bytes(world, story.contact_id)
    [entry] = await export_entries(world)
    assert (entry.actor_kind, entry.actor_id) == ("staff", world.staff_id)
    assert (entry.object_kind, entry.object_id) == ("contact", story.contact_id)
    assert entry.details == {"messages": 6, "attachments": 2}
    async with world.services.db.transaction() as s:
        assert (await audit.verify(s, world.org_id)).ok


async def test_another_organisations_contact_is_not_found(world):
    story = await patient_story(world)
    other = await world.add_other_org("admin@andere.test", role="admin")
    with pytest.raises(NotFoundError):
        await export_bytes(world, story.contact_id, org_id=other)
    assert await export_entries(world) == []


@pytest.mark.dsk("I.7")
async def test_an_erased_contact_cannot_be_exported(world):
    story = await patient_story(world)
    async with world.services.db.transaction() as s:
        await deletion.erase_contact(
            s,
            world.services.eraser,
            org_id=world.org_id,
            contact_id=story.contact_id,
            actor=Actor.staff(world.staff_id),
            reason="erasure_request",
            now=world.services.clock.now(),
        )
    with pytest.raises(NotFoundError):
        await export_bytes(world, story.contact_id)
    assert await export_entries(world) == []


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


async def test_cli_finds_the_patient_by_phone_and_exports_audited_as_cli(world, cli, tmp_path: Path):
    story = await patient_story(world)
    shown = await cli("contact", "show", "--org", "klinikum", "--phone", "+49 151 1234 5678")
    assert shown.exit_code == 0, shown.output
    assert shown.output.startswith(story.contact_id)
    assert "conversations=1  messages=6  attachments=2" in shown.output
    assert PHONE not in shown.output and "Erika" not in shown.output

    out = tmp_path / "export.zip"
    r = await cli("contact", "export", "--org", "klinikum", "--phone", "+4915112345678", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"{out}: 1 conversations, 6 messages, 2 files"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    zf = unzip(out.read_bytes())
    doc = json.loads(zf.read("data.json"))
    assert doc["contact"]["id"] == story.contact_id
    assert [m["text"] for m in doc["conversations"][0]["messages"]][:2] == [FEVER, MARKUP]
    [entry] = await export_entries(world)
    assert (entry.actor_kind, entry.actor_id, entry.object_id) == ("cli", None, story.contact_id)
    assert entry.details == {"messages": 6, "attachments": 2}

    again = await cli(
        "contact", "export", "--org", "klinikum", "--contact", story.contact_id, "--out", str(out)
    )
    assert again.exit_code == 2 and "exists" in again.output
    assert len(await export_entries(world)) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--phone", "Erika"], "pforte: not a phone number"),
        (["--phone", "0151 12345678"], "international form"),
        (["--phone", "+49 30 999 999 99"], "pforte: no contact with this phone number"),
        (["--contact", "0" * 32], "pforte: contact not found"),
        (["--phone", "+4915112345678", "--contact", "x"], "exactly one of --contact"),
        ([], "exactly one of --contact"),
    ],
)
async def test_cli_bad_choice_of_patient_is_one_clear_line_and_exit_2(world, cli, tmp_path, args, message):
    await patient_story(world)
    out = tmp_path / "export.zip"
    r = await cli("contact", "export", "--org", "klinikum", *args, "--out", str(out))
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and message in r.output
    assert PHONE not in r.output
    assert not out.exists()
    assert await export_entries(world) == []


async def test_cli_erased_or_other_org_contact_is_not_found(world, cli, tmp_path):
    story = await patient_story(world)
    await world.add_other_org("admin@andere.test", role="admin")
    r = await cli(
        "contact", "export", "--org", "andere", "--contact", story.contact_id, "--out", str(tmp_path / "a")
    )
    assert r.exit_code == 2 and "contact not found" in r.output
    async with world.services.db.transaction() as s:
        await s.execute(update(Contact).values(erased_at=world.services.clock.now()))
    r = await cli("contact", "show", "--org", "klinikum", "--phone", "+" + PHONE)
    assert r.exit_code == 2 and "no contact with this phone number" in r.output


async def test_cli_phone_shared_by_two_contacts_asks_for_the_id(world, cli, tmp_path):
    """A recycled number: two patients (two BSUIDs) with one phone number; export needs the id."""
    await patient_story(world)
    newcomer = world.sim.add_user(name="Max Neu", wa_id=PHONE)
    await world.sim.patient_send_text(user=newcomer, phone_number_id=PNID, text="Neu hier")
    await world.settle()
    shown = await cli("contact", "show", "--org", "klinikum", "--phone", "+" + PHONE)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.strip().splitlines()
    assert len(lines) == 2 and "messages=1 " in lines[0] and "messages=6 " in lines[1]  # newest first
    out = tmp_path / "export.zip"
    r = await cli("contact", "export", "--org", "klinikum", "--phone", "+" + PHONE, "--out", str(out))
    assert r.exit_code == 2 and "2 contacts have this phone number" in r.output
    assert not out.exists()
    r = await cli(
        "contact", "export", "--org", "klinikum", "--contact", lines[0].split()[0], "--out", str(out)
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(unzip(out.read_bytes()).read("data.json"))
    assert [m["text"] for m in doc["conversations"][0]["messages"]] == ["Neu hier"]
