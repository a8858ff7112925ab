"""A real headless Chromium against real uvicorn servers: pforte and the WhatsApp simulator over HTTP.

Log in, a patient writes (through the simulator's control API), the message appears live without a
reload, staff replies, the delivered and then read ticks appear. Every request the page makes must
go to pforte's own origin, and the page must not trip the Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from tests.helpers import seed_clinic

from pforte import migrate
from pforte.app import create_app
from pforte.bootstrap import build_services
from pforte.channels.simulator import SimulatorConfig, create_simulator_app
from pforte.config import Settings

pytestmark = pytest.mark.browser

PNID = "106540352242922"
PASSWORD = "correct horse battery"
EMAIL = "dr.weiss@klinikum.test"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOT = Path("/tmp/pforte-inbox.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """pforte and the simulator served by uvicorn in a background thread with its own event loop."""

    db_url: str
    data_dir: Path
    pforte_port: int = field(default_factory=free_port)
    sim_port: int = field(default_factory=free_port)
    patient_id: str = ""
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    stop_event: asyncio.Event | None = None
    thread: threading.Thread | None = None

    @property
    def pforte_url(self) -> str:
        return f"http://127.0.0.1:{self.pforte_port}"

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        sim_app = create_simulator_app(SimulatorConfig(public_base_url=self.sim_url, deliver_delay_s=0.3))
        sim = sim_app.state.sim
        settings = Settings(
            data_dir=self.data_dir,
            database_url=self.db_url,
            base_url=self.pforte_url,
            cookie_secure=True,
            outbox_poll_seconds=0.2,
            group_commit_window_ms=1.0,
            run_workers=True,
        )
        services = build_services(settings)
        clinic = await seed_clinic(
            services,
            sim,
            graph_base_url=self.sim_url,
            pforte_base_url=self.pforte_url,
            pnid=PNID,
            access_token="tok",
            app_secret="secret",
            password=PASSWORD,
        )
        self.patient_id = clinic.patient.user_id
        servers = [
            uvicorn.Server(
                uvicorn.Config(
                    app,
                    host="127.0.0.1",
                    port=port,
                    log_level="warning",
                    ws="none",
                    http="h11",
                    loop="asyncio",
                    lifespan="on",
                )
            )
            for app, port in ((create_app(services), self.pforte_port), (sim_app, self.sim_port))
        ]
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                raise RuntimeError("a server did not start")
            await asyncio.sleep(0.02)
        self.ready.set()
        await self.stop_event.wait()
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="pforte-browser-stack", daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "servers did not start"
        if self.error:
            raise self.error

    def stop(self) -> None:
        if self.loop and self.stop_event and self.thread and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(30)

    def patient_writes(self, text: str) -> None:
        r = httpx.post(
            f"{self.sim_url}/_sim/users/{self.patient_id}/send",
            json={"phone_number_id": PNID, "text": text},
            timeout=10,
        )
        assert r.status_code == 201, r.text

    def patient_reads(self) -> None:
        r = httpx.post(
            f"{self.sim_url}/_sim/users/{self.patient_id}/read", json={"phone_number_id": PNID}, timeout=10
        )
        assert r.status_code == 200, r.text


@pytest.fixture
def stack(tmp_path: Path):
    db = tmp_path / "browser.sqlite3"
    url = f"sqlite+aiosqlite:///{db}"
    migrate.upgrade(url)
    s = Stack(db_url=url, data_dir=tmp_path / "data")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_live_conversation_in_chromium(stack: Stack) -> None:
    from playwright.sync_api import expect, sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is needed for browser tests"
    base = stack.pforte_url
    requests: list[str] = []
    problems: list[str] = []

    def on_console(msg: Any) -> None:
        if msg.type == "error":
            problems.append(msg.text)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="de-DE")
            page = context.new_page()
            page.set_default_timeout(15_000)
            page.on("request", lambda req: requests.append(req.url))
            page.on("console", on_console)
            page.on("pageerror", lambda exc: problems.append(str(exc)))

            page.goto(f"{base}/login")
            page.fill("#email", EMAIL)
            page.fill("#password", PASSWORD)
            page.click("button.primary")
            page.wait_for_url(f"{base}/")
            expect(page.locator("body")).to_have_attribute("data-live", "connected")

            # A first message appears in the list without a reload.
            page.evaluate("window.__sameDocument = 'inbox'")
            stack.patient_writes("Guten Tag, ich habe eine Frage.")
            item = page.locator(".conv", has_text="Erika Mustermann")
            expect(item).to_be_visible()
            expect(item.locator(".badge")).to_have_text("1")
            assert page.evaluate("window.__sameDocument") == "inbox"

            item.locator("a").click()
            page.wait_for_url(f"{base}/conversations/*")
            expect(page.locator("#thread")).to_contain_text("Guten Tag, ich habe eine Frage.")
            expect(page.locator("body")).to_have_attribute("data-live", "connected")
            page.evaluate("window.__sameDocument = 'conversation'")

            # The next one appears in the open conversation live, and is marked seen.
            stack.patient_writes("Kann ich morgen kommen?")
            expect(page.locator(".msg-in .text", has_text="Kann ich morgen kommen?")).to_be_visible()
            expect(page.locator(".conv.is-active .badge")).to_have_count(0)

            # A refused send is explained in words inside the form; nothing else changes.
            page.fill("#reply-text", "   ")
            page.click(".reply-form button[type=submit]")
            expect(page.locator(".reply-form .form-error")).to_contain_text("Bitte zuerst etwas eingeben")
            expect(page.locator(".msg-out")).to_have_count(0)

            page.fill("#reply-text", "Ja, morgen um 9 Uhr passt.")
            page.click(".reply-form button[type=submit]")
            expect(page.locator("#reply-text")).to_have_value("")
            expect(page.locator(".reply-form .form-error")).to_be_empty()
            out = page.locator(".msg-out", has_text="Ja, morgen um 9 Uhr passt.")
            expect(out).to_have_attribute("data-status", "delivered")
            expect(out.locator(".tick-delivered")).to_be_visible()

            stack.patient_reads()
            expect(out).to_have_attribute("data-status", "read")
            expect(out.locator(".tick-read")).to_be_visible()
            assert page.evaluate("window.__sameDocument") == "conversation"

            page.screenshot(path=str(SCREENSHOT), full_page=False)
            page.set_viewport_size({"width": 420, "height": 800})
            expect(page.locator(".back")).to_be_visible()
            expect(page.locator(".sidebar")).to_be_hidden()
            page.screenshot(path=str(SCREENSHOT.with_name("pforte-inbox-narrow.png")), full_page=False)
        finally:
            browser.close()

    assert requests, "no requests recorded"
    foreign = [u for u in requests if not (u.startswith(base + "/") or u == base)]
    assert foreign == [], foreign
    expected = "the server responded with a status of 400"  # the refused empty send above
    assert [p for p in problems if expected not in p] == [], problems
