"""DSK I.11, IV.4: the compliance report follows the instance's own state, is saved and compared.

Each test changes one real thing (a setting, the error-reporting DSN, an audit row, a signing key)
through the same services the product uses and reads the row that must follow it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import timedelta

import pytest
from markupsafe import escape
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from pforte.audit.models import AuditEvent
from pforte.audit.service import CLI
from pforte.cli import app as cli_app
from pforte.compliance import evidence, render
from pforte.compliance import service as compliance
from pforte.compliance.catalog import IDS
from pforte.compliance.models import ComplianceReport
from pforte.crypto.models import SigningKey
from pforte.orgs import service as orgs
from pforte.outbox.models import Job
from pforte.reporting import service as reporting
from pforte.retention import service as retention

DSN_KEY = "0123456789abcdef"
DSN = f"https://{DSN_KEY}@errors.example.org/42"
# What seed_clinic and the simulator put into the database that a report must never repeat.
PERSONAL = [
    "admin@klinikum.test",
    "dr.weiss@klinikum.test",
    "Dr. Weiss",
    "Klinikum Test",
    "Station 3",
    "+49 30 1234567",
    "4915112345678",
    "Erika",
    "Mustermann",
]


async def _report(world, org_id: str | None = None, *, saving: bool = False):
    sv = world.services
    async with sv.db.transaction() as s:
        return await compliance.build(
            s,
            org_id=org_id or world.org_id,
            settings=sv.settings,
            now=sv.clock.now(),
            key_provider=sv.keys.provider,
            saving=saving,
        )


async def _save(world, report, trigger: str = "cli"):
    async with world.services.db.transaction() as s:
        return await compliance.save(s, org_id=report.org_id, report=report, trigger=trigger)


def _texts(row, lang: str = "en") -> str:
    return "\n".join(i.text.get(lang) for i in row.evidence)


def _expected_when_built(row_id: str) -> str:
    """A built row is "met" only if a test carries its marker (the rules say so)."""
    return "met" if evidence.load().get(row_id) else "partly"


@pytest.mark.dsk("I.11")
@pytest.mark.dsk("IV.4")
async def test_switching_retention_off_turns_i7_to_partly_and_the_diff_names_it(world):
    before = await _report(world, saving=True)
    await _save(world, before)
    assert before.row("I.7").status == "met"
    assert "180 days after their last activity" in _texts(before.row("I.7"))
    async with world.services.db.transaction() as s:
        await retention.set_org_retention(
            s, org_id=world.org_id, enabled=False, days=180, actor=CLI, now=world.services.clock.now()
        )
    after = await _report(world)
    row = after.row("I.7")
    assert row.status == "partly"
    assert "retention_enabled is off" in _texts(row)
    assert "retention_enabled ist aus" in _texts(row, "de")
    assert after.row("IV.8").status == "partly"
    changes = compliance.diff(before, after)
    assert "I.7" in changes.ids and "IV.8" in changes.ids
    (i7,) = [c for c in changes.changes if c.id == "I.7"]
    assert (i7.change, i7.status_before, i7.status_after) == ("changed", "met", "partly")
    assert any("switched off" in e for e in i7.evidence_added)
    # Nothing else moved: a row's counts and times (volatile sentences) do not count as changes.
    assert set(changes.ids) <= {"I.7", "IV.8", "I.12"}
    assert compliance.diff(after, await _report(world)).changes == ()


@pytest.mark.dsk("I.11")
async def test_enabled_error_reporting_shows_the_dsn_host_but_never_its_key(world):
    assert "Error reporting is off" in _texts((await _report(world)).row("I.8"))
    async with world.services.db.transaction() as s:
        await reporting.enable(session=s, dsn=DSN, actor=CLI, now=world.services.clock.now())
    report = await _report(world)
    row = report.row("I.8")
    assert row.status == _expected_when_built("I.8")
    assert "reports go to errors.example.org" in _texts(row)
    assert any("errors.example.org" in d.en for d in row.controller)
    assert "error_reporting" in _texts(report.row("I.12"))
    assert report.row("I.12").status == "partly"
    wire = render.to_json(report) + render.to_html(report, lang="de") + render.to_html(report, lang="en")
    assert "errors.example.org" in wire
    assert DSN_KEY not in wire and DSN not in wire


@pytest.mark.dsk("I.11")
async def test_ii1_says_plainly_that_whatsapp_encryption_ends_at_meta(world):
    row = (await _report(world)).row("II.1")
    assert row.status == "partly"
    text = _texts(row)
    assert f"Channel {world.channel_id}" in text
    assert "ends at the servers of Meta Platforms Ireland Ltd., not at ours" in text
    assert "own_server_encryption_only is off" in text
    assert "endet auf den Servern von Meta Platforms Ireland Ltd." in _texts(row, "de")
    async with world.services.db.transaction() as s:
        await orgs.update_settings(
            session=s,
            org_id=world.org_id,
            changes={"own_server_encryption_only": True},
            actor=CLI,
            now=world.services.clock.now(),
        )
    row = (await _report(world)).row("II.1")
    assert (
        row.status == "partly"
    )  # staff cannot send there now, but the channel's encryption still ends at Meta
    assert "own_server_encryption_only is on" in _texts(row)


@pytest.mark.dsk("I.11")
async def test_i11_reflects_a_verified_chain_and_a_tampered_audit_row_turns_it_to_not_met(world):
    async with world.services.db.transaction() as s:
        for value in (True, False):
            await orgs.update_settings(
                session=s,
                org_id=world.org_id,
                changes={"send_read_receipts": value},
                actor=CLI,
                now=world.services.clock.now(),
            )
    row = (await _report(world)).row("I.11")
    assert row.status == "met"
    assert "The hash chain of the audit log (this organisation) verified intact." in _texts(row)
    assert row.tests and all(t.startswith("tests/") for t in row.tests)
    async with world.services.db.transaction() as s:
        await s.execute(
            update(AuditEvent).where(AuditEvent.chain == world.org_id, AuditEvent.seq == 1).values(action="x")
        )
    row = (await _report(world)).row("I.11")
    assert row.status == "not_met"
    assert "(this organisation) is broken at entry 1" in _texts(row)


@pytest.mark.dsk("I.11")
async def test_i5_needs_a_valid_unrevoked_signing_key(world):
    assert (await _report(world)).row("I.5").status == "not_met"
    now = world.services.clock.now()
    key = SigningKey(
        org_id=world.org_id,
        public_key="ab" * 32,
        fingerprint="cd" * 32,
        kek_id="kek",
        private_wrapped=b"wrapped",
        created_by=world.staff_id,
        created_at=now,
        valid_from=now - timedelta(days=1),
        valid_until=now + timedelta(days=30),
    )
    async with world.services.db.transaction() as s:
        s.add(key)
    row = (await _report(world)).row("I.5")
    assert row.status == _expected_when_built("I.5")
    assert "Active signing key cdcdcdcdcdcdcdcd…" in _texts(row)
    async with world.services.db.transaction() as s:
        await s.execute(
            update(SigningKey).where(SigningKey.id == key.id).values(revoked_at=now, private_wrapped=None)
        )
    row = (await _report(world)).row("I.5")
    assert row.status == "not_met" and "Revoked keys: 1" in _texts(row)


@pytest.mark.dsk("IV.4")
async def test_the_scheduled_job_saves_one_report_per_organisation(world):
    other = await world.add_other_org("admin@andere.test", role="admin")
    sv = world.services
    async with sv.db.transaction() as s:  # the set-up's report (if any) was an interval ago
        await s.execute(
            update(Job)
            .where(Job.kind == "compliance_report")
            .values(updated_at=sv.clock.now() - timedelta(days=2))
        )
        await s.execute(update(ComplianceReport).values(created_at=sv.clock.now() - timedelta(days=2)))
        before = {org_id: await compliance.count(s, org_id=org_id) for org_id in (world.org_id, other)}
    await sv.outbox.run_periodic(force=True)  # the tick enqueues the job ...
    await sv.outbox.drain()  # ... a worker runs it
    async with sv.db.transaction() as s:
        after = {org_id: await compliance.count(s, org_id=org_id) for org_id in (world.org_id, other)}
        rows = list(
            (
                await s.execute(select(ComplianceReport).where(ComplianceReport.trigger == "schedule"))
            ).scalars()
        )
        newest = {org_id: await compliance.latest(s, org_id=org_id) for org_id in (world.org_id, other)}
        jobs = (
            await s.execute(select(func.count()).select_from(Job).where(Job.kind == "compliance_report"))
        ).scalar()
    assert after == {org_id: n + 1 for org_id, n in before.items()}
    assert {r.org_id for r in rows} >= {world.org_id, other}
    for org_id, saved in newest.items():
        assert saved is not None and saved.trigger == "schedule" and saved.report.org_id == org_id
        assert [r.id for r in saved.report.rows] == list(IDS)
        assert saved.report.row("IV.4").status == _expected_when_built("IV.4")
    stored = json.dumps([r.report for r in rows], ensure_ascii=False)
    assert not [p for p in PERSONAL if p in stored]
    # The same interval again: the tick finds the finished job and adds no second one.
    await sv.outbox.run_periodic(force=True)
    await sv.outbox.drain()
    async with sv.db.transaction() as s:
        again = (
            await s.execute(select(func.count()).select_from(Job).where(Job.kind == "compliance_report"))
        ).scalar()
        assert await compliance.count(s, org_id=world.org_id) == after[world.org_id]
    assert again == jobs


@pytest.fixture
def cli(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("PFORTE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PFORTE_DATABASE_URL", db_url)
    runner = CliRunner()

    def run(*args: str, ok: bool = True):
        result = runner.invoke(cli_app, list(args))
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


@pytest.mark.dsk("I.11")
@pytest.mark.dsk("IV.4")
def test_the_command_prints_json_writes_a_standalone_page_and_saves_with_what_changed(cli, tmp_path):
    cli("org", "create", "--name", "Praxis Dr. Roth", "--slug", "praxis-roth")
    doc = json.loads(cli("compliance", "report", "--org", "praxis-roth").stdout)
    assert [r["id"] for r in doc["rows"]] == list(IDS)
    assert doc["org"]["slug"] == "praxis-roth" and "Roth" not in json.dumps(doc["rows"])
    assert sum(doc["summary"].values()) == len(IDS)
    assert {r["status"] for r in doc["rows"]} <= {"met", "partly", "not_met", "organisational"}
    assert doc["record_of_processing"][0]["key"] == "controller"

    page = tmp_path / "report.html"
    out = cli(
        "compliance", "report", "--org", "praxis-roth", "--format", "html", "--lang", "en", "--out", str(page)
    )
    assert f"wrote {page}" in out.stdout
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "DSK compliance report" in html
    assert f'content="{escape(render.CSP)}"' in html
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)  # the one style sheet, allowed by hash
    assert "sha256-" + base64.b64encode(hashlib.sha256(style.encode()).digest()).decode() in render.CSP
    assert "<script" not in html and "<link" not in html and " src=" not in html
    assert 'id="row-II.4"' in html and "Record of processing activities" in html

    first = cli("compliance", "report", "--org", "praxis-roth", "--save", "--out", str(tmp_path / "a.json"))
    assert "saved report" in first.stdout and "no earlier saved report" in first.stdout
    cli("retention", "set", "--org", "praxis-roth", "--off")
    second = cli("compliance", "report", "--org", "praxis-roth", "--save", "--out", str(tmp_path / "b.json"))
    assert "changed since" in second.stdout and "I.7: met -> partly" in second.stdout
    saved = json.loads((tmp_path / "b.json").read_text())
    assert "I.7" in [c["id"] for c in saved["changes_since_previous"]["changes"]]

    bad = cli("compliance", "report", "--org", "praxis-roth", "--format", "pdf", ok=False)
    assert bad.exit_code == 2 and "--format must be json or html" in bad.output
    missing = cli("compliance", "report", "--org", "nope", ok=False)
    assert missing.exit_code == 2 and "organisation not found" in missing.output
