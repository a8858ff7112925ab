"""Shared pieces of the load harness: a real pforte (and simulator) process stack, signed webhook
bodies, the ``wrk`` driver, database access from the harness, percentiles and peak RSS.

Every scenario starts its own ``Stack``: a fresh SQLite file or throwaway PostgreSQL database, a
fresh data directory (key ring, blobs), an organisation, channels and a staff user made through the
CLI, then ``pforte serve`` (one uvicorn worker) and, where needed, the WhatsApp simulator
(``bench/sim_server.py``) in their own processes. ``Stack.close`` stops both and drops the database.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PY = str(ROOT / ".venv" / "bin" / "python")
PFORTE = str(ROOT / ".venv" / "bin" / "pforte")
PG_ADMIN = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc"]
STAFF_EMAIL = "bench@example.org"
STAFF_PASSWORD = "bench-password-1234"
T = TypeVar("T")


# -- small helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sign(body: bytes, secret: str) -> str:
    """Meta's X-Hub-Signature-256 header value."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def percentiles(values: Sequence[float], ps: Iterable[int] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles (and max) of a list of milliseconds."""
    if not values:
        return {}
    xs = sorted(values)
    out = {f"p{p}_ms": round(xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs)) - 1))], 2) for p in ps}
    out["max_ms"] = round(xs[-1], 2)
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc children lists), in start order."""
    out: list[int] = []
    try:
        children = [
            int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()
        ]
    except OSError:
        return out
    for child in sorted(children):
        out += [child, *descendants(child)]
    return out


def cmdline(pid: int) -> bytes:
    """A process's command line (NUL-separated), empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5), so a peak belongs to one scenario."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model and versions of the machine the numbers come from."""
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    pg = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-tAc", "show server_version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    import sqlite3

    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu": model,
        "arch": platform.machine(),
        "python": platform.python_version(),
        "postgresql": pg.split()[0] if pg else None,
        "sqlite": sqlite3.sqlite_version,
    }


def wait_http(url: str, timeout: float = 20.0) -> None:
    """Poll until ``url`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def emit(result: dict[str, Any], out: str | None) -> None:
    """Print a scenario's JSON and write it to ``--json-out`` if given."""
    text = json.dumps(result, default=str)
    print(text)
    if out:
        Path(out).write_text(text)


# -- webhook bodies --------------------------------------------------------------------------------


def envelope(pnid: str, value: dict[str, Any]) -> dict[str, Any]:
    """A webhook document with one change."""
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"display_phone_number": "4930", "phone_number_id": pnid},
                            **value,
                        },
                    }
                ],
            }
        ],
    }


def patient(n: int) -> tuple[str, str]:
    """(wa_id, BSUID) of bench patient ``n``."""
    return f"49151{n:08d}", f"DE.{n:016d}"


def message_body(pnid: str, start: int, count: int, *, patients: int = 1000, prefix: str = "bench") -> bytes:
    """A webhook with ``count`` text messages (unique wamids) from rotating patients."""
    messages, contacts = [], []
    now = str(int(time.time()))
    for i in range(start, start + count):
        n = i % patients
        wa, bsuid = patient(n)
        contacts.append({"profile": {"name": f"Patient {n}"}, "wa_id": wa, "user_id": bsuid})
        messages.append(
            {
                "from": wa,
                "from_user_id": bsuid,
                "id": f"wamid.{prefix}{i:012d}",
                "timestamp": now,
                "type": "text",
                "text": {"body": f"Nachricht {i}: mir geht es heute nicht gut, bitte um Rückruf"},
            }
        )
    return json.dumps(envelope(pnid, {"contacts": contacts, "messages": messages})).encode()


def status_body(pnid: str, items: list[tuple[str, str, int]]) -> bytes:
    """A webhook with status updates: (wamid, status, patient number)."""
    ts = int(time.time())
    statuses = []
    for k, (wamid, status, n) in enumerate(items):
        wa, bsuid = patient(n)
        item: dict[str, Any] = {
            "id": wamid,
            "status": status,
            "timestamp": str(ts + k % 3),
            "recipient_id": wa,
            "recipient_user_id": bsuid,
        }
        if status != "read":
            item["pricing"] = {
                "billable": False,
                "pricing_model": "PMP",
                "type": "free_customer_service",
                "category": "service",
            }
        statuses.append(item)
    return json.dumps(envelope(pnid, {"statuses": statuses})).encode()


