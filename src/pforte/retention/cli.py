"""``pforte retention``: the sweeper (with a dry run), the default period, rules and holds."""

from __future__ import annotations

import json
from typing import Any

import typer

from pforte import clikit
from pforte.audit.service import CLI
from pforte.orgs import service as orgs
from pforte.retention import service, sweeper

retention_app = typer.Typer(no_args_is_help=True, help="Retention rules, holds and the sweeper")
rule_app = typer.Typer(no_args_is_help=True, help="Per-channel and per-tag retention rules")
hold_app = typer.Typer(no_args_is_help=True, help="Holds that stop deletion (legal hold, …)")
retention_app.add_typer(rule_app, name="rule")
retention_app.add_typer(hold_app, name="hold")


@retention_app.command("run")
def run_cmd(
    dry_run: bool = typer.Option(
        False, "--dry-run", help="show what would be deleted and why; change nothing"
    ),
    org: str | None = typer.Option(None, help="only this organisation (slug)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Delete what is due now (conversations past retention, erased contacts' rows, old metadata)."""

    async def _do(sv: Any) -> dict[str, Any]:
        now = sv.clock.now()
        async with sv.db.transaction() as session:
            targets = (
                [await orgs.get_by_slug(session=session, slug=org)]
                if org
                else await orgs.list_(session=session)
            )
            ids = [(o.id, o.slug) for o in targets]
            if dry_run:
                items = []
                for org_id, slug in ids:
                    for i in await sweeper.plan(session, org_id, now):
                        items.append(
                            {
                                "org": slug,
                                "conversation_id": i.conversation_id,
                                "last_activity_at": i.last_activity_at.isoformat(timespec="seconds"),
                                "rule": i.decision.source,
                                "days": i.decision.days,
                                "action": "keep" if i.holds else "delete",
                                "held_by": i.holds,
                            }
                        )
                return {"dry_run": True, "items": items}
        report = await sweeper.run(sv.db, sv.eraser, sv.settings, now, actor=CLI, org_ids=[i for i, _ in ids])
        return report.as_dict()

    out = clikit.run(clikit.settings(), _do)
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    if out.get("dry_run"):
        if not out["items"]:
            typer.echo("nothing is due")
        for i in out["items"]:
            why = f"{i['rule']}, {i['days']} days after {i['last_activity_at']}"
            held = f" (kept: hold {', '.join(i['held_by'])})" if i["held_by"] else ""
            typer.echo(f"{i['action']:6} {i['org']} conversation {i['conversation_id']}: {why}{held}")
        return
    typer.echo(
        f"deleted {out['conversations']} conversations ({out['messages']} messages, {out['attachments']} "
        f"attachments), erased {out['contacts_erased']} contacts, purged {out['contacts_purged']}; "
        f"kept on hold {out['kept_on_hold']}; metadata {json.dumps(out['metadata'], sort_keys=True)}"
    )


@retention_app.command("set")
def set_cmd(
    org: str = typer.Option(..., help="organisation slug"),
    days: int | None = typer.Option(None, help="default retention after the last activity"),
    off: bool = typer.Option(False, "--off", help="switch automatic deletion off (shown as a deviation)"),
) -> None:
    """Set the organisation's default retention."""

    async def _do(sv: Any) -> None:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            await service.set_org_retention(
                session,
                org_id=o.id,
                enabled=not off,
                days=days if days is not None else orgs.setting(o, "retention_days"),
                actor=CLI,
                now=sv.clock.now(),
            )

    clikit.run(clikit.settings(), _do)
    typer.echo("retention off" if off else "retention on")


@rule_app.command("set")
def rule_set(
    org: str = typer.Option(..., help="organisation slug"),
    channel: str | None = typer.Option(None, help="channel id"),
    tag: str | None = typer.Option(None, help="conversation tag"),
    days: int | None = typer.Option(None, help="days after the last activity"),
    never: bool = typer.Option(False, "--never", help="never delete automatically"),
) -> None:
    """Create or replace a channel or tag rule."""
    if (channel is None) == (tag is None):
        clikit.fail("give exactly one of --channel or --tag")
    if never == (days is not None):
        clikit.fail("give exactly one of --days or --never")

    async def _do(sv: Any) -> str:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            rule = await service.set_rule(
                session,
                org_id=o.id,
                scope="channel" if channel else "tag",
                ref=channel or tag or "",
                days=days,
                actor=CLI,
                now=sv.clock.now(),
            )
            return rule.id

    typer.echo(clikit.run(clikit.settings(), _do))


@rule_app.command("list")
def rule_list(org: str = typer.Option(..., help="organisation slug")) -> None:
    """The organisation's default and its rules."""

    async def _do(sv: Any) -> list[str]:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            p = await service.load_policy(session, o.id)
            lines = [f"default  {'on' if p.enabled else 'OFF'}  {p.default_days} days"]
            for r in await service.rules(session, o.id):
                lines.append(
                    f"{r.id}  {r.scope}:{r.scope_ref}  {'never' if r.days is None else f'{r.days} days'}"
                )
            return lines

    for line in clikit.run(clikit.settings(), _do):
        typer.echo(line)


@rule_app.command("remove")
def rule_remove(
    org: str = typer.Option(..., help="organisation slug"), rule_id: str = typer.Argument(...)
) -> None:
    """Remove a rule."""

    async def _do(sv: Any) -> None:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            await service.remove_rule(session, org_id=o.id, rule_id=rule_id, actor=CLI, now=sv.clock.now())

    clikit.run(clikit.settings(), _do)
    typer.echo("removed")


@hold_app.command("place")
def hold_place(
    org: str = typer.Option(..., help="organisation slug"),
    conversation: str | None = typer.Option(None),
    contact: str | None = typer.Option(None),
    message: str | None = typer.Option(None),
    kind: str = typer.Option("legal", help="legal | treatment_undocumented"),
) -> None:
    """Stop every deletion of a conversation, contact or message."""
    targets = [
        (k, v) for k, v in (("conversation", conversation), ("contact", contact), ("message", message)) if v
    ]
    if len(targets) != 1:
        clikit.fail("give exactly one of --conversation, --contact or --message")
    target_kind, target_id = targets[0]

    async def _do(sv: Any) -> str:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            h = await service.place_hold(
                session,
                org_id=o.id,
                target_kind=target_kind,
                target_id=str(target_id),
                kind=kind,
                actor=CLI,
                now=sv.clock.now(),
            )
            return h.id

    typer.echo(clikit.run(clikit.settings(), _do))


@hold_app.command("release")
def hold_release(
    org: str = typer.Option(..., help="organisation slug"), hold_id: str = typer.Argument(...)
) -> None:
    """Release a hold."""

    async def _do(sv: Any) -> None:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            await service.release_hold(session, org_id=o.id, hold_id=hold_id, actor=CLI, now=sv.clock.now())

    clikit.run(clikit.settings(), _do)
    typer.echo("released")


@hold_app.command("list")
def hold_list(org: str = typer.Option(..., help="organisation slug")) -> None:
    """Active holds."""

    async def _do(sv: Any) -> list[str]:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            return [
                f"{h.id}  {h.kind}  {h.target_kind} {h.target_id}  since {h.placed_at:%Y-%m-%d %H:%M}"
                for h in await service.holds(session, org_id=o.id)
            ]

    for line in clikit.run(clikit.settings(), _do):
        typer.echo(line)
