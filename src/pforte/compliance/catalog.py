"""The DSK catalog as data: every row pforte reports on, with its level, kind and requirement.

The requirement lines are pforte's own short paraphrases (German and English), not the DSK's
wording; the IDs are the stable ones from ``dsk-catalog.md`` that tests name in
``@pytest.mark.dsk("…")``. A row is *technical* when software can meet it and *organisational*
when only the controller can (pforte then says what it must do and where pforte helps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["technical", "organisational"]
LANGS = ("de", "en")


@dataclass(frozen=True, slots=True)
class Text:
    """A sentence in English and German; reports carry both and pages pick one."""

    en: str
    de: str

    def get(self, lang: str) -> str:
        """The sentence in ``lang`` (German for "de", English otherwise)."""
        return self.de if lang == "de" else self.en

    def as_dict(self) -> dict[str, str]:
        """The JSON form ``{"en": …, "de": …}``."""
        return {"en": self.en, "de": self.de}

    @classmethod
    def from_dict(cls, data: Any) -> Text:
        """Read the JSON form back (a plain string counts for both languages)."""
        if isinstance(data, str):
            return cls(data, data)
        return cls(str(data.get("en", "")), str(data.get("de", data.get("en", ""))))


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalog row."""

    id: str
    section: str  # I | II | III | IV
    level: str  # as the catalog gives it: MUST, SHOULD, "MUST / SHOULD", …
    kind: Kind
    requirement: Text


SECTIONS: dict[str, Text] = {
    "I": Text("The messenger application", "Die Messenger-Anwendung"),
    "II": Text("Communication", "Kommunikation"),
    "III": Text("End devices", "Endgeräte"),
    "IV": Text("Platform and operation", "Plattform und Betrieb"),
}

# The catalog gives no level for the end-device rows (section III); "—" says so instead of guessing.
NO_LEVEL = "—"

