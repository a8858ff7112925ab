"""The CPU that pforte's ASGI stack costs per request, without sockets, database or load generator.

    .venv/bin/python bench/app_stack.py [--requests 20000] [--rounds 5]

Builds the real app (``create_app`` around unstarted services on a throwaway SQLite directory) and
calls it directly with ASGI messages, ``GET /healthz``, in a loop on one event loop. It does this
with pforte's telemetry setting (``web/security.py::NO_TELEMETRY``) and with FastAPI's default,
alternating rounds, and prints the microseconds of CPU (process time) per request for each. What
it isolates: the framework's share of a request (middlewares, routing, the telemetry checks),
which the HTTP benchmarks cannot separate from this host's swings. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pforte.app as app_module
from pforte.bootstrap import build_services
from pforte.config import Settings

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/healthz",
    "raw_path": b"/healthz",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"bench")],
    "client": ("127.0.0.1", 1),
    "server": ("127.0.0.1", 80),
}


async def _requests(app: Any, n: int) -> float:
    """Process-CPU microseconds per request over ``n`` requests (every answer checked)."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    t0 = time.process_time()
    for _ in range(n):
        await app(dict(SCOPE), receive, send)
    cpu = time.process_time() - t0
    if statuses != [200] * n:
        raise SystemExit(f"unexpected answers: {sorted(set(statuses))}")
    return cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), run_workers=False)
        apps = {}
        ours = app_module.NO_TELEMETRY
        for name, telemetry in (("pforte", ours), ("fastapi_default", {})):
            app_module.NO_TELEMETRY = telemetry  # type: ignore[assignment]
            apps[name] = app_module.create_app(build_services(settings), manage_lifespan=False)
        app_module.NO_TELEMETRY = ours
        runs: dict[str, list[float]] = {name: [] for name in apps}

        async def measure() -> None:
            for app in apps.values():
                await _requests(app, 500)  # build the middleware stacks, warm caches
            for _ in range(args.rounds):
                for name, app in apps.items():
                    runs[name].append(round(await _requests(app, args.requests), 1))

        asyncio.run(measure())
    out = {
        "scenario": "app_stack_healthz",
        "requests_per_round": args.requests,
        "cpu_us_per_request": runs,
        "median_us": {name: statistics.median(v) for name, v in runs.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
