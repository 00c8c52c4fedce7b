"""How values look on a page: masked for those who may not see personal data, readable for all.

Why here and not in the templates: "no page shows an unmasked e-mail or phone to a viewer" is
a rule, so it lives in one function every template goes through (``show``/``text``), and the
tests check the rendered pages, not the templates.
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from d365sync.engine.pii import mask_email, mask_phone, mask_value

EMPTY: Final = "(empty)"
_EMAIL_IN_TEXT: Final = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")
_PHONE_IN_TEXT: Final = re.compile(
    r"\+\s?\d[\d\s().\-/]{5,}\d"  # international
    r"|\(?\b\d{3}\)?[\s.\-]\d{3}[\s.\-]\d{2,4}\b"  # 555-123-4567, (555) 123 4567
)
_EMAIL_KEY: Final = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def mask_deep(field: str, value: Any) -> Any:
    """Mask e-mails and phones anywhere inside a value (dicts by their own field names)."""
    if isinstance(value, dict):
        return {k: mask_deep(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_deep(field, v) for v in value]
    if isinstance(value, str):
        masked = mask_value(field, value)
        return mask_text(masked) if masked == value else masked
    return value


def mask_text(text: str | None) -> str:
    """Mask e-mails and phone numbers inside free text (errors, reasons, comments)."""
    if not text:
        return text or ""
    text = _EMAIL_IN_TEXT.sub(lambda m: mask_email(m.group(0)), text)
    return _PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group(0)), text)


def mask_key(key: str) -> str:
    """Record keys: an e-mail used as a key is masked; numeric keys stay searchable."""
    if _EMAIL_KEY.match(key):
        return mask_email(key)
    return mask_phone(key) if key.startswith("+") else key


def as_text(value: Any) -> str:
    """A value as one line of text."""
    if value is None:
        return EMPTY
    if isinstance(value, (Decimal, int, float, bool)):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False, sort_keys=True)
    return str(value)


def show(field: str, value: Any, reveal: bool) -> str:
    """The value of ``field`` for a reader; masked unless ``reveal``."""
    return as_text(value if reveal else mask_deep(field, value))


def text(value: str | None, reveal: bool) -> str:
    """Free text for a reader; masked unless ``reveal``."""
    return (value or "") if reveal else mask_text(value)


def key(value: str, reveal: bool) -> str:
    return value if reveal else mask_key(value)


def coerce(raw: str, like: Any) -> Any:
    """An operator's typed value, converted to the type of the values it replaces."""
    raw = raw.strip()
    if raw == "" and not isinstance(like, str):
        return None
    try:
        return _coerce(raw, like)
    except (ValueError, InvalidOperation):
        raise ValueError(f"{raw!r} is not a valid {type(like).__name__}") from None


def _coerce(raw: str, like: Any) -> Any:
    if isinstance(like, bool):
        if raw.lower() not in {"true", "false", "1", "0", "yes", "no"}:
            raise ValueError(raw)
        return raw.lower() in {"true", "1", "yes"}
    if isinstance(like, Decimal):
        return Decimal(raw)
    if isinstance(like, int):
        return int(raw)
    if isinstance(like, float):
        return float(raw)
    if isinstance(like, datetime):
        return datetime.fromisoformat(raw)
    if isinstance(like, date):
        return date.fromisoformat(raw)
    if isinstance(like, (dict, list)):
        return json.loads(raw)
    return raw
