"""The audit chain against someone with database access (DSK I.11, II.2), on SQLite and PostgreSQL.

Each test writes a chain the way pforte does, tampers with it in plain SQL, and expects
``audit.verify`` to name the first bad entry: its sequence number, the kind of tampering and,
where the row exists, its id. An untouched chain, concurrent writers and verification running
beside them must never raise an alarm.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from tests import auditkit as kit

from pforte.audit import checkpoints
from pforte.audit import service as audit
from pforte.audit.models import AuditCheckpoint
from pforte.audit.service import CLI
from pforte.bootstrap import Services, build_services
from pforte.clock import FakeClock, SystemClock
from pforte.config import Settings
from pforte.crypto import signing

cli = kit.cli  # the command-line fixture, shared with the other audit tests


@pytest.fixture
async def sv(settings: Settings) -> AsyncIterator[Services]:
    """pforte's services on a fake clock (no background workers)."""
    services = build_services(settings.model_copy(update={"run_workers": False}), clock=FakeClock(kit.START))
    try:
        yield services
    finally:
        await services.stop()


async def _signed_chain(sv: Services, n: int = 30, every: int = 10) -> kit.Org:
    """An organisation with a signing key and ``n`` more entries, a checkpoint after every ``every``."""
    org = await kit.make_org(sv)
    async with sv.db.transaction() as s:
        await signing.create(s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI)
    for _ in range(n // every):
        await kit.record_many(sv, org.id, every)
        sv.clock.advance(seconds=30)
        async with sv.db.transaction() as s:
            assert await checkpoints.checkpoint(s, sv.keys, org_id=org.id, now=sv.clock.now()) is not None
    return org


def _bad(r: audit.VerifyResult) -> tuple[bool, int | None, str | None]:
    return r.ok, r.first_bad_seq, r.kind


@pytest.mark.dsk("II.2")
async def test_an_untouched_chain_with_checkpoints_verifies(sv):
    org = await _signed_chain(sv)
    await kit.record_many(sv, org.id, 3)  # newer than the last checkpoint: fine, just not signed yet
    head = await kit.head_seq(sv, org.id)
    r = await kit.verify(sv, org.id)
    assert r.ok, r.problem
    assert (r.entries, r.checkpoints_ok, r.signed_seq) == (head, 3, head - 3)
    assert r.first_bad_seq is None and r.kind is None and r.problem is None
    empty = await kit.verify(sv, "no-such-chain")
    assert empty.ok and empty.entries == 0


@pytest.mark.dsk("II.2")
async def test_an_edited_entry_is_named_changed(sv):
    org = await _signed_chain(sv)
    victim = await kit.row(sv, org.id, 12)
    await kit.sql(sv, "UPDATE audit_events SET action = 'test.harmless' WHERE id = :i", i=victim["id"])
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, 12, "changed") and r.entry_id == victim["id"]
    assert "entry 12 was changed" in (r.problem or "")
    assert r.entries == 11


@pytest.mark.dsk("II.2")
async def test_an_edited_and_rehashed_entry_is_named_changed(sv):
    """The intruder fixes the edited row's own hash; the next entry still points at the old one."""
    org = await _signed_chain(sv)
    victim = await kit.row(sv, org.id, 12)
    forged = {k: victim[k] for k in kit.CANONICAL} | {"action": "test.harmless"}
    await kit.sql(
        sv,
        "UPDATE audit_events SET action = 'test.harmless', hash = :h WHERE id = :i",
        h=audit.chain_hash(victim["prev_hash"], forged),
        i=victim["id"],
    )
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, 12, "changed") and r.entry_id == victim["id"]
    assert "re-hashed" in (r.problem or "")


@pytest.mark.dsk("II.2")
async def test_the_newest_entry_edited_and_rehashed_is_caught_by_the_head(sv):
    org = await _signed_chain(sv)
    last = await kit.head_seq(sv, org.id)
    victim = await kit.row(sv, org.id, last)
    forged = {k: victim[k] for k in kit.CANONICAL} | {"action": "test.harmless"}
    await kit.sql(
        sv,
        "UPDATE audit_events SET action = 'test.harmless', hash = :h WHERE id = :i",
        h=audit.chain_hash(victim["prev_hash"], forged),
        i=victim["id"],
    )
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, last, "changed") and r.entry_id == victim["id"]


@pytest.mark.dsk("II.2")
async def test_an_edited_link_is_named_changed(sv):
    org = await _signed_chain(sv)
    victim = await kit.row(sv, org.id, 7)
    await kit.sql(sv, "UPDATE audit_events SET prev_hash = :h WHERE id = :i", h="ab" * 32, i=victim["id"])
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, 7, "changed") and r.entry_id == victim["id"]


