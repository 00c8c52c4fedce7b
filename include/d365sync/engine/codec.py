"""The JSON codec of the sync state store and the staging files.

Why a module of its own: the state store, the staging files and the personal-data cipher
(:mod:`d365sync.engine.privacy`) all need the same exact round trip, and the cipher must not
import the store.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in the sync state")


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((tag, raw),) = obj.items()
        if tag == "$decimal":
            return Decimal(raw)
        if tag == "$datetime":
            return datetime.fromisoformat(raw)
        if tag == "$date":
            return date.fromisoformat(raw)
    return obj


_ENCODER = json.JSONEncoder(default=_default, separators=(",", ":"), sort_keys=True)


def encode(value: Any) -> str:
    """JSON that round-trips Decimal (scale kept), datetime and date exactly: bases compare equal."""
    return _ENCODER.encode(value)


def decode(text: str | None) -> Any:
    """Inverse of :func:`encode`; None stays None."""
    return None if text is None else json.loads(text, object_hook=_hook)
