"""The simulated Meta side: numbers, users, messages and media, and the rules applied to every send.

``Simulator`` is the one object tests, the phone page and the Graph routes talk to. HTTP concerns stay
in ``app.py``; this module raises ``GraphError`` and the edge renders it. All time comes from the
injected clock: wall time for timestamps and the 24-hour window, monotonic time for rate limits,
media URL expiry and webhook backoff.

Never log message text, names, phone numbers or tokens here; ids and counts only.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlencode

import httpx

from pforte.channels.simulator import payloads
from pforte.channels.simulator.config import SimulatorConfig
from pforte.channels.simulator.delivery import DeliveryQueue, WebhookDelivery
from pforte.channels.simulator.payloads import GraphError
from pforte.clock import Clock, SystemClock

log = logging.getLogger(__name__)

Storage = Literal["default", "DE", "no_storage"]
MessageStatus = Literal["accepted", "sent", "delivered", "read", "failed", "received"]

MB = 1024 * 1024
# kind -> (allowed MIME types, max bytes); reference §3.
MEDIA_RULES: dict[str, tuple[frozenset[str], int]] = {
    "audio": (frozenset({"audio/aac", "audio/amr", "audio/mpeg", "audio/mp4", "audio/ogg"}), 16 * MB),
    "document": (
        frozenset(
            {
                "text/plain",
                "application/pdf",
                "application/msword",
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                "application/vnd.ms-excel",
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                "application/vnd.ms-powerpoint",
                "application/vnd.openxmlformats-officedocument.presentationml.presentation",
            }
        ),
        100 * MB,
    ),
    "image": (frozenset({"image/jpeg", "image/png"}), 5 * MB),
    "sticker": (frozenset({"image/webp"}), 500 * 1024),
    "video": (frozenset({"video/mp4", "video/3gpp"}), 16 * MB),
}
MEDIA_KINDS = tuple(MEDIA_RULES)
INBOUND_MEDIA_MAX = 100 * MB
# Leading bytes of formats we can recognise; used only to catch a positive mismatch.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"%PDF-", "application/pdf"),
)
_STATUS_RANK = {"accepted": 0, "sent": 1, "delivered": 2, "read": 3}
_PARAM_RE = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _digits(value: str) -> str:
    return re.sub(r"\D", "", value)


def media_kind_for(mime_type: str) -> str | None:
    """The media kind whose allow-list contains this MIME type (None if none does)."""
    for kind, (allowed, _) in MEDIA_RULES.items():
        if mime_type in allowed:
            return kind
    return None


def _base_mime(mime_type: str) -> str:
    return mime_type.split(";", 1)[0].strip().lower()


@dataclass
class SimTemplate:
    """An approved message template in one language."""

    name: str
    language: str
    body: str
    param_count: int
    category: str = "utility"
    header_param_count: int = 0
    quick_replies: tuple[str, ...] = ()

    def render(self, params: list[str]) -> str:
        """The body with {{1}}, {{2}}, ... replaced by the given texts."""

        def repl(match: re.Match[str]) -> str:
            key = match.group(1)
            if key.isdigit() and 1 <= int(key) <= len(params):
                return params[int(key) - 1]
            return match.group(0)

        return _PARAM_RE.sub(repl, self.body)


@dataclass
class _Fault:
    code: int
    asynchronous: bool


@dataclass
class SimNumber:
    """A registered business phone number with its app credentials and webhook."""

    phone_number_id: str
    display_phone_number: str
    access_token: str
    app_secret: str
    webhook_url: str | None
    verify_token: str | None = None
    rate_limit_per_s: int = 80
    storage: Storage = "default"
    waba_id: str = ""
    verified_name: str = "Pforte Test"
    templates: dict[tuple[str, str], SimTemplate] = field(default_factory=dict)
    webhook_down: int | None = None
    send_times: deque[float] = field(default_factory=deque)
    faults: deque[_Fault] = field(default_factory=deque)

    @property
    def display_digits(self) -> str:
        """The display number as digits only, the way webhook metadata carries it."""
        return _digits(self.display_phone_number)

    def public(self) -> dict[str, Any]:
        """A JSON view without secrets."""
        return {
            "phone_number_id": self.phone_number_id,
            "display_phone_number": self.display_phone_number,
            "waba_id": self.waba_id,
            "webhook_url": self.webhook_url,
            "rate_limit_per_s": self.rate_limit_per_s,
            "storage": self.storage,
            "verified_name": self.verified_name,
            "templates": [{"name": t.name, "language": t.language} for t in self.templates.values()],
        }


@dataclass
class SimUser:
    """A WhatsApp user (patient). Username users have no wa_id."""

    name: str
    user_id: str
    wa_id: str | None = None
    username: str | None = None

    def public(self) -> dict[str, Any]:
        """A JSON view."""
        return {"name": self.name, "user_id": self.user_id, "wa_id": self.wa_id, "username": self.username}


@dataclass
class SimMedia:
    """Stored media bytes and metadata."""

    media_id: str
    phone_number_id: str
    data: bytes
    mime_type: str
    sha256: str
    created_mono: float
    ttl_s: float
    origin: Literal["upload", "webhook"]
    filename: str | None = None
    deleted: bool = False

    @property
    def file_size(self) -> int:
        """Size in bytes."""
        return len(self.data)


@dataclass
class StatusEvent:
    """One status a message went through."""

    status: str
    at: datetime


@dataclass
class SimMessage:
    """A message in either direction; ``direction`` is "out" for what the business sent."""

    wamid: str
    phone_number_id: str
    direction: Literal["in", "out"]
    type: str
    created: datetime
    created_mono: float
    user_id: str | None
    to: str | None = None
    text: str | None = None
    media_id: str | None = None
    link: str | None = None
    mime_type: str | None = None
    filename: str | None = None
    template: dict[str, Any] | None = None
    interactive: dict[str, Any] | None = None
    context_id: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    status: MessageStatus = "accepted"
    statuses: list[StatusEvent] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    biz_opaque_callback_data: str | None = None
    pricing_category: str = "service"
    pricing_type: str = "free_customer_service"
    delivered_emitted: bool = False
    read_by_business: bool = False
    warnings: list[str] = field(default_factory=list)
    seq: int = 0

    def public(self) -> dict[str, Any]:
        """A JSON view (used by the control API and the phone page)."""
        return {
            "wamid": self.wamid,
            "direction": self.direction,
            "type": self.type,
            "phone_number_id": self.phone_number_id,
            "user_id": self.user_id,
            "to": self.to,
            "text": self.text,
            "media_id": self.media_id,
            "link": self.link,
            "mime_type": self.mime_type,
            "template": self.template,
            "interactive": self.interactive,
            "context_id": self.context_id,
            "status": self.status,
            "statuses": [s.status for s in self.statuses],
            "errors": self.errors,
            "read_by_business": self.read_by_business,
            "timestamp": payloads.unix_ts(self.created),
            "warnings": self.warnings,
        }


class Simulator:
    """In-memory WhatsApp Cloud API: Graph behaviour, patients, webhooks and fault injection."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        clock: Clock | None = None,
        webhook_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config or SimulatorConfig()
        self.clock: Clock = clock or SystemClock()
        self.numbers: dict[str, SimNumber] = {}
        self.error_counts: Counter[int] = Counter()  # synchronous Graph errors answered, by code
        self.users: dict[str, SimUser] = {}
        self.messages: list[SimMessage] = []
        self.media: dict[str, SimMedia] = {}
        self._by_wamid: dict[str, SimMessage] = {}
        self._media_urls: dict[str, tuple[str, float]] = {}
        self._last_inbound: dict[tuple[str, str], datetime] = {}
        self._pair: dict[tuple[str, str], tuple[float, float]] = {}
        self.queue = DeliveryQueue(
            config=self.config, clock=self.clock, lookup=self.number, transport=webhook_transport
        )

    # -- setup ---------------------------------------------------------------------------------------

    def add_number(
        self,
        *,
        phone_number_id: str,
        display_phone_number: str,
        access_token: str,
        app_secret: str,
        webhook_url: str | None,
        verify_token: str | None = None,
        rate_limit_per_s: int = 80,
        storage: Storage = "default",
        waba_id: str | None = None,
        verified_name: str = "Pforte Test",
    ) -> SimNumber:
        """Register a business number (replacing one with the same id)."""
        if storage not in ("default", "DE", "no_storage"):
            raise ValueError("storage must be 'default', 'DE' or 'no_storage'")
        number = SimNumber(
            phone_number_id=str(phone_number_id),
            display_phone_number=display_phone_number,
            access_token=access_token,
            app_secret=app_secret,
            webhook_url=webhook_url,
            verify_token=verify_token,
            rate_limit_per_s=rate_limit_per_s,
            storage=storage,
            waba_id=str(waba_id) if waba_id else f"1{_digits(str(phone_number_id))[-14:]:0>14}",
            verified_name=verified_name,
        )
        self.numbers[number.phone_number_id] = number
        return number

    def add_template(
        self,
        phone_number_id: str,
        name: str,
        language: str,
        body: str = "Hallo {{1}}",
        param_count: int | None = None,
        *,
        category: str = "utility",
        header_param_count: int = 0,
        quick_replies: tuple[str, ...] | list[str] = (),
    ) -> SimTemplate:
        """Approve a template for a number; param_count defaults to the distinct {{n}} in body."""
        if param_count is None:
            param_count = len(set(_PARAM_RE.findall(body)))
        template = SimTemplate(
            name=name,
            language=language,
            body=body,
            param_count=param_count,
            category=category.lower(),
            header_param_count=header_param_count,
            quick_replies=tuple(quick_replies),
        )
        self.number(phone_number_id).templates[(name, language)] = template
        return template

    def add_user(
        self,
        *,
        name: str,
        wa_id: str | None = None,
        user_id: str | None = None,
        username: str | None = None,
    ) -> SimUser:
        """Create a patient; the BSUID is generated when not given, the phone number is optional."""
        user = SimUser(
            name=name,
            user_id=user_id or payloads.new_bsuid(),
            wa_id=_digits(wa_id) if wa_id else None,
            username=username,
        )
        self.users[user.user_id] = user
        return user

    def number(self, phone_number_id: str) -> SimNumber:
        """The number with this id (KeyError if unknown)."""
        return self.numbers[str(phone_number_id)]

    def user(self, user_id: str) -> SimUser:
        """The user with this BSUID (KeyError if unknown)."""
        return self.users[user_id]

    def user_by_wa_id(self, wa_id: str) -> SimUser | None:
        """The user with this phone number, if any."""
        digits = _digits(wa_id)
        return next((u for u in self.users.values() if u.wa_id == digits), None)

    # -- lifecycle and fault injection ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the webhook delivery loop."""
        await self.queue.start()

    async def stop(self) -> None:
        """Stop the delivery loop and close its HTTP client."""
        await self.queue.stop()

    async def drain(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (prescribed API)
        """Wait until every queued webhook is delivered or given up (starts the loop if needed)."""
        await self.queue.drain(timeout)

    def hold_webhooks(self) -> None:
        """Collect updates instead of posting them, so ``flush_webhooks`` can batch them."""
        self.queue.hold()

    def flush_webhooks(self) -> None:
        """Post the collected updates, up to ``config.batch_max`` per POST."""
        self.queue.release()

    @property
    def webhook_log(self) -> list[WebhookDelivery]:
        """Every webhook body formed so far, with attempts and final state."""
        return self.queue.log

    def fail_next_send(self, phone_number_id: str, code: int, *, asynchronous: bool = False) -> None:
        """Make the next message send fail with ``code`` (sync error, or accepted then failed status)."""
        self.number(phone_number_id).faults.append(_Fault(code, asynchronous))

    def set_webhook_down(self, phone_number_id: str, status_code: int = 500) -> None:
        """Pretend the receiver answers every webhook with ``status_code``."""
        self.number(phone_number_id).webhook_down = status_code

    def set_webhook_up(self, phone_number_id: str) -> None:
        """Undo ``set_webhook_down``; queued retries then succeed on their next attempt."""
        self.number(phone_number_id).webhook_down = None

    async def verify_webhook(self, phone_number_id: str, *, challenge: str | None = None) -> bool:
        """Meta's GET handshake against the webhook URL; True if 200 and the challenge echoed."""
        number = self.number(phone_number_id)
        if not number.webhook_url:
            return False
        challenge = challenge or str(10**9 + secrets.randbelow(9 * 10**9))
        params = {
            "hub.mode": "subscribe",
            "hub.challenge": challenge,
            "hub.verify_token": number.verify_token or "",
        }
        response = await self.queue.client().get(number.webhook_url, params=params)
        return response.status_code == 200 and response.text == challenge

    # -- Graph: auth -----------------------------------------------------------------------------------

    def check_version(self, version: str) -> None:
        """Unknown Graph versions are rejected like Meta rejects unknown path components."""
        if version not in self.config.graph_versions:
            raise GraphError(2500, f"Unknown path components: /{version}")

    def authenticate(self, token: str | None) -> list[SimNumber]:
        """Numbers the bearer token grants access to; 190 if none."""
        if not token:
            raise GraphError(190, "An active access token must be used to query information.")
        owned = [n for n in self.numbers.values() if secrets.compare_digest(n.access_token, token)]
        if not owned:
            raise GraphError(190, "Invalid OAuth access token - Cannot parse access token")
        return owned

    def authorize_number(self, token: str | None, phone_number_id: str) -> SimNumber:
        """The number if the token may use it; 190 for a bad token, 100 for a foreign or unknown id."""
        owned = self.authenticate(token)
        for number in owned:
            if number.phone_number_id == phone_number_id:
                return number
        raise GraphError(
            100,
            f"Unsupported post request. Object with ID '{phone_number_id}' does not exist, cannot be loaded "
            "due to missing permissions, or does not support this operation.",
        )

    # -- Graph: sending ----------------------------------------------------------------------------------

    def send(self, number: SimNumber, body: Any) -> dict[str, Any]:
        """POST /{pnid}/messages: validate, apply limits, store, queue status webhooks."""
        if not isinstance(body, dict):
            raise GraphError(100, "The request body must be a JSON object.")
        if body.get("messaging_product") != "whatsapp":
            raise GraphError(100, "The parameter messaging_product is required and must be 'whatsapp'.")
        self._take_throughput(number)
        if "status" in body:
            return self._mark_read(number, body)
        fault = number.faults.popleft() if number.faults else None
        if fault is not None and not fault.asynchronous:
            raise GraphError(fault.code)
        user, recipient_input, pair_key, warnings = self._resolve_recipient(number, body)
        mtype = body.get("type", "text")
        if not isinstance(mtype, str):
            raise GraphError(100, "Param type must be a string.")
        message = self._build_outbound(number, body, mtype, user, recipient_input)
        message.warnings = warnings
        in_window = user is not None and self.window_open(number.phone_number_id, user.user_id)
        if mtype != "template" and user is not None and not in_window and self.config.window_mode == "sync":
            raise GraphError(131047)
        self._take_pair(number, pair_key)
        self._price(message, number, in_window)
        self._store(message)
        if fault is not None:
            self._fail(message, GraphError(fault.code))
        elif user is None:
            self._fail(message, GraphError(131026))
        elif mtype != "template" and not in_window:
            self._fail(message, GraphError(131047))
        else:
            self._emit_status(message, "sent")
            if self.config.auto_deliver and mtype != "reaction":
                self.queue.schedule(self.config.deliver_delay_s, lambda: self._auto_deliver(message))
        contact: dict[str, Any] = {"input": recipient_input}
        if body.get("to"):
            contact["wa_id"] = user.wa_id if user and user.wa_id else _digits(str(body["to"]))
        if user is not None:
            contact["user_id"] = user.user_id
        return {
            "messaging_product": "whatsapp",
            "contacts": [contact],
            "messages": [{"id": message.wamid}],
        }

    def _take_throughput(self, number: SimNumber) -> None:
        now = self.clock.monotonic()
        times = number.send_times
        while times and times[0] <= now - 1.0:
            times.popleft()
        if len(times) >= number.rate_limit_per_s:
            raise GraphError(130429)
        times.append(now)

    def _take_pair(self, number: SimNumber, pair_key: str) -> None:
        if not self.config.pair_limit_enabled:
            return
        now = self.clock.monotonic()
        key = (number.phone_number_id, pair_key)
        burst = float(self.config.pair_burst)
        tokens, last = self._pair.get(key, (burst, now))
        tokens = min(burst, tokens + (now - last) / self.config.pair_refill_s)
        if tokens < 1.0:
            self._pair[key] = (tokens, now)
            raise GraphError(131056)
        self._pair[key] = (tokens - 1.0, now)

    def _resolve_recipient(
        self, number: SimNumber, body: dict[str, Any]
    ) -> tuple[SimUser | None, str, str, list[str]]:
        warnings: list[str] = []
        to = body.get("to")
        recipient = body.get("recipient")
        if to:
            text = str(to)
            digits = _digits(text)
            if not digits:
                raise GraphError(100, "Param to must be a phone number.")
            if not text.startswith("+"):
                # Meta prepends the business number's country code to some numbers without '+'.
                warnings.append("to_without_plus")
            if digits == number.display_digits:
                raise GraphError(131021)
            user = self.user_by_wa_id(digits)
            return user, text, user.user_id if user else f"wa:{digits}", warnings
        if recipient:
            user = self.users.get(str(recipient))
            return user, str(recipient), str(recipient), warnings
        raise GraphError(131008, "The parameter to is required.")

    def _build_outbound(
        self, number: SimNumber, body: dict[str, Any], mtype: str, user: SimUser | None, recipient: str
    ) -> SimMessage:
        message = SimMessage(
            wamid=payloads.new_wamid(),
            phone_number_id=number.phone_number_id,
            direction="out",
            type=mtype,
            created=self.clock.now(),
            created_mono=self.clock.monotonic(),
            user_id=user.user_id if user else None,
            to=recipient,
            payload=body,
        )
        obj = body.get(mtype)
        if mtype != "text" and not isinstance(obj, dict):
            raise GraphError(100, f"Param {mtype} must be an object.")
        if mtype == "text":
            self._check_text(body, message)
        elif mtype in MEDIA_KINDS:
            self._check_media(number, mtype, obj, message)  # type: ignore[arg-type]
        elif mtype == "template":
            self._check_template(number, obj, message)  # type: ignore[arg-type]
        elif mtype == "interactive":
            self._check_interactive(obj, message)  # type: ignore[arg-type]
        elif mtype == "reaction":
            self._check_reaction(number, obj, message, user)  # type: ignore[arg-type]
        elif mtype == "location":
            if "latitude" not in obj or "longitude" not in obj:  # type: ignore[operator]
                raise GraphError(131008, "Param location requires latitude and longitude.")
            message.text = str(obj.get("name") or "")  # type: ignore[union-attr]
        elif mtype == "contacts":
            message.text = ""
        else:
            raise GraphError(100, f"Param type '{mtype[:40]}' is not a supported message type.")
        context = body.get("context")
        if isinstance(context, dict) and context.get("message_id"):
            message.context_id = str(context["message_id"])
        opaque = body.get("biz_opaque_callback_data")
        if isinstance(opaque, str):
            message.biz_opaque_callback_data = opaque
        return message

    @staticmethod
    def _check_text(body: dict[str, Any], message: SimMessage) -> None:
        text = body.get("text")
        if not isinstance(text, dict) or not isinstance(text.get("body"), str) or not text["body"]:
            raise GraphError(100, "Param text['body'] is required.")
        if len(text["body"]) > 4096:
            raise GraphError(100, "Param text['body'] must be at most 4096 characters long.")
        message.text = text["body"]

    def _check_media(self, number: SimNumber, kind: str, obj: dict[str, Any], message: SimMessage) -> None:
        media_id, link = obj.get("id"), obj.get("link")
        if bool(media_id) == bool(link):
            raise GraphError(100, f"Param {kind} must contain either 'id' or 'link'.")
        caption = obj.get("caption")
        if caption is not None:
            if kind in ("audio", "sticker"):
                raise GraphError(100, f"Param {kind}['caption'] is not supported.")
            if not isinstance(caption, str) or len(caption) > 1024:
                raise GraphError(100, f"Param {kind}['caption'] must be at most 1024 characters long.")
            message.text = caption
        if media_id:
            media = self._live_media(str(media_id))
            if media is None or media.phone_number_id != number.phone_number_id:
                raise GraphError(131009, f"Param {kind}['id'] is not a valid media id for this number.")
            allowed, _ = MEDIA_RULES[kind]
            if kind != "document" and media.mime_type not in allowed:
                raise GraphError(131053, f"Media type {media.mime_type} cannot be sent as {kind}.")
            message.media_id = media.media_id
            message.mime_type = media.mime_type
        else:
            if not isinstance(link, str) or not link.startswith(("https://", "http://")):
                raise GraphError(131009, f"Param {kind}['link'] must be an http(s) URL.")
            message.link = link
        if kind == "document" and isinstance(obj.get("filename"), str):
            message.filename = obj["filename"]

    @staticmethod
    def _check_template(number: SimNumber, obj: dict[str, Any], message: SimMessage) -> None:
        name = obj.get("name")
        language = obj.get("language")
        code = language.get("code") if isinstance(language, dict) else None
        if not isinstance(name, str) or not name or not isinstance(code, str):
            raise GraphError(131008, "Param template requires name and language.code.")
        template = number.templates.get((name, code))
        if template is None:
            raise GraphError(132001, f"template name ({name[:60]}) does not exist in {code[:10]}")
        components = obj.get("components") or []
        if not isinstance(components, list):
            raise GraphError(100, "Param template['components'] must be a list.")
        body_params: list[str] = []
        header_count = 0
        for component in components:
            if not isinstance(component, dict):
                raise GraphError(100, "Param template['components'] items must be objects.")
            params = component.get("parameters") or []
            if not isinstance(params, list):
                raise GraphError(100, "Param parameters must be a list.")
            ctype = component.get("type")
            if ctype == "body":
                for param in params:
                    if not isinstance(param, dict):
                        raise GraphError(100, "Template parameters must be objects.")
                    body_params.append(str(param.get("text", param.get(param.get("type", ""), ""))))
            elif ctype == "header":
                header_count += len(params)
        if len(body_params) != template.param_count or header_count != template.header_param_count:
            raise GraphError(
                132000,
                f"body: number of localizable_params ({len(body_params)}) does not match the expected "
                f"number of params ({template.param_count})",
            )
        message.text = template.render(body_params)
        message.template = {"name": name, "language": code, "parameters": body_params}
        message.pricing_category = template.category

    @staticmethod
    def _check_interactive(obj: dict[str, Any], message: SimMessage) -> None:
        itype = obj.get("type")
        body = obj.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("text"), str) or not body["text"]:
            raise GraphError(131008, "Param interactive['body']['text'] is required.")
        if len(body["text"]) > 1024:
            raise GraphError(131009, "Interactive body text must be at most 1024 characters.")
        for part in ("header", "footer"):
            piece = obj.get(part)
            if isinstance(piece, dict) and len(str(piece.get("text", ""))) > 60:
                raise GraphError(131009, f"Interactive {part} text must be at most 60 characters.")
        action = obj.get("action")
        if not isinstance(action, dict):
            raise GraphError(131008, "Param interactive['action'] is required.")
        options: list[dict[str, str]] = []
        if itype == "button":
            buttons = action.get("buttons")
            if not isinstance(buttons, list) or not 1 <= len(buttons) <= 3:
                raise GraphError(131009, "Buttons count is invalid: between 1 and 3 reply buttons allowed.")
            for button in buttons:
                reply = button.get("reply") if isinstance(button, dict) else None
                if not isinstance(reply, dict):
                    raise GraphError(131008, "Each button needs a reply object.")
                title, bid = str(reply.get("title", "")), str(reply.get("id", ""))
                if not 1 <= len(title) <= 20:
                    raise GraphError(131009, "Button title length invalid. Should be 1 to 20 characters.")
                if not 1 <= len(bid) <= 256:
                    raise GraphError(131009, "Button id length invalid. Should be 1 to 256 characters.")
                options.append({"id": bid, "title": title})
            if len({o["id"] for o in options}) != len(options):
                raise GraphError(131009, "Button ids must be unique.")
        elif itype == "list":
            label = str(action.get("button", ""))
            if not 1 <= len(label) <= 20:
                raise GraphError(131009, "List button text must be 1 to 20 characters.")
            sections = action.get("sections")
            if not isinstance(sections, list) or not 1 <= len(sections) <= 10:
                raise GraphError(131009, "Sections count is invalid: between 1 and 10 allowed.")
            for section in sections:
                rows = section.get("rows") if isinstance(section, dict) else None
                if not isinstance(rows, list) or not rows:
                    raise GraphError(131009, "Each section needs at least one row.")
                for row in rows:
                    if not isinstance(row, dict):
                        raise GraphError(131009, "Rows must be objects.")
                    title, rid = str(row.get("title", "")), str(row.get("id", ""))
                    if not 1 <= len(title) <= 24:
                        raise GraphError(131009, "Row title length invalid. Should be 1 to 24 characters.")
                    if not 1 <= len(rid) <= 200:
                        raise GraphError(131009, "Row id length invalid. Should be 1 to 200 characters.")
                    if len(str(row.get("description", ""))) > 72:
                        raise GraphError(131009, "Row description must be at most 72 characters.")
                    options.append(
                        {"id": rid, "title": title, "description": str(row.get("description", ""))}
                    )
            if len(options) > 10:
                raise GraphError(131009, "Total row count exceeds max allowed count of 10.")
        elif itype not in ("cta_url", "location_request_message", "flow", "product", "product_list"):
            raise GraphError(100, "Param interactive['type'] is not valid.")
        message.text = body["text"]
        message.interactive = {"type": itype, "options": options}

    def _check_reaction(
        self, number: SimNumber, obj: dict[str, Any], message: SimMessage, user: SimUser | None
    ) -> None:
        target = self._by_wamid.get(str(obj.get("message_id", "")))
        if (
            target is None
            or target.phone_number_id != number.phone_number_id
            or (user is not None and target.user_id != user.user_id)
        ):
            raise GraphError(131009, "Param reaction['message_id'] is not a valid message id.")
        if self.clock.monotonic() - target.created_mono > self.config.reaction_max_age_s:
            raise GraphError(131009, "Reactions are possible only on messages up to 30 days old.")
        emoji = obj.get("emoji", "")
        message.text = emoji if isinstance(emoji, str) else ""
        message.context_id = target.wamid

    def _mark_read(self, number: SimNumber, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("status") != "read":
            raise GraphError(100, "Param status must be 'read'.")
        target = self._by_wamid.get(str(body.get("message_id", "")))
        if target is None or target.direction != "in" or target.phone_number_id != number.phone_number_id:
            raise GraphError(131009, "Param message_id is not a valid received message id.")
        if self.clock.monotonic() - target.created_mono > 30 * 24 * 3600:
            raise GraphError(131009, "Messages older than 30 days cannot be marked as read.")
        typing = body.get("typing_indicator")
        if typing is not None and (not isinstance(typing, dict) or typing.get("type") != "text"):
            raise GraphError(100, "Param typing_indicator['type'] must be 'text'.")
        for message in self.messages:
            if (
                message.direction == "in"
                and message.phone_number_id == number.phone_number_id
                and message.user_id == target.user_id
                and message.seq <= target.seq
            ):
                message.read_by_business = True
        return {"success": True}

    # -- status webhooks -----------------------------------------------------------------------------

    def _store(self, message: SimMessage) -> None:
        message.seq = len(self.messages)
        self.messages.append(message)
        self._by_wamid[message.wamid] = message

    def _price(self, message: SimMessage, number: SimNumber, in_window: bool) -> None:
        if message.type == "template":
            free = in_window and message.pricing_category == "utility"
            message.pricing_type = "free_customer_service" if free else "regular"
        else:
            message.pricing_category = "service"
            message.pricing_type = "free_customer_service"

    def _emit_status(
        self, message: SimMessage, status: str, errors: list[dict[str, Any]] | None = None
    ) -> None:
        user = self.users.get(message.user_id) if message.user_id else None
        item: dict[str, Any] = {
            "id": message.wamid,
            "status": status,
            "timestamp": payloads.unix_ts(self.clock.now()),
        }
        if user is not None and user.wa_id:
            item["recipient_id"] = user.wa_id
        elif user is None and message.to and message.to.lstrip("+").isdigit():
            item["recipient_id"] = _digits(message.to)
        if user is not None:
            item["recipient_user_id"] = user.user_id
        elif message.to and not message.to.lstrip("+").isdigit():
            item["recipient_user_id"] = message.to
        if message.biz_opaque_callback_data is not None:
            item["biz_opaque_callback_data"] = message.biz_opaque_callback_data
        with_pricing = status in ("sent", "delivered") or (status == "read" and not message.delivered_emitted)
        if with_pricing:
            item["pricing"] = {
                "billable": message.pricing_type == "regular",
                "pricing_model": "PMP",
                "type": message.pricing_type,
                "category": message.pricing_category,
            }
        if errors:
            item["errors"] = errors
        if status == "delivered":
            message.delivered_emitted = True
        message.status = status  # type: ignore[assignment]
        message.statuses.append(StatusEvent(status, self.clock.now()))
        number = self.number(message.phone_number_id)
        self.queue.enqueue_update(number.phone_number_id, payloads.statuses_value(number, item, user))

    def _fail(self, message: SimMessage, error: GraphError) -> None:
        item = error.webhook_item()
        message.errors.append(item)
        self._emit_status(message, "failed", [item])

    def _auto_deliver(self, message: SimMessage) -> None:
        if message.status == "sent":
            self._emit_status(message, "delivered")

    def _advance_all(
        self, user: SimUser, phone_number_id: str, upto_wamid: str | None, status: str
    ) -> list[str]:
        limit: int | None = None
        if upto_wamid is not None:
            anchor = self._by_wamid.get(upto_wamid)
            if anchor is None:
                raise KeyError(upto_wamid)
            limit = anchor.seq
        changed = []
        for message in self.business_messages(phone_number_id, user):
            if message.type == "reaction" or message.status not in _STATUS_RANK:
                continue
            if limit is not None and message.seq > limit:
                continue
            if _STATUS_RANK[message.status] < _STATUS_RANK[status] and message.status != "accepted":
                self._emit_status(message, status)
                changed.append(message.wamid)
        return changed

    # -- patients ------------------------------------------------------------------------------------

    def window_open(self, phone_number_id: str, user_id: str) -> bool:
        """True while the 24-hour customer-service window of this (number, user) pair is open."""
        last = self._last_inbound.get((phone_number_id, user_id))
        return last is not None and self.clock.now() - last < timedelta(seconds=self.config.window_s)

    def _inbound(self, user: SimUser, phone_number_id: str, mtype: str, message: dict[str, Any]) -> str:
        number = self.number(phone_number_id)
        now = self.clock.now()
        wamid = str(message.get("id") or payloads.new_wamid())
        item: dict[str, Any] = {}
        if user.wa_id:
            item["from"] = user.wa_id
        item["from_user_id"] = user.user_id
        item["id"] = wamid
        item["timestamp"] = payloads.unix_ts(now)
        for key, value in message.items():
            if key not in ("id", "timestamp"):
                item[key] = value
        item.setdefault("type", mtype)
        stored = SimMessage(
            wamid=wamid,
            phone_number_id=number.phone_number_id,
            direction="in",
            type=str(item["type"]),
            created=now,
            created_mono=self.clock.monotonic(),
            user_id=user.user_id,
            payload=item,
            status="received",
        )
        body = item.get(item["type"])
        if isinstance(body, dict):
            stored.text = body.get("body") or body.get("caption") or body.get("emoji") or body.get("title")
            stored.media_id = body.get("id") if item["type"] in MEDIA_KINDS else None
            stored.mime_type = body.get("mime_type")
            reply = body.get("button_reply") or body.get("list_reply")
            if isinstance(reply, dict):
                stored.text = reply.get("title")
        context = item.get("context")
        if isinstance(context, dict) and context.get("id"):
            stored.context_id = str(context["id"])
        self._store(stored)
        self._last_inbound[(number.phone_number_id, user.user_id)] = now
        self.queue.enqueue_update(number.phone_number_id, payloads.messages_value(number, user, item))
        return wamid

    def _context(self, phone_number_id: str, context_id: str | None) -> dict[str, Any]:
        if not context_id:
            return {}
        return {"context": {"from": self.number(phone_number_id).display_digits, "id": context_id}}

    async def patient_send_text(
        self, *, user: SimUser, phone_number_id: str, text: str, context_id: str | None = None
    ) -> str:
        """The patient writes a text message; returns its wamid."""
        message = {"type": "text", "text": {"body": text}, **self._context(phone_number_id, context_id)}
        return self._inbound(user, phone_number_id, "text", message)

    async def patient_send_media(
        self,
        *,
        user: SimUser,
        phone_number_id: str,
        kind: str,
        data: bytes,
        mime_type: str,
        filename: str | None = None,
        caption: str | None = None,
        voice: bool = False,
    ) -> str:
        """The patient sends media; it gets a 7-day media id the business can download."""
        if kind not in MEDIA_KINDS:
            raise ValueError(f"unknown media kind {kind!r}")
        if len(data) > INBOUND_MEDIA_MAX:
            error = GraphError(131052, "Media file size too big. Max file size we currently support: 100MB.")
            message = {"type": "unsupported", "errors": [error.webhook_item()], "unsupported": {"type": kind}}
            return self._inbound(user, phone_number_id, "unsupported", message)
        media = self._put_media(phone_number_id, data, mime_type, origin="webhook", filename=filename)
        obj: dict[str, Any] = {"id": media.media_id, "mime_type": media.mime_type, "sha256": media.sha256}
        if caption and kind in ("image", "video", "document"):
            obj["caption"] = caption
        if kind == "document":
            obj["filename"] = filename or "document"
        if kind == "audio":
            obj["voice"] = voice
        if kind == "sticker":
            obj["animated"] = False
        return self._inbound(user, phone_number_id, kind, {"type": kind, kind: obj})

    async def patient_send_raw_message(
        self, *, user: SimUser, phone_number_id: str, message: dict[str, Any]
    ) -> str:
        """Send an arbitrary messages[] item (any type); from/id/timestamp are filled in if missing."""
        return self._inbound(user, phone_number_id, str(message.get("type", "unknown")), dict(message))

    async def patient_send_interactive_reply(
        self,
        *,
        user: SimUser,
        phone_number_id: str,
        context_id: str,
        reply_id: str,
        title: str,
        kind: Literal["button_reply", "list_reply"] = "button_reply",
        description: str | None = None,
    ) -> str:
        """The patient taps a reply button or list row of an interactive business message."""
        reply: dict[str, Any] = {"id": reply_id, "title": title}
        if description and kind == "list_reply":
            reply["description"] = description
        message = {
            "type": "interactive",
            "interactive": {"type": kind, kind: reply},
            **self._context(phone_number_id, context_id),
        }
        return self._inbound(user, phone_number_id, "interactive", message)

    async def patient_send_button(
        self, *, user: SimUser, phone_number_id: str, context_id: str, text: str, payload: str | None = None
    ) -> str:
        """The patient taps a quick-reply button of a template (type "button")."""
        message = {
            "type": "button",
            "button": {"payload": payload if payload is not None else text, "text": text},
            **self._context(phone_number_id, context_id),
        }
        return self._inbound(user, phone_number_id, "button", message)

    async def patient_react(
        self, *, user: SimUser, phone_number_id: str, message_id: str, emoji: str | None
    ) -> str:
        """The patient reacts to a message (emoji None or "" removes the reaction)."""
        reaction: dict[str, Any] = {"message_id": message_id}
        if emoji is not None:
            reaction["emoji"] = emoji
        return self._inbound(user, phone_number_id, "reaction", {"type": "reaction", "reaction": reaction})

    async def patient_delivered(
        self, *, user: SimUser, phone_number_id: str, upto_wamid: str | None = None
    ) -> list[str]:
        """The patient's phone receives business messages: "delivered" webhooks; returns the wamids."""
        return self._advance_all(user, phone_number_id, upto_wamid, "delivered")

    async def patient_read(
        self, *, user: SimUser, phone_number_id: str, upto_wamid: str | None = None
    ) -> list[str]:
        """The patient opens the chat: "read" webhooks for unread business messages; returns the wamids."""
        return self._advance_all(user, phone_number_id, upto_wamid, "read")

    # -- queries ---------------------------------------------------------------------------------------

    def business_messages(self, phone_number_id: str, user: SimUser | None = None) -> list[SimMessage]:
        """What the business sent from this number (optionally to one user), oldest first."""
        return [
            m
            for m in self.messages
            if m.direction == "out"
            and m.phone_number_id == str(phone_number_id)
            and (user is None or m.user_id == user.user_id)
        ]

    def conversation(self, phone_number_id: str, user: SimUser) -> list[SimMessage]:
        """Both directions between a number and a user, oldest first."""
        return [
            m
            for m in self.messages
            if m.phone_number_id == str(phone_number_id) and m.user_id == user.user_id
        ]

    def message(self, wamid: str) -> SimMessage | None:
        """A message by wamid."""
        return self._by_wamid.get(wamid)

    # -- media -----------------------------------------------------------------------------------------

    def _put_media(
        self,
        phone_number_id: str,
        data: bytes,
        mime_type: str,
        *,
        origin: Literal["upload", "webhook"],
        filename: str | None = None,
    ) -> SimMedia:
        number = self.number(phone_number_id)
        ttl = self.config.upload_media_ttl_s if origin == "upload" else self.config.webhook_media_ttl_s
        if number.storage == "no_storage":
            ttl = min(ttl, 3600.0)
        media = SimMedia(
            media_id=payloads.new_media_id(),
            phone_number_id=number.phone_number_id,
            data=data,
            mime_type=mime_type,
            sha256=payloads.sha256_b64(data),
            created_mono=self.clock.monotonic(),
            ttl_s=ttl,
            origin=origin,
            filename=filename,
        )
        self.media[media.media_id] = media
        return media

    def _live_media(self, media_id: str) -> SimMedia | None:
        media = self.media.get(media_id)
        if media is None or media.deleted or self.clock.monotonic() - media.created_mono > media.ttl_s:
            return None
        return media

    def upload_media(
        self,
        number: SimNumber,
        *,
        messaging_product: str | None,
        data: bytes | None,
        file_mime: str | None,
        type_field: str | None,
        filename: str | None = None,
    ) -> dict[str, str]:
        """POST /{pnid}/media: check product, MIME allow-list, size and declared type; store."""
        if messaging_product != "whatsapp":
            raise GraphError(100, "The parameter messaging_product is required and must be 'whatsapp'.")
        if data is None:
            raise GraphError(100, "The parameter file is required.")
        declared = _base_mime(type_field) if type_field else None
        part = _base_mime(file_mime) if file_mime else None
        if part in (None, "application/octet-stream"):
            part = None
        mime = declared or part
        if mime is None:
            raise GraphError(100, "The parameter type is required.")
        if declared and part and declared != part:
            raise GraphError(131053, "The declared type does not match the file's content type.")
        kind = media_kind_for(mime)
        if kind is None:
            allowed = ", ".join(sorted(t for rules in MEDIA_RULES.values() for t in rules[0]))
            raise GraphError(100, f"Param file must be a file with one of the following types: {allowed}")
        for magic, actual in _MAGIC:
            if data.startswith(magic) and actual != mime:
                raise GraphError(131053, f"The file content is {actual}, not the declared type.")
        if len(data) > MEDIA_RULES[kind][1]:
            raise GraphError(
                131053, f"The file is larger than the {kind} limit of {MEDIA_RULES[kind][1]} bytes."
            )
        if not data:
            raise GraphError(131053, "The file is empty.")
        media = self._put_media(number.phone_number_id, data, mime, origin="upload", filename=filename)
        return {"id": media.media_id}

    def _media_for_token(self, token: str | None, media_id: str, phone_number_id: str | None) -> SimMedia:
        owned = self.authenticate(token)
        media = self._live_media(media_id)
        wabas = {n.waba_id for n in owned}
        owner = self.numbers.get(media.phone_number_id) if media else None
        if media is None or owner is None or owner.waba_id not in wabas:
            raise GraphError(
                100,
                f"Unsupported get request. Object with ID '{media_id}' does not exist, cannot be loaded due "
                "to missing permissions, or does not support this operation.",
            )
        if phone_number_id is not None and phone_number_id != media.phone_number_id:
            raise GraphError(100, "The media does not belong to the given phone_number_id.")
        return media

    def media_info(
        self, token: str | None, media_id: str, *, phone_number_id: str | None, base_url: str
    ) -> dict[str, Any]:
        """GET /{media_id}: metadata and a fresh download URL valid for 5 minutes."""
        media = self._media_for_token(token, media_id, phone_number_id)
        url_token = secrets.token_urlsafe(24)
        self._media_urls[url_token] = (media.media_id, self.clock.monotonic() + self.config.media_url_ttl_s)
        expires = int(self.clock.now().timestamp() + self.config.media_url_ttl_s)
        query = urlencode({"mid": media.media_id, "ext": expires, "hash": url_token})
        base = (self.config.public_base_url or base_url).rstrip("/")
        return {
            "messaging_product": "whatsapp",
            "url": f"{base}/whatsapp_business/attachments/?{query}",
            "mime_type": media.mime_type,
            "sha256": media.sha256,
            "file_size": media.file_size,
            "id": media.media_id,
        }

    def delete_media(
        self, token: str | None, media_id: str, *, phone_number_id: str | None
    ) -> dict[str, bool]:
        """DELETE /{media_id}."""
        media = self._media_for_token(token, media_id, phone_number_id)
        media.deleted = True
        return {"success": True}

    def download(self, token: str | None, url_token: str) -> SimMedia | None:
        """GET of a media URL: None (→ 404) when unknown, expired or deleted; 401 without a valid bearer."""
        owned = self.authenticate(token)
        entry = self._media_urls.get(url_token)
        if entry is None:
            return None
        media_id, expires_mono = entry
        if self.clock.monotonic() > expires_mono:
            self._media_urls.pop(url_token, None)
            return None
        media = self._live_media(media_id)
        owner = self.numbers.get(media.phone_number_id) if media else None
        if media is None or owner is None or owner.waba_id not in {n.waba_id for n in owned}:
            return None
        return media

    def media_bytes(self, media_id: str) -> SimMedia | None:
        """Media for the patient's own phone view (no bearer: it is the patient's device)."""
        return self._live_media(media_id)

    def log_summary(self) -> dict[str, int]:
        """Counts for the control API (no content)."""
        return {
            "numbers": len(self.numbers),
            "users": len(self.users),
            "messages": len(self.messages),
            "webhooks": len(self.webhook_log),
            "webhooks_pending": self.queue.pending,
        }
