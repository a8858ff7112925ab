"""Inbox page and conversation page response times at 100,000 conversations / 1,000,000 messages.

    .venv/bin/python bench/inbox_pages.py --db postgresql --conversations 100000 --messages 1000000

Seeds the bench organisation of a fresh stack directly through SQLAlchemy Core bulk inserts in
batches of 10,000 messages, with pforte's own key service and field cipher: one wrapped data key
per contact, blind indexes, encrypted BSUID/phone/profile name, encrypted bodies of realistic
length (40–400 characters), so row and ciphertext sizes are what ingest would have written.
Conversations have activity spread over 30 days and a few unread messages; then ``ANALYZE`` (a
production database has statistics). A logged-in client then times ``GET /`` and
``GET /conversations/{id}`` (random conversations) one request at a time. With ``--explain`` on
PostgreSQL, prints ``EXPLAIN (ANALYZE, BUFFERS)`` of the queries those pages run.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from common import ChannelSpec, Stack, base_args, emit, percentiles

PNID = "100000000000781"
WORDS = (
    "Guten Tag ich habe seit gestern Fieber und Husten kann ich morgen zur Sprechstunde kommen "
    "bitte rufen Sie mich zurück der Befund ist da Ihr Termin wurde verschoben Station vier danke"
).split()


def texts(rng: random.Random, count: int = 2000) -> list[str]:
    """Message bodies of 40–400 characters (each one is encrypted separately when used)."""
    out = []
    for _ in range(count):
        target = rng.choice((40, 60, 80, 120, 200, 400))
        words: list[str] = []
        size = 0
        while size < target:
            words.append(rng.choice(WORDS))
            size += len(words[-1]) + 1
        out.append(" ".join(words))
    return out


async def bulk_insert(conn: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    """Core ``insert().values`` executemany; on PostgreSQL the same rows through COPY (10× faster).

    COPY names only the columns the rows have, so the others take their server defaults, as they
    do in the INSERT (a later migration's NOT NULL column with a default needs nothing here)."""
    from sqlalchemy import insert

    if conn.dialect.name != "postgresql":
        await conn.execute(insert(table), rows)
        return
    raw = (await conn.get_raw_connection()).driver_connection
    cols = [c.name for c in table.columns if c.name in rows[0]]
    await raw.copy_records_to_table(
        table.name, columns=cols, records=[tuple(r.get(c) for c in cols) for r in rows]
    )


async def seed(sv: Any, channel_id: str, conversations: int, messages: int) -> dict[str, Any]:
    """Bulk-insert contacts, data keys, conversations and messages into the bench organisation."""
    from sqlalchemy import select
    from sqlalchemy import text as sql

    from pforte.contacts.models import Contact
    from pforte.conversations.models import Conversation, Message
    from pforte.crypto.blind_index import blind_index
    from pforte.crypto.envelope import FieldCipher
    from pforte.crypto.models import DataKey
    from pforte.db import new_id, table_of
    from pforte.orgs.models import Organisation

    M, CONV, C, DK = table_of(Message), table_of(Conversation), table_of(Contact), table_of(DataKey)
    rng = random.Random(7)
    bodies = texts(rng)
    now = datetime.now(UTC)
    per_conv = max(1, messages // conversations)
    step = max(1, 10_000 // per_conv)  # conversations per batch: ~10k messages
    started = time.perf_counter()
    async with sv.db.engine.connect() as conn:
        org = (
            await conn.execute(select(Organisation.id, Organisation.kek_id, Organisation.index_key_id))
        ).one()
        ix_key = await sv.keys.raw_key(conn, org.index_key_id)
    seq = 0
    for first in range(0, conversations, step):
        keys, contacts, convs, msgs = [], [], [], []
        for n in range(first, min(first + step, conversations)):
            key_row, key = sv.keys.new_data_key(org_id=org.id, kek_id=org.kek_id, purpose="contact", now=now)
            cipher = FieldCipher(key)
            cid, conv_id = new_id(), new_id()
            wa, bsuid = f"4916{n:09d}", f"DE.S{n:015d}"
            keys.append(key_row)
            contacts.append(
                {
                    "id": cid,
                    "org_id": org.id,
                    "dek_id": key_row["id"],
                    "bsuid_index": blind_index(ix_key, "bsuid", bsuid),
                    "phone_index": blind_index(ix_key, "phone", wa),
                    "bsuid_enc": cipher.seal_text(bsuid, "contacts", "bsuid", cid),
                    "phone_enc": cipher.seal_text(wa, "contacts", "phone", cid),
                    "name_enc": None,
                    "profile_name_enc": cipher.seal_text(f"Patientin {n}", "contacts", "profile_name", cid),
                    "username_enc": None,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            last_at = now - timedelta(seconds=rng.uniform(0, 30 * 86400))
            count = per_conv
            t = last_at - timedelta(minutes=7 * count)
            last_id, last_in = None, None
            for k in range(count):
                mid = new_id()
                t += timedelta(minutes=7)
                inbound = k % 2 == 0
                seq += 1
                msgs.append(
                    {
                        "id": mid,
                        "org_id": org.id,
                        "conversation_id": conv_id,
                        "channel_id": channel_id,
                        "contact_id": cid,
                        "direction": "in" if inbound else "out",
                        "type": "text",
                        "external_id": f"wamid.seed{seq:012d}",
                        "status": "received" if inbound else "read",
                        "body_enc": cipher.seal_text(rng.choice(bodies), "messages", "body", mid),
                        "forwarded": False,
                        "provider_ts": t,
                        "created_at": t,
                        "sent_at": None if inbound else t,
                        "delivered_at": None if inbound else t,
                        "read_at": None if inbound else t,
                    }
                )
                last_id = mid
                if inbound:
                    last_in = t
            convs.append(
                {
                    "id": conv_id,
                    "org_id": org.id,
                    "contact_id": cid,
                    "channel_id": channel_id,
                    "status": "open",
                    "unread_count": rng.choice((0, 0, 0, 1, 2)),
                    "last_activity_at": t,
                    "last_inbound_at": last_in,
                    "last_message_id": last_id,
                    "created_at": t - timedelta(minutes=7 * count),
                }
            )
        async with sv.db.engine.begin() as conn:
            for table, rows in ((DK, keys), (C, contacts), (CONV, convs), (M, msgs)):
                await bulk_insert(conn, table, rows)
    seeded = time.perf_counter() - started
    async with sv.db.engine.begin() as conn:
        await conn.execute(sql("ANALYZE"))
    return {
        "conversations": conversations,
        "messages": seq,
        "seed_seconds": round(seeded, 1),
        "seed_rows_per_s": round((seq + 3 * conversations) / seeded),
    }


EXPLAIN = {
    "inbox list (conversations.service.list_)": """
SELECT conversations.*, contacts.*, channels.name, channels.state, messages.direction, messages.status
FROM conversations JOIN contacts ON contacts.id = conversations.contact_id
JOIN channels ON channels.id = conversations.channel_id
LEFT OUTER JOIN messages ON messages.id = conversations.last_message_id
WHERE conversations.org_id = :org
ORDER BY conversations.last_activity_at DESC, conversations.id DESC LIMIT 50""",
    "header counts (conversations.service.counts, 1/2)": """
SELECT coalesce(sum(unread_count), 0) FROM conversations WHERE org_id = :org AND unread_count > 0""",
    "header counts before e67bcd5 (for comparison)": """
SELECT count(*), coalesce(sum(unread_count), 0) FROM conversations WHERE org_id = :org""",
    "header counts (conversations.service.counts, 2/2)": """
SELECT count(*) FROM messages WHERE org_id = :org AND status = 'review'""",
    "thread (conversations.service.get)": """
SELECT * FROM messages WHERE conversation_id = :conv ORDER BY created_at DESC, id DESC LIMIT 200""",
}


def explain(stack: Stack, org_id: str, conv_id: str) -> dict[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the page queries (PostgreSQL)."""
    out = {}
    for name, q in EXPLAIN.items():
        rows = stack.sql("EXPLAIN (ANALYZE, BUFFERS) " + q, {"org": org_id, "conv": conv_id})
        out[name] = "\n".join(r[0] for r in rows)
    return out


def time_pages(stack: Stack, cookie: str, conv_ids: list[str], requests: int) -> dict[str, Any]:
    """Sequential GETs of the inbox and of random conversations; ms percentiles."""
    rng = random.Random(11)
    res: dict[str, Any] = {}
    with httpx.Client(base_url=stack.url, headers={"Cookie": f"pforte_session={cookie}"}, timeout=60) as c:
        for name, path in (
            ("inbox", lambda: "/"),
            ("conversation", lambda: f"/conversations/{rng.choice(conv_ids)}"),
        ):
            for _ in range(5):  # warm caches (DEKs, templates, statement cache)
                c.get(path())
            times, errors, size = [], 0, 0
            for _ in range(requests):
                t0 = time.perf_counter()
                r = c.get(path())
                times.append((time.perf_counter() - t0) * 1000)
                errors += r.status_code != 200
                size = len(r.content)
            res[name] = {"requests": requests, "errors": errors, "bytes": size, **percentiles(times)}
            res[name]["mean_ms"] = round(sum(times) / len(times), 2)
    return res


def run(
    db: str,
    conversations: int,
    messages: int,
    requests: int,
    do_explain: bool,
    profile: str | None,
    trace: str | None = None,
) -> dict[str, Any]:
    """Seed and measure on a fresh stack."""
    ch = ChannelSpec(PNID)
    with Stack(db, [ch], trace=trace) as stack:
        seeded = stack.with_services(
            lambda sv: asyncio.wait_for(seed(sv, ch.id, conversations, messages), 600)
        )
        conv_ids = [r[0] for r in stack.sql("select id from conversations order by random() limit 2000")]
        cookie = stack.login()
        stack.reset_rss()
        spy = stack.profile(profile, 20)
        pages = time_pages(stack, cookie, conv_ids, requests)
        if spy:
            spy.wait(60)
        rss, cpu, log = stack.rss(), stack.cpu(), stack.log_summary()
        plans = explain(stack, stack.org_id, conv_ids[0]) if do_explain and db == "postgresql" else {}
        sizes = {}
        if db == "postgresql":
            sizes = dict(
                stack.sql(
                    "select relname, pg_size_pretty(pg_total_relation_size(oid)) from pg_class "
                    "where relname in ('messages', 'conversations', 'contacts', 'data_keys')"
                )
            )
        else:
            sizes = {"database_file_mb": round((stack.data / "pforte.sqlite3").stat().st_size / 2**20)}
    return {
        "scenario": "inbox_pages",
        "db": db,
        "seed": seeded,
        **pages,
        "errors": pages["inbox"]["errors"] + pages["conversation"]["errors"],
        "table_sizes": sizes,
        "explain": plans,
        "peak_rss_mb": rss,
        "cpu_cores_used": cpu,
        "pforte_log": log,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the page benchmark and print JSON."""
    args = base_args(
        argv,
        conversations={"type": int, "default": 100_000},
        messages={"type": int, "default": 1_000_000},
        requests={"type": int, "default": 200},
        explain={"action": "store_true"},
        trace={"default": None, "help": "run bench/traced_serve.py; its timings to this JSON file"},
    )
    emit(
        run(
            args.db,
            args.conversations,
            args.messages,
            args.requests,
            args.explain,
            args.profile,
            args.trace,
        ),
        args.json_out,
    )


if __name__ == "__main__":
    sys.exit(main())
