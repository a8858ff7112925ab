"""Key rotation: re-wrap every data key under a new KEK while pforte runs, then retire the old KEK.

Why this is dangerous. A data key (DEK) can be read only through the KEK its row names. Destroying
a KEK while one DEK is still wrapped under it shreds that contact's data for good: crypto-shredding
by accident, and no backup helps. Everything here exists so that retiring can only ever destroy a
KEK that nothing needs.

Signing keys (``signing_keys.private_wrapped``, crypto/signing.py) are wrapped under the same KEK
and get exactly the same treatment: re-wrapped with the same compare-and-set, a revoked key (private
half NULL) moved like a destroyed data key, and counted by ``references``. Below, "data key" stands
for both unless it says otherwise.

Invariants.

1. A KEK is in the key ring (written and fsynced) before any row names it: ``rotate`` creates the
   new KEK first, then switches ``organisations.kek_id`` in one short transaction that also writes
   the ``keys.rotate`` audit entry.
2. After the switch commits, no key is ever committed under the old KEK. New DEKs are made only by
   the ingest path, which does not cache the KEK id: it reads it in the transaction that creates
   keys and, after inserting them, reads it again FOR SHARE (PostgreSQL; on SQLite that transaction
   already holds the database's write lock). The switch must wait for such a transaction to end, and
   a switch that committed first is seen there and the new keys are re-wrapped under the new KEK
   before commit (``Ingestor._fence_kek``). Re-wrap batches here end with the same check. So the set
   of keys under the old KEK only shrinks, and one pass over it empties it. Any future code that
   makes data keys must follow the same pattern, never a KEK id kept from an earlier transaction.
3. A re-wrap never overwrites a concurrent change: each key is updated
   ``WHERE id = ? AND kek_id = old AND wrapped = <what was read>`` (``wrapped IS NULL`` for destroyed
   keys, whose ``kek_id`` moves too so that nothing names the old KEK any more). A key erased in
   between keeps its NULL and is moved as destroyed by the next batch.
4. Retiring counts, in the transaction that writes ``keys.retire``, every organisation and every data
   key (live or destroyed) naming the KEK, and refuses with the counts unless all are zero. The KEK
   leaves the ring inside that transaction, before commit: a failed removal leaves no audit entry
   claiming it.

Defence in depth: ``rewrap`` repeats until a pass finds no key of the organisation outside its
current KEK. If keys keep appearing for ``max_rounds`` passes (a pforte process older than this
module, which cached the KEK id until restarted, would do that) it stops and retires nothing.

Transactions and batches: the switch is one transaction; re-wrapping walks the keys under each old
KEK in id order, ``batch`` keys (500) per transaction, so locks last milliseconds and a crash loses
at most one batch. Running ``pforte keys rotate`` again finishes an interrupted rotation, because it
moves every key of the organisation that is not under the current KEK, whichever older KEK that is.
A KEK created for a switch that failed stays in the ring named by nothing; ``pforte keys status``
lists it as retirable.

What does not change: DEK plaintexts, so the DEK caches of running processes (``KeyService``), the
ingest's cached blind-index key and the decrypted channel configs (``ChannelCache``) stay valid. A
server that did not create the new KEK finds it because ``FileKeyProvider.get_kek`` re-reads the
ring file when it meets an unknown id. A database backup taken before the rotation holds keys
wrapped under the old KEK: once that KEK is retired, such a backup is readable only together with a
copy of the ring from its own time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Table, bindparam, func, select, union, update
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.audit import service as audit
from pforte.audit.models import AuditEvent
from pforte.crypto.keys import KeyService
from pforte.crypto.models import DataKey, SigningKey
from pforte.db import Database, table_of
from pforte.errors import ConflictError, CryptoError, NotFoundError
from pforte.orgs.models import Organisation

log = logging.getLogger("pforte.keys")

DK = table_of(DataKey)
SK = table_of(SigningKey)
ORG = table_of(Organisation)
AE = table_of(AuditEvent)


@dataclass(frozen=True)
class _Wrapped:
    """A table of keys wrapped under a KEK, whose wrapped column is NULL once the key is destroyed."""

    noun: str
    table: Table
    wrapped: Column[Any]


DATA_KEYS = _Wrapped("data key", DK, DK.c.wrapped)
SIGNING_KEYS = _Wrapped("signing key", SK, SK.c.private_wrapped)
WRAPPED = (DATA_KEYS, SIGNING_KEYS)

BATCH = 500
MAX_ROUNDS = 20


@dataclass
class Rewrap:
    """What re-wrapping one organisation's keys did."""

    rewrapped: int = 0  # live data keys now wrapped under the current KEK
    moved_destroyed: int = 0  # destroyed data keys whose kek_id now names the current KEK
    rounds: int = 0
    previous: set[str] = field(default_factory=set)  # KEKs keys were moved off
    signing_rewrapped: int = 0  # signing keys' private halves now wrapped under the current KEK
    signing_moved_revoked: int = 0  # revoked signing keys whose kek_id now names the current KEK

    def count(self, kind: _Wrapped, live: int, dead: int) -> None:
        """Add one batch's moves to the counters of its kind of key."""
        if kind is SIGNING_KEYS:
            self.signing_rewrapped += live
            self.signing_moved_revoked += dead
        else:
            self.rewrapped += live
            self.moved_destroyed += dead


