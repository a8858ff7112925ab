"""DSK I.7, IV.8, II.3: retention with an injected time, holds, rules, metadata classes, crash safety.

The sweeper takes ``now`` from its caller (the periodic job passes the services' clock), so these
tests move time by passing a later ``now`` instead of waiting, and backdate activity in the rows.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from tests.conftest import PNID
from typer.testing import CliRunner

from pforte.audit import service as audit
from pforte.audit.service import CLI
from pforte.cli import app as cli_app
from pforte.contacts.models import Contact
from pforte.conversations.models import Attachment, Conversation, Message, PendingStatus
from pforte.crypto.models import DataKey
from pforte.deletion import service as deletion
from pforte.deletion.models import Tombstone
from pforte.orgs import service as orgs
from pforte.outbox.models import Job
from pforte.retention import service as retention
from pforte.retention import sweeper
from pforte.staff.models import LoginAttempt, StaffSession

DAY = timedelta(days=1)


async def _patients(world, n: int) -> dict[str, str]:
    """``n`` patients with one message each (the i-th also sends a photo); name -> conversation id."""
    for i in range(n):
        u = world.sim.add_user(name=f"Patient {i}", wa_id=f"49176000100{i:02d}", user_id=f"DE.R{i:04d}")
        await world.sim.patient_send_text(user=u, phone_number_id=PNID, text=f"Nachricht {i}")
        if i == 0:
            await world.sim.patient_send_media(
                user=u,
                phone_number_id=PNID,
                kind="image",
                data=b"\x89PNG\r\n\x1a\n" + b"x" * 64,
                mime_type="image/png",
            )
        await world.settle()  # one patient after the other: webhooks arrive in any order otherwise
    async with world.services.db.transaction() as s:
        rows = (
            await s.execute(
                select(Conversation.id, Contact.id.label("cid"))
                .join(Contact, Contact.id == Conversation.contact_id)
                .order_by(Conversation.created_at)
            )
        ).all()
    assert len(rows) == n
    return {f"p{i}": r.id for i, r in enumerate(rows)}


async def _age(world, conversation_id: str, days: int) -> None:
    """Pretend the conversation's last activity was ``days`` ago."""
    async with world.services.db.transaction() as s:
        await s.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(last_activity_at=world.services.clock.now() - days * DAY)
        )


async def _exists(world, conversation_id: str) -> bool:
    async with world.services.db.transaction() as s:
        return (
            await s.execute(select(Conversation.id).where(Conversation.id == conversation_id))
        ).scalar() is not None


async def _count(world, model, *where) -> int:
    async with world.services.db.transaction() as s:
        return int((await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one())


@pytest.mark.dsk("I.7")
@pytest.mark.dsk("IV.8")
async def test_exactly_the_due_conversations_go_and_held_ones_stay(world, db_kind):
    sv = world.services
    c = await _patients(world, 5)
    await _age(world, c["p0"], 200)  # due under the default (180): goes, with its photo
    await _age(world, c["p1"], 100)  # not due
    await _age(world, c["p2"], 200)  # due but on legal hold: stays
    await _age(world, c["p3"], 200)  # due but tagged "befund", which is kept for ever: stays
    await _age(world, c["p4"], 181)  # due by one day: goes
    async with sv.db.transaction() as s:
        await retention.place_hold(
            s,
            org_id=world.org_id,
            target_kind="conversation",
            target_id=c["p2"],
            kind="legal",
            actor=CLI,
            now=sv.clock.now(),
        )
        await retention.set_tags(
            s, org_id=world.org_id, conversation_id=c["p3"], tags=["Befund"], actor=CLI, now=sv.clock.now()
        )
        await retention.set_rule(
            s, org_id=world.org_id, scope="tag", ref="befund", days=None, actor=CLI, now=sv.clock.now()
        )

    report = await sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now())

    assert [k for k in ("p0", "p1", "p2", "p3", "p4") if await _exists(world, c[k])] == ["p1", "p2", "p3"]
    assert (report.conversations, report.messages, report.attachments) == (2, 3, 1)
    assert report.kept_on_hold == 1
    # Their patients had nothing else: key and row erased in the same batch, photo file gone.
    assert (report.contacts_erased, report.contacts_purged) == (2, 0)
    assert await _count(world, Contact) == 3  # p1..p3 (the seeded patient never wrote)
    assert [p for p in sv.blobs.root.rglob("*") if p.is_file()] == []
    async with sv.db.transaction() as s:
        tombs = (await s.execute(select(Tombstone).where(Tombstone.kind == "conversation"))).scalars().all()
        assert sorted(t.object_id for t in tombs) == sorted([c["p0"], c["p4"]])
        assert {t.details["rule"] for t in tombs} == {"default"} and {t.reason for t in tombs} == {
            "retention"
        }
        assert (await audit.verify(s, world.org_id)).ok
    # Running again changes nothing.
    again = await sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now())
    assert (again.conversations, again.contacts_erased) == (0, 0)


