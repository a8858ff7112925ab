"""WhatsApp webhook: handshake, signature and parsing, replaying every recorded fixture."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pforte.channels.base import INBOUND_TYPES, ChannelProblem, InboundBatch, InboundMessage, StatusUpdate
from pforte.channels.whatsapp.webhook import (
    UNROUTED,
    SignatureInvalid,
    SignatureMissing,
    SubscriptionRejected,
    parse_payload,
    parse_webhook,
    verify_signature,
    verify_subscription,
)
from pforte.errors import AuthenticationError, PermissionDenied, ValidationError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "whatsapp"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))

PNID = "109876543210987"
PNID2 = "109876543210988"
DISPLAY = "4930123456789"
U1_PHONE, U1_BSUID = "4915112345678", "DE.1234567890123456"
U2_PHONE, U2_BSUID = "4917698765432", "DE.6543210987654321"
TS = datetime(2026, 6, 15, 9, 30, tzinfo=UTC)
SECRET = b"test-app-secret"


def win(n: int) -> str:
    """The inbound wamid the fixtures use for message number ``n``."""
    return f"wamid.HBgNNDkxNTExMjM0NTY3OBUCABIYIEZBS0VJTkJPVU5E{n:04d}AA=="


def wout(n: int) -> str:
    """The outbound wamid the fixtures use for our message number ``n``."""
    return f"wamid.HBgNNDkxNTExMjM0NTY3OBUCABEYEkZBS0VPVVRCT1VORA{n:04d}AA=="


def load(name: str) -> dict[str, InboundBatch]:
    """Parse one fixture by file stem, the way the webhook route will."""
    return parse_webhook(parse_payload((FIXTURES / f"{name}.json").read_bytes()))


def only_message(batches: dict[str, InboundBatch]) -> InboundMessage:
    """The single message of a single-message fixture."""
    assert list(batches) == [PNID]
    batch = batches[PNID]
    assert len(batch.messages) == 1 and not batch.statuses and not batch.problems
    return batch.messages[0]


def only_status(batches: dict[str, InboundBatch]) -> StatusUpdate:
    """The single status of a single-status fixture."""
    assert list(batches) == [PNID]
    batch = batches[PNID]
    assert len(batch.statuses) == 1 and not batch.messages and not batch.problems
    return batch.statuses[0]


def sign(body: bytes, secret: bytes = SECRET) -> str:
    """The X-Hub-Signature-256 value Meta would send."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- per-fixture checks


def check_text(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text, m.external_id, m.channel_ref) == (
        "text",
        "Guten Tag, ich habe eine Frage zu meinem Termin.",
        win(1),
        PNID,
    )
    assert m.sender.user_id == U1_BSUID and m.sender.wa_id == U1_PHONE
    assert m.sender.profile_name == "Erika Mustermann"
    assert m.timestamp == TS and m.timestamp.tzinfo is not None
    assert m.context_id is None and not m.forwarded and not m.frequently_forwarded
    assert m.media is None and m.raw is None and m.details == {} and m.errors == ()


def check_text_reply_context(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text, m.context_id) == ("text", "Ja, der Termin passt.", wout(1))
    assert not m.forwarded


