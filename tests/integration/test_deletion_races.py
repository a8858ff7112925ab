"""DSK I.7: deletions, holds and arriving messages at the same moment.

Each test keeps one transaction open (done, not yet committed) while another starts, the moment a
read-then-write decides on what it read. The rule they prove (contacts.service.lock): a patient's
row is locked by every deletion of their data before it reads the holds, by placing a hold before
it looks at its target, and by the ingest when it finds the patient of a new message.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from tests.conftest import APP_SECRET, PNID
from tests.helpers import text_webhook

from pforte.audit.service import CLI
from pforte.channels import service as channels
from pforte.channels.whatsapp import webhook
from pforte.contacts.models import Contact
from pforte.conversations import service as conversations
from pforte.conversations.ingest import _Item
from pforte.conversations.models import Conversation, Message
from pforte.deletion import service as deletion
from pforte.deletion.models import Tombstone
from pforte.errors import NotFoundError
from pforte.orgs import service as orgs
from pforte.retention import service as retention
from pforte.retention import sweeper
from pforte.retention.models import Hold

PNID2 = "106540352242999"  # the clinic's second number
PHONE = "4915199000777"
HELD_OPEN = 0.5  # seconds a transaction stays open, done but not committed, while the other starts


async def _inbound(world: Any, channel_id: str, pnid: str, wamid: str, text: str) -> _Item:
    """One text from the patient at PHONE, as the webhook would queue it."""
    ch = await world.services.channels.get(world.services.db.sessionmaker, channel_id)
    (batch,) = webhook.parse_webhook(webhook.parse_payload(text_webhook(pnid, PHONE, wamid, text))).values()
    return _Item(channel=ch, batch=batch, future=asyncio.get_running_loop().create_future())


async def _store(world: Any, item: _Item) -> None:
    async with world.services.db.engine.begin() as conn:
        await world.services.ingest.ingestor.write(conn, [item])


async def _patient(world: Any) -> dict[str, str]:
    """The patient at PHONE with one message: ids of the message, its conversation and the patient."""
    await _store(world, await _inbound(world, world.channel_id, PNID, "wamid.first", "Guten Tag"))
    async with world.services.db.transaction() as s:
        m = (await s.execute(select(Message).where(Message.external_id == "wamid.first"))).scalar_one()
    return {"message": m.id, "conversation": m.conversation_id, "contact": m.contact_id}


async def _second_number(world: Any) -> str:
    now = world.services.clock.now()
    async with world.services.db.transaction() as s:
        org = await orgs.get(session=s, org_id=world.org_id)
        ch = await channels.add_whatsapp(
            session=s,
            keys=world.services.keys,
            org=org,
            name="Zweite Nummer",
            phone_number_id=PNID2,
            display_phone_number="4930123456790",
            access_token="token-2",
            app_secret=APP_SECRET,
            now=now,
        )
        return ch.id


async def _delete(world: Any, s: Any, kind: str, ids: dict[str, str]) -> None:
    sv = world.services
    common = {"org_id": world.org_id, "actor": CLI, "reason": "staff", "now": sv.clock.now()}
    if kind == "message":
        await deletion.delete_message(s, sv.eraser, message_id=ids["message"], **common)
    elif kind == "conversation":
        await deletion.delete_conversation(s, sv.eraser, conversation_id=ids["conversation"], **common)
    else:
        await deletion.erase_contact(s, sv.eraser, contact_id=ids["contact"], **common)


async def _hold(world: Any, s: Any, kind: str, ids: dict[str, str]) -> Hold:
    return await retention.place_hold(
        s,
        org_id=world.org_id,
        target_kind=kind,
        target_id=ids[kind],
        kind="legal",
        actor=CLI,
        now=world.services.clock.now(),
    )


async def _active_holds(world: Any) -> list[Hold]:
    async with world.services.db.transaction() as s:
        return list((await s.execute(select(Hold).where(Hold.released_at.is_(None)))).scalars())


async def _target_there(world: Any, kind: str, ids: dict[str, str]) -> bool:
    model: Any = {"message": Message, "conversation": Conversation, "contact": Contact}[kind]
    q = select(model.id).where(model.id == ids[kind])
    if kind == "contact":
        q = q.where(Contact.erased_at.is_(None))
    async with world.services.db.transaction() as s:
        return (await s.execute(q)).scalar() is not None


async def _first_open_then(first: Any, second: Any) -> tuple[Any, Any]:
    """Run ``first`` in a transaction that stays open HELD_OPEN seconds after it is done, and start
    ``second`` meanwhile. Returns what each returned or raised."""
    started = asyncio.Event()

    a = asyncio.create_task(first(started))
    await asyncio.wait_for(started.wait(), 10)
    b = asyncio.create_task(second())
    done = await asyncio.gather(a, b, return_exceptions=True)
    return done[0], done[1]


@pytest.mark.dsk("I.7")
@pytest.mark.parametrize("kind", ["message", "conversation", "contact"])
async def test_a_hold_placed_while_a_deletion_runs_waits_and_then_finds_its_target_gone(world, kind):
    """A deletion has read the holds (none) and deleted; before it commits, a hold is placed. The
    hold must not be confirmed on a target that is then deleted: it waits, and finds it gone."""
    ids = await _patient(world)

    async def deleting(started: asyncio.Event) -> None:
        async with world.services.db.transaction() as s:
            await _delete(world, s, kind, ids)
            started.set()
            await asyncio.sleep(HELD_OPEN)

    async def placing() -> Hold:
        async with world.services.db.transaction() as s:
            return await _hold(world, s, kind, ids)

    deleted, held = await _first_open_then(deleting, placing)
    assert deleted is None
    assert isinstance(held, NotFoundError), held
    assert not await _target_there(world, kind, ids)
    assert await _active_holds(world) == []


@pytest.mark.dsk("I.7")
@pytest.mark.parametrize("kind", ["message", "conversation", "contact"])
async def test_a_deletion_while_a_hold_is_being_placed_waits_and_is_refused(world, kind):
    """A hold is placed and not yet committed when a deletion starts: the deletion waits for it
    and is refused, naming the hold."""
    ids = await _patient(world)

    async def placing(started: asyncio.Event) -> Hold:
        async with world.services.db.transaction() as s:
            hold = await _hold(world, s, kind, ids)
            started.set()
            await asyncio.sleep(HELD_OPEN)
            return hold

    async def deleting() -> None:
        async with world.services.db.transaction() as s:
            await _delete(world, s, kind, ids)

    held, deleted = await _first_open_then(placing, deleting)
    assert isinstance(held, Hold)
    assert isinstance(deleted, deletion.HeldError) and deleted.kinds == ["legal"], deleted
    assert await _target_there(world, kind, ids)
    assert [h.id for h in await _active_holds(world)] == [held.id]


async def _aged(world: Any, conversation_id: str, days: int) -> None:
    sv = world.services
    async with sv.db.transaction() as s:
        await s.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(last_activity_at=sv.clock.now() - timedelta(days=days))
        )


@pytest.mark.dsk("I.7")
@pytest.mark.parametrize("first", ["hold", "sweep"])
async def test_a_hold_and_a_retention_sweep_at_the_same_moment(world, first, monkeypatch):
    """The conversation is past its retention. Placed while the sweep decides, the hold either
    keeps it (hold first: the sweep waits and sees it) or is refused (sweep first: the hold waits
    and finds the conversation gone); never a confirmed hold on a deleted conversation."""
    sv = world.services
    ids = await _patient(world)
    await _aged(world, ids["conversation"], 200)  # the default keeps 180 days

    async def sweeping(started: asyncio.Event | None = None) -> sweeper.SweepReport:
        if started is not None:  # hold the sweep's transaction open once it has decided
            drop = deletion._drop_conversation_rows

            async def slow_drop(*args: Any) -> Any:
                counts = await drop(*args)
                started.set()
                await asyncio.sleep(HELD_OPEN)
                return counts

            monkeypatch.setattr(deletion, "_drop_conversation_rows", slow_drop)
        return await sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now())

    async def placing(started: asyncio.Event | None = None) -> Hold:
        async with sv.db.transaction() as s:
            hold = await _hold(world, s, "conversation", ids)
            if started is not None:
                started.set()
                await asyncio.sleep(HELD_OPEN)
            return hold

    if first == "hold":
        held, report = await _first_open_then(placing, sweeping)
        assert isinstance(held, Hold) and isinstance(report, sweeper.SweepReport), (held, report)
        assert (report.conversations, report.kept_on_hold) == (0, 1)
        assert await _target_there(world, "conversation", ids)
    else:
        report, held = await _first_open_then(sweeping, placing)
        assert isinstance(report, sweeper.SweepReport) and report.conversations == 1, report
        assert isinstance(held, NotFoundError), held
        assert not await _target_there(world, "conversation", ids)
        assert await _active_holds(world) == []


@pytest.mark.dsk("I.7")
async def test_retention_keeps_a_patient_whose_new_conversation_is_being_stored(world):
    """Retention deletes the patient's last conversation and would erase the patient with it; at
    that moment the patient writes to the clinic's other number, which opens a new conversation.
    The sweep waits for that message's transaction, then keeps the patient: the message, answered
    200 to Meta, stays. (Before, the erasure's cascade removed the new conversation with it.)"""
    sv = world.services
    ids = await _patient(world)
    await _aged(world, ids["conversation"], 200)
    other = await _second_number(world)
    item = await _inbound(world, other, PNID2, "wamid.new", "Ich schreibe jetzt an die andere Nummer")

    async with sv.db.engine.begin() as conn:
        await sv.ingest.ingestor.write(conn, [item])  # stored, not yet committed
        sweep = asyncio.create_task(sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now()))
        await asyncio.sleep(HELD_OPEN)
        assert not sweep.done()  # it waits for the patient's row
    report = await asyncio.wait_for(sweep, 10)

    assert (report.conversations, report.contacts_erased) == (1, 0)
    async with sv.db.transaction() as s:
        m = (await s.execute(select(Message).where(Message.external_id == "wamid.new"))).scalar_one()
        patient = await s.get(Contact, m.contact_id)
    assert m.contact_id == ids["contact"] and patient is not None and patient.erased_at is None
    assert not await _target_there(world, "conversation", ids)  # the old conversation went


