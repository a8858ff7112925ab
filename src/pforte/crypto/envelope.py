"""AES-256-GCM field encryption whose associated data binds a ciphertext to its place.

Format of a sealed value: ``0x01 | nonce (12 bytes) | ciphertext+tag``. The associated data is
``pforte:v1:<table>:<column>:<row id>``, so a ciphertext copied into another row or column fails
authentication instead of decrypting into the wrong place.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pforte.errors import CryptoError

VERSION = b"\x01"
NONCE_BYTES = 12


def aad_for(table: str, column: str, row_id: str) -> bytes:
    """Associated data binding a value to table, column and row."""
    return f"pforte:v1:{table}:{column}:{row_id}".encode()


class FieldCipher:
    """Seals and opens field values under one data key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise CryptoError("data key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt bytes with a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        return VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Decrypt bytes; raise CryptoError if the value was altered or moved."""
        if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[:1] != VERSION:
            raise CryptoError("ciphertext has an unknown format")
        try:
            return self._aead.decrypt(sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :], aad)
        except InvalidTag:
            raise CryptoError("ciphertext failed authentication") from None

    def seal_text(self, text: str | None, table: str, column: str, row_id: str) -> bytes | None:
        """Encrypt a string field (None stays None)."""
        if text is None:
            return None
        return self.seal(text.encode(), aad_for(table, column, row_id))

    def open_text(self, sealed: bytes | None, table: str, column: str, row_id: str) -> str | None:
        """Decrypt a string field (None stays None)."""
        if sealed is None:
            return None
        return self.open(sealed, aad_for(table, column, row_id)).decode()