def write_signed(bodies: Iterable[bytes], secret: str) -> Path:
    """Bodies and their signatures as the TSV that ``signed_posts.lua`` replays."""
    path = Path(tempfile.mkstemp(prefix="pforte-bodies-", suffix=".tsv")[1])
    with path.open("w") as fh:
        for body in bodies:
            fh.write(sign(body, secret) + "\t" + body.decode() + "\n")
    return path


# -- wrk -------------------------------------------------------------------------------------------


def wrk_cmd(url: str, path: str, tsv: Path, seconds: float, connections: int, threads: int = 2) -> list[str]:
    """The wrk command line replaying ``tsv`` against ``url + path``."""
    return [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{int(seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "signed_posts.lua"),
        url,
        "--",
        path,
        str(tsv),
    ]


def parse_wrk(text: str) -> dict[str, Any]:
    """The ``BENCH {json}`` line of ``signed_posts.lua``'s done(), plus requests/s."""
    for line in text.splitlines():
        if line.startswith("BENCH "):
            res: dict[str, Any] = json.loads(line[6:])
            res["requests_per_s"] = round(res["requests"] / res["duration_s"], 1) if res["duration_s"] else 0
            res["socket_errors"] = res["connect_errors"] + res["read_errors"] + res["write_errors"]
            res["generator"] = "wrk (closed loop)"
            return res
    raise RuntimeError("wrk printed no summary:\n" + text[-2000:])


def run_wrk(url: str, path: str, tsv: Path, seconds: float, connections: int) -> dict[str, Any]:
    """Run wrk to completion and return its summary."""
    out = subprocess.run(
        wrk_cmd(url, path, tsv, seconds, connections),
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    return parse_wrk(out)


# -- open loop -------------------------------------------------------------------------------------


def run_open_loop(url: str, path: str, tsv: Path, posts_per_s: float, seconds: float) -> dict[str, Any]:
    """POST the bodies of ``tsv`` at a fixed rate, whatever the answers take (an open loop).

    wrk keeps a fixed number of requests in flight, so its latency is that number divided by the
    rate (Little's law) and says little about a sender that pushes updates as they happen, as Meta
    does. Here POST *i* is due at ``i / posts_per_s``; its latency runs from that moment to the
    answer's last byte, so time spent waiting for a connection or behind a slow answer counts
    (no coordinated omission). ``generator_lag_max_ms`` is how late this process itself sent a
    POST: if it is large, the generator, not pforte, set the pace. Same keys as ``parse_wrk``.
    """
    import aiohttp

    posts: list[tuple[str, bytes]] = []
    with tsv.open() as fh:
        for line in fh:
            sig, body = line.rstrip("\n").split("\t", 1)
            posts.append((sig, body.encode()))
    due_count = min(len(posts), int(posts_per_s * seconds))

    async def drive() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        counts = {"ok": 0, "non_2xx": 0, "errors": 0}
        lag = 0.0
        connector = aiohttp.TCPConnector(limit=1024)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        ) as http:

            async def one(i: int, due: float) -> None:
                sig, body = posts[i]
                headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sig}
                try:
                    async with http.post(url + path, data=body, headers=headers) as r:
                        await r.read()
                        counts["ok" if r.status == 200 else "non_2xx"] += 1
                except (aiohttp.ClientError, TimeoutError):
                    counts["errors"] += 1
                    return
                latencies.append((loop.time() - due) * 1000)
                by_second.setdefault(int(due - start), []).append(latencies[-1])

            by_second: dict[int, list[float]] = {}
            start = loop.time() + 0.1
            tasks = []
            for i in range(due_count):
                due = start + i / posts_per_s
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                lag = max(lag, loop.time() - due)
                tasks.append(asyncio.create_task(one(i, due)))
            await asyncio.gather(*tasks)
            elapsed = loop.time() - start
        xs = sorted(latencies)

        def pct(p: float) -> float:
            return round(xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs)) - 1))], 2) if xs else 0.0

        return {
            "generator": "open loop (bench/common.py run_open_loop)",
            "offered_posts_per_s": posts_per_s,
            "requests": counts["ok"] + counts["non_2xx"],
            "duration_s": round(due_count / posts_per_s, 3),
            # answered POSTs over the time they were offered in: the offered rate if all came back
            "requests_per_s": round((counts["ok"] + counts["non_2xx"]) * posts_per_s / due_count, 1)
            if due_count
            else 0,
            "answered_within_s": round(elapsed, 3),
            "non_2xx": counts["non_2xx"],
            "timeouts": 0,
            "socket_errors": counts["errors"],
            "generator_lag_max_ms": round(lag * 1000, 1),
            **{f"p{p}_ms": pct(p) for p in (50, 90, 95, 99)},
            "max_ms": round(xs[-1], 2) if xs else 0.0,
            "mean_ms": round(sum(xs) / len(xs), 2) if xs else 0.0,
            "max_ms_by_second": [round(max(by_second[k]), 1) for k in sorted(by_second)],
        }

    return asyncio.run(drive())


