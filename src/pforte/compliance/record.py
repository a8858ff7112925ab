"""A draft record of processing activities (Art. 30(1) GDPR), generated from the configuration.

It is input for the controller's own record and for the impact assessment (DSK IV.3), not a
finished record: what pforte cannot know (the controller's name and contacts, the data protection
officer, the legal basis it relies on, the hoster) is left for the controller and said so. Like
the rest of the report it holds no personal data: roles are counted, channels named by id.
"""

from __future__ import annotations

from pforte.compliance.catalog import Text
from pforte.compliance.rules import Facts, T, days_text
from pforte.compliance.schemas import RecordSection


def _section(key: str, title: Text, *items: Text) -> RecordSection:
    return RecordSection(key, title, tuple(items))


def _retention(f: Facts) -> list[Text]:
    out: list[Text] = []
    days = f.settings.get("retention_days")
    if not f.settings.get("retention_enabled"):
        out.append(
            T(
                "Conversations (messages, attachments): kept until deleted by hand; automatic deletion is "
                "off.",
                "Gespräche (Nachrichten, Anhänge): bis zur Löschung von Hand; die automatische Löschung ist "
                "aus.",
            )
        )
    else:
        d = days_text(days)
        out.append(
            T(
                f"Conversations (messages, attachments): {d.en} after the last activity, unless a rule or a "
                "hold says otherwise.",
                f"Gespräche (Nachrichten, Anhänge): {d.de} nach der letzten Aktivität, sofern keine Regel "
                "oder Sperre anderes bestimmt.",
            )
        )
    for channel_id, channel_days in sorted(f.channel_rules.items()):
        d = days_text(channel_days)
        out.append(
            T(f"Conversations on channel {channel_id}: {d.en}.", f"Gespräche auf Kanal {channel_id}: {d.de}.")
        )
    if f.tag_rules:
        en = ", ".join(sorted({days_text(d).en for d in f.tag_rules}))
        de = ", ".join(sorted({days_text(d).de for d in f.tag_rules}))
        out.append(
            T(
                f"Conversations with a tag that has a rule ({len(f.tag_rules)} rules): {en}.",
                f"Gespräche mit einem Schlagwort, für das eine Regel gilt ({len(f.tag_rules)} Regeln): {de}.",
            )
        )
    for name, n in sorted(dict(f.settings.get("metadata_days") or {}).items()):
        out.append(T(f"Metadata “{name}”: {n} days.", f"Metadaten „{name}“: {n} Tage."))
    out += [
        T(
            f"Staff sessions: {f.session_idle_minutes} minutes without activity, at most "
            f"{f.session_absolute_hours} hours; their IP address and browser {f.session_metadata_days} days; "
            f"failed logins {f.failed_login_days} days.",
            f"Sitzungen des Teams: {f.session_idle_minutes} Minuten ohne Aktivität, höchstens "
            f"{f.session_absolute_hours} Stunden; deren IP-Adresse und Browser {f.session_metadata_days} "
            f"Tage; fehlgeschlagene Anmeldungen {f.failed_login_days} Tage.",
        ),
        T(
            "Consent records: as long as the patient's data; deleted with it.",
            "Einwilligungsnachweise: so lange wie die Daten des Patienten; mit ihnen gelöscht.",
        ),
        T(
            "Audit log: kept; it holds ids, actions and counts, no message content, names or numbers.",
            "Protokoll: wird aufbewahrt; es enthält Kennungen, Aktionen und Zahlen, keine Inhalte, Namen "
            "oder Nummern.",
        ),
        T(
            "Backups: as long as the controller keeps the files; data of a patient erased later stays "
            "unreadable in them (the data key is destroyed).",
            "Sicherungen: so lange der Verantwortliche die Dateien aufbewahrt; Daten eines später "
            "gelöschten Patienten bleiben darin unlesbar (der Datenschlüssel ist vernichtet).",
        ),
    ]
    return out


