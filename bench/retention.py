"""The retention sweeper erasing a large inbox, and crypto-shredding one big contact.

    .venv/bin/python bench/retention.py --db sqlite --conversations 100000 --messages 1000000
    .venv/bin/python bench/retention.py --db postgresql --conversations 100000 --messages 1000000

Seeds the bench organisation of a fresh stack exactly as ``inbox_pages.py`` does (bulk inserts of
encrypted rows), then, in this process and with pforte's own services, runs the sweeper with a
``now`` 400 days ahead, so every conversation is due, and reports messages removed per second
(rows: messages + conversations + contacts + keys, in batches of ``retention_batch`` conversations,
one transaction each, tombstones, ledger and audit entries included).

Then it seeds one contact with ``--shred-messages`` messages and times ``erase_contact`` (destroying
the key: the data is unreadable from then on) separately from the physical clean-up that follows.
The running ``pforte serve`` of the stack stays idle meanwhile (its own sweeper finds nothing due).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

from common import ChannelSpec, Stack, base_args, emit
from inbox_pages import seed

PNID = "100000000000782"


async def sweep_all(sv: Any) -> dict[str, Any]:
    """Run a full sweep with time moved past every conversation's retention."""
    from sqlalchemy import func, select

    from pforte.conversations.models import Message
    from pforte.retention import sweeper

    async with sv.db.engine.connect() as c:
        before = (await c.execute(select(func.count()).select_from(Message))).scalar_one()
    started = time.perf_counter()
    report = await sweeper.run(sv.db, sv.eraser, sv.settings, sv.clock.now() + timedelta(days=400))
    took = time.perf_counter() - started
    async with sv.db.engine.connect() as c:
        after = (await c.execute(select(func.count()).select_from(Message))).scalar_one()
    return {
        "messages_before": before,
        "messages_after": after,
        "seconds": round(took, 1),
        "messages_per_s": round(report.messages / took),
        "conversations_per_s": round(report.conversations / took),
        "report": report.as_dict(),
    }


async def shred_one(sv: Any) -> dict[str, Any]:
    """Erase the one (big) contact: key destruction timed apart from the row clean-up."""
    from sqlalchemy import func, select

    from pforte.audit.service import CLI
    from pforte.contacts.models import Contact
    from pforte.conversations.models import Message
    from pforte.deletion import service as deletion
    from pforte.orgs.models import Organisation
    from pforte.retention import sweeper

    async with sv.db.engine.connect() as c:
        org_id = (await c.execute(select(Organisation.id))).scalar_one()
        contact_id = (await c.execute(select(Contact.id))).scalar_one()
        n = (await c.execute(select(func.count()).select_from(Message))).scalar_one()
    t0 = time.perf_counter()
    async with sv.db.transaction() as s:
        await deletion.erase_contact(
            s,
            sv.eraser,
            org_id=org_id,
            contact_id=contact_id,
            actor=CLI,
            reason="erasure_request",
            now=sv.clock.now(),
        )
    t1 = time.perf_counter()
    await sweeper.purge_erased(sv.db, sv.eraser, report=sweeper.SweepReport())
    t2 = time.perf_counter()
    return {
        "messages": n,
        "shred_ms": round((t1 - t0) * 1000, 1),
        "cleanup_seconds": round(t2 - t1, 2),
        "cleanup_messages_per_s": round(n / (t2 - t1)),
    }


def run(db: str, conversations: int, messages: int, shred_messages: int) -> dict[str, Any]:
    """Both measurements, each on its own fresh stack."""
    ch = ChannelSpec(PNID)
    with Stack(db, [ch]) as stack:
        seeded = stack.with_services(lambda sv: seed(sv, ch.id, conversations, messages))
        swept = stack.with_services(sweep_all)
    with Stack(db, [ch]) as stack:
        stack.with_services(lambda sv: seed(sv, ch.id, 1, shred_messages))
        shred = stack.with_services(shred_one)
    return {"scenario": "retention", "db": db, "seed": seeded, "sweep": swept, "shred": shred}


def main(argv: list[str] | None = None) -> None:
    """Run and print JSON."""
    args = base_args(
        argv,
        conversations={"type": int, "default": 100_000},
        messages={"type": int, "default": 1_000_000},
        shred_messages={"type": int, "default": 10_000},
    )
    emit(run(args.db, args.conversations, args.messages, args.shred_messages), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
