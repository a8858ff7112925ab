"""The hot path's set-based statements (db.bulk_insert, db.any_of) and what concurrent ingest
transactions on one PostgreSQL must get right (one contact per new patient, two groups in flight)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from tests.conftest import APP_SECRET, PNID
from tests.helpers import all_rows, post_webhook, staff_reply, text_webhook

from pforte.audit import service as audit
from pforte.channels.whatsapp import webhook
from pforte.contacts.models import Contact
from pforte.conversations.ingest import _Item
from pforte.conversations.models import Conversation, Message, PendingStatus
from pforte.db import any_of, bulk_insert, new_id, table_of
from pforte.outbox.models import Job

J = table_of(Job)
PS = table_of(PendingStatus)


def _job(n: int, when: datetime, payload: Any) -> dict[str, Any]:
    return {
        "id": new_id(),
        "org_id": None,
        "kind": "bulk_test",
        "channel_id": None,
        "payload": payload,
        "state": "queued",
        "attempts": n,
        "run_after": when,
        "locked_by": None,
        "locked_until": None,
        "started_at": None,
        "last_error": None if n else "zwei Wörter",
        "created_at": when,
        "updated_at": when,
    }


def _parked(channel_id: str, ext: str, status: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "id": new_id(),
        "channel_id": channel_id,
        "external_id": ext,
        "status": status,
        "provider_ts": now,
        "error_code": None,
        "error_title": None,
        "received_at": now,
        "details": None,
    }


async def test_bulk_insert_keeps_every_column_type(world):
    when = datetime(2026, 11, 22, 9, 30, 15, 123456, tzinfo=UTC)
    rows = [
        _job(0, when, {"conversation_id": "c1", "message_ids": ["a", "b"], "umlaut": "Grüße"}),
        _job(1, when + timedelta(hours=1), {"nested": {"n": 1.5, "none": None, "flag": True}}),
        _job(2, when.astimezone(), []),  # a local-time value comes back as the same instant in UTC
    ]
    rows[0]["org_id"], rows[0]["channel_id"] = world.org_id, world.channel_id
    async with world.services.db.engine.begin() as conn:
        assert await bulk_insert(conn, J, rows) == []
        back = {
            r.id: r
            for r in await conn.execute(
                select(J).where(any_of(conn.dialect.name, J.c.id, [r["id"] for r in rows]))
            )
        }
    assert len(back) == 3
    for row in rows:
        got = back[row["id"]]
        assert got.payload == row["payload"]
        assert got.run_after == row["run_after"] and got.run_after.tzinfo is not None
        assert (got.attempts, got.last_error, got.locked_until) == (row["attempts"], row["last_error"], None)
    assert back[rows[0]["id"]].org_id == world.org_id


async def test_bulk_insert_skips_conflicts_and_returns_only_what_it_inserted(world):
    ch = world.channel_id
    first = [_parked(ch, "wamid.1", "sent"), _parked(ch, "wamid.1", "delivered")]
    again = [_parked(ch, "wamid.1", "sent"), _parked(ch, "wamid.2", "sent")]  # the first one is a duplicate
    async with world.services.db.engine.begin() as conn:
        assert await bulk_insert(conn, PS, []) == []
        key = ("channel_id", "external_id", "status")
        assert sorted(await bulk_insert(conn, PS, first, conflict=key, returning="id")) == sorted(
            r["id"] for r in first
        )
        assert await bulk_insert(conn, PS, again, conflict=key, returning="id") == [again[1]["id"]]
    stored = await all_rows(world.services, PendingStatus)
    assert sorted((p.external_id, p.status) for p in stored) == [
        ("wamid.1", "delivered"),
        ("wamid.1", "sent"),
        ("wamid.2", "sent"),
    ]


async def test_any_of_matches_lists_of_every_length(world):
    now = datetime.now(UTC)
    rows = [_job(n, now, {"n": n}) for n in range(5)]
    ids = [r["id"] for r in rows]
    async with world.services.db.engine.begin() as conn:
        await bulk_insert(conn, J, rows)
        dialect = conn.dialect.name
        for wanted in ([], ids[:1], ids[1:4], [*ids, "no-such-id"]):
            got = (await conn.execute(select(J.c.id).where(any_of(dialect, J.c.id, wanted)))).scalars()
            assert sorted(got) == sorted(set(wanted) & set(ids))


async def _item(
    world: Any, wamid: str, text: str, *, wa_id: str = "4915199000111", timestamp: int | None = None
) -> _Item:
    ch = await world.services.channels.get(world.services.db.sessionmaker, world.channel_id)
    body = text_webhook(PNID, wa_id, wamid, text, name="Neue Patientin", timestamp=timestamp)
    (batch,) = webhook.parse_webhook(webhook.parse_payload(body)).values()
    return _Item(channel=ch, batch=batch, future=asyncio.get_running_loop().create_future())


@pytest.mark.parametrize("db_kind", ["postgresql"])  # SQLite has one writer: a second one cannot start
async def test_two_transactions_meeting_the_same_new_patient_create_one_contact(world):
    """Two processes' writers (or one after a retry) can meet the same new patient at once. The
    second waits for the first's lock on creating contacts, then finds the contact it made."""
    ingestor = world.services.ingest.ingestor
    engine = world.services.db.engine
    first = await _item(world, "wamid.first", "Hallo, ich habe eine Frage")
    second = await _item(world, "wamid.second", "Und noch eine")
    async with engine.begin() as conn:
        await ingestor.write(conn, [first])  # the contact exists here, not yet committed

        async def other_writer() -> None:
            async with engine.begin() as other:
                await ingestor.write(other, [second])

        waiting = asyncio.create_task(other_writer())
        await asyncio.sleep(0.5)
        assert not waiting.done()  # held back until the first transaction ends
    await asyncio.wait_for(waiting, 10)
    assert (first.result.accepted, second.result.accepted) == (1, 1)
    patients = await all_rows(world.services, Contact)  # the seeded clinic has none yet
    assert len(patients) == 1
    msgs = {m.external_id: m for m in await all_rows(world.services, Message)}
    assert msgs["wamid.first"].contact_id == msgs["wamid.second"].contact_id == patients[0].id
    assert msgs["wamid.first"].conversation_id == msgs["wamid.second"].conversation_id
    convs = [c for c in await all_rows(world.services, Conversation) if c.contact_id == patients[0].id]
    assert len(convs) == 1 and convs[0].unread_count == 2


