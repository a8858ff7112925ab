"""Standalone HTML documents rendered outside a request (export transcripts).

They use the inbox's templates directory and catalog, with the inbox's gettext semantics: catalog
text is trusted markup, and ``%(name)s`` variables are escaped when they are substituted.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from pforte.i18n import translations

TEMPLATES_DIR = Path(__file__).resolve().parent / "web" / "ui" / "templates"


def filesize(n: int | None) -> str:
    """A byte count for people: B, KB, MB."""
    if n is None:
        return ""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


@cache
def environment() -> jinja2.Environment:
    """The shared template environment (autoescaping, i18n extension, ``filesize`` filter)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        extensions=["jinja2.ext.i18n"],
    )
    env.install_null_translations(newstyle=True)  # type: ignore[attr-defined]
    env.filters["filesize"] = filesize
    return env


@cache
def gettext_for(lang: str) -> tuple[Any, Any]:
    """gettext/ngettext for one language, to pass into ``template.render``."""
    tr = translations(lang)

    @jinja2.pass_context
    def gettext(ctx: jinja2.runtime.Context, message: str, **variables: Any) -> str:
        rv = Markup(tr.gettext(message))  # noqa: S704 - our own catalog text; variables are escaped by %
        return rv % variables if variables else rv

    @jinja2.pass_context
    def ngettext(ctx: jinja2.runtime.Context, singular: str, plural: str, num: int, **variables: Any) -> str:
        variables.setdefault("num", num)
        return Markup(tr.ngettext(singular, plural, num)) % variables  # noqa: S704 - as above

    return gettext, ngettext
