"""Restart time: from starting ``pforte serve`` to its first ready answer, after a kill -9.

    .venv/bin/python bench/restart.py --db sqlite --restarts 10

A crash costs a patient's message the restart plus the provider's retry delay (the crash harness,
bench/crash.py, reports both). This measures the restart alone, as an operator's supervisor runs it:
``pforte serve`` with its migration check, on a database that is already at the newest schema.
Each run is killed with SIGKILL once ``/readyz`` answers 200, and started again. Also reported: how
long importing pforte's server modules takes in a fresh interpreter, the largest part of a start.
"""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import httpx
from common import PFORTE, PY, ChannelSpec, Stack, base_args, emit, percentiles

IMPORTS = "import pforte.cli, pforte.app, pforte.bootstrap"


def _ready_after(stack: Stack) -> float:
    """Seconds from spawning ``pforte serve`` to a 200 from /readyz; the process is then killed."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [PFORTE, "serve"], env=stack.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with httpx.Client(timeout=1.0) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"pforte serve exited with {proc.returncode} during start-up")
                try:
                    if client.get(stack.url + "/readyz").status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([PY, "-c", IMPORTS], check=True)
    return time.perf_counter() - started


def main() -> None:
    args = base_args(restarts={"type": int, "default": 10})
    with Stack(args.db, [ChannelSpec(pnid="100000000000990")]) as stack:
        stack.stop_pforte()  # set-up started one; the restarts below use the same database and port
        _ready_after(stack)  # the first start after set-up warms the OS caches; not counted
        ready = [_ready_after(stack) * 1000 for _ in range(args.restarts)]
    imports = [_import_seconds() * 1000 for _ in range(5)]
    result: dict[str, Any] = {
        "scenario": "restart",
        "db": args.db,
        "restarts": args.restarts,
        "ready_ms": percentiles(ready, (50, 95)),
        "imports_ms": percentiles(imports, (50,)),
    }
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
