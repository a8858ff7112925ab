"""German and English through gettext catalogs (``locale/<lang>/LC_MESSAGES/messages.po``).

Catalogs are compiled in memory at start-up, so there is no build step and no stale ``.mo`` file.
The language comes from the user's profile, else a ``lang`` cookie, else ``Accept-Language``;
German is the default for German-speaking browsers and for anyone who states no preference.
"""

from __future__ import annotations

import gettext
import io
from functools import cache
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

LOCALES = ("de", "en")
LOCALE_DIR = Path(__file__).parent / "locale"


@cache
def translations(lang: str) -> gettext.NullTranslations:
    """The compiled catalog of a language (English falls back to the msgids)."""
    po = LOCALE_DIR / lang / "LC_MESSAGES" / "messages.po"
    if not po.exists():
        return gettext.NullTranslations()
    with po.open("rb") as fh:
        catalog = read_po(fh, locale=lang)
    buf = io.BytesIO()
    write_mo(buf, catalog)
    buf.seek(0)
    return gettext.GNUTranslations(buf)


def negotiate(accept_language: str | None, *, preferred: str | None = None, default: str = "de") -> str:
    """Pick 'de' or 'en' from an explicit preference or the Accept-Language header."""
    if preferred in LOCALES:
        return preferred  # type: ignore[return-value]
    best, best_q = None, -1.0
    for part in (accept_language or "").split(","):
        piece = part.strip()
        if not piece:
            continue
        tag, _, params = piece.partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        lang = tag.strip().lower().split("-")[0]
        if lang in LOCALES and q > best_q:
            best, best_q = lang, q
    return best or default
