"""How each catalog row's status follows from the instance's facts: pure functions, no I/O.

:class:`Facts` is everything the service reads from the database, the settings and the files
beside them (no personal data: ids, counts, dates, settings, host names). :func:`assess` turns it
into one :class:`~pforte.compliance.schemas.Row` per catalog entry:

* **met**: the feature is built and configured as the row asks;
* **partly**: built but switched off or weakened here, or only part of the row is built;
* **not met**: not built, or broken (a damaged audit chain), said with the reason;
* **organisational**: only the controller can meet the row; pforte lists its duties and the help
  it gives.

A technical row counts as met only when at least one test carries its ``dsk`` marker (the
committed ``evidence.json``); without one it is reported as partly, because "met" here means
"working code that a test proves". Sentences that carry counts or times are marked volatile: they
are shown, but a new count alone does not make a row "changed" in the diff.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from pforte.compliance.catalog import CATALOG, Entry, Text
from pforte.compliance.schemas import Item, Row, Status
from pforte.staff.service import FAILED_LOGIN_WINDOW, MAX_FAILED_LOGINS

BACKUP_MAX_AGE = timedelta(days=7)
EU_STORAGE = ("DE", "no_storage")
FAILED_LOGIN_MINUTES = int(FAILED_LOGIN_WINDOW.total_seconds() // 60)


def T(en: str, de: str) -> Text:
    """A sentence in both languages."""
    return Text(en, de)


def say(en: str, de: str, *, volatile: bool = False) -> Item:
    """One evidence sentence."""
    return Item(Text(en, de), volatile)


def day(dt: datetime | None) -> str:
    """A date as YYYY-MM-DD (the same in both languages)."""
    return dt.strftime("%Y-%m-%d") if dt else "—"


def moment(dt: datetime | None) -> str:
    """A time as YYYY-MM-DD HH:MM UTC."""
    return dt.strftime("%Y-%m-%d %H:%M UTC") if dt else "—"


def days_text(days: int | None) -> Text:
    """ "30 days" / "never automatically"."""
    if days is None:
        return T("never automatically", "nie automatisch")
    return T(f"{days} days", f"{days} Tage")


def interval_text(seconds: float) -> Text:
    """ "every day" / "every 2 hours" / "every 90 minutes"."""
    whole = round(seconds)
    for unit, en, en_n, de, de_n in (
        (86400, "every day", "every {n} days", "täglich", "alle {n} Tage"),
        (3600, "every hour", "every {n} hours", "stündlich", "alle {n} Stunden"),
    ):
        if whole >= unit and whole % unit == 0:
            n = whole // unit
            return T(en, de) if n == 1 else T(en_n.format(n=n), de_n.format(n=n))
    minutes = max(1, round(seconds / 60))
    return T(f"every {minutes} minutes", f"alle {minutes} Minuten")


@dataclass(frozen=True)
class ChannelFacts:
    """One channel as the report describes it (no name, no phone number)."""

    id: str
    kind: str
    label: Text
    encryption_ends: str  # provider | own_server
    operator: str
    operator_role: Text
    provider_retention: Text
    storage_region: str
    storage: Text | None  # the storage mode's label
    storage_detail: Text | None  # what the mode means for where content is kept
    state: str


@dataclass(frozen=True)
class ChainFacts:
    """The outcome of verifying one audit chain."""

    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: str | None = None


@dataclass(frozen=True)
class SigningFacts:
    """The organisation's signing keys, counted."""

    active: int = 0
    revoked: int = 0
    expired: int = 0
    unbound: int = 0  # active keys with no owning admin
    fingerprint: str | None = None  # start of the newest active key's fingerprint
    valid_until: datetime | None = None


@dataclass(frozen=True)
class Facts:
    """What the report knows about one organisation on this instance."""

    now: datetime
    org_id: str
    org_slug: str
    kek_id: str
    version: str
    schema: str | None
    dialect: str
    organisations: int
    settings: Mapping[str, Any]
    defaults: Mapping[str, Any]
    deviations: tuple[str, ...]  # organisation settings less strict than their default
    notice_version: int | None
    notice_published_at: datetime | None
    notice_url: str
    roles: Mapping[str, int]  # active accounts per role
    inactive_accounts: int
    session_idle_minutes: int
    session_absolute_hours: int
    session_metadata_days: int
    failed_login_days: int
    contacts: int
    channel_rules: Mapping[str, int | None]
    tag_rules: tuple[int | None, ...]
    holds: Mapping[str, int]
    last_sweep_at: datetime | None
    sweep_seconds: float
    error_reporting: bool
    error_reporting_host: str | None
    error_reporting_since: datetime | None
    channels: tuple[ChannelFacts, ...]
    signing: SigningFacts
    audit: ChainFacts
    instance_audit: ChainFacts
    checkpoints: int
    last_checkpoint_seq: int | None
    backup_recipient: str | None  # the public key's fingerprint
    backup_recipient_damaged: bool
    last_backup_at: datetime | None
    key_provider: str
    key_file_private: bool | None  # None: not a key file, or not readable from here
    https: bool
    reports_saved: int
    last_saved_at: datetime | None
    report_seconds: float
    evidence: Mapping[str, Sequence[str]] = field(default_factory=dict)


@dataclass
class Finding:
    """What one rule found; the catalog entry and the tests are added by :func:`assess`."""

    status: Status
    evidence: list[Item] = field(default_factory=list)
    gaps: list[Text] = field(default_factory=list)
    controller: list[Text] = field(default_factory=list)


Rule = Callable[[Facts], Finding]
RULES: dict[str, Rule] = {}


def rule(*ids: str) -> Callable[[Rule], Rule]:
    """Register the function that assesses these rows."""

    def add(fn: Rule) -> Rule:
        for i in ids:
            RULES[i] = fn
        return fn

    return add


def assess(facts: Facts) -> list[Row]:
    """One row per catalog entry, in catalog order."""
    return [_row(entry, facts) for entry in CATALOG]


def _row(entry: Entry, facts: Facts) -> Row:
    found = RULES[entry.id](facts)
    tests = tuple(sorted(facts.evidence.get(entry.id, ())))
    status = found.status
    evidence = list(found.evidence)
    if entry.kind == "technical" and status == "met" and not tests:
        status = "partly"
        evidence.append(
            say(
                f'No test carries this row\'s marker (dsk("{entry.id}")) yet, so "met" is not proven by a '
                "test.",
                f'Noch kein Test trägt die Markierung dieser Zeile (dsk("{entry.id}")), „erfüllt“ ist also '
                "durch keinen Test belegt.",
            )
        )
    row = Row(
        id=entry.id,
        section=entry.section,
        level=entry.level,
        kind=entry.kind,
        status=status,
        requirement=entry.requirement,
        evidence=tuple(evidence),
        gaps=tuple(found.gaps),
        controller=tuple(found.controller),
        tests=tests,
    )
    return replace(row, status="organisational") if entry.kind == "organisational" else row


