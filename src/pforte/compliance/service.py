"""The compliance report (DSK I.11, IV.4): gather the facts, assess every row, save, compare.

:func:`gather` reads what the report needs about one organisation: settings, the privacy notice,
accounts per role, channels, retention rules and holds, signing keys, the audit chains (verified
entry by entry), the backup recipient and the last backup, earlier reports. Everything it keeps is
free of personal data: ids, counts, dates, setting values, host names; never a name, an e-mail
address, a phone number or a secret (of an error-reporting DSN only the host is read).
:mod:`pforte.compliance.rules` turns the facts into rows and :mod:`pforte.compliance.record` into
the draft record of processing activities.

Services never commit. Building reads only; :func:`save` adds one row. The scheduled job and the
command line build in one transaction and save in a second, short one, so that verifying a long
audit chain never holds SQLite's write lock.
"""

from __future__ import annotations

import stat
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit import service as audit
from pforte.audit.models import AuditCheckpoint, AuditEvent
from pforte.channels import service as channels
from pforte.channels.kinds import STORAGE_MODES, kind_of
from pforte.compliance import evidence as evidence_file
from pforte.compliance import record, rules
from pforte.compliance.catalog import Text
from pforte.compliance.models import ComplianceReport
from pforte.compliance.rules import ChainFacts, ChannelFacts, Facts, SigningFacts
from pforte.compliance.schemas import Change, Diff, Report, Saved
from pforte.config import Settings
from pforte.contacts.models import Contact
from pforte.crypto.models import SigningKey
from pforte.errors import PforteError, ValidationError
from pforte.i18n import translations
from pforte.orgs import service as orgs
from pforte.orgs.models import Organisation
from pforte.orgs.policy import SPECS, deviates
from pforte.outbox.models import Job
from pforte.privacy import service as privacy
from pforte.privacy.jobs import public_url
from pforte.reporting import service as reporting
from pforte.retention.models import Hold, RetentionRule
from pforte.staff.models import StaffUser

TRIGGERS = ("cli", "schedule", "web")
FINGERPRINT_CHARS = 16


def pforte_version() -> str:
    """The installed pforte version."""
    try:
        return metadata.version("pforte")
    except metadata.PackageNotFoundError:
        return "unknown"


def _bilingual(text: str) -> Text:
    """An English catalog string (marked with ``N_`` elsewhere) with its German translation."""
    return Text(text, translations("de").gettext(text))


def _deviations(org: Organisation) -> tuple[str, ...]:
    """Organisation settings less strict than their default, by the settings page's own measure."""
    out = []
    for spec in SPECS:
        value = spec.strict if spec.fixed else orgs.setting(org, spec.name)
        if deviates(spec, value, orgs.DEFAULT_SETTINGS[spec.name]):
            out.append(spec.name)
    return tuple(out)


def _channel(c: Any) -> ChannelFacts:
    k = kind_of(c.kind)
    mode = STORAGE_MODES.get(c.storage_region)
    return ChannelFacts(
        id=c.id,
        kind=c.kind,
        label=_bilingual(k.label),
        encryption_ends=k.encryption_ends,
        operator=k.operator,
        operator_role=_bilingual(k.operator_role),
        provider_retention=_bilingual(k.provider_retention),
        storage_region=c.storage_region,
        storage=_bilingual(mode.label) if mode else None,
        storage_detail=_bilingual(mode.detail) if mode else None,
        state=c.state,
    )


async def _signing(session: AsyncSession, org_id: str, now: datetime) -> SigningFacts:
    keys = list((await session.execute(select(SigningKey).where(SigningKey.org_id == org_id))).scalars())
    active = [
        k
        for k in keys
        if k.revoked_at is None and k.private_wrapped is not None and k.valid_from <= now < k.valid_until
    ]
    newest = max(active, key=lambda k: k.valid_from, default=None)
    return SigningFacts(
        active=len(active),
        revoked=sum(1 for k in keys if k.revoked_at is not None),
        expired=sum(1 for k in keys if k.revoked_at is None and k.valid_until <= now),
        unbound=sum(1 for k in active if not k.created_by),
        fingerprint=newest.fingerprint[:FINGERPRINT_CHARS] if newest else None,
        valid_until=newest.valid_until if newest else None,
    )


async def _chain(session: AsyncSession, chain: str) -> ChainFacts:
    result = await audit.verify(session, chain)
    return ChainFacts(
        ok=result.ok, entries=result.entries, first_bad_seq=result.first_bad_seq, problem=result.problem
    )


