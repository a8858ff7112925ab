"""`pforte demo` as a person uses it: two tabs, one playing the patient, one the clinician.

Runs the real command in its own process (SQLite, the built-in simulator), reads the addresses and
the login it prints, then drives headless Chromium: the patient writes on the simulator's phone
page, the message appears live in the inbox, the clinician answers, the answer reaches the phone
page, and reading it there turns the inbox tick to "read".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.browser.test_conversation import CHROMIUM_ARGS

pytestmark = pytest.mark.browser


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture
def demo(tmp_path: Path):
    port = _free_port_pair()
    pforte = Path(sys.executable).with_name("pforte")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PFORTE_")}
    proc = subprocess.Popen(
        [str(pforte), "demo", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Stop with Ctrl+C" in line:
            break
    text = "".join(lines)
    try:
        inbox = re.search(r"Inbox \(staff\):\s+(\S+)", text)
        phone = re.search(r"Patient phone \(sim\):\s+(\S+)", text)
        login = re.search(r"Login:\s+(\S+)\s+/\s+(\S+)", text)
        assert inbox and phone and login, text
        yield {
            "inbox": inbox.group(1).rstrip("/"),
            "phone": phone.group(1),
            "email": login.group(1),
            "password": login.group(2),
        }
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_demo_two_tabs_patient_and_clinician(demo) -> None:
    from playwright.sync_api import expect, sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is needed for browser tests"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="de-DE")
            context.set_default_timeout(15_000)
            phone = context.new_page()
            inbox = context.new_page()

            inbox.goto(demo["inbox"] + "/")
            inbox.fill("#email", demo["email"])
            inbox.fill("#password", demo["password"])
            inbox.click("button.primary")
            inbox.wait_for_url(demo["inbox"] + "/")
            expect(inbox.locator("body")).to_have_attribute("data-live", "connected")

            phone.goto(demo["phone"])
            phone.click("form[action='/phone'] button[type=submit]")  # open Erika's chat
            phone.fill("#text", "Guten Tag, ich habe seit gestern Fieber.")
            phone.click("#send-form button[type=submit]")
            expect(phone.locator("#chat")).to_contain_text("Guten Tag, ich habe seit gestern Fieber.")

            item = inbox.locator(".conv", has_text="Erika Mustermann")
            expect(item).to_be_visible()  # live, without a reload
            item.locator("a").click()
            expect(inbox.locator("#thread")).to_contain_text("ich habe seit gestern Fieber")
            # No reply before consent: pforte sent the notice and asks with two buttons.
            expect(inbox.locator("[data-send-block]")).to_be_visible()
            expect(phone.locator("#chat")).to_contain_text("Datenschutzhinweis von Demo-Klinik (Version 1)")
            phone.bring_to_front()
            phone.locator("button.option", has_text="Ja, einverstanden").click()
            expect(phone.locator("#chat")).to_contain_text("Ihre Einwilligung ist gespeichert")
            inbox.bring_to_front()
            expect(inbox.locator("#consent-state")).to_contain_text("Einwilligung erteilt")  # live
            expect(inbox.locator("#reply-text")).to_be_visible()
            inbox.fill("#reply-text", "Bitte kommen Sie morgen um 9 Uhr in die Sprechstunde.")
            inbox.click(".reply-form button[type=submit]")
            out = inbox.locator(".msg-out", has_text="morgen um 9 Uhr")
            expect(out).to_be_visible()

            phone.bring_to_front()
            expect(phone.locator("#chat")).to_contain_text("Bitte kommen Sie morgen um 9 Uhr")
            expect(out).to_have_attribute("data-status", "read")  # the open phone chat read it
            expect(out.locator(".tick-read")).to_be_visible()
            phone.screenshot(path="/tmp/pforte-demo-phone.png")
            inbox.screenshot(path="/tmp/pforte-demo-inbox.png")
        finally:
            browser.close()