@dataclass
class Rotation:
    """What one organisation's rotation did."""

    org_id: str
    old_kek_id: str
    new_kek_id: str
    rewrapped: int
    moved_destroyed: int
    rounds: int
    retired: list[str] = field(default_factory=list)
    signing_rewrapped: int = 0
    signing_moved_revoked: int = 0


class _Switched(Exception):
    """The organisation's KEK changed while a batch ran; the batch is rolled back and redone."""


async def _current_kek(conn: AsyncConnection, org_id: str, *, lock: bool = False) -> str:
    q = select(ORG.c.kek_id).where(ORG.c.id == org_id)
    kek = (await conn.execute(q.with_for_update(read=True) if lock else q)).scalar_one_or_none()
    if kek is None:
        raise NotFoundError("organisation not found")
    return str(kek)


async def switch_kek(
    *, db: Database, keys: KeyService, org_id: str, now: datetime, actor: audit.Actor = audit.CLI
) -> tuple[str, str]:
    """Create a new KEK (persisted first) and make it the organisation's current one; audited.

    Returns ``(old, new)``. From the commit on, no new data key is committed under ``old``.
    """
    new = keys.provider.create_kek()
    try:
        async with db.engine.begin() as conn:
            old = await _current_kek(conn, org_id)
            switched = await conn.execute(
                update(ORG).where(ORG.c.id == org_id, ORG.c.kek_id == old).values(kek_id=new)
            )
            if switched.rowcount != 1:
                raise ConflictError("another key rotation of this organisation is under way")
            await audit.record(
                conn,
                org_id=org_id,
                actor=actor,
                action="keys.rotate",
                now=now,
                object_kind="kek",
                object_id=old,
                details={"new_kek_id": new},
            )
    except (NotFoundError, ConflictError):
        # Raised before COMMIT, so no row names the new KEK. (Any other error may come from COMMIT
        # itself, whose outcome is then unknown: the KEK stays in the ring.)
        keys.provider.destroy_kek(new)
        raise
    log.info("organisation switched to a new KEK", extra={"org_id": org_id, "kek_id": new})
    return old, new


async def rewrap(
    *,
    db: Database,
    keys: KeyService,
    org_id: str,
    batch: int = BATCH,
    max_rounds: int = MAX_ROUNDS,
) -> Rewrap:
    """Move every data key of the organisation that is not under its current KEK onto it."""
    out = Rewrap()
    while True:
        async with db.engine.connect() as conn:
            current = await _current_kek(conn, org_id)
            elsewhere = union(
                *(
                    select(k.table.c.kek_id).where(k.table.c.org_id == org_id, k.table.c.kek_id != current)
                    for k in WRAPPED
                )
            )
            olds = sorted(set((await conn.execute(elsewhere)).scalars()))
        if not olds:
            return out
        out.rounds += 1
        if out.rounds > max_rounds:
            raise ConflictError(
                f"data keys keep appearing or changing under a previous KEK after {max_rounds} passes; "
                "is a pforte process older than key rotation still running? nothing was retired"
            )
        try:
            for old in olds:
                out.previous.add(old)
                await _rewrap_kek(db, keys, org_id, old, current, batch, out)
        except _Switched:
            continue  # another rotation switched the KEK: start over towards the new one