def check_text_forwarded(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.forwarded and not m.frequently_forwarded and m.context_id is None


def check_text_frequently_forwarded(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.frequently_forwarded and not m.forwarded


def check_image(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text) == ("image", "Foto vom Befund")
    assert m.media is not None
    assert (m.media.media_id, m.media.mime_type, m.media.url) == ("1400000000000005", "image/jpeg", None)
    assert m.media.sha256 == "IMjgSebEcVyT1Q8SQt7aPK46V18rm6mMkneLO9286sY="


def check_image_with_url(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.type == "image" and m.text is None and m.media is not None
    assert m.media.media_id == "1400000000000006"
    assert m.media.url is not None and m.media.url.startswith("https://lookaside.fbsbx.com/")


def check_video(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text) == ("video", "Video der Übung")
    assert m.media is not None and (m.media.media_id, m.media.mime_type) == ("1400000000000007", "video/mp4")


def check_document(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text) == ("document", "Mein Überweisungsschein")
    assert m.media is not None
    assert (m.media.media_id, m.media.filename, m.media.mime_type) == (
        "1400000000000008",
        "ueberweisung.pdf",
        "application/pdf",
    )


def check_audio_voice(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.type == "audio" and m.text is None and m.media is not None
    assert m.media.voice and not m.media.animated
    assert (m.media.media_id, m.media.mime_type) == ("1400000000000009", "audio/ogg; codecs=opus")


def check_sticker_animated(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.type == "sticker" and m.media is not None
    assert m.media.animated and not m.media.voice and m.media.media_id == "1400000000000010"


def check_location(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text) == ("location", "Klinikum Mitte, Beispielstraße 1, 10115 Berlin")
    assert m.details["latitude"] == pytest.approx(52.52437)
    assert m.details["longitude"] == pytest.approx(13.41053)
    assert m.details["url"] == "https://example.org/klinikum" and m.media is None


def check_contacts(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text) == ("contacts", "Anna Beispiel, Bernd Probe")
    cards = m.details["contacts"]
    assert len(cards) == 2 and cards[0]["phones"][0]["wa_id"] == "4915111111111"
    assert m.sender.user_id == U1_BSUID  # the author, not a shared card


def check_interactive_button_reply(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text, m.context_id) == ("interactive", "Ja, bestätigen", wout(2))
    assert m.details == {"interactive_type": "button_reply", "id": "confirm_yes", "title": "Ja, bestätigen"}


def check_interactive_list_reply(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text, m.context_id) == ("interactive", "Di 09:30", wout(3))
    assert m.details["interactive_type"] == "list_reply"
    assert (m.details["id"], m.details["description"]) == ("slot_0930", "Station 3, Raum 12")


def check_button_template_reply(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text, m.context_id) == ("button", "Termin bestätigen", wout(4))
    assert m.details == {"payload": "appointment_confirm"}


def check_reaction(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text) == ("reaction", "\U0001f44d")
    assert m.details == {"message_id": wout(5), "emoji": "\U0001f44d", "removed": False}
    assert m.context_id == wout(5)


def check_reaction_removed_empty(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text) == ("reaction", None)
    assert m.details == {"message_id": wout(5), "emoji": "", "removed": True}


def check_reaction_removed_nokey(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert (m.type, m.text, m.details["removed"], m.details["emoji"]) == ("reaction", None, True, "")


def check_unsupported_131051(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.type == "unsupported" and m.text is None
    assert m.details == {"original_type": "unsupported", "unsupported_type": "edit"}
    assert m.raw is not None and m.raw["id"] == win(19)
    assert m.errors == (
        ChannelProblem(
            code=131051, title="Message type unknown", details="Message type is currently not supported."
        ),
    )


def check_system_number_changed(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.type == "system" and m.text is not None and m.text.startswith("Erika Mustermann changed")
    assert m.details == {"system_type": "user_changed_number", "wa_id": "4915187654321"}


def check_unknown_future_type(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.type == "unsupported" and m.details == {"original_type": "order"}
    assert m.raw is not None and m.raw["order"]["product_items"][0]["product_retailer_id"] == "artikel-17"
    assert m.sender.user_id == U1_BSUID


def check_bsuid_only_username_user(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.sender.user_id == "DE.1122334455667788" and m.sender.wa_id is None
    assert m.sender.username == "lena.beispiel" and m.sender.profile_name == "Lena"
    assert m.sender.key == "u:DE.1122334455667788"


def check_legacy_no_user_id(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.sender.user_id is None and m.sender.wa_id == U2_PHONE
    assert m.sender.profile_name == "Max Mustermann" and m.sender.key == f"p:{U2_PHONE}"


def check_parent_user_id(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.sender.parent_user_id == "DE.ENT.9988776655443322"
    assert (m.sender.user_id, m.sender.username) == (U1_BSUID, "erika.m")


def check_status_sent_with_pricing(b: dict[str, InboundBatch]) -> None:
    s = only_status(b)
    assert (s.external_id, s.status, s.channel_ref, s.timestamp) == (wout(1), "sent", PNID, TS)
    assert (s.recipient_id, s.recipient_user_id, s.errors) == (U1_PHONE, U1_BSUID, ())


def check_status_delivered(b: dict[str, InboundBatch]) -> None:
    s = only_status(b)
    assert (s.external_id, s.status) == (wout(2), "delivered")
    assert s.timestamp == datetime(2026, 6, 15, 9, 30, 5, tzinfo=UTC)


def check_status_read(b: dict[str, InboundBatch]) -> None:
    s = only_status(b)
    assert (s.external_id, s.status, s.recipient_user_id) == (wout(2), "read", U1_BSUID)


def check_status_read_without_delivered(b: dict[str, InboundBatch]) -> None:
    s = only_status(b)
    assert (s.external_id, s.status) == (wout(3), "read")


def check_status_played(b: dict[str, InboundBatch]) -> None:
    assert only_status(b).status == "played"


def _failed(b: dict[str, InboundBatch], code: int) -> ChannelProblem:
    s = only_status(b)
    assert s.status == "failed" and len(s.errors) == 1
    assert s.errors[0].code == code and s.errors[0].title and s.errors[0].details
    return s.errors[0]


def check_status_failed_131047(b: dict[str, InboundBatch]) -> None:
    assert _failed(b, 131047).title == "Re-engagement message"


def check_status_failed_131026(b: dict[str, InboundBatch]) -> None:
    assert _failed(b, 131026).details == "Message Undeliverable."


def check_status_failed_131049(b: dict[str, InboundBatch]) -> None:
    _failed(b, 131049)


def check_status_failed_132015(b: dict[str, InboundBatch]) -> None:
    assert _failed(b, 132015).title == "Template is Paused"


def check_status_with_biz_opaque_callback_data(b: dict[str, InboundBatch]) -> None:
    s = only_status(b)
    assert (s.external_id, s.status) == (wout(10), "sent")


def check_status_no_conversation_v24(b: dict[str, InboundBatch]) -> None:
    s = only_status(b)
    assert (s.external_id, s.status) == (wout(11), "delivered")


def check_batch_2entries_2changes_mixed(b: dict[str, InboundBatch]) -> None:
    assert sorted(b) == [PNID, PNID2]
    first, second = b[PNID], b[PNID2]
    assert [m.external_id for m in first.messages] == [win(101), win(102), win(103)]
    assert [m.sender.user_id for m in first.messages] == [U1_BSUID, U2_BSUID, U1_BSUID]
    assert first.messages[1].media is not None and first.messages[1].media.media_id == "1400000000000102"
    assert [(s.external_id, s.status) for s in first.statuses] == [
        (wout(101), "sent"),
        (wout(102), "delivered"),
    ]
    assert [m.type for m in second.messages] == ["reaction"]
    assert second.messages[0].channel_ref == PNID2 and second.messages[0].sender.wa_id == U2_PHONE
    # Order of appearance is kept, including read before delivered.
    assert [(s.external_id, s.status) for s in second.statuses] == [
        (wout(103), "sent"),
        (wout(104), "read"),
        (wout(104), "delivered"),
        (wout(105), "failed"),
    ]
    assert second.statuses[-1].errors[0].code == 131047
    assert (first.size, second.size) == (5, 5)


def check_unicode_escaped(b: dict[str, InboundBatch]) -> None:
    m = only_message(b)
    assert m.text == "Grüße aus Köln – äöü 😀"
    assert m.sender.profile_name == "Jürgen Müller"


def check_non_messages_field(b: dict[str, InboundBatch]) -> None:
    assert list(b) == [UNROUTED]
    assert b[UNROUTED].ignored_fields == 2 and b[UNROUTED].size == 0 and not b[UNROUTED].problems


def check_value_errors(b: dict[str, InboundBatch]) -> None:
    assert list(b) == [PNID]
    batch = b[PNID]
    assert batch.size == 0
    assert [(p.code, p.title) for p in batch.problems] == [
        (131000, "Something went wrong"),
        (130472, "User's number is part of an experiment"),
    ]
    assert batch.problems[1].details is not None and "experiment" in batch.problems[1].details


CHECKS: dict[str, Callable[[dict[str, InboundBatch]], None]] = {
    "message_text": check_text,
    "message_text_reply_context": check_text_reply_context,
    "message_text_forwarded": check_text_forwarded,
    "message_text_frequently_forwarded": check_text_frequently_forwarded,
    "message_image": check_image,
    "message_image_with_url": check_image_with_url,
    "message_video": check_video,
    "message_document": check_document,
    "message_audio_voice": check_audio_voice,
    "message_sticker_animated": check_sticker_animated,
    "message_location": check_location,
    "message_contacts": check_contacts,
    "message_interactive_button_reply": check_interactive_button_reply,
    "message_interactive_list_reply": check_interactive_list_reply,
    "message_button_template_reply": check_button_template_reply,
    "message_reaction": check_reaction,
    "message_reaction_removed_empty": check_reaction_removed_empty,
    "message_reaction_removed_nokey": check_reaction_removed_nokey,
    "message_unsupported_131051": check_unsupported_131051,
    "message_system_number_changed": check_system_number_changed,
    "message_unknown_future_type": check_unknown_future_type,
    "message_bsuid_only_username_user": check_bsuid_only_username_user,
    "message_legacy_no_user_id": check_legacy_no_user_id,
    "message_parent_user_id": check_parent_user_id,
    "status_sent_with_pricing": check_status_sent_with_pricing,
    "status_delivered": check_status_delivered,
    "status_read": check_status_read,
    "status_read_without_delivered": check_status_read_without_delivered,
    "status_played": check_status_played,
    "status_failed_131047": check_status_failed_131047,
    "status_failed_131026": check_status_failed_131026,
    "status_failed_131049": check_status_failed_131049,
    "status_failed_132015": check_status_failed_132015,
    "status_with_biz_opaque_callback_data": check_status_with_biz_opaque_callback_data,
    "status_no_conversation_v24": check_status_no_conversation_v24,
    "batch_2entries_2changes_mixed": check_batch_2entries_2changes_mixed,
    "unicode_escaped": check_unicode_escaped,
    "non_messages_field": check_non_messages_field,
    "value_errors": check_value_errors,
}


def _raw_items(payload: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    """(phone_number_id, item) for every messages[]/statuses[] item of every change."""
    out = []
    for entry in payload["entry"]:
        for change in entry["changes"]:
            value = change["value"]
            if change["field"] == "messages":
                out += [(value["metadata"]["phone_number_id"], item) for item in value.get(key, [])]
    return out


def test_fixture_directory_is_not_empty() -> None:
    assert len(FIXTURE_FILES) >= 39


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_fixture_replays_without_losing_anything(path: Path) -> None:
    raw = path.read_bytes()
    payload = json.loads(raw)
    batches = parse_webhook(parse_payload(raw))

    messages = [(ref, m) for ref, batch in batches.items() for m in batch.messages]
    statuses = [(ref, s) for ref, batch in batches.items() for s in batch.statuses]
    # Every item arrives, under its own business number, in order, with its own id.
    assert [(ref, m.external_id) for ref, m in messages] == [
        (ref, item["id"]) for ref, item in _raw_items(payload, "messages")
    ]
    assert [(ref, s.external_id, s.status) for ref, s in statuses] == [
        (ref, item["id"], item["status"]) for ref, item in _raw_items(payload, "statuses")
    ]
    for ref, m in messages:
        assert m.channel_ref == ref and m.type in INBOUND_TYPES
        assert m.timestamp.utcoffset() is not None and m.timestamp.utcoffset().total_seconds() == 0
        assert m.sender.user_id or m.sender.wa_id
        assert (m.raw is not None) == (m.type == "unsupported")
    for ref, s in statuses:
        assert s.channel_ref == ref and s.timestamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    for batch in batches.values():
        assert all(p.title != "malformed item" for p in batch.problems)

    check = CHECKS.get(path.stem)
    if check is not None:
        check(batches)


def test_every_fixture_has_specific_assertions() -> None:
    missing = sorted(p.stem for p in FIXTURE_FILES if p.stem not in CHECKS)
    assert missing == [], f"add a check_* function to CHECKS for: {missing}"
    stale = sorted(set(CHECKS) - {p.stem for p in FIXTURE_FILES})
    assert stale == [], f"CHECKS names fixtures that do not exist: {stale}"


# --------------------------------------------------------------------------- robustness


def _envelope(value: dict[str, Any], field: str = "messages") -> dict[str, Any]:
    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": PNID}, **value}
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": field, "value": value}]}],
    }


def _text_item(n: int, **overrides: Any) -> dict[str, Any]:
    item = {"from": U1_PHONE, "id": win(n), "timestamp": "1781515800", "type": "text", "text": {"body": "x"}}
    item.update(overrides)
    return {k: v for k, v in item.items() if v is not None}


def test_malformed_items_are_skipped_counted_and_the_rest_kept() -> None:
    payload = _envelope(
        {
            "contacts": [{"wa_id": U1_PHONE, "profile": {"name": "Erika"}}],
            "messages": [
                _text_item(1),
                _text_item(2, id=None),  # missing id
                "not-an-object",
                _text_item(3, timestamp="gestern"),
                _text_item(4, timestamp=None),
                _text_item(5, text={"body": "Geheimer Befund"}),
            ],
            "statuses": [
                {"status": "sent", "timestamp": "1781515800"},  # missing id
                {"id": wout(1), "status": "delivered", "timestamp": "1781515801", "recipient_id": U1_PHONE},
            ],
        }
    )
    batch = parse_webhook(payload)[PNID]
    assert [m.external_id for m in batch.messages] == [win(1), win(5)]
    assert [s.external_id for s in batch.statuses] == [wout(1)]
    assert len(batch.problems) == 5
    assert {(p.code, p.title) for p in batch.problems} == {(0, "malformed item")}
    assert batch.problems[0].details == "entry[0].changes[0].messages[1]: missing id"
    assert batch.problems[-1].details == "entry[0].changes[0].statuses[0]: missing id"
    for problem in batch.problems:  # problems carry positions and reasons, never content or numbers
        assert U1_PHONE not in (problem.details or "") and "gestern" not in (problem.details or "")


def test_message_without_any_sender_id_is_a_problem_not_a_crash() -> None:
    item = _text_item(1, **{"from": None})
    batch = parse_webhook(_envelope({"messages": [item]}))[PNID]
    assert batch.messages == [] and batch.problems[0].details.endswith("no sender id")  # type: ignore[union-attr]


def test_single_contact_names_the_author_when_from_fields_are_absent() -> None:
    contact = {"profile": {"name": "Lena", "username": "lena"}, "user_id": "DE.777"}
    batch = parse_webhook(_envelope({"contacts": [contact], "messages": [_text_item(1, **{"from": None})]}))[
        PNID
    ]
    assert batch.messages[0].sender.user_id == "DE.777" and batch.messages[0].sender.username == "lena"


def test_contacts_are_matched_by_bsuid_before_phone() -> None:
    contacts = [
        {"profile": {"name": "Falsch"}, "wa_id": U1_PHONE},
        {"profile": {"name": "Richtig"}, "user_id": U1_BSUID},
    ]
    item = _text_item(1, from_user_id=U1_BSUID)
    sender = parse_webhook(_envelope({"contacts": contacts, "messages": [item]}))[PNID].messages[0].sender
    assert (sender.profile_name, sender.user_id, sender.wa_id) == ("Richtig", U1_BSUID, U1_PHONE)


@pytest.mark.parametrize(
    ("item_type", "body", "details"),
    [
        (
            "interactive",
            {"type": "nfm_reply", "nfm_reply": {"response_json": "{}"}},
            {"subtype": "nfm_reply"},
        ),
        ("request_welcome", None, {}),
        ("image", {"mime_type": "image/jpeg"}, {}),  # media without an id cannot be fetched: keep raw
        ("location", {"latitude": "north"}, {}),
        ("holo_call", {"x": 1}, {}),
    ],
)
def test_unknown_or_unparseable_types_are_kept_raw(
    item_type: str, body: Any, details: dict[str, Any]
) -> None:
    item = _text_item(1, type=item_type, text=None)
    if body is not None:
        item[item_type] = body
    m = parse_webhook(_envelope({"messages": [item]}))[PNID].messages[0]
    assert m.type == "unsupported" and m.raw == item and m.text is None and m.media is None
    assert m.details == {"original_type": item_type, **details}


def test_change_without_phone_number_id_is_reported_not_routed() -> None:
    payload = _envelope({"messages": [_text_item(1), _text_item(2)]})
    del payload["entry"][0]["changes"][0]["value"]["metadata"]
    batches = parse_webhook(payload)
    assert list(batches) == [UNROUTED]
    assert batches[UNROUTED].size == 0
    assert (
        batches[UNROUTED].problems[0].details
        == "entry[0].changes[0]: no phone_number_id, 2 update(s) skipped"
    )


@pytest.mark.parametrize("entry", [None, "x", [1], [{"changes": ["x"]}], [{"changes": None}], [{}]])
def test_structurally_broken_payloads_never_crash(entry: Any) -> None:
    batches = parse_webhook({"object": "whatsapp_business_account", "entry": entry})
    assert all(b.size == 0 for b in batches.values())


def test_huge_timestamp_is_a_problem() -> None:
    batch = parse_webhook(_envelope({"messages": [_text_item(1, timestamp="9" * 30)]}))[PNID]
    assert batch.messages == [] and batch.problems[0].details.endswith("invalid timestamp")  # type: ignore[union-attr]


# --------------------------------------------------------------------------- parse_payload


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'"x"',
        b'{"object":"page","entry":[]}',
        b'{"entry":[]}',
        b"\xff\xfe{",
        b"[" * 100_000,
    ],
)
def test_parse_payload_rejects_non_waba_bodies(body: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        parse_payload(body)
    assert info.value.code == "malformed_json" and info.value.http_status == 400


def test_parse_payload_accepts_a_waba_object() -> None:
    assert parse_payload(b'{"object":"whatsapp_business_account","entry":[]}')["entry"] == []


# --------------------------------------------------------------------------- signature


def test_signature_valid_over_raw_bytes() -> None:
    body = (FIXTURES / "unicode_escaped.json").read_bytes()
    assert b"\\u00fc" in body  # the file really carries escaped unicode
    verify_signature(body=body, header=sign(body), app_secret=SECRET)
    verify_signature(body=body, header=sign(body).upper().replace("SHA256=", "sha256="), app_secret=SECRET)


@pytest.mark.parametrize("header", [None, "", "   "])
def test_signature_missing(header: str | None) -> None:
    with pytest.raises(SignatureMissing) as info:
        verify_signature(body=b"{}", header=header, app_secret=SECRET)
    assert isinstance(info.value, AuthenticationError)
    assert (info.value.code, info.value.http_status) == ("signature_missing", 401)


def test_signature_wrong_prefix() -> None:
    body = b'{"object":"whatsapp_business_account"}'
    sha1 = "sha1=" + hmac.new(SECRET, body, hashlib.sha1).hexdigest()
    for header in (sha1, sign(body).removeprefix("sha256=")):
        with pytest.raises(SignatureInvalid):
            verify_signature(body=body, header=header, app_secret=SECRET)


@pytest.mark.parametrize(
    "header",
    [
        sign(b"{}", b"other-secret"),
        "sha256=" + "0" * 64,
        "sha256=",
        "sha256=zz",
        "sha256=ä" + "0" * 63,
    ],
)
def test_signature_wrong_digest(header: str) -> None:
    with pytest.raises(SignatureInvalid) as info:
        verify_signature(body=b"{}", header=header, app_secret=SECRET)
    assert isinstance(info.value, PermissionDenied)
    assert (info.value.code, info.value.http_status) == ("signature_invalid", 403)


def test_signature_fails_on_reserialised_body() -> None:
    body = (FIXTURES / "unicode_escaped.json").read_bytes()
    header = sign(body)
    reserialised = json.dumps(json.loads(body), ensure_ascii=False, separators=(",", ":")).encode()
    assert json.loads(reserialised) == json.loads(body) and reserialised != body
    with pytest.raises(SignatureInvalid):
        verify_signature(body=reserialised, header=header, app_secret=SECRET)


# --------------------------------------------------------------------------- subscription


def test_subscription_ok_returns_challenge() -> None:
    assert verify_subscription(
        mode="subscribe", token="s3cret", challenge="1158201444", expected_token="s3cret"
    ) == ("1158201444")


def test_subscription_echoes_non_numeric_challenge_verbatim() -> None:
    challenge = "abc-DEF_123 ?&="
    assert verify_subscription(
        mode="subscribe", token="s3cret", challenge=challenge, expected_token="s3cret"
    ) == (challenge)


@pytest.mark.parametrize(
    ("mode", "token", "challenge", "expected"),
    [
        ("subscribe", "wrong", "1", "s3cret"),
        ("subscribe", None, "1", "s3cret"),
        ("unsubscribe", "s3cret", "1", "s3cret"),
        (None, "s3cret", "1", "s3cret"),
        ("subscribe", "s3cret", None, "s3cret"),
        ("subscribe", "s3cret", "", "s3cret"),
        ("subscribe", "", "1", ""),  # an unset verify token must never match
    ],
)
def test_subscription_rejected(
    mode: str | None, token: str | None, challenge: str | None, expected: str
) -> None:
    with pytest.raises(SubscriptionRejected) as info:
        verify_subscription(mode=mode, token=token, challenge=challenge, expected_token=expected)
    assert info.value.http_status == 403
    assert "s3cret" not in str(info.value)