def _provider_channels(f: Facts) -> list[ChannelFacts]:
    return [c for c in f.channels if c.encryption_ends != "own_server"]


# -- I. the application ----------------------------------------------------------------------------


@rule("I.1")
def _notice(f: Facts) -> Finding:
    keywords = ", ".join(f.settings.get("notice_keywords") or ())
    if f.notice_version is None:
        return Finding(
            "not_met",
            [
                say(
                    "No privacy notice is published for this organisation, so patients receive none.",
                    "Für diese Einrichtung ist kein Datenschutzhinweis veröffentlicht; Patientinnen und "
                    "Patienten erhalten also keinen.",
                )
            ],
            controller=[
                T(
                    "Publish the privacy notice (admin page “Edit privacy notice”).",
                    "Den Datenschutzhinweis veröffentlichen (Admin-Seite „Datenschutzhinweis bearbeiten“).",
                )
            ],
        )
    return Finding(
        "met",
        [
            say(
                f"Privacy notice version {f.notice_version} is published (since "
                f"{day(f.notice_published_at)}).",
                f"Der Datenschutzhinweis ist in Version {f.notice_version} veröffentlicht (seit "
                f"{day(f.notice_published_at)}).",
            ),
            say(
                "It is sent automatically with a patient's first message, again after each new version, and "
                f"whenever a patient writes one of the keywords: {keywords}.",
                "Er wird mit der ersten Nachricht eines Patienten automatisch gesendet, nach jeder neuen "
                "Version erneut und immer dann, wenn ein Patient eines der Stichwörter schreibt: "
                f"{keywords}.",
            ),
            say(
                f"It is public at {f.notice_url} and linked from every staff page.",
                f"Er ist öffentlich unter {f.notice_url} abrufbar und von jeder Seite des Teams verlinkt.",
            ),
        ],
    )


@rule("I.2")
def _login(f: Facts) -> Finding:
    return Finding(
        "met",
        [
            say(
                "Staff log in to the web inbox with their e-mail address and a password (stored as an "
                "argon2id hash); this login is pforte's own, independent of unlocking any device.",
                "Das Team meldet sich im Web-Posteingang mit E-Mail-Adresse und Passwort an (gespeichert "
                "als argon2id-Hash); diese Anmeldung gehört zu pforte und ist vom Entsperren eines Geräts "
                "unabhängig.",
            ),
            say(
                f"Sessions are kept on the server and end after {f.session_idle_minutes} minutes without "
                f"activity and after {f.session_absolute_hours} hours at the latest.",
                f"Sitzungen liegen auf dem Server und enden nach {f.session_idle_minutes} Minuten ohne "
                f"Aktivität und spätestens nach {f.session_absolute_hours} Stunden.",
            ),
            say(
                f"After {MAX_FAILED_LOGINS} failed attempts an account is locked for {FAILED_LOGIN_MINUTES} "
                "minutes.",
                f"Nach {MAX_FAILED_LOGINS} Fehlversuchen ist ein Konto {FAILED_LOGIN_MINUTES} Minuten "
                "gesperrt.",
            ),
        ],
        gaps=[
            T(
                "No second factor and no single sign-on yet.",
                "Noch kein zweiter Faktor und kein Single Sign-on.",
            )
        ],
    )


@rule("I.3a")
def _contacts(f: Facts) -> Finding:
    return Finding(
        "partly",
        [
            say(
                "Patients are kept in pforte's own contacts store, separately per organisation, never in a "
                "device's address book.",
                "Patientinnen und Patienten liegen in pforte's eigenem Kontaktspeicher, getrennt je "
                "Einrichtung, nie im Adressbuch eines Geräts.",
            ),
            say(
                "Phone numbers and messenger ids are found through a keyed HMAC blind index; they are not "
                "stored in clear.",
                "Telefonnummern und Messenger-Kennungen werden über einen verschlüsselten HMAC-Blindindex "
                "gefunden; im Klartext sind sie nicht gespeichert.",
            ),
            say(
                f"Patients stored: {f.contacts}.",
                f"Gespeicherte Patientinnen und Patienten: {f.contacts}.",
                volatile=True,
            ),
        ],
        gaps=[
            T(
                "Contacts cannot be imported yet (CSV, vCard, FHIR Patient, HL7 v2 ADT).",
                "Kontakte lassen sich noch nicht importieren (CSV, vCard, FHIR Patient, HL7 v2 ADT).",
            )
        ],
    )


@rule("I.3b")
def _encrypted(f: Facts) -> Finding:
    evidence = [
        say(
            "Every message body, caption, attachment file and name is encrypted with AES-256-GCM under a "
            "data key per patient, stored only wrapped by the organisation's key-encryption key "
            f"({f.kek_id}).",
            "Jeder Nachrichtentext, jede Bildunterschrift, jede Anhangsdatei und jeder Name ist mit "
            "AES-256-GCM unter einem Datenschlüssel je Patient verschlüsselt, der nur umhüllt vom "
            f"Schlüsselverschlüsselungsschlüssel der Einrichtung ({f.kek_id}) gespeichert ist.",
        ),
        say(
            f"The key-encryption key comes from the key provider “{f.key_provider}”, outside the database.",
            f"Der Schlüsselverschlüsselungsschlüssel kommt vom Schlüsselanbieter „{f.key_provider}“, "
            "außerhalb der Datenbank.",
        ),
    ]
    status: Status = "met"
    if f.key_file_private is True:
        evidence.append(
            say(
                "The key file can be read only by its owner (mode 0600).",
                "Die Schlüsseldatei ist nur für ihren Eigentümer lesbar (Modus 0600).",
            )
        )
    elif f.key_file_private is False:
        status = "partly"
        evidence.append(
            say(
                "The key file can be read by other users of the server; it should have mode 0600.",
                "Die Schlüsseldatei ist für andere Benutzer des Servers lesbar; sie sollte Modus 0600 haben.",
            )
        )
    return Finding(status, evidence)


