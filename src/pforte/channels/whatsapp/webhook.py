"""WhatsApp Cloud API webhooks: subscription handshake, signature check and payload parsing.

Meta delivers at least once, batches up to 1000 updates into one POST and does not promise any
order. So the parser walks every entry x change x messages/statuses/errors, never stops on one bad
item, and keeps unknown message types as raw JSON (type "unsupported") instead of dropping them.

Identity is BSUID first: ``contacts[].user_id`` / ``from_user_id``. The phone number (``wa_id`` /
``from``) is optional because users with a username may arrive without one.

Nothing here logs, and no exception message carries message text, names, numbers or tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeGuard

from pforte.channels.base import (
    ChannelProblem,
    InboundBatch,
    InboundMessage,
    MediaRef,
    Sender,
    StatusUpdate,
)
from pforte.errors import AuthenticationError, PermissionDenied, ValidationError

WEBHOOK_OBJECT = "whatsapp_business_account"
SIGNATURE_HEADER = "X-Hub-Signature-256"
SIGNATURE_PREFIX = "sha256="
# Batch key for changes that name no business number (account_update, ...): nothing to route on.
UNROUTED = ""
MALFORMED_TITLE = "malformed item"

_MEDIA_KINDS = ("image", "video", "document", "audio", "sticker")


class SubscriptionRejected(PermissionDenied):
    """The GET handshake had the wrong mode or verify token, or no challenge."""

    code = "subscription_rejected"


class SignatureMissing(AuthenticationError):
    """The POST carried no X-Hub-Signature-256 header."""

    code = "signature_missing"


class SignatureInvalid(PermissionDenied):
    """The X-Hub-Signature-256 header does not match the body."""

    code = "signature_invalid"


class _Malformed(Exception):
    """Internal: one webhook item cannot be parsed; ``str()`` names the reason, never content."""


# --------------------------------------------------------------------------- verification


def verify_subscription(
    *, mode: str | None, token: str | None, challenge: str | None, expected_token: str
) -> str:
    """Check Meta's GET handshake and return ``hub.challenge`` verbatim."""
    if mode != "subscribe":
        raise SubscriptionRejected("subscription mode is not 'subscribe'")
    if not expected_token or token is None:
        raise SubscriptionRejected("verify token missing")
    if not hmac.compare_digest(token.encode("utf-8"), expected_token.encode("utf-8")):
        raise SubscriptionRejected("verify token does not match")
    if not challenge:
        raise SubscriptionRejected("challenge missing")
    return challenge


def verify_signature(*, body: bytes, header: str | None, app_secret: bytes) -> None:
    """Check ``X-Hub-Signature-256`` against an HMAC-SHA256 of the raw body bytes."""
    if header is None or not header.strip():
        raise SignatureMissing("signature header missing")
    value = header.strip()
    if not value.startswith(SIGNATURE_PREFIX):
        raise SignatureInvalid("signature header has no sha256= prefix")
    try:
        given = value[len(SIGNATURE_PREFIX) :].lower().encode("ascii")
    except UnicodeEncodeError:
        raise SignatureInvalid("signature is not hex") from None
    expected = hmac.new(app_secret, body, hashlib.sha256).hexdigest().encode("ascii")
    if not hmac.compare_digest(given, expected):
        raise SignatureInvalid("signature does not match")


def parse_payload(body: bytes) -> dict[str, Any]:
    """Decode a webhook body into its JSON object; reject anything that is not a WABA payload."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise ValidationError("webhook body is not valid JSON", code="malformed_json") from None
    if not isinstance(payload, dict):
        raise ValidationError("webhook body is not a JSON object", code="malformed_json")
    if payload.get("object") != WEBHOOK_OBJECT:
        raise ValidationError("webhook object is not whatsapp_business_account", code="malformed_json")
    return payload


# --------------------------------------------------------------------------- parsing


def parse_webhook(payload: dict[str, Any]) -> dict[str, InboundBatch]:
    """Turn a webhook payload into one batch per business number (``metadata.phone_number_id``)."""
    batches: dict[str, InboundBatch] = {}

    def batch_for(ref: str) -> InboundBatch:
        return batches.setdefault(ref, InboundBatch())

    for where, change in _changes(payload, batch_for):
        value = change.get("value")
        if not isinstance(value, dict):
            value = {}
        metadata = value.get("metadata")
        ref = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
        ref = ref if isinstance(ref, str) and ref else None
        if change.get("field") != "messages":
            batch_for(ref or UNROUTED).ignored_fields += 1
            continue
        if ref is None:
            skipped = sum(len(_as_list(value.get(k))) for k in ("messages", "statuses", "errors"))
            batch_for(UNROUTED).problems.append(
                _malformed(f"{where}: no phone_number_id, {skipped} update(s) skipped")
            )
            continue
        _parse_value(value, ref, where, batch_for(ref))
    return batches


def _changes(
    payload: dict[str, Any], batch_for: Callable[[str], InboundBatch]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield every change object with its position; note structurally broken ones as problems."""
    for e, entry in enumerate(_as_list(payload.get("entry"))):
        if not isinstance(entry, dict):
            batch_for(UNROUTED).problems.append(_malformed(f"entry[{e}]: not an object"))
            continue
        for c, change in enumerate(_as_list(entry.get("changes"))):
            where = f"entry[{e}].changes[{c}]"
            if not isinstance(change, dict):
                batch_for(UNROUTED).problems.append(_malformed(f"{where}: not an object"))
                continue
            yield where, change


