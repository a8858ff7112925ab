"""How each organisation setting compares with its default: the one definition of a deviation.

Privacy by default (DSK I.12) means the defaults are the strictest that still work. For a switch
the stricter position is named; for a period, shorter is stricter; for keyword lists, a removed
default keyword makes it harder for patients to ask for the notice or to withdraw. The settings
page and the compliance report both judge deviations with :func:`deviates`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    """How one organisation setting is shown, edited and compared with its default."""

    name: str
    kind: str  # switch | number | keywords | days | days_map
    strict: Any = None  # for a switch: the stricter position
    editable: bool = True
    fixed: bool = False  # the code always uses the strict position, whatever is stored
    minimum: int = 1
    maximum: int = 36500


SPECS = (
    Spec("send_read_receipts", "switch", strict=False),
    # The WhatsApp send always asks for no preview (client.py: "preview_url": False), so this is
    # shown as fixed rather than offered as a switch that would change nothing.
    Spec("link_previews", "switch", strict=False, editable=False, fixed=True),
    Spec("consent_required", "switch", strict=True),
    Spec("own_server_encryption_only", "switch", strict=True),
    Spec("notice_keywords", "keywords"),
    Spec("withdraw_keywords", "keywords"),
    Spec("incoming_parts_wait_minutes", "number", maximum=1440),
    Spec("retention_enabled", "switch", strict=True, editable=False),
    Spec("retention_days", "days", editable=False),
    Spec("metadata_days", "days_map", editable=False),
)


def deviates(spec: Spec, value: Any, default: Any) -> bool:
    """Whether ``value`` is less strict than the default."""
    if spec.kind == "switch":
        return bool(value) != spec.strict and bool(default) == spec.strict
    if spec.kind == "days":
        return value is None or int(value) > int(default)
    if spec.kind == "days_map":
        return any(int((value or {}).get(k, d)) > int(d) for k, d in default.items())
    if spec.kind == "keywords":
        return not set(default) <= set(value or ())
    return False  # a number without privacy effect
