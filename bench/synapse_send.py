"""Matrix Synapse sending messages: the figures to quote beside pforte's, measured the same way.

    .venv/bin/python bench/synapse_send.py --db sqlite --seconds 10 --connections 16
    .venv/bin/python bench/synapse_send.py --db postgresql --seconds 10 --connections 64

A hospital that does not pick pforte may run a Matrix homeserver (Synapse, plus bridges) instead.
This script measures what that server does on the same machine, with the same kind of client:

1. Installs ``matrix-synapse`` 1.163.x and ``psycopg2-binary`` into their own venv
   (``.bench/synapse-venv``, git-ignored; Synapse pins Twisted, so never into ``.venv``), once.
2. Starts Synapse (one main process, no workers) as a separate process on a free loopback port
   with a generated config plus an overlay: client listener only, no key servers, open
   registration, every rate limiter raised out of reach (so the limiter never caps the figures),
   root log level ``--log-level`` (WARNING by default, as pforte runs in the bench; Synapse's
   stock config logs every request at INFO). The database is a fresh SQLite file or a throwaway
   PostgreSQL database ``bench_synapse_<random>`` (UTF8, C collation, as Synapse requires).
3. Registers a sender and a reader through ``/_matrix/client/v3/register`` (``m.login.dummy``),
   creates ``--rooms`` private rooms (1 by default) and lets the reader join them.
4. Send → seen in ``/sync``: the reader long-polls ``/sync`` (filtered to room timelines);
   ``--probes`` messages are sent one at a time (20 ms apart) and each latency runs from just
   before the ``PUT`` to the arrival of the sync response that carries it. This is the analogue of
   pforte's webhook → SSE latency (``bench/e2e_latency.py``, idle phase). A long poll must be
   reissued after every response, which a stream does not; that is part of what is measured.
5. Throughput: for ``--seconds`` the sender ``PUT``s ``m.room.message`` text events
   (``/rooms/{roomId}/send/m.room.message/{txnId}``) from ``--connections`` concurrent keep-alive
   connections of one ``httpx`` client, each waiting for its answer before sending again. Reported:
   messages/s answered 200 over the whole run (the requests still in flight at the end included),
   the slowest and fastest whole second, p50/p95/p99 latency per ``PUT``, non-200 answers and
   transport errors, and the ``m.room.message`` events Synapse stored (checked in its database).

Synapse's peak RSS is its VmHWM, reset after setup, so it covers both measured phases. The CPU share
of Synapse, of this load generator and (on PostgreSQL) of the database backends is measured over
the throughput phase: all of them share the same 2 cores, so the figures are lower bounds for a
dedicated server, exactly as for pforte. The machine's total busy time is read from /proc/stat as
well, and whatever of it was not these processes is reported as ``other_processes`` (with a warning
on stderr), so a run disturbed by another job on the machine shows as such. Bodies are plain text (a
client in an end-to-end encrypted room sends ``m.room.encrypted`` ciphertext of similar size, which
the server stores without reading, so its work is much the same).

Prints markdown table rows in the columns of ``bench/run_all.py`` and stores the full result in
``bench/results/synapse.json``, keyed by database and then by run (``c16``, ``c64-r16`` …).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from common import ROOT, cpu_seconds, free_port, machine, peak_rss_mb, percentiles, reset_peak_rss

VENV = ROOT / ".bench" / "synapse-venv"
VENV_PY = VENV / "bin" / "python"
REQUIREMENTS = ("matrix-synapse~=1.163.0", "psycopg2-binary")
RESULTS = ROOT / "bench" / "results" / "synapse.json"
SERVER_NAME = "bench.local"
CS = "/_matrix/client/v3"
UNLIMITED = {"per_second": 1_000_000, "burst_count": 1_000_000}
PROBE_KEY = "org.pforte.bench.probe"  # custom content key that names a sync probe
SYNC_FILTER = json.dumps(
    {
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "timeline": {"limit": 50, "types": ["m.room.message"]},
            "state": {"lazy_load_members": True},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    },
    separators=(",", ":"),
)
LOG_FORMAT = "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the table)."""
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# -- the Synapse venv ------------------------------------------------------------------------------