@pytest.mark.dsk("I.7")
async def test_a_message_arriving_while_its_patient_is_erased_lands_on_a_new_patient(world):
    """The patient is being erased (key destroyed, not yet committed) when their next message is
    stored. The message must not end under the destroyed key, to be purged unread although Meta
    was answered 200: the ingest waits, no longer finds the erased patient and makes a new one."""
    sv = world.services
    ids = await _patient(world)
    item = await _inbound(world, world.channel_id, PNID, "wamid.after", "Noch eine Frage")

    async def erasing(started: asyncio.Event) -> None:
        async with sv.db.transaction() as s:
            await _delete(world, s, "contact", ids)
            started.set()
            await asyncio.sleep(HELD_OPEN)

    async def storing() -> None:
        await _store(world, item)

    erased, stored = await _first_open_then(erasing, storing)
    assert (erased, stored) == (None, None)
    assert item.result is not None and item.result.accepted == 1
    async with sv.db.transaction() as s:
        m = (await s.execute(select(Message).where(Message.external_id == "wamid.after"))).scalar_one()
        patient = await s.get(Contact, m.contact_id)
        assert m.contact_id != ids["contact"]
        assert patient is not None and patient.erased_at is None
        text = (await sv.keys.cipher(s, patient.dek_id)).open_text(m.body_enc, "messages", "body", m.id)
    assert text == "Noch eine Frage"