@rule("I.3c")
def _message_import(f: Facts) -> Finding:
    return Finding(
        "not_met",
        [
            say(
                "pforte cannot import messages or attachments from other systems yet.",
                "pforte kann noch keine Nachrichten oder Anhänge aus anderen Systemen importieren.",
            )
        ],
        gaps=[
            T(
                "An import of conversation history (API and command line) is planned.",
                "Ein Import des Gesprächsverlaufs (API und Kommandozeile) ist geplant.",
            )
        ],
    )


@rule("I.4")
def _partners(f: Facts) -> Finding:
    return Finding(
        "partly",
        [
            say(
                "pforte talks to the channel provider only over TLS with certificate checks, and accepts "
                "its webhooks only with a valid HMAC signature (X-Hub-Signature-256).",
                "pforte spricht mit dem Kanalanbieter nur über TLS mit Zertifikatsprüfung und nimmt dessen "
                "Webhooks nur mit gültiger HMAC-Signatur (X-Hub-Signature-256) an.",
            ),
            say(
                f"Signing keys of this organisation: {f.signing.active} active, {f.signing.revoked} revoked "
                "(see I.5).",
                f"Signaturschlüssel dieser Einrichtung: {f.signing.active} aktiv, {f.signing.revoked} "
                "gesperrt (siehe I.5).",
                volatile=True,
            ),
        ],
        gaps=[
            T(
                "No import of TLS client certificates for integrations, and no per-patient identity "
                "verification state yet.",
                "Noch kein Import von TLS-Client-Zertifikaten für Anbindungen und kein Status der "
                "Identitätsprüfung je Patient.",
            )
        ],
    )


@rule("I.5")
def _signing(f: Facts) -> Finding:
    s = f.signing
    counts = say(
        f"Revoked keys: {s.revoked}; expired keys: {s.expired}.",
        f"Gesperrte Schlüssel: {s.revoked}; abgelaufene Schlüssel: {s.expired}.",
        volatile=True,
    )
    if s.active == 0:
        return Finding(
            "not_met",
            [
                say(
                    "This organisation has no valid, unrevoked signing key, so audit checkpoints and "
                    "exports cannot be signed.",
                    "Diese Einrichtung hat keinen gültigen, ungesperrten Signaturschlüssel; Prüfpunkte des "
                    "Protokolls und Exporte können also nicht signiert werden.",
                ),
                counts,
            ],
            controller=[
                T(
                    "Create or import a signing key for the organisation (command “pforte keys”).",
                    "Einen Signaturschlüssel für die Einrichtung erzeugen oder importieren (Befehl „pforte "
                    "keys“).",
                )
            ],
        )
    evidence = [
        say(
            f"Active signing key {s.fingerprint}… (Ed25519), valid until {day(s.valid_until)}.",
            f"Aktiver Signaturschlüssel {s.fingerprint}… (Ed25519), gültig bis {day(s.valid_until)}.",
        ),
        say(
            "Each key has an owner, a validity period and can be revoked; revoking destroys its private "
            "half, and signatures by a revoked or expired key are refused.",
            "Jeder Schlüssel hat einen Eigentümer und eine Gültigkeitsdauer und lässt sich sperren; das "
            "Sperren vernichtet den privaten Teil, und Signaturen gesperrter oder abgelaufener Schlüssel "
            "werden abgelehnt.",
        ),
        counts,
    ]
    if s.unbound:
        evidence.append(
            say(
                f"{s.unbound} active key(s) are bound to no admin account.",
                f"{s.unbound} aktive(r) Schlüssel ist/sind keinem Admin-Konto zugeordnet.",
            )
        )
        return Finding("partly", evidence)
    return Finding("met", evidence)


@rule("I.6")
def _integration(f: Facts) -> Finding:
    return Finding(
        "not_met",
        [
            say(
                "pforte has no interface to the hospital's IT yet: no REST API, no FHIR export and no HL7 "
                "v2 patient synchronisation.",
                "pforte hat noch keine Schnittstelle zur Krankenhaus-IT: keine REST-API, keinen FHIR-Export "
                "und keinen HL7-v2-Patientenabgleich.",
            )
        ],
        gaps=[
            T(
                "REST API with scoped tokens, outbound webhooks, FHIR R4 export and HL7 v2 ADT sync are "
                "planned.",
                "REST-API mit beschränkten Tokens, ausgehende Webhooks, FHIR-R4-Export und "
                "HL7-v2-ADT-Abgleich sind geplant.",
            )
        ],
    )


def _rules_summary(f: Facts) -> list[Item]:
    out: list[Item] = []
    if f.channel_rules:
        periods = sorted({days_text(d).en for d in f.channel_rules.values()})
        periods_de = sorted({days_text(d).de for d in f.channel_rules.values()})
        out.append(
            say(
                f"Channel rules: {len(f.channel_rules)} ({', '.join(periods)}).",
                f"Regeln je Kanal: {len(f.channel_rules)} ({', '.join(periods_de)}).",
            )
        )
    if f.tag_rules:
        periods = sorted({days_text(d).en for d in f.tag_rules})
        periods_de = sorted({days_text(d).de for d in f.tag_rules})
        out.append(
            say(
                f"Tag rules: {len(f.tag_rules)} ({', '.join(periods)}).",
                f"Regeln je Schlagwort: {len(f.tag_rules)} ({', '.join(periods_de)}).",
            )
        )
    return out


@rule("I.7")
def _deletion(f: Facts) -> Finding:
    evidence = [
        say(
            "Staff can delete a message, a conversation or a patient. Deleting a patient destroys the "
            "patient's data key (crypto-shredding): every copy, backups included, becomes unreadable.",
            "Das Team kann eine Nachricht, ein Gespräch oder einen Patienten löschen. Das Löschen eines "
            "Patienten vernichtet dessen Datenschlüssel (Crypto-Shredding): jede Kopie, auch in "
            "Sicherungen, wird unlesbar.",
        )
    ]
    enabled = bool(f.settings.get("retention_enabled"))
    days = f.settings.get("retention_days")
    status: Status = "met"
    if not enabled:
        status = "partly"
        evidence.append(
            say(
                "Automatic deletion is switched off for this organisation (retention_enabled is off): "
                "conversations stay until someone deletes them.",
                "Die automatische Löschung ist für diese Einrichtung ausgeschaltet (retention_enabled ist "
                "aus): Gespräche bleiben, bis jemand sie löscht.",
            )
        )
    elif days is None:
        status = "partly"
        evidence.append(
            say(
                "Automatic deletion is on, but without a default period: only rules delete conversations.",
                "Die automatische Löschung ist an, aber ohne Standardfrist: nur Regeln löschen Gespräche.",
            )
        )
    else:
        evidence.append(
            say(
                f"Automatic deletion is on: conversations are deleted {days} days after their last activity.",
                f"Die automatische Löschung ist an: Gespräche werden {days} Tage nach der letzten Aktivität "
                "gelöscht.",
            )
        )
    evidence.extend(_rules_summary(f))
    if f.holds:
        held = ", ".join(f"{k} {n}" for k, n in sorted(f.holds.items()))
        evidence.append(
            say(f"Active holds: {held}.", f"Aktive Sperren gegen Löschung: {held}.", volatile=True)
        )
    return Finding(status, evidence)