@pytest.mark.parametrize("db_kind", ["postgresql"])  # SQLite does not enforce VARCHAR lengths
async def test_bulk_insert_refuses_text_longer_than_its_column_instead_of_cutting_it(world):
    now = datetime.now(UTC)
    row = {
        "id": new_id(),
        "channel_id": world.channel_id,
        "external_id": "wamid." + "x" * 300,  # the column holds 200
        "status": "sent",
        "provider_ts": now,
        "error_code": None,
        "error_title": None,
        "received_at": now,
        "details": None,
    }
    with pytest.raises(DBAPIError, match="too long"):
        async with world.services.db.engine.begin() as conn:
            await bulk_insert(conn, PS, [row])
    assert await all_rows(world.services, PendingStatus) == []


async def test_a_group_updates_each_conversation_once_and_last_inbound_never_goes_back(world):
    """Counters and times of the conversations a group touched (one set-based UPDATE on
    PostgreSQL, one per conversation on SQLite): unread counts add up, the newest message of the
    group becomes the last one, and a late re-delivery of an older message moves neither the last
    message nor the last inbound time (which opens the 24-hour window) backwards."""
    ingestor = world.services.ingest.ingestor
    t = int(datetime.now(UTC).timestamp()) - 600
    anna, ben = "4915199000111", "4915199000222"
    group = [
        await _item(world, "wamid.a1", "Erste", wa_id=anna, timestamp=t + 100),
        await _item(world, "wamid.a2", "Zweite, früher geschrieben", wa_id=anna, timestamp=t + 50),
        await _item(world, "wamid.b1", "Hallo", wa_id=ben, timestamp=t + 200),
    ]
    async with world.services.db.engine.begin() as conn:
        await ingestor.write(conn, group)
    late = await _item(world, "wamid.a0", "Alte Nachricht, spät zugestellt", wa_id=anna, timestamp=t)
    async with world.services.db.engine.begin() as conn:
        await ingestor.write(conn, [late])

    msgs = {m.external_id: m for m in await all_rows(world.services, Message)}
    convs = {c.id: c for c in await all_rows(world.services, Conversation)}
    of_anna, of_ben = convs[msgs["wamid.a1"].conversation_id], convs[msgs["wamid.b1"].conversation_id]
    assert of_anna.id != of_ben.id
    assert (of_anna.unread_count, of_ben.unread_count) == (3, 1)
    assert of_anna.last_inbound_at == datetime.fromtimestamp(t + 100, UTC)
    assert of_ben.last_inbound_at == datetime.fromtimestamp(t + 200, UTC)
    assert of_ben.last_message_id == msgs["wamid.b1"].id
    assert of_anna.last_message_id == msgs["wamid.a1"].id  # the newest, not the late old one


