"""Template rendering with the request's language, user and CSRF token in every context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import Response

from pforte.i18n import negotiate, translations

TEMPLATES_DIR = Path(__file__).parent / "templates"
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
    autoescape=True,
    extensions=["jinja2.ext.i18n"],
)
_env.install_null_translations(newstyle=True)  # type: ignore[attr-defined]
templates = Jinja2Templates(env=_env)


def language(request: Request) -> str:
    """The language of this request: user profile, then cookie, then Accept-Language."""
    user = getattr(request.state, "user", None)
    preferred = (user.locale if user else None) or request.cookies.get("lang")
    default = request.app.state.services.settings.default_locale
    return negotiate(request.headers.get("accept-language"), preferred=preferred, default=default)


def gettext_for(request: Request):  # type: ignore[no-untyped-def]
    """The gettext function of the request's language."""
    return translations(language(request)).gettext


def render(request: Request, template: str, context: dict[str, Any] | None = None, *, status_code: int = 200,
           headers: dict[str, str] | None = None) -> Response:
    """Render a page or partial with language, user and CSRF token available."""
    lang = language(request)
    tr = translations(lang)
    user = getattr(request.state, "user", None)
    ctx = {
        "lang": lang,
        "user": user,
        "csrf_token": user.csrf_token if user else "",
        "gettext": tr.gettext,
        "ngettext": tr.ngettext,
        "_": tr.gettext,
        **(context or {}),
    }
    return templates.TemplateResponse(request, template, ctx, status_code=status_code, headers=headers)