@rule("I.8")
def _error_reporting(f: Facts) -> Finding:
    if not f.error_reporting:
        return Finding(
            "met",
            [
                say(
                    "Error reporting is off (the default): no error report leaves this installation.",
                    "Die Fehlerberichterstattung ist aus (Voreinstellung): kein Fehlerbericht verlässt "
                    "diese Installation.",
                ),
                say(
                    "pforte contains no analytics or usage tracking of any kind.",
                    "pforte enthält keinerlei Analyse oder Nutzungsverfolgung.",
                ),
            ],
        )
    return Finding(
        "met",
        [
            say(
                f"Error reporting was switched on by an admin on {day(f.error_reporting_since)}; reports go "
                f"to {f.error_reporting_host}.",
                f"Die Fehlerberichterstattung wurde am {day(f.error_reporting_since)} von einem Admin "
                f"eingeschaltet; Berichte gehen an {f.error_reporting_host}.",
            ),
            say(
                "Each report holds only the exception type, the stack frames without local variables and "
                "the pforte version; message content, names, numbers, tokens and request data are removed "
                "before it leaves.",
                "Jeder Bericht enthält nur den Ausnahmetyp, die Stack-Frames ohne lokale Variablen und die "
                "pforte-Version; Nachrichteninhalte, Namen, Nummern, Tokens und Anfragedaten werden vor dem "
                "Versand entfernt.",
            ),
            say(
                "While it is on, every admin page shows a banner naming the host; the switch is audited.",
                "Solange sie an ist, zeigt jede Admin-Seite einen Hinweis mit dem Empfänger; das Umschalten "
                "wird protokolliert.",
            ),
            say(
                "pforte contains no analytics or usage tracking of any kind.",
                "pforte enthält keinerlei Analyse oder Nutzungsverfolgung.",
            ),
        ],
        controller=[
            T(
                f"Name the error-reporting service ({f.error_reporting_host}) in the privacy information and "
                "conclude a processing agreement unless you run it yourself.",
                f"Den Dienst für Fehlerberichte ({f.error_reporting_host}) in den Datenschutzinformationen "
                "nennen und einen Auftragsverarbeitungsvertrag schließen, sofern er nicht selbst betrieben "
                "wird.",
            )
        ],
    )


@rule("I.9a")
def _backup(f: Facts) -> Finding:
    how = say(
        "“pforte backup create” writes one consistent file of the whole installation (database, "
        "attachments, keys), and “pforte backup verify” checks it without restoring.",
        "„pforte backup create“ schreibt eine konsistente Datei der ganzen Installation (Datenbank, "
        "Anhänge, Schlüssel), „pforte backup verify“ prüft sie ohne Wiederherstellung.",
    )
    duty = T(
        "Run “pforte backup create” regularly (for example from a daily timer) and keep the files and the "
        "backup identity apart; pforte does not schedule backups itself.",
        "„pforte backup create“ regelmäßig ausführen (etwa über einen täglichen Timer) und die Dateien "
        "getrennt von der Backup-Identität aufbewahren; pforte plant Sicherungen nicht selbst.",
    )
    if f.backup_recipient is None:
        problem = (
            say(
                "The backup recipient file is damaged, so no backup can be made.",
                "Die Datei mit dem Backup-Empfänger ist beschädigt; es kann keine Sicherung erstellt werden.",
            )
            if f.backup_recipient_damaged
            else say(
                "No backup recipient is set, so no backup can be made (“pforte backup set-recipient”).",
                "Es ist kein Backup-Empfänger gesetzt; es kann keine Sicherung erstellt werden („pforte "
                "backup set-recipient“).",
            )
        )
        return Finding("not_met", [problem, how], controller=[duty])
    if f.last_backup_at is None:
        return Finding(
            "partly",
            [say("No backup has been made yet.", "Es wurde noch keine Sicherung erstellt."), how],
            controller=[duty],
        )
    last = say(
        f"Last backup: {moment(f.last_backup_at)}.",
        f"Letzte Sicherung: {moment(f.last_backup_at)}.",
        volatile=True,
    )
    if f.now - f.last_backup_at > BACKUP_MAX_AGE:
        return Finding(
            "partly",
            [
                say(
                    f"The last backup is more than {BACKUP_MAX_AGE.days} days old.",
                    f"Die letzte Sicherung ist älter als {BACKUP_MAX_AGE.days} Tage.",
                ),
                last,
                how,
            ],
            controller=[duty],
        )
    return Finding(
        "met",
        [
            say(
                f"A backup was made within the last {BACKUP_MAX_AGE.days} days.",
                f"In den letzten {BACKUP_MAX_AGE.days} Tagen wurde eine Sicherung erstellt.",
            ),
            last,
            how,
        ],
        controller=[duty],
    )


@rule("I.9b")
def _backup_encryption(f: Facts) -> Finding:
    at_rest = say(
        f"Data at rest is encrypted under a key-encryption key from “{f.key_provider}”, kept outside the "
        "database.",
        f"Gespeicherte Daten sind unter einem Schlüsselverschlüsselungsschlüssel von „{f.key_provider}“ "
        "verschlüsselt, der außerhalb der Datenbank liegt.",
    )
    duty = T(
        "Where a processor hosts pforte, keep the backup identity and, if possible, the key-encryption key "
        "out of its reach.",
        "Wenn ein Auftragsverarbeiter pforte betreibt, die Backup-Identität und nach Möglichkeit den "
        "Schlüsselverschlüsselungsschlüssel außerhalb seiner Reichweite halten.",
    )
    if f.backup_recipient is None:
        return Finding(
            "partly",
            [
                say(
                    "No backup recipient is set yet, so there are no backups to hand over.",
                    "Es ist noch kein Backup-Empfänger gesetzt; es gibt also keine Sicherungen zur Übergabe.",
                ),
                at_rest,
            ],
            controller=[duty],
        )
    return Finding(
        "met",
        [
            say(
                f"Backups are encrypted with age to the controller's public key ({f.backup_recipient}); the "
                "server never holds the private key.",
                "Sicherungen sind mit age für den öffentlichen Schlüssel des Verantwortlichen "
                f"({f.backup_recipient}) verschlüsselt; der Server hat den privaten Schlüssel nie.",
            ),
            at_rest,
        ],
        controller=[duty],
    )