@pytest.mark.parametrize("db_kind", ["postgresql"])  # SQLite has one writer: a second one cannot start
async def test_two_writers_on_the_same_conversations_never_deadlock(world):
    """Two processes' writers storing messages of the same patients at the same moment. Each
    INSERT's foreign key takes a share lock on the conversations; the UPDATE that follows must
    not ask for a lock that conflicts with the other writer's share (FOR UPDATE would, and
    PostgreSQL then breaks the deadlock by failing one transaction after a second's wait)."""
    ingestor = world.services.ingest.ingestor
    engine = world.services.db.engine
    patients = ["4915199000111", "4915199000222", "4915199000333"]
    async with engine.begin() as conn:  # the conversations exist, as for patients who wrote before
        await ingestor.write(
            conn, [await _item(world, f"wamid.seed{i}", "Hallo", wa_id=p) for i, p in enumerate(patients)]
        )

    async def writer(name: str, order: list[str], round_: int) -> None:
        group = [await _item(world, f"wamid.{name}{round_}.{p}", "Frage", wa_id=p) for p in order]
        async with engine.begin() as conn:
            await ingestor.write(conn, group)

    for r in range(8):
        await asyncio.wait_for(asyncio.gather(writer("a", patients, r), writer("b", patients[::-1], r)), 30)
    convs = await all_rows(world.services, Conversation)
    assert sorted(c.unread_count for c in convs) == [17, 17, 17]


async def test_a_process_keeps_two_groups_in_flight_on_postgresql_and_they_store_everything_once(
    world, db_kind
):
    """``ingest_writers`` (2 by default): on PostgreSQL a second group is written while the first is
    still in its transaction; SQLite keeps one writer. The first group is held until a second one
    is in flight (or 2 s have passed), so one writer shows as a peak of 1."""
    writer = world.services.ingest
    expected = 2 if db_kind == "postgresql" else 1
    assert writer.writers == expected
    original = writer.ingestor.write
    in_flight, peak, both = 0, 0, asyncio.Event()

    async def write(conn: Any, items: list[_Item]) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight >= 2:
            both.set()
        try:
            await asyncio.wait_for(both.wait(), 2)
        except TimeoutError:
            pass
        try:
            return await original(conn, items)
        finally:
            in_flight -= 1

    writer.ingestor.write = write  # type: ignore[method-assign]
    patients = [f"49151990{n:05d}" for n in range(5)]
    bodies = [text_webhook(PNID, patients[i % 5], f"wamid.flight{i}", f"Frage {i}") for i in range(40)]
    try:
        answers = await asyncio.gather(
            *(post_webhook(world.client, world.channel_id, b, APP_SECRET) for b in bodies),
            *(post_webhook(world.client, world.channel_id, b, APP_SECRET) for b in bodies[:10]),  # re-sent
        )
    finally:
        writer.ingestor.write = original  # type: ignore[method-assign]
    assert [r.status_code for r in answers] == [200] * 50
    assert peak == expected
    messages = await all_rows(world.services, Message)
    assert sorted(m.external_id for m in messages) == sorted(f"wamid.flight{i}" for i in range(40))
    assert len(await all_rows(world.services, Contact)) == 5
    convs = await all_rows(world.services, Conversation)
    assert sorted(c.unread_count for c in convs) == [8] * 5
    async with world.services.db.transaction() as s:
        assert (await audit.verify(s, world.org_id)).ok