async def test_moving_time_makes_the_rest_due_and_a_channel_rule_applies(world, db_kind):
    sv = world.services
    c = await _patients(world, 2)
    async with sv.db.transaction() as s:
        await retention.set_rule(
            s,
            org_id=world.org_id,
            scope="channel",
            ref=world.channel_id,
            days=30,
            actor=CLI,
            now=sv.clock.now(),
        )
    now = sv.clock.now()
    assert (await sweeper.run(sv.db, sv.eraser, sv.settings, now + 29 * DAY)).conversations == 0
    report = await sweeper.run(sv.db, sv.eraser, sv.settings, now + 31 * DAY)
    assert (
        report.conversations == 2 and not await _exists(world, c["p0"]) and not await _exists(world, c["p1"])
    )


async def test_retention_switched_off_deletes_nothing(world, db_kind):
    sv = world.services
    c = await _patients(world, 1)
    await _age(world, c["p0"], 400)
    async with sv.db.transaction() as s:
        await retention.set_org_retention(
            s, org_id=world.org_id, enabled=False, days=180, actor=CLI, now=sv.clock.now()
        )
    assert (await sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now())).conversations == 0
    assert await _exists(world, c["p0"])


async def test_the_periodic_job_runs_the_sweep(world, db_kind):
    sv = world.services
    c = await _patients(world, 1)
    await _age(world, c["p0"], 365)
    async with sv.db.transaction() as s:  # the last sweep (during set-up) was an interval ago
        await s.execute(
            update(Job).where(Job.kind == "retention_sweep").values(updated_at=sv.clock.now() - 2 * DAY)
        )
    await sv.outbox.run_periodic(force=True)  # the tick enqueues the sweep job ...
    await sv.outbox.drain()  # ... a worker runs it
    assert not await _exists(world, c["p0"])


async def test_dry_run_shows_what_would_go_and_why_and_changes_nothing(world, db_kind, monkeypatch):
    sv = world.services
    c = await _patients(world, 2)
    await _age(world, c["p0"], 200)
    await _age(world, c["p1"], 200)
    async with sv.db.transaction() as s:
        await retention.place_hold(
            s,
            org_id=world.org_id,
            target_kind="conversation",
            target_id=c["p1"],
            kind="legal",
            actor=CLI,
            now=sv.clock.now(),
        )
    monkeypatch.setenv("PFORTE_DATA_DIR", str(sv.settings.data_dir))
    monkeypatch.setenv("PFORTE_DATABASE_URL", sv.settings.effective_database_url)
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, ["retention", "run", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert any(
        line.startswith("delete") and c["p0"] in line and "default, 180 days" in line for line in lines
    )
    assert any(line.startswith("keep") and c["p1"] in line and "hold legal" in line for line in lines)
    assert await _exists(world, c["p0"]) and await _exists(world, c["p1"])
    assert await _count(world, Tombstone) == 0


@pytest.mark.dsk("II.3")
async def test_each_metadata_class_is_purged_after_its_own_period(world, db_kind):
    sv = world.services
    await _patients(world, 1)
    await world.login()
    async with sv.db.transaction() as s:
        conversation_id = (await s.execute(select(Conversation.id))).scalar_one()
    from pforte.conversations import service as conv

    async with sv.db.transaction() as s:
        await conv.send_text(
            session=s,
            keys=sv.keys,
            org_id=world.org_id,
            conversation_id=conversation_id,
            user_id=world.staff_id,
            text="Antwort",
            now=sv.clock.now(),
        )
    await world.settle()
    async with sv.db.transaction() as s:
        out = (await s.execute(select(Message).where(Message.direction == "out"))).scalar_one()
        assert out.status == "delivered" and out.sent_at and out.delivered_at
        sess = (await s.execute(select(StaffSession))).scalar_one()
        assert sess.ip and sess.user_agent
        s.add(
            PendingStatus(
                channel_id=world.channel_id,
                external_id="wamid.x",
                status="read",
                provider_ts=sv.clock.now(),
                received_at=sv.clock.now(),
            )
        )
    assert (await world.client.post("/logout")).status_code in (303, 403)  # keep the session row either way
    bad = await world.client.post("/login", data={"email": world.staff_email, "password": "falsch-falsch"})
    assert bad.status_code == 401
    assert await _count(world, LoginAttempt) == 1

    soon = await sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now() + 6 * DAY)
    assert soon.metadata == {k: 0 for k in soon.metadata}
    later = sv.clock.now() + 8 * DAY
    report = await sweeper.run(sv.db, sv.eraser, sv.settings, later)
    assert report.metadata["delivery_timestamps"] >= 1
    assert report.metadata["webhook_metadata"] == 1
    assert report.metadata["failed_logins"] == 1
    async with sv.db.transaction() as s:
        out = (await s.execute(select(Message).where(Message.direction == "out"))).scalar_one()
        assert out.status == "delivered"  # the final state stays ...
        assert (out.sent_at, out.delivered_at) == (None, None)  # ... its times go
        assert all(
            r.ip is None and r.user_agent is None for r in (await s.execute(select(StaffSession))).scalars()
        )
    assert await _count(world, PendingStatus) == 0
    assert await _count(world, LoginAttempt) == 0


