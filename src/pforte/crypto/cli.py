"""``pforte keys`` commands: status, rotate, retire; ``pforte keys signing`` create, list, revoke, import.

Safe to run while ``pforte serve`` uses the same database and key file: see ``crypto/rotation.py``.
Output names organisations, KEK ids, public fingerprints and counts only, never key material.
Each signing-key command is one transaction together with its audit entry: it happens entirely or,
after a one-line error, not at all.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from pforte import clikit

keys_app = typer.Typer(no_args_is_help=True, help="Key-encryption keys (status, rotation) and signing keys")
signing_app = typer.Typer(
    no_args_is_help=True, help="Ed25519 signing keys of an organisation (audit checkpoints, exports)"
)
keys_app.add_typer(signing_app, name="signing")


def _age(seconds: float | None) -> str:
    """A short human age: 40d 3h, 5h 12m, 42s."""
    if seconds is None:
        return "unknown"
    s = max(int(seconds), 0)
    days, rest = divmod(s, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


@keys_app.command("status")
def status_cmd(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Per organisation: current KEK and its age, data keys per KEK, oldest live data key; retirable KEKs."""
    from pforte.crypto import rotation

    async def _do(sv: Any) -> rotation.KeyStatus:
        return await rotation.status(db=sv.db, keys=sv.keys, now=sv.clock.now())

    st = clikit.run(clikit.settings(), _do)
    if as_json:
        doc = {
            "organisations": [
                {
                    "org_id": o.org_id,
                    "slug": o.slug,
                    "kek_id": o.kek_id,
                    "kek_created_at": _iso(o.kek_created_at),
                    "kek_age_seconds": _seconds(o.kek_age_seconds),
                    "data_keys": o.data_keys,
                    "oldest_live_key_created_at": _iso(o.oldest_live_key_at),
                    "oldest_live_key_age_seconds": _seconds(o.oldest_live_key_age_seconds),
                    "signing_keys": o.signing_keys,
                    "rotation_pending": o.rotation_pending,
                }
                for o in st.organisations
            ],
            "retirable": [
                {"kek_id": k, "created_at": _iso(c), "age_seconds": _seconds(a)} for k, c, a in st.retirable
            ],
            "missing": st.missing,
        }
        typer.echo(json.dumps(doc, indent=1))
        return
    for o in st.organisations:
        typer.echo(f"{o.slug}  KEK {o.kek_id}  age {_age(o.kek_age_seconds)}")
        if not o.data_keys:
            typer.echo("  no data keys")
        for kek, n in o.data_keys.items():
            mark = "current" if kek == o.kek_id else "previous: run pforte keys rotate to finish"
            typer.echo(f"  {kek}: {n['live']} live, {n['destroyed']} destroyed data keys ({mark})")
        for kek, n in o.signing_keys.items():
            mark = "current" if kek == o.kek_id else "previous: run pforte keys rotate to finish"
            typer.echo(f"  {kek}: {n['live']} live, {n['revoked']} revoked signing keys ({mark})")
        typer.echo(f"  oldest live data key: {_age(o.oldest_live_key_age_seconds)}")
    if st.retirable:
        typer.echo("retirable KEKs (in the key ring, named by nothing):")
        for k, _, a in st.retirable:
            typer.echo(f"  {k}  age {_age(a)}")
    for k in st.missing:
        typer.echo(f"MISSING from the key ring: {k} (data under it cannot be read)")


