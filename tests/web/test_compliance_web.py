"""The compliance page (DSK I.11, IV.4): admins only, own organisation only, save and "changed since"."""

from __future__ import annotations

import json
import re

import pytest
from sqlalchemy import select
from tests.conftest import PASSWORD
from tests.web.test_inbox import HTML, csrf_of

from pforte.audit.service import CLI
from pforte.compliance import render
from pforte.compliance.catalog import IDS
from pforte.compliance.models import ComplianceReport
from pforte.retention import service as retention
from pforte.staff import service as staff

PAGES = ("/admin/compliance", "/admin/compliance.json", "/admin/compliance.html")


async def _as(world, email: str) -> str:
    await world.login(email)
    return csrf_of((await world.client.get("/", headers=HTML)).text)


async def _saved(world, org_id: str) -> list[ComplianceReport]:
    async with world.services.db.transaction() as s:
        q = select(ComplianceReport).where(ComplianceReport.org_id == org_id)
        return list((await s.execute(q)).scalars())


@pytest.mark.dsk("I.11")
async def test_the_admin_sees_every_row_with_status_evidence_and_tests(world):
    await _as(world, world.admin_email)
    home = await world.client.get("/", headers=HTML)
    assert 'href="/admin/compliance"' in home.text and "Konformität" in home.text  # the nav link, in German
    page = await world.client.get("/admin/compliance", headers=HTML)
    assert page.status_code == 200
    assert "Konformitätsbericht (DSK)" in page.text
    assert re.findall(r'data-row="([^"]+)"', page.text) == list(IDS)
    i7 = re.search(r'<tr id="row-I.7".*?</tr>', page.text, re.S).group(0)
    assert 'data-status="met"' in i7 and "erfüllt" in i7
    assert "180 Tage nach der letzten Aktivität" in i7  # the row's own text in the page's language
    assert "tests/integration/test_deletion.py::" in i7
    ii1 = re.search(r'<tr id="row-II.1".*?</tr>', page.text, re.S).group(0)
    assert 'data-status="partly"' in ii1 and "Meta Platforms Ireland Ltd." in ii1
    assert "data-no-previous" in page.text
    assert "Verzeichnis von Verarbeitungstätigkeiten" in page.text
    for secret in ("dr.weiss@klinikum.test", "Station 3", "+49 30 1234567", "Erika Mustermann"):
        body = page.text.split("<main", 1)[1]  # the header names the logged-in admin; the report must not
        assert secret not in body


@pytest.mark.dsk("I.11")
async def test_staff_and_auditors_are_refused(world):
    async with world.services.db.transaction() as s:
        await staff.create(
            session=s,
            org_id=world.org_id,
            email="audit@klinikum.test",
            display_name="Audit",
            password=PASSWORD,
            role="auditor",
            now=world.services.clock.now(),
        )
    for email in (world.staff_email, "audit@klinikum.test"):
        token = await _as(world, email)
        assert 'href="/admin/compliance"' not in (await world.client.get("/", headers=HTML)).text
        for path in PAGES:
            assert (await world.client.get(path, headers=HTML)).status_code == 403, (email, path)
        refused = await world.client.post("/admin/compliance/save", data={"csrf_token": token})
        assert refused.status_code == 403
        await world.client.post("/logout", data={"csrf_token": token})
    assert await _saved(world, world.org_id) == []


@pytest.mark.dsk("I.11")
async def test_another_organisations_admin_sees_only_their_own_report(world):
    other = await world.add_other_org("admin@andere.test", role="admin")
    await _as(world, "admin@andere.test")
    doc = (await world.client.get("/admin/compliance.json")).json()
    assert doc["org"] == {"id": other, "slug": "andere"}
    page = await world.client.get("/admin/compliance", headers=HTML)
    assert page.status_code == 200
    for text in (json.dumps(doc), page.text):
        assert world.org_id not in text and world.channel_id not in text
    assert "Es ist kein Kanal eingerichtet." in page.text  # II.1 of "andere", which has no channel


@pytest.mark.dsk("IV.4")
async def test_saving_stores_the_report_and_the_page_then_shows_what_changed_since(world):
    token = await _as(world, world.admin_email)
    forged = await world.client.post("/admin/compliance/save", data={"csrf_token": "wrong"})
    assert forged.status_code == 403 and await _saved(world, world.org_id) == []
    saved = await world.client.post("/admin/compliance/save", data={"csrf_token": token})
    assert saved.status_code == 303 and saved.headers["location"] == "/admin/compliance?saved=1"
    (row,) = await _saved(world, world.org_id)
    assert row.trigger == "web" and [r["id"] for r in row.report["rows"]] == list(IDS)
    page = await world.client.get(saved.headers["location"], headers=HTML)
    assert "Der Bericht wurde gespeichert." in page.text
    assert f'data-previous-report="{row.id}"' in page.text and "data-unchanged" in page.text
    async with world.services.db.transaction() as s:
        await retention.set_org_retention(
            s, org_id=world.org_id, enabled=False, days=180, actor=CLI, now=world.services.clock.now()
        )
    page = await world.client.get("/admin/compliance", headers=HTML)
    assert "Geändert seit" in page.text
    changed = re.findall(r'data-changed-row="([^"]+)"', page.text)
    assert "I.7" in changed
    i7 = re.search(r'<li data-changed-row="I.7">.*?</li>', page.text, re.S).group(0)
    assert 'data-status="met"' in i7 and 'data-status="partly"' in i7


@pytest.mark.dsk("I.11")
async def test_downloads_are_the_report_as_json_and_as_a_standalone_page(world):
    await _as(world, world.admin_email)
    as_json = await world.client.get("/admin/compliance.json")
    assert as_json.status_code == 200 and as_json.headers["content-type"].startswith("application/json")
    assert as_json.headers["content-disposition"].startswith('attachment; filename="compliance-klinikum-')
    doc = as_json.json()
    assert [r["id"] for r in doc["rows"]] == list(IDS)
    assert doc["changes_since_previous"] == {"previous_at": None, "changes": []}
    as_html = await world.client.get("/admin/compliance.html", headers={"accept-language": "en"})
    assert as_html.status_code == 200
    assert as_html.headers["content-security-policy"] == render.CSP
    assert as_html.headers["content-disposition"].endswith('.html"')
    assert "DSK compliance report" in as_html.text and '<html lang="en">' in as_html.text
    german = await world.client.get("/admin/compliance.html", headers=HTML)
    assert "DSK-Konformitätsbericht" in german.text and "Zeile" in german.text
    assert "<script" not in as_html.text and " src=" not in as_html.text and "<link" not in as_html.text