# -- the process stack -----------------------------------------------------------------------------


@dataclass
class ChannelSpec:
    """A WhatsApp number to register in pforte (and in the simulator, if one runs)."""

    pnid: str
    rate: int = 80
    secret: str = "bench-app-secret"
    token: str = "bench-token"
    id: str = ""

    @property
    def webhook_path(self) -> str:
        """pforte's webhook path of this channel."""
        return f"/webhooks/whatsapp/{self.id}"


async def _reader_engine(url: str) -> Any:
    """An engine of one connection, made inside the loop that will use it."""
    from sqlalchemy.ext.asyncio import create_async_engine

    return create_async_engine(url, pool_size=1, max_overflow=0)


@dataclass
class Stack:
    """pforte (and optionally the simulator) running against a fresh database."""

    db: str
    channels: list[ChannelSpec]
    with_simulator: bool = False
    sim_batch: int = 100
    extra_env: dict[str, str] = field(default_factory=dict)
    data: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pforte-bench-")))
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    sim_url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    sim_proc: subprocess.Popen[bytes] | None = None
    pg_name: str | None = None
    org_id: str = ""
    user_id: str = ""
    trace: str | None = None  # run bench/traced_serve.py instead of pforte serve, timings to this file
    workers: int = 1  # pforte serve --workers N (PostgreSQL): N app processes under one supervisor
    _reader: Any = None  # (asyncio.Runner, engine) of ``sql``: one loop and one connection for every poll

    # setup

    def open(self) -> Stack:
        """Create the database, organisation, channels, staff user; start the processes."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "PFORTE_DATA_DIR": str(self.data),
            "PFORTE_LOG_LEVEL": "WARNING",
            "PFORTE_HOST": "127.0.0.1",
            "PFORTE_PORT": str(port),
            "PFORTE_BASE_URL": self.url,
            "PFORTE_COOKIE_SECURE": "false",
            **self.extra_env,
        }
        if self.db == "postgresql":
            self.pg_name = f"pforte_bench_{secrets.token_hex(4)}"
            subprocess.run([*PG_ADMIN, f'CREATE DATABASE "{self.pg_name}"'], check=True)
            self.env["PFORTE_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{self.pg_name}"
        if self.with_simulator:
            sim_port = free_port()
            self.sim_url = f"http://127.0.0.1:{sim_port}"
            self.sim_proc = subprocess.Popen(
                [PY, str(BENCH / "sim_server.py"), "--port", str(sim_port), "--batch", str(self.sim_batch)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.cli("migrate")
        self.org_id = self.cli("org", "create", "--name", "Bench", "--slug", "bench").strip()
        # The bench measures transport, not the consent dialogue: its patients may be written to at once.
        self.cli("org", "set", "--org", "bench", "consent_required", "false")
        graph = self.sim_url or "http://127.0.0.1:9"
        for ch in self.channels:
            out = self.cli(
                "channel",
                "add-whatsapp",
                "--org",
                "bench",
                "--name",
                f"Station {ch.pnid[-3:]}",
                "--phone-number-id",
                ch.pnid,
                "--display-phone-number",
                f"+4930{ch.pnid[-4:]}",
                "--access-token",
                ch.token,
                "--app-secret",
                ch.secret,
                "--graph-base-url",
                graph,
                "--rate-limit",
                str(ch.rate),
            )
            ch.id = json.loads(out)["id"]
        self.user_id = self.cli(
            "user",
            "create",
            "--org",
            "bench",
            "--email",
            STAFF_EMAIL,
            "--role",
            "admin",
            "--password",
            STAFF_PASSWORD,
        ).strip()
        self.start()
        if self.with_simulator:
            wait_http(self.sim_url + "/_sim/health")
            for ch in self.channels:
                r = httpx.post(
                    self.sim_url + "/_sim/numbers",
                    json={
                        "phone_number_id": ch.pnid,
                        "display_phone_number": f"+4930{ch.pnid[-4:]}",
                        "access_token": ch.token,
                        "app_secret": ch.secret,
                        "webhook_url": self.url + ch.webhook_path,
                        "rate_limit_per_s": ch.rate,
                    },
                )
                r.raise_for_status()
        return self

    def cli(self, *args: str) -> str:
        """Run a ``pforte`` CLI command against this stack's database."""
        return subprocess.run(
            [PFORTE, *args], env=self.env, check=True, capture_output=True, text=True, timeout=120
        ).stdout

    def start(self) -> None:
        """Start ``pforte serve`` and wait until it is ready."""
        self.log_path = self.data / "pforte.log"
        with self.log_path.open("ab") as log:  # a file, never a pipe nobody reads (it would fill and block)
            cmd = [PFORTE, "serve", "--no-migrate", "--workers", str(self.workers)]
            env = self.env
            if self.trace:
                cmd, env = (
                    [PY, str(BENCH / "traced_serve.py")],
                    {**self.env, "PFORTE_BENCH_TRACE": self.trace},
                )
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + "/readyz")
        except RuntimeError:
            self.proc.kill()
            raise RuntimeError("pforte did not start:\n" + self.log_path.read_text()[-3000:]) from None

    def log_summary(self) -> dict[str, int]:
        """pforte's WARNING/ERROR log lines so far, counted by message."""
        counts: dict[str, int] = {}
        path = getattr(self, "log_path", None)
        if path is None or not path.exists():
            return counts
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                key = (
                    f"{rec.get('level', '?')}: {rec.get('msg') or rec.get('message')} {rec.get('error', '')}"
                )
            except ValueError:
                key = line[:120]
            counts[key.strip()] = counts.get(key.strip(), 0) + 1
        return counts

    def stop_pforte(self) -> None:
        """SIGTERM pforte and wait (its writer finishes what is queued)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def close(self) -> None:
        """Stop every process this stack started and drop its database."""
        if self._reader is not None:
            runner, engine = self._reader
            runner.run(engine.dispose())
            runner.close()
            self._reader = None
        self.stop_pforte()
        if self.sim_proc and self.sim_proc.poll() is None:
            self.sim_proc.send_signal(signal.SIGTERM)
            try:
                self.sim_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.sim_proc.kill()
        if self.pg_name:
            subprocess.run(
                [*PG_ADMIN, f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)'],
                check=False,
                capture_output=True,
            )
        shutil.rmtree(self.data, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # measurement helpers

    def app_pids(self) -> dict[str, int]:
        """pforte's processes by name: "pforte", or with workers the supervisor and each worker."""
        if not self.proc:
            return {}
        if self.workers == 1:
            return {"pforte": self.proc.pid}
        return {"pforte-supervisor": self.proc.pid} | {
            f"pforte-worker-{n}": pid
            for n, pid in enumerate(
                (p for p in descendants(self.proc.pid) if b"resource_tracker" not in cmdline(p)), 1
            )
        }

    def rss(self) -> dict[str, float]:
        """Peak RSS (VmHWM) of each pforte process and the simulator, MB."""
        out = {name: peak_rss_mb(pid) for name, pid in self.app_pids().items()} or {"pforte": 0.0}
        if self.sim_proc:
            out["simulator"] = peak_rss_mb(self.sim_proc.pid)
        return out

    def profile(self, path: str | None, seconds: float) -> subprocess.Popen[bytes] | None:
        """Start ``py-spy record`` (raw collapsed stacks) on pforte for ``seconds``; None without a path."""
        if not path or not self.proc:
            return None
        return subprocess.Popen(
            [
                str(ROOT / ".venv" / "bin" / "py-spy"),
                "record",
                "-p",
                str(self.proc.pid),
                "-f",
                "raw",
                "-r",
                "50",
                "-d",
                str(int(seconds)),
                "-o",
                path,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def patients_write_once(self, ch: ChannelSpec, patients: int = 1000) -> None:
        """Every patient writes once (one batched webhook), so their contacts and conversations exist."""
        body = message_body(ch.pnid, 0, patients, patients=patients, prefix="hello")
        httpx.post(
            self.url + ch.webhook_path,
            content=body,
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, ch.secret)},
            timeout=60,
        ).raise_for_status()

    def reset_rss(self) -> None:
        """Start a new peak for each process, and a new CPU-time mark (see ``cpu``)."""
        for pid in [*self.app_pids().values(), *([self.sim_proc.pid] if self.sim_proc else [])]:
            reset_peak_rss(pid)
        self._cpu_mark = (time.monotonic(), self._cpu_now())

    def _cpu_now(self) -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in self.app_pids().items()} or {"pforte": 0.0}
        if self.sim_proc:
            out["simulator"] = cpu_seconds(self.sim_proc.pid)
        return out

    def cpu(self) -> dict[str, float]:
        """Share of one core each process used since ``reset_rss`` (1.0 = one core fully busy)."""
        t0, before = getattr(self, "_cpu_mark", (time.monotonic(), self._cpu_now()))
        wall = max(time.monotonic() - t0, 1e-6)
        now = self._cpu_now()
        return {k: round((now[k] - before.get(k, 0.0)) / wall, 2) for k in now}

    @property
    def database_url(self) -> str:
        """The async SQLAlchemy URL pforte uses."""
        from pforte.config import load_settings

        return load_settings(
            data_dir=self.data, database_url=self.env.get("PFORTE_DATABASE_URL")
        ).effective_database_url

    def services(self) -> Any:
        """pforte's composition root for this stack (no workers), for direct DB work from the harness."""
        from pforte.bootstrap import build_services
        from pforte.config import load_settings

        s = load_settings(
            data_dir=self.data,
            database_url=self.env.get("PFORTE_DATABASE_URL"),
            run_workers=False,
        )
        return build_services(s)

    def with_services(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(services)`` in a fresh event loop and dispose the engine afterwards."""

        async def main() -> T:
            sv = self.services()
            try:
                return await fn(sv)
            finally:
                await sv.stop()

        return asyncio.run(main())

    def sql(self, statement: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Rows of one SQL statement (read-only use).

        One event loop and one pooled connection serve every call: the scenarios poll while the
        load runs, and building pforte's services (and a new database connection) for each poll
        took about a tenth of a core from the two that pforte, the simulator and PostgreSQL share.
        """
        import sqlalchemy as sa

        if self._reader is None:
            runner = asyncio.Runner()
            engine = runner.run(_reader_engine(self.database_url))
            self._reader = (runner, engine)
        runner, engine = self._reader

        async def q() -> list[tuple[Any, ...]]:
            async with engine.connect() as c:
                return [tuple(r) for r in await c.execute(sa.text(statement), params or {})]

        result: list[tuple[Any, ...]] = runner.run(q())
        return result

    def login(self) -> str:
        """Log the bench user in; return the session cookie value."""
        r = httpx.post(
            self.url + "/login",
            data={"email": STAFF_EMAIL, "password": STAFF_PASSWORD},
            headers={"Origin": self.url},
            follow_redirects=False,
            timeout=30,
        )
        if r.status_code != 303:
            raise RuntimeError(f"login failed: {r.status_code}")
        return r.cookies["pforte_session"]


def base_args(argv: list[str] | None = None, **extra: Any) -> Any:
    """The arguments every scenario script takes."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--profile", default=None, help="py-spy raw output file for pforte during the load")
    for name, kw in extra.items():
        ap.add_argument("--" + name.replace("_", "-"), **kw)
    return ap.parse_args(argv)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(machine()))
    sys.exit(0)
