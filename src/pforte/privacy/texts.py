"""What pforte writes to patients about privacy, in German and English in one message.

WhatsApp tells us nothing about the patient's language, so every message carries both; the
notice itself is sent in German with a link to both versions on the public page.
"""

from __future__ import annotations

YES_TITLE = "Ja, einverstanden"  # a reply button title: at most 20 characters
NO_TITLE = "Nein"

DEFAULT_NOTICE_DE = "\n".join(
    [
        "Verantwortlich: {org}.",
        (
            "Wir verarbeiten Ihre Nachrichten, Dateien und Ihre Telefonnummer, um mit Ihnen über Ihre "
            "Behandlung und Termine zu sprechen."
        ),
        (
            "Gesundheitsinformationen schicken wir Ihnen nur mit Ihrer ausdrücklichen Einwilligung "
            "(Art. 9 Abs. 2 lit. a DSGVO); Sie können sie jederzeit widerrufen."
        ),
        (
            "WhatsApp-Nachrichten laufen über die WhatsApp Business Platform von Meta "
            "(Auftragsverarbeiter). Bei uns werden sie verschlüsselt gespeichert und nach Ablauf "
            "unserer Aufbewahrungsfrist gelöscht; was für Ihre Behandlung wichtig ist, übernehmen wir "
            "in Ihre Patientenakte."
        ),
        (
            "Sie haben das Recht auf Auskunft, Berichtigung, Löschung, Einschränkung, "
            "Datenübertragbarkeit und Beschwerde bei einer Aufsichtsbehörde."
        ),
        "(Vorlage: bitte vor dem Einsatz durch den Text Ihrer Einrichtung ersetzen.)",
    ]
)

DEFAULT_NOTICE_EN = "\n".join(
    [
        "Controller: {org}.",
        (
            "We process your messages, files and phone number to talk with you about your treatment "
            "and appointments."
        ),
        (
            "We send you health information only with your explicit consent (Art. 9(2)(a) GDPR), "
            "which you can withdraw at any time."
        ),
        (
            "WhatsApp messages pass through Meta's WhatsApp Business Platform (processor). We store "
            "them encrypted and delete them when our retention period ends; what matters for your "
            "treatment goes into your patient record."
        ),
        (
            "You have the right of access, rectification, erasure, restriction, portability and to "
            "complain to a supervisory authority."
        ),
        "(Template: replace with your organisation's text before use.)",
    ]
)


def notice(*, org: str, version: int, body_de: str, url: str) -> str:
    """The notice as a chat message."""
    return (
        f"Datenschutzhinweis von {org} (Version {version}):\n\n{body_de}\n\n"
        f"Jederzeit abrufbar: {url}\nPrivacy notice in English: {url}?lang=en"
    )


def request(*, version: int | None, stop: str, url: str) -> str:
    """The consent request (an interactive message body, at most 1,024 characters)."""
    ref_de = f" zu unserem Datenschutzhinweis (Version {version}, {url})" if version else ""
    ref_en = f" under our privacy notice (version {version})" if version else ""
    return (
        f"Dürfen wir Ihnen über WhatsApp auch Gesundheitsinformationen schicken? Dafür brauchen wir Ihre "
        f"ausdrückliche Einwilligung{ref_de}. Sie können sie jederzeit widerrufen: "
        f"schreiben Sie „{stop}“.\n\n"
        f"May we send you health information over WhatsApp? We need your explicit consent{ref_en}. "
        f"Reply {stop} to withdraw it at any time."
    )


def given(*, stop: str) -> str:
    """Confirmation of consent."""
    return (
        f"Vielen Dank, Ihre Einwilligung ist gespeichert. Widerruf jederzeit mit „{stop}“.\n\n"
        f"Thank you, your consent is recorded. Reply {stop} to withdraw it."
    )


def refused() -> str:
    """Confirmation of a refusal."""
    return (
        "Verstanden: Wir schicken Ihnen über WhatsApp keine Gesundheitsinformationen. Ihre Nachrichten "
        "erreichen uns trotzdem; für Gesundheitsfragen rufen Sie uns bitte an.\n\n"
        "Understood: we will not send you health information over WhatsApp. Your messages still reach us; "
        "for health questions please call us."
    )


def withdrawn() -> str:
    """Confirmation of a withdrawal."""
    return (
        "Ihr Widerruf ist gespeichert. Wir schicken Ihnen über WhatsApp keine Gesundheitsinformationen mehr; "
        "der Verlauf wird nach unserer Aufbewahrungsfrist gelöscht.\n\n"
        "Your withdrawal is recorded. We will send you no more health information over WhatsApp; the "
        "conversation is deleted when our retention period ends."
    )


def outdated(*, version: int | None) -> str:
    """The patient answered a request for an older notice version."""
    return (
        f"Unser Datenschutzhinweis hat sich inzwischen geändert (jetzt Version {version}). Bitte bestätigen "
        f"Sie die aktuelle Fassung.\n\n"
        f"Our privacy notice has changed (now version {version}). Please confirm the current version."
    )