def ensure_venv() -> str:
    """Create ``.bench/synapse-venv`` with Synapse unless it already holds these requirements.

    Returns the installed Synapse version.
    """
    stamp = VENV / ".bench-requirements"
    wanted = "\n".join(REQUIREMENTS)
    if not (VENV_PY.exists() and stamp.exists() and stamp.read_text() == wanted):
        log(f"installing {', '.join(REQUIREMENTS)} into {VENV.relative_to(ROOT)} (about a minute)")
        VENV.parent.mkdir(parents=True, exist_ok=True)
        if not VENV_PY.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(VENV_PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS],
            check=True,
        )
        stamp.write_text(wanted)
    # Not synapse.__version__: it appends `git describe` of the enclosing checkout, which is pforte's.
    return subprocess.run(
        [str(VENV_PY), "-c", "import importlib.metadata as m; print(m.version('matrix-synapse'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


# -- the Synapse process ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    """``preexec_fn``: Linux sends Synapse SIGTERM if this harness dies without cleaning up."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def psql(sql: str, database: str = "test", check: bool = True) -> str:
    """One statement as the PostgreSQL superuser on 127.0.0.1; its unaligned output."""
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-qtAc", sql],
        check=check,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


@dataclass
class Synapse:
    """A Synapse homeserver on a fresh database and data directory; ``close`` removes both."""

    db: str
    log_level: str = "WARNING"
    data: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="synapse-bench-")))
    url: str = ""
    pg_name: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    overlay: dict[str, Any] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        """Synapse's own log file."""
        return self.data / "homeserver.log"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite database file (``--db sqlite``)."""
        return self.data / "homeserver.db"

    def open(self) -> Synapse:
        """Write the config, create the database, start Synapse and wait for ``/health``."""
        base = self.data / "homeserver.yaml"
        subprocess.run(
            [
                str(VENV_PY),
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                SERVER_NAME,
                "--config-path",
                str(base),
                "--generate-config",
                "--report-stats=no",
            ],
            cwd=self.data,
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        if self.db == "postgresql":
            self.pg_name = f"bench_synapse_{secrets.token_hex(4)}"
            psql(
                f"CREATE DATABASE \"{self.pg_name}\" ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C' "
                "TEMPLATE template0"
            )
            database: dict[str, Any] = {
                "name": "psycopg2",
                "args": {
                    "user": "postgres",
                    "host": "127.0.0.1",
                    "port": 5432,
                    "dbname": self.pg_name,
                    "cp_min": 5,
                    "cp_max": 10,
                },
            }
        else:
            database = {"name": "sqlite3", "args": {"database": str(self.sqlite_path)}}
        log_config = self.data / "log.yaml"
        log_config.write_text(json.dumps(self._log_config(), indent=1))
        # Later config files replace whole top-level keys of earlier ones; JSON is valid YAML.
        self.overlay = {
            "listeners": [
                {
                    "port": port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": database,
            "log_config": str(log_config),
            "media_store_path": str(self.data / "media_store"),
            "report_stats": False,
            "enable_metrics": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "rc_message": UNLIMITED,
            "rc_registration": UNLIMITED,
            "rc_login": {"address": UNLIMITED, "account": UNLIMITED, "failed_attempts": UNLIMITED},
            "rc_room_creation": UNLIMITED,
            "rc_joins": {"local": UNLIMITED, "remote": UNLIMITED},
            "rc_joins_per_room": UNLIMITED,
            "rc_invites": {"per_room": UNLIMITED, "per_user": UNLIMITED, "per_issuer": UNLIMITED},
        }
        overlay = self.data / "bench.yaml"
        overlay.write_text(json.dumps(self.overlay, indent=1))
        with (self.data / "synapse.out").open("ab") as out:  # a file, never a pipe nobody reads
            self.proc = subprocess.Popen(
                [str(VENV_PY), "-m", "synapse.app.homeserver", "-c", str(base), "-c", str(overlay)],
                cwd=self.data,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self._wait_ready(timeout=120)
        return self

    def _log_config(self) -> dict[str, Any]:
        """Synapse's stock logging setup (buffered file handler) at ``log_level``."""
        return {
            "version": 1,
            "formatters": {"precise": {"format": LOG_FORMAT}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                },
                "buffer": {
                    "class": "synapse.logging.handlers.PeriodicallyFlushingMemoryHandler",
                    "target": "file",
                    "capacity": 10,
                    "flushLevel": 30,
                    "period": 5,
                },
            },
            "loggers": {"synapse.storage.SQL": {"level": self.log_level}},
            "root": {"level": self.log_level, "handlers": ["buffer"]},
            "disable_existing_loggers": False,
        }

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Synapse exited with {self.proc.returncode}:\n{self.output_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Synapse did not answer /health in {timeout:.0f} s:\n{self.output_tail()}")

    def output_tail(self) -> str:
        """The end of Synapse's stdout/stderr and log, for error messages."""
        parts = []
        for path in (self.data / "synapse.out", self.log_path):
            if path.exists():
                parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-2500:])
        return "\n".join(parts)

    def message_event_ids(self) -> set[str]:
        """Ids of the ``m.room.message`` events in Synapse's database."""
        sql = "select event_id from events where type = 'm.room.message'"
        if self.pg_name:
            return set(psql(sql, self.pg_name).split())
        with sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True) as conn:
            return {str(row[0]) for row in conn.execute(sql)}

    def pg_backends(self) -> list[int]:
        """Process ids of the PostgreSQL backends serving Synapse (none on SQLite)."""
        if not self.pg_name:
            return []
        out = psql(f"select pid from pg_stat_activity where datname = '{self.pg_name}'")
        return [int(x) for x in out.split()]

    def log_summary(self) -> dict[str, int]:
        """Synapse's WARNING/ERROR/CRITICAL log lines, counted by logger and message."""
        counts: Counter[str] = Counter()
        if self.log_path.exists():
            for line in self.log_path.read_text(errors="replace").splitlines():
                parts = line.split(" - ", 5)
                if len(parts) == 6 and parts[3] in ("WARNING", "ERROR", "CRITICAL"):
                    counts[f"{parts[3]}: {parts[1]}: {parts[5][:120]}"] += 1
        return dict(counts.most_common(20))

    def close(self) -> None:
        """Stop Synapse, drop the PostgreSQL database, remove the data directory."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.pg_name:
            psql(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)', check=False)
        shutil.rmtree(self.data, ignore_errors=True)

    def __enter__(self) -> Synapse:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Matrix client-server calls --------------------------------------------------------------------


def room_path(room_id: str) -> str:
    """The URL-encoded room id for a path segment."""
    return quote(room_id, safe="")


def text_content(tag: str, probe: str | None = None) -> dict[str, Any]:
    """An ``m.text`` body about as long as the texts in pforte's bench, unique through ``tag``.

    Unique bodies matter: an event id is a hash of the event, so two identical texts from one sender
    on the same room state within the same millisecond would be one event to Synapse.
    """
    content: dict[str, Any] = {
        "msgtype": "m.text",
        "body": f"Guten Tag, Ihr Befund liegt vor. Bitte melden Sie sich ({tag}).",
    }
    if probe:
        content[PROBE_KEY] = probe
    return content


async def register(client: httpx.AsyncClient, name: str) -> str:
    """Register ``name`` with the dummy auth flow; its access token."""
    r = await client.post(
        f"{CS}/register",
        json={
            "username": name,
            "password": secrets.token_urlsafe(16),
            "auth": {"type": "m.login.dummy"},
            "initial_device_display_name": "bench",
        },
    )
    if r.status_code != 200:
        raise RuntimeError(f"register {name}: {r.status_code} {r.text[:300]}")
    return str(r.json()["access_token"])


async def create_rooms(client: httpx.AsyncClient, sender: str, reader: str, count: int) -> list[str]:
    """``count`` private rooms made by the sender, each joined by the reader."""
    who = await client.get(f"{CS}/account/whoami", headers=bearer(reader))
    who.raise_for_status()
    rooms = []
    for i in range(count):
        r = await client.post(
            f"{CS}/createRoom",
            json={"preset": "private_chat", "name": f"Station {i}", "invite": [who.json()["user_id"]]},
            headers=bearer(sender),
        )
        if r.status_code != 200:
            raise RuntimeError(f"createRoom: {r.status_code} {r.text[:300]}")
        room_id = str(r.json()["room_id"])
        j = await client.post(f"{CS}/rooms/{room_path(room_id)}/join", json={}, headers=bearer(reader))
        if j.status_code != 200:
            raise RuntimeError(f"join: {j.status_code} {j.text[:300]}")
        rooms.append(room_id)
    return rooms


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of an access token."""
    return {"Authorization": f"Bearer {token}"}