@keys_app.command("rotate")
def rotate_cmd(
    org: str | None = typer.Option(None, "--org", help="organisation slug"),
    all_orgs: bool = typer.Option(False, "--all", help="every organisation"),
    retire: bool = typer.Option(False, "--retire", help="destroy the old KEK once nothing names it"),
    batch: int = typer.Option(500, min=1, max=10_000, help="data keys per transaction"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Wrap every data key under a new KEK while pforte keeps running; --retire destroys the old KEK."""
    from pforte.crypto import rotation
    from pforte.orgs import service as orgs

    if (org is None) == (not all_orgs):
        clikit.fail("give either --org SLUG or --all")

    async def _do(sv: Any) -> list[dict[str, Any]]:
        async with sv.db.transaction() as session:
            targets = (
                [await orgs.get_by_slug(session=session, slug=org)]
                if org
                else await orgs.list_(session=session)
            )
            pairs = [(o.id, o.slug) for o in targets]
        done = []
        for org_id, slug in pairs:
            r = await rotation.rotate(
                db=sv.db, keys=sv.keys, org_id=org_id, now=sv.clock.now(), retire_old=retire, batch=batch
            )
            done.append(
                {
                    "org_id": org_id,
                    "slug": slug,
                    "old_kek_id": r.old_kek_id,
                    "new_kek_id": r.new_kek_id,
                    "rewrapped": r.rewrapped,
                    "moved_destroyed": r.moved_destroyed,
                    "signing_rewrapped": r.signing_rewrapped,
                    "signing_moved_revoked": r.signing_moved_revoked,
                    "retired": r.retired,
                }
            )
            if not as_json:
                line = (
                    f"{slug}: {r.old_kek_id} -> {r.new_kek_id}; {r.rewrapped} data keys re-wrapped, "
                    f"{r.moved_destroyed} destroyed keys moved"
                )
                if r.signing_rewrapped or r.signing_moved_revoked:
                    line += (
                        f"; {r.signing_rewrapped} signing keys re-wrapped, "
                        f"{r.signing_moved_revoked} revoked signing keys moved"
                    )
                typer.echo(line + (f"; retired {', '.join(r.retired)}" if r.retired else ""))
        return done

    done = clikit.run(clikit.settings(), _do)
    if as_json:
        typer.echo(json.dumps(done, indent=1))


@keys_app.command("retire")
def retire_cmd(kek_id: str = typer.Argument(..., help="the KEK id, as shown by pforte keys status")) -> None:
    """Destroy a KEK that no organisation, data key or signing key names any more (refused otherwise)."""
    from pforte.crypto import rotation

    async def _do(sv: Any) -> None:
        await rotation.retire(db=sv.db, keys=sv.keys, kek_id=kek_id, now=sv.clock.now())

    clikit.run(clikit.settings(), _do)
    typer.echo(f"retired {kek_id}")


# --- signing keys --------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M} UTC" if value else "-"


async def _org_and_owner(session: Any, slug: str, email: str | None) -> tuple[str, str | None]:
    """The organisation's id and, if an e-mail is given, the id of that staff account in it."""
    from pforte.errors import NotFoundError
    from pforte.orgs import service as orgs
    from pforte.staff import service as staff

    org = await orgs.get_by_slug(session=session, slug=slug)
    if email is None:
        return org.id, None
    user = await staff.get_by_email(session=session, email=email)
    if user is None or user.org_id != org.id:
        raise NotFoundError("no staff account with this e-mail in the organisation", code="owner_not_found")
    return org.id, user.id


def _key_line(info: Any, owner: str | None, now: datetime) -> dict[str, Any]:
    status = info.status(now)
    return {
        "id": info.id,
        "fingerprint": info.fingerprint,
        "public_key": info.public_key,
        "algorithm": info.algorithm,
        "owner": owner,
        "imported": info.imported,
        "created_at": _iso(info.created_at),
        "valid_until": _iso(info.valid_until),
        "status": status,
        "revoked_at": _iso(info.revoked_at),
        "revoked_reason": info.revoked_reason,
    }


def _show(doc: dict[str, Any]) -> str:
    status = doc["status"]
    if status == "revoked":
        status = f"revoked {doc['revoked_at'][:16].replace('T', ' ')} UTC: {doc['revoked_reason']}"
    kind = ", imported" if doc["imported"] else ""
    return (
        f"{doc['id']}  {doc['fingerprint'][:16]}  {doc['owner'] or '(owner deleted)'}  "
        f"created {doc['created_at'][:10]}  valid until {doc['valid_until'][:10]}  {status}{kind}"
    )


def _made(doc: dict[str, Any], as_json: bool, verb: str) -> None:
    if as_json:
        typer.echo(json.dumps(doc, indent=1))
    else:
        typer.echo(f"{verb} signing key {doc['id']}, fingerprint {doc['fingerprint']}")
        typer.echo(f"  owner {doc['owner']}, valid until {doc['valid_until'][:16].replace('T', ' ')} UTC")


def _register_key(org: str, owner: str, as_json: bool, verb: str, store: Any) -> None:
    """Run ``store(session, keys, org_id=, owner_id=, now=)`` in one transaction and print the key."""

    async def _do(sv: Any) -> dict[str, Any]:
        async with sv.db.transaction() as session:
            org_id, owner_id = await _org_and_owner(session, org, owner)
            assert owner_id is not None
            now = sv.clock.now()
            info = await store(session, sv.keys, org_id=org_id, owner_id=owner_id, now=now)
            return _key_line(info, owner.strip().lower(), now)

    _made(clikit.run(clikit.settings(), _do), as_json, verb)


@signing_app.command("create")
def signing_create(
    org: str = typer.Option(..., help="organisation slug"),
    owner: str = typer.Option(..., help="e-mail of the admin the key is bound to"),
    valid_days: int = typer.Option(730, help="days the key may sign, from now (1 to 3650)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Generate a new Ed25519 signing key, bound to an admin of the organisation; audited."""
    from pforte.audit.service import CLI
    from pforte.crypto import signing

    _register_key(
        org, owner, as_json, "created", functools.partial(signing.create, actor=CLI, valid_days=valid_days)
    )


@signing_app.command("import")
def signing_import(
    org: str = typer.Option(..., help="organisation slug"),
    owner: str = typer.Option(..., help="e-mail of the admin the key is bound to"),
    private_key: Path = typer.Option(
        ..., "--private-key", help="Ed25519 private key: PEM (PKCS#8) or OpenSSH"
    ),
    password_env: str | None = typer.Option(
        None, "--password-env", help="name of the environment variable holding the key file's password"
    ),
    valid_days: int = typer.Option(730, help="days the key may sign, from now (1 to 3650)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Register an existing Ed25519 key pair for the organisation, bound to an admin; audited (DSK I.4)."""
    from pforte.audit.service import CLI
    from pforte.crypto import signing

    try:
        pem = private_key.read_bytes()
    except OSError as exc:
        clikit.fail(f"cannot read {private_key}: {exc.strerror or type(exc).__name__}")
    password: bytes | None = None
    if password_env is not None:
        value = os.environ.get(password_env)
        if not value:
            clikit.fail(f"the environment variable {password_env} is not set")
        password = value.encode()

    store = functools.partial(
        signing.import_key, pem=pem, password=password, actor=CLI, valid_days=valid_days
    )
    _register_key(org, owner, as_json, "imported", store)


@signing_app.command("list")
def signing_list(
    org: str = typer.Option(..., help="organisation slug"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """An organisation's signing keys, newest first: fingerprint, owner, validity, status."""
    from sqlalchemy import select

    from pforte.crypto import signing
    from pforte.staff.models import StaffUser

    async def _do(sv: Any) -> list[dict[str, Any]]:
        async with sv.db.transaction() as session:
            org_id, _ = await _org_and_owner(session, org, None)
            keys = await signing.list_keys(session, org_id)
            owners = {k.created_by for k in keys if k.created_by}
            found = await session.execute(
                select(StaffUser.id, StaffUser.email).where(StaffUser.id.in_(owners))
            )
            emails = {r.id: r.email for r in found}
            now = sv.clock.now()
            return [_key_line(k, emails.get(k.created_by or ""), now) for k in keys]

    rows = clikit.run(clikit.settings(), _do)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo("no signing keys (pforte keys signing create)")
    for r in rows:
        typer.echo(_show(r))


@signing_app.command("revoke")
def signing_revoke(
    key_id: str = typer.Argument(..., help="the key id, as shown by pforte keys signing list"),
    org: str = typer.Option(..., help="organisation slug"),
    reason: str = typer.Option(..., help="why, e.g. 'laptop of the owner stolen' (up to 200 characters)"),
) -> None:
    """Revoke a key: its private half is destroyed; signatures dated from now on are refused; audited."""
    from pforte.audit.service import CLI
    from pforte.crypto import signing

    async def _do(sv: Any) -> Any:
        async with sv.db.transaction() as session:
            org_id, _ = await _org_and_owner(session, org, None)
            return await signing.revoke(
                session, org_id=org_id, key_id=key_id, reason=reason, now=sv.clock.now(), actor=CLI
            )

    info = clikit.run(clikit.settings(), _do)
    typer.echo(f"revoked signing key {info.id} ({info.fingerprint[:16]}) at {_when(info.revoked_at)}")
