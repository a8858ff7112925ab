"""Two `pforte serve` processes on one PostgreSQL database, with the simulator as a third process.

Proves the three things several processes must get right:
- outbox jobs are claimed once (FOR UPDATE SKIP LOCKED): N staff messages reach the simulator exactly
  N times, each job ran once, and the shared pacing kept the rate (no 130429 from the simulator);
- live inbox events reach a client connected to the OTHER process (LISTEN/NOTIFY);
- periodic jobs run once per interval across processes (claimed in `periodic_runs`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from tests.conftest import PG_ADMIN, _pg_exec

from pforte import migrate

PNID = "100000000000555"
SECRET = "mp-app-secret"
TOKEN = "mp-access-token"
PASSWORD = "correct horse battery"
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture
def pg_database():
    name = f"pforte_mp_{uuid.uuid4().hex[:8]}"
    try:
        _pg_exec(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        pytest.fail(f"PostgreSQL is unreachable at {PG_ADMIN} ({type(exc).__name__})", pytrace=False)
    url = "postgresql+asyncpg://" + PG_ADMIN.split("://", 1)[1].rsplit("/", 1)[0] + "/" + name
    migrate.upgrade(url)
    yield url
    _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Stack:
    """The simulator and two pforte processes, started and stopped by the test."""

    def __init__(self, db_url: str, data_dir: Path) -> None:
        self.db_url = db_url
        self.sim_port, self.a_port, self.b_port = _port(), _port(), _port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PFORTE_")},
            "PFORTE_DATA_DIR": str(data_dir),
            "PFORTE_DATABASE_URL": db_url,
            "PFORTE_COOKIE_SECURE": "false",
            "PFORTE_LOG_LEVEL": "WARNING",
            "PFORTE_OUTBOX_POLL_SECONDS": "0.1",
            "PFORTE_STATUS_RECONCILE_SECONDS": "0.5",
        }

    def url(self, which: str) -> str:
        return f"http://127.0.0.1:{ {'sim': self.sim_port, 'a': self.a_port, 'b': self.b_port}[which] }"

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [str(BIN / "pforte"), *args], env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def start(self) -> None:
        sim_code = (
            "from pforte.channels.simulator import SimulatorConfig, run\n"
            f"run('127.0.0.1', {self.sim_port}, SimulatorConfig(public_base_url='{self.url('sim')}',"
            " retry_schedule_s=(0.2, 0.5, 1.0), pair_limit_enabled=False))"
        )
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-c", sim_code],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.cli("org", "create", "--name", "Klinikum", "--slug", "klinikum")
        self.cli(
            "org", "set", "--org", "klinikum", "consent_required", "false"
        )  # not what this test is about
        self.cli("user", "create", "--org", "klinikum", "--email", "dr@klinikum.test", "--password", PASSWORD)
        ch = json.loads(
            self.cli(
                "channel",
                "add-whatsapp",
                "--org",
                "klinikum",
                "--name",
                "Station",
                "--phone-number-id",
                PNID,
                "--display-phone-number",
                "+49 30 5",
                "--access-token",
                TOKEN,
                "--app-secret",
                SECRET,
                "--graph-base-url",
                self.url("sim"),
                "--rate-limit",
                "10",
            )
        )
        self.channel_id = ch["id"]
        for port, base in ((self.a_port, self.url("a")), (self.b_port, self.url("b"))):
            env = {**self.env, "PFORTE_PORT": str(port), "PFORTE_BASE_URL": base}
            self.procs.append(
                subprocess.Popen(
                    [str(BIN / "pforte"), "serve", "--no-migrate"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for which in ("sim", "a", "b"):
            _wait_http(self.url(which) + ("/_sim/health" if which == "sim" else "/healthz"))
        r = httpx.post(
            self.url("sim") + "/_sim/numbers",
            json={
                "phone_number_id": PNID,
                "display_phone_number": "+49 30 5",
                "access_token": TOKEN,
                "app_secret": SECRET,
                "webhook_url": f"{self.url('a')}/webhooks/whatsapp/{self.channel_id}",
                "rate_limit_per_s": 10,
            },
        )
        assert r.status_code in (200, 201), r.text
        r = httpx.post(
            self.url("sim") + "/_sim/users", json={"name": "Erika Mustermann", "wa_id": "4915112345678"}
        )
        assert r.status_code in (200, 201), r.text
        self.patient = r.json()["user_id"]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    def login(self, which: str) -> httpx.Client:
        client = httpx.Client(base_url=self.url(which), timeout=10, follow_redirects=False)
        r = client.post(
            "/login",
            data={"email": "dr@klinikum.test", "password": PASSWORD},
            headers={"origin": self.url(which)},
        )
        assert r.status_code == 303, r.text
        return client

    def patient_writes(self, text: str) -> None:
        r = httpx.post(
            f"{self.url('sim')}/_sim/users/{self.patient}/send", json={"phone_number_id": PNID, "text": text}
        )
        assert r.status_code == 201, r.text


@pytest.fixture
def stack(pg_database, tmp_path):
    s = Stack(pg_database, tmp_path / "data")
    try:
        s.start()
        yield s
    finally:
        s.stop()


async def _scalar(db_url: str, sql: str) -> object:
    conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _sse_reader(client: httpx.Client, seen: list[str], stop: threading.Event) -> None:
    with client.stream("GET", "/events", headers={"accept": "text/event-stream"}, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event:"):
                seen.append(line.split(":", 1)[1].strip())
            if stop.is_set() or "conversation" in seen:
                return


@pytest.mark.dsk("IV.5")
async def test_two_processes_share_one_database_correctly(stack):
    # Live events: a browser on process B sees a webhook that arrived at process A.
    b = stack.login("b")
    seen: list[str] = []
    stop = threading.Event()
    reader = threading.Thread(target=_sse_reader, args=(b, seen, stop), daemon=True)
    reader.start()
    time.sleep(0.5)
    stack.patient_writes("Hallo, ist jemand da?")
    reader.join(15)
    stop.set()
    assert "conversation" in seen, seen

    # Outbox: 30 replies posted to A are sent exactly once by the two processes together.
    a = stack.login("a")
    inbox = a.get("/", headers={"accept": "text/html"}).text
    conversation_id = re.search(r'data-conversation-id="(\w+)"', inbox).group(1)
    page = a.get(f"/conversations/{conversation_id}", headers={"accept": "text/html"}).text
    token = re.search(r'<meta name="csrf-token" content="([^"]*)"', page).group(1)
    texts = [f"Antwort {i}" for i in range(30)]
    for t in texts:
        r = a.post(
            f"/conversations/{conversation_id}/messages",
            data={"text": t},
            headers={"x-csrf-token": token, "hx-request": "true", "origin": stack.url("a")},
        )
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    received: list[str] = []
    while time.monotonic() < deadline:
        msgs = httpx.get(f"{stack.url('sim')}/_sim/numbers/{PNID}/messages").json()
        received = [m["text"] for m in msgs if m["direction"] == "out"]
        if len(received) >= len(texts):
            break
        time.sleep(0.2)
    time.sleep(1.0)  # anything sent twice would arrive in this second
    msgs = httpx.get(f"{stack.url('sim')}/_sim/numbers/{PNID}/messages").json()
    received = [m["text"] for m in msgs if m["direction"] == "out"]
    assert sorted(received) == sorted(texts)
    assert (
        await _scalar(
            stack.db_url,
            "SELECT count(*) FROM jobs WHERE kind='send_message' AND (state <> 'done' OR attempts <> 1)",
        )
        == 0
    )
    errors = httpx.get(f"{stack.url('sim')}/_sim/errors").json()
    assert errors.get("130429", 0) == 0, errors

    # Periodic jobs: both processes try every 0.5 s; together they run it about once per 0.5 s.
    sql = "SELECT runs FROM periodic_runs WHERE name = 'reconcile_statuses'"
    before = int(await _scalar(stack.db_url, sql) or 0)
    time.sleep(4.0)
    after = int(await _scalar(stack.db_url, sql) or 0)
    assert 2 <= after - before <= 4.0 / 0.5 + 1, (before, after)


def test_several_workers_on_sqlite_are_refused(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PFORTE_")},
        "PFORTE_DATA_DIR": str(tmp_path),
    }
    r = subprocess.run(
        [str(BIN / "pforte"), "serve", "--workers", "2"], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert "need PostgreSQL" in r.stderr and r.stderr.count("\n") == 1
