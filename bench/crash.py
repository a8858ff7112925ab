"""Crash harness: kill -9 a real ``pforte serve`` under load, restart it, check nothing was lost or doubled.

    .venv/bin/python bench/crash.py --db sqlite --kills 20 --seconds 60
    .venv/bin/python bench/crash.py --db postgresql --kills 20 --seconds 60

Starts the WhatsApp simulator as its own long-lived process (short webhook retry schedule), sets
up pforte through its CLI (organisation, staff account, channel pointing at the simulator) and
then, while patients write through the simulator's control API at a steady rate and staff answer
through the real inbox form, SIGKILLs the pforte process at random moments (mostly 0.2-2 s after
it became ready, some during start-up) and restarts it, at least ``--kills`` times. At the end the
load stops, pforte runs once more until the simulator has nothing left to deliver and the outbox
is idle, and the run is checked against DESIGN invariants 4 and 5:

* every patient message the simulator sent (its wamid) is stored exactly once (direction "in");
* every staff message the inbox accepted (POST answered 200) was sent (status accepted/sent/
  delivered/read with a wamid the simulator knows for that text) or is marked "review"; nothing is
  missing, and no text reached the simulator twice unless pforte flagged that message for review;
* no outbound row is left queued/sending; every delivery status the simulator reported for a sent
  message shows in pforte; no webhook was given up; pforte never died on its own.

* the audit chain verifies (``pforte audit verify --json`` after the last stop): every entry
  written by transactions that raced kill -9 is linked, none forked, none lost.

Prints a JSON summary and exits 1 if an invariant is broken (2 if the harness itself failed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
PFORTE = str(BIN / "pforte") if (BIN / "pforte").exists() else shutil.which("pforte") or "pforte"
PG_ADMIN = os.environ.get("PFORTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

PNID = "100000000000888"
DISPLAY_NUMBER = "+49 30 8880000"
ACCESS_TOKEN = "crash-access-token"
APP_SECRET = "crash-app-secret"
STAFF_EMAIL = "crash@klinik.test"
STAFF_PASSWORD = "crash-harness-password-1"
SENT_STATES = frozenset({"accepted", "sent", "delivered", "read", "played"})
_RANK = {"accepted": 1, "sent": 2, "delivered": 3, "read": 4, "played": 5}

# The simulator in its own process, with a short retry schedule and no pair limit (the staff load
# would otherwise run into 131056 and back off for minutes, which tests pacing, not crashes).
SIMULATOR_CODE = """
import sys, uvicorn
from pforte.channels.simulator import SimulatorConfig, create_simulator_app
host, port, schedule = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = SimulatorConfig(
    public_base_url=f"http://{host}:{port}",
    retry_schedule_s=tuple(float(s) for s in schedule.split(",")),
    pair_limit_enabled=False,
)
uvicorn.run(create_simulator_app(config), host=host, port=port, log_level="warning", access_log=False)
"""

_CONVERSATION_RE = re.compile(r'href="/conversations/([0-9a-f]{32})"')
_CSRF_RE = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
_MESSAGE_ID_RE = re.compile(r'data-message-id="([^"]+)"')


class HarnessError(Exception):
    """The harness could not do its job (setup failed, a load generator broke)."""


class StartError(HarnessError):
    """A process did not come up (for pforte after a kill: a finding, not a harness failure)."""


@dataclass
class Options:
    """What one run does; the defaults are those of ``make crash-test``."""

    db: str = "sqlite"
    kills: int = 20
    seconds: float = 60.0
    rate: float = 50.0  # patient messages per second (through the simulator)
    staff_rate: float = 10.0  # staff replies per second (through the inbox form)
    staff_clients: int = 2
    patients: int = 20
    min_uptime: float = 0.2
    max_uptime: float = 2.0
    # After the last kill pforte runs under load at least this long: a slow host (long restarts)
    # used up the load time in kills, and no staff message could get its answer.
    final_uptime: float = 3.0
    startup_kill_ratio: float = 0.15  # this share of the kills hits pforte before it is ready
    retry_schedule: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0)
    lease_seconds: float = 2.0
    startup_timeout: float = 30.0
    drain_timeout: float = 180.0
    seed: int | None = None
    workdir: Path | None = None  # a fresh temporary directory when None
    keep: bool = False  # keep the data directory (it is always kept when an invariant broke)


@dataclass
class Load:
    """What the load generators did (filled while the run goes)."""

    patient_wamids: list[str] = field(default_factory=list)
    patient_errors: int = 0
    staff_posted: int = 0
    staff_accepted: dict[str, str] = field(default_factory=dict)  # text -> message id
    staff_resent: int = 0  # forms sent again (same one-time key) after a lost answer
    staff_accepted_without_id: list[str] = field(default_factory=list)
    staff_refused: int = 0  # connection refused: pforte was down, nothing happened
    staff_unconfirmed: int = 0  # the connection broke or timed out: outcome unknown to the client
    staff_rejected: collections.Counter[int] = field(default_factory=collections.Counter)
    logins: int = 0
    login_failures: int = 0


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- PostgreSQL -------------------------------------------------------------------------------------


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def pg_create() -> tuple[str, str]:
    """Create a throwaway database; return (name, URL for pforte)."""
    name = f"pforte_crash_{secrets.token_hex(4)}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    return name, PG_ADMIN.rsplit("/", 1)[0] + "/" + name


async def pg_drop(name: str) -> None:
    """Drop a throwaway database (even with connections left)."""
    await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- processes --------------------------------------------------------------------------------------


class Process:
    """A child process with its output in a log file; stopped by its own pid only."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.name, self.argv, self.env, self.cwd, self.log = name, argv, env, cwd, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Spawn (the previous incarnation must be gone)."""
        assert self.proc is None or self.proc.poll() is not None
        with self.log.open("ab") as fh:
            fh.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=fh, stderr=subprocess.STDOUT
            )
        self.starts += 1

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def tail(self, lines: int = 15) -> list[str]:
        """The last lines of the log (for a report)."""
        try:
            return self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []


