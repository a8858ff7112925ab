"""End-to-end latency: webhook receipt → the live event reaching a connected inbox (SSE) client.

    .venv/bin/python bench/e2e_latency.py --db postgresql --probes 200

A logged-in staff client holds ``GET /events`` open. A probe posts one signed webhook with a text
from a patient never seen before and waits for the ``conversation`` event naming a conversation id
the client has not seen yet; the latency is from just before the POST to the event's arrival. Probes
run one at a time, first on an idle pforte, then while ``wrk`` keeps ingesting unbatched webhooks
from 1,000 known patients (their conversation ids are loaded beforehand, so their events are told
apart). Reports p50/p95/p99 for both phases, the POST's own latency, and probes whose event never
arrived within 5 s (the event bus drops the oldest events of a subscriber that falls 256 behind).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import httpx
from common import (
    ChannelSpec,
    Stack,
    base_args,
    emit,
    message_body,
    parse_wrk,
    percentiles,
    sign,
    write_signed,
    wrk_cmd,
)

PNID = "100000000000780"
PATIENTS = 1000


class Inbox:
    """An SSE client that records when each new conversation id first shows up."""

    def __init__(self, url: str, cookie: str, known: set[str]) -> None:
        self.url, self.cookie, self.known = url, cookie, known
        self.new: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
        self.events = 0
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Read the stream until cancelled."""
        async with (
            httpx.AsyncClient(timeout=None) as client,
            client.stream(
                "GET", self.url + "/events", headers={"Cookie": f"pforte_session={self.cookie}"}
            ) as r,
        ):
            r.raise_for_status()
            kind = ""
            async for line in r.aiter_lines():
                if line.startswith(": connected"):
                    self.connected.set()
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "conversation":
                    now = time.perf_counter()
                    self.events += 1
                    cid = json.loads(line[6:]).get("conversation_id")
                    if cid and cid not in self.known:
                        self.known.add(cid)
                        self.new.put_nowait((now, cid))


async def probe_phase(stack: Stack, ch: ChannelSpec, inbox: Inbox, first: int, count: int) -> dict[str, Any]:
    """``count`` sequential probes from new patients; latencies in ms."""
    e2e, ack, lost = [], [], 0
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        for i in range(first, first + count):
            body = message_body(PNID, i, 1, patients=10**7, prefix="probe")
            headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, ch.secret)}
            while not inbox.new.empty():  # a late event of an earlier probe
                inbox.new.get_nowait()
            t0 = time.perf_counter()
            r = await client.post(ch.webhook_path, content=body, headers=headers)
            t1 = time.perf_counter()
            if r.status_code != 200:
                lost += 1
                continue
            ack.append((t1 - t0) * 1000)
            try:
                t_ev, _ = await asyncio.wait_for(inbox.new.get(), 5.0)
                e2e.append((t_ev - t0) * 1000)
            except TimeoutError:
                lost += 1
            await asyncio.sleep(0.02)
    return {"probes": count, "lost": lost, **percentiles(e2e), "ack": percentiles(ack)}


async def measure(
    stack: Stack, ch: ChannelSpec, probes: int, seconds: int, connections: int, known: set[str], cookie: str
) -> dict[str, Any]:
    """Idle phase, then loaded phase."""
    inbox = Inbox(stack.url, cookie, known)
    reader = asyncio.create_task(inbox.run())
    await asyncio.wait_for(inbox.connected.wait(), 10)
    try:
        idle = await probe_phase(stack, ch, inbox, PATIENTS * 10, probes)
        rate_bodies = 1500 * (seconds + 5)
        tsv = write_signed(
            (message_body(PNID, i, 1, patients=PATIENTS, prefix="bg") for i in range(rate_bodies)), ch.secret
        )
        wrk = subprocess.Popen(
            wrk_cmd(stack.url, ch.webhook_path, tsv, seconds, connections),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            await asyncio.sleep(1.0)
            loaded = await probe_phase(stack, ch, inbox, PATIENTS * 20, probes)
            out = await asyncio.to_thread(wrk.communicate, None, seconds + 30)
        finally:
            if wrk.poll() is None:
                wrk.kill()
            tsv.unlink()
        background = parse_wrk(out[0])
        loaded["background_updates_per_s"] = background["requests_per_s"]
        loaded["background_p99_ms"] = background["p99_ms"]
        loaded["background_connections"] = connections
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return {"idle": idle, "loaded": loaded, "events_received": inbox.events}


def run(db: str, probes: int, seconds: int, connections: int) -> dict[str, Any]:
    """One end-to-end measurement on a fresh stack."""
    ch = ChannelSpec(PNID)
    with Stack(db, [ch]) as stack:
        stack.patients_write_once(ch, PATIENTS)
        known = {r[0] for r in stack.sql("select id from conversations")}
        cookie = stack.login()
        stack.reset_rss()
        result = asyncio.run(measure(stack, ch, probes, seconds, connections, known, cookie))
        rss, cpu, log = stack.rss(), stack.cpu(), stack.log_summary()
    return {
        "scenario": "e2e_webhook_to_sse",
        "db": db,
        **result,
        "errors": result["idle"]["lost"] + result["loaded"]["lost"],
        "peak_rss_mb": rss,
        "cpu_cores_used": cpu,
        "pforte_log": log,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the end-to-end latency benchmark and print JSON."""
    args = base_args(
        argv,
        probes={"type": int, "default": 200},
        seconds={"type": int, "default": 12, "help": "how long the background load runs"},
        connections={"type": int, "default": 16, "help": "wrk connections of the background load"},
    )
    emit(run(args.db, args.probes, args.seconds, args.connections), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
