"""Template rendering with the request's language, user and CSRF token in every context."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
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


@cache
def _newstyle(lang: str) -> tuple[Any, Any]:
    """gettext/ngettext in Jinja's "newstyle" form: escaped, with %(name)s variables filled in."""
    tr = translations(lang)

    @jinja2.pass_context
    def gettext(ctx: jinja2.runtime.Context, message: str, **variables: Any) -> str:
        rv = tr.gettext(message)
        if ctx.eval_ctx.autoescape:
            rv = Markup(rv)  # noqa: S704 - our own catalog text, like Jinja's own i18n does
        return rv % variables if variables else rv  # type: ignore[no-any-return]

    @jinja2.pass_context
    def ngettext(ctx: jinja2.runtime.Context, singular: str, plural: str, num: int, **variables: Any) -> str:
        variables.setdefault("num", num)
        rv = tr.ngettext(singular, plural, num)
        if ctx.eval_ctx.autoescape:
            rv = Markup(rv)  # noqa: S704 - our own catalog text, like Jinja's own i18n does
        return rv % variables  # type: ignore[no-any-return]

    return gettext, ngettext


def language(request: Request) -> str:
    """The language of this request: user profile, then cookie, then Accept-Language."""
    user = getattr(request.state, "user", None)
    preferred = (user.locale if user else None) or request.cookies.get("lang")
    default = request.app.state.services.settings.default_locale
    return negotiate(request.headers.get("accept-language"), preferred=preferred, default=default)


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """Render a page or partial with language, user and CSRF token available."""
    lang = language(request)
    gettext, ngettext = _newstyle(lang)
    user = getattr(request.state, "user", None)
    ctx = {
        "lang": lang,
        "user": user,
        "csrf_token": user.csrf_token if user else "",
        "gettext": gettext,
        "ngettext": ngettext,
        "_": gettext,
        **(context or {}),
    }
    return templates.TemplateResponse(request, template, ctx, status_code=status_code, headers=headers)
