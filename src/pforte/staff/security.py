"""Password hashing (argon2id, off the event loop) and session tokens."""

from __future__ import annotations

import functools
import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from starlette.concurrency import run_in_threadpool

_hasher = PasswordHasher()  # argon2id with the library's defaults


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random password, verified when the e-mail is unknown so timing does not tell.

    Made at the first such login, in the worker thread, not at import: one argon2 hash (~170 ms)
    was a visible part of every start, which a restart after a crash waits for.
    """
    return _hasher.hash(secrets.token_urlsafe(16))


async def hash_password(password: str) -> str:
    """argon2id hash, computed in a worker thread."""
    return await run_in_threadpool(_hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """True if the password matches; constant work whether or not the user exists."""

    def _check() -> bool:
        try:
            return _hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await run_in_threadpool(_check)


def new_token() -> tuple[str, str]:
    """A session token for the cookie and its SHA-256 for the database."""
    token = secrets.token_urlsafe(32)
    return token, token_digest(token)


def token_digest(token: str) -> str:
    """SHA-256 hex of a session token."""
    return hashlib.sha256(token.encode()).hexdigest()