@rule("I.9c")
def _treatment_documentation(f: Facts) -> Finding:
    held = f.holds.get("treatment_undocumented", 0)
    return Finding(
        "not_met",
        [
            say(
                "Messages cannot be marked treatment-relevant or exported to the hospital information "
                "system yet; staff must copy what belongs to the treatment documentation by hand.",
                "Nachrichten lassen sich noch nicht als behandlungsrelevant markieren oder ins KIS "
                "exportieren; das Team muss übernehmen, was in die Behandlungsdokumentation gehört, von "
                "Hand.",
            ),
            say(
                "A hold of kind “treatment_undocumented” keeps a conversation from being deleted until it "
                "is released.",
                "Eine Sperre der Art „treatment_undocumented“ verhindert das Löschen eines Gesprächs, bis "
                "sie aufgehoben wird.",
            ),
            say(
                f"Such holds now: {held}.",
                f"Solche Sperren derzeit: {held}.",
                volatile=True,
            ),
        ],
        gaps=[
            T(
                "A treatment-relevant flag with FHIR export to the KIS and proof of receipt is planned.",
                "Eine Markierung „behandlungsrelevant“ mit FHIR-Export ins KIS und Empfangsnachweis ist "
                "geplant.",
            )
        ],
        controller=[
            T(
                "Make sure treatment-relevant content is documented in the patient record.",
                "Sicherstellen, dass behandlungsrelevante Inhalte in der Patientenakte dokumentiert werden.",
            )
        ],
    )


@rule("I.10")
def _redaction(f: Facts) -> Finding:
    return Finding(
        "not_met",
        [
            say(
                "Images cannot be redacted in pforte yet, and image metadata (EXIF, GPS) is not removed.",
                "Bilder lassen sich in pforte noch nicht schwärzen, und Bildmetadaten (EXIF, GPS) werden "
                "nicht entfernt.",
            )
        ],
        gaps=[
            T(
                "A redaction editor with irreversible blackening and metadata removal is planned.",
                "Ein Schwärzungseditor mit unumkehrbarem Schwärzen und Entfernen der Metadaten ist geplant.",
            )
        ],
    )


def _chain(name: Text, c: ChainFacts) -> list[Item]:
    if c.ok:
        return [
            say(
                f"The hash chain of the audit log ({name.en}) verified intact.",
                f"Die Hash-Kette des Protokolls ({name.de}) ist unversehrt.",
            ),
            say(f"Entries checked: {c.entries}.", f"Geprüfte Einträge: {c.entries}.", volatile=True),
        ]
    return [
        say(
            f"The hash chain of the audit log ({name.en}) is broken at entry {c.first_bad_seq}: {c.problem}.",
            f"Die Hash-Kette des Protokolls ({name.de}) ist bei Eintrag {c.first_bad_seq} gebrochen: "
            f"{c.problem}.",
        )
    ]


@rule("I.11")
def _accountability(f: Facts) -> Finding:
    evidence = [
        say(
            "This report is generated from the instance's own state and settings, row by row against the "
            "catalog, and names the tests that prove each row.",
            "Dieser Bericht entsteht aus Zustand und Einstellungen der Instanz selbst, Zeile für Zeile "
            "gegen den Katalog, und nennt die Tests, die jede Zeile belegen.",
        ),
        *_chain(T("this organisation", "diese Einrichtung"), f.audit),
        *_chain(T("installation-wide", "installationsweit"), f.instance_audit),
    ]
    if f.checkpoints:
        evidence.append(
            say(
                f"Signed checkpoints of the chain: {f.checkpoints}, the newest at entry "
                f"{f.last_checkpoint_seq}.",
                f"Signierte Prüfpunkte der Kette: {f.checkpoints}, der neueste bei Eintrag "
                f"{f.last_checkpoint_seq}.",
                volatile=True,
            )
        )
    covered = sum(1 for v in f.evidence.values() if v)
    evidence.append(
        say(
            f"Catalog rows with tests: {covered}.",
            f"Katalogzeilen mit Tests: {covered}.",
        )
    )
    status: Status = "met" if f.audit.ok and f.instance_audit.ok else "not_met"
    return Finding(
        status,
        evidence,
        controller=[
            T(
                "Review the saved reports and document the assessment (who reviewed, when, what follows).",
                "Die gespeicherten Berichte prüfen und die Bewertung dokumentieren (wer, wann, mit welchen "
                "Folgen).",
            )
        ],
    )


@rule("I.12")
def _defaults(f: Facts) -> Finding:
    days = f.defaults.get("retention_days")
    evidence = [
        say(
            f"Defaults: automatic deletion on ({days} days), read receipts off, link previews always off, "
            "consent required before staff write, error reporting off.",
            f"Voreinstellungen: automatische Löschung an ({days} Tage), Lesebestätigungen aus, "
            "Linkvorschauen immer aus, Einwilligung vor dem Schreiben erforderlich, Fehlerberichterstattung "
            "aus.",
        ),
        say(
            "No third party is contacted unless an admin configures it: no CDN, web fonts or analytics; "
            "pages load only same-origin resources under a strict Content-Security-Policy.",
            "Kein Dritter wird kontaktiert, solange ein Admin es nicht einrichtet: kein CDN, keine "
            "Webschriften, keine Analyse; Seiten laden nur Ressourcen vom eigenen Ursprung unter einer "
            "strengen Content-Security-Policy.",
        ),
    ]
    loosened = list(f.deviations)
    if f.error_reporting:
        loosened.append("error_reporting")
    if not loosened:
        evidence.append(
            say(
                "Every setting is at its privacy-friendly default or stricter.",
                "Jede Einstellung steht auf ihrer datenschutzfreundlichen Voreinstellung oder strenger.",
            )
        )
        return Finding("met", evidence)
    names = ", ".join(loosened)
    evidence.append(
        say(
            f"Settings less strict than their default here: {names}.",
            f"Hier weniger streng als voreingestellt: {names}.",
        )
    )
    return Finding("partly", evidence)