async def test_reconcile_applies_the_statuses_whose_send_is_now_recorded_and_keeps_the_others(world):
    from pforte.conversations.ingest import reconcile_pending_statuses

    message_id = await staff_reply(world, external_id="wamid.recorded", status="accepted")
    async with world.services.db.engine.begin() as conn:
        await bulk_insert(
            conn,
            PS,
            [
                _parked(world.channel_id, "wamid.recorded", "sent"),
                _parked(world.channel_id, "wamid.recorded", "delivered"),
                _parked(world.channel_id, "wamid.elsewhere", "read"),  # sent by another app: stays parked
            ],
        )
    async with world.services.db.engine.begin() as conn:
        assert await reconcile_pending_statuses(conn) == 1  # one message, both its statuses
    async with world.services.db.transaction() as s:
        stored = (await s.execute(select(Message).where(Message.id == message_id))).scalar_one()
    assert stored.status == "delivered" and stored.sent_at is not None and stored.delivered_at is not None
    assert [(p.external_id, p.status) for p in await all_rows(world.services, PendingStatus)] == [
        ("wamid.elsewhere", "read")
    ]
    async with world.services.db.engine.begin() as conn:
        assert await reconcile_pending_statuses(conn) == 0


class _ParksAfterFirstLook:
    """A connection that lets another transaction park a status (and commit) right after the first
    statement this one runs on pending_statuses: the moment a read-then-delete would lose it."""

    def __init__(self, conn: Any, park: Any) -> None:
        self._conn, self._park, self.parked = conn, park, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        result = await self._conn.execute(statement, *args, **kwargs)
        if not self.parked and PS.name in str(statement):
            self.parked = True
            await self._park()
        return result


@pytest.mark.parametrize("db_kind", ["postgresql"])  # SQLite has one writer: the other must wait
async def test_a_status_parked_while_a_send_is_recorded_is_applied_or_stays_parked_never_lost(world):
    """The send's result takes the statuses parked for its wamid. "delivered" arrives in another
    transaction that commits between this one's statements; it must not be deleted unread."""
    from pforte.conversations.ingest import apply_pending_statuses_many, reconcile_pending_statuses
    from pforte.conversations.status import MessageState

    message_id = await staff_reply(world, external_id="wamid.race", status="accepted")
    engine = world.services.db.engine
    async with engine.begin() as conn:
        await bulk_insert(conn, PS, [_parked(world.channel_id, "wamid.race", "sent")])

    async def park_delivered() -> None:
        async with engine.begin() as other:
            await bulk_insert(other, PS, [_parked(world.channel_id, "wamid.race", "delivered")])

    async with engine.begin() as conn:
        racing = _ParksAfterFirstLook(conn, park_delivered)
        changes = await apply_pending_statuses_many(
            racing,  # type: ignore[arg-type]
            channel_id=world.channel_id,
            sends={"wamid.race": (message_id, MessageState(status="accepted"))},
        )
    assert racing.parked and changes[message_id]["status"] == "sent"
    left = [(p.external_id, p.status) for p in await all_rows(world.services, PendingStatus)]
    assert left == [("wamid.race", "delivered")]  # still parked, so the reconcile applies it
    async with engine.begin() as conn:
        assert await reconcile_pending_statuses(conn) == 1
    async with world.services.db.transaction() as s:
        stored = (await s.execute(select(Message).where(Message.id == message_id))).scalar_one()
    assert stored.status == "delivered" and stored.delivered_at is not None
    assert await all_rows(world.services, PendingStatus) == []