@pytest.mark.dsk("II.2")
async def test_a_deleted_entry_is_named_removed(sv):
    org = await _signed_chain(sv)
    await kit.sql(sv, "DELETE FROM audit_events WHERE chain = :c AND seq = 9", c=org.id)
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, 9, "removed") and r.entry_id is None
    assert "entry 9 was removed" in (r.problem or "")


@pytest.mark.dsk("II.2")
async def test_a_deleted_entry_with_the_rest_renumbered_is_named_removed(sv):
    org = await _signed_chain(sv)
    await kit.sql(sv, "DELETE FROM audit_events WHERE chain = :c AND seq = 9", c=org.id)
    await kit.shift(sv, org.id, 10, -1)
    await kit.sql(sv, "UPDATE audit_heads SET seq = seq - 1 WHERE chain = :c", c=org.id)
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, 9, "removed")
    assert "renumbered" in (r.problem or "")


@pytest.mark.dsk("II.2")
async def test_an_inserted_entry_with_the_rest_renumbered_is_named_inserted(sv):
    org = await _signed_chain(sv)
    before = await kit.row(sv, org.id, 14)
    await kit.shift(sv, org.id, 15, +1)
    await kit.sql(sv, "UPDATE audit_heads SET seq = seq + 1 WHERE chain = :c", c=org.id)
    forged_id = "7" * 32
    await kit.insert_forged(
        sv, org.id, 15, before["hash"], id=forged_id, at=before["at"] + timedelta(seconds=1)
    )
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, 15, "inserted") and r.entry_id == forged_id
    assert "chained to entry 14, past it" in (r.problem or "")


@pytest.mark.dsk("II.2")
@pytest.mark.parametrize("forged_id", ["0" * 32, "f" * 32], ids=["sorted-before", "sorted-after"])
async def test_an_inserted_entry_with_a_duplicate_seq_is_named_inserted(sv, forged_id):
    """With the unique constraint dropped, the copy the chain does not go on from is the intruder,
    whichever of the two the database returns first."""
    org = await _signed_chain(sv)
    before = await kit.row(sv, org.id, 14)
    await kit.drop_seq_unique(sv)
    try:
        await kit.insert_forged(sv, org.id, 15, before["hash"], id=forged_id, at=before["at"])
        r = await kit.verify(sv, org.id)
    finally:
        await kit.restore_seq_unique(sv, org.id, forged_id)
    assert _bad(r) == (False, 15, "inserted") and r.entry_id == forged_id
    assert "exists twice" in (r.problem or "")


@pytest.mark.dsk("II.2")
async def test_an_entry_appended_behind_the_head_is_named_inserted(sv):
    org = await _signed_chain(sv)
    last = await kit.row(sv, org.id, await kit.head_seq(sv, org.id))
    forged_id = "9" * 32
    await kit.insert_forged(sv, org.id, last["seq"] + 1, last["hash"], id=forged_id, at=last["at"])
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, last["seq"] + 1, "inserted") and r.entry_id == forged_id
    # ... and one with a number far past the end
    await kit.sql(sv, "UPDATE audit_events SET seq = 999 WHERE id = :i", i=forged_id)
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, 999, "inserted") and r.entry_id == forged_id


@pytest.mark.dsk("II.2")
@pytest.mark.parametrize(("a", "b"), [(7, 8), (5, 16)], ids=["neighbours", "apart"])
async def test_swapped_entries_are_named_reordered(sv, a, b):
    org = await _signed_chain(sv)
    first = await kit.row(sv, org.id, a)
    await kit.sql(
        sv,
        "UPDATE audit_events SET seq = -1 WHERE chain = :c AND seq = :b",
        "UPDATE audit_events SET seq = :b WHERE chain = :c AND seq = :a",
        "UPDATE audit_events SET seq = :a WHERE chain = :c AND seq = -1",
        c=org.id,
        a=a,
        b=b,
    )
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, a, "reordered")
    assert r.entry_id == (await kit.row(sv, org.id, a))["id"] != first["id"]


@pytest.mark.dsk("II.2")
async def test_cut_off_newest_entries_are_named_truncated(sv):
    org = await _signed_chain(sv)
    last = await kit.head_seq(sv, org.id)
    await kit.sql(sv, "DELETE FROM audit_events WHERE chain = :c AND seq > :s", c=org.id, s=last - 3)
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, last - 2, "truncated")
    assert f"the chain's head records {last} entries" in (r.problem or "")