@rule("I.13")
def _updates(f: Facts) -> Finding:
    return Finding(
        "partly",
        [
            say(
                f"pforte {f.version}, database schema {f.schema or 'unknown'}.",
                f"pforte {f.version}, Datenbankschema {f.schema or 'unbekannt'}.",
            ),
            say(
                "“pforte serve” brings the database schema up to date on every start, so an upgrade is "
                "installing the new release and restarting.",
                "„pforte serve“ bringt das Datenbankschema bei jedem Start auf den neuesten Stand; ein "
                "Update besteht also aus Installieren und Neustarten.",
            ),
        ],
        gaps=[
            T(
                "No update check yet: the operator has to learn of new releases.",
                "Noch keine Update-Prüfung: der Betrieb muss selbst von neuen Versionen erfahren.",
            )
        ],
    )


# -- II. communication -----------------------------------------------------------------------------


@rule("II.1")
def _e2e(f: Facts) -> Finding:
    evidence: list[Item] = []
    gaps = [
        T(
            "No channel kind whose encryption ends at pforte's own server exists yet (Matrix, XMPP planned).",
            "Es gibt noch keine Kanalart, deren Verschlüsselung auf dem eigenen Server endet (Matrix, XMPP "
            "geplant).",
        )
    ]
    if not f.channels:
        evidence.append(say("No channel is configured.", "Es ist kein Kanal eingerichtet."))
    for c in f.channels:
        if c.encryption_ends == "own_server":
            evidence.append(
                say(
                    f"Channel {c.id} ({c.label.en}): encryption ends at our own server.",
                    f"Kanal {c.id} ({c.label.de}): die Verschlüsselung endet auf unserem eigenen Server.",
                )
            )
            continue
        storage_en = f" Storage: {c.storage.en}." if c.storage else ""
        storage_de = f" Speicherung: {c.storage.de}." if c.storage else ""
        evidence.append(
            say(
                f"Channel {c.id} ({c.label.en}): end-to-end encryption ends at the servers of {c.operator}, "
                f"not at ours. {c.operator} decrypts every message, holds the keys on the organisation's "
                f"behalf as {c.operator_role.en} and keeps content {c.provider_retention.en}.{storage_en}",
                f"Kanal {c.id} ({c.label.de}): die Ende-zu-Ende-Verschlüsselung endet auf den Servern von "
                f"{c.operator}, nicht auf unseren. {c.operator} entschlüsselt jede Nachricht, verwaltet die "
                f"Schlüssel im Auftrag der Einrichtung als {c.operator_role.de} und speichert Inhalte "
                f"{c.provider_retention.de}.{storage_de}",
            )
        )
    provider = _provider_channels(f)
    if provider:
        if f.settings.get("own_server_encryption_only"):
            evidence.append(
                say(
                    "own_server_encryption_only is on: staff cannot send over channels whose encryption "
                    "ends at the provider.",
                    "own_server_encryption_only ist an: über Kanäle, deren Verschlüsselung beim Anbieter "
                    "endet, kann das Team nicht senden.",
                )
            )
        else:
            evidence.append(
                say(
                    "own_server_encryption_only is off: staff may send health content over channels whose "
                    "encryption ends at the provider.",
                    "own_server_encryption_only ist aus: das Team darf Gesundheitsinhalte über Kanäle "
                    "senden, deren Verschlüsselung beim Anbieter endet.",
                )
            )
    evidence.append(
        say(
            "Between the provider and pforte content travels over TLS; pforte's own address uses HTTPS."
            if f.https
            else "pforte's configured own address does not use HTTPS.",
            "Zwischen Anbieter und pforte werden Inhalte per TLS übertragen; die eigene Adresse von pforte "
            "nutzt HTTPS."
            if f.https
            else "Die eingestellte eigene Adresse von pforte nutzt kein HTTPS.",
        )
    )
    met = bool(f.channels) and not provider and f.https
    return Finding("met" if met else "partly", evidence, gaps=gaps)


@rule("II.2")
def _integrity(f: Facts) -> Finding:
    wait = f.settings.get("incoming_parts_wait_minutes")
    return Finding(
        "met",
        [
            say(
                "Every message carries a SHA-256 of its content, checked again whenever it is shown.",
                "Jede Nachricht trägt einen SHA-256 ihres Inhalts, der bei jeder Anzeige erneut geprüft "
                "wird.",
            ),
            say(
                "Long outgoing texts are split with “(x/y)” markers; incoming “(x/y)” sequences are checked "
                f"and a missing part is flagged to staff after {wait} minutes.",
                "Lange ausgehende Texte werden mit „(x/y)“-Markern geteilt; eingehende „(x/y)“-Folgen "
                f"werden geprüft, und ein fehlender Teil wird dem Team nach {wait} Minuten gemeldet.",
            ),
            say(
                "The delivery status of every message (sent, delivered, read, failed) is tracked, and "
                "failures are shown to staff.",
                "Der Zustellstatus jeder Nachricht (gesendet, zugestellt, gelesen, fehlgeschlagen) wird "
                "verfolgt, Fehler werden dem Team angezeigt.",
            ),
            say(
                "The audit log is a hash chain (see I.11).",
                "Das Protokoll ist eine Hash-Kette (siehe I.11).",
            ),
        ],
    )


@rule("II.3")
def _metadata(f: Facts) -> Finding:
    meta = dict(f.settings.get("metadata_days") or {})
    defaults = dict(f.defaults.get("metadata_days") or {})
    parts_en, parts_de = [], []
    for name in sorted(meta):
        default = defaults.get(name)
        longer = default is not None and int(meta[name]) > int(default)
        parts_en.append(f"{name} {meta[name]} days" + (" (longer than the default)" if longer else ""))
        parts_de.append(f"{name} {meta[name]} Tage" + (" (länger als voreingestellt)" if longer else ""))
    return Finding(
        "met",
        [
            say(
                f"Metadata of this organisation is deleted after: {', '.join(parts_en)}.",
                f"Metadaten dieser Einrichtung werden gelöscht nach: {', '.join(parts_de)}.",
            ),
            say(
                f"IP address and browser of staff sessions are kept {f.session_metadata_days} days, failed "
                f"logins {f.failed_login_days} days.",
                f"IP-Adresse und Browser von Sitzungen des Teams werden {f.session_metadata_days} Tage "
                f"gespeichert, fehlgeschlagene Anmeldungen {f.failed_login_days} Tage.",
            ),
            say(
                "Metadata is used only to deliver messages and run the service; there is no analytics, and "
                "nothing is shared with vendors.",
                "Metadaten dienen nur der Zustellung und dem Betrieb; es gibt keine Analyse, und nichts "
                "wird an Anbieter weitergegeben.",
            ),
        ],
    )


