"""Map PforteError to a response once, at the edge: JSON for machines, HTML for people."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from pforte.errors import AuthenticationError, PforteError


def _wants_html(request: Request) -> bool:
    if request.url.path.startswith(("/webhooks/", "/api/")):
        return False
    return "text/html" in request.headers.get("accept", "") or request.headers.get("hx-request") == "true"


async def render_error(request: Request, exc: PforteError) -> Response:
    """The response for an error: redirect to login, an HTML error page/fragment, or JSON."""
    if not _wants_html(request):
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.http_status)
    if isinstance(exc, AuthenticationError) and request.headers.get("hx-request") != "true":
        return RedirectResponse("/login", status_code=303)
    from pforte.web.ui.render import render

    template = "partials/error.html" if request.headers.get("hx-request") == "true" else "pages/error.html"
    return render(request, template, {"error": exc}, status_code=exc.http_status)
