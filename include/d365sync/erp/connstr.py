"""ODBC connection strings built by the ODBC quoting rules, never by plain concatenation.

A connection string is ``KEY=value;`` pairs, so a value holding ``;`` would end its attribute
and start another: a password ``x;SERVER=evil`` would redirect the connection (and the driver's
error would then name part of the password). ODBC lets a value be wrapped in braces, inside
which ``;`` is literal and ``}`` is written ``}}``. :func:`odbc_value` braces exactly the values
that need it (``;``, ``{``, ``}``, leading or trailing spaces), so ordinary strings stay as they
were; :func:`connection_string` applies it to every attribute and refuses attribute names that
could themselves break the string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# Characters ODBC reserves in attribute keywords (SQLDriverConnect), plus the separators.
_BAD_KEY = re.compile(r"[\[\]{}(),;?*=!@\t\r\n]")


def odbc_value(value: Any, *, braces: bool = False) -> str:
    """``value`` as an ODBC attribute value; ``braces=True`` braces it even when not needed."""
    text = str(value)
    if braces or any(ch in text for ch in ";{}") or text != text.strip():
        return "{" + text.replace("}", "}}") + "}"
    return text


def connection_string(attributes: Iterable[tuple[str, Any]]) -> str:
    """``KEY=value;…`` for every pair whose value is not empty; ``DRIVER`` is always braced."""
    parts = []
    for key, value in attributes:
        if value is None or value == "":
            continue
        if not key or key != key.strip() or _BAD_KEY.search(key):
            raise ValueError(f"ODBC attribute name {key!r} is not allowed (reserved characters)")
        parts.append(f"{key}={odbc_value(value, braces=key.upper() == 'DRIVER')};")
    return "".join(parts)
