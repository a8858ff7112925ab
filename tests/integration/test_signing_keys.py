"""Signing keys (DSK I.4, I.5) on SQLite and PostgreSQL: bound to an admin, valid for a period,
revocable with a reason; import of existing Ed25519 keys; refusal of anything else with nothing
changed; KEK rotation carries the keys along."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, text
from tests import auditkit as kit

from pforte.audit import checkpoints
from pforte.audit.models import AuditEvent
from pforte.audit.service import CLI
from pforte.bootstrap import Services, build_services
from pforte.clock import FakeClock
from pforte.config import Settings
from pforte.crypto import rotation, signing
from pforte.crypto.keys import FileKeyProvider, KeyService
from pforte.crypto.models import SigningKey
from pforte.errors import ConflictError, NotFoundError, ValidationError

cli = kit.cli  # the command-line fixture, shared with the other audit tests


@pytest.fixture
async def sv(settings: Settings) -> AsyncIterator[Services]:
    """pforte's services on a fake clock (no background workers)."""
    services = build_services(settings.model_copy(update={"run_workers": False}), clock=FakeClock(kit.START))
    try:
        yield services
    finally:
        await services.stop()


def _pem(private: Ed25519PrivateKey, password: bytes | None = None) -> bytes:
    crypt = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, crypt)


