"""Keyed blind index: find a contact by phone number or BSUID without storing either in clear.

The index is HMAC-SHA256 under a per-organisation key (kept wrapped like any data key), so equal
inputs give equal tokens inside one organisation and nothing outside it. Inputs are normalised
first so that "+49 151 …" and "49151…" match.
"""

from __future__ import annotations

import hashlib
import hmac
import re

_NON_DIGITS = re.compile(r"\D+")


def normalise_phone(phone: str) -> str:
    """Digits only, international form without '+' or leading zeros of a '00' prefix."""
    digits = _NON_DIGITS.sub("", phone)
    if digits.startswith("00"):
        digits = digits[2:]
    return digits


def blind_index(key: bytes, kind: str, value: str) -> str:
    """Hex HMAC of a normalised value; ``kind`` separates phone from BSUID tokens."""
    norm = normalise_phone(value) if kind == "phone" else value.strip()
    return hmac.new(key, f"{kind}:{norm}".encode(), hashlib.sha256).hexdigest()