CATALOG: tuple[Entry, ...] = (
    Entry(
        "I.1",
        "I",
        "MUST",
        "technical",
        Text(
            "Tell patients how their data is processed (Art. 13 GDPR), in a visible place they can "
            "reach at any time.",
            "Patientinnen und Patienten über die Verarbeitung informieren (Art. 13 DSGVO), sichtbar und "
            "jederzeit erreichbar.",
        ),
    ),
    Entry(
        "I.2",
        "I",
        "MUST",
        "technical",
        Text(
            "Access to the application and its data needs a login of its own, separate from unlocking "
            "the device.",
            "Zugang zur Anwendung und ihren Daten nur nach eigener Anmeldung, getrennt vom Entsperren des "
            "Geräts.",
        ),
    ),
    Entry(
        "I.3a",
        "I",
        "MUST / SHOULD",
        "technical",
        Text(
            "Contacts are kept in the application's own store, apart from any device address book; "
            "importing contacts should be possible.",
            "Kontakte liegen in einem eigenen Speicher der Anwendung, getrennt vom Adressbuch des Geräts; "
            "ein Import von Kontakten soll möglich sein.",
        ),
    ),
    Entry(
        "I.3b",
        "I",
        "MUST",
        "technical",
        Text(
            "Messages and attachments are stored only in the application's own store, and encrypted.",
            "Nachrichten und Anhänge liegen nur im eigenen Speicher der Anwendung, und zwar verschlüsselt.",
        ),
    ),
    Entry(
        "I.3c",
        "I",
        "SHOULD",
        "technical",
        Text(
            "Messages and attachments from other sources can be imported.",
            "Nachrichten und Anhänge aus anderen Quellen lassen sich importieren.",
        ),
    ),
    Entry(
        "I.4",
        "I",
        "SHOULD",
        "technical",
        Text(
            "Certificates and keys for authentication, encryption and signatures can be imported; the "
            "application talks only to reliably identified partners.",
            "Zertifikate und Schlüssel für Authentisierung, Verschlüsselung und Signatur lassen sich "
            "importieren; kommuniziert wird nur mit sicher identifizierten Partnern.",
        ),
    ),
    Entry(
        "I.5",
        "I",
        "MUST if used",
        "technical",
        Text(
            "Where signatures are used, keys are bound to a person, their validity is checked and "
            "compromised keys can be revoked.",
            "Wo signiert wird, sind Schlüssel einer Person zugeordnet, ihre Gültigkeit wird geprüft und "
            "kompromittierte Schlüssel lassen sich sperren.",
        ),
    ),
    Entry(
        "I.6",
        "I",
        "SHOULD",
        "technical",
        Text(
            "An interface to the hospital's IT: security presets, synchronisation with the hospital "
            "information system, treatment-relevant messages moved into the patient record.",
            "Eine Schnittstelle zur Krankenhaus-IT: Sicherheitsvorgaben, Abgleich mit dem KIS, Übernahme "
            "behandlungsrelevanter Nachrichten in die Patientenakte.",
        ),
    ),
    Entry(
        "I.7",
        "I",
        "MUST / SHOULD",
        "technical",
        Text(
            "Data can be deleted selectively or in general; a period after which data is deleted "
            "automatically should be configurable.",
            "Daten lassen sich gezielt oder allgemein löschen; eine Frist, nach der Daten automatisch "
            "gelöscht werden, soll einstellbar sein.",
        ),
    ),
    Entry(
        "I.8",
        "I",
        "MUST",
        "technical",
        Text(
            "Error analysis by third parties is disclosed, optional and off by default, with clear data "
            "categories; nothing under medical secrecy or about usage leaves that way.",
            "Fehleranalyse durch Dritte ist offengelegt, optional und standardmäßig aus, mit klaren "
            "Datenkategorien; nichts unter Schweigepflicht und nichts über das Nutzungsverhalten gelangt "
            "darüber nach außen.",
        ),
    ),
    Entry(
        "I.9a",
        "I",
        "MUST",
        "technical",
        Text(
            "Contacts, content and communication are backed up (availability, Art. 32(1)(b) GDPR).",
            "Kontakte, Inhalte und Kommunikation werden gesichert (Verfügbarkeit, Art. 32 Abs. 1 lit. b "
            "DSGVO).",
        ),
    ),
    Entry(
        "I.9b",
        "I",
        "MUST",
        "technical",
        Text(
            "Data a processor stores can be encrypted before hand-over with a separately kept key the "
            "processor never sees.",
            "Daten, die ein Auftragsverarbeiter speichert, lassen sich vor der Übergabe mit einem getrennt "
            "verwahrten Schlüssel verschlüsseln, den er nie erhält.",
        ),
    ),
    Entry(
        "I.9c",
        "I",
        "MUST",
        "technical",
        Text(
            "Treatment-relevant content reaches the hospital's own systems and is found through the "
            "treatment documentation; documenting only inside the messenger is not allowed.",
            "Behandlungsrelevante Inhalte gelangen in die eigenen Systeme des Krankenhauses und sind über "
            "die Behandlungsdokumentation auffindbar; eine Dokumentation nur im Messenger ist unzulässig.",
        ),
    ),
    Entry(
        "I.10",
        "I",
        "SHOULD",
        "technical",
        Text(
            "Parts of images can be blacked out or hidden, for data minimisation.",
            "Teile von Bildern lassen sich zur Datenminimierung schwärzen oder ausblenden.",
        ),
    ),
    Entry(
        "I.11",
        "I",
        "MUST / SHOULD",
        "technical",
        Text(
            "Evidence that the privacy and security functions are in place and effective; the "
            "assessment is documented (Art. 5(2) GDPR).",
            "Nachweis, dass die Datenschutz- und Sicherheitsfunktionen umgesetzt und wirksam sind; die "
            "Bewertung ist dokumentiert (Art. 5 Abs. 2 DSGVO).",
        ),
    ),
    Entry(
        "I.12",
        "I",
        "MUST",
        "technical",
        Text(
            "Default settings are privacy-friendly (Art. 25(2) GDPR).",
            "Die Voreinstellungen sind datenschutzfreundlich (Art. 25 Abs. 2 DSGVO).",
        ),
    ),
    Entry(
        "I.13",
        "I",
        "SHOULD",
        "technical",
        Text(
            "Updates are installed automatically or semi-automatically.",
            "Aktualisierungen werden automatisch oder halbautomatisch eingespielt.",
        ),
    ),
    Entry(
        "II.1",
        "II",
        "MUST",
        "technical",
        Text(
            "Confidentiality and integrity by state-of-the-art end-to-end encryption (Art. 32(1)(a) GDPR).",
            "Vertraulichkeit und Integrität durch Ende-zu-Ende-Verschlüsselung nach dem Stand der Technik "
            "(Art. 32 Abs. 1 lit. a DSGVO).",
        ),
    ),
    Entry(
        "II.2",
        "II",
        "SHOULD / MUST",
        "technical",
        Text(
            "Integrity can be proven cryptographically; everything must arrive, and a message split into "
            "parts tells the receiver whether all parts arrived.",
            "Die Integrität ist kryptografisch nachweisbar; alles muss ankommen, und eine geteilte "
            "Nachricht zeigt dem Empfänger, ob alle Teile angekommen sind.",
        ),
    ),
    Entry(
        "II.3",
        "II",
        "MUST",
        "technical",
        Text(
            "Connection and other metadata are kept only as long as delivery or documentation needs "
            "them, and used only for the hospital's own purposes.",
            "Verbindungs- und sonstige Metadaten werden nur so lange gespeichert, wie Zustellung oder "
            "Dokumentation es erfordern, und nur für eigene Zwecke des Krankenhauses genutzt.",
        ),
    ),
    Entry(
        "II.4",
        "II",
        "SHOULD",
        "technical",
        Text(
            "Open protocols (such as XMPP) are available for talking to other messengers.",
            "Offene Protokolle (etwa XMPP) stehen für die Kommunikation mit anderen Messengern bereit.",
        ),
    ),
    Entry(
        "III.1",
        "III",
        NO_LEVEL,
        "organisational",
        Text(
            "End devices have access protection and encrypted storage.",
            "Endgeräte haben einen Zugriffsschutz und einen verschlüsselten Speicher.",
        ),
    ),
    Entry(
        "III.2",
        "III",
        NO_LEVEL,
        "organisational",
        Text(
            "End devices run only operating systems that still receive security updates.",
            "Auf den Endgeräten laufen nur Betriebssysteme, die noch Sicherheitsupdates erhalten.",
        ),
    ),
    Entry(
        "III.3",
        "III",
        NO_LEVEL,
        "organisational",
        Text(
            "End devices are managed centrally (mobile device management).",
            "Endgeräte werden zentral verwaltet (Mobile Device Management).",
        ),
    ),
    Entry(
        "IV.1",
        "IV",
        "MUST",
        "organisational",
        Text(
            "Telecommunications law is observed where the service is a public telecommunications service.",
            "Das Telekommunikationsrecht wird beachtet, wo der Dienst ein öffentlicher "
            "Telekommunikationsdienst ist.",
        ),
    ),
    Entry(
        "IV.2",
        "IV",
        "MUST",
        "technical",
        Text(
            "Only authorised users take part, through registration or central identity management.",
            "Nur berechtigte Personen nehmen teil, über eine Registrierung oder ein zentrales "
            "Identitätsmanagement.",
        ),
    ),
    Entry(
        "IV.3",
        "IV",
        "MUST",
        "organisational",
        Text(
            "A data protection impact assessment is carried out where the processing is extensive.",
            "Bei umfangreicher Verarbeitung wird eine Datenschutz-Folgenabschätzung durchgeführt.",
        ),
    ),
    Entry(
        "IV.4",
        "IV",
        "MUST",
        "technical",
        Text(
            "The technical and organisational measures are reviewed regularly (Art. 32(1)(d) GDPR).",
            "Die technischen und organisatorischen Maßnahmen werden regelmäßig überprüft (Art. 32 Abs. 1 "
            "lit. d DSGVO).",
        ),
    ),
    Entry(
        "IV.5",
        "IV",
        "SHOULD",
        "technical",
        Text(
            "The service can be run by a processor as well as on the hospital's own premises.",
            "Der Dienst lässt sich bei einem Auftragsverarbeiter wie auch im eigenen Haus betreiben.",
        ),
    ),
    Entry(
        "IV.6",
        "IV",
        "MUST",
        "technical",
        Text(
            "Processors comply with the GDPR, Art. 9(3) GDPR and § 203 StGB; providers in the EU/EEA "
            "are preferred.",
            "Auftragsverarbeiter erfüllen DSGVO, Art. 9 Abs. 3 DSGVO und § 203 StGB; Anbieter in der "
            "EU/im EWR werden bevorzugt.",
        ),
    ),
    Entry(
        "IV.7",
        "IV",
        "MUST",
        "organisational",
        Text(
            "Processing agreements are in place (Art. 28(3) GDPR).",
            "Verträge zur Auftragsverarbeitung liegen vor (Art. 28 Abs. 3 DSGVO).",
        ),
    ),
    Entry(
        "IV.8",
        "IV",
        "MUST",
        "technical",
        Text(
            "The provider deletes regularly; patient data lies on the controller's servers; devices "
            "keep data only briefly.",
            "Beim Anbieter wird regelmäßig gelöscht; Patientendaten liegen auf Servern des "
            "Verantwortlichen; Endgeräte speichern nur kurz.",
        ),
    ),
    Entry(
        "IV.9",
        "IV",
        "MUST",
        "technical",
        Text(
            "Security updates are applied promptly.",
            "Sicherheitsupdates werden zeitnah eingespielt.",
        ),
    ),
)

IDS: tuple[str, ...] = tuple(e.id for e in CATALOG)
BY_ID: dict[str, Entry] = {e.id: e for e in CATALOG}