def _parse_value(value: dict[str, Any], ref: str, where: str, batch: InboundBatch) -> None:
    contacts = _Contacts(_as_list(value.get("contacts")))
    for i, item in enumerate(_as_list(value.get("messages"))):
        try:
            batch.messages.append(_parse_message(item, ref, contacts))
        except (_Malformed, KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            batch.problems.append(_malformed(f"{where}.messages[{i}]: {_reason(exc)}"))
    for i, item in enumerate(_as_list(value.get("statuses"))):
        try:
            batch.statuses.append(_parse_status(item, ref))
        except (_Malformed, KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            batch.problems.append(_malformed(f"{where}.statuses[{i}]: {_reason(exc)}"))
    batch.problems.extend(_problems(value.get("errors")))


class _Contacts:
    """The ``contacts[]`` of one change, looked up by BSUID first, then by phone."""

    def __init__(self, items: list[Any]) -> None:
        self.items = [c for c in items if isinstance(c, dict)]
        self.by_user_id = {c["user_id"]: c for c in self.items if isinstance(c.get("user_id"), str)}
        self.by_wa_id = {c["wa_id"]: c for c in self.items if isinstance(c.get("wa_id"), str)}

    def sender(self, item: dict[str, Any]) -> Sender:
        user_id = _str(item.get("from_user_id"))
        wa_id = _str(item.get("from"))
        contact: dict[str, Any] | None = None
        if user_id:
            contact = self.by_user_id.get(user_id)
        if contact is None and wa_id:
            contact = self.by_wa_id.get(wa_id)
        if contact is None and not user_id and not wa_id and len(self.items) == 1:
            # Neither from nor from_user_id: Meta names the one author in contacts[].
            contact = self.items[0]
        contact = contact or {}
        profile = _obj(contact.get("profile"))
        user_id = user_id or _str(contact.get("user_id"))
        wa_id = wa_id or _str(contact.get("wa_id"))
        if not user_id and not wa_id:
            raise _Malformed("no sender id")
        return Sender(
            user_id=user_id,
            wa_id=wa_id,
            profile_name=_str(profile.get("name")),
            username=_str(profile.get("username")),
            parent_user_id=_str(contact.get("parent_user_id")),
        )


def _parse_message(item: Any, ref: str, contacts: _Contacts) -> InboundMessage:
    if not isinstance(item, dict):
        raise _Malformed("not an object")
    external_id = _str(item.get("id"))
    if not external_id:
        raise _Malformed("missing id")
    timestamp = _timestamp(item.get("timestamp"))
    sender = contacts.sender(item)
    context = _obj(item.get("context"))
    details: dict[str, Any] = {}
    if isinstance(context.get("referred_product"), dict):
        details["referred_product"] = context["referred_product"]
    if isinstance(item.get("referral"), dict):
        details["referral"] = item["referral"]

    msg_type = item.get("type")
    parsed = _parse_body(msg_type, item)
    raw: dict[str, Any] | None = None
    if parsed is None:
        # Unknown, future or unparseable type: keep the whole item so nothing is lost.
        kind, text, media = "unsupported", None, None
        body_details: dict[str, Any] = {"original_type": msg_type if isinstance(msg_type, str) else None}
        raw = item
        if msg_type == "unsupported":
            inner = item.get("unsupported")
            if isinstance(inner, dict) and isinstance(inner.get("type"), str):
                body_details["unsupported_type"] = inner["type"]
        elif msg_type == "interactive" and isinstance(item.get("interactive"), dict):
            body_details["subtype"] = _str(item["interactive"].get("type"))
    else:
        kind, text, media, body_details = parsed
    details.update(body_details)

    context_id = _str(context.get("id"))
    if kind == "reaction" and context_id is None:
        context_id = details.get("message_id")
    return InboundMessage(
        external_id=external_id,
        channel_ref=ref,
        sender=sender,
        type=kind,
        timestamp=timestamp,
        text=text,
        media=media,
        context_id=context_id,
        forwarded=context.get("forwarded") is True,
        frequently_forwarded=context.get("frequently_forwarded") is True,
        details=details,
        raw=raw,
        errors=_problems(item.get("errors")),
    )


_Body = tuple[str, str | None, MediaRef | None, dict[str, Any]]


def _parse_body(msg_type: Any, item: dict[str, Any]) -> _Body | None:
    """Map a known type to (type, text, media, details); ``None`` means keep it as unsupported."""
    if not isinstance(msg_type, str) or msg_type == "unsupported":
        return None
    if msg_type == "contacts":
        return _contacts_body(item.get("contacts"))
    obj = item.get(msg_type)
    if not isinstance(obj, dict):
        return None
    if msg_type == "text":
        body = obj.get("body")
        return ("text", body, None, {}) if isinstance(body, str) else None
    if msg_type in _MEDIA_KINDS:
        return _media_body(msg_type, obj)
    if msg_type == "location":
        return _location_body(obj)
    if msg_type == "interactive":
        return _interactive_body(obj)
    if msg_type == "button":
        return "button", _str(obj.get("text")), None, {"payload": _str(obj.get("payload"))}
    if msg_type == "reaction":
        target = _str(obj.get("message_id"))
        if target is None:
            return None
        emoji = _str(obj.get("emoji")) or ""
        return "reaction", emoji or None, None, {"message_id": target, "emoji": emoji, "removed": not emoji}
    if msg_type == "system":
        details = {k: v for k, v in obj.items() if k not in ("body", "type")}
        details["system_type"] = _str(obj.get("type"))
        return "system", _str(obj.get("body")), None, details
    return None


def _media_body(kind: str, obj: dict[str, Any]) -> _Body | None:
    media_id = _str(obj.get("id"))
    if media_id is None:
        return None
    media = MediaRef(
        media_id=media_id,
        mime_type=_str(obj.get("mime_type")),
        sha256=_str(obj.get("sha256")),
        filename=_str(obj.get("filename")),
        url=_str(obj.get("url")),
        voice=obj.get("voice") is True,
        animated=obj.get("animated") is True,
    )
    return kind, _str(obj.get("caption")), media, {}


def _location_body(obj: dict[str, Any]) -> _Body | None:
    lat, lon = obj.get("latitude"), obj.get("longitude")
    if not _is_number(lat) or not _is_number(lon):
        return None
    name, address = _str(obj.get("name")), _str(obj.get("address"))
    details = {
        "latitude": float(lat),
        "longitude": float(lon),
        "name": name,
        "address": address,
        "url": _str(obj.get("url")),
    }
    text = ", ".join(p for p in (name, address) if p) or None
    return "location", text, None, details


def _contacts_body(obj: Any) -> _Body | None:
    if not isinstance(obj, list):
        return None
    cards = [c for c in obj if isinstance(c, dict)]
    names: list[str] = []
    for card in cards:
        name = _obj(card.get("name"))
        formatted = _str(name.get("formatted_name")) or " ".join(
            p for p in (_str(name.get("first_name")), _str(name.get("last_name"))) if p
        )
        if formatted:
            names.append(formatted)
    return "contacts", ", ".join(names) or None, None, {"contacts": cards}


def _interactive_body(obj: dict[str, Any]) -> _Body | None:
    sub = obj.get("type")
    if sub not in ("button_reply", "list_reply"):
        return None
    reply = obj.get(sub)
    if not isinstance(reply, dict):
        return None
    details: dict[str, Any] = {
        "interactive_type": sub,
        "id": _str(reply.get("id")),
        "title": _str(reply.get("title")),
    }
    if sub == "list_reply":
        details["description"] = _str(reply.get("description"))
    return "interactive", details["title"], None, details


def _parse_status(item: Any, ref: str) -> StatusUpdate:
    if not isinstance(item, dict):
        raise _Malformed("not an object")
    external_id = _str(item.get("id"))
    if not external_id:
        raise _Malformed("missing id")
    status = _str(item.get("status"))
    if not status:
        raise _Malformed("missing status")
    return StatusUpdate(
        external_id=external_id,
        channel_ref=ref,
        status=status,
        timestamp=_timestamp(item.get("timestamp")),
        recipient_id=_str(item.get("recipient_id")),
        recipient_user_id=_str(item.get("recipient_user_id")),
        errors=_problems(item.get("errors")),
    )


def _problems(errors: Any) -> tuple[ChannelProblem, ...]:
    """Meta error objects as ChannelProblems (code, title, error_data.details)."""
    out: list[ChannelProblem] = []
    for err in _as_list(errors):
        if not isinstance(err, dict):
            continue
        code = err.get("code")
        data = _obj(err.get("error_data"))
        out.append(
            ChannelProblem(
                code=code if isinstance(code, int) and not isinstance(code, bool) else 0,
                title=_str(err.get("title")) or _str(err.get("message")) or "",
                details=_str(data.get("details")) or _str(err.get("details")),
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------- small helpers


def _malformed(details: str) -> ChannelProblem:
    return ChannelProblem(code=0, title=MALFORMED_TITLE, details=details)


def _reason(exc: Exception) -> str:
    # Our own _Malformed reasons are fixed phrases; anything else is reduced to its class name
    # so that no payload content can leak into the problem text.
    return str(exc) if isinstance(exc, _Malformed) else f"unparseable ({type(exc).__name__})"


def _timestamp(value: Any) -> datetime:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Malformed("missing timestamp")
    try:
        seconds = int(value)
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (ValueError, OverflowError, OSError):
        raise _Malformed("invalid timestamp") from None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value != "" else None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
