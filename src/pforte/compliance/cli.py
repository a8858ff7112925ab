"""``pforte compliance report``: the DSK catalog row by row, from this instance's own state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pforte import clikit

compliance_app = typer.Typer(no_args_is_help=True, help="The DSK compliance report")

STATUS_WORDS = {"met": "met", "partly": "partly", "not_met": "not met", "organisational": "organisational"}


def describe(changes: Any) -> list[str]:
    """ "What changed since" as lines for a terminal."""
    if changes.previous_at is None:
        return ["no earlier saved report to compare with"]
    since = changes.previous_at.strftime("%Y-%m-%d %H:%M UTC")
    if not changes.changes:
        return [f"nothing changed since {since}"]
    lines = [f"changed since {since}:"]
    for c in changes.changes:
        if c.change == "added":
            lines.append(f"  {c.id}: new row ({STATUS_WORDS.get(c.status_after, c.status_after)})")
        elif c.change == "removed":
            lines.append(f"  {c.id}: row removed")
        elif c.status_changed:
            before = STATUS_WORDS.get(c.status_before, c.status_before)
            after = STATUS_WORDS.get(c.status_after, c.status_after)
            lines.append(f"  {c.id}: {before} -> {after}")
        else:
            lines.append(f"  {c.id}: evidence changed")
    return lines


@compliance_app.command("report")
def report_cmd(
    org: str = typer.Option(..., help="organisation slug"),
    fmt: str = typer.Option("json", "--format", help="json | html"),
    out: Path | None = typer.Option(None, "--out", help="write to this file instead of printing"),
    save: bool = typer.Option(
        False, "--save", help="also store the report and say what changed since the last"
    ),
    lang: str = typer.Option("de", "--lang", help="language of the HTML page: de | en"),
) -> None:
    """Build the report of one organisation; print it, or write it to a file."""
    if fmt not in ("json", "html"):
        clikit.fail("--format must be json or html")
    if lang not in ("de", "en"):
        clikit.fail("--lang must be de or en")
    from pforte.compliance import render, service
    from pforte.orgs import service as orgs

    async def _do(sv: Any) -> tuple[Any, Any, str | None]:
        async with sv.db.transaction() as session:
            o = await orgs.get_by_slug(session=session, slug=org)
            report = await service.build(
                session,
                org_id=o.id,
                settings=sv.settings,
                now=sv.clock.now(),
                key_provider=sv.keys.provider,
                saving=save,
            )
            previous = await service.latest(session, org_id=o.id) if save else None
        if not save:
            return report, None, None
        async with sv.db.transaction() as session:
            saved = await service.save(session, org_id=o.id, report=report, trigger="cli")
        return report, service.diff(previous.report if previous else None, report), saved.id

    report, changes, saved_id = clikit.run(clikit.settings(), _do)
    text = (
        render.to_json(report, changes)
        if fmt == "json"
        else render.to_html(report, lang=lang, changes=changes)
    )
    if out is not None:
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            clikit.fail(f"cannot write {out}: {exc.strerror}")
        counts = ", ".join(f"{STATUS_WORDS[k]} {v}" for k, v in report.counts.items())
        typer.echo(f"wrote {out} ({counts})")
    else:
        typer.echo(text, nl=False)
    if saved_id is not None:
        notes = [f"saved report {saved_id}", *describe(changes)]
        for line in notes:
            typer.echo(line, err=out is None)