@pytest.mark.dsk("I.7")
async def test_a_conversation_deleted_while_a_reply_is_stored_in_it_takes_the_reply_along_counted(world):
    """A member of staff stores a reply (not yet committed) while another deletes the
    conversation. The deletion waits for the reply, then deletes it with the rest and counts it
    in the tombstone; it does not vanish uncounted in the conversation's cascade."""
    sv = world.services
    ids = await _patient(world)

    async def replying(started: asyncio.Event) -> None:
        async with sv.db.transaction() as s:
            await conversations.send_text(
                session=s,
                keys=sv.keys,
                org_id=world.org_id,
                conversation_id=ids["conversation"],
                user_id=world.staff_id,
                text="Wir melden uns morgen",
                now=sv.clock.now(),
            )
            started.set()
            await asyncio.sleep(HELD_OPEN)

    async def deleting() -> None:
        async with sv.db.transaction() as s:
            await _delete(world, s, "conversation", ids)

    assert await _first_open_then(replying, deleting) == (None, None)
    assert not await _target_there(world, "conversation", ids)
    async with sv.db.transaction() as s:
        left = (
            await s.execute(select(Message.id).where(Message.conversation_id == ids["conversation"]))
        ).all()
        tomb = (
            await s.execute(select(Tombstone).where(Tombstone.object_id == ids["conversation"]))
        ).scalar_one()
    assert left == []
    assert tomb.details["messages"] == 2  # the patient's message and the reply