async def _rewrap_kek(
    db: Database, keys: KeyService, org_id: str, old: str, new: str, batch: int, out: Rewrap
) -> None:
    """One pass over the keys under ``old`` in id order (data keys, then signing keys); a key that
    changed under us waits for the next pass.

    Keyset pagination: each batch reads only keys after the last one seen, so a pass stays linear.
    """
    for kind in WRAPPED:
        after = ""
        while True:
            last = await _rewrap_batch(db, keys, kind, org_id, old, new, batch, after, out)
            if last is None:
                break
            after = last


async def _rewrap_batch(
    db: Database,
    keys: KeyService,
    kind: _Wrapped,
    org_id: str,
    old: str,
    new: str,
    batch: int,
    after: str,
    out: Rewrap,
) -> str | None:
    """One transaction: re-wrap up to ``batch`` keys of one kind under ``old`` with ids after ``after``.

    Returns the last id looked at, or None when there are none left.
    """
    t, wrapped = kind.table, kind.wrapped
    async with db.engine.begin() as conn:
        rows = (
            await conn.execute(
                select(t.c.id, wrapped.label("wrapped"))
                .where(t.c.org_id == org_id, t.c.kek_id == old, t.c.id > after)
                .order_by(t.c.id)
                .limit(batch)
            )
        ).all()
        if not rows:
            return None
        live: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        for r in rows:
            if r.wrapped is None:
                dead.append({"k_id": r.id})
                continue
            try:
                key = keys.unwrap(kek_id=old, wrapped=r.wrapped)
            except CryptoError as exc:
                raise CryptoError(
                    f"{kind.noun} {r.id} cannot be unwrapped ({exc.message}); rotation stopped"
                ) from None
            live.append({"k_id": r.id, "k_seen": r.wrapped, "k_wrapped": keys.wrap(kek_id=new, key=key)})
        if live:
            await conn.execute(
                update(t)
                .where(t.c.id == bindparam("k_id"), t.c.kek_id == old, wrapped == bindparam("k_seen"))
                .values({t.c.kek_id: new, wrapped: bindparam("k_wrapped")}),
                live,
            )
        if dead:
            await conn.execute(
                update(t)
                .where(t.c.id == bindparam("k_id"), t.c.kek_id == old, wrapped.is_(None))
                .values(kek_id=new),
                dead,
            )
        if await _current_kek(conn, org_id, lock=True) != new:
            raise _Switched  # rolls this batch back: its keys must go to the newer KEK
        left = set(
            (
                await conn.execute(select(t.c.id).where(t.c.id.in_([r.id for r in rows]), t.c.kek_id == old))
            ).scalars()
        )
    out.count(
        kind,
        live=sum(1 for k in live if k["k_id"] not in left),
        dead=sum(1 for k in dead if k["k_id"] not in left),
    )
    return str(rows[-1].id)


@dataclass(frozen=True)
class References:
    """What still names a KEK."""

    organisations: int
    live_keys: int
    destroyed_keys: int
    signing_keys: int = 0  # live and revoked: a revoked one names the KEK until it is moved, too

    @property
    def total(self) -> int:
        """Every reference; a KEK may be retired only at zero."""
        return self.organisations + self.live_keys + self.destroyed_keys + self.signing_keys


async def references(conn: AsyncConnection, kek_id: str) -> References:
    """Count the organisations, data keys (live, destroyed) and signing keys that name a KEK."""
    orgs = (await conn.execute(select(func.count()).select_from(ORG).where(ORG.c.kek_id == kek_id))).scalar()
    total, live = (
        await conn.execute(select(func.count(), func.count(DK.c.wrapped)).where(DK.c.kek_id == kek_id))
    ).one()
    signing = (await conn.execute(select(func.count()).select_from(SK).where(SK.c.kek_id == kek_id))).scalar()
    return References(
        organisations=int(orgs or 0),
        live_keys=int(live),
        destroyed_keys=int(total - live),
        signing_keys=int(signing or 0),
    )


