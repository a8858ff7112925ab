"""What the audit log costs webhook ingest: the same load with receipts in the audit chain and without.

    .venv/bin/python bench/audit_overhead.py --db postgresql --rounds 3

Each ingest transaction appends one ``webhook.received`` entry per organisation (counts only) to the
organisation's hash chain, which locks the chain's head row until the commit. This runs
``webhook_ingest.run`` with ``PFORTE_AUDIT_RECEIPTS`` true and false, alternating (off, on, off,
on, …) so that drift on a shared machine hits both alike, for unbatched (1 per POST) and batched (50
per POST) load, and reports the medians and the relative change. The issue's bar: at most 10 % less
throughput with the audit on.
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any

from common import base_args, emit
from webhook_ingest import run as ingest

CASES = ((1, 64, 3000), (50, 16, 8000))  # (batch, connections, expected updates/s)


def measure(db: str, rounds: int, seconds: int) -> dict[str, Any]:
    """Alternating runs with the audit off and on; medians and the change."""
    out: dict[str, Any] = {"scenario": "audit_overhead", "db": db, "rounds": rounds, "cases": {}}
    for batch, connections, rate in CASES:
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for _ in range(rounds):
            for mode in ("off", "on"):
                os.environ["PFORTE_AUDIT_RECEIPTS"] = "true" if mode == "on" else "false"
                r = ingest(db, batch, seconds, connections, rate)
                runs[mode].append(
                    {
                        "updates_per_s": r["updates_per_s"],
                        "p99_ms": r["load"]["p99_ms"],
                        "errors": r["errors"],
                    }
                )
        os.environ.pop("PFORTE_AUDIT_RECEIPTS", None)
        off = statistics.median(x["updates_per_s"] for x in runs["off"])
        on = statistics.median(x["updates_per_s"] for x in runs["on"])
        out["cases"][f"batch_{batch}"] = {
            "updates_per_s_audit_off": off,
            "updates_per_s_audit_on": on,
            "change_percent": round((on - off) / off * 100, 1) if off else None,
            "p99_ms_audit_off": statistics.median(x["p99_ms"] for x in runs["off"]),
            "p99_ms_audit_on": statistics.median(x["p99_ms"] for x in runs["on"]),
            "errors": sum(x["errors"] for m in runs.values() for x in m),
            "runs": runs,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print JSON."""
    args = base_args(
        argv,
        rounds={"type": int, "default": 3},
        seconds={"type": int, "default": 6},
    )
    emit(measure(args.db, args.rounds, args.seconds), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