@pytest.mark.dsk("II.2")
async def test_cut_off_entries_with_the_head_rewound_are_caught_by_the_newest_checkpoint(sv):
    org = await _signed_chain(sv)
    last = await kit.head_seq(sv, org.id)
    keep = await kit.row(sv, org.id, last - 3)
    await kit.sql(
        sv,
        "DELETE FROM audit_events WHERE chain = :c AND seq > :s",
        "UPDATE audit_heads SET seq = :s, hash = :h WHERE chain = :c",
        c=org.id,
        s=last - 3,
        h=keep["hash"],
    )
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, last - 2, "truncated")
    assert f"covers entry {last}" in (r.problem or "")


@pytest.mark.dsk("II.2")
async def test_a_full_rewrite_is_caught_by_the_first_checkpoint_after_the_change(sv):
    """Every link consistent, the head too: only the signed checkpoints still know the old chain."""
    org = await _signed_chain(sv, n=30, every=10)
    base = (await kit.rows(sv, org.id))[0]["seq"]  # the key's own entry came first
    signed = sorted(cp.seq for cp in await _checkpoints(sv, org.id))
    target = signed[0] + 4  # after the first checkpoint, before the second
    await kit.rewrite_from(sv, org.id, target)
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, signed[1], "checkpoint"), r.problem
    assert f"entries up to {signed[1]} were rewritten" in (r.problem or "")
    assert r.checkpoints_ok == 1 and base == 1  # entry 1 is the signing key's creation
    # Without any checkpoint the same rewrite would pass: that is what the signatures are for.
    await kit.sql(sv, "DELETE FROM audit_checkpoints WHERE chain = :c", c=org.id)
    assert (await kit.verify(sv, org.id)).ok


@pytest.mark.dsk("II.2")
async def test_a_missing_head_record_is_named(sv):
    org = await _signed_chain(sv, n=10, every=10)
    last = await kit.head_seq(sv, org.id)
    await kit.sql(sv, "DELETE FROM audit_heads WHERE chain = :c", c=org.id)
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, last, "head") and "head record is missing" in (r.problem or "")


@pytest.mark.dsk("I.5")
async def test_a_checkpoint_signed_with_another_organisations_key_does_not_count(sv):
    org = await _signed_chain(sv, n=10, every=10)
    other = await kit.make_org(sv, slug="praxis")
    async with sv.db.transaction() as s:
        await signing.create(
            s, sv.keys, org_id=other.id, owner_id=other.admin_id, now=sv.clock.now(), actor=CLI
        )
    (cp,) = await _checkpoints(sv, org.id)
    async with sv.db.transaction() as s:
        sig = await signing.sign(
            s,
            sv.keys,
            org_id=other.id,
            data=checkpoints.checkpoint_bytes(org.id, cp.seq, cp.head_hash, cp.at),
            now=cp.at,
        )
    await _put_checkpoint(
        sv, id=cp.id, chain=org.id, seq=cp.seq, head_hash=cp.head_hash, at=cp.at, key_id=sig.key_id,
        signature=sig.signature,
    )  # fmt: skip
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, cp.seq, "checkpoint") and "another organisation's key" in (r.problem or "")


async def _checkpoints(sv: Services, chain: str) -> list[Any]:
    async with sv.db.engine.connect() as c:
        return list((await c.execute(select(AuditCheckpoint).where(AuditCheckpoint.chain == chain))).all())