def _backup_recipient(settings: Settings) -> tuple[str | None, bool]:
    """The backup recipient's fingerprint, and whether the stored file is damaged."""
    from pforte.backup import service as backup

    try:
        recipient = backup.get_recipient(settings)
    except (PforteError, OSError):
        return None, True
    return (backup.fingerprint(recipient) if recipient else None), False


def _key_file_private(provider: object | None) -> bool | None:
    path = getattr(provider, "path", None)
    if not isinstance(path, Path):
        return None
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return not mode & (stat.S_IRWXG | stat.S_IRWXO)


async def _schema(session: AsyncSession) -> str | None:
    from pforte.backup.service import current_revision

    return await current_revision(await session.connection())


async def gather(
    session: AsyncSession,
    *,
    org_id: str,
    settings: Settings,
    now: datetime,
    key_provider: object | None = None,
    saving: bool = False,
    evidence: dict[str, list[str]] | None = None,
) -> Facts:
    """Everything the report states about one organisation (``saving``: this report will be saved)."""
    org = await orgs.get(session=session, org_id=org_id)
    values = {name: orgs.setting(org, name) for name in orgs.DEFAULT_SETTINGS}
    notice = await privacy.current_notice(session, org_id=org_id)
    role_rows = await session.execute(
        select(StaffUser.role, StaffUser.active, func.count())
        .where(StaffUser.org_id == org_id)
        .group_by(StaffUser.role, StaffUser.active)
    )
    roles: dict[str, int] = {}
    inactive = 0
    for role, active, n in role_rows:
        if active:
            roles[role] = roles.get(role, 0) + int(n)
        else:
            inactive += int(n)
    contacts = await session.scalar(
        select(func.count()).select_from(Contact).where(Contact.org_id == org_id, Contact.erased_at.is_(None))
    )
    rule_rows = list(
        (await session.execute(select(RetentionRule).where(RetentionRule.org_id == org_id))).scalars()
    )
    hold_rows = await session.execute(
        select(Hold.kind, func.count())
        .where(Hold.org_id == org_id, Hold.released_at.is_(None))
        .group_by(Hold.kind)
    )
    last_sweep = await session.scalar(
        select(func.max(Job.updated_at)).where(Job.kind == "retention_sweep", Job.state == "done")
    )
    reporting_state = await reporting.get(session=session)
    chans = await channels.list_(session=session, org_id=org_id)
    checkpoints, last_checkpoint = (
        await session.execute(
            select(func.count(), func.max(AuditCheckpoint.seq)).where(AuditCheckpoint.chain == org_id)
        )
    ).one()
    last_backup = await session.scalar(
        select(func.max(AuditEvent.at)).where(
            AuditEvent.chain == audit.INSTANCE, AuditEvent.action == "backup.create"
        )
    )
    saved, last_saved = (
        await session.execute(
            select(func.count(), func.max(ComplianceReport.created_at)).where(
                ComplianceReport.org_id == org_id
            )
        )
    ).one()
    if saving:
        saved, last_saved = int(saved) + 1, now
    recipient, recipient_damaged = _backup_recipient(settings)
    return Facts(
        now=now,
        org_id=org.id,
        org_slug=org.slug,
        kek_id=org.kek_id,
        version=pforte_version(),
        schema=await _schema(session),
        dialect=session.get_bind().dialect.name,
        organisations=int(await session.scalar(select(func.count()).select_from(Organisation)) or 0),
        settings=values,
        defaults=dict(orgs.DEFAULT_SETTINGS),
        deviations=_deviations(org),
        notice_version=notice.version if notice else None,
        notice_published_at=notice.created_at if notice else None,
        notice_url=public_url(settings.base_url, org.slug),
        roles=roles,
        inactive_accounts=inactive,
        session_idle_minutes=settings.session_idle_minutes,
        session_absolute_hours=settings.session_absolute_hours,
        session_metadata_days=settings.session_metadata_days,
        failed_login_days=settings.failed_login_days,
        contacts=int(contacts or 0),
        channel_rules={r.scope_ref: r.days for r in rule_rows if r.scope == "channel"},
        tag_rules=tuple(r.days for r in rule_rows if r.scope == "tag"),
        holds={str(kind): int(n) for kind, n in hold_rows},
        last_sweep_at=last_sweep,
        sweep_seconds=settings.retention_sweep_seconds,
        error_reporting=reporting_state.enabled,
        error_reporting_host=reporting_state.host if reporting_state.enabled else None,
        error_reporting_since=reporting_state.changed_at if reporting_state.enabled else None,
        channels=tuple(_channel(c) for c in chans),
        signing=await _signing(session, org_id, now),
        audit=await _chain(session, org_id),
        instance_audit=await _chain(session, audit.INSTANCE),
        checkpoints=int(checkpoints or 0),
        last_checkpoint_seq=int(last_checkpoint) if last_checkpoint is not None else None,
        backup_recipient=recipient,
        backup_recipient_damaged=recipient_damaged,
        last_backup_at=last_backup,
        key_provider=type(key_provider).__name__ if key_provider is not None else "unknown",
        key_file_private=_key_file_private(key_provider),
        https=settings.base_url.startswith("https://"),
        reports_saved=int(saved or 0),
        last_saved_at=last_saved,
        report_seconds=settings.compliance_report_seconds,
        evidence=evidence_file.load() if evidence is None else evidence,
    )


