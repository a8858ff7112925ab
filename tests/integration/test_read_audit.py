"""Who saw what (DSK I.11): openings, file fetches, sends and ended sessions in the audit log.

On SQLite and PostgreSQL. Each entry is written in the transaction of what it records, names ids
only, and leaves the organisation's hash chain intact.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from tests.conftest import PNID
from tests.integration.test_privacy_chat import _privacy_on
from tests.web.test_inbox import HTML, csrf_of, first_conversation_id, htmx, png

from pforte.audit import service as audit
from pforte.audit.models import AuditEvent
from pforte.clock import FakeClock
from pforte.conversations import service as conv
from pforte.conversations.models import Attachment, Message
from pforte.staff import jobs as staff_jobs
from pforte.staff.models import StaffSession

pytestmark = pytest.mark.dsk("I.11")

CAPTION = "Foto vom Ausschlag am Arm"


async def _entries(world, action: str) -> list[AuditEvent]:
    async with world.services.db.transaction() as s:
        q = select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        return list((await s.execute(q)).scalars())


async def _chain_ok(world) -> None:
    async with world.services.db.transaction() as s:
        result = await audit.verify(s, world.org_id)
    assert result.ok, result.problem


def _fake_clock(world) -> FakeClock:
    """From now on the routes take their time from a clock the test sets (a round, later time)."""
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    clock = FakeClock(start)
    world.services.clock = clock
    return clock


async def _patient_sends_a_photo(world) -> None:
    await world.sim.patient_send_media(
        user=world.patient,
        phone_number_id=PNID,
        kind="image",
        data=png(),
        mime_type="image/png",
        caption=CAPTION,
    )
    await world.settle()


async def test_opening_a_conversation_and_its_file_is_recorded_with_who_and_when(world):
    await _patient_sends_a_photo(world)
    clock = _fake_clock(world)
    await world.login()
    cid = await first_conversation_id(world)
    async with world.services.db.transaction() as s:
        att = (await s.execute(select(Attachment))).scalar_one()

    assert (await world.client.get(f"/conversations/{cid}", headers=HTML)).status_code == 200
    (opened,) = await _entries(world, "conversation.open")
    assert (opened.actor_kind, opened.actor_id) == ("staff", world.staff_id)
    assert opened.at == clock.now()
    assert (opened.object_kind, opened.object_id) == ("conversation", cid)
    assert opened.details == {"contact_id": att.contact_id}

    clock.advance(minutes=2)
    shown = await world.client.get(f"/attachments/{att.id}")
    clock.advance(minutes=1)
    saved = await world.client.get(f"/attachments/{att.id}?download=1")
    assert shown.status_code == saved.status_code == 200
    assert saved.headers["content-disposition"].startswith("attachment;")
    inline, download = await _entries(world, "attachment.open")
    for entry, disposition, minutes in ((inline, "inline", 2), (download, "download", 3)):
        assert (entry.actor_kind, entry.actor_id) == ("staff", world.staff_id)
        assert entry.at == clock.now() - timedelta(minutes=3 - minutes)
        assert (entry.object_kind, entry.object_id) == ("attachment", att.id)
        assert entry.details == {
            "message_id": att.message_id,
            "conversation_id": cid,
            "disposition": disposition,
        }

    # Ids only: neither the patient's name, number nor the caption is in any entry.
    everything = json.dumps([e.details for e in await _all(world)])
    assert CAPTION not in everything and "Mustermann" not in everything and "4915112345678" not in everything
    await _chain_ok(world)


async def _all(world) -> list[AuditEvent]:
    async with world.services.db.transaction() as s:
        return list((await s.execute(select(AuditEvent))).scalars())


async def test_live_refreshes_are_not_openings_but_fetching_the_thread_otherwise_is(world):
    await _patient_sends_a_photo(world)
    await world.login()
    cid = await first_conversation_id(world)
    await world.client.get(f"/conversations/{cid}", headers=HTML)
    live = {"hx-request": "true", "x-pforte-refresh": "1"}
    for _ in range(3):  # what app.js does on every live event
        assert (
            await world.client.get(f"/conversations/{cid}/messages?seen=1", headers=live)
        ).status_code == 200
    assert len(await _entries(world, "conversation.open")) == 1
    # The same fragment fetched without the live-update mark shows the thread: it counts as an opening.
    assert (await world.client.get(f"/conversations/{cid}/messages")).status_code == 200
    assert len(await _entries(world, "conversation.open")) == 2
    # An id of nothing (or of another organisation) is not found and records nothing.
    assert (await world.client.get("/conversations/nope", headers=HTML)).status_code == 404
    assert (await world.client.get("/attachments/nope")).status_code == 404
    assert len(await _entries(world, "conversation.open")) == 2
    assert await _entries(world, "attachment.open") == []
    await _chain_ok(world)


async def test_a_staff_send_is_recorded_with_its_message(world):
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Guten Tag")
    await world.settle()
    clock = _fake_clock(world)
    await world.login()
    cid = await first_conversation_id(world)
    token = csrf_of((await world.client.get(f"/conversations/{cid}", headers=HTML)).text)
    sent = await world.client.post(
        f"/conversations/{cid}/messages", data={"text": "Bitte kommen Sie morgen."}, headers=htmx(token)
    )
    assert sent.status_code == 200
    tpl = await world.client.post(
        f"/conversations/{cid}/template",
        data={"template_id": world.template_id, "params": "Frau Mustermann"},
        headers=htmx(token),
    )
    assert tpl.status_code == 200
    async with world.services.db.transaction() as s:
        out = list(
            (
                await s.execute(
                    select(Message)
                    .where(Message.direction == "out")
                    .order_by(Message.created_at, Message.type)
                )
            ).scalars()
        )
    entries = await _entries(world, "message.send")
    assert {e.object_id for e in entries} == {m.id for m in out}
    by_id = {e.object_id: e for e in entries}
    for m in out:
        e = by_id[m.id]
        assert (e.actor_kind, e.actor_id, e.at) == ("staff", world.staff_id, clock.now())
        assert e.object_kind == "message"
        assert e.details == {"conversation_id": cid, "type": m.type}
    assert sorted(m.type for m in out) == ["template", "text"]
    assert "Mustermann" not in json.dumps([e.details for e in entries])
    await _chain_ok(world)


async def test_a_long_text_sent_in_parts_is_one_send(world):
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Guten Tag")
    await world.settle()
    async with world.services.db.transaction() as s:
        (row,) = await conv.list_(
            session=s, keys=world.services.keys, org_id=world.org_id, now=world.services.clock.now()
        )
        msg = await conv.send_text(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=row.id,
            user_id=world.staff_id,
            text="Befund " * 1000,  # more than one WhatsApp message holds
            now=world.services.clock.now(),
        )
    (entry,) = await _entries(world, "message.send")
    assert entry.object_id == msg.id and msg.part_count and msg.part_count > 1
    assert entry.details == {"conversation_id": row.id, "type": "text", "parts": msg.part_count}


class _BrokenBlobs:
    """A blob store whose disk is full."""

    def put(self, **_: Any) -> str:
        raise OSError("no space left on device")


async def test_a_send_that_fails_leaves_neither_message_nor_entry(world):
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Guten Tag")
    await world.settle()
    async with world.services.db.transaction() as s:
        (row,) = await conv.list_(
            session=s, keys=world.services.keys, org_id=world.org_id, now=world.services.clock.now()
        )
    # The entry is written before the file is stored; the failing store rolls both back together.
    with pytest.raises(OSError):
        async with world.services.db.transaction() as s:
            await conv.send_media(
                session=s,
                keys=world.services.keys,
                blobs=_BrokenBlobs(),  # type: ignore[arg-type]
                org_id=world.org_id,
                conversation_id=row.id,
                user_id=world.staff_id,
                data=png(),
                mime_type="image/png",
                filename="befund.png",
                caption=None,
                now=world.services.clock.now(),
                max_bytes=1 << 20,
            )
    async with world.services.db.transaction() as s:
        outgoing = (await s.execute(select(func.count()).where(Message.direction == "out"))).scalar_one()
    assert outgoing == 0
    assert await _entries(world, "message.send") == []
    await _chain_ok(world)


async def test_pfortes_own_messages_are_recorded_as_sent_by_the_system(world):
    await _privacy_on(world)
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Hallo")
    await world.settle()
    async with world.services.db.transaction() as s:
        out = {
            m.id: m
            for m in (await s.execute(select(Message).where(Message.direction == "out"))).scalars()
            if m.parent_id is None
        }
    entries = await _entries(world, "message.send")
    assert out and {e.object_id for e in entries} == set(out)  # the notice and the consent request
    assert {(e.actor_kind, e.actor_id) for e in entries} == {("system", None)}
    assert {e.details["type"] for e in entries} == {m.type for m in out.values()}
    await _chain_ok(world)


class _Periodic:
    """Stands in for the outbox worker: keeps what a domain registers to run periodically."""

    def __init__(self) -> None:
        self.tasks: dict[str, Any] = {}

    def every(self, name: str, _seconds: float, fn: Any) -> None:
        self.tasks[name] = fn


async def test_the_session_purge_records_each_ended_session(world, db_kind):
    await world.login()
    await world.login(world.admin_email)
    async with world.services.db.transaction() as s:
        sessions = list((await s.execute(select(StaffSession))).scalars())
    assert len(sessions) == 2
    by_user = {x.user_id: x for x in sessions}
    admin_id = next(u for u in by_user if u != world.staff_id)
    idle = timedelta(minutes=world.services.settings.session_idle_minutes)
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5))
    async with world.services.db.transaction() as s:
        # the staff member walked away; the admin kept working past the absolute time-out
        await s.execute(
            update(StaffSession)
            .where(StaffSession.user_id == world.staff_id)
            .values(last_seen_at=clock.now() - idle - timedelta(minutes=1))
        )
        await s.execute(
            update(StaffSession)
            .where(StaffSession.user_id == admin_id)
            .values(last_seen_at=clock.now(), expires_at=clock.now() - timedelta(seconds=1))
        )
    periodic = _Periodic()
    staff_jobs.register(periodic, clock=clock, idle=idle)  # type: ignore[arg-type]
    async with world.services.db.engine.begin() as conn:
        await periodic.tasks["purge_sessions"](conn)
    async with world.services.db.transaction() as s:
        assert (await s.execute(select(func.count()).select_from(StaffSession))).scalar_one() == 0
    ended = await _entries(world, "session.end")
    assert {(e.object_id, e.details["reason"]) for e in ended} == {
        (world.staff_id, "idle"),
        (admin_id, "absolute"),
    }
    for e in ended:
        assert (e.actor_kind, e.actor_id, e.object_kind, e.at) == ("system", None, "staff_user", clock.now())
        assert e.org_id == world.org_id
    # A second run finds nothing and records nothing.
    async with world.services.db.engine.begin() as conn:
        await periodic.tasks["purge_sessions"](conn)
    assert len(await _entries(world, "session.end")) == 2
    await _chain_ok(world)


async def test_a_failed_purge_removes_no_session_and_records_nothing(world, monkeypatch):
    await world.login()
    async with world.services.db.transaction() as s:
        await s.execute(
            update(StaffSession).values(expires_at=world.services.clock.now() - timedelta(seconds=1))
        )

    async def broken_record(*_: Any, **__: Any) -> str:
        raise RuntimeError("audit log unavailable")

    periodic = _Periodic()
    staff_jobs.register(periodic, clock=world.services.clock, idle=timedelta(minutes=30))  # type: ignore[arg-type]
    monkeypatch.setattr(staff_jobs.audit, "record", broken_record)
    with pytest.raises(RuntimeError):
        async with world.services.db.engine.begin() as conn:
            await periodic.tasks["purge_sessions"](conn)
    async with world.services.db.transaction() as s:
        assert (await s.execute(select(func.count()).select_from(StaffSession))).scalar_one() == 1
    assert await _entries(world, "session.end") == []
