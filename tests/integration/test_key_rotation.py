"""Key rotation (DSK I.9b) on SQLite and PostgreSQL: every data key re-wrapped under a new KEK while
pforte keeps taking webhooks, the old KEK retired, nothing lost.

The rotation runs as ``pforte keys rotate`` does, from "another process": its own database engine and
its own view of the key file (``_operator``). The world's server never creates the new KEK; it finds
it in the key file when it first meets the new id.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from tests.conftest import APP_SECRET, PNID
from tests.helpers import all_rows, post_webhook, text_webhook
from typer.testing import CliRunner

from pforte.audit import service as audit
from pforte.audit.models import AuditEvent
from pforte.audit.service import CLI
from pforte.bootstrap import build_services
from pforte.channels import service as channels
from pforte.channels.whatsapp import webhook
from pforte.cli import app
from pforte.clock import FakeClock
from pforte.config import Settings
from pforte.contacts.models import Contact
from pforte.conversations import service as conv
from pforte.conversations.ingest import Ingestor, _Item
from pforte.conversations.models import Conversation, Message
from pforte.crypto import rotation
from pforte.crypto.keys import FileKeyProvider, KeyService
from pforte.crypto.models import DataKey
from pforte.db import Database
from pforte.deletion import service as deletion
from pforte.errors import ConflictError, NotFoundError
from pforte.orgs import service as orgs
from pforte.orgs.models import Organisation


@dataclass
class Operator:
    """What ``pforte keys`` has in its own process."""

    db: Database
    keys: KeyService


@asynccontextmanager
async def _operator(world: Any) -> AsyncIterator[Operator]:
    s = world.services.settings
    db = Database(s.effective_database_url)
    try:
        yield Operator(db=db, keys=KeyService(FileKeyProvider(s.effective_key_file)))
    finally:
        await db.dispose()


def _key_file(world: Any) -> Path:
    return Path(world.services.settings.effective_key_file)


def _ring(world: Any) -> dict[str, Any]:
    return dict(json.loads(_key_file(world).read_text())["keks"])


def _payload(wa_id: str, wamid: str, text: str) -> bytes:
    return text_webhook(PNID, wa_id, wamid, text)


def _phone(n: int) -> str:
    return f"4915100{n:06d}"


async def _post(world: Any, wa_id: str, wamid: str, text: str) -> int:
    """POST like Meta would: a 503 is retried after a pause; returns the final status."""
    for _ in range(20):
        r = await post_webhook(world.client, world.channel_id, _payload(wa_id, wamid, text), APP_SECRET)
        if r.status_code != 503:
            return r.status_code
        await asyncio.sleep(0.05)
    return 503


async def _kek_of_org(db: Database, org_id: str) -> str:
    async with db.transaction() as s:
        return str(
            (await s.execute(select(Organisation.kek_id).where(Organisation.id == org_id))).scalar_one()
        )


async def _read_back(db: Database, keys: KeyService, org_id: str) -> dict[str, list[str]]:
    """Every message of every (not erased) contact, decrypted through the service layer, by phone."""
    out: dict[str, list[str]] = {}
    async with db.transaction() as s:
        conv_ids = (
            await s.execute(
                select(Conversation.id)
                .join(Contact, Contact.id == Conversation.contact_id)
                .where(Conversation.org_id == org_id, Contact.erased_at.is_(None))
            )
        ).scalars()
        for cid in list(conv_ids):
            view = await conv.get(
                session=s, keys=keys, org_id=org_id, conversation_id=cid, now=datetime.now(UTC), limit=10_000
            )
            assert view.contact_phone is not None
            out.setdefault(view.contact_phone, []).extend(m.text or "" for m in view.messages)
    return {k: sorted(v) for k, v in out.items()}


def _expected(sent: dict[str, tuple[str, str]], skip: set[str] | None = None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for wa_id, text in sent.values():
        if wa_id not in (skip or set()):
            out.setdefault(wa_id, []).append(text)
    return {k: sorted(v) for k, v in out.items()}


async def _seed(world: Any, patients: range, per_patient: int = 1) -> dict[str, tuple[str, str]]:
    sent: dict[str, tuple[str, str]] = {}
    for n in patients:
        for m in range(per_patient):
            wamid, text = f"wamid.seed.{n}.{m}", f"Befund {n}/{m}: Blutwerte unauffällig"
            assert await _post(world, _phone(n), wamid, text) == 200
            sent[wamid] = (_phone(n), text)
    return sent


async def _erase(world: Any, wa_id: str) -> str:
    """Crypto-shred one contact the way staff would; returns its data key id."""
    async with world.services.db.transaction() as s:
        contacts = (await s.execute(select(Contact).where(Contact.org_id == world.org_id))).scalars().all()
        ks = world.services.keys
        (target,) = [
            c
            for c in contacts
            if (await ks.cipher(s, c.dek_id)).open_text(c.phone_enc, "contacts", "phone", c.id) == wa_id
        ]
        await deletion.erase_contact(
            s,
            world.services.eraser,
            org_id=world.org_id,
            contact_id=target.id,
            actor=CLI,
            reason="erasure_request",
            now=world.services.clock.now(),
        )
        return str(target.dek_id)


async def _key_events(db: Database) -> list[tuple[str | None, str, str | None]]:
    async with db.transaction() as s:
        rows = await s.execute(
            select(AuditEvent.org_id, AuditEvent.action, AuditEvent.object_id)
            .where(AuditEvent.action.in_(["keys.rotate", "keys.retire"]))
            .order_by(AuditEvent.chain, AuditEvent.seq)
        )
        return [(r[0], r[1], r[2]) for r in rows]


@pytest.mark.dsk("I.9b")
async def test_rotation_rewraps_every_key_and_the_old_kek_is_retired(world):
    sent = await _seed(world, range(12), per_patient=2)
    erased_dek = await _erase(world, _phone(0))
    old = await _kek_of_org(world.services.db, world.org_id)
    server_provider = world.services.keys.provider

    async with _operator(world) as op:
        r = await rotation.rotate(
            db=op.db, keys=op.keys, org_id=world.org_id, now=datetime.now(UTC), retire_old=True, batch=5
        )

    assert (r.old_kek_id, r.retired) == (old, [old])
    assert r.new_kek_id != old
    # org key, blind-index key and 11 contacts re-wrapped; the shredded contact's key only renamed
    assert (r.rewrapped, r.moved_destroyed) == (2 + 11, 1)
    assert await _kek_of_org(world.services.db, world.org_id) == r.new_kek_id
    keys = await all_rows(world.services, DataKey)
    assert Counter(k.kek_id for k in keys) == {r.new_kek_id: 14}
    assert [k.id for k in keys if k.wrapped is None] == [erased_dek]  # still shredded, now naming the new KEK
    ring = _ring(world)
    assert old not in ring and r.new_kek_id in ring
    assert old not in _key_file(world).read_text()

    # The server never made the new KEK. With an empty DEK cache it still reads everything: its key
    # provider re-reads the key file when it meets the new id.
    assert r.new_kek_id not in server_provider.list_keks()
    expected = _expected(sent, skip={_phone(0)})
    assert await _read_back(world.services.db, KeyService(server_provider), world.org_id) == expected
    assert r.new_kek_id in server_provider.list_keks()
    # A fresh process (new key provider, empty cache) reads everything too, channel secrets included.
    fresh = KeyService(FileKeyProvider(_key_file(world)))
    assert await _read_back(world.services.db, fresh, world.org_id) == expected
    async with world.services.db.transaction() as s:
        rt = await channels.runtime(session=s, keys=fresh, channel_id=world.channel_id)
    assert rt.app_secret == APP_SECRET.encode()

    # The running server goes on: an existing patient and a new one write; the new key is under the new KEK.
    assert await _post(world, _phone(3), "wamid.after.1", "Danke, bis morgen") == 200
    assert await _post(world, _phone(99), "wamid.after.2", "Erstkontakt nach Rotation") == 200
    keys = await all_rows(world.services, DataKey)
    assert Counter(k.kek_id for k in keys) == {r.new_kek_id: 15}
    sent["wamid.after.1"] = (_phone(3), "Danke, bis morgen")
    sent["wamid.after.2"] = (_phone(99), "Erstkontakt nach Rotation")
    fresh = KeyService(FileKeyProvider(_key_file(world)))
    assert await _read_back(world.services.db, fresh, world.org_id) == _expected(sent, skip={_phone(0)})

    assert await _key_events(world.services.db) == [
        (world.org_id, "keys.rotate", old),
        (world.org_id, "keys.retire", old),
    ]
    async with world.services.db.transaction() as s:
        assert (await audit.verify(s, world.org_id)).ok


@pytest.mark.dsk("I.9b")
async def test_rotation_under_concurrent_writes_loses_nothing(world):
    """Proof: webhooks from new and known patients keep arriving through the real webhook path while
    the rotation switches the KEK and re-wraps in small batches; every acknowledged message is stored
    once and decrypts with a fresh key service, and the old KEK can be retired afterwards."""
    sent = await _seed(world, range(20))
    old = await _kek_of_org(world.services.db, world.org_id)
    rng = random.Random(9)
    plan = [
        (_phone(rng.randrange(20)), f"wamid.known.{i}", f"Rückfrage {i} zur Medikation") for i in range(120)
    ]
    plan += [(_phone(1000 + i // 2), f"wamid.new.{i}", f"Neuanmeldung {i}, bitte Termin") for i in range(120)]
    rng.shuffle(plan)
    acked: dict[str, tuple[str, str]] = {}
    window: dict[str, float] = {}
    statuses: Counter[int] = Counter()

    async def writer(items: list[tuple[str, str, str]]) -> None:
        for wa_id, wamid, text in items:
            status = await _post(world, wa_id, wamid, text)
            statuses[status] += 1
            if status == 200:
                acked[wamid] = (wa_id, text)
                if "start" in window and "end" not in window:
                    window["during"] = window.get("during", 0) + 1

    writers = [asyncio.create_task(writer(plan[i::8])) for i in range(8)]
    for _ in range(6000):  # let some traffic flow before the switch (at most about 30 s)
        if len(acked) >= 30:
            break
        await asyncio.sleep(0.005)
    assert len(acked) >= 30, statuses
    async with _operator(world) as op:
        window["start"] = time.monotonic()
        r = await rotation.rotate(db=op.db, keys=op.keys, org_id=world.org_id, now=datetime.now(UTC), batch=7)
        window["end"] = time.monotonic()
        await asyncio.gather(*writers)
        assert window.get("during", 0) > 0, "no webhook was acknowledged while the rotation ran"

        assert statuses == {200: len(plan)}
        assert len(acked) == len(plan)
        msgs = await all_rows(world.services, Message)
        assert sorted(m.external_id for m in msgs) == sorted([*sent, *acked])  # each stored exactly once
        contacts = await all_rows(world.services, Contact)
        assert len(contacts) == len({wa for wa, _ in [*sent.values(), *acked.values()]})  # no duplicates

        assert Counter(k.kek_id for k in await all_rows(world.services, DataKey)) == {
            r.new_kek_id: len(contacts) + 2
        }
        await rotation.retire(db=op.db, keys=op.keys, kek_id=old, now=datetime.now(UTC))
    assert old not in _ring(world)
    fresh = KeyService(FileKeyProvider(_key_file(world)))
    assert await _read_back(world.services.db, fresh, world.org_id) == _expected({**sent, **acked})


async def _item(world: Any, wa_id: str, wamid: str, text: str) -> _Item:
    ch = await world.services.channels.get(world.services.db.sessionmaker, world.channel_id)
    (batch,) = webhook.parse_webhook(webhook.parse_payload(_payload(wa_id, wamid, text))).values()
    return _Item(channel=ch, batch=batch, future=asyncio.get_running_loop().create_future())


async def _dek_of(world: Any, wamid: str) -> DataKey:
    async with world.services.db.transaction() as s:
        return (
            await s.execute(
                select(DataKey)
                .join(Contact, Contact.dek_id == DataKey.id)
                .join(Message, Message.contact_id == Contact.id)
                .where(Message.external_id == wamid)
            )
        ).scalar_one()


@pytest.mark.dsk("I.9b")
async def test_the_switch_waits_for_an_ingest_transaction_that_made_keys_under_the_old_kek(world):
    await _seed(world, range(2))
    old = await _kek_of_org(world.services.db, world.org_id)
    item = await _item(world, _phone(500), "wamid.straddle", "Gerade noch vor der Rotation")
    async with _operator(world) as op:
        async with world.services.db.engine.begin() as conn:
            # A new contact and its key, inserted but not committed yet.
            await world.services.ingest.ingestor.write(conn, [item])
            switch = asyncio.create_task(
                rotation.switch_kek(db=op.db, keys=op.keys, org_id=world.org_id, now=datetime.now(UTC))
            )
            await asyncio.sleep(0.5)
            assert not switch.done()  # held back by the open ingest transaction
            assert await _kek_of_org(op.db, world.org_id) == old
        _, new = await switch
        assert (await _dek_of(world, "wamid.straddle")).kek_id == old  # committed before the switch
        moved = await rotation.rewrap(db=op.db, keys=op.keys, org_id=world.org_id)
        assert moved.rewrapped == 2 + 3 and moved.previous == {old}
        await rotation.retire(db=op.db, keys=op.keys, kek_id=old, now=datetime.now(UTC))
    fresh = KeyService(FileKeyProvider(_key_file(world)))
    back = await _read_back(world.services.db, fresh, world.org_id)
    assert back[_phone(500)] == ["Gerade noch vor der Rotation"]
    assert (await _dek_of(world, "wamid.straddle")).kek_id == new


@pytest.mark.dsk("I.9b")
async def test_a_key_made_with_a_kek_id_read_before_the_switch_is_rewrapped_before_commit(world):
    await _seed(world, range(2))
    async with _operator(world) as op:
        old, new = await rotation.switch_kek(
            db=op.db, keys=op.keys, org_id=world.org_id, now=datetime.now(UTC)
        )
    ingestor = Ingestor(keys=world.services.keys, clock=world.services.clock)
    current = ingestor._kek_id

    async def read_just_before_the_switch(conn: Any, org_id: str, *, lock: bool = False) -> str:
        return await current(conn, org_id, lock=True) if lock else old

    ingestor._kek_id = read_just_before_the_switch  # type: ignore[method-assign]
    item = await _item(world, _phone(600), "wamid.stale", "Mit altem Schlüsselstand gelesen")
    async with world.services.db.engine.begin() as conn:
        await ingestor.write(conn, [item])
    assert item.result.accepted == 1
    assert (await _dek_of(world, "wamid.stale")).kek_id == new
    # Nothing committed after the switch names the old KEK; re-wrapping the older keys frees it.
    async with _operator(world) as op:
        moved = await rotation.rewrap(db=op.db, keys=op.keys, org_id=world.org_id)
        assert moved.rewrapped == 2 + 2  # org key, blind-index key, the two seeded contacts
        await rotation.retire(db=op.db, keys=op.keys, kek_id=old, now=datetime.now(UTC))
    fresh = KeyService(FileKeyProvider(_key_file(world)))
    assert (await _read_back(world.services.db, fresh, world.org_id))[_phone(600)] == [
        "Mit altem Schlüsselstand gelesen"
    ]


@pytest.mark.dsk("I.9b")
async def test_retire_is_refused_while_anything_names_the_kek(world):
    await _seed(world, range(3))
    await _erase(world, _phone(2))
    async with _operator(world) as op:
        old, new = await rotation.switch_kek(
            db=op.db, keys=op.keys, org_id=world.org_id, now=datetime.now(UTC)
        )
        with pytest.raises(ConflictError) as refused:
            await rotation.retire(db=op.db, keys=op.keys, kek_id=old, now=datetime.now(UTC))
        assert "0 organisation(s), 4 live and 1 destroyed data key(s)" in refused.value.message
        with pytest.raises(ConflictError, match=r"1 organisation\(s\), 0 live"):
            await rotation.retire(db=op.db, keys=op.keys, kek_id=new, now=datetime.now(UTC))
        with pytest.raises(NotFoundError):
            await rotation.retire(db=op.db, keys=op.keys, kek_id="kek-unknown", now=datetime.now(UTC))
        assert old in _ring(world) and new in _ring(world)
        moved = await rotation.rewrap(db=op.db, keys=op.keys, org_id=world.org_id)
        assert (moved.rewrapped, moved.moved_destroyed) == (4, 1)
        await rotation.retire(db=op.db, keys=op.keys, kek_id=old, now=datetime.now(UTC))
    assert old not in _ring(world) and new in _ring(world)
    # Retired without naming the organisation: the entry still lands in its chain (found by keys.rotate).
    assert await _key_events(world.services.db) == [
        (world.org_id, "keys.rotate", old),
        (world.org_id, "keys.retire", old),
    ]


@pytest.mark.dsk("I.9b")
async def test_an_interrupted_rotation_is_finished_by_the_next_one(world):
    sent = await _seed(world, range(4))
    first = await _kek_of_org(world.services.db, world.org_id)
    async with _operator(world) as op:
        # Two rotations died before re-wrapping anything ...
        _, second = await rotation.switch_kek(
            db=op.db, keys=op.keys, org_id=world.org_id, now=datetime.now(UTC)
        )
        _, third = await rotation.switch_kek(
            db=op.db, keys=op.keys, org_id=world.org_id, now=datetime.now(UTC)
        )
        # ... and a batch heading for a KEK that is no longer current is rolled back, not committed.
        with pytest.raises(rotation._Switched):
            await rotation._rewrap_kek(op.db, op.keys, world.org_id, first, second, 10, rotation.Rewrap())
        assert {k.kek_id for k in await all_rows(world.services, DataKey)} == {first}
        r = await rotation.rotate(
            db=op.db, keys=op.keys, org_id=world.org_id, now=datetime.now(UTC), retire_old=True
        )
    assert r.old_kek_id == third and r.retired == sorted([first, second, third])
    assert r.rewrapped == 2 + 4
    assert {k.kek_id for k in await all_rows(world.services, DataKey)} == {r.new_kek_id}
    assert set(_ring(world)) == {r.new_kek_id}
    fresh = KeyService(FileKeyProvider(_key_file(world)))
    assert await _read_back(world.services.db, fresh, world.org_id) == _expected(sent)


@pytest.fixture
def cli(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("PFORTE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PFORTE_DATABASE_URL", db_url)
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(app, list(args))
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


def _seed_orgs_40_and_30_days_ago(db_url: str, data_dir: Path) -> str:
    """Two organisations made on a clock 40 days and 3 hours, then 30 days and 3 hours in the past,
    plus a KEK an interrupted rotation left behind; returns that KEK's id."""
    clock = FakeClock(datetime.now(UTC) - timedelta(days=40, hours=3))

    async def _do() -> str:
        sv = build_services(Settings(data_dir=data_dir, database_url=db_url), clock=clock)
        try:
            async with sv.db.transaction() as s:
                await orgs.create(
                    session=s, keys=sv.keys, name="Praxis Roth", slug="praxis-roth", now=clock.now()
                )
            clock.advance(days=10)
            async with sv.db.transaction() as s:
                await orgs.create(session=s, keys=sv.keys, name="MVZ Nord", slug="mvz-nord", now=clock.now())
            return sv.keys.provider.create_kek()
        finally:
            await sv.stop()

    return asyncio.run(_do())


