"""pforte's error hierarchy. Every error has a machine-readable ``code`` and an HTTP status.

    PforteError                 500 internal
     +-- ConfigError            bad setting: start-up stops with one line
     +-- NotFoundError          404 (also for objects of another organisation)
     +-- PermissionDenied       403
     +-- AuthenticationError    401 login needed or failed
     +-- ValidationError        400 bad input, nothing changed
     +-- ConflictError          409 state does not allow this (e.g. channel down)
     +-- PayloadTooLarge        413
     +-- ServiceUnavailable     503 e.g. database unreachable; the caller should retry
     +-- CryptoError            500 a ciphertext failed authentication or a key is missing

Messages are for operators and staff and must never contain message text, names, phone
numbers or tokens. Channel failures have their own tree in ``pforte.channels.base``.
"""

from __future__ import annotations

# How a dependency that is away (the database) is answered, by the app and by the webhook's edge.
UNAVAILABLE = {"error": "unavailable"}
RETRY_AFTER_SECONDS = 5


class PforteError(Exception):
    """Base class; ``code`` is stable and machine-readable."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        if code:
            self.code = code


class ConfigError(PforteError):
    """A setting is missing or invalid."""

    code = "config"


class NotFoundError(PforteError):
    """The object does not exist or belongs to another organisation."""

    code = "not_found"
    http_status = 404


class PermissionDenied(PforteError):
    """The caller's role does not allow this."""

    code = "forbidden"
    http_status = 403


class AuthenticationError(PforteError):
    """No valid session or wrong credentials."""

    code = "unauthenticated"
    http_status = 401


class ValidationError(PforteError):
    """Input was rejected; nothing was changed."""

    code = "invalid"
    http_status = 400


class ConflictError(PforteError):
    """The current state does not allow the action."""

    code = "conflict"
    http_status = 409


class PayloadTooLarge(PforteError):
    """The request body is over the limit."""

    code = "too_large"
    http_status = 413


class ServiceUnavailable(PforteError):
    """A dependency (usually the database) is unavailable; retry later."""

    code = "unavailable"
    http_status = 503


class CryptoError(PforteError):
    """Decryption failed or a key is missing or destroyed."""

    code = "crypto"
