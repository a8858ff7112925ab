"""DSK I.7 / DESIGN invariant 2: targeted deletion, crypto-shredding, tombstones, audit, holds.

Everything is filled through the real paths (signed webhooks from the simulator, media download,
staff replies through the outbox) and deleted through the service layer the inbox and CLI use.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from tests.conftest import PNID
from tests.helpers import all_rows
from tests.integration.test_encryption_at_rest import _search

from pforte.audit import service as audit
from pforte.audit.models import AuditEvent
from pforte.audit.service import CLI, Actor
from pforte.contacts.models import Contact
from pforte.conversations import service as conv
from pforte.conversations.models import Attachment, Conversation, Message
from pforte.crypto.keys import KeyService
from pforte.crypto.models import DataKey
from pforte.deletion import service as deletion
from pforte.deletion.models import Tombstone
from pforte.errors import CryptoError, NotFoundError
from pforte.outbox.models import Job
from pforte.retention import service as retention
from pforte.retention import sweeper

SECRET = "Befund: Verdacht auf Borreliose, Wanderröte am Knie"
PHOTO = b"\x89PNG\r\n\x1a\n" + b"WOUND-PHOTO-OF-PATIENT-A" * 30


async def _two_patients(world):
    """Patient A (text + photo + staff reply) and patient B (one text). Returns (conv A, conv B)."""
    a = world.sim.add_user(name="Agathe Ahrens", wa_id="4917600000001", user_id="DE.A0001")
    b = world.sim.add_user(name="Bruno Brandt", wa_id="4917600000002", user_id="DE.B0002")
    await world.sim.patient_send_text(user=a, phone_number_id=PNID, text=SECRET)
    await world.sim.patient_send_media(
        user=a, phone_number_id=PNID, kind="image", data=PHOTO, mime_type="image/png", caption="Knie"
    )
    await world.sim.patient_send_text(user=b, phone_number_id=PNID, text="Termin am Montag?")
    await world.settle()
    async with world.services.db.transaction() as s:
        rows = await conv.list_(
            session=s, keys=world.services.keys, org_id=world.org_id, now=world.services.clock.now()
        )
        by_name = {r.contact_name: r.id for r in rows}
        await conv.send_text(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=by_name["Agathe Ahrens"],
            user_id=world.staff_id,
            text="Bitte kommen Sie morgen vorbei",
            now=world.services.clock.now(),
        )
    await world.settle()
    return by_name["Agathe Ahrens"], by_name["Bruno Brandt"]


async def _count(world, model, **where) -> int:
    async with world.services.db.transaction() as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return int((await s.execute(q)).scalar_one())


async def _view(world, conversation_id):
    async with world.services.db.transaction() as s:
        return await conv.get(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=conversation_id,
            now=world.services.clock.now(),
        )


@pytest.mark.dsk("I.7")
async def test_erasing_a_contact_destroys_its_key_then_every_row_and_file(world, db_kind):
    conv_a, conv_b = await _two_patients(world)
    sv = world.services
    view_a = await _view(world, conv_a)
    blobs_before = [p for p in sv.blobs.root.rglob("*") if p.is_file()]
    assert len(blobs_before) == 1 and len(view_a.messages) == 3
    async with sv.db.transaction() as s:
        dek_id = (await s.execute(select(Contact.dek_id).where(Contact.id == view_a.contact_id))).scalar_one()
        done = await deletion.erase_contact(
            s,
            sv.eraser,
            org_id=world.org_id,
            contact_id=view_a.contact_id,
            actor=CLI,
            reason="erasure_request",
            now=sv.clock.now(),
        )
    assert done.counts == {"conversations": 1}
    # Shredded: the key is gone at once, so even a fresh process (no cache) cannot read A's rows.
    async with sv.db.transaction() as s:
        wrapped = (await s.execute(select(DataKey.wrapped).where(DataKey.id == dek_id))).scalar_one()
        assert wrapped is None
        fresh = KeyService(sv.keys.provider)
        with pytest.raises(CryptoError):
            await fresh.cipher(s, dek_id)
    # ... and hidden from the inbox before the rows are gone.
    with pytest.raises(NotFoundError):
        await _view(world, conv_a)
    report = sweeper.SweepReport()
    await sweeper.purge_erased(sv.db, sv.eraser, report=report)
    assert report.contacts_purged == 1
    assert await _count(world, Message, contact_id=view_a.contact_id) == 0
    assert await _count(world, Attachment, contact_id=view_a.contact_id) == 0
    assert await _count(world, Conversation, id=conv_a) == 0
    assert await _count(world, Contact, id=view_a.contact_id) == 0
    assert await _count(world, DataKey, id=dek_id) == 0
    assert [p for p in sv.blobs.root.rglob("*") if p.is_file()] == []
    # B is untouched and readable.
    assert [m.text for m in (await _view(world, conv_b)).messages] == ["Termin am Montag?"]
    # A tombstone and an audit entry, with ids and counts but no content.
    async with sv.db.transaction() as s:
        (tomb,) = (await s.execute(select(Tombstone))).scalars().all()
        assert (tomb.kind, tomb.object_id, tomb.reason, tomb.actor_kind) == (
            "contact",
            view_a.contact_id,
            "erasure_request",
            "cli",
        )
        entries = (
            (await s.execute(select(AuditEvent).where(AuditEvent.action == "contact.delete"))).scalars().all()
        )
        assert [e.object_id for e in entries] == [view_a.contact_id]
        assert (await audit.verify(s, world.org_id)).ok
    # The erasure ledger (outside the database) names the key and the contact.
    kinds = {(e.kind, e.id) for e in sv.ledger.read()}
    assert {("data_key", dek_id), ("contact", view_a.contact_id)} <= kinds


@pytest.mark.dsk("I.7")
async def test_after_erasure_the_raw_database_and_blob_store_hold_no_trace(world, db_kind):
    conv_a, _ = await _two_patients(world)
    sv = world.services
    contact_id = (await _view(world, conv_a)).contact_id
    async with sv.db.transaction() as s:
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
    # The message rows were encrypted anyway; what matters is that no row of A survives at all,
    # including in SQLite's free pages and WAL once they are checkpointed and vacuumed by the operator.
    async with sv.db.transaction() as s:
        leftovers = (await s.execute(select(Message.id).where(Message.contact_id == contact_id))).all()
    assert leftovers == []
    for p in sv.blobs.root.rglob("*"):
        if p.is_file():
            assert _search(p.read_bytes(), p.name) == []
            assert PHOTO[:40] not in p.read_bytes()


async def test_a_patient_writing_again_after_erasure_starts_a_new_contact(world, db_kind):
    conv_a, _ = await _two_patients(world)
    sv = world.services
    old_contact = (await _view(world, conv_a)).contact_id
    async with sv.db.transaction() as s:
        await deletion.erase_contact(
            s,
            sv.eraser,
            org_id=world.org_id,
            contact_id=old_contact,
            actor=CLI,
            reason="erasure_request",
            now=sv.clock.now(),
        )
    a = next(u for u in world.sim.users.values() if u.user_id == "DE.A0001")
    await world.sim.patient_send_text(user=a, phone_number_id=PNID, text="Hallo nochmal")
    await world.settle()
    await sweeper.purge_erased(sv.db, sv.eraser, report=sweeper.SweepReport())
    async with sv.db.transaction() as s:
        rows = await conv.list_(session=s, keys=sv.keys, org_id=world.org_id, now=sv.clock.now())
    agathe = [r for r in rows if r.contact_name == "Agathe Ahrens"]
    assert len(agathe) == 1 and agathe[0].id != conv_a
    assert [m.text for m in (await _view(world, agathe[0].id)).messages] == ["Hallo nochmal"]


async def test_deleting_one_message_removes_it_its_file_and_leaves_the_rest(world, db_kind):
    conv_a, _ = await _two_patients(world)
    sv = world.services
    view = await _view(world, conv_a)
    photo_msg = next(m for m in view.messages if m.attachments)
    async with sv.db.transaction() as s:
        done = await deletion.delete_message(
            s,
            sv.eraser,
            org_id=world.org_id,
            message_id=photo_msg.id,
            actor=Actor.staff("u1"),
            reason="staff",
            now=sv.clock.now(),
        )
    assert done.counts == {"attachments": 1, "files": 1}
    after = await _view(world, conv_a)
    assert [m.text for m in after.messages] == [SECRET, "Bitte kommen Sie morgen vorbei"]
    assert [p for p in sv.blobs.root.rglob("*") if p.is_file()] == []
    assert await _count(world, Tombstone, kind="message", object_id=photo_msg.id) == 1
    # Deleting it again is a clear "not found", nothing else changes.
    with pytest.raises(NotFoundError):
        async with sv.db.transaction() as s:
            await deletion.delete_message(
                s,
                sv.eraser,
                org_id=world.org_id,
                message_id=photo_msg.id,
                actor=CLI,
                reason="staff",
                now=sv.clock.now(),
            )
    assert await _count(world, Tombstone) == 1


async def test_deleting_an_attachment_keeps_the_message_and_says_so(world, db_kind):
    conv_a, _ = await _two_patients(world)
    sv = world.services
    view = await _view(world, conv_a)
    att = next(a for m in view.messages for a in m.attachments)
    async with sv.db.transaction() as s:
        await deletion.delete_attachment(
            s,
            sv.eraser,
            org_id=world.org_id,
            attachment_id=att.id,
            actor=CLI,
            reason="staff",
            now=sv.clock.now(),
        )
    after = await _view(world, conv_a)
    assert [a.state for m in after.messages for a in m.attachments] == ["deleted"]
    assert "Knie" in [m.text for m in after.messages]  # the caption is part of the message, not the file
    with pytest.raises(NotFoundError):
        async with sv.db.transaction() as s:
            await conv.read_attachment(
                session=s, keys=sv.keys, blobs=sv.blobs, org_id=world.org_id, attachment_id=att.id
            )


async def test_deleting_a_conversation_keeps_the_contact(world, db_kind):
    conv_a, conv_b = await _two_patients(world)
    sv = world.services
    contact = (await _view(world, conv_a)).contact_id
    async with sv.db.transaction() as s:
        done = await deletion.delete_conversation(
            s,
            sv.eraser,
            org_id=world.org_id,
            conversation_id=conv_a,
            actor=CLI,
            reason="staff",
            now=sv.clock.now(),
        )
    assert done.counts == {"messages": 3, "attachments": 1, "files": 1}
    assert await _count(world, Contact, id=contact) == 1
    assert await _count(world, Message, conversation_id=conv_a) == 0
    assert len((await _view(world, conv_b)).messages) == 1


@pytest.mark.dsk("I.7")
async def test_holds_refuse_every_deletion_with_the_reason_and_change_nothing(world, db_kind):
    conv_a, _ = await _two_patients(world)
    sv = world.services
    view = await _view(world, conv_a)
    msg = view.messages[0]
    async with sv.db.transaction() as s:
        hold = await retention.place_hold(
            s,
            org_id=world.org_id,
            target_kind="message",
            target_id=msg.id,
            kind="treatment_undocumented",
            actor=CLI,
            now=sv.clock.now(),
        )
    attempts = [
        (deletion.delete_message, {"message_id": msg.id}),
        (deletion.delete_conversation, {"conversation_id": conv_a}),
        (deletion.erase_contact, {"contact_id": view.contact_id}),
    ]
    for fn, kw in attempts:
        with pytest.raises(deletion.HeldError) as err:
            async with sv.db.transaction() as s:
                await fn(
                    s, sv.eraser, org_id=world.org_id, actor=CLI, reason="staff", now=sv.clock.now(), **kw
                )
        assert err.value.kinds == ["treatment_undocumented"]
    async with sv.db.transaction() as s:
        with pytest.raises(deletion.HeldError):
            await deletion.delete_organisation(
                s, sv.eraser, org_id=world.org_id, actor=CLI, reason="organisation_closed", now=sv.clock.now()
            )
    assert len((await _view(world, conv_a)).messages) == 3
    assert await _count(world, Tombstone) == 0
    async with sv.db.transaction() as s:
        await retention.release_hold(s, org_id=world.org_id, hold_id=hold.id, actor=CLI, now=sv.clock.now())
    async with sv.db.transaction() as s:
        await deletion.delete_message(
            s,
            sv.eraser,
            org_id=world.org_id,
            message_id=msg.id,
            actor=CLI,
            reason="staff",
            now=sv.clock.now(),
        )
    assert len((await _view(world, conv_a)).messages) == 2


async def test_deleting_an_organisation_shreds_its_keys_rows_files_and_kek(world, db_kind):
    await _two_patients(world)
    sv = world.services
    other = await world.add_other_org("admin@andere.test", role="admin")
    async with sv.db.transaction() as s:
        done, kek_ids = await deletion.delete_organisation(
            s, sv.eraser, org_id=world.org_id, actor=CLI, reason="organisation_closed", now=sv.clock.now()
        )
    assert len(kek_ids) == 1
    kek_id = kek_ids[0]
    sv.keys.provider.destroy_kek(kek_id)
    assert done.counts == {"contacts": 2, "messages": 4, "files": 1}  # A: text, photo, reply; B: text
    assert kek_id not in sv.keys.provider.list_keks()
    for model in (Message, Contact, Conversation, Attachment, DataKey):
        assert await _count(world, model, org_id=world.org_id) == 0
    assert await _count(world, DataKey, org_id=other) == 2  # the other organisation keeps its keys
    assert [p for p in sv.blobs.root.rglob("*") if p.is_file()] == []
    async with sv.db.transaction() as s:
        tomb = (await s.execute(select(Tombstone).where(Tombstone.kind == "organisation"))).scalar_one()
        assert tomb.object_id == world.org_id
        assert (await audit.verify(s, "instance")).ok


async def test_unknown_reason_and_foreign_objects_are_refused(world, db_kind):
    conv_a, _ = await _two_patients(world)
    sv = world.services
    other = await world.add_other_org("admin@andere.test", role="admin")
    from pforte.errors import ValidationError

    with pytest.raises(ValidationError):
        async with sv.db.transaction() as s:
            await deletion.delete_conversation(
                s,
                sv.eraser,
                org_id=world.org_id,
                conversation_id=conv_a,
                actor=CLI,
                reason="because",
                now=sv.clock.now(),
            )
    with pytest.raises(NotFoundError):
        async with sv.db.transaction() as s:
            await deletion.delete_conversation(
                s,
                sv.eraser,
                org_id=other,
                conversation_id=conv_a,
                actor=CLI,
                reason="staff",
                now=sv.clock.now(),
            )
    assert len((await _view(world, conv_a)).messages) == 3


@pytest.mark.dsk("I.7")
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)  # about SQLite's file format
async def test_a_deleted_message_leaves_no_ciphertext_in_the_sqlite_file(world, db_kind):
    """secure_delete: freed pages are zeroed, so the (still decryptable) ciphertext is really gone."""
    from sqlalchemy import text

    conv_a, _ = await _two_patients(world)
    sv = world.services
    async with sv.db.transaction() as s:
        mid, body = (
            await s.execute(
                select(Message.id, Message.body_enc).where(Message.conversation_id == conv_a).limit(1)
            )
        ).one()
    assert body and len(body) > 40

    def raw() -> bytes:
        path = sv.settings.effective_database_url.split(":///", 1)[1]
        out = b""
        for suffix in ("", "-wal"):
            try:
                with open(path + suffix, "rb") as fh:
                    out += fh.read()
            except FileNotFoundError:
                pass
        return out

    async with sv.db.engine.begin() as c:
        await c.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    assert body in raw()  # the search can see it while it exists
    async with sv.db.transaction() as s:
        await deletion.delete_message(
            s, sv.eraser, org_id=world.org_id, message_id=mid, actor=CLI, reason="staff", now=sv.clock.now()
        )
    async with sv.db.engine.begin() as c:
        await c.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    assert body not in raw()


class _DeletesDuringDownload(httpx.AsyncBaseTransport):
    """Runs ``during`` (a deletion, committed) when the download asks the provider for the file."""

    def __init__(self, inner: httpx.AsyncBaseTransport, during: Any) -> None:
        self.inner, self.during, self.ran = inner, during, False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and not self.ran:
            self.ran = True
            await self.during()
        return await self.inner.handle_async_request(request)


@pytest.mark.dsk("I.7")
async def test_an_attachment_deleted_while_its_download_runs_stays_deleted_and_leaves_no_file(world, db_kind):
    sv = world.services

    async def delete_it() -> None:
        (att,) = await all_rows(sv, Attachment)
        async with sv.db.transaction() as s:
            await deletion.delete_attachment(
                s,
                sv.eraser,
                org_id=world.org_id,
                attachment_id=att.id,
                actor=CLI,
                reason="staff",
                now=sv.clock.now(),
            )

    racing = _DeletesDuringDownload(sv.http._transport, delete_it)
    sv.http._transport = racing
    await world.sim.patient_send_media(
        user=world.patient,
        phone_number_id=PNID,
        kind="image",
        data=b"\xff\xd8\xff" + b"r" * 64,
        mime_type="image/jpeg",
    )
    await world.settle()
    assert racing.ran
    (att,) = await all_rows(sv, Attachment)
    assert (att.state, att.blob_name) == ("deleted", None)
    assert [p for p in sv.blobs.root.rglob("*") if p.is_file()] == []  # the fetched file went too
    (job,) = [j for j in await all_rows(sv, Job) if j.kind == "download_media"]
    assert job.state == "done"
