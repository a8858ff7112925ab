"""Wire shapes of the Cloud API: error envelopes, webhook envelopes, ids and the signed serialisation.

Everything here is pure (no state, no I/O) so the shapes can be read and tested on their own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pforte.channels.simulator.state import SimNumber, SimUser

ERROR_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"

# code -> (title, default details, HTTP status). The HTTP mapping is an assumption (reference §2).
ERRORS: dict[int, tuple[str, str, int]] = {
    1: ("An unknown error occurred", "An unknown error occurred.", 500),
    2: ("Service temporarily unavailable", "Service temporarily unavailable.", 503),
    100: ("Invalid parameter", "Invalid parameter.", 400),
    190: ("Invalid OAuth access token", "Invalid OAuth access token - Cannot parse access token", 401),
    2500: ("Unknown path components", "Unknown path components.", 400),
    130429: ("Rate limit hit", "Cloud API message throughput has been reached.", 400),
    131000: ("Something went wrong", "Something went wrong.", 500),
    131008: ("Required parameter is missing", "Required parameter is missing.", 400),
    131009: ("Parameter value is not valid", "Parameter value is not valid.", 400),
    131016: ("Service unavailable", "A service is temporarily unavailable.", 503),
    131021: ("Recipient cannot be sender", "Sender and recipient phone number is the same.", 400),
    131026: (
        "Message undeliverable",
        "Unable to deliver message. Reasons can include: the recipient phone number is not a WhatsApp "
        "phone number; the recipient has not accepted the new Terms of Service and Privacy Policy.",
        400,
    ),
    131036: (
        "No-storage retry TTL reached",
        "Message could not be delivered within the retention time.",
        400,
    ),
    131047: (
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer last replied "
        "to this number.",
        400,
    ),
    131049: (
        "This message was not delivered to maintain healthy ecosystem engagement.",
        "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
        400,
    ),
    131050: ("User has stopped marketing messages", "The user has stopped marketing messages.", 400),
    131051: ("Message type unknown", "Message type is not currently supported.", 400),
    131052: ("Media download error", "Unable to download the media sent by the user.", 400),
    131053: ("Media upload error", "Unable to upload the media used in the message.", 400),
    131056: (
        "(Business Account, Consumer Account) pair rate limit hit",
        "Message failed to send because there were too many messages sent from this phone number to "
        "the same phone number in a short period of time.",
        400,
    ),
    131057: ("Account in maintenance mode", "Business Account is in maintenance mode.", 400),
    131062: ("BSUID recipients not supported", "This message type cannot be sent to a BSUID recipient.", 400),
    132000: (
        "Number of parameters does not match the expected number of params",
        "The number of variable parameter values does not match the number of variables in the template.",
        400,
    ),
    132001: (
        "Template name does not exist in the translation",
        "The template does not exist in the specified language or has not been approved.",
        400,
    ),
    132015: ("Template is Paused", "The template has been paused due to low quality.", 400),
    133004: ("Server temporarily unavailable", "Server temporarily unavailable.", 503),
}


class GraphError(Exception):
    """A Cloud API error; raised inside the simulator and rendered once at the HTTP edge."""

    def __init__(self, code: int, details: str | None = None) -> None:
        title, default_details, http_status = ERRORS.get(code, ("Error", "Error.", 400))
        super().__init__(f"graph error {code}")
        self.code = code
        self.title = title
        self.details = details or default_details
        self.http_status = http_status

    def body(self) -> dict[str, Any]:
        """The synchronous error envelope of reference §2."""
        return {
            "error": {
                "message": f"(#{self.code}) {self.title}",
                "type": "OAuthException",
                "code": self.code,
                "error_data": {"messaging_product": "whatsapp", "details": self.details},
                "fbtrace_id": new_trace_id(),
            }
        }

    def webhook_item(self) -> dict[str, Any]:
        """The error object carried in statuses[].errors / messages[].errors (reference §1.5)."""
        return {
            "code": self.code,
            "title": self.title,
            "message": self.title,
            "error_data": {"details": self.details},
            "href": ERROR_HREF,
        }


def new_wamid() -> str:
    """A fresh message id shaped like Meta's (``wamid.`` + base64 of opaque bytes)."""
    raw = base64.b64encode(b"\x18\x0b" + secrets.token_bytes(34)).decode()
    return "wamid.HBgL" + raw.replace("/", "_").replace("+", "-")


def new_media_id() -> str:
    """A numeric media id of 16 digits."""
    return str(10**15 + secrets.randbelow(9 * 10**15))


def new_trace_id() -> str:
    """An opaque fbtrace_id."""
    return secrets.token_urlsafe(17)[:23]


def new_bsuid(country: str = "DE") -> str:
    """A business-scoped user id like ``DE.1349120865530274191``."""
    return f"{country}.{10**18 + secrets.randbelow(9 * 10**18)}"


def unix_ts(moment: datetime) -> str:
    """Unix seconds as a string, the way webhooks carry timestamps."""
    return str(int(moment.timestamp()))


def dump(obj: Any) -> bytes:
    """Serialise like Meta: compact, non-ASCII as \\uXXXX and ``/`` as ``\\/``.

    Receivers must therefore verify the signature over the raw bytes; re-serialising breaks it.
    """
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    # A '/' can only occur inside JSON strings, so escaping it everywhere is safe.
    return text.replace("/", "\\/").encode("ascii")


def sign(body: bytes, app_secret: str) -> str:
    """The X-Hub-Signature-256 header value for exactly these bytes."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def sha256_b64(data: bytes) -> str:
    """Base64 of the SHA-256 digest, as media metadata carries it."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def contact(user: SimUser, *, with_name: bool = True) -> dict[str, Any]:
    """One contacts[] item; wa_id only when the user has a phone number."""
    profile: dict[str, Any] = {}
    if with_name:
        profile["name"] = user.name
    if user.username:
        profile["username"] = user.username
    item: dict[str, Any] = {"profile": profile}
    if user.wa_id:
        item["wa_id"] = user.wa_id
    item["user_id"] = user.user_id
    return item


def metadata(number: SimNumber) -> dict[str, str]:
    """value.metadata of a webhook for this number."""
    return {"display_phone_number": number.display_digits, "phone_number_id": number.phone_number_id}


def messages_value(number: SimNumber, user: SimUser, message: dict[str, Any]) -> dict[str, Any]:
    """value of an inbound-message change."""
    return {
        "messaging_product": "whatsapp",
        "metadata": metadata(number),
        "contacts": [contact(user)],
        "messages": [message],
    }


def statuses_value(number: SimNumber, status: dict[str, Any], user: SimUser | None = None) -> dict[str, Any]:
    """value of a status change; username users get a contacts[] entry (delivered/read)."""
    value: dict[str, Any] = {"messaging_product": "whatsapp", "metadata": metadata(number)}
    if user is not None and user.username and status.get("status") in ("delivered", "read"):
        value["contacts"] = [contact(user, with_name=False)]
    value["statuses"] = [status]
    return value


def envelope(waba_id: str, values: list[dict[str, Any]]) -> dict[str, Any]:
    """The outer webhook object: one entry for the WABA, one change per update."""
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": waba_id, "changes": [{"value": v, "field": "messages"} for v in values]}],
    }
