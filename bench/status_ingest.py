"""Status-update ingest: sent/delivered/read webhooks for messages pforte sent (3 per outbound message).

    .venv/bin/python bench/status_ingest.py --db postgresql --batch 1 --seconds 8
    .venv/bin/python bench/status_ingest.py --db postgresql --batch 50 --offered-rate 3000

Every outbound message produces three status webhooks (sent, delivered, read), so keeping up with an
outbound rate R means ingesting 3R statuses/s. The scenario starts a fresh stack, lets 1,000
patients write in (one batched webhook, so contacts and conversations exist), seeds ``--messages``
outbound messages with known wamids straight into the database (SQLAlchemy Core bulk insert,
bodies encrypted with pforte's own key service, as the outbox would have left them: ``accepted``
with an external id), then replays pre-signed status webhooks for them with ``wrk``: for each chunk
of 500 messages all "sent", then all "delivered", then all "read". Reports statuses/s, the outbound
rate that covers (statuses/s ÷ 3), latency percentiles, errors, and checks the final states.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

from common import (
    ChannelSpec,
    Stack,
    base_args,
    emit,
    run_open_loop,
    run_wrk,
    status_body,
    write_signed,
)

PNID = "100000000000778"
PATIENTS = 1000


async def seed_outbound(sv: Any, channel_id: str, user_id: str, count: int) -> list[tuple[str, int]]:
    """Insert ``count`` accepted outbound messages; return (wamid, patient number) per message."""
    from sqlalchemy import insert, select

    from pforte.contacts.models import Contact
    from pforte.conversations.models import Conversation, Message
    from pforte.crypto.blind_index import blind_index
    from pforte.db import new_id, table_of
    from pforte.orgs.models import Organisation

    M, CONV, C = table_of(Message), table_of(Conversation), table_of(Contact)
    now = datetime.now(UTC)
    out: list[tuple[str, int]] = []
    async with sv.db.engine.begin() as conn:
        org = (await conn.execute(select(Organisation.id, Organisation.index_key_id))).one()
        ix_key = await sv.keys.raw_key(conn, org.index_key_id)
        rows = (
            await conn.execute(
                select(CONV.c.id, CONV.c.contact_id, C.c.dek_id, C.c.bsuid_index)
                .join(C, C.c.id == CONV.c.contact_id)
                .where(CONV.c.channel_id == channel_id)
            )
        ).all()
        by_index = {r.bsuid_index: r for r in rows}
        convs = []
        for n in range(PATIENTS):
            r = by_index.get(blind_index(ix_key, "bsuid", f"DE.{n:016d}"))
            if r is not None:
                convs.append((n, r))
        ciphers = await sv.keys.ciphers(conn, {r.dek_id for _, r in convs})
        batch: list[dict[str, Any]] = []
        for i in range(count):
            n, r = convs[i % len(convs)]
            mid, wamid = new_id(), f"wamid.out{i:012d}"
            out.append((wamid, n))
            batch.append(
                {
                    "id": mid,
                    "org_id": org.id,
                    "conversation_id": r.id,
                    "channel_id": channel_id,
                    "contact_id": r.contact_id,
                    "direction": "out",
                    "type": "text",
                    "external_id": wamid,
                    "status": "accepted",
                    "body_enc": ciphers[r.dek_id].seal_text(
                        f"Ihr Termin ist am Dienstag um 10:30 Uhr, Station 4 ({i})", "messages", "body", mid
                    ),
                    "sender_user_id": user_id,
                    "forwarded": False,
                    "created_at": now,
                }
            )
            if len(batch) == 5000:
                await conn.execute(insert(M), batch)
                batch = []
        if batch:
            await conn.execute(insert(M), batch)
    return out


def run(
    db: str,
    batch: int,
    seconds: int,
    connections: int,
    expected_rate: int,
    offered_rate: int = 0,
    profile: str | None = None,
) -> dict[str, Any]:
    """One status-ingest measurement on a fresh stack: wrk's closed loop, or an open loop."""
    ch = ChannelSpec(PNID)
    statuses_needed = int(max(expected_rate, offered_rate) * seconds * 1.3)
    messages = max(1000, statuses_needed // 3)
    with Stack(db, [ch]) as stack:
        stack.patients_write_once(ch, PATIENTS)
        sent = stack.with_services(lambda sv: seed_outbound(sv, ch.id, stack.user_id, messages))

        def bodies() -> Any:
            items: list[tuple[str, str, int]] = []
            for start in range(0, len(sent), 500):
                chunk = sent[start : start + 500]
                for status in ("sent", "delivered", "read"):
                    items.extend((w, status, n) for w, n in chunk)
            for k in range(0, len(items), batch):
                yield status_body(PNID, items[k : k + batch])

        tsv = write_signed(bodies(), ch.secret)
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
        states = dict(
            stack.sql("select status, count(*) from messages where direction = 'out' group by status")
        )
        pending = stack.sql("select count(*) from pending_statuses")[0][0]
    per_s = round(load["requests_per_s"] * batch)
    return {
        "scenario": f"status_batch_{batch}",
        "db": db,
        "batch": batch,
        "connections": 0 if offered_rate else connections,
        "offered_statuses_per_s": offered_rate or None,
        "seconds": seconds,
        "outbound_seeded": messages,
        "statuses_per_s": per_s,
        "covers_outbound_per_s": round(per_s / 3),
        "load": load,
        "errors": load["non_2xx"] + load["socket_errors"] + load["timeouts"],
        "final_states": states,
        "pending_statuses": pending,
        "peak_rss_mb": rss,
        "cpu_cores_used": cpu,
        "pforte_log": log,
    }


def main(argv: list[str] | None = None) -> None:
    """Run one status-ingest benchmark and print JSON."""
    args = base_args(
        argv,
        batch={"type": int, "default": 1},
        seconds={"type": int, "default": 8},
        connections={"type": int, "default": 64},
        expected_rate={"type": int, "default": 3000, "help": "statuses/s to pre-sign bodies for"},
        offered_rate={
            "type": int,
            "default": 0,
            "help": "statuses/s sent at a fixed pace, whatever the answers take (open loop); 0: wrk",
        },
    )
    result = run(
        args.db,
        args.batch,
        args.seconds,
        args.connections,
        args.expected_rate,
        args.offered_rate,
        args.profile,
    )
    emit(result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
