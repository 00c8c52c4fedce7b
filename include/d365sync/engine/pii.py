"""Masking of personal data before it reaches the audit log.

Why: the audit log must show *that* an e-mail or phone changed and roughly to what, so an
operator can recognise a record, without the log itself becoming a copy of customer data.
Fields are recognised by name (email, phone, mobile, fax, telephone) and values by shape, so a
mapping that names a column oddly is still masked.
"""

from __future__ import annotations

import re
from typing import Any, Final

_EMAIL_FIELD: Final = re.compile(r"e_?mail", re.IGNORECASE)
_PHONE_FIELD: Final = re.compile(r"phone|mobile|fax|tel(?!ler)", re.IGNORECASE)
_EMAIL_VALUE: Final = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE_VALUE: Final = re.compile(r"^\+?[\d\s().\-/]{7,}$")


def mask_value(field: str, value: Any) -> Any:
    """Mask e-mails (``j***@e***.com``) and phones (``+33 *** *** 12``); pass other values through."""
    if not isinstance(value, str) or not value:
        return value
    if _EMAIL_FIELD.search(field) or _EMAIL_VALUE.match(value):
        return mask_email(value)
    if _PHONE_FIELD.search(field) or _PHONE_VALUE.match(value):
        return mask_phone(value)
    return value


def personal_field(field: str) -> bool:
    """Whether a field's name says it holds an e-mail or a phone number."""
    return bool(_EMAIL_FIELD.search(field) or _PHONE_FIELD.search(field))


def mask_email(value: str) -> str:
    """Keep the first letter of the local part and of the domain, and the top-level domain."""
    local, _, domain = value.strip().rpartition("@")
    if not local:
        return "***"
    host, dot, tld = domain.rpartition(".")
    if not dot:
        host, tld = domain, ""
    masked_host = f"{host[:1]}***" if host else "***"
    return f"{local[:1]}***@{masked_host}{dot}{tld}"


def mask_phone(value: str) -> str:
    """Keep the international prefix (if any) and the last two digits."""
    digits = re.sub(r"\D", "", value)
    if len(digits) < 4:
        return "***"
    prefix = ""
    if value.strip().startswith("+"):
        # "+1 555…", "+353 …": the group before the first separator; run together: assume 2 digits
        head = re.match(r"\+\s*(\d{1,3})(?=[\s.\-/(])", value.strip())
        prefix = f"+{head.group(1) if head else digits[:2]} "
    return f"{prefix}*** *** {digits[-2:]}"


def mask_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Mask every value of a field -> value mapping."""
    return {name: mask_value(name, value) for name, value in values.items()}