async def test_a_sweeper_crash_mid_batch_is_finished_by_the_next_run(world, db_kind, monkeypatch):
    sv = world.services
    c = await _patients(world, 3)
    for k in c:
        await _age(world, c[k], 365)
    real = deletion._drop_conversation_rows

    async def crash_after_deleting(session, er, ids):
        await real(session, er, ids)  # rows deleted and files unlinked in the open transaction ...
        raise RuntimeError("power cut")  # ... then the process dies before the commit

    monkeypatch.setattr(deletion, "_drop_conversation_rows", crash_after_deleting)
    with pytest.raises(RuntimeError):
        await sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now())
    # The batch rolled back whole: all three conversations are still there (the photo file was
    # already removed: a row without a file, never a readable file without a row).
    assert all([await _exists(world, c[k]) for k in c])
    monkeypatch.setattr(deletion, "_drop_conversation_rows", real)
    report = await sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now())
    assert report.conversations == 3
    assert await _count(world, Message) == 0 and await _count(world, Attachment) == 0
    # No contact whose key is destroyed is left, and no blob file without its row.
    assert await _count(world, Contact, Contact.erased_at.is_not(None)) == 0
    assert await _count(world, DataKey, DataKey.wrapped.is_(None)) == 0
    assert [p for p in sv.blobs.root.rglob("*") if p.is_file()] == []


async def test_two_sweepers_at_once_delete_each_conversation_once(world, db_kind):
    sv = world.services
    c = await _patients(world, 6)
    for k in c:
        await _age(world, c[k], 365)
    settings = sv.settings.model_copy(update={"retention_batch": 2})
    a, b = await asyncio.gather(
        sweeper.run(sv.db, sv.eraser, settings, sv.clock.now()),
        sweeper.run(sv.db, sv.eraser, settings, sv.clock.now()),
    )
    assert a.conversations + b.conversations == 6
    assert await _count(world, Conversation) == 0
    assert await _count(world, Tombstone, Tombstone.kind == "conversation") == 6
    async with sv.db.transaction() as s:
        assert (await audit.verify(s, world.org_id)).ok


@pytest.mark.dsk("I.7")
async def test_two_admins_saving_different_settings_at_once_keep_both(world):
    """One admin changes the retention period while another switches read receipts on: each
    save rewrites the settings JSON, so each must start from the other's committed change."""
    sv = world.services

    async def retention_days() -> None:
        async with sv.db.transaction() as s:
            await retention.set_org_retention(
                s, org_id=world.org_id, enabled=True, days=30, actor=CLI, now=sv.clock.now()
            )
            await asyncio.sleep(0.5)  # saved, not yet committed, while the other admin saves

    async def read_receipts() -> None:
        async with sv.db.transaction() as s:
            await orgs.update_settings(
                session=s,
                org_id=world.org_id,
                changes={"send_read_receipts": True},
                actor=CLI,
                now=sv.clock.now(),
            )

    first = asyncio.create_task(retention_days())
    await asyncio.sleep(0.1)
    await asyncio.gather(first, read_receipts())
    async with sv.db.transaction() as s:
        org = await orgs.get(session=s, org_id=world.org_id)
        assert orgs.setting(org, "retention_days") == 30
        assert orgs.setting(org, "send_read_receipts") is True
