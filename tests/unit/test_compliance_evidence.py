"""The compliance report's pure parts: the evidence file, every catalog row, the rules and the diff."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from pforte.compliance import evidence, record, rules
from pforte.compliance.catalog import BY_ID, IDS
from pforte.compliance.rules import ChainFacts, ChannelFacts, Facts, SigningFacts, T
from pforte.compliance.schemas import Report
from pforte.compliance.service import assemble, diff
from pforte.orgs.service import DEFAULT_SETTINGS

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
ALL_TESTED = {i: [f"tests/unit/test_x.py::test_{i}"] for i in IDS}


def facts(**changes) -> Facts:
    """An organisation with one WhatsApp channel, everything at its defaults, every row tested."""
    base = Facts(
        now=NOW,
        org_id="o1",
        org_slug="klinik",
        kek_id="kek-1",
        version="0.1.0",
        schema="0005",
        dialect="postgresql",
        organisations=1,
        settings=dict(DEFAULT_SETTINGS),
        defaults=dict(DEFAULT_SETTINGS),
        deviations=(),
        notice_version=2,
        notice_published_at=NOW - timedelta(days=3),
        notice_url="https://pforte.example/privacy/klinik",
        roles={"admin": 1, "staff": 4},
        inactive_accounts=0,
        session_idle_minutes=30,
        session_absolute_hours=12,
        session_metadata_days=7,
        failed_login_days=7,
        contacts=12,
        channel_rules={},
        tag_rules=(),
        holds={},
        last_sweep_at=NOW - timedelta(minutes=20),
        sweep_seconds=3600.0,
        error_reporting=False,
        error_reporting_host=None,
        error_reporting_since=None,
        channels=(
            ChannelFacts(
                id="c1",
                kind="whatsapp",
                label=T("WhatsApp", "WhatsApp"),
                encryption_ends="provider",
                operator="Meta Platforms Ireland Ltd.",
                operator_role=T("processor", "Auftragsverarbeiter"),
                provider_retention=T("up to 30 days", "bis zu 30 Tage"),
                storage_region="DE",
                storage=T("Local Storage DE", "Local Storage DE"),
                storage_detail=T("kept in Germany", "in Deutschland gespeichert"),
                state="UP",
            ),
        ),
        signing=SigningFacts(active=1, fingerprint="ab" * 8, valid_until=NOW + timedelta(days=300)),
        audit=ChainFacts(ok=True, entries=40),
        instance_audit=ChainFacts(ok=True, entries=3),
        checkpoints=1,
        last_checkpoint_seq=38,
        backup_recipient="sha256:aaaa:bbbb:cccc:dddd",
        backup_recipient_damaged=False,
        last_backup_at=NOW - timedelta(hours=5),
        key_provider="FileKeyProvider",
        key_file_private=True,
        https=True,
        reports_saved=10,
        last_saved_at=NOW - timedelta(hours=3),
        report_seconds=86400.0,
        evidence=ALL_TESTED,
    )
    return replace(base, **changes)


def _status(f: Facts, row_id: str) -> str:
    return assemble(f).row(row_id).status


# -- the evidence file -----------------------------------------------------------------------------


@pytest.mark.dsk("I.11")
def test_the_committed_evidence_file_is_current():
    """Fails when a dsk marker was added, moved or removed without ``make compliance-evidence``."""
    committed = evidence.committed_path().read_text(encoding="utf-8")
    assert committed == evidence.dumps(evidence.scan()), (
        "evidence.json is stale: run make compliance-evidence"
    )
    assert evidence.load() == json.loads(committed)


@pytest.mark.dsk("I.11")
def test_every_marker_names_a_catalog_row():
    assert sorted(set(evidence.scan()) - set(IDS)) == []


@pytest.mark.dsk("I.11")
def test_the_scanner_reads_function_class_and_module_markers(tmp_path):
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    (tmp_path / "tests" / "unit" / "test_demo.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from pytest import mark

            pytestmark = [pytest.mark.browser, pytest.mark.dsk("I.12")]

            @pytest.mark.dsk("I.7")
            @pytest.mark.dsk("IV.8")
            async def test_one():
                pass

            @mark.dsk("II.2", "II.3")
            def test_two():
                pass

            def helper():
                pass

            @pytest.mark.dsk("I.1")
            class TestGroup:
                @pytest.mark.dsk("I.2")
                def test_inner(self):
                    pass

            @pytest.mark.other("I.5")
            def test_three():
                pass
            """
        )
    )
    (tmp_path / "tests" / "helpers.py").write_text(
        'import pytest\n@pytest.mark.dsk("I.9a")\ndef test_x(): pass\n'
    )
    found = evidence.scan(tmp_path)
    f = "tests/unit/test_demo.py::"
    assert found == {
        "I.1": [f + "TestGroup::test_inner"],
        "I.2": [f + "TestGroup::test_inner"],
        "I.7": [f + "test_one"],
        "I.12": sorted(f + n for n in ("test_one", "test_two", "test_three", "TestGroup::test_inner")),
        "II.2": [f + "test_two"],
        "II.3": [f + "test_two"],
        "IV.8": [f + "test_one"],
    }
    out = tmp_path / "evidence.json"
    assert evidence.main(["--root", str(tmp_path), "--out", str(out)]) == 0
    assert evidence.main(["--root", str(tmp_path), "--out", str(out), "--check"]) == 0
    out.write_text("{}\n")
    assert evidence.main(["--root", str(tmp_path), "--out", str(out), "--check"]) == 1