async def retire(
    *,
    db: Database,
    keys: KeyService,
    kek_id: str,
    now: datetime,
    org_id: str | None = None,
    actor: audit.Actor = audit.CLI,
) -> None:
    """Destroy a KEK that nothing names any more; ConflictError with the counts otherwise.

    The audit entry goes to ``org_id``'s chain, else to the chain of the organisation that rotated
    away from this KEK, else to the instance chain.
    """
    try:
        keys.provider.get_kek(kek_id)  # re-reads the ring if another process changed it
    except CryptoError:
        raise NotFoundError("no such key-encryption key in the key ring") from None
    async with db.engine.begin() as conn:
        refs = await references(conn, kek_id)
        if refs.total:
            raise ConflictError(
                f"KEK {kek_id} is still referenced by {refs.organisations} organisation(s), "
                f"{refs.live_keys} live and {refs.destroyed_keys} destroyed data key(s) and "
                f"{refs.signing_keys} signing key(s); not retired"
            )
        chain = (
            org_id
            or (
                await conn.execute(
                    select(AE.c.org_id)
                    .where(AE.c.object_kind == "kek", AE.c.object_id == kek_id, AE.c.action == "keys.rotate")
                    .order_by(AE.c.at.desc())
                    .limit(1)
                )
            ).scalar()
        )
        await audit.record(
            conn,
            org_id=chain,
            actor=actor,
            action="keys.retire",
            now=now,
            object_kind="kek",
            object_id=kek_id,
        )
        keys.provider.destroy_kek(kek_id)
    log.info("KEK retired", extra={"kek_id": kek_id})


async def rotate(
    *,
    db: Database,
    keys: KeyService,
    org_id: str,
    now: datetime,
    retire_old: bool = False,
    batch: int = BATCH,
    max_rounds: int = MAX_ROUNDS,
    actor: audit.Actor = audit.CLI,
) -> Rotation:
    """Switch the organisation to a new KEK and re-wrap all its data keys under it.

    With ``retire_old``, then destroy every KEK the organisation has rotated away from that is still
    in the ring (refused, with the counts, if anything still names one).
    """
    old, new = await switch_kek(db=db, keys=keys, org_id=org_id, now=now, actor=actor)
    moved = await rewrap(db=db, keys=keys, org_id=org_id, batch=batch, max_rounds=max_rounds)
    result = Rotation(
        org_id=org_id,
        old_kek_id=old,
        new_kek_id=new,
        rewrapped=moved.rewrapped,
        moved_destroyed=moved.moved_destroyed,
        rounds=moved.rounds,
        signing_rewrapped=moved.signing_rewrapped,
        signing_moved_revoked=moved.signing_moved_revoked,
    )
    if retire_old:
        # Every KEK this organisation rotated away from, an earlier interrupted rotation's included.
        async with db.engine.connect() as conn:
            earlier = set(
                (
                    await conn.execute(
                        select(AE.c.object_id).where(
                            AE.c.org_id == org_id, AE.c.action == "keys.rotate", AE.c.object_kind == "kek"
                        )
                    )
                ).scalars()
            )
        ring = keys.provider.list_keks()
        for kek in sorted(({old} | moved.previous | earlier) - {new}):
            if kek in ring:
                await retire(db=db, keys=keys, kek_id=kek, now=now, org_id=org_id, actor=actor)
                result.retired.append(kek)
    return result


# --- status: what ``pforte keys status`` shows -------------------------------------------------


@dataclass
class OrgKeys:
    """One organisation's keys: its KEK, the data keys per KEK, the oldest live data key."""

    org_id: str
    slug: str
    kek_id: str
    kek_created_at: datetime | None  # None: the KEK is missing from the ring
    kek_age_seconds: float | None
    data_keys: dict[str, dict[str, int]]  # kek id -> {"live": n, "destroyed": m}
    oldest_live_key_at: datetime | None
    oldest_live_key_age_seconds: float | None
    signing_keys: dict[str, dict[str, int]] = field(default_factory=dict)  # kek id -> {"live", "revoked"}

    @property
    def rotation_pending(self) -> bool:
        """Some data or signing key is not under the current KEK (a rotation is unfinished)."""
        return any(k != self.kek_id for k in [*self.data_keys, *self.signing_keys])


