"""Password checks: argon2id, and the same work whether or not the account exists (DSK I.2)."""

from __future__ import annotations

import pytest

from pforte.staff import security


@pytest.mark.dsk("I.2")
async def test_a_password_is_checked_against_its_hash_and_an_unknown_account_costs_a_dummy_check():
    stored = await security.hash_password("Richtig-und-lang-genug")
    assert stored.startswith("$argon2id$")
    assert await security.verify_password(stored, "Richtig-und-lang-genug")
    assert not await security.verify_password(stored, "falsch")

    security._dummy_hash.cache_clear()
    # No account: a dummy hash is verified instead, so the answer takes as long, and is always no.
    assert not await security.verify_password(None, "Richtig-und-lang-genug")
    assert security._dummy_hash.cache_info().misses == 1
    assert not await security.verify_password(None, "")
    assert security._dummy_hash.cache_info().hits == 1  # made once per process, at the first need
