"""Message x of y (DSK II.2), pure parts: splitting, derived status, canonical hash, assembly."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest

from pforte.conversations import parts
from pforte.conversations.parts import PartState, ThreadItem

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
WAIT = timedelta(minutes=10)


def long_text(n: int = 10_000) -> str:
    """Words of varying length, exactly n characters, no trailing space."""
    words = [("Befund", "Untersuchung", "am", "Knie", "Wanderröte")[i % 5] for i in range(n)]
    text = " ".join(words)[:n]
    return text[:-1] + "x" if text.endswith(" ") else text


def unmark(chunks: list[str]) -> list[str]:
    out = []
    for i, chunk in enumerate(chunks, start=1):
        prefix = f"({i}/{len(chunks)}) "
        assert chunk.startswith(prefix)
        out.append(chunk[len(prefix) :])
    return out


@pytest.mark.dsk("II.2")
def test_a_10000_character_text_becomes_three_marked_parts_within_the_limit():
    text = long_text()
    assert len(text) == 10_000
    chunks = parts.split_text(text, parts.text_limit("whatsapp"))
    assert len(chunks) == 3
    assert [c[:6] for c in chunks] == ["(1/3) ", "(2/3) ", "(3/3) "]
    assert all(len(c) <= 4096 for c in chunks)
    # Cut at word boundaries only: the words of the parts are exactly the words of the text.
    pieces = unmark(chunks)
    assert " ".join(pieces) == text
    assert all(not p.startswith(" ") and not p.endswith(" ") for p in pieces)


def test_a_text_within_the_limit_is_not_split():
    assert parts.split_text("Ihr Befund ist da.", 4096) == ["Ihr Befund ist da."]
    exact = "x" * 4096
    assert parts.split_text(exact, 4096) == [exact]


def test_only_a_word_longer_than_the_room_is_cut_inside():
    word = "a" * 30
    chunks = parts.split_text(f"kurz {word} Ende", 20)
    assert all(len(c) <= 20 for c in chunks)
    assert "".join(unmark(chunks)).replace(" ", "") == f"kurz{word}Ende"
    assert unmark(chunks)[0] == "kurz"  # the short word before it was not glued to the long one


def test_the_marker_may_grow_a_digit_and_still_fits():
    text = " ".join(["wort"] * 400)  # 1999 characters
    chunks = parts.split_text(text, 30)
    assert len(chunks) >= 10
    assert all(len(c) <= 30 for c in chunks)
    assert chunks[-1].startswith(f"({len(chunks)}/{len(chunks)}) ")
    assert " ".join(unmark(chunks)) == text


def test_newlines_are_kept_inside_parts_and_are_cut_points():
    text = ("Zeile eins\n" * 500).strip()
    chunks = parts.split_text(text, 200)
    assert all(len(c) <= 200 for c in chunks)
    assert "\n" in unmark(chunks)[0]
    assert all(p == p.strip() for p in unmark(chunks))


def test_channel_limits_are_declared_per_kind():
    assert parts.text_limit("whatsapp") == 4096
    assert parts.text_limit("unknown-kind") == parts.DEFAULT_TEXT_LIMIT
    assert parts.MAX_TEXT_LENGTH >= 10_000


@pytest.mark.dsk("II.2")
def test_a_split_message_is_complete_only_when_every_part_is_delivered():
    sent = [PartState(1, "delivered"), PartState(2, "sent"), PartState(3, "read")]
    status = parts.logical_status(sent)
    assert (status.status, status.delivered, status.total) == ("sent", 2, 3)
    done = parts.logical_status([PartState(1, "delivered"), PartState(2, "read"), PartState(3, "delivered")])
    assert (done.status, done.delivered) == ("complete", 3)
    waiting = parts.logical_status([PartState(1, "queued"), PartState(2, "accepted"), PartState(3, "sent")])
    assert waiting.status == "sending"
    # A part row that is missing (fewer rows than the count) never counts as complete.
    assert parts.logical_status([PartState(1, "delivered"), PartState(2, "delivered")], 3).status == "sending"


@pytest.mark.dsk("II.2")
def test_a_failed_part_fails_the_whole_with_that_parts_reason():
    status = parts.logical_status(
        [PartState(3, "delivered"), PartState(2, "failed", "undeliverable"), PartState(1, "review")]
    )
    assert (status.status, status.failed_index, status.error_reason) == ("failed", 2, "undeliverable")
    assert parts.logical_status([PartState(1, "review"), PartState(2, "delivered")]).status == "review"


def test_canonical_content_is_versioned_sorted_json_without_ids():
    doc = parts.canonical_content(
        direction="out",
        type_="template",
        body="Guten Tag Frau M.",
        details={"template": {"params": ["Frau M."], "name": "termin", "language": "de"}},
    )
    assert doc == (
        b'{"body":"Guten Tag Frau M.","details":{"template":{"language":"de","name":"termin",'
        b'"params":["Frau M."]}},"direction":"out","media":[],"type":"template","v":1}'
    )
    assert json.loads(doc)["v"] == parts.CANONICAL_VERSION
    digest = parts.content_hash(
        direction="out",
        type_="template",
        body="Guten Tag Frau M.",
        details={"template": {"name": "termin", "language": "de", "params": ["Frau M."]}},
    )
    assert digest == hashlib.sha256(doc).hexdigest()


def test_the_hash_changes_with_any_part_of_the_content():
    base = dict(direction="in", type_="image", body="Knie", details={}, media=[("abc=", "knie.png")])
    digest = parts.content_hash(**base)
    assert parts.content_hash(**{**base, "body": "Knie "}) != digest
    assert parts.content_hash(**{**base, "direction": "out"}) != digest
    assert parts.content_hash(**{**base, "media": [("abd=", "knie.png")]}) != digest
    assert parts.content_hash(**{**base, "details": {"x": 1}}) != digest
    # Non-ASCII is hashed as UTF-8 text, and details key order does not matter.
    a = parts.content_hash(direction="in", type_="text", body="Wanderröte", details={"a": 1, "b": 2})
    b = parts.content_hash(direction="in", type_="text", body="Wanderröte", details={"b": 2, "a": 1})
    assert a == b


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("(1/3) Guten Tag", (1, 3, "Guten Tag")),
        ("Guten Tag (2/3)", (2, 3, "Guten Tag")),
        ("  (3 / 3)\nEnde", (3, 3, "Ende")),
        ("Dosis 1/2 Tablette", None),
        ("(4/3) zu viel", None),
        ("(1/1) allein", None),
        ("(0/2) null", None),
        (None, None),
    ],
)
def test_markers_at_the_start_or_end_are_recognised(text, want):
    assert parts.parse_marker(text) == want


def _in(i: int, text: str, minutes: float = 0, direction: str = "in", type_: str = "text") -> ThreadItem:
    return ThreadItem(f"m{i}", direction, type_, text, T0 + timedelta(minutes=minutes))


@pytest.mark.dsk("II.2")
def test_incoming_parts_out_of_order_and_duplicated_are_assembled_into_one():
    items = [
        _in(0, "Hallo"),
        _in(1, "(2/3) zwei"),
        _in(2, "(1/3) eins"),
        _in(3, "(2/3) zwei"),
        _in(4, "(3/3) drei"),
        _in(5, "Danke"),
    ]
    (a,) = parts.assemble(items, now=T0 + timedelta(hours=1), wait=WAIT)
    assert a.ids == ("m1", "m2", "m3", "m4")
    assert [(p.index, p.message_id) for p in a.parts] == [(1, "m2"), (2, "m1"), (3, "m4")]
    assert a.duplicates == ("m3",)
    assert a.complete and not a.gap and a.missing == ()
    assert a.text == "eins\nzwei\ndrei"


@pytest.mark.dsk("II.2")
def test_a_gap_is_flagged_only_once_the_newest_part_is_older_than_the_wait():
    items = [_in(1, "(1/3) eins", 0), _in(2, "(3/3) drei", 2)]
    (early,) = parts.assemble(items, now=T0 + timedelta(minutes=11), wait=WAIT)
    assert early.missing == (2,) and not early.gap
    (late,) = parts.assemble(items, now=T0 + timedelta(minutes=12), wait=WAIT)
    assert late.missing == (2,) and late.gap


def test_sequences_end_at_other_messages_another_count_or_when_complete():
    items = [
        _in(1, "(1/2) a"),
        _in(2, "(2/2) b"),
        _in(3, "(1/2) c"),  # the first sequence was complete: a new one starts
        _in(4, "Antwort", direction="out"),
        _in(5, "(2/2) d"),  # an outgoing message in between ended the previous one
        _in(6, "(1/3) e"),  # another count ends it too
        _in(7, "(1/2) Bild", type_="image"),  # only texts take part
    ]
    groups = parts.assemble(items, now=T0, wait=WAIT)
    assert [g.ids for g in groups] == [("m1", "m2"), ("m3",), ("m5",), ("m6",)]
    assert [g.missing for g in groups] == [(), (2,), (1,), (2, 3)]
    assert not any(g.gap for g in groups)  # now == the newest part's time: still waiting