# sqlite_stat1 as ANALYZE wrote it for the bench's 1,000,000 messages (bench/inbox_pages.py); an
# empty pending_statuses has no row. SQLite lets an application write these statistics.
BENCH_STATS = [
    ("ix_messages_org_created", "1000000 1000000 1"),
    ("ix_messages_conversation_created", "1000000 10 1"),
    ("ix_messages_parent_id", "1000000 1000000"),
    ("ix_messages_contact", "1000000 10"),
    ("ix_messages_org_status", "1000000 1000000 500000"),
    ("sqlite_autoindex_messages_3", "1000000 10 10"),
    ("sqlite_autoindex_messages_2", "1000000 1000000 1"),
    ("sqlite_autoindex_messages_1", "1000000 1"),
]


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_reconcile_starts_from_the_parked_statuses_not_from_every_message(world):
    """The periodic reconcile runs under SQLite's write lock every 2 s: its plan must not scan messages.

    With a million messages' statistics, the old join scanned ``messages`` (0.4–0.7 s a run).
    """
    from sqlalchemy import event, text

    from pforte.conversations.ingest import reconcile_pending_statuses

    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if "pending_statuses" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, params))

    engine = world.services.db.engine
    async with engine.begin() as conn:
        await conn.execute(text("ANALYZE"))
        await conn.execute(text("DELETE FROM sqlite_stat1 WHERE tbl IN ('messages', 'pending_statuses')"))
        for idx, stat in BENCH_STATS:
            await conn.execute(
                text("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES ('messages', :i, :s)"),
                {"i": idx, "s": stat},
            )
    await engine.dispose()  # statistics are read when a connection opens
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with engine.begin() as conn:
            await reconcile_pending_statuses(conn)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    ((statement, params),) = seen
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        cursor = await raw.execute("EXPLAIN QUERY PLAN " + statement, params)
        plan = [row[-1] for row in await cursor.fetchall()]
    assert any("pending_statuses" in step for step in plan), plan
    assert not [step for step in plan if step.startswith("SCAN") and "messages" in step], plan
    assert [step for step in plan if step.startswith("SEARCH") and "messages" in step], plan


@pytest.mark.parametrize("db_kind", ["postgresql"])  # SQLite's planner answers the OR with both indexes
async def test_the_patient_look_up_uses_the_indexes_never_a_scan_of_every_patient(world):
    """A patient is found by BSUID or by phone number. Written as one OR of two IN lists,
    PostgreSQL could use neither index and read every patient of the organisation per group:
    372 ms per group and 127 updates/s with 300,000 patients (docs/performance.md, "The patient
    look-up"). The statement the ingest really sends is explained here with sequential scans
    priced out, so a plan that has no way through the indexes still shows one."""
    from sqlalchemy import event, text

    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.lstrip().startswith("SELECT contacts.id, contacts.dek_id"):
            seen.append((statement, params))

    doc = json.loads(text_webhook(PNID, "4915112340001", "wamid.lookup.1", "Hallo"))
    value = doc["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["user_id"] = "DE.1234567890"
    value["messages"][0]["from_user_id"] = "DE.1234567890"
    (batch,) = webhook.parse_webhook(webhook.parse_payload(json.dumps(doc).encode())).values()
    ch = await world.services.channels.get(world.services.db.sessionmaker, world.channel_id)
    item = _Item(channel=ch, batch=batch, future=asyncio.get_running_loop().create_future())
    engine = world.services.db.engine
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with engine.begin() as conn:
            await world.services.ingest.ingestor.write(conn, [item])
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    assert item.result.accepted == 1
    statement, params = seen[0]
    assert "FOR KEY SHARE" in statement  # the rows found stay locked until the commit
    async with engine.begin() as conn:  # the organisation's other patients, and its statistics
        await conn.execute(
            text(
                "INSERT INTO contacts (id, org_id, dek_id, bsuid_index, phone_index, created_at,"
                " updated_at, consent_state) SELECT md5('other' || i), c.org_id, c.dek_id,"
                " md5('b' || i), md5('p' || i), now(), now(), 'none'"
                " FROM contacts c, generate_series(1, 5000) AS i"
            )
        )
        await conn.execute(text("ANALYZE contacts"))
    async with engine.begin() as conn:
        await conn.execute(text("SET LOCAL enable_seqscan = off"))  # for this transaction only
        raw = (await conn.get_raw_connection()).driver_connection
        plan = "\n".join(r[0] for r in await raw.fetch("EXPLAIN " + statement, *params))
    # Each index is searched for the values (they are in its Index Cond), not read for the whole
    # organisation and filtered (the OR's plan: Index Cond on org_id, Filter with hashed SubPlans).
    searched = [line for line in plan.splitlines() if "Index Cond" in line]
    assert any("bsuid_index" in line for line in searched), plan
    assert any("phone_index" in line for line in searched), plan
    assert "Seq Scan on contacts" not in plan and "hashed SubPlan" not in plan, plan