# -- rows ------------------------------------------------------------------------------------------


@pytest.mark.dsk("I.11")
def test_every_catalog_id_appears_in_the_report_once_in_catalog_order():
    report = assemble(facts())
    assert [r.id for r in report.rows] == list(IDS)
    assert sum(report.counts.values()) == len(IDS)
    for row in report.rows:
        entry = BY_ID[row.id]
        assert (row.level, row.kind, row.requirement) == (entry.level, entry.kind, entry.requirement)
        assert row.evidence, row.id
        assert (row.status == "organisational") == (entry.kind == "organisational"), row.id
        assert all(i.text.en and i.text.de for i in row.evidence), row.id
    organisational = {r.id for r in report.rows if r.status == "organisational"}
    assert organisational == {"III.1", "III.2", "III.3", "IV.1", "IV.3", "IV.7"}
    assert all(r.controller for r in report.rows if r.id in organisational)


@pytest.mark.dsk("I.11")
def test_rows_whose_feature_is_not_built_say_so():
    report = assemble(facts())
    for row_id in ("I.3c", "I.6", "I.9c", "I.10", "II.4"):
        assert report.row(row_id).status == "not_met", row_id
        assert report.row(row_id).gaps, row_id


@pytest.mark.dsk("I.11")
def test_a_built_row_without_a_test_is_at_most_partly():
    untested = assemble(facts(evidence={}))
    assert not [r.id for r in untested.rows if r.status == "met"]
    assert 'dsk("I.7")' in " ".join(i.text.en for i in untested.row("I.7").evidence)
    assert untested.row("I.7").tests == ()


@pytest.mark.dsk("I.11")
def test_states_that_weaken_a_row():
    assert _status(facts(), "I.1") == "met"
    assert _status(facts(notice_version=None), "I.1") == "not_met"
    assert _status(facts(), "I.5") == "met"
    assert _status(facts(signing=SigningFacts(revoked=1)), "I.5") == "not_met"
    assert _status(facts(signing=replace(facts().signing, unbound=1)), "I.5") == "partly"
    assert _status(facts(), "I.7") == "met"
    off = {**DEFAULT_SETTINGS, "retention_enabled": False}
    assert _status(facts(settings=off), "I.7") == "partly"
    assert _status(facts(settings=off), "IV.8") == "partly"
    assert _status(facts(), "I.9a") == "met"
    assert _status(facts(last_backup_at=NOW - timedelta(days=8)), "I.9a") == "partly"
    assert _status(facts(last_backup_at=None), "I.9a") == "partly"
    assert _status(facts(backup_recipient=None, last_backup_at=None), "I.9a") == "not_met"
    assert _status(facts(backup_recipient=None), "I.9b") == "partly"
    assert _status(facts(), "I.11") == "met"
    broken = ChainFacts(ok=False, entries=5, first_bad_seq=5, problem="entry 5 was altered")
    assert _status(facts(audit=broken), "I.11") == "not_met"
    assert _status(facts(instance_audit=broken), "I.11") == "not_met"
    assert _status(facts(), "I.12") == "met"
    assert _status(facts(deviations=("send_read_receipts",)), "I.12") == "partly"
    assert _status(facts(error_reporting=True, error_reporting_host="errors.example.org"), "I.12") == "partly"
    assert _status(facts(key_file_private=False), "I.3b") == "partly"
    assert _status(facts(), "IV.4") == "met"
    assert _status(facts(last_saved_at=NOW - timedelta(days=3)), "IV.4") == "partly"
    assert _status(facts(last_saved_at=None, reports_saved=0), "IV.4") == "partly"
    assert _status(facts(), "IV.6") == "met"
    us = replace(facts().channels[0], storage_region="default")
    assert _status(facts(channels=(us,)), "IV.6") == "partly"


