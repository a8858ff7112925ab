"""``pforte serve`` with wall-clock timers around the send and ingest paths (diagnosis only).

    PFORTE_BENCH_TRACE=/tmp/trace.json .venv/bin/python bench/traced_serve.py

Wraps, at runtime and without touching src/: the send handlers (a chunk, a single send), the
pacer, the Graph API call, the ingest writer's group transaction and its steps, the garbage
collector's pauses, every SQL statement's round trip (by its first words), and every
``engine.begin()`` entry (waiting for a pooled connection plus BEGIN). On exit the timings (count,
mean, p50/p95/p99 ms) go to the trace file. The outbound and ingest scenarios use it with
``--trace``.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import gc
import json
import os
import threading
import time
from collections import defaultdict
from typing import Any

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(name: str, fn: Any) -> Any:
    """An async wrapper recording wall time per call."""

    @functools.wraps(fn)
    async def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await fn(*a, **kw)
        finally:
            TIMES[name].append((time.perf_counter() - t0) * 1000)

    return wrapper


def dump() -> None:
    """Write percentiles of every timer."""
    out = {}
    for name, values in list(TIMES.items()):
        xs = sorted(values)
        n = len(xs)
        out[name] = {
            "count": n,
            "mean_ms": round(sum(xs) / n, 2),
            **{f"p{p}_ms": round(xs[min(n - 1, int(p / 100 * n))], 2) for p in (50, 95, 99)},
        }
    out["gc objects"] = {"tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count()}
    with open(os.environ["PFORTE_BENCH_TRACE"], "w") as fh:
        json.dump(out, fh)


lag_task: list[Any] = []


async def _loop_lag(outbox: Any) -> None:
    """Every 10 ms: how late the loop woke us (its busyness), and the outbox's jobs in flight."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        TIMES["event loop lag (10 ms sleep overshoot)"].append((time.perf_counter() - t0) * 1000 - 10)
        TIMES["outbox jobs in flight (count, not ms)"].append(float(outbox._in_flight))


def patch() -> None:
    """Install the timers."""
    from contextlib import asynccontextmanager

    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from pforte.channels.whatsapp import client
    from pforte.conversations import ingest, jobs
    from pforte.outbox import ratelimit

    jobs.send_message = timed("send_message (one, with upload)", jobs.send_message)
    jobs._send_chunk = timed("send chunk (total)", jobs._send_chunk)
    for cls_name in ("Pacer", "SharedPacer"):
        cls = getattr(ratelimit, cls_name, None)
        if cls is not None:
            cls.acquire = timed(f"{cls_name}.acquire", cls.acquire)
            cls.acquire_many = timed(f"{cls_name}.acquire_many", cls.acquire_many)
    for name in ("_reserve", "_take_places", "_give_back"):
        if hasattr(ratelimit.SharedPacer, name):
            fn = getattr(ratelimit.SharedPacer, name)
            setattr(ratelimit.SharedPacer, name, timed(f"SharedPacer.{name}", fn))
    from pforte.outbox import worker

    for name in ("claim", "recover_stale", "run_periodic", "run_once"):
        setattr(worker.OutboxWorker, name, timed(f"OutboxWorker.{name}", getattr(worker.OutboxWorker, name)))
    original_start = worker.OutboxWorker.start

    async def start(self: Any) -> None:
        await original_start(self)
        lag_task.append(asyncio.get_running_loop().create_task(_loop_lag(self)))

    worker.OutboxWorker.start = start  # type: ignore[method-assign]
    client.GraphClient.send = timed("GraphClient.send (HTTP to simulator)", client.GraphClient.send)
    ingest.IngestWriter._commit = timed("ingest group transaction (total)", ingest.IngestWriter._commit)
    for step in ("_write_messages", "_write_statuses", "_resolve_contacts", "_resolve_conversations"):
        if hasattr(ingest.Ingestor, step):
            setattr(ingest.Ingestor, step, timed(f"Ingestor.{step}", getattr(ingest.Ingestor, step)))

    @event.listens_for(Engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        conn.info["t0"] = time.perf_counter()

    @event.listens_for(Engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        words = " ".join(statement.split()[:3])[:48]
        TIMES[f"SQL {words}"].append((time.perf_counter() - conn.info.pop("t0", time.perf_counter())) * 1000)

    original_begin = AsyncEngine.begin

    @asynccontextmanager
    async def begin(self: Any) -> Any:
        t0 = time.perf_counter()
        async with original_begin(self) as conn:
            TIMES["engine.begin() entry (pool wait + BEGIN)"].append((time.perf_counter() - t0) * 1000)
            t1 = time.perf_counter()
            yield conn
        TIMES["engine.begin() body + COMMIT"].append((time.perf_counter() - t1) * 1000)

    AsyncEngine.begin = begin  # type: ignore[method-assign]
    AsyncSession.commit = timed("AsyncSession.commit", AsyncSession.commit)  # type: ignore[method-assign]

    gc_started: dict[int, tuple[float, float]] = {}

    def _gc(phase: str, info: dict[str, Any]) -> None:  # each collection's pause, by generation
        gen = info["generation"]
        if phase == "start":
            gc_started[gen] = (time.perf_counter(), time.thread_time())
        elif (t0 := gc_started.pop(gen, None)) is not None:
            # Collections while the server imports and starts (before its gc.freeze()) apart from
            # those under load: the full ones of start-up scan every module and take ~100 ms.
            when = "" if gc.get_freeze_count() else " (start-up, before the freeze)"
            TIMES[f"gc pause, generation {gen}{when}"].append((time.perf_counter() - t0[0]) * 1000)
            # this thread's CPU beside the wall time: a pause spent off the CPU is the host's
            TIMES[f"gc pause CPU, generation {gen}{when}"].append((time.thread_time() - t0[1]) * 1000)
            TIMES[f"gc objects freed (count, not ms), generation {gen}{when}"].append(
                float(info["collected"])
            )

    gc.callbacks.append(_gc)
    atexit.register(dump)

    def every_second() -> None:  # uvicorn's exit path may skip atexit; keep the file current
        while True:
            time.sleep(1.0)
            if TIMES:
                dump()

    threading.Thread(target=every_second, daemon=True).start()


if __name__ == "__main__":
    patch()
    import sys

    from pforte.cli import main

    sys.argv = ["pforte", "serve", "--no-migrate"]
    main()
