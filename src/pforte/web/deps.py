"""Request dependencies: services, the database session of a request, the logged-in user, CSRF."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from datetime import timedelta
from urllib.parse import urlsplit

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.bootstrap import Services
from pforte.errors import AuthenticationError, PermissionDenied
from pforte.staff import service as staff
from pforte.staff.service import CurrentUser

SESSION_COOKIE = "pforte_session"


def get_services(request: Request) -> Services:
    """The composition root of this app."""
    return request.app.state.services  # type: ignore[no-any-return]


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request, committed when the handler returns without error."""
    services = get_services(request)
    async with services.db.sessionmaker() as session:
        async with session.begin():
            yield session


# The request's transaction ends when the route function returns, before the response is sent, so a
# client can never act on an answer whose changes are not yet committed.
DB = Depends(db_session, scope="function")
BACKGROUND_HEADER = "x-pforte-refresh"  # set by app.js on live-update refreshes


async def current_user(request: Request, session: AsyncSession = DB) -> CurrentUser:
    """The logged-in staff member; 401 (redirect to login in the UI) otherwise."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise AuthenticationError("not logged in")
    services = get_services(request)
    user = await staff.resolve(
        session=session,
        token=token,
        now=services.clock.now(),
        idle=timedelta(minutes=services.settings.session_idle_minutes),
        touch=request.headers.get(BACKGROUND_HEADER) != "1",
    )
    request.state.user = user
    return user


def require_role(*roles: str):  # type: ignore[no-untyped-def]
    """Dependency factory: the user must have one of the roles."""

    async def _dep(user: CurrentUser = Depends(current_user)) -> CurrentUser:
        if user.role not in roles:
            raise PermissionDenied("your role does not allow this")
        return user

    return _dep


async def check_csrf(request: Request, user: CurrentUser) -> None:
    """State-changing requests must carry the session's CSRF token and come from our own origin."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise PermissionDenied("cross-origin request refused", code="csrf")
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        form = await request.form()
        sent = str(form.get("csrf_token") or "")
    if not hmac.compare_digest(sent.encode(), user.csrf_token.encode()):
        raise PermissionDenied("the form has expired, please reload the page", code="csrf")