def assemble(facts: Facts) -> Report:
    """The report for gathered facts (pure)."""
    return Report(
        generated_at=facts.now,
        org_id=facts.org_id,
        org_slug=facts.org_slug,
        version=facts.version,
        schema=facts.schema,
        rows=tuple(rules.assess(facts)),
        record=record.build(facts),
    )


async def build(
    session: AsyncSession,
    *,
    org_id: str,
    settings: Settings,
    now: datetime,
    key_provider: object | None = None,
    saving: bool = False,
) -> Report:
    """The report for one organisation as this instance stands now."""
    facts = await gather(
        session, org_id=org_id, settings=settings, now=now, key_provider=key_provider, saving=saving
    )
    return assemble(facts)


def diff(previous: Report | None, current: Report) -> Diff:
    """Rows whose status, evidence or tests changed, and rows added or removed since ``previous``."""
    if previous is None:
        return Diff(previous_at=None)
    before = {r.id: r for r in previous.rows}
    after = {r.id: r for r in current.rows}
    changes: list[Change] = []
    for row in current.rows:
        old = before.get(row.id)
        if old is None:
            changes.append(Change(row.id, "added", None, row.status))
            continue
        old_ev, new_ev = old.compared(), row.compared()
        if old.status == row.status and old_ev == new_ev and old.tests == row.tests:
            continue
        changes.append(
            Change(
                row.id,
                "changed",
                old.status,
                row.status,
                evidence_added=tuple(e for e in new_ev if e not in old_ev),
                evidence_removed=tuple(e for e in old_ev if e not in new_ev),
                tests_added=tuple(t for t in row.tests if t not in old.tests),
                tests_removed=tuple(t for t in old.tests if t not in row.tests),
            )
        )
    for row in previous.rows:
        if row.id not in after:
            changes.append(Change(row.id, "removed", row.status, None))
    return Diff(previous_at=previous.generated_at, changes=tuple(changes))


async def save(session: AsyncSession, *, org_id: str, report: Report, trigger: str) -> Saved:
    """Store a report of this organisation (``trigger``: cli, schedule or web)."""
    if trigger not in TRIGGERS:
        raise ValidationError(f"unknown report trigger {trigger!r}")
    if report.org_id != org_id:
        raise ValidationError("the report belongs to another organisation")
    row = ComplianceReport(
        org_id=org_id, created_at=report.generated_at, trigger=trigger, report=report.as_dict()
    )
    session.add(row)
    await session.flush()
    return Saved(id=row.id, created_at=row.created_at, trigger=row.trigger, report=report)


async def latest(session: AsyncSession, *, org_id: str) -> Saved | None:
    """The organisation's newest saved report, or None."""
    row = (
        await session.execute(
            select(ComplianceReport)
            .where(ComplianceReport.org_id == org_id)
            .order_by(ComplianceReport.created_at.desc(), ComplianceReport.id.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    return Saved(
        id=row.id, created_at=row.created_at, trigger=row.trigger, report=Report.from_dict(row.report)
    )


async def count(session: AsyncSession, *, org_id: str) -> int:
    """How many reports of the organisation are saved."""
    n = await session.scalar(
        select(func.count()).select_from(ComplianceReport).where(ComplianceReport.org_id == org_id)
    )
    return int(n or 0)
