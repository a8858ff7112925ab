"""Message x of y (DSK II.2) through the real send path, the simulator and deletion (SQLite and PG)."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from tests.conftest import PNID
from tests.unit.test_parts import long_text

from pforte.audit.service import CLI
from pforte.contacts.models import Contact
from pforte.conversations import parts
from pforte.conversations import service as conv
from pforte.conversations.models import Conversation, Message
from pforte.deletion import service as deletion
from pforte.outbox.models import Job
from pforte.retention import sweeper


async def _conversation(world) -> str:
    """The patient writes (the 24-hour window opens) and has consented; returns the conversation id."""
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Guten Tag")
    await world.settle()
    async with world.services.db.transaction() as s:
        await s.execute(update(Contact).values(consent_state="given"))
        return (await s.execute(select(Conversation.id))).scalar_one()


async def _send_long(world, cid: str, text: str, **kw) -> Message:
    async with world.services.db.transaction() as s:
        return await conv.send_text(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=cid,
            user_id=world.staff_id,
            text=text,
            now=world.services.clock.now(),
            **kw,
        )


async def _rows(world, *where) -> list[Message]:
    async with world.services.db.transaction() as s:
        return list((await s.execute(select(Message).where(*where).order_by(Message.part_index))).scalars())


async def _view(world, cid: str) -> conv.ConversationView:
    async with world.services.db.transaction() as s:
        return await conv.get(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=cid,
            now=world.services.clock.now(),
        )


def _split_view(view: conv.ConversationView) -> conv.MessageView:
    (only,) = [m for m in view.messages if m.split is not None]
    return only


def _sent_parts(world) -> list:
    return [m for m in world.sim.business_messages(PNID, world.patient) if parts.parse_marker(m.text)]


async def _count(world, model, *where) -> int:
    async with world.services.db.transaction() as s:
        return int((await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one())


@pytest.mark.dsk("II.2")
async def test_long_text_goes_out_in_three_parts_and_is_complete_only_when_all_are_delivered(world, db_kind):
    cid = await _conversation(world)
    world.sim.config.auto_deliver = False  # the test delivers part by part
    text = long_text()
    logical = await _send_long(world, cid, text, client_key="form-1")
    # One logical message (the whole text, the form's key, never sent itself) and three parts.
    (row,) = await _rows(world, Message.id == logical.id)
    assert (row.parent_id, row.part_count, row.status, row.client_key) == (None, 3, "split", "form-1")
    part_rows = await _rows(world, Message.parent_id == logical.id)
    assert [(p.part_index, p.part_count, p.type, p.status) for p in part_rows] == [
        (i, 3, "text", "queued") for i in (1, 2, 3)
    ]
    async with world.services.db.transaction() as s:
        jobs = (await s.execute(select(Job).where(Job.kind == "send_message"))).scalars().all()
    queued_for = {j.payload["message_id"] for j in jobs}
    assert {p.id for p in part_rows} <= queued_for and logical.id not in queued_for
    # The same form again queues nothing new.
    with pytest.raises(conv.DuplicateSubmission):
        await _send_long(world, cid, text, client_key="form-1")

    await world.settle()
    sent = _sent_parts(world)
    assert sorted(m.text[:6] for m in sent) == ["(1/3) ", "(2/3) ", "(3/3) "]
    assert all(len(m.text) <= 4096 for m in sent)
    by_index = sorted(sent, key=lambda m: m.text[:6])
    assert " ".join(m.text[6:] for m in by_index) == text
    view = await _view(world, cid)
    shown = _split_view(view)
    assert shown.id == logical.id and shown.text == text
    assert (shown.status, shown.split.delivered, shown.split.total) == ("sent", 0, 3)
    assert not any(m.id in {p.id for p in part_rows} for m in view.messages)  # parts are not bubbles

    first = sent[0]  # the first part sent (the outbox may send them in any order; the markers tell)
    await world.sim.patient_delivered(user=world.patient, phone_number_id=PNID, upto_wamid=first.wamid)
    await world.settle()
    shown = _split_view(await _view(world, cid))
    assert (shown.status, shown.split.delivered) == ("sent", 1)

    await world.sim.patient_delivered(user=world.patient, phone_number_id=PNID)
    await world.settle()
    shown = _split_view(await _view(world, cid))
    assert (shown.status, shown.split.delivered) == ("complete", 3)
    assert [p.status for p in shown.parts] == ["delivered"] * 3
    # The conversation list shows the logical message's derived status as the last one.
    async with world.services.db.transaction() as s:
        (listed,) = await conv.list_(
            session=s, keys=world.services.keys, org_id=world.org_id, now=world.services.clock.now()
        )
    assert (listed.last_direction, listed.last_status) == ("out", "complete")


@pytest.mark.dsk("II.2")
@pytest.mark.parametrize("asynchronous", [False, True], ids=["refused", "failed-later"])
async def test_a_failed_part_shows_the_whole_message_failed_with_the_reason(world, db_kind, asynchronous):
    cid = await _conversation(world)
    world.sim.fail_next_send(PNID, 131026, asynchronous=asynchronous)
    logical = await _send_long(world, cid, long_text())
    await world.settle()
    part_rows = await _rows(world, Message.parent_id == logical.id)
    failed = [p for p in part_rows if p.status == "failed"]
    assert len(failed) == 1 and failed[0].error_reason == "undeliverable"
    shown = _split_view(await _view(world, cid))
    assert (shown.status, shown.error_reason, shown.split.failed_index) == (
        "failed",
        "undeliverable",
        failed[0].part_index,
    )
    assert shown.split.delivered == 2


@pytest.mark.dsk("II.2")
async def test_every_message_carries_a_content_hash_that_matches_its_content(world, db_kind):
    cid = await _conversation(world)
    logical = await _send_long(world, cid, long_text())
    await _send_long(world, cid, "Kurze Antwort")
    await world.settle()
    view = await _view(world, cid)
    for m in view.messages:
        assert m.hash_state == "match", (m.type, m.direction)
        assert m.content_hash is not None and len(m.content_hash) == 64
    shown = _split_view(view)
    assert shown.content_hash == parts.content_hash(direction="out", type_="text", body=long_text())
    assert [p.hash_state for p in shown.parts] == ["match"] * 3
    inbound = next(m for m in view.messages if m.direction == "in" and m.text == "Guten Tag")
    assert inbound.content_hash == parts.content_hash(direction="in", type_="text", body="Guten Tag")
    # Stored encrypted, bound to its row: the same ciphertext in another row does not open.
    (row,) = await _rows(world, Message.id == logical.id)
    assert (
        parts.content_hash(direction="out", type_="text", body=long_text()).encode()
        not in row.content_hash_enc
    )
    other = next(m for m in view.messages if m.id != logical.id)
    async with world.services.db.transaction() as s:
        await s.execute(
            update(Message).where(Message.id == other.id).values(content_hash_enc=row.content_hash_enc)
        )
    from pforte.errors import CryptoError

    with pytest.raises(CryptoError):
        await _view(world, cid)


@pytest.mark.dsk("II.2")
async def test_a_changed_body_no_longer_matches_its_hash(world, db_kind):
    cid = await _conversation(world)
    msg = await _send_long(world, cid, "Ihr Termin ist am Montag.")
    async with world.services.db.transaction() as s:
        contact = (await s.execute(select(Contact))).scalar_one()
        cipher = await world.services.keys.cipher(s, contact.dek_id)
        forged = cipher.seal_text("Ihr Termin ist am Dienstag.", "messages", "body", msg.id)
        await s.execute(update(Message).where(Message.id == msg.id).values(body_enc=forged))
    shown = next(m for m in (await _view(world, cid)).messages if m.id == msg.id)
    assert shown.hash_state == "mismatch"


@pytest.mark.dsk("II.2")
@pytest.mark.parametrize("target", ["logical", "part"])
async def test_deleting_a_split_message_deletes_its_parts(world, db_kind, target):
    cid = await _conversation(world)
    logical = await _send_long(world, cid, long_text())
    await world.settle()
    part_ids = [p.id for p in await _rows(world, Message.parent_id == logical.id)]
    victim = logical.id if target == "logical" else part_ids[1]
    async with world.services.db.transaction() as s:
        done = await deletion.delete_message(
            s,
            world.services.eraser,
            org_id=world.org_id,
            message_id=victim,
            actor=CLI,
            reason="staff",
            now=world.services.clock.now(),
        )
    assert done.object_id == logical.id and done.counts["parts"] == 3
    assert await _count(world, Message, Message.id.in_([logical.id, *part_ids])) == 0
    erased = {e.id for e in world.services.ledger.read() if e.kind == "message"}
    assert {logical.id, *part_ids} <= erased  # a restored backup loses the parts again too
    async with world.services.db.transaction() as s:
        last = (await s.execute(select(Conversation.last_message_id))).scalar_one()
        parent = (await s.execute(select(Message.parent_id).where(Message.id == last))).scalar_one()
    assert parent is None  # the conversation's last message is never a part


@pytest.mark.dsk("II.2")
async def test_retention_and_contact_erasure_remove_the_parts(world, db_kind):
    sv = world.services
    cid = await _conversation(world)
    logical = await _send_long(world, cid, long_text())
    await world.settle()
    assert await _count(world, Message, Message.parent_id == logical.id) == 3
    async with sv.db.transaction() as s:
        await s.execute(update(Conversation).values(last_activity_at=sv.clock.now() - timedelta(days=400)))
    report = await sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now())
    assert report.conversations == 1
    assert await _count(world, Message) == 0

    # Erasure: a new conversation with a split message, the contact shredded and purged.
    cid = await _conversation(world)
    logical = await _send_long(world, cid, long_text())
    await world.settle()
    assert await _count(world, Message, Message.parent_id == logical.id) == 3
    async with sv.db.transaction() as s:
        contact_id = (await s.execute(select(Conversation.contact_id))).scalar_one()
        await deletion.erase_contact(
            s,
            sv.eraser,
            org_id=world.org_id,
            contact_id=contact_id,
            actor=CLI,
            reason="erasure_request",
            now=sv.clock.now(),
        )
    await sweeper.purge_erased(sv.db, sv.eraser, report=sweeper.SweepReport())
    assert await _count(world, Message) == 0


@pytest.mark.dsk("II.2")
async def test_media_hashes_cover_the_file_and_a_deleted_file_is_reported_not_mismatched(world, db_kind):
    sv = world.services
    cid = await _conversation(world)
    photo = b"\x89PNG\r\n\x1a\n" + b"KNIE" * 50
    await world.sim.patient_send_media(
        user=world.patient,
        phone_number_id=PNID,
        kind="image",
        data=photo,
        mime_type="image/png",
        caption="Knie",
    )
    await world.settle()
    async with sv.db.transaction() as s:
        await conv.send_media(
            session=s,
            keys=sv.keys,
            blobs=sv.blobs,
            org_id=world.org_id,
            conversation_id=cid,
            user_id=world.staff_id,
            data=photo,
            mime_type="image/png",
            filename="befund.png",
            caption="Ihr Bild",
            now=sv.clock.now(),
            max_bytes=10_000_000,
        )
    await world.settle()
    images = [m for m in (await _view(world, cid)).messages if m.type == "image"]
    assert [(m.direction, m.hash_state) for m in images] == [("in", "match"), ("out", "match")]
    sha = base64.b64encode(hashlib.sha256(photo).digest()).decode()
    assert images[1].content_hash == parts.content_hash(
        direction="out", type_="image", body="Ihr Bild", media=[(sha, "befund.png")]
    )
    async with sv.db.transaction() as s:
        await deletion.delete_attachment(
            s,
            sv.eraser,
            org_id=world.org_id,
            attachment_id=images[0].attachments[0].id,
            actor=CLI,
            reason="staff",
            now=sv.clock.now(),
        )
    images = [m for m in (await _view(world, cid)).messages if m.type == "image"]
    assert [m.hash_state for m in images] == ["file_deleted", "match"]
