"""``pforte serve`` with wall-clock timers around the outbound send path (diagnosis only).

    PFORTE_BENCH_TRACE=/tmp/trace.json .venv/bin/python bench/traced_serve.py

Wraps, at runtime and without touching src/: the whole ``send_message`` job, the pacer's
``acquire``, the Graph API call, and every ``engine.begin()`` entry (waiting for a pooled
connection plus BEGIN). On exit the timings (count, mean, p50/p95/p99 ms) go to the trace file.
The outbound scenario uses it with ``--trace``.
"""

from __future__ import annotations

import atexit
import functools
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
    with open(os.environ["PFORTE_BENCH_TRACE"], "w") as fh:
        json.dump(out, fh)


def patch() -> None:
    """Install the timers."""
    from contextlib import asynccontextmanager

    from sqlalchemy.ext.asyncio import AsyncEngine

    from pforte.channels.whatsapp import client
    from pforte.conversations import jobs
    from pforte.outbox import ratelimit

    jobs.send_message = timed("send_message job (total)", jobs.send_message)
    for cls_name in ("Pacer", "SharedPacer"):
        cls = getattr(ratelimit, cls_name, None)
        if cls is not None:
            cls.acquire = timed(f"{cls_name}.acquire", cls.acquire)
    client.GraphClient._call = timed("GraphClient._call (HTTP to simulator)", client.GraphClient._call)
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
