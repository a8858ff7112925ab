"""The audit viewer and its export (DSK I.11), through the ASGI app on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from starlette.routing import Route
from tests.conftest import PASSWORD, PNID
from tests.web.test_inbox import HTML, csrf_of, first_conversation_id, patient_writes
from tests.web.test_org_scoping import all_routes

from pforte.audit import service as audit
from pforte.audit.models import AuditEvent
from pforte.audit.service import CLI, GENESIS, SYSTEM, Actor
from pforte.staff import service as staff
from pforte.web.ui import audit as audit_ui

pytestmark = pytest.mark.dsk("I.11")

AUDITOR_EMAIL = "pruefung@klinikum.test"


async def _auditor(world) -> str:
    async with world.services.db.transaction() as s:
        user = await staff.create(
            session=s,
            org_id=world.org_id,
            email=AUDITOR_EMAIL,
            display_name="Prüferin",
            password=PASSWORD,
            role="auditor",
            now=world.services.clock.now(),
        )
        return user.id


async def _as(world, email: str) -> None:
    world.client.cookies.clear()
    assert (await world.login(email)).status_code == 303


def _seqs(html: str) -> list[int]:
    return [int(s) for s in re.findall(r'<tr data-seq="(\d+)"', html)]


def _actions(html: str) -> list[str]:
    return re.findall(r'<tr data-seq="\d+" data-action="([\w.]+)"', html)


async def _entries(world, **where) -> list[AuditEvent]:
    async with world.services.db.transaction() as s:
        q = select(AuditEvent).where(AuditEvent.chain == world.org_id).order_by(AuditEvent.seq)
        for name, value in where.items():
            q = q.where(getattr(AuditEvent, name) == value)
        return list((await s.execute(q)).scalars())


async def _opened_conversation(world) -> str:
    """The patient writes; the staff member opens the conversation (one conversation.open entry)."""
    await patient_writes(world, "Ich habe eine Frage")
    await _as(world, world.staff_email)
    cid = await first_conversation_id(world)
    assert (await world.client.get(f"/conversations/{cid}", headers=HTML)).status_code == 200
    return cid


async def test_admins_and_auditors_see_the_log_staff_do_not(world):
    cid = await _opened_conversation(world)
    assert (await world.client.get("/audit", headers=HTML)).status_code == 403
    assert (await world.client.get("/audit/export?format=json")).status_code == 403
    assert "/audit" not in (await world.client.get("/", headers=HTML)).text  # no link for staff
    await _auditor(world)
    for email in (world.admin_email, AUDITOR_EMAIL):
        await _as(world, email)
        assert 'href="/audit"' in (await world.client.get("/", headers=HTML)).text
        page = await world.client.get("/audit", headers=HTML)
        assert page.status_code == 200
        assert "conversation.open" in page.text and cid in page.text
        # The actor is shown by name and e-mail, not only as an id.
        assert "Dr. Weiss" in page.text and world.staff_email in page.text
        assert "Protokoll" in page.text  # German by default
    english = await world.client.get("/audit", headers={**HTML, "accept-language": "en"})
    assert "Audit log" in english.text and "Older entries" not in english.text


async def test_filters_select_by_action_actor_object_and_date(world):
    cid = await _opened_conversation(world)
    await _as(world, world.admin_email)
    async with world.services.db.transaction() as s:
        for day, action in ((9, "backup.create"), (10, "retention.sweep"), (11, "retention.rule_set")):
            await audit.record(
                s,
                org_id=world.org_id,
                actor=SYSTEM if action != "backup.create" else CLI,
                action=action,
                now=datetime(2026, 3, day, 23, 59, 59, tzinfo=UTC),
                object_kind="test",
                object_id=f"obj{day}",
            )

    async def shown(query: str) -> list[str]:
        page = await world.client.get(f"/audit?{query}", headers=HTML)
        assert page.status_code == 200, page.text
        return _actions(page.text)

    assert set(await shown("action=conversation.open")) == {"conversation.open"}
    assert await shown("action=retention") == ["retention.rule_set", "retention.sweep"]  # newest first
    assert await shown("action=retention.sweep") == ["retention.sweep"]
    assert await shown("action=retent") == []  # a prefix is a whole part of the name
    assert await shown("action=Login") == ["login.success", "login.success"]  # staff, then admin
    by_staff = await shown(f"actor={world.staff_email.upper()}")
    assert by_staff and set(by_staff) == {"login.success", "conversation.open"}
    by_system = await shown("actor=system")
    assert {"retention.rule_set", "retention.sweep"} <= set(by_system)
    assert not {"backup.create", "login.success", "conversation.open"} & set(by_system)
    assert await shown("actor=cli") == ["backup.create"]
    assert await shown(f"object={cid}") == ["conversation.open"]
    assert await shown("from=2026-03-10&to=2026-03-10") == ["retention.sweep"]
    assert await shown("from=2026-03-10&to=2026-03-11&actor=system") == [
        "retention.rule_set",
        "retention.sweep",
    ]
    assert await shown("to=2026-03-09") == ["backup.create"]
    unknown = await world.client.get("/audit?actor=niemand@klinikum.test", headers=HTML)
    assert unknown.status_code == 400 and _seqs(unknown.text) == []
    assert 'data-error-code="unknown_actor"' in unknown.text
    bad_date = await world.client.get("/audit?from=11.03.2026", headers=HTML)
    assert bad_date.status_code == 400 and 'data-error-code="bad_date"' in bad_date.text


async def test_pages_of_a_hundred_with_a_link_to_older_entries(world):
    await _as(world, world.admin_email)
    async with world.services.db.transaction() as s:
        for i in range(130):
            await audit.record(
                s, org_id=world.org_id, actor=SYSTEM, action="test.tick", now=world.services.clock.now(),
                object_id=str(i),
            )  # fmt: skip
    first = await world.client.get("/audit?action=test", headers=HTML)
    seqs = _seqs(first.text)
    assert len(seqs) == 100 and seqs == sorted(seqs, reverse=True)
    older = re.search(r'<a href="([^"]+)" rel="next" data-older>', first.text).group(1).replace("&amp;", "&")
    assert "action=test" in older and f"before={seqs[-1]}" in older
    second = await world.client.get(older, headers=HTML)
    rest = _seqs(second.text)
    assert len(rest) == 30 and max(rest) < min(seqs)
    assert "data-older" not in second.text


def _csv_rows(body: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body)))


async def test_the_export_holds_the_filtered_entries_and_is_itself_recorded(world):
    cid = await _opened_conversation(world)
    await world.client.get(f"/conversations/{cid}", headers=HTML)  # a second opening
    await _auditor(world)
    await _as(world, AUDITOR_EMAIL)
    got = await world.client.get(f"/audit/export?format=json&action=conversation.open&object={cid}")
    assert got.status_code == 200
    assert got.headers["content-disposition"].startswith('attachment; filename="audit-')
    assert got.headers["x-audit-count"] == "2" and got.headers["x-audit-truncated"] == "false"
    doc = got.json()
    assert (doc["count"], doc["truncated"], doc["org_id"]) == (2, False, world.org_id)
    assert [e["action"] for e in doc["entries"]] == ["conversation.open"] * 2
    assert {e["object_id"] for e in doc["entries"]} == {cid}
    assert {e["actor_email"] for e in doc["entries"]} == {world.staff_email}
    for e in doc["entries"]:  # anyone can recompute each entry's hash from the file alone
        assert audit.chain_hash(e["prev_hash"], e) == e["hash"]

    csv_got = await world.client.get(f"/audit/export?format=csv&action=conversation.open&object={cid}")
    assert csv_got.headers["content-type"].startswith("text/csv")
    rows = _csv_rows(csv_got.text)
    assert [int(r["seq"]) for r in rows] == [e["seq"] for e in doc["entries"]]
    assert [r["hash"] for r in rows] == [e["hash"] for e in doc["entries"]]
    assert [json.loads(r["details"]) for r in rows] == [e["details"] for e in doc["entries"]]

    exports = await _entries(world, action="audit.export")
    assert [e.details["format"] for e in exports] == ["json", "csv"]
    assert exports[0].actor_id != world.staff_id and exports[0].actor_kind == "staff"
    assert exports[0].details == {
        "format": "json",
        "count": 2,
        "truncated": False,
        "filters": {"action": "conversation.open", "object_id": cid},
    }


@pytest.mark.dsk("II.2")
async def test_an_unfiltered_export_links_every_entry_to_the_one_before(world):
    await _opened_conversation(world)
    await _as(world, world.admin_email)
    doc = (await world.client.get("/audit/export?format=json")).json()
    entries = doc["entries"]
    assert len(entries) >= 4 and [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert entries[0]["prev_hash"] == GENESIS
    for before, after in itertools.pairwise(entries):
        assert after["prev_hash"] == before["hash"]
    # The export's own entry came after the entries it covers.
    (recorded,) = await _entries(world, action="audit.export")
    assert recorded.seq == entries[-1]["seq"] + 1 and recorded.details["count"] == len(entries)
    rows = _csv_rows((await world.client.get("/audit/export")).text)  # CSV is the default
    assert [int(r["seq"]) for r in rows] == [e["seq"] for e in entries] + [recorded.seq]


async def test_a_capped_export_has_the_newest_entries_and_says_so(world, monkeypatch):
    await _as(world, world.admin_email)
    async with world.services.db.transaction() as s:
        for i in range(7):
            await audit.record(
                s, org_id=world.org_id, actor=SYSTEM, action="test.tick", now=world.services.clock.now(),
                object_id=str(i),
            )  # fmt: skip
    monkeypatch.setattr(audit_ui, "EXPORT_LIMIT", 3)
    monkeypatch.setattr(audit_ui, "EXPORT_BATCH", 2)  # and read in several batches
    got = await world.client.get("/audit/export?format=json&action=test.tick")
    doc = got.json()
    assert got.headers["x-audit-truncated"] == "true" and doc["truncated"] is True
    assert [e["object_id"] for e in doc["entries"]] == ["4", "5", "6"]
    csv_got = await world.client.get("/audit/export?format=csv&action=test.tick")
    assert csv_got.headers["x-audit-truncated"] == "true"
    assert [r["object_id"] for r in _csv_rows(csv_got.text)] == ["4", "5", "6"]
    assert [e.details["truncated"] for e in await _entries(world, action="audit.export")] == [True, True]
    assert (await world.client.get("/audit/export?format=xml")).status_code == 400


async def test_another_organisations_admin_sees_none_of_these_entries(world):
    cid = await _opened_conversation(world)
    other_org = await world.add_other_org("admin@andere.test", role="admin")
    await _as(world, "admin@andere.test")
    page = await world.client.get("/audit", headers=HTML)
    assert page.status_code == 200
    assert "login.success" in _actions(page.text)  # their own login
    assert "conversation.open" not in _actions(page.text)
    assert cid not in page.text and world.staff_email not in page.text
    assert _seqs((await world.client.get(f"/audit?object={cid}", headers=HTML)).text) == []
    other_actor = await world.client.get(f"/audit?actor={world.staff_email}", headers=HTML)
    assert other_actor.status_code == 400 and _seqs(other_actor.text) == []
    doc = (await world.client.get("/audit/export?format=json")).json()
    assert {e["chain"] for e in doc["entries"]} == {other_org}
    assert cid not in json.dumps(doc)
    # Their export is recorded in their own chain, not in ours.
    assert await _entries(world, action="audit.export") == []


# The state-changing routes an auditor may use: their own session and language, nothing else.
AUDITOR_MAY_POST = {"/login", "/logout", "/lang", "/webhooks/whatsapp/{channel_id}"}


async def test_the_auditor_reads_everything_and_changes_nothing(world):
    cid = await _opened_conversation(world)
    async with world.services.db.transaction() as s:
        some_id = (await s.execute(select(AuditEvent.id))).scalars().first()
    auditor_id = await _auditor(world)
    await _as(world, AUDITOR_EMAIL)
    page = await world.client.get(f"/conversations/{cid}", headers=HTML)
    assert page.status_code == 200 and "Ich habe eine Frage" in page.text
    token = csrf_of(page.text)
    assert (await world.client.get("/audit", headers=HTML)).status_code == 200
    # Their reading is recorded like everyone's.
    assert [e.actor_id for e in await _entries(world, action="conversation.open")][-1] == auditor_id
    before = len(await _entries(world))
    refused = []
    for template, route in all_routes(world.app.routes):
        methods = set(route.methods or ()) - {"GET", "HEAD"} if isinstance(route, Route) else set()
        if not methods or template in AUDITOR_MAY_POST:
            continue
        path = re.sub(
            r"{(\w+)}", lambda m: {"conversation_id": cid}.get(m.group(1), some_id or "x"), template
        )
        for method in methods:
            r = await world.client.request(
                method,
                path,
                headers={**HTML, "x-csrf-token": token},
                data={"csrf_token": token, "text": "x", "confirm": "yes", "tags": "x", "action": "enable"},
            )
            refused.append((template, r.status_code))
    assert len(refused) >= 15
    assert [r for r in refused if r[1] != 403] == []
    assert len(await _entries(world)) == before  # nothing was done, so nothing was recorded
    await world.settle()
    assert world.sim.business_messages(PNID) == []


async def test_the_actor_column_names_staff_and_says_when_nobody_is_known(world):
    await _as(world, world.admin_email)
    async with world.services.db.transaction() as s:
        await audit.record(
            s,
            org_id=world.org_id,
            actor=Actor("unknown"),
            action="login.failure",
            now=world.services.clock.now(),
        )
    page = await world.client.get("/audit?action=login", headers=HTML)
    assert "Unbekannt" in page.text and "Admin" in page.text
