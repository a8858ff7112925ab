"""Inbound webhook ingest throughput of a real ``pforte serve`` process (not part of ``make test``).

    .venv/bin/python bench/webhook_ingest.py --db sqlite --batch 1 --seconds 8 --connections 64
    .venv/bin/python bench/webhook_ingest.py --db postgresql --batch 50 --connections 16
    .venv/bin/python bench/webhook_ingest.py --db postgresql --batch 1000 --connections 4
    .venv/bin/python bench/webhook_ingest.py --db postgresql --batch 50 --offered-rate 4000

Starts pforte in its own process with a fresh database and data directory (``common.Stack``),
pre-signs enough webhook bodies (unique wamids, 1,000 distinct patients, ``--batch`` text messages
per POST) and replays them with ``wrk`` (C, from Debian: a Python client tops out near 250
requests/s here and would measure itself), which keeps ``--connections`` POSTs in flight. With
``--offered-rate`` the bodies go out at that many updates/s instead, whatever the answers take
(``common.run_open_loop``; a Python client is fine at 80 POSTs/s). Prints JSON: updates/s,
p50/p90/p95/p99 latency per POST, non-2xx answers and socket errors, rows actually stored,
pforte's peak RSS. ``--seed-conversations N --seed-messages M`` first fills the organisation as
``inbox_pages.py`` does (other patients, their conversations and encrypted messages), then runs
``VACUUM (ANALYZE)`` and ``CHECKPOINT`` (SQLite: a WAL checkpoint), so the ingest is measured
against a settled hospital-sized database, not an empty one.
"""

from __future__ import annotations

import sys
from typing import Any

from common import (
    ChannelSpec,
    Stack,
    base_args,
    emit,
    message_body,
    run_open_loop,
    run_wrk,
    write_signed,
)
from inbox_pages import seed

PNID = "100000000000777"
PATIENTS = 1000  # message_body's default rotation


async def _seed_and_settle(sv: Any, channel_id: str, conversations: int, messages: int) -> dict[str, Any]:
    """Seed, then let the database finish what a bulk load leaves behind (vacuum and a checkpoint
    on PostgreSQL, the WAL folded in on SQLite), so the measurement does not share the machine
    with autovacuum working through a million new rows."""
    from sqlalchemy import text

    seeded = await seed(sv, channel_id, conversations, messages)
    async with sv.db.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if conn.dialect.name == "postgresql":
            await conn.execute(text("VACUUM (ANALYZE)"))
            await conn.execute(text("CHECKPOINT"))
        else:
            await conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    return seeded


def run(
    db: str,
    batch: int,
    seconds: int,
    connections: int,
    expected_rate: int,
    profile: str | None = None,
    trace: str | None = None,
    workers: int = 1,
    offered_rate: int = 0,
    known_patients: bool = False,
    seed_conversations: int = 0,
    seed_messages: int = 0,
) -> dict[str, Any]:
    """One ingest measurement on a fresh stack: wrk's closed loop, or an open loop at ``offered_rate``."""
    ch = ChannelSpec(PNID)
    # Enough distinct bodies that wrk does not wrap around (a repeat would be a cheap duplicate).
    posts = max(int(max(expected_rate, offered_rate) * seconds * 1.5 / batch), 200 if batch < 100 else 40)
    with Stack(db, [ch], trace=trace, workers=workers) as stack:
        tsv = write_signed((message_body(PNID, i * batch, batch) for i in range(posts)), ch.secret)
        seeded = (
            stack.with_services(lambda sv: _seed_and_settle(sv, ch.id, seed_conversations, seed_messages))
            if seed_conversations
            else None
        )
        if known_patients:  # no contact is created while measuring
            stack.patients_write_once(ch, PATIENTS)
        try:
            stack.reset_rss()
            spy = stack.profile(profile, seconds)
            if offered_rate:
                load = run_open_loop(stack.url, ch.webhook_path, tsv, offered_rate / batch, seconds)
            else:
                load = run_wrk(stack.url, ch.webhook_path, tsv, seconds, connections)
            if spy:
                spy.wait(30)
        finally:
            tsv.unlink()
        rss, cpu, log = stack.rss(), stack.cpu(), stack.log_summary()
        before = (PATIENTS if known_patients else 0) + (seeded["messages"] if seeded else 0)
        stored = stack.sql("select count(*) from messages")[0][0] - before
    return {
        "scenario": f"ingest_batch_{batch}",
        "db": db,
        "batch": batch,
        "connections": 0 if offered_rate else connections,
        "offered_updates_per_s": offered_rate or None,
        "patients_known_before": known_patients,
        "seeded": seeded,
        "workers": workers,
        "seconds": seconds,
        "posts_prepared": posts,
        "updates_per_s": round(load["requests_per_s"] * batch),
        "load": load,
        "errors": load["non_2xx"] + load["socket_errors"] + load["timeouts"],
        "messages_stored": stored,
        "messages_answered_200": (load["requests"] - load["non_2xx"]) * batch,
        "peak_rss_mb": rss,
        "cpu_cores_used": cpu,
        "pforte_log": log,
    }


def main(argv: list[str] | None = None) -> None:
    """Run one ingest benchmark and print JSON."""
    args = base_args(
        argv,
        batch={"type": int, "default": 1},
        seconds={"type": int, "default": 8},
        connections={"type": int, "default": 64},
        expected_rate={"type": int, "default": 4000, "help": "updates/s to pre-sign bodies for"},
        trace={"default": None, "help": "run bench/traced_serve.py; its timings to this JSON file"},
        workers={"type": int, "default": 1, "help": "pforte serve --workers (PostgreSQL only)"},
        offered_rate={
            "type": int,
            "default": 0,
            "help": "updates/s sent at a fixed pace, whatever the answers take (open loop); 0: wrk",
        },
        known_patients={
            "action": "store_true",
            "help": f"all {PATIENTS} patients write once before the measurement (no new contacts in it)",
        },
        seed_conversations={"type": int, "default": 0, "help": "other patients' conversations first"},
        seed_messages={"type": int, "default": 0, "help": "their messages (with --seed-conversations)"},
    )
    emit(
        run(
            args.db,
            args.batch,
            args.seconds,
            args.connections,
            args.expected_rate,
            args.profile,
            args.trace,
            args.workers,
            args.offered_rate,
            args.known_patients,
            args.seed_conversations,
            args.seed_messages,
        ),
        args.json_out,
    )


if __name__ == "__main__":
    sys.exit(main())
