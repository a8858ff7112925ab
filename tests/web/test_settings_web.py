"""The settings page (DSK I.12) and switching error reporting on and off from it (I.8)."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select
from tests.conftest import PNID
from tests.errorkit import CapturingTransport
from tests.web.test_inbox import HTML, csrf_of, first_conversation_id, patient_writes

from pforte.audit.models import AuditEvent
from pforte.orgs import service as orgs
from pforte.orgs.service import DEFAULT_SETTINGS
from pforte.reporting import service as reporting
from pforte.reporting.models import ErrorReporting
from pforte.web.ui.settings import SPECS

DSN = "https://0123456789abcdef@errors.example.org/42"
FORM_DEFAULTS = {  # the editable settings at their defaults, as the form sends them
    "consent_required": "on",
    "notice_keywords": ", ".join(DEFAULT_SETTINGS["notice_keywords"]),
    "withdraw_keywords": ", ".join(DEFAULT_SETTINGS["withdraw_keywords"]),
    "incoming_parts_wait_minutes": str(DEFAULT_SETTINGS["incoming_parts_wait_minutes"]),
}


@pytest.fixture
def capturing_transport():
    return CapturingTransport()


async def _as(world, email, *, defaults: bool = True):
    """Log in; the organisation starts from the defaults (seed_clinic switches the consent step off)."""
    async with world.services.db.transaction() as s:
        org = await orgs.get(session=s, org_id=world.org_id)
        fresh = not await _actions_in(s, "settings.update")
        if defaults and fresh and org.settings.get("consent_required") is False:
            org.settings = {**org.settings, "consent_required": True}
    await world.login(email)
    return csrf_of((await world.client.get("/", headers=HTML)).text)


def _row(html: str, name: str) -> str:
    """The table row of one setting."""
    match = re.search(rf'<tr data-setting="{name}"[^>]*>.*?</tr>', html, re.S)
    assert match, name
    return match.group(0)


async def _settings(world, org_id):
    async with world.services.db.transaction() as s:
        return dict((await orgs.get(session=s, org_id=org_id)).settings)


async def _actions_in(session, action):
    return list((await session.execute(select(AuditEvent).where(AuditEvent.action == action))).scalars())


async def _actions(world, action):
    async with world.services.db.transaction() as s:
        return await _actions_in(s, action)


def test_every_organisation_setting_has_a_row_on_the_page():
    assert {s.name for s in SPECS} == set(DEFAULT_SETTINGS)


async def test_page_lists_every_setting_with_value_default_and_effect_and_no_deviation(world):
    await _as(world, world.admin_email)
    page = await world.client.get("/admin/settings", headers=HTML)
    assert page.status_code == 200
    for name in [*DEFAULT_SETTINGS, "error_reporting"]:
        row = _row(page.text, name)
        assert row.count("<td>") + row.count("<td ") == 3, name  # value, default, effect
    assert "data-deviation" not in page.text
    assert "data-error-reporting-banner" not in page.text
    assert 'href="/admin/settings"' in (await world.client.get("/", headers=HTML)).text  # the nav link
    assert "Lesebestätigungen an Patienten" in page.text  # the page is translated


async def test_loosening_settings_is_saved_audited_and_marked_as_deviation(world):
    token = await _as(world, world.admin_email)
    form = {
        "csrf_token": token,
        "send_read_receipts": "on",
        "notice_keywords": "Datenschutz, info",
        "withdraw_keywords": FORM_DEFAULTS["withdraw_keywords"],
        "incoming_parts_wait_minutes": "15",
    }  # consent_required not ticked: switched off
    r = await world.client.post("/admin/settings", data=form)
    assert r.status_code == 303 and r.headers["location"].endswith("?saved=settings")
    stored = await _settings(world, world.org_id)
    assert stored["send_read_receipts"] is True and stored["consent_required"] is False
    assert stored["notice_keywords"] == ["datenschutz", "info"]
    assert stored["incoming_parts_wait_minutes"] == 15
    (entry,) = await _actions(world, "settings.update")
    assert set(entry.details["after"]) == {
        "send_read_receipts",
        "consent_required",
        "notice_keywords",
        "incoming_parts_wait_minutes",
    }  # only what changed
    page = (await world.client.get("/admin/settings", headers=HTML)).text
    for name in ("send_read_receipts", "consent_required", "notice_keywords"):
        assert "data-deviation-marker" in _row(page, name), name
    for name in ("withdraw_keywords", "incoming_parts_wait_minutes", "own_server_encryption_only"):
        assert "data-deviation-marker" not in _row(page, name), name
    assert 'data-deviations="3"' in page


async def test_stricter_than_default_is_no_deviation_and_saving_twice_audits_once(world):
    token = await _as(world, world.admin_email)
    form = {"csrf_token": token, **FORM_DEFAULTS, "own_server_encryption_only": "on"}
    for _ in range(2):
        assert (await world.client.post("/admin/settings", data=form)).status_code == 303
    assert len(await _actions(world, "settings.update")) == 1
    page = (await world.client.get("/admin/settings", headers=HTML)).text
    assert "data-deviation" not in page


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("incoming_parts_wait_minutes", "zehn", "bad_number"),
        ("incoming_parts_wait_minutes", "0", "bad_number"),
        ("incoming_parts_wait_minutes", "99999", "bad_number"),
        ("notice_keywords", " , ", "keywords_empty"),
        ("withdraw_keywords", "x" * 40, "keyword_too_long"),
        ("withdraw_keywords", "stop, privacy", "keywords_overlap"),
    ],
)
async def test_bad_input_is_explained_and_changes_nothing(world, field, value, code):
    token = await _as(world, world.admin_email)
    before = await _settings(world, world.org_id)
    form = {"csrf_token": token, **FORM_DEFAULTS, "send_read_receipts": "on", field: value}
    r = await world.client.post("/admin/settings", data=form, headers=HTML)
    assert r.status_code == 400
    assert f'data-error-code="{code}"' in r.text and "Nichts wurde geändert" in r.text
    assert await _settings(world, world.org_id) == before
    assert await _actions(world, "settings.update") == []


async def test_staff_get_403_and_nothing_changes(world):
    token = await _as(world, world.staff_email)
    assert (await world.client.get("/admin/settings", headers=HTML)).status_code == 403
    r = await world.client.post("/admin/settings", data={"csrf_token": token, **FORM_DEFAULTS})
    assert r.status_code == 403
    r = await world.client.post("/admin/settings/error-reporting", data={"csrf_token": token, "dsn": DSN})
    assert r.status_code == 403
    assert await _actions(world, "settings.update") == []
    assert not world.services.reporter.active


async def test_without_csrf_token_nothing_changes(world):
    await _as(world, world.admin_email)
    r = await world.client.post("/admin/settings", data={**FORM_DEFAULTS, "send_read_receipts": "on"})
    assert r.status_code == 403
    r = await world.client.post("/admin/settings/error-reporting", data={"dsn": DSN})
    assert r.status_code == 403
    assert (await _settings(world, world.org_id)).get("send_read_receipts") is not True
    assert not world.services.reporter.active


async def test_other_organisations_admin_sees_and_changes_only_their_own(world):
    await world.add_other_org("admin@andere.test", role="admin")
    token = await _as(world, "admin@andere.test")
    r = await world.client.post(
        "/admin/settings", data={"csrf_token": token, **FORM_DEFAULTS, "send_read_receipts": "on"}
    )
    assert r.status_code == 303
    assert (await _settings(world, world.org_id)).get("send_read_receipts") is not True
    await world.client.post("/logout", data={"csrf_token": token})
    await _as(world, world.admin_email)
    page = (await world.client.get("/admin/settings", headers=HTML)).text
    assert "data-deviation-marker" not in _row(page, "send_read_receipts")


async def test_error_reporting_on_is_audited_bannered_and_off_again(world, capturing_transport):
    world.services.reporter.transport = capturing_transport
    token = await _as(world, world.admin_email)
    bad = await world.client.post(
        "/admin/settings/error-reporting",
        data={"csrf_token": token, "dsn": "http://key@errors.example.org/1"},
        headers=HTML,
    )
    assert bad.status_code == 400 and 'data-error-code="bad_dsn"' in bad.text
    assert not world.services.reporter.active and await _actions(world, "error_reporting.enable") == []

    r = await world.client.post("/admin/settings/error-reporting", data={"csrf_token": token, "dsn": DSN})
    assert r.status_code == 303
    assert world.services.reporter.active
    (entry,) = await _actions(world, "error_reporting.enable")
    assert entry.details["host"] == "errors.example.org" and "0123456789abcdef" not in str(entry.details)
    assert entry.actor_id is not None and entry.chain == "instance"
    for path in ("/admin/settings", "/admin/privacy", "/admin/channels", "/"):
        page = (await world.client.get(path, headers=HTML)).text
        assert "data-error-reporting-banner" in page and "errors.example.org" in page, path
    page = (await world.client.get("/admin/settings", headers=HTML)).text
    assert "data-deviation-marker" in _row(page, "error_reporting")
    assert "0123456789abcdef" not in page  # the key is not shown

    await world.client.post("/logout", data={"csrf_token": token})
    await _as(world, world.staff_email)
    assert "data-error-reporting-banner" not in (await world.client.get("/", headers=HTML)).text

    await world.client.post("/logout", data={"csrf_token": token})
    token = await _as(world, world.admin_email)
    r = await world.client.post(
        "/admin/settings/error-reporting", data={"csrf_token": token, "action": "disable"}
    )
    assert r.status_code == 303
    assert not world.services.reporter.active
    assert len(await _actions(world, "error_reporting.disable")) == 1
    async with world.services.db.transaction() as s:
        row = await s.get(ErrorReporting, reporting.ROW_ID)
        assert row.enabled is False and row.dsn is None
    assert "data-error-reporting-banner" not in (await world.client.get("/admin/settings", headers=HTML)).text


# -- the defaults are applied where the data would leave -------------------------------------------


def _inbound(world):
    return [m for m in world.sim.conversation(PNID, world.patient) if m.direction == "in"]


async def test_no_read_receipt_reaches_the_patient_unless_switched_on(world):
    await patient_writes(world, "Hallo")
    token = await _as(world, world.staff_email)
    cid = await first_conversation_id(world)
    assert (await world.client.get(f"/conversations/{cid}", headers=HTML)).status_code == 200
    await world.settle()
    assert [m.read_by_business for m in _inbound(world)] == [False]
    await world.client.post("/logout", data={"csrf_token": token})

    token = await _as(world, world.admin_email)
    form = {"csrf_token": token, **FORM_DEFAULTS, "send_read_receipts": "on"}
    assert (await world.client.post("/admin/settings", data=form)).status_code == 303
    await patient_writes(world, "Noch da?")
    assert (await world.client.get(f"/conversations/{cid}", headers=HTML)).status_code == 200
    await world.settle()
    assert _inbound(world)[-1].read_by_business is True


async def test_link_previews_are_never_requested_even_if_the_setting_says_so(world):
    await patient_writes(world, "Wo finde ich das Formular?")
    async with world.services.db.transaction() as s:
        org = await orgs.get(session=s, org_id=world.org_id)
        org.settings = {**org.settings, "link_previews": True}  # stored, e.g. by an older version
    token = await _as(world, world.staff_email, defaults=False)  # no consent step: staff may write
    cid = await first_conversation_id(world)
    r = await world.client.post(
        f"/conversations/{cid}/messages",
        data={"text": "Hier: https://klinik.example/formular", "csrf_token": token},
    )
    assert r.status_code == 303
    await world.settle()
    (sent,) = [m for m in world.sim.conversation(PNID, world.patient) if m.direction == "out"]
    assert sent.payload["text"]["preview_url"] is False
    await world.client.post("/logout", data={"csrf_token": token})
    await _as(world, world.admin_email)
    row = _row((await world.client.get("/admin/settings", headers=HTML)).text, "link_previews")
    assert "data-deviation-marker" not in row and 'type="checkbox"' not in row
