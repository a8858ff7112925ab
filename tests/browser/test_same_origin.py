"""No page loads anything from another origin (DESIGN 7, DSK I.8/I.12): every page, in real Chromium.

An admin logs in and visits every page: login, inbox, a conversation with messages and an image
attachment, every admin page, the privacy notice (public and for staff), an error page.
Every request the browser makes is recorded and must go to pforte's own origin, and every HTML page
carries a Content-Security-Policy that forbids other origins.
"""

from __future__ import annotations

import base64
import re
import shutil
from typing import Any

import pytest
from tests.browser.test_conversation import CHROMIUM_ARGS, PASSWORD, Stack, stack  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.dsk("I.12")]

# A 1×1 PNG, sent by staff as an attachment so the thread shows an image served by pforte.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
ADMIN_EMAIL = "admin@klinikum.test"  # seed_clinic's admin
ADMIN_PAGES = [
    "/admin/settings",
    "/admin/privacy",
    "/admin/channels",
    "/admin/privacy-notice",
    "/privacy",
    "/audit",
    "/admin/compliance",
]


def csp_forbids_other_origins(csp: str) -> bool:
    """Every fetch directive allows only 'self' (plus blob:/data: for images), nothing else."""
    directives = {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d.strip()}
    if directives.get("default-src") != ["'self'"]:
        return False
    allowed = {"'self'", "'none'", "blob:"}
    for name, sources in directives.items():
        if name.endswith("-src") and not set(sources) <= allowed:
            return False
    return directives.get("frame-ancestors") == ["'none'"] and directives.get("form-action") == ["'self'"]


def test_csp_check_rejects_other_origins():
    good = "default-src 'self'; img-src 'self' blob:; frame-ancestors 'none'; form-action 'self'"
    assert csp_forbids_other_origins(good)
    assert not csp_forbids_other_origins(good.replace("img-src 'self'", "img-src 'self' https://cdn.example"))
    assert not csp_forbids_other_origins(good.replace("default-src 'self'", "default-src *"))


def test_every_page_loads_only_from_its_own_origin(stack: Stack) -> None:  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is needed for browser tests"
    base = stack.pforte_url
    requests: list[str] = []
    pages: dict[str, dict[str, str]] = {}  # url -> response headers of each document
    stack.patient_writes("Guten Tag, hier ist mein Befund.")

    def on_response(response: Any) -> None:
        if response.request.resource_type == "document":
            pages[response.url] = response.all_headers()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="de-DE")
            page = context.new_page()
            page.set_default_timeout(15_000)
            page.on("request", lambda req: requests.append(req.url))
            page.on("response", on_response)

            page.goto(f"{base}/login")
            page.fill("#email", ADMIN_EMAIL)
            page.fill("#password", PASSWORD)
            page.click("button.primary")
            page.wait_for_url(f"{base}/")

            page.goto(f"{base}/admin/privacy-notice")  # publish a notice, so its public page exists
            page.fill("#notice-de", "Datenschutzhinweise des Klinikums (Test).")
            page.fill("#notice-en", "Privacy notice of the hospital (test).")
            page.click("form button.primary")
            page.goto(f"{base}/")
            page.locator(".conv a").first.click()
            page.wait_for_url(f"{base}/conversations/*")
            expect(page.locator("#thread")).to_contain_text("hier ist mein Befund")
            page.set_input_files(
                "#upload-file", files=[{"name": "b.png", "mimeType": "image/png", "buffer": PNG}]
            )
            page.locator("#upload-file").evaluate("el => el.form.requestSubmit()")
            expect(page.locator(".attachment-image img")).to_have_count(1)
            conversation_url = page.url
            page.goto(conversation_url)  # the conversation loaded whole, attachment included
            expect(page.locator(".attachment-image img")).to_have_count(1)

            for path in [*ADMIN_PAGES, "/privacy/klinikum"]:
                response = page.goto(f"{base}{path}")
                assert response is not None and response.status == 200, path
            expect(page.locator("body")).to_be_visible()
            response = page.goto(f"{base}/conversations/does-not-exist")
            assert response is not None and response.status == 404
            expect(page.locator("[data-error-code]")).to_be_visible()
        finally:
            browser.close()

    visited = {re.sub(r"/conversations/\w+$", "/conversations/<id>", u.removeprefix(base)) for u in pages}
    for path in ["/login", "/", "/conversations/<id>", "/privacy/klinikum", *ADMIN_PAGES]:
        assert path in visited, path
    assert any("/attachments/" in u for u in requests), "the attachment was not loaded"
    foreign = [u for u in requests if not (u.startswith(base + "/") or u == base)]
    assert foreign == [], foreign
    for url, headers in pages.items():
        csp = headers.get("content-security-policy", "")
        assert csp_forbids_other_origins(csp), (url, csp)
