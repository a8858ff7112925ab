"""Inbound webhook ingest throughput of a real ``pforte serve`` process (not part of ``make test``).

    .venv/bin/python bench/webhook_ingest.py --db sqlite --batch 1 --seconds 8 --connections 64
    .venv/bin/python bench/webhook_ingest.py --db postgresql --batch 50 --connections 16
    .venv/bin/python bench/webhook_ingest.py --db postgresql --batch 1000 --connections 4

Starts pforte in its own process with a fresh database and data directory (``common.Stack``),
pre-signs enough webhook bodies (unique wamids, 1,000 distinct patients, ``--batch`` text messages
per POST) and replays them with ``wrk`` (C, from Debian: a Python client tops out near 250
requests/s here and would measure itself). Prints JSON: updates/s, p50/p90/p95/p99 latency per POST,
non-2xx answers and socket errors, rows actually stored, pforte's peak RSS.
"""

from __future__ import annotations

import sys
from typing import Any

from common import ChannelSpec, Stack, base_args, emit, message_body, run_wrk, write_signed

PNID = "100000000000777"


def run(
    db: str,
    batch: int,
    seconds: int,
    connections: int,
    expected_rate: int,
    profile: str | None = None,
    trace: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """One ingest measurement on a fresh stack."""
    ch = ChannelSpec(PNID)
    # Enough distinct bodies that wrk does not wrap around (a repeat would be a cheap duplicate).
    posts = max(int(expected_rate * seconds * 1.5 / batch), 200 if batch < 100 else 40)
    with Stack(db, [ch], trace=trace, workers=workers) as stack:
        tsv = write_signed((message_body(PNID, i * batch, batch) for i in range(posts)), ch.secret)
        try:
            stack.reset_rss()
            spy = stack.profile(profile, seconds)
            wrk = run_wrk(stack.url, ch.webhook_path, tsv, seconds, connections)
            if spy:
                spy.wait(30)
        finally:
            tsv.unlink()
        rss, cpu, log = stack.rss(), stack.cpu(), stack.log_summary()
        stored = stack.sql("select count(*) from messages")[0][0]
    return {
        "scenario": f"ingest_batch_{batch}",
        "db": db,
        "batch": batch,
        "connections": connections,
        "workers": workers,
        "seconds": seconds,
        "posts_prepared": posts,
        "updates_per_s": round(wrk["requests_per_s"] * batch),
        "wrk": wrk,
        "errors": wrk["non_2xx"] + wrk["socket_errors"] + wrk["timeouts"],
        "messages_stored": stored,
        "messages_answered_200": (wrk["requests"] - wrk["non_2xx"]) * batch,
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
        ),
        args.json_out,
    )


if __name__ == "__main__":
    sys.exit(main())