@rule("II.4")
def _open_protocols(f: Facts) -> Finding:
    return Finding(
        "not_met",
        [
            say(
                "pforte supports only the WhatsApp Business Platform; there is no adapter for an open "
                "protocol yet.",
                "pforte unterstützt nur die WhatsApp Business Platform; einen Adapter für ein offenes "
                "Protokoll gibt es noch nicht.",
            )
        ],
        gaps=[T("Matrix and XMPP adapters are planned.", "Adapter für Matrix und XMPP sind geplant.")],
    )


# -- III. end devices (organisational) -------------------------------------------------------------


@rule("III.1")
def _device_protection(f: Facts) -> Finding:
    return Finding(
        "organisational",
        [
            say(
                "pforte is a web inbox: it keeps nothing on staff devices beyond the session cookie, and a "
                f"session ends after {f.session_idle_minutes} minutes without activity.",
                "pforte ist ein Web-Posteingang: auf Geräten des Teams bleibt außer dem Sitzungs-Cookie "
                f"nichts, und eine Sitzung endet nach {f.session_idle_minutes} Minuten ohne Aktivität.",
            )
        ],
        controller=[
            T(
                "Protect every device used for the inbox with a screen lock and storage encryption.",
                "Jedes Gerät, mit dem der Posteingang genutzt wird, mit Bildschirmsperre und "
                "Speicherverschlüsselung schützen.",
            )
        ],
    )


@rule("III.2")
def _device_updates(f: Facts) -> Finding:
    return Finding(
        "organisational",
        [
            say(
                "Staff need only a current web browser; there is no app to install.",
                "Das Team braucht nur einen aktuellen Webbrowser; es gibt keine App zu installieren.",
            )
        ],
        controller=[
            T(
                "Allow only operating systems and browsers that still receive security updates.",
                "Nur Betriebssysteme und Browser zulassen, die noch Sicherheitsupdates erhalten.",
            )
        ],
    )


@rule("III.3")
def _mdm(f: Facts) -> Finding:
    return Finding(
        "organisational",
        [
            say(
                "Access ends centrally: a deactivated account is refused at its next request.",
                "Der Zugang endet zentral: ein deaktiviertes Konto wird bei seiner nächsten Anfrage "
                "abgewiesen.",
            )
        ],
        controller=[
            T(
                "Manage the devices centrally (mobile device management: enrolment, policies, remote wipe).",
                "Die Geräte zentral verwalten (Mobile Device Management: Aufnahme, Richtlinien, "
                "Fernlöschung).",
            )
        ],
    )


# -- IV. platform and operation --------------------------------------------------------------------


@rule("IV.1")
def _telecom(f: Facts) -> Finding:
    return Finding(
        "organisational",
        [
            say(
                "pforte cannot judge this; it is a question of law.",
                "pforte kann das nicht beurteilen; es ist eine Rechtsfrage.",
            )
        ],
        controller=[
            T(
                "Have it checked whether running the service makes the organisation a provider of a public "
                "telecommunications service, and meet the duties that follow if so.",
                "Prüfen lassen, ob der Betrieb die Einrichtung zum Anbieter eines öffentlichen "
                "Telekommunikationsdienstes macht, und gegebenenfalls die Pflichten daraus erfüllen.",
            )
        ],
    )


@rule("IV.2")
def _authorised(f: Facts) -> Finding:
    roles = ", ".join(f"{r} {n}" for r, n in sorted(f.roles.items())) or "—"
    return Finding(
        "met",
        [
            say(
                "Accounts are created by an administrator; there is no self-registration. Roles: admin, "
                "staff, auditor (read-only).",
                "Konten legt ein Admin an; eine Selbstregistrierung gibt es nicht. Rollen: admin, staff, "
                "auditor (nur lesend).",
            ),
            say(
                "Every query is scoped to the user's organisation; patients are reachable only inside their "
                "organisation, and deactivated accounts cannot log in.",
                "Jede Abfrage ist auf die Einrichtung des Nutzers beschränkt; Patienten sind nur innerhalb "
                "ihrer Einrichtung erreichbar, und deaktivierte Konten können sich nicht anmelden.",
            ),
            say(
                f"Active accounts by role: {roles}; deactivated: {f.inactive_accounts}.",
                f"Aktive Konten je Rolle: {roles}; deaktiviert: {f.inactive_accounts}.",
                volatile=True,
            ),
        ],
        gaps=[
            T(
                "No single sign-on (OpenID Connect, SAML 2.0), no second factor and no invitations yet.",
                "Noch kein Single Sign-on (OpenID Connect, SAML 2.0), kein zweiter Faktor und keine "
                "Einladungen.",
            )
        ],
    )


@rule("IV.3")
def _dpia(f: Facts) -> Finding:
    return Finding(
        "organisational",
        [
            say(
                "The record of processing activities at the end of this report is generated from the "
                "configuration: categories of data, recipients, retention periods and measures, as input to "
                "the assessment.",
                "Das Verzeichnis der Verarbeitungstätigkeiten am Ende dieses Berichts entsteht aus der "
                "Konfiguration: Datenkategorien, Empfänger, Speicherfristen und Maßnahmen, als Grundlage "
                "der Folgenabschätzung.",
            )
        ],
        controller=[
            T(
                "Carry out a data protection impact assessment (Art. 35 GDPR): health data of patients is "
                "processed.",
                "Eine Datenschutz-Folgenabschätzung durchführen (Art. 35 DSGVO): es werden Gesundheitsdaten "
                "von Patienten verarbeitet.",
            )
        ],
    )


@rule("IV.4")
def _review(f: Facts) -> Finding:
    every = interval_text(f.report_seconds)
    evidence = [
        say(
            f"A report is saved for every organisation {every.en}, and each one is compared with the one "
            "before (“changed since”).",
            f"Für jede Einrichtung wird {every.de} ein Bericht gespeichert und mit dem vorigen verglichen "
            "(„geändert seit“).",
        ),
        say(
            f"Saved reports: {f.reports_saved}; the newest from {moment(f.last_saved_at)}.",
            f"Gespeicherte Berichte: {f.reports_saved}; der neueste vom {moment(f.last_saved_at)}.",
            volatile=True,
        ),
    ]
    controller = [
        T(
            "Review the report at fixed intervals and after every change of the installation.",
            "Den Bericht in festen Abständen und nach jeder Änderung der Installation prüfen.",
        )
    ]
    fresh = f.last_saved_at is not None and f.now - f.last_saved_at <= timedelta(seconds=2 * f.report_seconds)
    if fresh:
        return Finding("met", evidence, controller=controller)
    evidence.append(
        say(
            "No report has been saved within two intervals: is pforte's background worker running?",
            "Innerhalb von zwei Intervallen wurde kein Bericht gespeichert: läuft der Hintergrunddienst von "
            "pforte?",
        )
    )
    return Finding("partly", evidence, controller=controller)


