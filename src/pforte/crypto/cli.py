"""``pforte keys`` commands: status, rotate, retire.

Safe to run while ``pforte serve`` uses the same database and key file: see ``crypto/rotation.py``.
Output names organisations, KEK ids and counts only, never key material.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import typer

from pforte import clikit

keys_app = typer.Typer(no_args_is_help=True, help="Key-encryption keys: status and rotation")


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
                    "retired": r.retired,
                }
            )
            if not as_json:
                line = (
                    f"{slug}: {r.old_kek_id} -> {r.new_kek_id}; {r.rewrapped} data keys re-wrapped, "
                    f"{r.moved_destroyed} destroyed keys moved"
                )
                typer.echo(line + (f"; retired {', '.join(r.retired)}" if r.retired else ""))
        return done

    done = clikit.run(clikit.settings(), _do)
    if as_json:
        typer.echo(json.dumps(done, indent=1))


@keys_app.command("retire")
def retire_cmd(kek_id: str = typer.Argument(..., help="the KEK id, as shown by pforte keys status")) -> None:
    """Destroy a KEK that no organisation and no data key names any more (refused otherwise)."""
    from pforte.crypto import rotation

    async def _do(sv: Any) -> None:
        await rotation.retire(db=sv.db, keys=sv.keys, kek_id=kek_id, now=sv.clock.now())

    clikit.run(clikit.settings(), _do)
    typer.echo(f"retired {kek_id}")
