"""``pforte audit``: verify the chain and its signed checkpoints, sign a checkpoint now.

``verify`` exits 0 when every chain holds, 1 with a report naming the first bad entry of each chain
that does not, 2 on bad input. Output names organisations, sequence numbers, entry ids, times and
key fingerprints, never what an entry is about.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import typer

from pforte import clikit

audit_app = typer.Typer(no_args_is_help=True, help="The audit log: verification and signed checkpoints")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _line(doc: dict[str, Any]) -> str:
    """One chain's verdict as one line."""
    name = doc["name"]
    if not doc["ok"]:
        where = f"entry {doc['first_bad_seq']} ({doc['kind']}"
        where += f", id {doc['entry_id']})" if doc["entry_id"] else ")"
        return f"{name}: FAILED at {where}: {doc['problem']}"
    text = f"{name}: {doc['entries']} entries ok"
    if doc["chain"] == "instance":
        return text + "; unsigned (the instance chain has no organisation key)"
    if doc["signed_seq"] is None:
        return text + "; no signed checkpoint yet (pforte keys signing create, pforte audit checkpoint)"
    text += (
        f"; {doc['checkpoints_ok']} checkpoints valid, the newest signs entry {doc['signed_seq']} "
        f"({doc['signed_at'][:16].replace('T', ' ')} UTC)"
    )
    newer = doc["entries"] - doc["signed_seq"]
    return text + (f", {newer} newer entries not signed yet" if newer > 0 else "")


@audit_app.command("verify")
def verify_cmd(
    org: str | None = typer.Option(None, "--org", help="only this organisation's chain"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Walk every chain (or one organisation's) and its signed checkpoints; exit 1 if any does not hold."""
    from sqlalchemy import select, union

    from pforte.audit import service as audit
    from pforte.audit.models import AuditCheckpoint, AuditEvent, AuditHead
    from pforte.orgs import service as orgs
    from pforte.orgs.models import Organisation

    async def _do(sv: Any) -> list[dict[str, Any]]:
        async with sv.db.transaction() as session:
            slugs = {r.id: r.slug for r in await session.execute(select(Organisation.id, Organisation.slug))}
            if org is not None:
                chains = [(await orgs.get_by_slug(session=session, slug=org)).id]
            else:
                # Every chain anything names: a deleted organisation's chain outlives it.
                named = union(
                    select(AuditHead.chain),
                    select(AuditEvent.chain).distinct(),
                    select(AuditCheckpoint.chain).distinct(),
                )
                found = set((await session.execute(named)).scalars()) | set(slugs) | {audit.INSTANCE}
                chains = sorted(found, key=lambda c: (c == audit.INSTANCE, slugs.get(c, "~" + c)))
        out = []
        for chain in chains:
            async with sv.db.engine.connect() as conn:
                r = await audit.verify(conn, chain)
            if chain == audit.INSTANCE:
                name = "instance"
            else:
                name = slugs.get(chain) or f"deleted organisation {chain}"
            out.append(
                {
                    "chain": chain,
                    "name": name,
                    "ok": r.ok,
                    "entries": r.entries,
                    "first_bad_seq": r.first_bad_seq,
                    "kind": r.kind,
                    "entry_id": r.entry_id,
                    "problem": r.problem,
                    "checkpoints_ok": r.checkpoints_ok,
                    "signed_seq": r.signed_seq,
                    "signed_at": _iso(r.signed_at),
                    "signed": chain != audit.INSTANCE,
                }
            )
        return out

    docs = clikit.run(clikit.settings(), _do)
    bad = [d for d in docs if not d["ok"]]
    if as_json:
        typer.echo(json.dumps({"ok": not bad, "chains": docs}, indent=1))
    else:
        for d in docs:
            typer.echo(_line(d))
        if bad:
            typer.echo(f"{len(bad)} of {len(docs)} chains FAILED verification (see docs/audit.md)")
        else:
            typer.echo(f"all {len(docs)} chains verified")
    if bad:
        raise typer.Exit(1)


@audit_app.command("checkpoint")
def checkpoint_cmd(org: str = typer.Option(..., "--org", help="organisation slug")) -> None:
    """Sign the organisation's chain head now with its active signing key."""
    from sqlalchemy import func, select

    from pforte.audit import checkpoints
    from pforte.audit.models import AuditCheckpoint
    from pforte.crypto import signing
    from pforte.errors import ConflictError
    from pforte.orgs import service as orgs

    async def _do(sv: Any) -> str:
        now = sv.clock.now()
        async with sv.db.transaction() as session:
            org_id = (await orgs.get_by_slug(session=session, slug=org)).id
            key = await signing.active_key(session, org_id, now)
            if key is None:
                raise ConflictError(
                    "the organisation has no active signing key (pforte keys signing create)",
                    code="no_signing_key",
                )
            cp = await checkpoints.checkpoint(session, sv.keys, org_id=org_id, now=now)
            if cp is None:
                last = (
                    await session.execute(
                        select(func.max(AuditCheckpoint.seq)).where(AuditCheckpoint.chain == org_id)
                    )
                ).scalar()
                if last is None:
                    return "nothing to sign: the chain has no entries yet"
                return f"nothing new to sign: entry {last} is the newest and already signed"
            return (
                f"signed entry {cp.seq} (hash {cp.head_hash[:16]}) with key {key.fingerprint[:16]} "
                f"at {now:%Y-%m-%d %H:%M} UTC"
            )

    typer.echo(clikit.run(clikit.settings(), _do))