@pytest.mark.dsk("I.11")
def test_ii1_is_met_only_when_every_channel_is_encrypted_up_to_our_own_server():
    assert _status(facts(), "II.1") == "partly"
    assert _status(facts(channels=()), "II.1") == "partly"
    own = replace(facts().channels[0], encryption_ends="own_server")
    assert _status(facts(channels=(own,)), "II.1") == "met"
    assert _status(facts(channels=(own,), https=False), "II.1") == "partly"


@pytest.mark.dsk("IV.3")
def test_the_record_of_processing_names_meta_and_the_retention_periods():
    sections = {s.key: s for s in record.build(facts(channel_rules={"c1": 30}, tag_rules=(None,)))}
    assert list(sections) == [
        "controller",
        "purposes",
        "data_subjects",
        "data_categories",
        "recipients",
        "transfers",
        "retention",
        "measures",
    ]
    recipients = " ".join(t.en for t in sections["recipients"].items)
    assert "Meta Platforms Ireland Ltd., processor, for channel c1" in recipients
    retention = " ".join(t.en for t in sections["retention"].items)
    assert "180 days after the last activity" in retention
    assert "Conversations on channel c1: 30 days." in retention
    assert "(1 rules): never automatically" in retention
    assert "to be completed" in " ".join(t.en for t in sections["controller"].items)


# -- stored form and diff --------------------------------------------------------------------------


@pytest.mark.dsk("IV.4")
def test_a_report_survives_its_json_form():
    report = assemble(facts())
    again = Report.from_dict(json.loads(json.dumps(report.as_dict())))
    assert again == report


@pytest.mark.dsk("IV.4")
def test_the_diff_names_changed_rows_and_ignores_counts_and_times():
    before = assemble(facts())
    later = assemble(
        facts(
            now=NOW + timedelta(days=1),
            contacts=99,
            audit=ChainFacts(ok=True, entries=400),
            last_sweep_at=NOW + timedelta(hours=23),
            reports_saved=11,
        )
    )
    assert diff(before, later).changes == ()
    off = assemble(facts(settings={**DEFAULT_SETTINGS, "retention_enabled": False}))
    changes = diff(before, off)
    assert changes.previous_at == NOW
    assert changes.ids == ["I.7", "IV.8"]
    i7 = changes.changes[0]
    assert (i7.change, i7.status_before, i7.status_after) == ("changed", "met", "partly")
    assert any("switched off" in e for e in i7.evidence_added)
    assert any("conversations are deleted 180 days" in e for e in i7.evidence_removed)
    new_test = assemble(facts(evidence={**ALL_TESTED, "I.2": ["tests/a.py::test_b"]}))
    (i2,) = diff(before, new_test).changes
    assert i2.status_before == i2.status_after == "met" and i2.tests_added == ("tests/a.py::test_b",)
    fewer = replace(before, rows=before.rows[:-1])
    assert [(c.id, c.change) for c in diff(fewer, before).changes] == [("IV.9", "added")]
    assert [(c.id, c.change) for c in diff(before, fewer).changes] == [("IV.9", "removed")]
    assert diff(None, before).previous_at is None and diff(None, before).changes == ()


def test_rules_cover_exactly_the_catalog():
    assert set(rules.RULES) == set(IDS)
