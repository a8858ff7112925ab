"""Staff accounts and sessions: create, authenticate, resolve a session, log out."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.db import new_id
from pforte.errors import AuthenticationError, ConflictError, ValidationError
from pforte.staff.models import ROLES, LoginAttempt, StaffSession, StaffUser
from pforte.staff.security import hash_password, new_token, token_digest, verify_password

MIN_PASSWORD = 10


@dataclass(frozen=True, slots=True)
class CurrentUser:
    """The logged-in staff member as routes see it."""

    id: str
    org_id: str
    email: str
    display_name: str
    role: str
    locale: str | None
    csrf_token: str
    session_id: str


async def create(
    *,
    session: AsyncSession,
    org_id: str,
    email: str,
    display_name: str,
    password: str,
    role: str,
    now: datetime,
) -> StaffUser:
    """Create a staff account with an argon2id password hash."""
    email = email.strip().lower()
    if role not in ROLES:
        raise ValidationError(f"role must be one of {', '.join(ROLES)}")
    if "@" not in email:
        raise ValidationError("e-mail address is invalid")
    if len(password) < MIN_PASSWORD:
        raise ValidationError(f"password must have at least {MIN_PASSWORD} characters")
    if await get_by_email(session=session, email=email):
        raise ConflictError("a user with this e-mail exists")
    user = StaffUser(
        org_id=org_id,
        email=email,
        display_name=display_name.strip() or email,
        password_hash=await hash_password(password),
        role=role,
        active=True,
        created_at=now,
    )
    session.add(user)
    await session.flush()
    return user


async def get_by_email(*, session: AsyncSession, email: str) -> StaffUser | None:
    """A staff account by e-mail (case-insensitive)."""
    q = select(StaffUser).where(StaffUser.email == email.strip().lower())
    return (await session.execute(q)).scalar_one_or_none()


async def list_(*, session: AsyncSession, org_id: str, ids: Collection[str] | None = None) -> list[StaffUser]:
    """An organisation's staff accounts (only those with the given ids, if given), by e-mail."""
    q = select(StaffUser).where(StaffUser.org_id == org_id).order_by(StaffUser.email)
    if ids is not None:
        if not ids:
            return []
        q = q.where(StaffUser.id.in_(list(ids)))
    return list((await session.execute(q)).scalars())


MAX_FAILED_LOGINS = 5
FAILED_LOGIN_WINDOW = timedelta(minutes=15)


def account_key(email: str) -> str:
    """What a failed-login record stores instead of the e-mail address."""
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


async def login(
    *,
    session: AsyncSession,
    email: str,
    password: str,
    now: datetime,
    idle: timedelta,
    absolute: timedelta,
    ip: str | None = None,
    user_agent: str | None = None,
) -> tuple[str, StaffUser]:
    """Check credentials and open a session; return the cookie token and the user.

    After ``MAX_FAILED_LOGINS`` failures for one account within ``FAILED_LOGIN_WINDOW`` every try is
    refused (even with the right password) until the window has passed.
    """
    recent = (
        await session.execute(
            select(func.count())
            .select_from(LoginAttempt)
            .where(
                LoginAttempt.account_key == account_key(email), LoginAttempt.at > now - FAILED_LOGIN_WINDOW
            )
        )
    ).scalar_one()
    if recent >= MAX_FAILED_LOGINS:
        raise AuthenticationError("too many failed attempts; try again in 15 minutes", code="login_throttled")
    user = await get_by_email(session=session, email=email)
    ok = await verify_password(user.password_hash if user else None, password)
    if not ok or user is None or not user.active:
        raise AuthenticationError("e-mail or password is wrong", code="login_failed")
    token, digest = new_token()
    session.add(
        StaffSession(
            id=digest,
            user_id=user.id,
            org_id=user.org_id,
            csrf_token=secrets.token_urlsafe(24),
            created_at=now,
            last_seen_at=now,
            expires_at=now + absolute,
            ip=(ip or None) and ip[:64],
            user_agent=(user_agent or None) and user_agent[:300],
        )
    )
    await session.flush()
    await audit.record(
        session, org_id=user.org_id, actor=Actor.staff(user.id), action="login.success", now=now
    )
    return token, user


async def record_failed_login(*, session: AsyncSession, email: str, ip: str | None, now: datetime) -> None:
    """Remember a failed login (for throttling; purged after its retention) and audit it."""
    session.add(
        LoginAttempt(id=new_id(), account_key=account_key(email), ip=(ip or None) and ip[:64], at=now)
    )
    user = await get_by_email(session=session, email=email)
    await audit.record(
        session,
        org_id=user.org_id if user else None,
        actor=Actor.staff(user.id) if user else Actor("unknown"),
        action="login.failure",
        now=now,
    )


async def resolve(
    *, session: AsyncSession, token: str, now: datetime, idle: timedelta, touch: bool = True
) -> CurrentUser:
    """The user behind a session cookie; expired or idle sessions are refused.

    ``touch`` is False for background refreshes (live updates), so an unattended open tab does not
    keep its session alive. Expired rows are removed by ``purge_expired`` (a periodic job).
    """
    digest = token_digest(token)
    row = (
        await session.execute(
            select(StaffSession, StaffUser)
            .join(StaffUser, StaffUser.id == StaffSession.user_id)
            .where(StaffSession.id == digest)
        )
    ).first()
    if row is None:
        raise AuthenticationError("not logged in")
    sess, user = row
    if sess.expires_at <= now or sess.last_seen_at + idle <= now or not user.active:
        raise AuthenticationError("session expired", code="session_expired")
    if touch and (now - sess.last_seen_at).total_seconds() > 30:  # write at most twice a minute
        sess.last_seen_at = now
    return CurrentUser(
        id=user.id,
        org_id=user.org_id,
        email=user.email,
        display_name=user.display_name,
        role=user.role,
        locale=user.locale,
        csrf_token=sess.csrf_token,
        session_id=digest,
    )


async def logout(*, session: AsyncSession, user: CurrentUser, now: datetime) -> None:
    """End a session."""
    await session.execute(delete(StaffSession).where(StaffSession.id == user.session_id))
    await audit.record(session, org_id=user.org_id, actor=Actor.staff(user.id), action="logout", now=now)
