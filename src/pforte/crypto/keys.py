"""Key hierarchy: KEKs outside the database, DEKs inside it only wrapped.

* A ``KeyProvider`` holds key-encryption keys (KEKs), one per organisation, outside the database.
  The default ``FileKeyProvider`` keeps a JSON key ring in a 0600 file in a 0700 directory; an HSM
  provider can take its place behind the same three methods.
* Each contact gets its own data key (DEK); the organisation has one for its own secrets and one for
  blind indexes. DEKs are stored wrapped (RFC 3394 AES key wrap) under the organisation's KEK.
  Destroying a contact's wrapped DEK makes every copy of its data unreadable (crypto-shredding).
* ``KeyService`` unwraps DEKs on demand and caches them in memory for a short time
  (``dek_cache_seconds``) so the hot path does not unwrap per message.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from sqlalchemy import select

from pforte.clock import Clock, SystemClock
from pforte.crypto.envelope import FieldCipher
from pforte.crypto.models import DataKey
from pforte.db import Executor, new_id
from pforte.errors import ConfigError, CryptoError


class KeyProvider(Protocol):
    """Source of KEKs; never stores anything in the database."""

    def create_kek(self) -> str:
        """Make a new KEK and return its id."""

    def get_kek(self, kek_id: str) -> bytes:
        """Return the 32-byte KEK; raise CryptoError if unknown."""

    def list_keks(self) -> dict[str, dict[str, Any]]:
        """Ids and metadata (creation time), never key material."""

    def destroy_kek(self, kek_id: str) -> None:
        """Forget a KEK for good (an organisation's deletion, or a retired KEK after rotation)."""


class FileKeyProvider:
    """KEKs in a JSON key ring file with 0600 permissions (directory 0700)."""

    def __init__(self, path: Path, clock: Clock | None = None) -> None:
        self.path = path
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._keks: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            self._keks = {}
            return
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"key file {self.path} is readable by others (mode {mode:o}); chmod 600 it")
        try:
            data = json.loads(self.path.read_text())
            self._keks = dict(data["keks"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"key file {self.path} is not a pforte key ring") from None

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": 1, "keks": self._keks}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        # The rename itself must be durable before a new KEK id is written to the database.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise read-modify-write of the ring across threads AND processes.

        ``pforte keys rotate``/``retire`` change the ring while ``pforte serve`` may create an
        organisation's KEK: without a file lock one process's save could drop the other's key.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the lock

    def create_kek(self) -> str:
        """Generate a 256-bit KEK and persist it before returning its id."""
        with self._exclusive():
            self._load()
            kek_id = "kek-" + new_id()
            self._keks[kek_id] = {
                "key": base64.b64encode(secrets.token_bytes(32)).decode(),
                "created_at": self._clock.now().isoformat(),
            }
            self._save()
            return kek_id

    def get_kek(self, kek_id: str) -> bytes:
        """Return a KEK, re-reading the file once if another process added it."""
        entry = self._keks.get(kek_id)
        if entry is None:
            with self._lock:
                self._load()
            entry = self._keks.get(kek_id)
        if entry is None:
            raise CryptoError("key-encryption key not available from the key provider")
        return base64.b64decode(entry["key"])

    def list_keks(self) -> dict[str, dict[str, Any]]:
        """KEK ids with their creation time."""
        return {k: {"created_at": v.get("created_at")} for k, v in self._keks.items()}

    def destroy_kek(self, kek_id: str) -> None:
        """Remove a KEK from the ring file (rewritten atomically); unknown ids are ignored."""
        with self._exclusive():
            self._load()
            if self._keks.pop(kek_id, None) is not None:
                self._save()


class KeyService:
    """Creates, wraps, unwraps and caches data keys."""

    def __init__(
        self, provider: KeyProvider, *, clock: Clock | None = None, ttl: float = 300.0, size: int = 10_000
    ) -> None:
        self.provider = provider
        self._clock = clock or SystemClock()
        self._ttl = ttl
        self._size = size
        self._cache: OrderedDict[str, tuple[float, FieldCipher, bytes]] = OrderedDict()

    def new_data_key(
        self, *, org_id: str, kek_id: str, purpose: str, now: datetime
    ) -> tuple[dict[str, Any], bytes]:
        """A fresh DEK: the row to insert (wrapped) and the plaintext key (cached)."""
        key = secrets.token_bytes(32)
        row: dict[str, Any] = {
            "id": new_id(),
            "org_id": org_id,
            "purpose": purpose,
            "kek_id": kek_id,
            "wrapped": aes_key_wrap(self.provider.get_kek(kek_id), key),
            "created_at": now,
            "destroyed_at": None,
        }
        self._remember(row["id"], key)
        return row, key

    def _remember(self, dek_id: str, key: bytes) -> FieldCipher:
        cipher = FieldCipher(key)
        self._cache[dek_id] = (self._clock.monotonic() + self._ttl, cipher, key)
        self._cache.move_to_end(dek_id)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return cipher

    def _cached(self, dek_id: str) -> tuple[FieldCipher, bytes] | None:
        hit = self._cache.get(dek_id)
        if hit is None:
            return None
        if hit[0] < self._clock.monotonic():
            del self._cache[dek_id]
            return None
        return hit[1], hit[2]

    def forget(self, dek_id: str) -> None:
        """Drop a key from the cache (after destruction or rotation)."""
        self._cache.pop(dek_id, None)

    def wrap(self, *, kek_id: str, key: bytes) -> bytes:
        """Wrap a plaintext DEK under a KEK (rotation, or a key made while the KEK switched)."""
        return aes_key_wrap(self.provider.get_kek(kek_id), key)

    def unwrap(self, *, kek_id: str, wrapped: bytes | None) -> bytes:
        """Unwrap a DEK; CryptoError if destroyed or the KEK does not fit."""
        if wrapped is None:
            raise CryptoError("data key was destroyed")
        try:
            return aes_key_unwrap(self.provider.get_kek(kek_id), wrapped)
        except InvalidUnwrap:
            raise CryptoError("data key does not unwrap under its KEK") from None

    async def ciphers(self, session: Executor, dek_ids: set[str]) -> dict[str, FieldCipher]:
        """Ciphers for many DEKs, loading the uncached ones in one query."""
        out: dict[str, FieldCipher] = {}
        missing = []
        for dek_id in dek_ids:
            hit = self._cached(dek_id)
            if hit:
                out[dek_id] = hit[0]
            else:
                missing.append(dek_id)
        if missing:
            rows = await session.execute(
                select(DataKey.id, DataKey.kek_id, DataKey.wrapped).where(DataKey.id.in_(missing))
            )
            for dek_id, kek_id, wrapped in rows:
                out[dek_id] = self._remember(str(dek_id), self.unwrap(kek_id=kek_id, wrapped=wrapped))
        absent = dek_ids - out.keys()
        if absent:
            raise CryptoError("data key missing")
        return out

    async def cipher(self, session: Executor, dek_id: str) -> FieldCipher:
        """The cipher of one DEK."""
        return (await self.ciphers(session, {dek_id}))[dek_id]

    async def raw_key(self, session: Executor, dek_id: str) -> bytes:
        """The plaintext bytes of one DEK (for HMAC keys such as the blind index)."""
        await self.ciphers(session, {dek_id})
        hit = self._cached(dek_id)
        assert hit is not None
        return hit[1]