async def wait_http(url: str, timeout: float, proc: Process | None = None) -> float:
    """Poll ``url`` until it answers 200; return the seconds it took."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() - started < timeout:
            if proc is not None and not proc.alive():
                raise StartError(f"{proc.name} exited during start-up: {proc.tail()}")
            try:
                if (await client.get(url)).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise StartError(f"{url} not ready after {timeout:.0f} s: {proc.tail() if proc else ''}")


# -- the run ----------------------------------------------------------------------------------------


class CrashRun:
    """One harness run: set up, load + kill, drain, verify, clean up."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.run_id = secrets.token_hex(3)
        self.own_workdir = opts.workdir is None
        self.workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="pforte-crash-"))
        self.data = self.workdir / "data"
        self.pg_name: str | None = None
        self.sim_port, self.port = free_port(), free_port()
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env: dict[str, str] = {}
        self.channel_id = ""
        self.patients: list[str] = []
        self.load = Load()
        self.kills = 0
        self.startup_kills = 0
        self.uptimes: list[float] = []
        self.startup_s: list[float] = []
        self.unexpected_exits: list[str] = []
        self.generation = 0
        self.up = asyncio.Event()
        self.stopping = False
        self.simulator: Process | None = None
        self.pforte: Process | None = None
        self._login_lock = asyncio.Lock()
        self._session_generation = -1
        self._csrf = ""
        self._conversations: list[str] = []

    # -- setup ----------------------------------------------------------------------------------

    def _cli(self, *args: str) -> str:
        out = subprocess.run(
            [PFORTE, *args], env=self.env, cwd=self.workdir, capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise HarnessError(f"pforte {args[0]} failed: {out.stderr.strip()[-500:]}")
        return out.stdout

    def audit_chain(self) -> tuple[dict[str, Any], list[str]]:
        """``pforte audit verify --json`` over every chain: a summary and the chains that fail."""
        out = subprocess.run(
            [PFORTE, "audit", "verify", "--json"],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            doc = json.loads(out.stdout)
        except ValueError:
            return {"ok": False}, [f"pforte audit verify gave no report (exit {out.returncode})"]
        chains = doc.get("chains", [])
        summary = {
            "ok": bool(doc.get("ok")) and out.returncode == 0,
            "chains": len(chains),
            "entries": sum(c.get("entries") or 0 for c in chains),
        }
        bad = [f"{c['name']}: {c['kind']} at seq {c['first_bad_seq']}" for c in chains if not c.get("ok")]
        if out.returncode != 0 and not bad:
            bad = [f"pforte audit verify exited {out.returncode}"]
        return summary, bad

    async def setup(self) -> None:
        """Database, simulator process, pforte configuration via the CLI, simulator registration."""
        self.data.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PFORTE_") or k == "PFORTE_TEST_PG"}
        env.update(
            PFORTE_DATA_DIR=str(self.data),
            PFORTE_HOST="127.0.0.1",
            PFORTE_PORT=str(self.port),
            PFORTE_BASE_URL=self.url,
            PFORTE_COOKIE_SECURE="false",
            PFORTE_OUTBOX_LEASE_SECONDS=str(self.opts.lease_seconds),
            PFORTE_OUTBOX_POLL_SECONDS="0.2",
            PFORTE_LOG_LEVEL="WARNING",
        )
        if self.opts.db == "postgresql":
            self.pg_name, env["PFORTE_DATABASE_URL"] = await pg_create()
        self.env = env
        schedule = ",".join(str(s) for s in self.opts.retry_schedule)
        self.simulator = Process(
            "simulator",
            [PYTHON, "-c", SIMULATOR_CODE, "127.0.0.1", str(self.sim_port), schedule],
            env,
            self.workdir,
            self.workdir / "simulator.log",
        )
        self.simulator.start()
        self._cli("migrate")
        self._cli("org", "create", "--name", "Crash Klinik", "--slug", "crash")
        self._cli("org", "set", "--org", "crash", "consent_required", "false")  # durability, not consent
        self._cli("user", "create", "--org", "crash", "--email", STAFF_EMAIL, "--password", STAFF_PASSWORD)
        channel = json.loads(
            self._cli(
                "channel",
                "add-whatsapp",
                "--org",
                "crash",
                "--name",
                "Station 3",
                "--phone-number-id",
                PNID,
                "--display-phone-number",
                DISPLAY_NUMBER,
                "--access-token",
                ACCESS_TOKEN,
                "--app-secret",
                APP_SECRET,
                "--graph-base-url",
                self.sim_url,
            )
        )
        self.channel_id = channel["id"]
        await wait_http(self.sim_url + "/_sim/health", 30.0, self.simulator)
        async with httpx.AsyncClient(base_url=self.sim_url, timeout=10.0) as sim:
            r = await sim.post(
                "/_sim/numbers",
                json={
                    "phone_number_id": PNID,
                    "display_phone_number": DISPLAY_NUMBER,
                    "access_token": ACCESS_TOKEN,
                    "app_secret": APP_SECRET,
                    "webhook_url": self.url + channel["webhook_path"],
                },
            )
            r.raise_for_status()
            for i in range(self.opts.patients):
                r = await sim.post(
                    "/_sim/users", json={"name": f"Patient {i}", "wa_id": f"4917{self.run_id_digits}{i:04d}"}
                )
                r.raise_for_status()
                self.patients.append(r.json()["user_id"])
        self.pforte = Process(
            "pforte", [PFORTE, "serve", "--no-migrate"], env, self.workdir, self.workdir / "pforte.log"
        )

    @property
    def run_id_digits(self) -> str:
        """Digits derived from the run id (patients' numbers differ between runs)."""
        return f"{int(self.run_id, 16) % 10**6:06d}"

    # -- load -----------------------------------------------------------------------------------

    async def patient_load(self, sim: httpx.AsyncClient) -> None:
        """Patients write at a steady rate; every text is unique, every wamid is recorded."""
        interval = 1.0 / self.opts.rate
        next_at = time.monotonic()
        inflight: set[asyncio.Task[None]] = set()
        n = 0
        while not self.stopping:
            n += 1
            task = asyncio.create_task(self._patient_send(sim, n))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if inflight:
            await asyncio.gather(*inflight)

    async def _patient_send(self, sim: httpx.AsyncClient, n: int) -> None:
        user = self.rng.choice(self.patients)
        try:
            r = await sim.post(
                f"/_sim/users/{user}/send",
                json={"phone_number_id": PNID, "text": f"patient {self.run_id} #{n}"},
            )
            r.raise_for_status()
            self.load.patient_wamids.append(r.json()["wamid"])
        except httpx.HTTPError:
            self.load.patient_errors += 1

    async def _login(self, client: httpx.AsyncClient) -> bool:
        """Log in once per pforte incarnation; fetch the CSRF token and the conversation ids."""
        async with self._login_lock:
            if self._session_generation == self.generation and self._conversations:
                return True
            generation = self.generation
            try:
                if self._session_generation != generation:
                    client.cookies.clear()
                    r = await client.post(
                        "/login",
                        data={"email": STAFF_EMAIL, "password": STAFF_PASSWORD},
                        headers={"Origin": self.url},
                    )
                    if r.status_code != 303:
                        self.load.login_failures += 1
                        return False
                    self.load.logins += 1
                r = await client.get("/")
            except httpx.HTTPError:
                self.load.login_failures += 1
                return False
            csrf = _CSRF_RE.search(r.text) if r.status_code == 200 else None
            if csrf is None:
                self.load.login_failures += 1
                return False
            self._csrf = csrf.group(1)
            self._conversations = sorted(set(_CONVERSATION_RE.findall(r.text)))
            self._session_generation = generation
            return bool(self._conversations)

    async def staff_load(self, client: httpx.AsyncClient, worker: int) -> None:
        """Staff reply through the inbox form (htmx request): accepted only if it answered 200."""
        interval = self.opts.staff_clients / self.opts.staff_rate
        n = 0
        while not self.stopping:
            started = time.monotonic()
            await self.up.wait()
            if self.stopping:
                break
            if not await self._login(client):
                await asyncio.sleep(0.1)
                continue
            n += 1
            text = f"staff {self.run_id} w{worker} #{n}"
            conversation = self.rng.choice(self._conversations)
            self.load.staff_posted += 1
            # Like a browser whose answer was lost: send the same form (same one-time key) again once
            # pforte is back. pforte must queue it once; the simulator seeing it twice is a violation.
            form = {"text": text, "client_key": f"{self.run_id}-w{worker}-{n}"}
            for attempt in range(3):
                try:
                    r = await client.post(
                        f"/conversations/{conversation}/messages",
                        data=form,
                        headers={"X-CSRF-Token": self._csrf, "HX-Request": "true", "Origin": self.url},
                    )
                except httpx.ConnectError:
                    self.load.staff_refused += 1
                    break
                except httpx.HTTPError:
                    self.load.staff_unconfirmed += 1
                    if attempt == 2 or self.stopping:
                        break
                    self.load.staff_resent += 1
                    await self.up.wait()
                    if not await self._login(client):
                        break
                    continue
                if r.status_code == 200:
                    self.load.staff_accepted[text] = _message_id_for(r.text, text) or ""
                    if not self.load.staff_accepted[text]:
                        self.load.staff_accepted_without_id.append(text)
                else:
                    self.load.staff_rejected[r.status_code] += 1
                break
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    # -- chaos ----------------------------------------------------------------------------------

    async def _start_pforte(self) -> None:
        assert self.pforte is not None
        self.pforte.start()
        self.startup_s.append(await wait_http(self.url + "/readyz", self.opts.startup_timeout, self.pforte))
        self.generation += 1
        self.up.set()

    async def chaos(self) -> None:
        """Start pforte, let it work for a random while, SIGKILL it; repeat; leave it running."""
        assert self.pforte is not None
        started = time.monotonic()
        while True:
            if self.kills < self.opts.kills and self.rng.random() < self.opts.startup_kill_ratio:
                # Now and then a kill during start-up (imports, lifespan, first outbox round).
                self.pforte.start()
                await asyncio.sleep(self.rng.uniform(0.1, 1.5))
                if not self.pforte.alive():
                    self.unexpected_exits.append(f"during start-up: {self.pforte.tail(5)}")
                self.pforte.kill9()
                self.kills += 1
                self.startup_kills += 1
                continue
            await self._start_pforte()
            remaining = self.opts.seconds - (time.monotonic() - started)
            if self.kills >= self.opts.kills:
                await self._watch(max(self.opts.final_uptime, remaining))
                return
            uptime = self.rng.uniform(self.opts.min_uptime, self.opts.max_uptime)
            await self._watch(uptime)
            self.up.clear()
            self.pforte.kill9()
            self.kills += 1
            self.uptimes.append(round(uptime, 2))

    async def _watch(self, seconds: float) -> None:
        """Sleep while pforte runs; a pforte that dies on its own is a finding (and is restarted)."""
        assert self.pforte is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if not self.pforte.alive():
                self.up.clear()
                self.unexpected_exits.append(f"rc={self.pforte.proc.returncode if self.pforte.proc else '?'}")
                await self._start_pforte()

    # -- drain ----------------------------------------------------------------------------------

    def _engine(self) -> Any:
        from sqlalchemy.ext.asyncio import create_async_engine

        url = self.env.get("PFORTE_DATABASE_URL")
        if url:
            url = "postgresql+asyncpg://" + url.split("://", 1)[1]
        else:
            url = f"sqlite+aiosqlite:///{(self.data / 'pforte.sqlite3').resolve()}"
        return create_async_engine(url)

    async def drain(self, engine: Any, sim: httpx.AsyncClient) -> dict[str, Any]:
        """Wait until the simulator has nothing to deliver and the outbox has nothing to run."""
        from sqlalchemy import text

        deadline = time.monotonic() + self.opts.drain_timeout
        quiet = 0
        started = time.monotonic()
        pending, busy = -1, -1
        while time.monotonic() < deadline:
            if self.pforte is not None and not self.pforte.alive():
                self.unexpected_exits.append(f"rc={self.pforte.proc.returncode if self.pforte.proc else '?'}")
                await self._start_pforte()
            pending = int((await sim.get("/_sim/health")).json()["webhooks_pending"])
            async with engine.connect() as conn:
                busy = int(
                    (
                        await conn.execute(
                            text("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')")
                        )
                    ).scalar_one()
                )
            quiet = quiet + 1 if pending == 0 and busy == 0 else 0
            if quiet >= 3:
                return {"idle": True, "seconds": round(time.monotonic() - started, 1)}
            await asyncio.sleep(0.3)
        return {"idle": False, "webhooks_pending": pending, "jobs_busy": busy}

    # -- verification ---------------------------------------------------------------------------

    async def verify(self, engine: Any, sim: httpx.AsyncClient) -> dict[str, Any]:
        """Compare what the simulator saw with what pforte stored."""
        from sqlalchemy import text

        async with engine.connect() as conn:
            inbound = {
                r.external_id: int(r.n)
                for r in await conn.execute(
                    text(
                        "SELECT external_id, COUNT(*) AS n FROM messages"
                        " WHERE channel_id = :c AND direction = 'in' GROUP BY external_id"
                    ),
                    {"c": self.channel_id},
                )
            }
            outbound = {
                r.id: r
                for r in await conn.execute(
                    text(
                        "SELECT id, status, external_id, review_reason FROM messages"
                        " WHERE channel_id = :c AND direction = 'out'"
                    ),
                    {"c": self.channel_id},
                )
            }
            parked = int((await conn.execute(text("SELECT COUNT(*) FROM pending_statuses"))).scalar_one())
            jobs = {
                f"{r.kind}:{r.state}": int(r.n)
                for r in await conn.execute(
                    text("SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state")
                )
            }
        business = (await sim.get(f"/_sim/numbers/{PNID}/messages")).json()
        deliveries = (await sim.get("/_sim/webhooks")).json()

        violations: list[str] = []

        def violation(name: str, items: list[str]) -> None:
            if items:
                violations.append(f"{name}: {len(items)} (e.g. {', '.join(items[:5])})")

        # Invariant 4: every patient message the simulator sent is stored exactly once.
        sent = self.load.patient_wamids
        sent_set = set(sent)
        missing = [w for w in sent if w not in inbound]
        duplicates = [w for w, n in inbound.items() if n > 1]
        unexpected = [str(w) for w in inbound if w not in sent_set]
        violation("patient messages not stored", missing)
        violation("patient messages stored more than once", duplicates)
        violation("inbound rows the simulator never sent", unexpected)

        # Invariant 5: every accepted staff message was sent or is marked for review; none twice unflagged.
        sim_by_wamid = {m["wamid"]: m for m in business}
        sim_texts = collections.Counter(m.get("text") for m in business)
        ext_to_row = {r.external_id: r for r in outbound.values() if r.external_id}
        sent_ok, in_review, twice_flagged = 0, 0, 0
        lost: list[str] = []
        failed: list[str] = []
        wrong_wamid: list[str] = []
        twice_unflagged: list[str] = []
        status_behind: list[str] = []
        for body, mid in self.load.staff_accepted.items():
            row = outbound.get(mid)
            if row is None:
                lost.append(mid or body)
                continue
            if row.status == "review":
                in_review += 1
                if sim_texts[body] > 1:
                    twice_flagged += 1
                continue
            if row.status not in SENT_STATES:
                (failed if row.status == "failed" else lost).append(f"{mid}={row.status}")
                continue
            known = sim_by_wamid.get(row.external_id or "")
            if known is None or known.get("text") != body:
                wrong_wamid.append(mid)
                continue
            sent_ok += 1
            if _RANK.get(row.status, 0) < _RANK.get(known.get("status", ""), 0):
                status_behind.append(f"{mid}={row.status}<{known.get('status')}")
            if sim_texts[body] > 1:
                twice_unflagged.append(mid)
        # Also texts whose POST answer was lost (pforte died after the commit): if the simulator got
        # one twice, pforte's row for it must be in review.
        accepted_texts = set(self.load.staff_accepted)
        for body, n in sim_texts.items():
            if n < 2 or body in accepted_texts:
                continue
            rows = [ext_to_row.get(m["wamid"]) for m in business if m.get("text") == body]
            if any(r is not None and r.status != "review" for r in rows):
                twice_unflagged.append(str(body))
        stuck = [f"{r.id}={r.status}" for r in outbound.values() if r.status in ("queued", "sending")]
        unconfirmed_sent = sum(1 for b in sim_texts if b not in accepted_texts)
        violation("accepted staff messages lost", lost)
        violation("accepted staff messages failed", failed)
        violation("accepted staff messages without a matching simulator wamid", wrong_wamid)
        violation("staff messages sent twice without review", twice_unflagged)
        violation("outbound messages left queued/sending", stuck)
        violation("delivery statuses the simulator sent but pforte does not show", status_behind)
        violation(
            "accepted staff messages without a message id in the answer", self.load.staff_accepted_without_id
        )

        given_up = [str(d["id"]) for d in deliveries if d["state"] == "given_up"]
        violation("webhooks given up by the simulator", given_up)
        violation("pforte exited on its own", self.unexpected_exits)
        if self.kills < self.opts.kills:
            violations.append(f"only {self.kills} kills (wanted {self.opts.kills})")

        return {
            "patient_sent": len(sent),
            "patient_stored": len(sent) - len(missing),
            "patient_duplicates": len(duplicates),
            "patient_missing": len(missing),
            "patient_send_errors": self.load.patient_errors,
            "staff_posted": self.load.staff_posted,
            "staff_accepted": len(self.load.staff_accepted),
            "staff_resent_after_lost_answer": self.load.staff_resent,
            "staff_sent": sent_ok,
            "staff_in_review": in_review,
            "staff_sent_twice_flagged": twice_flagged,
            "staff_sent_twice_unflagged": len(twice_unflagged),
            "staff_lost": len(lost),
            "staff_failed": len(failed),
            "staff_refused_pforte_down": self.load.staff_refused,
            "staff_unconfirmed_connection_lost": self.load.staff_unconfirmed,
            "staff_unconfirmed_but_sent": unconfirmed_sent,
            "staff_rejected": dict(self.load.staff_rejected),
            "staff_logins": self.load.logins,
            "outbound_rows": len(outbound),
            "outbound_review": sum(1 for r in outbound.values() if r.status == "review"),
            "simulator_business_messages": len(business),
            "webhook_deliveries": len(deliveries),
            "webhook_failed_attempts": sum(
                1 for d in deliveries for code in d["status_codes"] if code != 200
            ),
            "webhook_given_up": len(given_up),
            "webhook_ack_delay_s": ack_delays(deliveries),
            "staff_status_behind_simulator": len(status_behind),
            "statuses_parked": parked,
            "jobs": jobs,
            "violations": violations,
        }

    # -- the whole run --------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Set up, load and kill, drain, verify; always clean up."""
        began = time.monotonic()
        result: dict[str, Any] = {"db": self.opts.db, "kills_wanted": self.opts.kills}
        engine = None
        try:
            await self.setup()
            assert self.pforte is not None
            limits = httpx.Limits(max_connections=64)
            async with (
                httpx.AsyncClient(base_url=self.sim_url, timeout=10.0, limits=limits) as sim,
                httpx.AsyncClient(base_url=self.url, timeout=10.0) as staff,
            ):
                load_started = time.monotonic()
                patients = asyncio.create_task(self.patient_load(sim))
                workers = [
                    asyncio.create_task(self.staff_load(staff, i)) for i in range(self.opts.staff_clients)
                ]
                try:
                    await self.chaos()
                finally:
                    self.stopping = True
                    self.up.set()
                    done = await asyncio.gather(patients, *workers, return_exceptions=True)
                for outcome in done:
                    if isinstance(outcome, BaseException):
                        raise HarnessError(f"load generator failed: {outcome!r}") from outcome
                load_seconds = time.monotonic() - load_started
                engine = self._engine()
                drained = await self.drain(engine, sim)
                self.pforte.stop()
                result.update(await self.verify(engine, sim))
                chain, broken = self.audit_chain()
                result["violations"] += [f"audit chain broken: {b}" for b in broken]
                if not drained["idle"]:
                    result["violations"].append(f"not idle after {self.opts.drain_timeout:.0f} s: {drained}")
                result.update(
                    kills=self.kills,
                    kills_during_startup=self.startup_kills,
                    restarts=self.pforte.starts - 1,
                    uptime_before_kill_s=[min(self.uptimes, default=0), max(self.uptimes, default=0)],
                    startup_s_median=round(sorted(self.startup_s)[len(self.startup_s) // 2], 2),
                    load_seconds=round(load_seconds, 1),
                    drain=drained,
                    audit_chain=chain,
                )
        except StartError as exc:
            if self.pforte is not None and self.pforte.starts > 0:  # pforte would not come back
                result.setdefault("violations", []).append(f"pforte did not restart: {exc}")
                result["kills"] = self.kills
            else:
                result["harness_error"] = str(exc)
        except HarnessError as exc:
            result["harness_error"] = str(exc)
        finally:
            self.stopping = True
            for proc in (self.pforte, self.simulator):
                if proc is not None:
                    proc.stop()
            if engine is not None:
                await engine.dispose()
            if self.pg_name:
                await pg_drop(self.pg_name)
        result["elapsed_s"] = round(time.monotonic() - began, 1)
        result["ok"] = not result.get("violations") and "harness_error" not in result
        if self.own_workdir and result["ok"] and not self.opts.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            result["workdir"] = str(self.workdir)
        return result


def ack_delays(deliveries: list[dict[str, Any]]) -> dict[str, Any]:
    """How much later than its first attempt each acknowledged webhook was answered 200.

    This is what the kills cost a patient's message: the restart plus the simulator's retry
    schedule (``--retry-schedule``; Meta's own is longer). Seconds, for all deliveries and for
    those that needed more than one attempt.
    """

    def stats(xs: list[float]) -> dict[str, Any]:
        xs = sorted(xs)
        if not xs:
            return {"count": 0}
        at = [round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) for q in (0.5, 0.99)]
        return {"count": len(xs), "p50": at[0], "p99": at[1], "max": round(xs[-1], 3)}

    every, retried = [], []
    for d in deliveries:
        if d["state"] != "delivered" or 200 not in d["status_codes"]:
            continue
        times = [datetime.fromisoformat(t) for t in d["attempted_at"]]
        delay = (times[d["status_codes"].index(200)] - times[0]).total_seconds()
        every.append(delay)
        if len(times) > 1:
            retried.append(delay)
    return {"all": stats(every), "retried": stats(retried)}


def _message_id_for(html: str, body: str) -> str | None:
    """The id of the message bubble showing ``body`` in a rendered thread."""
    at = html.rfind(f'<p class="text">{body}</p>')
    if at < 0:
        return None
    ids = _MESSAGE_ID_RE.findall(html, 0, at)
    return ids[-1] if ids else None


def crash_run(opts: Options) -> dict[str, Any]:
    """Run the harness once (blocking) and return its summary."""
    return asyncio.run(CrashRun(opts).run())


def main() -> int:
    """Command line: print the JSON summary; exit 1 on a broken invariant, 2 on a harness failure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--kills", type=int, default=20, help="at least this many SIGKILLs")
    ap.add_argument("--seconds", type=float, default=60.0, help="at least this long under load")
    ap.add_argument("--rate", type=float, default=50.0, help="patient messages per second")
    ap.add_argument("--staff-rate", type=float, default=10.0, help="staff replies per second")
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--lease", type=float, default=2.0, help="PFORTE_OUTBOX_LEASE_SECONDS")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    args = ap.parse_args()
    opts = Options(
        db=args.db,
        kills=args.kills,
        seconds=args.seconds,
        rate=args.rate,
        staff_rate=args.staff_rate,
        patients=args.patients,
        lease_seconds=args.lease,
        seed=args.seed,
        keep=args.keep,
    )
    result = crash_run(opts)
    print(json.dumps(result))
    if "harness_error" in result:
        return 2
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
