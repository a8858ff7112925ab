"""The in-chat privacy decisions and the staff-send gate, as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pforte.privacy.policy import (
    Incoming,
    OrgPrivacy,
    PatientPrivacy,
    button_id,
    classify,
    decide,
    may_concern_privacy,
    staff_send_block,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
ORG = OrgPrivacy(
    notice_version=2,
    consent_required=True,
    notice_keywords=("Datenschutz", "privacy"),
    withdraw_keywords=("STOP", "Widerruf"),
)


def _patient(state="none", version=None, at=None, sent=None) -> PatientPrivacy:
    return PatientPrivacy(
        consent_state=state, consent_version=version, consent_at=at, notice_version_sent=sent
    )


def _text(t: str) -> Incoming:
    return Incoming(type="text", text=t, button_id=None)


def _button(kind: str, version: int) -> Incoming:
    return Incoming(type="interactive", text="Ja", button_id=button_id(kind, version))


def test_a_new_patient_gets_the_notice_then_the_request():
    p = _patient()
    d = decide(_text("Hallo"), ORG, p, NOW)
    assert d.actions == ["send_notice", "send_request"]
    assert (p.consent_state, p.consent_version, p.notice_version_sent) == ("requested", 2, 2)


@pytest.mark.parametrize("text", ["STOP", "stop", " Stop! ", "widerruf", "WIDERRUF."])
def test_withdrawal_keywords_match_loosely(text):
    assert classify(_text(text), ORG, _patient("given", 2, NOW, 2))[0] == "withdraw"


@pytest.mark.parametrize("text", ["Bitte nicht stoppen", "STOP the pain please", "Stopper"])
def test_a_keyword_inside_a_sentence_is_not_a_withdrawal(text):
    assert classify(_text(text), ORG, _patient("given", 2, NOW, 2))[0] == "other"


def test_yes_for_the_current_version_is_given_and_a_second_tap_changes_nothing():
    p = _patient("requested", 2, NOW, 2)
    assert decide(_button("pforte:consent:yes", 2), ORG, p, NOW).actions == ["record_given", "confirm_given"]
    assert decide(_button("pforte:consent:yes", 2), ORG, p, NOW).actions == []


def test_yes_for_an_older_version_asks_again():
    p = _patient("requested", 1, NOW, 1)
    d = decide(_button("pforte:consent:yes", 1), ORG, p, NOW)
    assert d.actions == ["send_notice", "explain_outdated", "send_request"]
    assert p.consent_state == "requested" and p.consent_version == 2


def test_plain_yes_counts_only_while_a_request_is_open():
    assert classify(_text("Ja"), ORG, _patient("requested", 2, NOW, 2)) == ("yes", 2)
    assert classify(_text("Ja"), ORG, _patient("given", 2, NOW, 2))[0] == "other"
    assert classify(_text("Ja"), ORG, _patient("withdrawn", 2, NOW, 2))[0] == "other"


def test_after_withdrawal_the_patient_is_asked_again_at_most_once_a_day():
    p = _patient("withdrawn", 2, NOW, 2)
    assert decide(_text("Hallo"), ORG, p, NOW + timedelta(hours=1)).actions == []
    assert decide(_text("Hallo"), ORG, p, NOW + timedelta(hours=25)).actions == ["send_request"]
    assert decide(_text("Hallo"), ORG, p, NOW + timedelta(hours=26)).actions == []


def test_the_notice_keyword_resends_the_notice_only():
    p = _patient("given", 2, NOW, 2)
    assert decide(_text("Datenschutz"), ORG, p, NOW).actions == ["send_notice"]
    assert p.consent_state == "given"


def test_without_a_published_notice_the_request_still_goes_out():
    org = OrgPrivacy(None, True, ("datenschutz",), ("stop",))
    d = decide(_text("Hallo"), org, _patient(), NOW)
    assert d.actions == ["send_request"]


def test_with_the_consent_step_off_only_the_notice_is_sent():
    org = OrgPrivacy(1, False, ("datenschutz",), ("stop",))
    assert decide(_text("Hallo"), org, _patient(), NOW).actions == ["send_notice"]


def test_the_hot_path_precheck_is_false_for_a_consented_patients_ordinary_text():
    assert not may_concern_privacy(
        text="Danke", type_="text", org=ORG, consent_state="given", notice_version_sent=2
    )
    assert may_concern_privacy(
        text="STOP", type_="text", org=ORG, consent_state="given", notice_version_sent=2
    )
    assert may_concern_privacy(
        text="Danke", type_="text", org=ORG, consent_state="given", notice_version_sent=1
    )
    assert may_concern_privacy(
        text=None, type_="interactive", org=ORG, consent_state="given", notice_version_sent=2
    )


def test_the_gate_names_the_reason():
    kw = {"consent_required": True, "own_server_only": False, "encryption_ends_at_own_server": False}
    assert staff_send_block(consent_state="given", **kw) is None
    assert staff_send_block(consent_state="withdrawn", **kw).code == "consent_withdrawn"
    assert staff_send_block(consent_state="none", **kw).code == "consent_missing"
    assert (
        staff_send_block(
            consent_required=False,
            consent_state="given",
            own_server_only=True,
            encryption_ends_at_own_server=False,
        ).code
        == "channel_not_own_server"
    )
    assert (
        staff_send_block(
            consent_required=False,
            consent_state="none",
            own_server_only=True,
            encryption_ends_at_own_server=True,
        )
        is None
    )
