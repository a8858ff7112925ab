"""UTCDateTime's text on SQLite: the same text SQLAlchemy's own DATETIME writes.

Rows written before pforte bound datetimes itself hold SQLAlchemy's text, and SQLite compares
datetimes as text (retention cut-offs, the inbox's order): one instant must give one string.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.sqlite import DATETIME

from pforte.db import UTCDateTime

SQLITE = sqlite.dialect()


def _bind() -> Any:
    return UTCDateTime()._cached_bind_processor(SQLITE)


def test_the_text_matches_sqlalchemys_for_any_instant_with_or_without_microseconds():
    ours = _bind()
    theirs = DATETIME().bind_processor(SQLITE)
    rng = random.Random(7)
    for _ in range(20_000):
        instant = datetime(
            rng.randint(1, 9999),
            rng.randint(1, 12),
            rng.randint(1, 28),
            rng.randint(0, 23),
            rng.randint(0, 59),
            rng.randint(0, 59),
            rng.choice([0, rng.randint(0, 999_999)]),
            tzinfo=UTC,
        )
        assert ours(instant) == theirs(instant.replace(tzinfo=None))


def test_the_same_object_twice_and_a_different_one_after_it():
    ours = _bind()
    first = datetime(2026, 11, 24, 1, 30, 5, 149_081, tzinfo=UTC)
    second = first + timedelta(microseconds=1)
    assert ours(first) == ours(first) == "2026-11-24 01:30:05.149081"
    assert ours(second) == "2026-11-24 01:30:05.149082"
    assert ours(None) is None
    assert ours(first) == "2026-11-24 01:30:05.149081"


def test_other_zones_are_stored_as_utc_and_naive_values_are_refused():
    ours = _bind()
    berlin_winter = timezone(timedelta(hours=1))
    assert ours(datetime(2026, 11, 24, 2, 0, tzinfo=berlin_winter)) == "2026-11-24 01:00:00.000000"
    with pytest.raises(ValueError, match="naive datetime"):
        ours(datetime(2026, 11, 24, 2, 0))


def test_postgresql_gets_aware_utc_and_a_utc_value_unchanged():
    bind = UTCDateTime()._cached_bind_processor(postgresql.asyncpg.dialect())
    assert bind is not None
    berlin = datetime(2026, 11, 24, 2, 0, tzinfo=timezone(timedelta(hours=1)))
    assert bind(berlin) == berlin and bind(berlin).tzinfo is UTC
    already = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
    assert bind(already) is already
    with pytest.raises(ValueError, match="naive datetime"):
        bind(datetime(2026, 11, 24, 2, 0))
