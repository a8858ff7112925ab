"""Channels: add a WhatsApp number, list, read its decrypted runtime config, mark it UP/DOWN."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.channels.models import Channel
from pforte.crypto.keys import KeyService
from pforte.errors import ConflictError, NotFoundError, ValidationError
from pforte.orgs.models import Organisation

GRAPH_VERSION = "v25.0"


@dataclass(frozen=True, slots=True)
class ChannelRuntime:
    """A channel with its secrets decrypted, as the webhook and the outbox need it."""

    id: str
    org_id: str
    kind: str
    name: str
    phone_number_id: str
    display_phone_number: str
    graph_base_url: str
    graph_version: str
    access_token: str
    app_secret: bytes
    verify_token: str
    rate_limit_per_s: int
    state: str
    state_reason: str | None


async def add_whatsapp(
    *,
    session: AsyncSession,
    keys: KeyService,
    org: Organisation,
    name: str,
    phone_number_id: str,
    display_phone_number: str,
    access_token: str,
    app_secret: str,
    verify_token: str | None = None,
    graph_base_url: str = "https://graph.facebook.com",
    graph_version: str = GRAPH_VERSION,
    waba_id: str | None = None,
    rate_limit_per_s: int = 80,
    storage_region: str = "default",
    now: datetime,
) -> Channel:
    """Register a WhatsApp business number; secrets are stored encrypted under the org key."""
    if not phone_number_id.isdigit():
        raise ValidationError("phone number id must be digits")
    if not access_token or not app_secret:
        raise ValidationError("access token and app secret are required")
    if not 1 <= rate_limit_per_s <= 1000:
        raise ValidationError("rate limit must be between 1 and 1000 per second")
    if storage_region not in ("default", "DE", "no_storage"):
        raise ValidationError("storage region must be default, DE or no_storage")
    exists = await session.execute(
        select(Channel.id).where(Channel.kind == "whatsapp", Channel.phone_number_id == phone_number_id)
    )
    if exists.first():
        raise ConflictError("this phone number id is already registered")
    cipher = await keys.cipher(session, org.org_key_id)
    ch = Channel(
        org_id=org.id,
        kind="whatsapp",
        name=name,
        phone_number_id=phone_number_id,
        display_phone_number=display_phone_number,
        waba_id=waba_id,
        graph_base_url=graph_base_url.rstrip("/"),
        graph_version=graph_version,
        rate_limit_per_s=rate_limit_per_s,
        storage_region=storage_region,
        state="UP",
        created_at=now,
        access_token_enc=b"",
        app_secret_enc=b"",
        verify_token_enc=b"",
    )
    session.add(ch)
    await session.flush()
    vt = verify_token or secrets.token_urlsafe(24)
    ch.access_token_enc = cipher.seal_text(access_token, "channels", "access_token", ch.id) or b""
    ch.app_secret_enc = cipher.seal_text(app_secret, "channels", "app_secret", ch.id) or b""
    ch.verify_token_enc = cipher.seal_text(vt, "channels", "verify_token", ch.id) or b""
    await session.flush()
    return ch


async def list_(*, session: AsyncSession, org_id: str | None = None) -> list[Channel]:
    """Channels, optionally of one organisation."""
    q = select(Channel).order_by(Channel.created_at)
    if org_id:
        q = q.where(Channel.org_id == org_id)
    return list((await session.execute(q)).scalars())


async def runtime(*, session: AsyncSession, keys: KeyService, channel_id: str) -> ChannelRuntime:
    """Load a channel and decrypt its secrets."""
    row = (
        await session.execute(
            select(Channel, Organisation.org_key_id)
            .join(Organisation, Organisation.id == Channel.org_id)
            .where(Channel.id == channel_id)
        )
    ).first()
    if row is None:
        raise NotFoundError("channel not found")
    ch, org_key_id = row
    c = await keys.cipher(session, org_key_id)
    return ChannelRuntime(
        id=ch.id,
        org_id=ch.org_id,
        kind=ch.kind,
        name=ch.name,
        phone_number_id=ch.phone_number_id,
        display_phone_number=ch.display_phone_number,
        graph_base_url=ch.graph_base_url,
        graph_version=ch.graph_version,
        access_token=c.open_text(ch.access_token_enc, "channels", "access_token", ch.id) or "",
        app_secret=(c.open_text(ch.app_secret_enc, "channels", "app_secret", ch.id) or "").encode(),
        verify_token=c.open_text(ch.verify_token_enc, "channels", "verify_token", ch.id) or "",
        rate_limit_per_s=ch.rate_limit_per_s,
        state=ch.state,
        state_reason=ch.state_reason,
    )


async def set_state(
    *, session: AsyncSession, channel_id: str, state: str, reason: str | None, now: datetime
) -> None:
    """Mark a channel UP or DOWN (DOWN is shown to admins with its reason)."""
    await session.execute(
        update(Channel)
        .where(Channel.id == channel_id)
        .values(state=state, state_reason=reason, state_changed_at=now)
    )


async def update_token(
    *, session: AsyncSession, keys: KeyService, org_id: str, channel_id: str, access_token: str, now: datetime
) -> None:
    """Replace the access token of one of the organisation's channels and bring it back UP."""
    row = (
        await session.execute(
            select(Channel, Organisation.org_key_id)
            .join(Organisation, Organisation.id == Channel.org_id)
            .where(Channel.id == channel_id, Channel.org_id == org_id)
        )
    ).first()
    if row is None:
        raise NotFoundError("channel not found")
    ch, org_key_id = row
    if not access_token.strip():
        raise ValidationError("the access token is empty", code="empty")
    cipher = await keys.cipher(session, org_key_id)
    ch.access_token_enc = cipher.seal_text(access_token.strip(), "channels", "access_token", ch.id) or b""
    ch.state, ch.state_reason, ch.state_changed_at = "UP", None, now
    await session.flush()