def _pem(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


CP = AuditCheckpoint.__table__


async def _put_checkpoint(sv: Services, **row: Any) -> None:
    """Replace the checkpoint of ``row["seq"]`` by this one, straight in the database."""
    async with sv.db.engine.begin() as c:
        await c.execute(CP.delete().where(CP.c.chain == row["chain"], CP.c.seq == row["seq"]))
        await c.execute(CP.insert().values(**row))


async def _forge_checkpoint(
    sv: Services, chain: str, key_id: str, private: Ed25519PrivateKey, seq: int, at: Any
) -> None:
    """What the holder of a stolen private key can add: a correctly signed checkpoint of any date."""
    head_hash = (await kit.row(sv, chain, seq))["hash"]
    sig = private.sign(checkpoints.checkpoint_bytes(chain, seq, head_hash, at)).hex()
    await _put_checkpoint(
        sv, id="c" * 32, chain=chain, seq=seq, head_hash=head_hash, at=at, key_id=key_id, signature=sig
    )


@pytest.mark.dsk("I.5")
async def test_a_stolen_key_cannot_sign_after_its_revocation_nor_cover_later_entries(sv):
    """A key whose private half leaked: checkpoints it signs dated after the revocation are refused with
    the reason; backdated ones cannot cover entries written after them; and a rewrite of the history
    it could still sign breaks the checkpoints of the next key."""
    org = await kit.make_org(sv)
    stolen = Ed25519PrivateKey.generate()
    async with sv.db.transaction() as s:
        old = await signing.import_key(
            s, sv.keys, org_id=org.id, owner_id=org.admin_id, pem=_pem(stolen), now=sv.clock.now(), actor=CLI
        )
    await kit.record_many(sv, org.id, 10)
    async with sv.db.transaction() as s:
        first = await checkpoints.checkpoint(s, sv.keys, org_id=org.id, now=sv.clock.now())
    assert first is not None
    sv.clock.advance(hours=1)
    async with sv.db.transaction() as s:
        await signing.revoke(
            s, org_id=org.id, key_id=old.id, reason="laptop stolen", now=sv.clock.now(), actor=CLI
        )
        await signing.create(s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI)
    revoked_at = sv.clock.now()
    await kit.record_many(sv, org.id, 10)
    async with sv.db.transaction() as s:
        second = await checkpoints.checkpoint(s, sv.keys, org_id=org.id, now=sv.clock.now())
    assert second is not None
    assert (await kit.verify(sv, org.id)).checkpoints_ok == 2

    # 1. Signed after the revocation: refused, with the revocation and its reason.
    await _forge_checkpoint(sv, org.id, old.id, stolen, second.seq, sv.clock.now())
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, second.seq, "checkpoint")
    assert "revoked" in (r.problem or "") and "laptop stolen" in (r.problem or "")

    # 2. Backdated to before the revocation but covering later entries: refused as dated before them.
    await _forge_checkpoint(sv, org.id, old.id, stolen, second.seq, revoked_at - timedelta(minutes=30))
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, second.seq, "checkpoint")
    assert "before the entry itself" in (r.problem or "")

    # 3. Rewriting history the stolen key may still sign (entry 5) and re-signing that part does not
    #    help: the new key's checkpoint over the later head no longer matches.
    await _put_checkpoint(
        sv,
        id=second.id,
        chain=org.id,
        seq=second.seq,
        head_hash=second.head_hash,
        at=second.at,
        key_id=second.key_id,
        signature=second.signature,
    )
    assert (await kit.verify(sv, org.id)).ok
    await kit.rewrite_from(sv, org.id, 5)
    await _forge_checkpoint(sv, org.id, old.id, stolen, first.seq, first.at)
    r = await kit.verify(sv, org.id)
    assert _bad(r) == (False, second.seq, "checkpoint"), r.problem
    assert r.checkpoints_ok == 1  # the re-signed old one still counts; the next key's does not match


@pytest.mark.dsk("II.2")
async def test_concurrent_writers_keep_one_valid_chain(sv, db_kind):
    """Two writers append in many separate transactions at once (on PostgreSQL over separate
    connections in parallel), while verification runs beside them: one gap-free chain, no alarm."""
    sv.clock = SystemClock()  # real time: entries interleave as they really would
    org = await kit.make_org(sv)
    verdicts: list[audit.VerifyResult] = []
    per_writer = 40

    async def writer(name: str) -> None:
        for i in range(per_writer):
            async with sv.db.transaction() as s:
                await audit.record(
                    s,
                    org_id=org.id,
                    actor=CLI,
                    action=f"test.{name}",
                    now=sv.clock.now(),
                    details={"i": i},
                )

    async def checker() -> None:
        for _ in range(8):
            verdicts.append(await kit.verify(sv, org.id))
            await asyncio.sleep(0.01)

    await asyncio.gather(writer("a"), writer("b"), *[writer(f"c{i}") for i in range(6)], checker())
    entries = await kit.rows(sv, org.id)
    assert [r["seq"] for r in entries] == list(range(1, 8 * per_writer + 1))
    assert len({r["hash"] for r in entries}) == len(entries)
    r = await kit.verify(sv, org.id)
    assert r.ok and r.entries == 8 * per_writer
    assert verdicts and all(v.ok for v in verdicts), [v.problem for v in verdicts if not v.ok]