def _openssh(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def _rsa_pem() -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_hex(private: Ed25519PrivateKey) -> str:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


async def _state(sv: Services) -> tuple[Any, ...]:
    """Everything a refused command must leave as it was: signing keys and the audit log."""
    async with sv.db.engine.connect() as c:
        keys = (await c.execute(select(SigningKey).order_by(SigningKey.id))).all()
        entries = (await c.execute(select(func.count()).select_from(AuditEvent))).scalar_one()
    return tuple(tuple(k) for k in keys), entries


async def _row(sv: Services, key_id: str) -> Any:
    async with sv.db.engine.connect() as c:
        return (await c.execute(select(SigningKey).where(SigningKey.id == key_id))).one()


@pytest.mark.dsk("I.5")
async def test_a_key_is_bound_to_an_admin_of_its_organisation(sv):
    org = await kit.make_org(sv)
    other = await kit.make_org(sv, slug="praxis")
    before = await _state(sv)
    async with sv.db.transaction() as s:
        with pytest.raises(ValidationError, match="must be an active admin") as not_admin:
            await signing.create(
                s, sv.keys, org_id=org.id, owner_id=org.staff_id, now=sv.clock.now(), actor=CLI
            )
        with pytest.raises(NotFoundError) as foreign:
            await signing.create(
                s, sv.keys, org_id=org.id, owner_id=other.admin_id, now=sv.clock.now(), actor=CLI
            )
        with pytest.raises(ValidationError, match="validity"):
            await signing.create(
                s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI, valid_days=0
            )
    assert (not_admin.value.code, foreign.value.code) == ("owner_not_admin", "owner_not_found")
    assert await _state(sv) == before
    async with sv.db.transaction() as s:
        info = await signing.create(
            s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI, valid_days=30
        )
    assert (info.created_by, info.org_id, info.imported) == (org.admin_id, org.id, False)
    assert info.valid_until - info.valid_from == timedelta(days=30)
    async with sv.db.transaction() as s:
        (entry,) = (
            await s.execute(select(AuditEvent).where(AuditEvent.action == "keys.signing_create"))
        ).scalars()
    assert (entry.chain, entry.object_id, entry.details["owner"]) == (org.id, info.id, org.admin_id)
    assert entry.details["fingerprint"] == info.fingerprint
    # The private half is in the database only wrapped under the organisation's KEK.
    row = await _row(sv, info.id)
    assert row.private_wrapped is not None and len(row.private_wrapped) == 40
    assert bytes.fromhex(info.public_key) not in row.private_wrapped


@pytest.mark.dsk("I.5")
async def test_revocation_destroys_the_private_half_and_signing_stops(sv):
    org = await kit.make_org(sv)
    async with sv.db.transaction() as s:
        key = await signing.create(
            s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI
        )
        before = await signing.sign(s, sv.keys, org_id=org.id, data=b"befund", now=sv.clock.now())
    assert before.key_id == key.id
    sv.clock.advance(hours=2)
    async with sv.db.transaction() as s:
        with pytest.raises(ValidationError, match="needs a reason"):
            await signing.revoke(s, org_id=org.id, key_id=key.id, reason="  ", now=sv.clock.now(), actor=CLI)
        revoked = await signing.revoke(
            s, org_id=org.id, key_id=key.id, reason="owner left the clinic", now=sv.clock.now(), actor=CLI
        )
    assert revoked.status(sv.clock.now()) == "revoked" and revoked.revoked_reason == "owner left the clinic"
    assert (await _row(sv, key.id)).private_wrapped is None
    unchanged = await _state(sv)
    async with sv.db.transaction() as s:
        assert await signing.active_key(s, org.id, sv.clock.now()) is None
        with pytest.raises(ConflictError) as no_key:
            await signing.sign(s, sv.keys, org_id=org.id, data=b"befund", now=sv.clock.now())
        with pytest.raises(ConflictError, match="already revoked"):
            await signing.revoke(
                s, org_id=org.id, key_id=key.id, reason="again", now=sv.clock.now(), actor=CLI
            )
    assert no_key.value.code == "no_signing_key"
    assert await _state(sv) == unchanged
    async with sv.db.transaction() as s:
        # Made before the revocation: still counts.
        old = await signing.check(
            s, key_id=key.id, data=b"befund", signature_hex=before.signature, signed_at=before.signed_at
        )
        # The same signature claimed for a moment after the revocation: refused, with the reason.
        late = await signing.check(
            s, key_id=key.id, data=b"befund", signature_hex=before.signature, signed_at=sv.clock.now()
        )
        forged = await signing.check(
            s, key_id=key.id, data=b"anders", signature_hex=before.signature, signed_at=before.signed_at
        )
        unknown = await signing.check(
            s, key_id="0" * 32, data=b"befund", signature_hex=before.signature, signed_at=before.signed_at
        )
    assert old.ok and old.reason is None
    assert not late.ok and "revoked" in (late.reason or "") and "owner left the clinic" in (late.reason or "")
    assert not forged.ok and "does not match" in (forged.reason or "")
    assert not unknown.ok and "does not know" in (unknown.reason or "")


@pytest.mark.dsk("I.5")
async def test_a_stolen_key_signing_after_revocation_is_refused(sv):
    """The private half may have leaked before the revocation: whatever it signs dated afterwards
    is refused; what it signed before still counts."""
    org = await kit.make_org(sv)
    leaked = Ed25519PrivateKey.generate()
    async with sv.db.transaction() as s:
        key = await signing.import_key(
            s, sv.keys, org_id=org.id, owner_id=org.admin_id, pem=_pem(leaked), now=sv.clock.now(), actor=CLI
        )
    sv.clock.advance(days=3)
    signed_before = sv.clock.now()
    sig_before = leaked.sign(b"protokoll").hex()
    sv.clock.advance(days=1)
    async with sv.db.transaction() as s:
        await signing.revoke(
            s, org_id=org.id, key_id=key.id, reason="key leaked", now=sv.clock.now(), actor=CLI
        )
    sv.clock.advance(minutes=5)
    async with sv.db.transaction() as s:
        before = await signing.check(
            s, key_id=key.id, data=b"protokoll", signature_hex=sig_before, signed_at=signed_before
        )
        after = await signing.check(
            s,
            key_id=key.id,
            data=b"protokoll",
            signature_hex=leaked.sign(b"protokoll").hex(),
            signed_at=sv.clock.now(),
        )
    assert before.ok
    assert (
        not after.ok and "key leaked" in (after.reason or "") and "after a revocation" in (after.reason or "")
    )


@pytest.mark.dsk("I.5")
async def test_an_expired_key_no_longer_signs_and_later_signatures_are_refused(sv):
    org = await kit.make_org(sv)
    async with sv.db.transaction() as s:
        key = await signing.create(
            s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI, valid_days=1
        )
        made = await signing.sign(s, sv.keys, org_id=org.id, data=b"x", now=sv.clock.now())
    sv.clock.advance(days=1, seconds=1)
    async with sv.db.transaction() as s:
        assert (await signing.get(s, org.id, key.id)).status(sv.clock.now()) == "expired"
        assert await signing.active_key(s, org.id, sv.clock.now()) is None
        with pytest.raises(ConflictError):
            await signing.sign(s, sv.keys, org_id=org.id, data=b"x", now=sv.clock.now())
        then = await signing.check(
            s, key_id=key.id, data=b"x", signature_hex=made.signature, signed_at=made.signed_at
        )
        late = await signing.check(
            s, key_id=key.id, data=b"x", signature_hex=made.signature, signed_at=sv.clock.now()
        )
        # No checkpoint without an active key; the report shows the missing key instead.
        assert await checkpoints.checkpoint(s, sv.keys, org_id=org.id, now=sv.clock.now()) is None
    assert then.ok
    assert not late.ok and "outside the validity" in (late.reason or "")


@pytest.mark.dsk("I.4")
async def test_import_takes_ed25519_pem_and_openssh_and_refuses_everything_else(sv, tmp_path):
    org = await kit.make_org(sv)
    pkcs8, ssh = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    async with sv.db.transaction() as s:
        a = await signing.import_key(
            s,
            sv.keys,
            org_id=org.id,
            owner_id=org.admin_id,
            pem=_pem(pkcs8, b"geheim-123"),
            password=b"geheim-123",
            now=sv.clock.now(),
            actor=CLI,
        )
        b = await signing.import_key(
            s, sv.keys, org_id=org.id, owner_id=org.admin_id, pem=_openssh(ssh), now=sv.clock.now(), actor=CLI
        )
    assert (a.public_key, b.public_key) == (_public_hex(pkcs8), _public_hex(ssh))
    assert a.imported and b.imported
    before = await _state(sv)
    refusals = [
        (_rsa_pem(), None, "only Ed25519"),
        (b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", None, "not a PEM"),
        (b"\x00\x01 garbage", None, "not a PEM"),
        (_pem(Ed25519PrivateKey.generate(), b"geheim-123"), None, "it is encrypted"),
        (_pem(Ed25519PrivateKey.generate(), b"geheim-123"), b"falsch", "the password is wrong"),
        (
            Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            None,
            "not a PEM",
        ),
    ]
    for pem, password, message in refusals:
        async with sv.db.transaction() as s:
            with pytest.raises(ValidationError, match=message):
                await signing.import_key(
                    s,
                    sv.keys,
                    org_id=org.id,
                    owner_id=org.admin_id,
                    pem=pem,
                    password=password,
                    now=sv.clock.now(),
                    actor=CLI,
                )
    async with sv.db.transaction() as s:
        with pytest.raises(ConflictError, match="already registered"):
            await signing.import_key(
                s,
                sv.keys,
                org_id=org.id,
                owner_id=org.admin_id,
                pem=_pem(pkcs8),
                now=sv.clock.now(),
                actor=CLI,
            )
    assert await _state(sv) == before


# --- KEK rotation ---------------------------------------------------------------------------------


@pytest.mark.dsk("I.5")
async def test_rotation_rewraps_signing_keys_and_retiring_never_strands_one(sv):
    org = await kit.make_org(sv)
    async with sv.db.transaction() as s:
        retired_key = await signing.create(
            s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI
        )
        await signing.revoke(
            s, org_id=org.id, key_id=retired_key.id, reason="replaced", now=sv.clock.now(), actor=CLI
        )
        sv.clock.advance(minutes=1)
        live = await signing.create(
            s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI
        )
        cp = await checkpoints.checkpoint(s, sv.keys, org_id=org.id, now=sv.clock.now())
    assert cp is not None
    old = (await _row(sv, live.id)).kek_id
    old_wrapped = (await _row(sv, live.id)).private_wrapped

    old_, new = await rotation.switch_kek(db=sv.db, keys=sv.keys, org_id=org.id, now=sv.clock.now())
    assert old_ == old
    # Data keys moved, signing keys not yet: the old KEK must not go.
    await _move_data_keys_only(sv, org.id)
    async with sv.db.engine.connect() as c:
        refs = await rotation.references(c, old)
    assert (refs.organisations, refs.live_keys, refs.destroyed_keys, refs.signing_keys) == (0, 0, 0, 2)
    with pytest.raises(ConflictError, match=r"and 2 signing key\(s\); not retired"):
        await rotation.retire(db=sv.db, keys=sv.keys, kek_id=old, now=sv.clock.now())
    status = await rotation.status(db=sv.db, keys=sv.keys, now=sv.clock.now())
    (mine,) = status.organisations
    assert mine.rotation_pending and mine.signing_keys == {old: {"live": 1, "revoked": 1}}
    assert old not in [k for k, _, _ in status.retirable]

    moved = await rotation.rewrap(db=sv.db, keys=sv.keys, org_id=org.id, batch=1)
    assert (moved.signing_rewrapped, moved.signing_moved_revoked, moved.rewrapped) == (1, 1, 0)
    after = await _row(sv, live.id)
    assert after.kek_id == new and after.private_wrapped not in (None, old_wrapped)
    assert (await _row(sv, retired_key.id)).kek_id == new and (
        await _row(sv, retired_key.id)
    ).private_wrapped is None
    await rotation.retire(db=sv.db, keys=sv.keys, kek_id=old, now=sv.clock.now())

    # A fresh process with only the key ring on disk signs with the same key and the same public half.
    fresh = KeyService(FileKeyProvider(Path(sv.settings.effective_key_file)))
    await kit.record_many(sv, org.id, 1)
    async with sv.db.transaction() as s:
        sig = await signing.sign(s, fresh, org_id=org.id, data=b"nach der Rotation", now=sv.clock.now())
        assert sig.key_id == live.id and sig.public_key == live.public_key
        assert (
            await signing.check(
                s,
                key_id=live.id,
                data=b"nach der Rotation",
                signature_hex=sig.signature,
                signed_at=sig.signed_at,
            )
        ).ok
        assert await checkpoints.checkpoint(s, fresh, org_id=org.id, now=sv.clock.now()) is not None
    r = await kit.verify(sv, org.id)
    assert r.ok and r.checkpoints_ok == 2


async def _move_data_keys_only(sv: Services, org_id: str) -> None:
    """Re-wrap the data keys but leave the signing keys (a rotation by a release before this one)."""
    async with sv.db.engine.connect() as c:
        current = (
            await c.execute(text("SELECT kek_id FROM organisations WHERE id = :o"), {"o": org_id})
        ).scalar()
        olds = list(
            (
                await c.execute(
                    text("SELECT DISTINCT kek_id FROM data_keys WHERE org_id = :o AND kek_id != :k"),
                    {"o": org_id, "k": current},
                )
            ).scalars()
        )
    out = rotation.Rewrap()
    for old in olds:
        after = ""
        while (
            last := await rotation._rewrap_batch(
                sv.db, sv.keys, rotation.DATA_KEYS, org_id, old, current, 50, after, out
            )
        ) is not None:
            after = last
    assert out.rewrapped == 2


@pytest.mark.dsk("I.5")
async def test_a_key_made_with_a_kek_read_before_the_switch_ends_up_under_the_new_kek(sv, monkeypatch):
    org = await kit.make_org(sv)
    old, new = await rotation.switch_kek(db=sv.db, keys=sv.keys, org_id=org.id, now=sv.clock.now())
    real = signing._kek_of

    async def read_just_before_the_switch(db: Any, org_id: str, *, lock: bool = False) -> str:
        return await real(db, org_id, lock=True) if lock else old

    monkeypatch.setattr(signing, "_kek_of", read_just_before_the_switch)
    async with sv.db.transaction() as s:
        key = await signing.create(
            s, sv.keys, org_id=org.id, owner_id=org.admin_id, now=sv.clock.now(), actor=CLI
        )
    assert (await _row(sv, key.id)).kek_id == new
    async with sv.db.transaction() as s:
        assert (await signing.sign(s, sv.keys, org_id=org.id, data=b"x", now=sv.clock.now())).key_id == key.id


# --- the command line ------------------------------------------------------------------------------


@pytest.mark.dsk("I.5")
def test_keys_signing_create_list_revoke_import_from_the_command_line(cli, settings, tmp_path, monkeypatch):
    org = kit.with_services(settings, kit.make_org)
    state = lambda: kit.with_services(settings, _state)  # noqa: E731

    made = cli(
        "keys",
        "signing",
        "create",
        "--org",
        "klinikum",
        "--owner",
        "ADMIN@klinikum.test",
        "--valid-days",
        "90",
    )
    assert made.output.startswith("created signing key ")
    key_id = made.output.split()[3].rstrip(",")

    leaked = Ed25519PrivateKey.generate()
    pem_file = tmp_path / "signing.pem"
    pem_file.write_bytes(_pem(leaked, b"geheim-123"))
    monkeypatch.setenv("PFORTE_TEST_KEY_PASSWORD", "geheim-123")
    imported = cli(
        "keys", "signing", "import", "--org", "klinikum", "--owner", org.admin_email,
        "--private-key", str(pem_file), "--password-env", "PFORTE_TEST_KEY_PASSWORD",
    )  # fmt: skip
    assert imported.output.startswith("imported signing key ")
    ssh_file = tmp_path / "id_ed25519"
    ssh_file.write_bytes(_openssh(Ed25519PrivateKey.generate()))
    cli(
        "keys",
        "signing",
        "import",
        "--org",
        "klinikum",
        "--owner",
        org.admin_email,
        "--private-key",
        str(ssh_file),
    )

    listed = cli("keys", "signing", "list", "--org", "klinikum").output.splitlines()
    assert len(listed) == 3 and all(
        org.admin_email in line and line.endswith(("active", "imported")) for line in listed
    )
    until = (datetime.now(UTC) + timedelta(days=90)).date().isoformat()
    assert next(line for line in listed if line.startswith(key_id)).split("valid until ")[1].startswith(until)

    out = cli("keys", "signing", "revoke", "--org", "klinikum", key_id, "--reason", "Laptop gestohlen").output
    assert out.startswith(f"revoked signing key {key_id}")
    rows = {
        r["id"]: r for r in json.loads(cli("keys", "signing", "list", "--org", "klinikum", "--json").output)
    }
    assert (rows[key_id]["status"], rows[key_id]["revoked_reason"]) == ("revoked", "Laptop gestohlen")
    assert rows[key_id]["owner"] == org.admin_email and rows[key_id]["imported"] is False
    assert sorted(r["status"] for r in rows.values()) == ["active", "active", "revoked"]
    assert _public_hex(leaked) in [r["public_key"] for r in rows.values() if r["imported"]]
    text_list = cli("keys", "signing", "list", "--org", "klinikum").output.splitlines()
    assert next(line for line in text_list if line.startswith(key_id)).endswith(": Laptop gestohlen")

    # Bad input: one line, exit 2, nothing changed.
    before = state()
    rsa_file = tmp_path / "rsa.pem"
    rsa_file.write_bytes(_rsa_pem())
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello")
    mk = ("create", "--org", "klinikum", "--owner")
    imp = ("import", "--org", "klinikum", "--owner", org.admin_email, "--private-key")
    pw = "--password-env"
    bad = [
        (("revoke", "--org", "klinikum", key_id, "--reason", "again"), "this key is already revoked"),
        (("revoke", "--org", "klinikum", "0" * 32, "--reason", "x"), "signing key not found"),
        (("revoke", "--org", "klinikum", key_id, "--reason", " "), "a revocation needs a reason"),
        (("create", "--org", "nope", "--owner", org.admin_email), "organisation not found"),
        ((*mk, "niemand@klinikum.test"), "no staff account with this e-mail"),
        ((*mk, org.staff_email), "the owner of a signing key must be an active admin"),
        ((*mk, org.admin_email, "--valid-days", "5000"), "validity must be 1 to 3650"),
        ((*imp, str(rsa_file)), "only Ed25519"),
        ((*imp, str(garbage)), "not a PEM"),
        ((*imp, str(tmp_path / "missing.pem")), "cannot read"),
        ((*imp, str(pem_file)), "it is encrypted"),
        ((*imp, str(pem_file), pw, "PFORTE_UNSET_VAR"), "is not set"),
        ((*imp, str(pem_file), pw, "PFORTE_TEST_KEY_PASSWORD"), "already registered"),
    ]
    for args, message in bad:
        r = cli("keys", "signing", *args, code=2)
        assert r.output.count("\n") == 1 and r.output.startswith("pforte: ") and message in r.output, (
            args,
            r.output,
        )
    assert state() == before
    assert "geheim" not in "".join(cli("keys", "signing", "list", "--org", "klinikum", "--json").output)
