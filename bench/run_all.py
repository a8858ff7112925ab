"""``make bench``: every load scenario on SQLite and PostgreSQL, one table, one JSON file.

    .venv/bin/python bench/run_all.py [--quick] [--db sqlite,postgresql] [--only ingest_1,outbound_80]

Each scenario is its own process (``bench/<scenario>.py``) with its own fresh pforte/simulator
stack and database, bounded by a timeout, so one failure or hang costs one row, not the run.
Writes ``bench/results/<timestamp>.json`` (machine, git revision, every scenario's full JSON) and
replaces the generated section of ``docs/performance.md`` between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` (hand-written text around it is kept). ``--quick`` shortens every run and
seeds 10,000 conversations / 100,000 messages instead of 100,000 / 1,000,000 (smoke test only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import BENCH, PY, ROOT, machine

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
RSS_LIMIT_MB = 300

# name: (script, full args, quick args, timeout seconds)
SCENARIOS: dict[str, tuple[str, list[str], list[str], int]] = {
    "ingest_1": (
        "webhook_ingest.py",
        ["--batch", "1", "--connections", "64", "--seconds", "8", "--expected-rate", "2500"],
        ["--batch", "1", "--connections", "64", "--seconds", "3", "--expected-rate", "2500"],
        120,
    ),
    "ingest_50": (
        "webhook_ingest.py",
        ["--batch", "50", "--connections", "16", "--seconds", "8", "--expected-rate", "8000"],
        ["--batch", "50", "--connections", "16", "--seconds", "3", "--expected-rate", "8000"],
        120,
    ),
    "ingest_50_c4": (  # the same POSTs with 4 in flight: latency follows concurrency (Little's law)
        "webhook_ingest.py",
        ["--batch", "50", "--connections", "4", "--seconds", "8", "--expected-rate", "8000"],
        ["--batch", "50", "--connections", "4", "--seconds", "3", "--expected-rate", "8000"],
        120,
    ),
    "ingest_50_open": (  # 4,000 updates/s offered at a steady pace, as Meta pushes them; patients known
        "webhook_ingest.py",
        ["--batch", "50", "--seconds", "10", "--offered-rate", "4000", "--known-patients"],
        ["--batch", "50", "--seconds", "4", "--offered-rate", "4000", "--known-patients"],
        120,
    ),
    "ingest_50_open_loaded": (  # the same against a hospital's database (other patients' history)
        "webhook_ingest.py",
        [
            "--batch",
            "50",
            "--seconds",
            "10",
            "--offered-rate",
            "4000",
            "--known-patients",
            "--seed-conversations",
            "100000",
            "--seed-messages",
            "1000000",
        ],
        [
            "--batch",
            "50",
            "--seconds",
            "4",
            "--offered-rate",
            "4000",
            "--known-patients",
            "--seed-conversations",
            "10000",
            "--seed-messages",
            "100000",
        ],
        400,  # seeding 1,000,000 messages into SQLite took up to 150 s on a busy day
    ),
    "ingest_50_open_3000": (
        "webhook_ingest.py",
        ["--batch", "50", "--seconds", "10", "--offered-rate", "3000", "--known-patients"],
        ["--batch", "50", "--seconds", "4", "--offered-rate", "3000", "--known-patients"],
        120,
    ),
    "ingest_1000": (
        "webhook_ingest.py",
        ["--batch", "1000", "--connections", "4", "--seconds", "8", "--expected-rate", "8000"],
        ["--batch", "1000", "--connections", "4", "--seconds", "3", "--expected-rate", "8000"],
        120,
    ),
    "ingest_1000_open": (  # 4,000 updates/s as four POSTs of 1,000, Meta's largest batch
        "webhook_ingest.py",
        ["--batch", "1000", "--seconds", "10", "--offered-rate", "4000", "--known-patients"],
        ["--batch", "1000", "--seconds", "4", "--offered-rate", "4000", "--known-patients"],
        120,
    ),
    "status_1": (
        "status_ingest.py",
        ["--batch", "1", "--connections", "64", "--seconds", "8"],
        ["--batch", "1", "--connections", "64", "--seconds", "3"],
        120,
    ),
    "status_50": (  # Meta batches statuses under load (up to 1,000 per POST)
        "status_ingest.py",
        ["--batch", "50", "--connections", "16", "--seconds", "8", "--expected-rate", "8000"],
        ["--batch", "50", "--connections", "16", "--seconds", "3", "--expected-rate", "8000"],
        120,
    ),
    "status_50_open": (  # 3 × 1,000 outbound/s offered at a steady pace
        "status_ingest.py",
        ["--batch", "50", "--seconds", "10", "--offered-rate", "3000"],
        ["--batch", "50", "--seconds", "4", "--offered-rate", "3000"],
        120,
    ),
    "outbound_80": (
        "outbound.py",
        ["--rate", "80", "--seconds", "10"],
        ["--rate", "80", "--seconds", "4"],
        120,
    ),
    "outbound_1000": (
        "outbound.py",
        ["--rate", "1000", "--seconds", "5"],
        ["--rate", "1000", "--seconds", "2"],
        120,
    ),
    "outbound_1000_w2": (  # two app processes on one PostgreSQL share the number's pacing
        "outbound.py",
        ["--rate", "1000", "--seconds", "5", "--workers", "2"],
        ["--rate", "1000", "--seconds", "2", "--workers", "2"],
        120,
    ),
    "ingest_1_w2": (  # one update per POST, two app processes: the 2-core configuration
        "webhook_ingest.py",
        [
            "--batch",
            "1",
            "--connections",
            "64",
            "--seconds",
            "8",
            "--expected-rate",
            "2500",
            "--workers",
            "2",
        ],
        [
            "--batch",
            "1",
            "--connections",
            "64",
            "--seconds",
            "3",
            "--expected-rate",
            "2500",
            "--workers",
            "2",
        ],
        120,
    ),
    "ingest_50_open_w2": (
        "webhook_ingest.py",
        ["--batch", "50", "--seconds", "10", "--offered-rate", "4000", "--known-patients", "--workers", "2"],
        ["--batch", "50", "--seconds", "4", "--offered-rate", "4000", "--known-patients", "--workers", "2"],
        120,
    ),
    "ingest_50_w2": (
        "webhook_ingest.py",
        [
            "--batch",
            "50",
            "--connections",
            "16",
            "--seconds",
            "8",
            "--expected-rate",
            "8000",
            "--workers",
            "2",
        ],
        [
            "--batch",
            "50",
            "--connections",
            "16",
            "--seconds",
            "3",
            "--expected-rate",
            "8000",
            "--workers",
            "2",
        ],
        120,
    ),
    "e2e": (
        "e2e_latency.py",
        ["--probes", "200", "--seconds", "12"],
        ["--probes", "50", "--seconds", "5"],
        120,
    ),
    "inbox_pages": (
        "inbox_pages.py",
        ["--conversations", "100000", "--messages", "1000000", "--requests", "200", "--explain"],
        ["--conversations", "10000", "--messages", "100000", "--requests", "50", "--explain"],
        300,  # seeding 1,000,000 messages into SQLite took up to 150 s on a busy day
    ),
}


POSTGRESQL_ONLY = {
    "outbound_1000_w2",
    "ingest_1_w2",
    "ingest_50_w2",
    "ingest_50_open_w2",
}  # several processes need PostgreSQL


def run_one(name: str, db: str, quick: bool) -> dict[str, Any]:
    """Run one scenario script; its JSON, or an error record."""
    script, full, short, timeout = SCENARIOS[name]
    out = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")[1])
    cmd = [PY, str(BENCH / script), "--db", db, *(short if quick else full), "--json-out", str(out)]
    started = time.monotonic()
    print(f"[{datetime.now():%H:%M:%S}] {db:10} {name} …", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not out.read_text():
            return {"scenario": name, "db": db, "failed": (proc.stderr or proc.stdout)[-1500:]}
        result: dict[str, Any] = json.loads(out.read_text())
    except subprocess.TimeoutExpired:
        return {"scenario": name, "db": db, "failed": f"timed out after {timeout} s"}
    finally:
        out.unlink(missing_ok=True)
    result["key"] = name
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["command"] = ".venv/bin/python bench/" + " ".join(
        [script, "--db", db, *(short if quick else full)]
    )
    return result


# -- targets and the table -------------------------------------------------------------------------


def _rss_ok(r: dict[str, Any]) -> bool:
    return all(v < RSS_LIMIT_MB for v in r.get("peak_rss_mb", {}).values())


def row(r: dict[str, Any]) -> dict[str, Any]:
    """One table row: what was measured, the target, and whether it was met."""
    key, out = r.get("key", r["scenario"]), {"db": r["db"], "scenario": r.get("key", r["scenario"])}
    if "failed" in r:
        return {**out, "what": "FAILED", "value": r["failed"].strip().splitlines()[-1][:80], "met": False}
    rss = r.get("peak_rss_mb", {})
    out["rss"] = " / ".join(f"{k} {v:.0f}" for k, v in rss.items())
    if key.startswith("ingest"):
        w = r["load"]
        goal = 1000 if r["batch"] == 1 else 4000
        pace = (
            f"{r['offered_updates_per_s']:,}/s offered"
            if r.get("offered_updates_per_s")
            else f"{r['connections']} conns"
        )
        offered = r.get("offered_updates_per_s") or 0
        in_flight = r["batch"] * r["connections"]
        if 0 < offered < goal:  # a load below the target rate: does it answer everything within 250 ms?
            target = f"{offered:,}/s answered, p99 < 250 ms (below the {goal:,}/s target)"
            met = r["updates_per_s"] >= 0.99 * offered and w["p99_ms"] < 250 and r["errors"] == 0
        elif not offered and r["batch"] > 1:
            # A closed loop keeps `in_flight` updates waiting, so each POST waits on average
            # in_flight ÷ rate (Little's law) however fast pforte is: its latency measures the
            # harness's choice of connections. The latency target is judged where Meta's pace is
            # reproduced, in the open-loop rows; this row measures throughput.
            floor_ms = 1000 * in_flight / max(r["updates_per_s"], 1)
            target = (
                f"≥ {goal:,}/s (p99 not judged: {in_flight:,} updates in flight, "
                f"so {floor_ms:,.0f} ms on average at this rate)"
            )
            met = r["updates_per_s"] >= goal and r["errors"] == 0
        else:
            target = f"≥ {goal:,}/s, p99 < 250 ms"
            met = r["updates_per_s"] >= goal and w["p99_ms"] < 250 and r["errors"] == 0
        loaded = r.get("seeded")
        out.update(
            what=f"updates/s, {r['batch']} per POST, {pace}"
            + (f", {r['workers']} processes" if r.get("workers", 1) > 1 else "")
            + (f", {loaded['conversations']:,} conv / {loaded['messages']:,} msgs loaded" if loaded else ""),
            value=f"{r['updates_per_s']:,}",
            p50=w["p50_ms"],
            p95=w["p95_ms"],
            p99=w["p99_ms"],
            errors=r["errors"],
            target=target,
            met=met,
        )
    elif key.startswith("status"):
        w = r["load"]
        pace = f", {r['offered_statuses_per_s']:,}/s offered" if r.get("offered_statuses_per_s") else ""
        out.update(
            what=f"statuses/s ({r['batch']} per POST{pace}) = outbound/s × 3",
            value=f"{r['statuses_per_s']:,} (covers {r['covers_outbound_per_s']:,}/s out)",
            p50=w["p50_ms"],
            p95=w["p95_ms"],
            p99=w["p99_ms"],
            errors=r["errors"],
            target="≥ 3,000/s (3 × 1,000/s), p99 < 250 ms",
            met=r["statuses_per_s"] >= 3000 and w["p99_ms"] < 250 and r["errors"] == 0,
        )
    elif key.startswith("outbound"):
        out.update(
            what=f"sends/s at limit {r['rate_limit']}/s (paced {r['paced_at']})"
            + (f", {r['workers']} processes" if r.get("workers", 1) > 1 else ""),
            value=f"{r['messages_per_s']:,} (busiest 1 s: {r['busiest_second']}; "
            f"{r['sent_to_provider']}/{r['queued']} sent)",
            errors=f"130429: {r['rate_limit_errors_130429']}",
            target="holds paced rate, 0 × 130429",
            met=r["messages_per_s"] >= 0.95 * r["paced_at"]
            and r["rate_limit_errors_130429"] == 0
            and r["not_sent_at_end"] == 0,
        )
    elif key == "e2e":
        idle, loaded = r["idle"], r["loaded"]
        out.update(
            what="webhook → SSE event, idle \\| under load",
            value=f"load {loaded['background_updates_per_s']:,.0f} updates/s",
            p50=f"{idle.get('p50_ms')} \\| {loaded.get('p50_ms')}",
            p95=f"{idle.get('p95_ms')} \\| {loaded.get('p95_ms')}",
            p99=f"{idle.get('p99_ms')} \\| {loaded.get('p99_ms')}",
            errors=f"lost {idle['lost']} \\| {loaded['lost']}",
            target="p99 < 200 ms",
            met=max(idle.get("p99_ms", 1e9), loaded.get("p99_ms", 1e9)) < 200 and r["errors"] == 0,
        )
    elif key == "inbox_pages":
        s, i, c = r["seed"], r["inbox"], r["conversation"]
        out.update(
            what=f"GET / \\| GET /conversations/{{id}}, {s['conversations']:,} conv / {s['messages']:,} msgs",
            value=f"{i['requests']} + {c['requests']} sequential requests",
            p50=f"{i['p50_ms']} \\| {c['p50_ms']}",
            p95=f"{i['p95_ms']} \\| {c['p95_ms']}",
            p99=f"{i['p99_ms']} \\| {c['p99_ms']}",
            errors=r["errors"],
            target="p95 < 150 ms",
            met=max(i["p95_ms"], c["p95_ms"]) < 150 and r["errors"] == 0,
        )
    out["met"] = bool(out.get("met")) and _rss_ok(r)
    return out


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of every result."""
    lines = [
        "| db | scenario | measured | value | p50 ms | p95 ms | p99 ms | errors | peak RSS MB | target | met"
        " |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        x = row(r)
        lines.append(
            "| "
            + " | ".join(
                str(x.get(k, ""))
                for k in ("db", "scenario", "what", "value", "p50", "p95", "p99", "errors", "rss", "target")
            )
            + f" | {'yes' if x['met'] else '**no**'} |"
        )
    return "\n".join(lines)


def git_revision() -> str:
    """The commit measured, with ``+dirty`` when the working tree had changes."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_doc(report: dict[str, Any], quick: bool) -> None:
    """Replace the generated section of docs/performance.md."""
    m = report["machine"]
    body = "\n".join(
        [
            BEGIN,
            "<!-- generated by bench/run_all.py; edit the text outside the markers only -->",
            "",
            f"Last run: {report['finished']} · revision `{report['revision']}` · "
            f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM, Python {m['python']}, "
            f"PostgreSQL {m['postgresql']}, SQLite {m['sqlite']}"
            + (" · **--quick (smoke sizes, not comparable)**" if quick else ""),
            f"· JSON: `bench/results/{report['file']}` · command: `{report['command']}`",
            "",
            table(report["results"]),
            "",
            "Every scenario ran in its own process against a fresh stack (pforte `serve`, one uvicorn "
            "worker, encryption on; the simulator as a separate process where used). Latencies are per "
            "POST/request as the client saw them. Peak RSS is VmHWM, reset when the load started.",
            END,
        ]
    )
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + body + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Generated results (`make bench`)\n\n" + body + "\n"
    DOC.write_text(text)


def main() -> None:
    """Run the selected scenarios on the selected databases."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--db", default="sqlite,postgresql")
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/performance.md")
    ap.add_argument("--from-json", default=None, help="write the table of an earlier run's JSON again")
    args = ap.parse_args()
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        print(table(report["results"]))
        if not args.no_doc:
            write_doc(report, report["quick"])
        return
    started = datetime.now(UTC)
    results = []
    for db in args.db.split(","):
        for name in args.only.split(","):
            if db == "postgresql" or name not in POSTGRESQL_ONLY:
                results.append(run_one(name, db, args.quick))
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    report = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": git_revision(),
        "machine": machine(),
        "quick": args.quick,
        "command": "bench/run_all.py " + " ".join(sys.argv[1:]),
        "file": f"{stamp}.json",
        "results": results,
    }
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / report["file"]).write_text(json.dumps(report, indent=1, default=str))
    print(table(results))
    print(f"\nJSON: bench/results/{report['file']}")
    if not args.no_doc:
        write_doc(report, args.quick)


if __name__ == "__main__":
    main()
