"""Signed checkpoints of an organisation's audit chain (DSK I.11, II.2).

The hash chain shows any edit to an entry, but someone who can write to the database can rewrite
a whole chain and recompute every hash. A checkpoint pins the chain's head, its sequence number and
hash at a moment, with an Ed25519 signature of the organisation's active signing key, whose private
half is wrapped under the KEK outside the database (crypto/signing.py). A rewrite of any entry up to
a checkpointed one then no longer matches that checkpoint, and a new signature cannot be made
without the key.

What is signed (``checkpoint_bytes``, version 1): the ASCII bytes ::

    pforte-audit-checkpoint/v1\\n<chain>\\n<seq>\\n<head hash, hex>\\n<signing time, UTC ISO 8601>

with the time as ``datetime.isoformat(timespec="microseconds")`` in UTC
(``2026-11-22T14:00:00.000000+00:00``) and no newline at the end.

Checkpointing never forks or blocks the chain: it reads the head row in one statement (a committed
sequence number and hash of the same entry, since ``record`` changes both in one transaction), takes
no lock on it, and inserts its own row; two processes that sign the same head meet at the unique
``(chain, seq)`` and one of them simply stores nothing. Nothing is signed when the head has not
moved since the last checkpoint, and nothing when the organisation has no active key (the compliance
report shows that). The instance chain (backups, restores) has no organisation and so no key: it
stays unsigned, and ``pforte audit verify`` says so.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.audit.models import AuditCheckpoint, AuditHead
from pforte.audit.service import CHECKPOINT, Executor, Fault
from pforte.crypto import signing
from pforte.crypto.keys import KeyService
from pforte.db import new_id, table_of, upsert_insert

CP = table_of(AuditCheckpoint)
HEADS = table_of(AuditHead)

PREFIX = b"pforte-audit-checkpoint/v1\n"
# A checkpoint may not be dated before the entry it signs; this much clock difference between the
# processes that write entries and the one that signs is tolerated.
SKEW = timedelta(minutes=15)


def checkpoint_bytes(chain: str, seq: int, head_hash: str, at: datetime) -> bytes:
    """The exact bytes a checkpoint's signature covers (see the module docstring)."""
    stamp = at.astimezone(UTC).isoformat(timespec="microseconds")
    return PREFIX + f"{chain}\n{seq}\n{head_hash}\n{stamp}".encode("ascii")


def _dialect(db: Executor) -> str:
    return db.dialect.name if isinstance(db, AsyncConnection) else db.get_bind().dialect.name


async def checkpoint(db: Executor, keys: KeyService, *, org_id: str, now: datetime) -> AuditCheckpoint | None:
    """Sign the organisation's chain head now, on the caller's transaction.

    None if the chain is empty, its head has not moved since the last checkpoint, the organisation
    has no active signing key, or another process stored a checkpoint of the same head meanwhile.
    """
    head = (await db.execute(select(HEADS.c.seq, HEADS.c.hash).where(HEADS.c.chain == org_id))).first()
    if head is None or head.seq < 1:
        return None
    last = (await db.execute(select(func.max(CP.c.seq)).where(CP.c.chain == org_id))).scalar()
    if last is not None and last >= head.seq:
        return None
    if await signing.active_key(db, org_id, now) is None:
        return None
    seq, head_hash = int(head.seq), str(head.hash)
    sig = await signing.sign(
        db, keys, org_id=org_id, data=checkpoint_bytes(org_id, seq, head_hash, now), now=now
    )
    row = {
        "id": new_id(),
        "chain": org_id,
        "seq": seq,
        "head_hash": head_hash,
        "at": now,
        "key_id": sig.key_id,
        "signature": sig.signature,
    }
    ins = (
        upsert_insert(_dialect(db), CP).values(**row).on_conflict_do_nothing(index_elements=["chain", "seq"])
    )
    stored = await db.execute(ins)
    if stored.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return AuditCheckpoint(**row)


class Judge:
    """Judges a chain's checkpoints in step with ``audit.service.verify``'s walk over its entries.

    Checkpoints are read in sequence order, ``batch`` at a time; each is judged when the walk reaches
    the entry it names: that entry's hash must be the signed head hash, the signature must count
    under ``signing.judge`` (known key of this organisation, valid then, not revoked by then), and the
    checkpoint may not be dated before the entry it signs (beyond ``SKEW``).
    """

    def __init__(self, db: Executor, chain: str, batch: int = 1000) -> None:
        self.db = db
        self.chain = chain
        self.batch = batch
        self.ok = 0
        self.signed_seq: int | None = None
        self.signed_at: datetime | None = None
        self._queue: deque[Any] = deque()
        self._after: int | None = None
        self._exhausted = False
        self._keys: dict[str, signing.KeyInfo | None] = {}

    async def _peek(self) -> Any | None:
        if not self._queue and not self._exhausted:
            q = select(CP).where(CP.c.chain == self.chain)
            if self._after is not None:
                q = q.where(CP.c.seq > self._after)
            rows = (await self.db.execute(q.order_by(CP.c.seq).limit(self.batch))).all()
            if rows:
                self._queue.extend(rows)
                self._after = int(rows[-1].seq)
            else:
                self._exhausted = True
        return self._queue[0] if self._queue else None

    async def entry(self, row: dict[str, Any]) -> Fault | None:
        """Judge the checkpoints up to this entry; the first that fails, or None."""
        while (cp := await self._peek()) is not None and cp.seq <= row["seq"]:
            self._queue.popleft()
            fault = await self._judge(cp, row if cp.seq == row["seq"] else None)
            if fault is not None:
                return fault
        return None

    async def first_beyond(self, seq: int) -> Any | None:
        """The first checkpoint naming an entry after ``seq`` (once the walk has ended there)."""
        while (cp := await self._peek()) is not None and cp.seq <= seq:
            self._queue.popleft()
        return cp

    async def _key(self, key_id: str) -> signing.KeyInfo | None:
        if key_id not in self._keys:
            self._keys[key_id] = await signing.lookup(self.db, key_id)
        return self._keys[key_id]

    async def _judge(self, cp: Any, row: dict[str, Any] | None) -> Fault | None:
        seq, when = int(cp.seq), f"{cp.at:%Y-%m-%d %H:%M} UTC"
        if row is None:
            return Fault(
                seq, CHECKPOINT, f"the checkpoint signed on {when} names entry {seq}, which does not exist"
            )
        if cp.head_hash != row["hash"]:
            return Fault(
                seq,
                CHECKPOINT,
                f"entry {seq} is not the one signed by the checkpoint of {when}: "
                f"the entries up to {seq} were rewritten",
                row["id"],
            )
        key = await self._key(cp.key_id)
        data = checkpoint_bytes(self.chain, seq, cp.head_hash, cp.at)
        verdict = signing.judge(key, data, cp.signature, cp.at)
        if not verdict.ok:
            return Fault(
                seq, CHECKPOINT, f"the checkpoint of entry {seq} does not count: {verdict.reason}", row["id"]
            )
        assert key is not None  # judge refuses an unknown key
        if key.org_id != self.chain:
            return Fault(
                seq,
                CHECKPOINT,
                f"the checkpoint of entry {seq} is signed with another organisation's key",
                row["id"],
            )
        if row["at"] > cp.at + SKEW:
            return Fault(
                seq,
                CHECKPOINT,
                f"the checkpoint of entry {seq} is dated {when}, before the entry itself "
                f"({row['at']:%Y-%m-%d %H:%M} UTC)",
                row["id"],
            )
        self.ok += 1
        self.signed_seq, self.signed_at = seq, cp.at
        return None
