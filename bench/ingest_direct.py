"""The ingest write path without HTTP: ``Ingestor.write`` in a loop, one group after another.

    .venv/bin/python bench/ingest_direct.py --db postgresql --group 600 --rounds 40

Starts a bench stack (fresh database, one organisation and channel), parses the same webhook
bodies ``webhook_ingest.py`` sends (50 text messages each, 1,000 patients), writes three groups to
create the patients, then times ``--rounds`` groups of ``--group`` updates, each in its own
transaction as the group-commit writer would; ``--other-patients N`` first adds N patients of the
same organisation who do not write, as a hospital's database holds them. What it separates from
the HTTP benchmark: the database work and the writer's own Python, without request parsing on the
same event loop and without the load generator on the same cores. Prints JSON: updates/s, the
median and p95 group, the harness's CPU, and the time per SQL statement kind.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

from common import ChannelSpec, Stack, base_args, emit, message_body
from sqlalchemy import event, select, text

from pforte.channels.models import Channel
from pforte.channels.whatsapp import webhook
from pforte.contacts.models import Contact
from pforte.conversations.ingest import _Item

PNID = "100000000000778"
PER_POST = 50


# Patients of the same organisation who do not write during the run: what the contact look-up has
# to find its way past in a hospital's database (their indexes are random, so none matches).
_OTHERS_SQL = {
    "postgresql": (
        "INSERT INTO contacts (id, org_id, dek_id, bsuid_index, phone_index, created_at, updated_at,"
        " consent_state) SELECT md5('other' || i), :org, :dek, md5('b' || i || random()),"
        " md5('p' || i || random()), now(), now(), 'none' FROM generate_series(1, :n) AS i"
    ),
    "sqlite": (
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n) "
        "INSERT INTO contacts (id, org_id, dek_id, bsuid_index, phone_index, created_at, updated_at,"
        " consent_state) SELECT lower(hex(randomblob(16))), :org, :dek, lower(hex(randomblob(32))),"
        " lower(hex(randomblob(32))), datetime('now'), datetime('now'), 'none' FROM s"
    ),
}


async def _add_other_patients(sv: Any, n: int) -> None:
    async with sv.db.engine.begin() as conn:
        org, dek = (await conn.execute(select(Contact.org_id, Contact.dek_id).limit(1))).one()
        await conn.execute(text(_OTHERS_SQL[conn.dialect.name]), {"org": org, "dek": dek, "n": n})
        await conn.execute(text("ANALYZE"))


async def _measure(sv: Any, group: int, rounds: int, others: int = 0) -> dict[str, Any]:
    async with sv.db.transaction() as s:
        channel_id = (await s.execute(select(Channel.id))).scalar_one()
    channel = await sv.channels.get(sv.db.sessionmaker, channel_id)
    loop = asyncio.get_running_loop()
    posts = max(group // PER_POST, 1)

    def items(k: int) -> list[_Item]:
        out = []
        for j in range(posts):
            body = message_body(PNID, (k * posts + j) * PER_POST, PER_POST)
            (batch,) = webhook.parse_webhook(webhook.parse_payload(body)).values()
            out.append(_Item(channel=channel, batch=batch, future=loop.create_future()))
        return out

    ingestor = sv.ingest.ingestor
    for k in range(3):  # the 1,000 patients, their keys and conversations
        async with sv.db.engine.begin() as conn:
            await ingestor.write(conn, items(k))
    if others:
        await _add_other_patients(sv, others)
    prepared = [items(k) for k in range(3, 3 + rounds)]

    sql_ms: dict[str, float] = defaultdict(float)
    sql_n: dict[str, int] = defaultdict(int)

    def before(conn: Any, _cur: Any, _stmt: str, _params: Any, _ctx: Any, _many: bool) -> None:
        conn.info["bench_t"] = time.perf_counter()

    def after(conn: Any, _cur: Any, stmt: str, _params: Any, _ctx: Any, _many: bool) -> None:
        kind = " ".join(stmt.split()[:3])[:48]
        sql_ms[kind] += (time.perf_counter() - conn.info["bench_t"]) * 1000
        sql_n[kind] += 1

    event.listen(sv.db.engine.sync_engine, "before_cursor_execute", before)
    event.listen(sv.db.engine.sync_engine, "after_cursor_execute", after)
    per_group = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    for g in prepared:
        t = time.perf_counter()
        async with sv.db.engine.begin() as conn:
            await ingestor.write(conn, g)
        per_group.append((time.perf_counter() - t) * 1000)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stored = sum(it.result.accepted for g in prepared for it in g)
    per_group.sort()
    return {
        "scenario": "ingest_direct",
        "group": posts * PER_POST,
        "rounds": rounds,
        "other_patients": others,
        "updates_per_s": round(stored / wall),
        "stored": stored,
        "group_ms_p50": round(statistics.median(per_group), 1),
        "group_ms_p95": round(per_group[int(len(per_group) * 0.95) - 1], 1),
        "harness_cpu_cores": round(cpu / wall, 2),
        "sql_ms_per_group": {
            k: round(v / rounds, 1)
            for k, v in sorted(sql_ms.items(), key=lambda kv: -kv[1])
            if v / rounds >= 0.5
        },
        "sql_statements_per_group": round(sum(sql_n.values()) / rounds, 1),
    }


def run(db: str, group: int, rounds: int, others: int = 0) -> dict[str, Any]:
    """One direct measurement on a fresh stack."""
    with Stack(db, [ChannelSpec(PNID)]) as stack:
        result = stack.with_services(lambda sv: _measure(sv, group, rounds, others))
    return {"db": db, **result}


def main(argv: list[str] | None = None) -> None:
    """Run the direct ingest measurement and print JSON."""
    args = base_args(
        argv,
        group={"type": int, "default": 600, "help": "updates per transaction (multiple of 50)"},
        rounds={"type": int, "default": 40},
        other_patients={"type": int, "default": 0, "help": "patients added who do not write (e.g. 300000)"},
    )
    emit(run(args.db, args.group, args.rounds, args.other_patients), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