# -- send → seen in /sync --------------------------------------------------------------------------


class SyncReader:
    """A client long-polling ``/sync`` that resolves a future when a probe's event arrives."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.ready = asyncio.Event()
        self.responses = 0

    async def run(self) -> None:
        """Initial sync, then long polls until cancelled."""
        async with httpx.AsyncClient(
            base_url=self.url, headers=bearer(self.token), timeout=httpx.Timeout(60)
        ) as client:
            params = {"filter": SYNC_FILTER}
            while True:
                r = await client.get(f"{CS}/sync", params=params)
                arrived = time.perf_counter()
                r.raise_for_status()
                data = r.json()
                params = {"filter": SYNC_FILTER, "since": data["next_batch"], "timeout": "30000"}
                if not self.ready.is_set():
                    self.ready.set()
                    continue
                self.responses += 1
                for room in data.get("rooms", {}).get("join", {}).values():
                    for event in room.get("timeline", {}).get("events", []):
                        fut = self.waiting.get(event.get("content", {}).get(PROBE_KEY, ""))
                        if fut is not None and not fut.done():
                            fut.set_result(arrived)


async def sync_latency(url: str, sender: str, reader: str, room_id: str, probes: int) -> dict[str, Any]:
    """``probes`` sequential sends, each timed until the reader's ``/sync`` returns it."""
    sync = SyncReader(url, reader)
    task = asyncio.create_task(sync.run())
    seen: list[float] = []
    ack: list[float] = []
    codes: Counter[str] = Counter()
    lost = 0
    try:
        await asyncio.wait_for(asyncio.shield(sync.ready.wait()), 30)
        await asyncio.sleep(0.2)  # the first long poll is parked on the server
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(base_url=url, headers=bearer(sender), timeout=30) as client:
            for i in range(probes):
                probe = f"probe-{i}"
                fut: asyncio.Future[float] = loop.create_future()
                sync.waiting[probe] = fut
                t0 = time.perf_counter()
                r = await client.put(
                    f"{CS}/rooms/{room_path(room_id)}/send/m.room.message/{probe}",
                    json=text_content(probe, probe),
                )
                t1 = time.perf_counter()
                codes[str(r.status_code)] += 1
                if r.status_code == 200:
                    ack.append((t1 - t0) * 1000)
                    either: set[asyncio.Future[Any]] = {fut, task}
                    done, _ = await asyncio.wait(either, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
                    if task in done:
                        raise RuntimeError(f"/sync reader stopped: {task.exception()!r}")
                    if fut in done:
                        seen.append((fut.result() - t0) * 1000)
                    else:
                        lost += 1
                else:
                    lost += 1
                del sync.waiting[probe]
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {
        "probes": probes,
        "lost": lost,
        **percentiles(seen),
        "send_ack": percentiles(ack),
        "status_codes": dict(codes),
        "sync_responses": sync.responses,
    }


# -- throughput ------------------------------------------------------------------------------------


async def send_load(
    url: str, token: str, rooms: list[str], seconds: float, connections: int
) -> tuple[dict[str, Any], list[str]]:
    """``connections`` closed-loop senders for ``seconds``; worker ``w`` writes to room ``w % rooms``.

    Returns the summary and the event ids answered with 200.
    """
    ok_ms: list[float] = []
    event_ids: list[str] = []
    done_at: list[float] = []
    codes: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, headers=bearer(token), timeout=30, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def worker(w: int) -> None:
            path = f"{CS}/rooms/{room_path(rooms[w % len(rooms)])}/send/m.room.message/"
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                start = time.perf_counter()
                try:
                    txn = f"w{w}-{n}"
                    r = await client.put(path + txn, json=text_content(txn))
                except httpx.TimeoutException:
                    codes["timeout"] += 1
                    continue
                except httpx.TransportError as exc:
                    codes[type(exc).__name__] += 1
                    continue
                end = time.perf_counter()
                codes[str(r.status_code)] += 1
                if r.status_code == 200:
                    ok_ms.append((end - start) * 1000)
                    done_at.append(end - t0)
                    event_ids.append(str(r.json().get("event_id")))

        await asyncio.gather(*(worker(w) for w in range(connections)))
        elapsed = time.perf_counter() - t0
    per_second = Counter(int(t) for t in done_at if t < int(seconds))
    whole = [per_second.get(s, 0) for s in range(int(seconds))]
    summary = {
        "duration_s": round(elapsed, 2),
        "answered_200": len(ok_ms),
        "messages_per_s": round(len(ok_ms) / elapsed, 1) if elapsed else 0.0,
        "slowest_second": min(whole, default=0),
        "fastest_second": max(whole, default=0),
        "per_second": whole,
        **percentiles(ok_ms),
        "status_codes": dict(codes),
        "non_200": sum(v for k, v in codes.items() if k != "200"),
    }
    return summary, event_ids


# -- one run ---------------------------------------------------------------------------------------


async def measure(hs: Synapse, seconds: int, connections: int, rooms: int, probes: int) -> dict[str, Any]:
    """Users and rooms, then the sync phase, then the throughput phase."""
    async with httpx.AsyncClient(base_url=hs.url, timeout=60) as client:
        sender = await register(client, "sender")
        reader = await register(client, "reader")
        room_ids = await create_rooms(client, sender, reader, rooms)
    assert hs.proc is not None
    pid = hs.proc.pid
    rss_setup = peak_rss_mb(pid)
    reset_peak_rss(pid)
    log(f"send → /sync: {probes} sequential probes")
    sync = await sync_latency(hs.url, sender, reader, room_ids[0], probes)
    stored_before = hs.message_event_ids()
    log(f"throughput: {seconds} s, {connections} connections, {len(room_ids)} room(s)")
    backends = {p: cpu_seconds(p) for p in hs.pg_backends()}
    cpu0 = {"synapse": cpu_seconds(pid), "load_generator": cpu_seconds(os.getpid())}
    ticks0, w0 = machine_ticks(), time.monotonic()
    load, answered = await send_load(hs.url, sender, room_ids, seconds, connections)
    ticks1, wall = machine_ticks(), time.monotonic() - w0
    cpu = {
        "synapse": (cpu_seconds(pid) - cpu0["synapse"]) / wall,
        "load_generator": (cpu_seconds(os.getpid()) - cpu0["load_generator"]) / wall,
    }
    if hs.pg_name:
        after = {p: cpu_seconds(p) for p in hs.pg_backends()}
        cpu["postgresql_backends"] = sum(v - backends.get(p, 0.0) for p, v in after.items()) / wall
    ours = sum(cpu.values())
    cpu["machine_total"] = busy_cores(ticks0, ticks1)
    # Whatever else ran meanwhile (PostgreSQL's own background work, or another test run, which
    # would distort every figure).
    cpu["other_processes"] = max(0.0, cpu["machine_total"] - ours)
    cpu = {k: round(v, 2) for k, v in cpu.items()}
    if cpu["other_processes"] > 0.3:
        log(f"WARNING: other processes used {cpu['other_processes']} cores during the load")
    stored = hs.message_event_ids()
    load["messages_stored"] = len(stored - stored_before)
    load["answered_200_not_stored"] = len(set(answered) - stored)
    load["duplicate_event_ids"] = len(answered) - len(set(answered))
    return {
        "sync": sync,
        "send": load,
        "peak_rss_mb": {"synapse": peak_rss_mb(pid)},
        "peak_rss_setup_mb": {"synapse": rss_setup},
        "cpu_cores_used": cpu,
    }


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from the ``cpu`` line of /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, total


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Cores busy on average between two ``machine_ticks`` readings (2.0 = both cores of 2)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total * (os.cpu_count() or 1) if total else 0.0


def run(db: str, seconds: int, connections: int, rooms: int, probes: int, log_level: str) -> dict[str, Any]:
    """One measurement on a fresh Synapse and database."""
    version = ensure_venv()
    before = machine_ticks()
    time.sleep(1.0)
    busy_before = round(busy_cores(before, machine_ticks()), 2)
    if busy_before > 0.25:
        log(f"WARNING: the machine is already busy ({busy_before} cores) before Synapse starts")
    log(f"starting Synapse {version} on {db}")
    started = time.monotonic()
    with Synapse(db, log_level) as hs:
        log(f"Synapse answered /health after {time.monotonic() - started:.1f} s")
        result = asyncio.run(measure(hs, seconds, connections, rooms, probes))
        synapse_log = hs.log_summary()
        config = hs.overlay
    send = result["send"]
    return {
        "scenario": "synapse_send",
        "db": db,
        "synapse_version": version,
        "seconds": seconds,
        "connections": connections,
        "rooms": rooms,
        "log_level": log_level,
        "machine_busy_before_start_cores": busy_before,
        **result,
        "errors": send["non_200"] + send["answered_200_not_stored"] + result["sync"]["lost"],
        "synapse_log": synapse_log,
        "config_overlay": {k: v for k, v in config.items() if k not in ("database", "log_config")},
        "machine": machine(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": ".venv/bin/python bench/synapse_send.py " + " ".join(sys.argv[1:]),
    }


# -- output ----------------------------------------------------------------------------------------

HEADER = (
    "| db | scenario | measured | value | p50 ms | p95 ms | p99 ms | errors | peak RSS MB | target | met |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def rows(r: dict[str, Any]) -> str:
    """Two markdown rows (throughput, send → sync) in the columns of ``bench/run_all.py``."""
    s, y = r["send"], r["sync"]
    rss = f"synapse {r['peak_rss_mb']['synapse']:.0f}"
    rooms = f"{r['rooms']} room" + ("s" if r["rooms"] != 1 else "")
    other = r["cpu_cores_used"]["other_processes"]
    disturbed = f" **(other processes used {other} cores)**" if other > 0.3 else ""
    send = [
        r["db"],
        "synapse_send",
        f"m.room.message PUT/s, {r['connections']} conns, {rooms}, Synapse {r['synapse_version']}{disturbed}",
        f"{s['messages_per_s']:,} (whole seconds {s['slowest_second']}–{s['fastest_second']}; "
        f"{s['messages_stored']:,}/{s['answered_200']:,} stored)",
        s.get("p50_ms", ""),
        s.get("p95_ms", ""),
        s.get("p99_ms", ""),
        f"non-200 {s['non_200']}, not stored {s['answered_200_not_stored']}",
        rss,
        "—",
        "—",
    ]
    sync = [
        r["db"],
        "synapse_sync",
        f"send → seen in long-poll /sync, {y['probes']} sequential",
        f"send ack p50 {y['send_ack'].get('p50_ms', '')} ms",
        y.get("p50_ms", ""),
        y.get("p95_ms", ""),
        y.get("p99_ms", ""),
        f"lost {y['lost']}",
        rss,
        "—",
        "—",
    ]
    return "\n".join("| " + " | ".join(str(x) for x in row) + " |" for row in (send, sync))


def store(result: dict[str, Any], path: Path) -> str:
    """Merge ``result`` into the results file under ``[db][run key]``; the run key."""
    key = f"c{result['connections']}" + (f"-r{result['rooms']}" if result["rooms"] != 1 else "")
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data.setdefault(result["db"], {})[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return key


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run once, print the rows and store the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--seconds", type=int, default=10, help="length of the throughput phase")
    ap.add_argument("--connections", type=int, default=16, help="concurrent senders (one connection each)")
    ap.add_argument("--rooms", type=int, default=1, help="rooms the senders spread over (worker %% rooms)")
    ap.add_argument("--probes", type=int, default=200, help="sequential send → /sync probes")
    ap.add_argument("--log-level", choices=["WARNING", "INFO"], default="WARNING", help="Synapse's log level")
    ap.add_argument("--json-out", type=Path, default=RESULTS, help="results file (merged, keyed by db)")
    args = ap.parse_args(argv)
    # SIGTERM (e.g. a timeout in a wrapper) unwinds through the finally blocks that stop Synapse.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args.db, args.seconds, args.connections, args.rooms, args.probes, args.log_level)
    key = store(result, args.json_out)
    print(HEADER)
    print(rows(result))
    print(f"\nJSON: {args.json_out} [{args.db}][{key}]")


if __name__ == "__main__":
    main()
