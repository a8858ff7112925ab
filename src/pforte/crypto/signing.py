"""Ed25519 signing keys with an owner, a validity period and revocation (DSK I.4, I.5).

A signing key signs an organisation's audit checkpoints and its conversation exports. Each key is
bound to the organisation and to the admin who created or imported it, is valid from its creation
for a set number of days, and can be revoked with a reason. The private key exists in the database
only wrapped under the organisation's KEK (the same key provider as the data keys, outside the
database); revoking a key destroys its private half, so nothing can be signed with it any more.
The public half stays, because signatures made before the revocation remain valid evidence.

:func:`check` is the one place that decides whether a signature counts. It refuses a signature by
an unknown key, one that does not verify, one dated outside the key's validity, and one dated at or
after the key's revocation, and says which. A compromised key could be used to forge a signature
dated before its revocation; that is why checkpoints also sit in the hash chain's order and why a
compromise should be followed by a new checkpoint under a fresh key (see docs/signing-keys.md).

A private key is made under the organisation's current KEK and, like a data key, fenced against a
KEK rotation that commits meanwhile (see crypto/rotation.py, invariant 2); rotation re-wraps signing
keys together with data keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select, update

from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.crypto.keys import KeyService
from pforte.crypto.models import SigningKey
from pforte.db import Executor, new_id, table_of
from pforte.errors import ConflictError, NotFoundError, ValidationError
from pforte.orgs.models import Organisation
from pforte.staff.models import StaffUser

SK = table_of(SigningKey)
ORG = table_of(Organisation)
STAFF = table_of(StaffUser)

DEFAULT_VALID_DAYS = 730
MAX_VALID_DAYS = 3650
ALGORITHM = "ed25519"


@dataclass(frozen=True)
class KeyInfo:
    """A signing key's public facts (never the private half)."""

    id: str
    org_id: str
    algorithm: str
    public_key: str
    fingerprint: str
    created_by: str | None
    created_at: datetime
    imported: bool
    valid_from: datetime
    valid_until: datetime
    revoked_at: datetime | None
    revoked_by: str | None
    revoked_reason: str | None

    def status(self, now: datetime) -> str:
        """active | revoked | expired | not_yet_valid."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if now < self.valid_from:
            return "not_yet_valid"
        if now >= self.valid_until:
            return "expired"
        return "active"


@dataclass(frozen=True)
class Signature:
    """A detached signature and what is needed to check it later."""

    key_id: str
    fingerprint: str
    public_key: str
    algorithm: str
    signed_at: datetime
    signature: str  # hex


@dataclass(frozen=True)
class Verdict:
    """Whether a signature counts; if not, why (a sentence for the operator)."""

    ok: bool
    reason: str | None = None
    key: KeyInfo | None = None


def fingerprint_of(public_raw: bytes) -> str:
    """SHA-256 of the raw 32-byte public key, hex."""
    return hashlib.sha256(public_raw).hexdigest()


def _public_raw(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_raw(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _info(row: object) -> KeyInfo:
    return KeyInfo(**{f: getattr(row, f) for f in KeyInfo.__dataclass_fields__})


def load_private_pem(pem: bytes, password: bytes | None = None) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8) or OpenSSH format; ValidationError otherwise."""
    key: object
    try:
        if pem.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(pem, password=password)
        else:
            key = serialization.load_pem_private_key(pem, password=password)
    except TypeError:
        hint = "it is encrypted: give its password" if password is None else "it is not encrypted"
        raise ValidationError(f"the private key cannot be read ({hint})", code="bad_key") from None
    except UnsupportedAlgorithm:
        raise ValidationError(
            "this private key format is not supported (an encrypted OpenSSH key: remove its passphrase "
            "on a copy with ssh-keygen -p, or export it as PKCS#8)",
            code="bad_key",
        ) from None
    except ValueError:
        hint = "" if password is None else ", or the password is wrong"
        raise ValidationError(f"not a PEM or OpenSSH private key{hint}", code="bad_key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValidationError("only Ed25519 keys can be imported", code="bad_key_type")
    return key


async def _kek_of(db: Executor, org_id: str, *, lock: bool = False) -> str:
    q = select(ORG.c.kek_id).where(ORG.c.id == org_id)
    kek = (await db.execute(q.with_for_update(read=True) if lock else q)).scalar_one_or_none()
    if kek is None:
        raise NotFoundError("organisation not found")
    return str(kek)


async def _check_owner(db: Executor, org_id: str, owner_id: str) -> None:
    """A key is bound to a person (DSK I.5): an active admin of the same organisation."""
    row = (
        await db.execute(select(STAFF.c.org_id, STAFF.c.role, STAFF.c.active).where(STAFF.c.id == owner_id))
    ).first()
    if row is None or row.org_id != org_id:
        raise NotFoundError("the owner is not a staff account of this organisation", code="owner_not_found")
    if row.role != "admin" or not row.active:
        raise ValidationError("the owner of a signing key must be an active admin", code="owner_not_admin")


def _validity(valid_days: int) -> timedelta:
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise ValidationError(f"validity must be 1 to {MAX_VALID_DAYS} days", code="bad_validity")
    return timedelta(days=valid_days)


async def _store(
    db: Executor,
    keys: KeyService,
    private: Ed25519PrivateKey,
    *,
    org_id: str,
    owner_id: str,
    now: datetime,
    valid_days: int,
    imported: bool,
    actor: Actor,
) -> KeyInfo:
    span = _validity(valid_days)
    kek_id = await _kek_of(db, org_id)
    await _check_owner(db, org_id, owner_id)
    public = _public_raw(private)
    fp = fingerprint_of(public)
    clash = (await db.execute(select(SK.c.id).where(SK.c.org_id == org_id, SK.c.fingerprint == fp))).first()
    if clash is not None:
        raise ConflictError("this key is already registered", code="key_exists")
    row: dict[str, Any] = {
        "id": new_id(),
        "org_id": org_id,
        "algorithm": ALGORITHM,
        "public_key": public.hex(),
        "fingerprint": fp,
        "kek_id": kek_id,
        "private_wrapped": keys.wrap(kek_id=kek_id, key=_private_raw(private)),
        "created_by": owner_id,
        "created_at": now,
        "imported": imported,
        "valid_from": now,
        "valid_until": now + span,
        "revoked_at": None,
        "revoked_by": None,
        "revoked_reason": None,
    }
    await db.execute(SK.insert().values(**row))
    # The KEK fence (crypto/rotation.py, invariant 2): now that the row exists, hold the organisation
    # row FOR SHARE (SQLite: this transaction holds the write lock); a switch that committed since the
    # KEK was read is seen here, and the private key goes under the new KEK before commit.
    current = await _kek_of(db, org_id, lock=True)
    if current != kek_id:
        await db.execute(
            update(SK)
            .where(SK.c.id == row["id"])
            .values(kek_id=current, private_wrapped=keys.wrap(kek_id=current, key=_private_raw(private)))
        )
    await audit.record(
        db,
        org_id=org_id,
        actor=actor,
        action="keys.signing_import" if imported else "keys.signing_create",
        now=now,
        object_kind="signing_key",
        object_id=row["id"],
        details={"fingerprint": fp, "owner": owner_id, "valid_until": row["valid_until"].isoformat()},
    )
    row.pop("private_wrapped")
    row.pop("kek_id")
    return KeyInfo(**row)


async def create(
    db: Executor,
    keys: KeyService,
    *,
    org_id: str,
    owner_id: str,
    now: datetime,
    actor: Actor,
    valid_days: int = DEFAULT_VALID_DAYS,
) -> KeyInfo:
    """Generate a new key pair for an organisation, owned by an admin; audited."""
    return await _store(
        db,
        keys,
        Ed25519PrivateKey.generate(),
        org_id=org_id,
        owner_id=owner_id,
        now=now,
        valid_days=valid_days,
        imported=False,
        actor=actor,
    )


async def import_key(
    db: Executor,
    keys: KeyService,
    *,
    org_id: str,
    owner_id: str,
    pem: bytes,
    now: datetime,
    actor: Actor,
    password: bytes | None = None,
    valid_days: int = DEFAULT_VALID_DAYS,
) -> KeyInfo:
    """Register an existing Ed25519 key pair (PEM or OpenSSH private key); audited (DSK I.4)."""
    private = load_private_pem(pem, password)
    return await _store(
        db,
        keys,
        private,
        org_id=org_id,
        owner_id=owner_id,
        now=now,
        valid_days=valid_days,
        imported=True,
        actor=actor,
    )


async def lookup(db: Executor, key_id: str) -> KeyInfo | None:
    """Any organisation's key by id, or None: for checking signatures, never for signing."""
    row = (await db.execute(select(SK).where(SK.c.id == key_id))).first()
    return _info(row) if row is not None else None


async def get(db: Executor, org_id: str, key_id: str) -> KeyInfo:
    """One key of an organisation (NotFoundError for another organisation's key)."""
    row = (await db.execute(select(SK).where(SK.c.id == key_id, SK.c.org_id == org_id))).first()
    if row is None:
        raise NotFoundError("signing key not found")
    return _info(row)


async def list_keys(db: Executor, org_id: str) -> list[KeyInfo]:
    """An organisation's keys, newest first."""
    rows = await db.execute(select(SK).where(SK.c.org_id == org_id).order_by(SK.c.created_at.desc()))
    return [_info(r) for r in rows]


async def revoke(
    db: Executor, *, org_id: str, key_id: str, reason: str, now: datetime, actor: Actor
) -> KeyInfo:
    """Revoke a key: its private half is destroyed and signatures dated from now on are refused."""
    reason = reason.strip()
    if not reason:
        raise ValidationError("a revocation needs a reason", code="reason_missing")
    if len(reason) > 200:
        raise ValidationError("the reason is longer than 200 characters", code="reason_too_long")
    key = await get(db, org_id, key_id)
    if key.revoked_at is not None:
        raise ConflictError("this key is already revoked", code="already_revoked")
    done = await db.execute(
        update(SK)
        .where(SK.c.id == key_id, SK.c.revoked_at.is_(None))
        .values(revoked_at=now, revoked_by=actor.id, revoked_reason=reason, private_wrapped=None)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]  # revoked by someone else meanwhile
        raise ConflictError("this key is already revoked", code="already_revoked")
    await audit.record(
        db,
        org_id=org_id,
        actor=actor,
        action="keys.signing_revoke",
        now=now,
        object_kind="signing_key",
        object_id=key_id,
        details={"fingerprint": key.fingerprint, "reason": reason},
    )
    return await get(db, org_id, key_id)


async def active_key(db: Executor, org_id: str, now: datetime) -> KeyInfo | None:
    """The newest key that may sign now, or None."""
    for key in await list_keys(db, org_id):
        if key.status(now) == "active":
            return key
    return None


async def sign(db: Executor, keys: KeyService, *, org_id: str, data: bytes, now: datetime) -> Signature:
    """Sign bytes with the organisation's active key; ConflictError ``no_signing_key`` if it has none."""
    key = await active_key(db, org_id, now)
    if key is None:
        raise ConflictError(
            "the organisation has no active signing key (pforte keys signing create)", code="no_signing_key"
        )
    row = (await db.execute(select(SK.c.kek_id, SK.c.private_wrapped).where(SK.c.id == key.id))).one()
    if row.private_wrapped is None:  # revoked between the two reads
        raise ConflictError("the signing key was revoked just now", code="no_signing_key")
    raw = keys.unwrap(kek_id=row.kek_id, wrapped=row.private_wrapped)
    signature = Ed25519PrivateKey.from_private_bytes(raw).sign(data)
    return Signature(
        key_id=key.id,
        fingerprint=key.fingerprint,
        public_key=key.public_key,
        algorithm=ALGORITHM,
        signed_at=now,
        signature=signature.hex(),
    )


def signature_matches(public_key_hex: str, data: bytes, signature_hex: str) -> bool:
    """Whether an Ed25519 signature over ``data`` verifies under a raw public key (both hex)."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(
            bytes.fromhex(signature_hex), data
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def judge(key: KeyInfo | None, data: bytes, signature_hex: str, signed_at: datetime) -> Verdict:
    """Whether a signature made at ``signed_at`` by ``key`` counts; the reason if not."""
    if key is None:
        return Verdict(False, "signed by a key this instance does not know")
    if not signature_matches(key.public_key, data, signature_hex):
        return Verdict(False, f"the signature does not match (key {key.fingerprint[:16]})", key)
    if key.revoked_at is not None and signed_at >= key.revoked_at:
        return Verdict(
            False,
            f"signed on {signed_at:%Y-%m-%d %H:%M} UTC by key {key.fingerprint[:16]}, which was revoked on "
            f"{key.revoked_at:%Y-%m-%d %H:%M} UTC ({key.revoked_reason}); signatures made after a "
            "revocation are refused",
            key,
        )
    if signed_at < key.valid_from or signed_at >= key.valid_until:
        return Verdict(
            False,
            f"signed on {signed_at:%Y-%m-%d %H:%M} UTC, outside the validity of key {key.fingerprint[:16]} "
            f"({key.valid_from:%Y-%m-%d} to {key.valid_until:%Y-%m-%d})",
            key,
        )
    return Verdict(True, None, key)


async def check(
    db: Executor, *, key_id: str, data: bytes, signature_hex: str, signed_at: datetime
) -> Verdict:
    """Judge a signature against this instance's key registry (any organisation's key by id)."""
    return judge(await lookup(db, key_id), data, signature_hex, signed_at)
