"""Outbound dispatch against the simulator: messages/s at a channel's rate limit, 130429 count.

    .venv/bin/python bench/outbound.py --db postgresql --rate 80 --seconds 10
    .venv/bin/python bench/outbound.py --db postgresql --rate 1000 --seconds 10

Starts the simulator (``bench/sim_server.py``) and pforte as separate processes with one WhatsApp
channel at ``--rate`` messages/s (the same limit in both). ``--users`` simulated patients write in
first (through the simulator's control API, so the 24-hour window is open on both sides), then
``rate × seconds`` staff messages are queued in ONE transaction the way the inbox queues them (an
encrypted ``messages`` row plus a ``send_message`` job each, Core bulk insert), and pforte's outbox
worker sends them. Measured at the simulator: the arrival time of every accepted send (rate =
sends over first-to-last span; the busiest sliding one-second window), and the 130429 throughput
errors it answered (``sim.error_counts``). From pforte's database: final message states, messages
with error_code 130429, job attempts beyond the first.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from common import ChannelSpec, Stack, base_args, emit

PNID = "100000000000779"
try:  # the pacing margin pforte uses (spacing is (1 + MARGIN) / rate)
    from pforte.outbox.ratelimit import MARGIN
except ImportError:  # older pforte: 5 %
    MARGIN = 0.05


async def queue_sends(sv: Any, channel_id: str, user_id: str, count: int) -> int:
    """Queue ``count`` staff texts round-robin over the channel's conversations, in one transaction."""
    from sqlalchemy import insert, select

    from pforte.contacts.models import Contact
    from pforte.conversations.models import Conversation, Message
    from pforte.db import new_id, table_of
    from pforte.outbox.models import Job

    M, CONV, C, J = table_of(Message), table_of(Conversation), table_of(Contact), table_of(Job)
    now = datetime.now(UTC)
    async with sv.db.engine.begin() as conn:
        convs = (
            await conn.execute(
                select(CONV.c.id, CONV.c.org_id, CONV.c.contact_id, C.c.dek_id)
                .join(C, C.c.id == CONV.c.contact_id)
                .where(CONV.c.channel_id == channel_id)
            )
        ).all()
        ciphers = await sv.keys.ciphers(conn, {r.dek_id for r in convs})
        msgs, jobs = [], []
        for i in range(count):
            r = convs[i % len(convs)]
            mid = new_id()
            msgs.append(
                {
                    "id": mid,
                    "org_id": r.org_id,
                    "conversation_id": r.id,
                    "channel_id": channel_id,
                    "contact_id": r.contact_id,
                    "direction": "out",
                    "type": "text",
                    "external_id": None,
                    "status": "queued",
                    "body_enc": ciphers[r.dek_id].seal_text(
                        f"Guten Tag, Ihr Befund liegt vor. Bitte melden Sie sich ({i}).",
                        "messages",
                        "body",
                        mid,
                    ),
                    "sender_user_id": user_id,
                    "forwarded": False,
                    "created_at": now,
                }
            )
            jobs.append(
                {
                    "id": new_id(),
                    "org_id": r.org_id,
                    "kind": "send_message",
                    "channel_id": channel_id,
                    "payload": {"message_id": mid},
                    "state": "queued",
                    "attempts": 0,
                    "run_after": now,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        for k in range(0, count, 5000):
            await conn.execute(insert(M), msgs[k : k + 5000])
            await conn.execute(insert(J), jobs[k : k + 5000])
    return len(convs)


def busiest_second(times: list[float]) -> int:
    """Most sends in any sliding one-second window."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def by_second(times: list[float]) -> list[int]:
    """Sends in each whole second from the first one: the ramp, the steady rate, the tail."""
    counts: list[int] = []
    for t in times:
        i = int(t - times[0])
        counts.extend([0] * (i + 1 - len(counts)))
        counts[i] += 1
    return counts


def run(
    db: str,
    rate: int,
    seconds: int,
    users: int,
    profile: str | None = None,
    trace: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """One outbound measurement on a fresh stack."""
    ch = ChannelSpec(PNID, rate=rate)
    count = rate * seconds
    with Stack(db, [ch], with_simulator=True, sim_batch=100, trace=trace, workers=workers) as stack:
        sim = httpx.Client(base_url=stack.sim_url, timeout=30)
        for i in range(users):
            u = sim.post("/_sim/users", json={"name": f"Patient {i}", "wa_id": f"4917{i:09d}"}).json()
            sim.post(
                f"/_sim/users/{u['user_id']}/send", json={"phone_number_id": PNID, "text": "Hallo, Frage"}
            ).raise_for_status()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = stack.sql(
                "select count(*) from conversations where channel_id = :c and last_inbound_at is not null",
                {"c": ch.id},
            )[0][0]
            if n >= users:
                break
            time.sleep(0.3)
        stack.reset_rss()
        convs = stack.with_services(lambda sv: queue_sends(sv, ch.id, stack.user_id, count))
        t0 = time.monotonic()
        spy = stack.profile(profile, seconds)
        limit = t0 + seconds * 3 + 30
        left = count
        while time.monotonic() < limit:
            left = stack.sql(
                "select count(*) from messages where channel_id = :c and direction = 'out' "
                "and status in ('queued', 'sending')",
                {"c": ch.id},
            )[0][0]
            if left == 0:
                break
            time.sleep(0.5)
        drain_s = round(time.monotonic() - t0, 2)
        if spy:
            spy.wait(seconds + 30)
        times = sorted(sim.get("/_bench_sends", params={"pnid": PNID}).json())
        errors = sim.get("/_bench_errors").json()
        rss, cpu, log = stack.rss(), stack.cpu(), stack.log_summary()
        states = dict(
            stack.sql(
                "select status, count(*) from messages where channel_id = :c and direction = 'out' "
                "group by status",
                {"c": ch.id},
            )
        )
        rl_msgs = stack.sql("select count(*) from messages where error_code = 130429")[0][0]
        jobs = stack.sql(
            "select state, count(*), coalesce(sum(attempts), 0) from jobs where kind = 'send_message' "
            "group by state"
        )
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    achieved = round((len(times) - 1) / span, 1) if span else 0.0
    return {
        "scenario": f"outbound_{rate}" + (f"_w{workers}" if workers > 1 else ""),
        "db": db,
        "workers": workers,
        "rate_limit": rate,
        "paced_at": round(rate / (1 + MARGIN), 1),
        "queued": count,
        "conversations": convs,
        "sent_to_provider": len(times),
        "messages_per_s": achieved,
        "busiest_second": busiest_second(times),
        "sends_by_second": by_second(times),
        "drain_s": drain_s,
        "not_sent_at_end": left,
        "rate_limit_errors_130429": int(errors.get("130429", 0)),
        "simulator_errors": errors,
        "messages_with_error_130429": rl_msgs,
        "final_states": states,
        "jobs": {s: {"count": c, "attempts": a} for s, c, a in jobs},
        "errors": int(errors.get("130429", 0)) + rl_msgs,
        "peak_rss_mb": rss,
        "cpu_cores_used": cpu,
        "pforte_log": log,
    }


def main(argv: list[str] | None = None) -> None:
    """Run one outbound benchmark and print JSON."""
    args = base_args(
        argv,
        rate={"type": int, "default": 80},
        seconds={"type": int, "default": 10},
        users={"type": int, "default": 100},
        trace={"default": None, "help": "time the send path (bench/traced_serve.py), JSON to this file"},
        workers={"type": int, "default": 1, "help": "pforte serve --workers (PostgreSQL only)"},
    )
    emit(
        run(args.db, args.rate, args.seconds, args.users, args.profile, args.trace, args.workers),
        args.json_out,
    )


if __name__ == "__main__":
    sys.exit(main())
