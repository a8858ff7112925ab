"""Pure policies: delivery-state merging, send pacing, window, settings, language, log scrubbing."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from pforte.clock import FakeClock
from pforte.config import load_settings
from pforte.conversations.service import window_state
from pforte.conversations.status import MessageState, merge
from pforte.errors import ConfigError
from pforte.i18n import negotiate, translations
from pforte.logs import JsonFormatter
from pforte.outbox.ratelimit import Pacer
from pforte.outbox.worker import backoff_seconds

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _apply(state: MessageState, status: str, minute: int, code: int | None = None) -> MessageState:
    delta = merge(state, status, T0 + timedelta(minutes=minute), code)
    fields = {
        k: delta.get(k, getattr(state, k))
        for k in ("status", "sent_at", "delivered_at", "read_at", "failed_at")
    }
    return MessageState(**fields)


@pytest.mark.dsk("II.2")
def test_statuses_never_downgrade_whatever_the_order():
    s = MessageState(status="accepted")
    s = _apply(s, "read", 3)
    s = _apply(s, "delivered", 2)
    s = _apply(s, "sent", 1)
    assert s.status == "read"
    assert (s.sent_at, s.delivered_at, s.read_at) == (
        T0 + timedelta(minutes=1),
        T0 + timedelta(minutes=2),
        T0 + timedelta(minutes=3),
    )


def test_read_without_delivered_is_read():
    assert _apply(MessageState(status="sent"), "read", 1).status == "read"


def test_failed_ends_an_undelivered_message_but_not_a_delivered_one():
    assert merge(MessageState(status="sent"), "failed", T0, 131047)["error_reason"] == "needs_template"
    assert merge(MessageState(status="delivered"), "failed", T0, 131026) == {}
    failed = MessageState(status="failed", failed_at=T0)
    assert "status" not in merge(failed, "delivered", T0)


def test_unknown_status_changes_nothing():
    assert merge(MessageState(status="sent"), "warning", T0) == {}


def test_window_open_for_24_hours_after_the_patients_last_message():
    assert window_state(None, T0) == (False, None)
    assert window_state(T0, T0 + timedelta(hours=23, minutes=59))[0] is True
    assert window_state(T0, T0 + timedelta(hours=24))[0] is False


async def test_pacer_never_starts_more_than_rate_in_any_second():
    clock = FakeClock()
    pacer = Pacer(10, clock, margin=0.0)
    starts = []
    for _ in range(35):
        ticket = await pacer.acquire()
        starts.append(clock.monotonic())
        ticket.done()
    for i, t in enumerate(starts):
        assert sum(1 for u in starts[i:] if u < t + 1.0) <= 10
    # 34 gaps of 0.1 s, plus the window's few milliseconds of slack after every tenth send
    assert 3.4 <= starts[-1] - starts[0] < 3.45


async def test_pacer_spacing_holds_across_concurrent_callers():
    clock = FakeClock()
    pacer = Pacer(5, clock, margin=0.0)
    starts: list[float] = []

    async def one() -> None:
        ticket = await pacer.acquire()
        starts.append(clock.monotonic())
        ticket.done()

    await asyncio.gather(*(one() for _ in range(10)))
    assert len(starts) == 10


def test_backoff_grows_and_respects_the_providers_hint():
    assert backoff_seconds(1, 6.0) == 6.0
    assert 0.75 <= backoff_seconds(1) <= 1.25
    assert 6 <= backoff_seconds(4) <= 10
    assert backoff_seconds(30) <= 300 * 1.25


def test_bad_setting_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("PFORTE_PORT", "eighty")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "PFORTE_PORT" in err.value.message and "\n" not in err.value.message
    monkeypatch.setenv("PFORTE_PORT", "8080")
    monkeypatch.setenv("PFORTE_DATABASE_URL", "mysql://x")
    with pytest.raises(ConfigError, match="PFORTE_DATABASE_URL"):
        load_settings()


def test_postgres_url_is_normalised_to_asyncpg():
    s = load_settings(database_url="postgresql://u@h/db")
    assert s.effective_database_url == "postgresql+asyncpg://u@h/db"


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("de-DE,de;q=0.9,en;q=0.8", "de"),
        ("en-US,en;q=0.9", "en"),
        ("fr-FR", "de"),
        (None, "de"),
        ("en;q=0.4,de;q=0.9", "de"),
        ("fr,en;q=0.5", "en"),
    ],
)
def test_language_negotiation_defaults_to_german(header, want):
    assert negotiate(header) == want


def test_explicit_preference_wins():
    assert negotiate("de-DE", preferred="en") == "en"


def test_both_catalogs_translate_the_same_msgids():
    from babel.messages.pofile import read_po

    from pforte.i18n import LOCALE_DIR

    with (LOCALE_DIR / "de" / "LC_MESSAGES" / "messages.po").open("rb") as fh:
        de = read_po(fh)
    missing = [m.id for m in de if m.id and not m.string]
    assert missing == []
    assert len(de) > 20
    some = next(m for m in de if isinstance(m.id, str) and m.id and m.string and m.string != m.id)
    assert translations("de").gettext(some.id) == some.string


def test_log_lines_carry_only_allow_listed_fields():
    rec = logging.LogRecord("pforte.x", logging.INFO, __file__, 1, "sent", None, None)
    rec.channel_id = "c1"
    rec.phone = "4915112345678"
    rec.body = "Befund"
    out = json.loads(JsonFormatter().format(rec))
    assert out["channel_id"] == "c1" and "phone" not in out and "body" not in out


def test_every_ui_string_has_a_german_translation():
    """Extract the msgids from the templates and the code (as ``make i18n`` does) and look each up."""
    from babel.messages.extract import extract_from_dir
    from babel.messages.pofile import read_po

    from pforte.i18n import LOCALE_DIR

    root = LOCALE_DIR.parent
    method_map = [("web/ui/templates/**.html", "jinja2"), ("**.py", "python")]
    options = {"web/ui/templates/**.html": {"extensions": "jinja2.ext.i18n"}}
    found = set()
    for _file, _line, message, _comments, _ctx in extract_from_dir(str(root), method_map, options):
        found.add(message if isinstance(message, str) else message[0])
    with (LOCALE_DIR / "de" / "LC_MESSAGES" / "messages.po").open("rb") as fh:
        de = {m.id if isinstance(m.id, str) else m.id[0] for m in read_po(fh) if m.id and m.string}
    assert len(found) > 100
    assert sorted(found - de) == []