def _recipients(f: Facts) -> list[Text]:
    roles = ", ".join(f"{r} {n}" for r, n in sorted(f.roles.items())) or "—"
    out = [
        T(
            f"Staff of the organisation, by role (active accounts): {roles}.",
            f"Das Team der Einrichtung nach Rollen (aktive Konten): {roles}.",
        )
    ]
    for c in f.channels:
        if c.encryption_ends == "own_server":
            out.append(
                T(
                    f"Channel {c.id} ({c.label.en}): encryption ends at our own server; no processor sees "
                    "content.",
                    f"Kanal {c.id} ({c.label.de}): die Verschlüsselung endet auf unserem Server; kein "
                    "Auftragsverarbeiter sieht Inhalte.",
                )
            )
            continue
        out.append(
            T(
                f"{c.operator}, {c.operator_role.en}, for channel {c.id} ({c.label.en}): sees every message "
                f"in clear and keeps content {c.provider_retention.en}.",
                f"{c.operator}, {c.operator_role.de}, für Kanal {c.id} ({c.label.de}): sieht jede Nachricht "
                f"im Klartext und speichert Inhalte {c.provider_retention.de}.",
            )
        )
    if f.error_reporting:
        out.append(
            T(
                f"{f.error_reporting_host}: error reports (exception type, stack frames, pforte version).",
                f"{f.error_reporting_host}: Fehlerberichte (Ausnahmetyp, Stack-Frames, pforte-Version).",
            )
        )
    out.append(
        T(
            "The hoster of this installation, if it is not the organisation itself: to be completed by the "
            "controller.",
            "Der Hoster dieser Installation, falls nicht die Einrichtung selbst: vom Verantwortlichen zu "
            "ergänzen.",
        )
    )
    return out


def _transfers(f: Facts) -> list[Text]:
    out: list[Text] = []
    for c in f.channels:
        if c.encryption_ends == "own_server":
            continue
        detail_en = c.storage_detail.en if c.storage_detail else c.storage_region
        detail_de = c.storage_detail.de if c.storage_detail else c.storage_region
        out.append(T(f"Channel {c.id}: {detail_en}", f"Kanal {c.id}: {detail_de}"))
    if not out:
        out.append(
            T(
                "None arising from pforte's configuration.",
                "Keine, die sich aus der Konfiguration von pforte ergeben.",
            )
        )
    return out


def _measures(f: Facts) -> list[Text]:
    out = [
        T(
            "Encryption at rest: AES-256-GCM per patient data key, wrapped by the organisation's "
            f"key-encryption key from “{f.key_provider}” outside the database; lookups through a keyed blind "
            "index.",
            "Verschlüsselung gespeicherter Daten: AES-256-GCM mit Datenschlüssel je Patient, umhüllt vom "
            f"Schlüsselverschlüsselungsschlüssel der Einrichtung von „{f.key_provider}“ außerhalb der "
            "Datenbank; Suche über einen verschlüsselten Blindindex.",
        ),
        T(
            "Erasure by crypto-shredding: deleting a patient destroys the data key.",
            "Löschen durch Crypto-Shredding: das Löschen eines Patienten vernichtet den Datenschlüssel.",
        ),
        T(
            "Transport: TLS to the channel provider, signed webhooks; the inbox "
            + ("over HTTPS." if f.https else "is configured without HTTPS."),
            "Übertragung: TLS zum Kanalanbieter, signierte Webhooks; der Posteingang "
            + ("über HTTPS." if f.https else "ist ohne HTTPS eingerichtet."),
        ),
        T(
            "Access control: personal accounts created by admins, roles (admin, staff, auditor), every "
            "query scoped to the organisation, sessions with time-outs, login throttling.",
            "Zugriffskontrolle: persönliche Konten, von Admins angelegt, Rollen (admin, staff, auditor), "
            "jede Abfrage auf die Einrichtung beschränkt, Sitzungen mit Zeitlimit, Bremse gegen "
            "Passwortraten.",
        ),
        T(
            "Accountability: hash-chained audit log of every state-changing action"
            + (", with signed checkpoints." if f.checkpoints else ".")
            + " This report, saved on a schedule and compared over time.",
            "Nachweisbarkeit: hash-verkettetes Protokoll jeder ändernden Aktion"
            + (", mit signierten Prüfpunkten." if f.checkpoints else ".")
            + " Dieser Bericht, regelmäßig gespeichert und über die Zeit verglichen.",
        ),
        T(
            "Availability: consistent backups, encrypted to the controller's public key"
            + ("." if f.backup_recipient else " (no recipient set yet)."),
            "Verfügbarkeit: konsistente Sicherungen, verschlüsselt für den öffentlichen Schlüssel des "
            "Verantwortlichen" + ("." if f.backup_recipient else " (noch kein Empfänger gesetzt)."),
        ),
        T(
            "Minimisation: automatic deletion "
            + ("on" if f.settings.get("retention_enabled") else "off")
            + ", short metadata periods, no analytics, error reporting "
            + ("on, scrubbed." if f.error_reporting else "off."),
            "Datenminimierung: automatische Löschung "
            + ("an" if f.settings.get("retention_enabled") else "aus")
            + ", kurze Fristen für Metadaten, keine Analyse, Fehlerberichte "
            + ("an, bereinigt." if f.error_reporting else "aus."),
        ),
    ]
    return out