@pytest.mark.dsk("I.11")
async def test_the_periodic_task_signs_each_moved_head_once(sv):
    org = await kit.make_org(sv)
    other = await kit.make_org(sv, slug="praxis")  # no signing key: nothing is signed, nothing fails
    async with sv.db.transaction() as s:
        await signing.create(s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI)
    await kit.record_many(sv, org.id, 3)
    await kit.record_many(sv, other.id, 3)
    first = await kit.head_seq(sv, org.id)
    await sv.outbox.run_periodic(force=True)
    await sv.outbox.run_periodic(force=True)  # nothing moved: no second checkpoint
    cps = await _checkpoints(sv, org.id)
    assert [(c.seq, c.at) for c in cps] == [(first, sv.clock.now())]
    assert await _checkpoints(sv, other.id) == []
    await kit.record_many(sv, org.id, 2)
    await sv.outbox.run_periodic(force=True)
    assert [c.seq for c in await _checkpoints(sv, org.id)] == [first, first + 2]
    r = await kit.verify(sv, org.id)
    assert r.ok and r.checkpoints_ok == 2 and r.signed_seq == first + 2
    if sv.db.dialect == "postgresql":
        # Signing never waits for the chain's lock: with a writer holding the head row, the committed
        # head is signed at once. (On SQLite the two would share the one write lock.)
        await kit.record_many(sv, org.id, 1)
        async with sv.db.transaction() as s:
            await audit.record(s, org_id=org.id, actor=CLI, action="test.open", now=sv.clock.now())
            async with sv.db.transaction() as s2:
                cp = await asyncio.wait_for(
                    checkpoints.checkpoint(s2, sv.keys, org_id=org.id, now=sv.clock.now()), 5
                )
                assert cp is not None and cp.seq == first + 3
    r = await kit.verify(sv, org.id)
    assert r.ok and r.checkpoints_ok == (3 if sv.db.dialect == "postgresql" else 2)


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.dsk("I.11")
def test_pforte_audit_verify_and_checkpoint_from_the_command_line(cli, settings):
    async def seed(sv: Services) -> kit.Org:
        org = await kit.make_org(sv)
        await kit.record_many(sv, org.id, 5)
        await kit.record_many(sv, None, 2)  # the instance chain
        return org

    org = kit.with_services(settings, seed)
    out = cli("audit", "verify").output
    assert "klinikum: 5 entries ok; no signed checkpoint yet" in out
    assert "instance: 2 entries ok; unsigned (the instance chain has no organisation key)" in out
    assert out.strip().endswith("all 2 chains verified")

    refused = cli("audit", "checkpoint", "--org", "klinikum", code=2)
    assert (
        refused.output.strip()
        == "pforte: the organisation has no active signing key (pforte keys signing create)"
    )
    cli("keys", "signing", "create", "--org", "klinikum", "--owner", org.admin_email)
    assert "signed entry 6 " in cli("audit", "checkpoint", "--org", "klinikum").output
    assert "nothing new to sign: entry 6" in cli("audit", "checkpoint", "--org", "klinikum").output
    out = cli("audit", "verify", "--org", "klinikum").output
    assert "klinikum: 6 entries ok; 1 checkpoints valid, the newest signs entry 6" in out
    assert "instance" not in out

    async def tamper(sv: Services) -> str:
        victim = await kit.row(sv, org.id, 3)
        await kit.sql(sv, "UPDATE audit_events SET details = NULL WHERE id = :i", i=victim["id"])
        return str(victim["id"])

    victim_id = kit.with_services(settings, tamper)
    failed = cli("audit", "verify", code=1)
    assert f"klinikum: FAILED at entry 3 (changed, id {victim_id}): entry 3 was changed" in failed.output
    assert "instance: 2 entries ok" in failed.output
    assert "1 of 2 chains FAILED verification" in failed.output
    doc = json.loads(cli("audit", "verify", "--json", code=1).output)
    assert doc["ok"] is False
    (bad,) = [c for c in doc["chains"] if not c["ok"]]
    assert (bad["chain"], bad["first_bad_seq"], bad["kind"], bad["entry_id"]) == (
        org.id,
        3,
        "changed",
        victim_id,
    )
    assert cli("audit", "verify", "--org", "nope", code=2).output.strip() == "pforte: organisation not found"


@pytest.mark.dsk("I.11")
def test_a_deleted_organisations_chain_is_still_verified(cli, settings):
    async def seed(sv: Services) -> str:
        org = await kit.make_org(sv)
        await kit.record_many(sv, org.id, 4)
        await kit.sql(sv, "DELETE FROM audit_events WHERE chain = :c AND seq = 2", c=org.id)
        await kit.sql(sv, "DELETE FROM organisations WHERE id = :o", o=org.id)
        return org.id

    org_id = kit.with_services(settings, seed)
    out = cli("audit", "verify", code=1).output
    assert f"deleted organisation {org_id}: FAILED at entry 2 (removed)" in out
