"""The error-report scrubber (DSK I.8) as a pure function, and the SDK options it is installed with."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pforte.reporting.reporter import client_options
from pforte.reporting.scrubber import REDACTED, clean_text, scrub_breadcrumb, scrub_event

pytestmark = pytest.mark.dsk("I.8")

SECRETS = [
    "Befund: Tumormarker erhöht",
    "Erika Mustermann",
    "+49 151 23456789",
    "4915123456789",
    "0151 2345 6789",
    "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0",
    "EAAGm0PX4ZCpsBAKZCZB1234567890",
    "sha256=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "pforte_session=Zq3xK9mWp2LrT7vYb4NcH8sD",
    "erika@example.org",
    "ward-3.klinik.internal",
    "203.0.113.7",
]


def planted_event() -> dict:
    """An event as sentry_sdk builds it, with a secret in every place one could hide."""
    s = SECRETS
    frame = {
        "filename": "pforte/web/ui/routes.py",
        "abs_path": "/home/erika.mustermann/pforte/web/ui/routes.py",
        "module": "pforte.web.ui.routes",
        "function": "send",
        "lineno": 321,
        "colno": 5,
        "in_app": True,
        "context_line": f"text = {s[0]!r}",
        "pre_context": [s[1]],
        "post_context": [s[2]],
        "vars": {"text": s[0], "name": s[1], "phone": s[2], "token": s[5]},
    }
    return {
        "event_id": "0123456789abcdef0123456789abcdef",
        "timestamp": datetime(2026, 11, 22, 9, 30, tzinfo=UTC),
        "level": "error",
        "platform": "python",
        "release": "pforte@0.1.0",
        "environment": s[1],
        "server_name": s[10],
        "message": s[0],
        "logentry": {"message": "sending %s to %s", "params": [s[0], s[2]]},
        "logger": "pforte.outbox",
        "transaction": f"/conversations/{s[3]}",
        "user": {"id": s[3], "username": s[1], "email": s[9], "ip_address": s[11]},
        "request": {
            "url": f"https://pforte.example/hook?phone={s[3]}",
            "method": "POST",
            "query_string": f"access_token={s[6]}",
            "headers": {
                "Authorization": s[5],
                "Cookie": s[8],
                "X-Hub-Signature-256": s[7],
                "X-Forwarded-For": s[11],
            },
            "cookies": {"pforte_session": s[8]},
            "data": {"text": s[0], "to": s[4]},
            "env": {"REMOTE_ADDR": s[11]},
        },
        "breadcrumbs": {"values": [{"category": "log", "message": s[0], "data": {"phone": s[2]}}]},
        "tags": {"patient": s[1]},
        "extra": {"body": s[0]},
        "contexts": {"runtime": {"name": "CPython"}, "chat": {"phone": s[4]}},
        "modules": {"pforte": "0.1.0"},
        "fingerprint": [s[1]],
        "threads": {"values": [{"stacktrace": {"frames": [frame]}}]},
        "exception": {
            "values": [
                {
                    "type": "KeyError",
                    "module": None,
                    "value": f"'{s[2]}'",
                    "mechanism": {"type": "generic", "handled": True, "data": {"x": s[1]}},
                    "stacktrace": {"frames": [frame]},
                },
                {
                    "type": "ChannelError",
                    "module": "pforte.channels.base",
                    "value": f"could not send {s[0]} to {s[1]} with {s[5]}",
                    "mechanism": {"type": "chained", "handled": False, "exception_id": 1, "parent_id": 0},
                    "stacktrace": {"frames": [frame, "not a frame", {"lineno": "7"}]},
                },
            ]
        },
    }


def test_every_planted_secret_is_gone_and_the_code_location_stays():
    out = scrub_event(planted_event(), {})
    dumped = json.dumps(out, default=str)
    assert [s for s in SECRETS if s in dumped] == []
    assert "Mustermann" not in dumped and "15123456789" not in dumped and "erika" not in dumped
    assert set(out) == {"event_id", "timestamp", "level", "platform", "release", "exception"}
    first, second = out["exception"]["values"]
    assert first == {
        "type": "KeyError",
        "mechanism": {"type": "generic", "handled": True},
        "stacktrace": {
            "frames": [
                {
                    "module": "pforte.web.ui.routes",
                    "function": "send",
                    "filename": "pforte/web/ui/routes.py",
                    "lineno": 321,
                    "in_app": True,
                }
            ]
        },
    }
    assert second["type"] == "ChannelError" and second["module"] == "pforte.channels.base"
    assert second["mechanism"] == {"type": "chained", "handled": False, "exception_id": 1, "parent_id": 0}
    assert len(second["stacktrace"]["frames"]) == 1  # the malformed frames are dropped
    assert out["release"] == "pforte@0.1.0" and out["level"] == "error"


def test_the_input_event_is_not_trusted_in_shape():
    event = planted_event()
    event["release"] = "pforte@0.1.0 +49 151 23456789"
    event["event_id"] = "Erika Mustermann"
    event["level"] = "error: Erika"
    out = scrub_event(event, {})
    assert "release" not in out and "event_id" not in out and "level" not in out


def test_events_without_an_exception_and_non_error_events_are_dropped():
    assert scrub_event({"message": "Erika Mustermann wrote", "level": "error"}, {}) is None
    assert scrub_event({**planted_event(), "type": "transaction"}, {}) is None
    assert scrub_event({"exception": {"values": ["junk"]}}, {}) is None


def test_no_breadcrumb_is_kept():
    assert (
        scrub_breadcrumb({"category": "log", "message": "Erika", "data": {"p": "+4915123456789"}}, {}) is None
    )


@pytest.mark.parametrize(
    "text",
    [
        "+49 151 23456789",
        "+4915123456789",
        "004915123456789",
        "0151 2345 6789",
        "0151/23456789",
        "(030) 1234-567",
        "030 12345678",
        "Bearer abc.def-ghi",
        "token abcdefg",
        "access_token=EAAGm0PX4ZCpsBA",
        "sha256=9f86d081884c7d",
        "session: 7f3a9c2e",
        "erika@example.org",
        "Zq3xK9mWp2LrT7vYb4NcH8sD",
    ],
)
def test_clean_text_blanks_numbers_tokens_and_addresses(text):
    cleaned = clean_text(f"before {text} after")
    assert text not in cleaned and REDACTED in cleaned
    assert cleaned.startswith("before ") and cleaned.endswith(" after")


@pytest.mark.parametrize(
    "text",
    ["pforte.channels.whatsapp.client", "send_message", "KeyError", "pforte/web/ui/routes.py", "line 1024"],
)
def test_clean_text_keeps_code_names(text):
    assert clean_text(text) == text


def test_the_sdk_is_set_up_to_collect_as_little_as_possible():
    opts = client_options("https://key12345@errors.example.org/1")
    assert opts["before_send"] is scrub_event and opts["before_breadcrumb"] is scrub_breadcrumb
    assert opts["default_integrations"] is False and opts["auto_enabling_integrations"] is False
    assert opts["integrations"] == [] and opts["max_breadcrumbs"] == 0
    assert opts["include_local_variables"] is False and opts["include_source_context"] is False
    assert opts["max_request_body_size"] == "never" and opts["traces_sample_rate"] is None
    assert opts["auto_session_tracking"] is False and opts["server_name"] == ""
    assert "send_default_pii" not in opts  # unset means off (and the option is deprecated)