def _by_slug(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["slug"]: o for o in doc["organisations"]}


@pytest.mark.dsk("I.9b")
def test_keys_status_shows_ages_and_rotate_and_retire_work_from_the_command_line(cli, db_url, tmp_path):
    leftover = _seed_orgs_40_and_30_days_ago(db_url, tmp_path / "data")
    day = 86_400
    st = json.loads(cli("keys", "status", "--json").stdout)
    roth, nord = _by_slug(st)["praxis-roth"], _by_slug(st)["mvz-nord"]
    assert 40 * day + 3 * 3600 <= roth["kek_age_seconds"] < 40 * day + 3 * 3600 + 120
    assert 30 * day <= nord["kek_age_seconds"] < 31 * day
    assert roth["data_keys"] == {roth["kek_id"]: {"live": 2, "destroyed": 0}}
    assert 40 * day <= roth["oldest_live_key_age_seconds"] < 41 * day
    assert roth["rotation_pending"] is False
    assert [(k["kek_id"], k["age_seconds"] // day) for k in st["retirable"]] == [(leftover, 30)]
    assert st["missing"] == []
    text = cli("keys", "status").output
    assert f"praxis-roth  KEK {roth['kek_id']}  age 40d 3h" in text
    assert "oldest live data key: 40d 3h" in text
    assert f"{leftover}  age 30d 3h" in text

    out = cli("keys", "rotate", "--org", "praxis-roth", "--retire").output
    assert "2 data keys re-wrapped, 0 destroyed keys moved" in out and f"retired {roth['kek_id']}" in out
    st = json.loads(cli("keys", "status", "--json").stdout)
    roth2 = _by_slug(st)["praxis-roth"]
    assert roth2["kek_id"] != roth["kek_id"] and roth2["kek_age_seconds"] < 120
    assert roth2["data_keys"] == {roth2["kek_id"]: {"live": 2, "destroyed": 0}}
    assert 40 * day <= roth2["oldest_live_key_age_seconds"]  # rotation re-wraps; keys keep their age
    nord2 = _by_slug(st)["mvz-nord"]
    assert (nord2["kek_id"], nord2["data_keys"]) == (nord["kek_id"], nord["data_keys"])  # untouched
    assert [k["kek_id"] for k in st["retirable"]] == [leftover]

    refused = cli("keys", "retire", roth2["kek_id"], ok=False)
    assert refused.exit_code == 2 and "1 organisation(s)" in refused.output
    assert f"retired {leftover}" in cli("keys", "retire", leftover).output
    assert cli("keys", "rotate", ok=False).output.strip() == "pforte: give either --org SLUG or --all"
    assert cli("keys", "rotate", "--org", "nope", ok=False).output.strip() == "pforte: organisation not found"

    done = json.loads(cli("keys", "rotate", "--all", "--json").stdout)
    assert sorted(d["slug"] for d in done) == ["mvz-nord", "praxis-roth"]
    st = json.loads(cli("keys", "status", "--json").stdout)
    assert sorted(k["kek_id"] for k in st["retirable"]) == sorted(d["old_kek_id"] for d in done)
    ring = json.loads((tmp_path / "data" / "keys" / "keyring.json").read_text())["keks"]
    shown = cli("keys", "status").output + json.dumps(st) + json.dumps(done)
    assert ring and not [k for k, v in ring.items() if v["key"] in shown]  # ids and ages, never key material


def _keks_in_another_process(path: str, make: int, destroy: list[str], out: Any) -> None:
    provider = FileKeyProvider(Path(path))
    made = []
    for i in range(max(make, len(destroy))):
        if i < make:
            made.append(provider.create_kek())
        if i < len(destroy):
            provider.destroy_kek(destroy[i])
    out.put(made)


@pytest.mark.dsk("I.9b")
def test_processes_sharing_the_key_file_never_lose_each_others_changes(tmp_path):
    """``pforte keys retire`` may rewrite the ring while ``pforte serve`` creates an organisation's KEK."""
    path = tmp_path / "keys" / "keyring.json"
    setup = FileKeyProvider(path)
    doomed = [setup.create_kek() for _ in range(40)]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_keks_in_another_process, args=(str(path), 40, doomed if i == 0 else [], out))
        for i in range(3)
    ]
    for p in procs:
        p.start()
    made = [k for _ in procs for k in out.get(timeout=60)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(made) == 120
    assert set(FileKeyProvider(path).list_keks()) == set(made)  # none lost, none resurrected