@dataclass
class KeyStatus:
    """Every organisation's keys, plus KEKs in the ring that nothing names (retirable)."""

    organisations: list[OrgKeys]
    retirable: list[tuple[str, datetime | None, float | None]]  # kek id, created, age in seconds
    missing: list[str]  # KEKs named in the database but absent from the ring: data is unreadable


def _created(meta: dict[str, Any] | None) -> datetime | None:
    raw = (meta or {}).get("created_at")
    return datetime.fromisoformat(raw) if isinstance(raw, str) else None


def _age(then: datetime | None, now: datetime) -> float | None:
    return None if then is None else (now - then).total_seconds()


def summarise(
    *,
    orgs: list[tuple[str, str, str]],
    counts: list[tuple[str, str, int, int]],
    oldest: dict[str, datetime],
    ring: dict[str, dict[str, Any]],
    now: datetime,
    signing: Sequence[tuple[str, str, int, int]] = (),
) -> KeyStatus:
    """Pure: organisations (id, slug, kek), key counts (org, kek, total, live) of data keys and of
    signing keys, ring metadata -> status."""
    per_org: dict[str, dict[str, dict[str, int]]] = {}
    signing_per_org: dict[str, dict[str, dict[str, int]]] = {}
    named: set[str] = set()
    for org_id, kek_id, total, live in counts:
        per_org.setdefault(org_id, {})[kek_id] = {"live": live, "destroyed": total - live}
        named.add(kek_id)
    for org_id, kek_id, total, live in signing:
        signing_per_org.setdefault(org_id, {})[kek_id] = {"live": live, "revoked": total - live}
        named.add(kek_id)
    out = []
    for org_id, slug, kek_id in orgs:
        named.add(kek_id)
        created = _created(ring.get(kek_id))
        first = oldest.get(org_id)
        out.append(
            OrgKeys(
                org_id=org_id,
                slug=slug,
                kek_id=kek_id,
                kek_created_at=created,
                kek_age_seconds=_age(created, now),
                data_keys=dict(sorted(per_org.get(org_id, {}).items())),
                oldest_live_key_at=first,
                oldest_live_key_age_seconds=_age(first, now),
                signing_keys=dict(sorted(signing_per_org.get(org_id, {}).items())),
            )
        )
    retirable = [
        (k, _created(meta), _age(_created(meta), now)) for k, meta in sorted(ring.items()) if k not in named
    ]
    return KeyStatus(organisations=out, retirable=retirable, missing=sorted(named - ring.keys()))


async def status(*, db: Database, keys: KeyService, now: datetime) -> KeyStatus:
    """Read what ``summarise`` needs in one read-only transaction."""
    async with db.engine.connect() as conn:
        orgs = [
            (r.id, r.slug, r.kek_id) for r in await conn.execute(select(ORG.c.id, ORG.c.slug, ORG.c.kek_id))
        ]
        counts = [
            (r[0], r[1], int(r[2]), int(r[3]))
            for r in await conn.execute(
                select(DK.c.org_id, DK.c.kek_id, func.count(), func.count(DK.c.wrapped)).group_by(
                    DK.c.org_id, DK.c.kek_id
                )
            )
        ]
        signing = [
            (r[0], r[1], int(r[2]), int(r[3]))
            for r in await conn.execute(
                select(SK.c.org_id, SK.c.kek_id, func.count(), func.count(SK.c.private_wrapped)).group_by(
                    SK.c.org_id, SK.c.kek_id
                )
            )
        ]
        oldest = {
            r[0]: r[1]
            for r in await conn.execute(
                select(DK.c.org_id, func.min(DK.c.created_at))
                .where(DK.c.wrapped.is_not(None))
                .group_by(DK.c.org_id)
            )
        }
    orgs.sort(key=lambda o: o[1])
    return summarise(
        orgs=orgs, counts=counts, oldest=oldest, ring=keys.provider.list_keks(), now=now, signing=signing
    )
