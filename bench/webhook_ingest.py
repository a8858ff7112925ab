"""Webhook ingest throughput of a real ``pforte serve`` process (not part of ``make test``).

    .venv/bin/python bench/webhook_ingest.py --db sqlite --batch 1 --seconds 10 --connections 64
    .venv/bin/python bench/webhook_ingest.py --db postgresql --batch 50

Starts pforte in its own process with a fresh database and data directory, registers an
organisation and a WhatsApp channel through the CLI, pre-signs enough webhook bodies (unique
wamids, 1,000 distinct patients, ``--batch`` messages per POST) and replays them with ``wrk``
(C, from Debian: a Python client tops out near 250 requests/s here and would measure itself).
Reports updates/s, latency percentiles, non-200 answers, rows actually stored and pforte's peak RSS
as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PFORTE = str(ROOT / ".venv" / "bin" / "pforte")
PNID = "100000000000777"
SECRET = "bench-app-secret"


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_body(start: int, count: int) -> bytes:
    """A webhook with ``count`` text messages from rotating patients."""
    messages, contacts = [], []
    for i in range(start, start + count):
        patient = i % 1000
        wa = f"49151{patient:08d}"
        contacts.append(
            {"profile": {"name": f"Patient {patient}"}, "wa_id": wa, "user_id": f"DE.{patient:016d}"}
        )
        messages.append(
            {
                "from": wa,
                "id": f"wamid.bench{i:012d}",
                "timestamp": str(int(time.time())),
                "type": "text",
                "text": {"body": f"Nachricht {i}: mir geht es heute nicht gut"},
            }
        )
    doc = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"display_phone_number": "4930", "phone_number_id": PNID},
                            "contacts": contacts,
                            "messages": messages,
                        },
                    }
                ],
            }
        ],
    }
    return json.dumps(doc).encode()


def peak_rss_kb(pid: int) -> int:
    """VmHWM of a process (peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def pg_database() -> str:
    """Create a throwaway PostgreSQL database and return its URL."""
    name = f"pforte_bench_{secrets.token_hex(4)}"
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc", f'CREATE DATABASE "{name}"'],
        check=True,
    )
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def load(
    url: str, channel_id: str, batch: int, seconds: int, connections: int, expected_rate: int
) -> dict[str, object]:
    """Pre-sign bodies for the whole run and replay them with wrk; parse its latency report."""
    posts = max(1000, int(expected_rate * seconds * 1.5 / batch))
    script = Path(tempfile.mkstemp(prefix="pforte-bodies-", suffix=".tsv")[1])
    with script.open("w") as fh:
        for i in range(posts):
            body = make_body(i * batch, batch)
            sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            fh.write(sig + "\t" + body.decode() + "\n")
    lua = str(Path(__file__).with_name("signed_posts.lua"))
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            lua,
            url,
            "--",
            f"/webhooks/whatsapp/{channel_id}",
            str(script),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    script.unlink()
    return {
        "posts_prepared": posts,
        "wrk": parse_wrk(out),
        "batch": batch,
        "connections": connections,
        "seconds": seconds,
    }


def parse_wrk(text: str) -> dict[str, object]:
    """Requests/s, latency percentiles and errors from wrk's --latency output."""
    res: dict[str, object] = {"non_2xx": 0, "socket_errors": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            res["p" + parts[0].rstrip("%") + "_ms"] = _ms(parts[1])
        elif line.strip().startswith("Requests/sec:"):
            res["requests_per_s"] = float(parts[1])
        elif "requests in" in line:
            res["requests"] = int(parts[0])
        elif line.strip().startswith("Non-2xx"):
            res["non_2xx"] = int(parts[-1])
        elif line.strip().startswith("Socket errors"):
            res["socket_errors"] = sum(int(p.strip(",")) for p in parts if p.strip(",").isdigit())
    return res


def _ms(value: str) -> float:
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if value.endswith(unit):
            return round(float(value[: -len(unit)]) * factor, 2)
    return float(value)


def stored_messages(env: dict[str, str]) -> int:
    """Messages rows in the database after the run (everything answered 200 must be there)."""
    code = (
        "import asyncio,sqlalchemy as sa\n"
        "from pforte.config import load_settings\n"
        "from pforte.db import Database\n"
        "async def m():\n"
        " d=Database(load_settings().effective_database_url)\n"
        " async with d.engine.connect() as c:\n"
        "  print((await c.execute(sa.text('select count(*) from messages'))).scalar())\n"
        " await d.dispose()\n"
        "asyncio.run(m())"
    )
    return int(
        subprocess.run(
            [str(ROOT / ".venv/bin/python"), "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
    )


def main() -> None:
    """Run one benchmark and print JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--expected-rate", type=int, default=4000, help="updates/s to pre-sign bodies for")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="pforte-bench-"))
    env = {**os.environ, "PFORTE_DATA_DIR": str(data), "PFORTE_LOG_LEVEL": "WARNING"}
    if args.db == "postgresql":
        env["PFORTE_DATABASE_URL"] = pg_database()
    port = free_port()
    env.update(PFORTE_PORT=str(port), PFORTE_HOST="127.0.0.1")
    run = lambda *a: subprocess.run([PFORTE, *a], env=env, check=True, capture_output=True, text=True).stdout  # noqa: E731
    run("migrate")
    run("org", "create", "--name", "Bench", "--slug", "bench")
    ch = json.loads(
        run(
            "channel",
            "add-whatsapp",
            "--org",
            "bench",
            "--name",
            "B",
            "--phone-number-id",
            PNID,
            "--display-phone-number",
            "+4930",
            "--access-token",
            "t",
            "--app-secret",
            SECRET,
            "--graph-base-url",
            "http://127.0.0.1:9",
        )
    )
    proc = subprocess.Popen(
        [PFORTE, "serve", "--no-migrate"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        result = load(url, ch["id"], args.batch, args.seconds, args.connections, args.expected_rate)
        wrk = result["wrk"]
        assert isinstance(wrk, dict)
        result.update(
            db=args.db,
            updates_per_s=round(float(wrk.get("requests_per_s", 0)) * args.batch),
            pforte_peak_rss_mb=round(peak_rss_kb(proc.pid) / 1024, 1),
            cores=os.cpu_count(),
            machine=platform.machine(),
            python=platform.python_version(),
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        result["messages_stored"] = stored_messages(env)
        print(json.dumps(result))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)
        if args.db == "postgresql":
            name = env["PFORTE_DATABASE_URL"].rsplit("/", 1)[1]
            subprocess.run(
                [
                    "psql",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "test",
                    "-qc",
                    f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                ],
                check=False,
            )


if __name__ == "__main__":
    sys.exit(main())