class ChannelCache:
    """Decrypted channel configs, kept a few seconds so every webhook need not hit the database.

    When an entry expires under load, the requests that find it missing wait for ONE load instead
    of each opening a connection (64 webhooks in flight meant 64 look-ups and new pooled
    connections every few seconds).
    """

    def __init__(self, keys: KeyService, ttl: float = 5.0) -> None:
        self._keys = keys
        self._ttl = ttl
        self._items: dict[str, tuple[float, ChannelRuntime]] = {}
        self._loading: dict[str, asyncio.Future[ChannelRuntime]] = {}
        self._generation = 0  # bumped by invalidate(): a load begun before it is not kept

    async def get(self, session_factory: object, channel_id: str) -> ChannelRuntime:
        """A channel's runtime config, from the cache or the database."""
        hit = self._items.get(channel_id)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        loading = self._loading.get(channel_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(session_factory, channel_id, self._generation))
            self._loading[channel_id] = loading
            loading.add_done_callback(lambda done: self._loaded(channel_id, done))
        # shielded: a caller that is cancelled (a client gone) must not cancel the others' load
        return await asyncio.shield(loading)

    async def _load(self, session_factory: object, channel_id: str, generation: int) -> ChannelRuntime:
        async with session_factory() as session:  # type: ignore[operator]
            rt = await runtime(session=session, keys=self._keys, channel_id=channel_id)
        if generation == self._generation:
            self._items[channel_id] = (time.monotonic() + self._ttl, rt)
        return rt

    def _loaded(self, channel_id: str, done: asyncio.Future[ChannelRuntime]) -> None:
        if self._loading.get(channel_id) is done:
            del self._loading[channel_id]
        if not done.cancelled():
            done.exception()  # retrieved here too, so a load whose callers all left is not reported

    async def get_by_ref(self, session_factory: object, phone_number_id: str) -> ChannelRuntime:
        """A WhatsApp channel by its phone number id."""
        async with session_factory() as session:  # type: ignore[operator]
            found = (
                await session.execute(
                    select(Channel.id).where(
                        Channel.kind == "whatsapp", Channel.phone_number_id == phone_number_id
                    )
                )
            ).scalar_one_or_none()
        if found is None:
            raise NotFoundError("channel not found")
        return await self.get(session_factory, found)

    def invalidate(self, channel_id: str | None = None) -> None:
        """Forget one or all cached channels."""
        if channel_id is None:
            self._items.clear()
            self._loading.clear()
        else:
            self._items.pop(channel_id, None)
            self._loading.pop(channel_id, None)
        self._generation += 1