@rule("IV.5")
def _operation(f: Facts) -> Finding:
    return Finding(
        "met",
        [
            say(
                f"This installation runs on {f.dialect}. The same release runs as one process on SQLite or "
                "as several processes sharing PostgreSQL, on the organisation's own servers or at a "
                "processor, with one or many organisations.",
                f"Diese Installation läuft auf {f.dialect}. Dieselbe Version läuft als ein Prozess mit "
                "SQLite oder als mehrere Prozesse mit gemeinsamer PostgreSQL-Datenbank, auf eigenen Servern "
                "oder bei einem Auftragsverarbeiter, mit einer oder vielen Einrichtungen.",
            ),
            say(
                f"Organisations on this installation: {f.organisations}.",
                f"Einrichtungen auf dieser Installation: {f.organisations}.",
                volatile=True,
            ),
        ],
    )


@rule("IV.6")
def _processors(f: Facts) -> Finding:
    evidence = [
        say(
            "pforte is self-hosted; apart from the channels below it calls no outside service.",
            "pforte wird selbst betrieben; außer den folgenden Kanälen ruft es keinen fremden Dienst auf.",
        )
    ]
    outside_eu = []
    for c in _provider_channels(f):
        storage_en = c.storage.en if c.storage else c.storage_region
        storage_de = c.storage.de if c.storage else c.storage_region
        evidence.append(
            say(
                f"Channel {c.id}: {c.operator} acts as {c.operator_role.en}; storage: {storage_en}.",
                f"Kanal {c.id}: {c.operator} handelt als {c.operator_role.de}; Speicherung: {storage_de}.",
            )
        )
        if c.storage_region not in EU_STORAGE:
            outside_eu.append(c.id)
    if f.error_reporting:
        evidence.append(
            say(
                f"Error reports go to {f.error_reporting_host}.",
                f"Fehlerberichte gehen an {f.error_reporting_host}.",
            )
        )
    controller = [
        T(
            "Check every processor against the GDPR, Art. 9(3) GDPR and § 203 StGB.",
            "Jeden Auftragsverarbeiter an DSGVO, Art. 9 Abs. 3 DSGVO und § 203 StGB messen.",
        )
    ]
    if outside_eu:
        ids = ", ".join(outside_eu)
        evidence.append(
            say(
                f"Channels {ids} let Meta keep content at rest in its default storage, which is not limited "
                "to the EU/EEA; Local Storage DE or No Storage would keep it there.",
                f"Bei den Kanälen {ids} speichert Meta Inhalte in seinem Standardspeicher, der nicht auf "
                "EU/EWR beschränkt ist; Local Storage DE oder No Storage würden das ändern.",
            )
        )
        return Finding("partly", evidence, controller=controller)
    return Finding("met", evidence, controller=controller)


@rule("IV.7")
def _agreements(f: Facts) -> Finding:
    parties = sorted({c.operator for c in _provider_channels(f)})
    if f.error_reporting and f.error_reporting_host:
        parties.append(f.error_reporting_host)
    listed_en = ", ".join(parties) if parties else "none besides the hoster"
    listed_de = ", ".join(parties) if parties else "keiner außer dem Hoster"
    return Finding(
        "organisational",
        [
            say(
                f"Processors named by this installation's configuration: {listed_en}.",
                f"Auftragsverarbeiter laut Konfiguration dieser Installation: {listed_de}.",
            )
        ],
        controller=[
            T(
                "Conclude processing agreements (Art. 28(3) GDPR) with each of them, and with the hoster of "
                "this installation unless it is your own.",
                "Mit jedem von ihnen einen Auftragsverarbeitungsvertrag schließen (Art. 28 Abs. 3 DSGVO), "
                "ebenso mit dem Hoster dieser Installation, wenn er nicht der eigene ist.",
            )
        ],
    )


@rule("IV.8")
def _regular_deletion(f: Facts) -> Finding:
    every = interval_text(f.sweep_seconds)
    evidence = [
        say(
            "Patient data lies only in this installation's database and attachment store; staff devices "
            "keep nothing (no offline store).",
            "Patientendaten liegen nur in Datenbank und Anhangspeicher dieser Installation; Geräte des "
            "Teams speichern nichts (kein Offline-Speicher).",
        ),
        say(
            f"The retention sweeper runs {every.en}; its last run: {moment(f.last_sweep_at)}.",
            f"Die Löschroutine läuft {every.de}; zuletzt: {moment(f.last_sweep_at)}.",
            volatile=True,
        ),
    ]
    for c in _provider_channels(f):
        evidence.append(
            say(
                f"Channel {c.id}: {c.operator} keeps content {c.provider_retention.en}.",
                f"Kanal {c.id}: {c.operator} speichert Inhalte {c.provider_retention.de}.",
            )
        )
    if not f.settings.get("retention_enabled"):
        evidence.append(
            say(
                "Automatic deletion of conversations is switched off for this organisation; only metadata "
                "is deleted regularly.",
                "Die automatische Löschung von Gesprächen ist für diese Einrichtung ausgeschaltet; "
                "regelmäßig gelöscht werden nur Metadaten.",
            )
        )
        return Finding("partly", evidence)
    return Finding("met", evidence)


@rule("IV.9")
def _security_updates(f: Facts) -> Finding:
    return Finding(
        "partly",
        [say(f"Running pforte {f.version}.", f"Es läuft pforte {f.version}.")],
        gaps=[
            T(
                "No update check and no security flag in the release information yet.",
                "Noch keine Update-Prüfung und keine Kennzeichnung von Sicherheitskorrekturen in den "
                "Versionshinweisen.",
            )
        ],
        controller=[
            T(
                "Follow pforte's releases and install security fixes promptly.",
                "pforte-Versionen verfolgen und Sicherheitskorrekturen zeitnah einspielen.",
            )
        ],
    )