def build(f: Facts) -> tuple[RecordSection, ...]:
    """The draft record for the facts of one organisation."""
    consent = (
        T(
            "Patients are asked for consent in the chat before staff write (consent_required is on).",
            "Patienten werden im Chat um Einwilligung gebeten, bevor das Team schreibt (consent_required "
            "ist an).",
        )
        if f.settings.get("consent_required")
        else T(
            "Staff may write without the patient's consent in the chat (consent_required is off).",
            "Das Team darf ohne Einwilligung im Chat schreiben (consent_required ist aus).",
        )
    )
    return (
        _section(
            "controller",
            T("Controller", "Verantwortlicher"),
            T(
                f"Organisation “{f.org_slug}” on this installation.",
                f"Einrichtung „{f.org_slug}“ auf dieser Installation.",
            ),
            T(
                "Name and contact details of the controller and of the data protection officer: to be "
                "completed.",
                "Name und Kontaktdaten des Verantwortlichen und des Datenschutzbeauftragten: zu ergänzen.",
            ),
        ),
        _section(
            "purposes",
            T("Purposes", "Zwecke"),
            T(
                "Communication between the organisation and its patients over messengers: questions, "
                "appointments, findings and other matters of their care.",
                "Kommunikation der Einrichtung mit ihren Patienten über Messenger: Fragen, Termine, Befunde "
                "und andere Angelegenheiten ihrer Versorgung.",
            ),
            consent,
            T(
                "Legal basis (Art. 6 and Art. 9(2) GDPR): to be completed by the controller.",
                "Rechtsgrundlage (Art. 6 und Art. 9 Abs. 2 DSGVO): vom Verantwortlichen zu ergänzen.",
            ),
        ),
        _section(
            "data_subjects",
            T("Categories of data subjects", "Kategorien betroffener Personen"),
            T(
                "Patients and others who write to the organisation's messenger numbers.",
                "Patienten und andere Personen, die an die Messenger-Nummern der Einrichtung schreiben.",
            ),
            T("Staff members with an account.", "Beschäftigte mit einem Konto."),
        ),
        _section(
            "data_categories",
            T("Categories of personal data", "Kategorien personenbezogener Daten"),
            T(
                "Patients: messenger identifiers (user id, phone number), profile name, names given by "
                "staff.",
                "Patienten: Messenger-Kennungen (Nutzerkennung, Telefonnummer), Profilname, vom Team "
                "vergebene Namen.",
            ),
            T(
                "Patients: messages and attachments (images, video, audio, documents), which may hold "
                "health data (Art. 9 GDPR).",
                "Patienten: Nachrichten und Anhänge (Bilder, Video, Audio, Dokumente), die Gesundheitsdaten "
                "enthalten können (Art. 9 DSGVO).",
            ),
            T(
                "Patients: consent records, delivery metadata (times and status of messages).",
                "Patienten: Einwilligungsnachweise, Zustellmetadaten (Zeiten und Status von Nachrichten).",
            ),
            T(
                "Staff: name, e-mail address, role, language, sessions (IP address, browser), audit entries.",
                "Beschäftigte: Name, E-Mail-Adresse, Rolle, Sprache, Sitzungen (IP-Adresse, Browser), "
                "Protokolleinträge.",
            ),
        ),
        _section("recipients", T("Recipients", "Empfänger"), *_recipients(f)),
        _section(
            "transfers",
            T("Transfers to third countries", "Übermittlungen in Drittländer"),
            *_transfers(f),
        ),
        _section("retention", T("Time limits for erasure", "Löschfristen"), *_retention(f)),
        _section(
            "measures",
            T(
                "Technical and organisational measures (Art. 32 GDPR)",
                "Technische und organisatorische Maßnahmen (Art. 32 DSGVO)",
            ),
            *_measures(f),
        ),
    )
