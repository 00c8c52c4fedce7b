"""Masking of personal data and credentials: the one module every other part goes through.

Why: the audit log, error texts (dead letters, reviews, parked children), XCom manifests, task
logs, CLI output, alerts, Data Docs and the UI's viewer pages must show *that* an e-mail or phone
was involved and roughly which, so an operator can recognise a record, without any of them
becoming a copy of customer data or of a secret. Fields are recognised by name (email, phone,
mobile, fax, telephone) and values by shape, so a mapping that names a column oddly is still
masked; free text (an error message, a name holding an address) is searched for e-mails,
phones and credential fragments anywhere in it.

Keep every masking rule here (a duplicate-code check runs over the project): callers use
:func:`mask_value` (one field's value), :func:`mask_any` (a value of any shape),
:func:`mask_text` (free text) or :func:`redact_secrets` (credentials only).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from functools import lru_cache
from typing import Any, Final

_EMAIL_FIELD: Final = re.compile(r"e_?mail", re.IGNORECASE)
_PHONE_FIELD: Final = re.compile(r"phone|mobile|fax|tel(?!ler)", re.IGNORECASE)
_EMAIL_VALUE: Final = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE_VALUE: Final = re.compile(r"^\+?[\d\s().\-/]{7,}$")

# An e-mail anywhere in text. The local part may be quoted ("john doe"@example.com, 'a.b'@x.org:
# RFC 5321 quoted strings, and what a repr of such a value looks like) or a dot-atom with any of
# RFC 5322's atom characters; the domain has at least one dot.
_ATOM: Final = r"[\w.!#$%&+/=?^`{|}~\-]+"  # RFC 5322 atom characters but "*", the mask's own
EMAIL_IN_TEXT: Final = re.compile(
    rf"(?:\"[^\"\r\n@]{{1,64}}\"|'[^'\r\n@]{{1,64}}'|{_ATOM}(?:'{_ATOM})*)@[\w\-]+(?:\.[\w\-]+)+"
)
# A phone anywhere in text: international (+44 20 7946 0958, 0044 20 …), national with a trunk 0
# and at least one separator (030 1234567, (030) 123-4567), North American (555-123-4567).
# Bare digit runs are left alone: they are record keys, amounts and dates far more often.
PHONE_IN_TEXT: Final = re.compile(
    r"(?<![\w+])(?<!\d[\-/.:])"  # not inside a word, a number or a date
    r"(?!\d{1,4}[.\-/]\d{1,2}[.\-/]\d{1,4}(?!\d))"  # 2024-05-01, 01.05.2024: dates
    r"(?:"
    r"\+\s?\d[\d\s().\-/]{5,}\d"
    r"|00\d{1,3}[\s.\-/]\d[\d\s().\-/]{4,}\d"
    r"|\(0\d{1,5}\)\s?\d[\d\s.\-/]{3,}\d"
    r"|0\d{1,5}[\s.\-/]\d[\d\s.\-/]{3,}\d"
    r"|\(?\d{3}\)?[\s.\-]\d{3}[\s.\-]\d{2,4}"
    r")(?![\w:]|\.\d)"
)
# Credentials in connection strings, URLs, JSON, config lines and error messages:
# PWD=…, Password: …, "client_secret": "…", AccountKey=…, SharedAccessKey=…, sig=…, token=…
_SECRET_NAME: Final = (
    r"\b[\w.\-]*?(?:passw(?:or)?d|pwd|pass|secret|token|sig(?:nature)?|credentials?|"
    r"(?:account|access|shared[_\-]?access|api|private|sas|storage|subscription)[_\-]?key)"
    r"|\b(?:uid|user(?:name)?|login)\b"
)
_SECRET_VALUE: Final = r"\"[^\"\r\n]*\"|'[^'\r\n]*'|\{(?:[^}]|\}\})*\}|[^\s;&,\"'<>)\]}]+"
# Each pattern with the words of which it needs one (lower case) to match at all: texts
# without any skip the pattern, which costs tens of microseconds a text (issue 14: every
# quarantined record's error is masked). The check holds for ASCII text only: case-insensitive
# matching folds a few other letters to ASCII ones (the Kelvin sign to "k"), so any other text
# always runs the pattern.
_SECRETS: Final[tuple[tuple[re.Pattern[str], str, tuple[str, ...]], ...]] = (
    # URL userinfo, with or without a scheme: https://user:pass@host, user:pass@host
    (
        re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)?[^\s:/@\"'<>]+:[^\s/@\"'<>]+@(?=[\w\[])"),
        r"\1***:***@",
        ("@",),
    ),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{4,}"), r"\1 ***", ("bearer", "basic")),
    (
        re.compile(rf"(?i)(?P<name>{_SECRET_NAME})(?P<sep>[\"']?\s*[=:]\s*)(?:{_SECRET_VALUE})"),
        r"\g<name>\g<sep>***",
        ("pass", "pwd", "secret", "token", "sig", "credential", "key", "uid", "user", "login"),
    ),
)


def mask_value(field: str, value: Any) -> Any:
    """Mask e-mails (``j***@e***.com``) and phones (``+33 *** *** 12``); pass other values through."""
    if not isinstance(value, str) or not value:
        return value
    kind = _field_kind(field)
    if kind == "email" or ("@" in value and _EMAIL_VALUE.match(value)):
        return mask_email(value)
    if kind == "phone" or (len(value) >= 7 and _PHONE_VALUE.match(value)):
        return mask_phone(value)
    return value


@lru_cache(maxsize=4096)
def _field_kind(field: str) -> str | None:
    """What a field's name says it holds (asked once per name: the audit masks every value)."""
    return "email" if _EMAIL_FIELD.search(field) else "phone" if _PHONE_FIELD.search(field) else None


def mask_any(field: str, value: Any, *, by_shape: bool = True, personal: Collection[str] = ()) -> Any:
    """A value of any shape with every e-mail, phone and credential in it masked.

    A string is masked as ``field``'s value (:func:`mask_value`: by the field's name and, with
    ``by_shape``, by the whole value's shape), else searched as free text (:func:`mask_text`).
    Error texts pass ``by_shape=False``: a bare digit run (a date, an amount) in a field that
    is not personal stays readable there. A field in ``personal`` (the spec's ``pii: true``
    columns: names, streets) that is no e-mail or phone keeps its first letter and its length
    (:func:`mask_personal`). Dicts are masked by their own keys, lists and tuples item by item;
    other values pass through.
    """
    if isinstance(value, dict):
        return {k: mask_any(str(k), v, by_shape=by_shape, personal=personal) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_any(field, v, by_shape=by_shape, personal=personal) for v in value]
    if isinstance(value, str) and field in personal:
        masked = mask_value(field, value)
        return masked if masked != value else mask_personal(value)
    if isinstance(value, str):
        masked = mask_value(field, value) if by_shape or personal_field(field) else value
        return mask_text(masked) if masked == value else masked
    return value


def mask_personal(value: Any) -> Any:
    """A personal value that is no e-mail or phone (a name, a street): ``N*** (84 chars)``, enough
    to recognise a length or blank problem without showing the value."""
    if not isinstance(value, str) or not value:
        return value
    return f"{value[:1]}*** ({len(value)} chars)"


def personal_field(field: str) -> bool:
    """Whether a field's name says it holds an e-mail or a phone number."""
    return _field_kind(field) is not None


def mask_email(value: str) -> str:
    """Keep the first letter of the local part and of the domain, and the top-level domain."""
    local, _, domain = value.strip().rpartition("@")
    local = local.strip("\"'")
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


def redact_secrets(text: str) -> str:
    """Replace credential values (``PWD=…``, ``Password: …``, ``AccountKey=…``, URL userinfo…) by ``***``."""
    lower = text.lower() if text.isascii() else None
    for pattern, replacement, needs in _SECRETS:
        if lower is None or any(word in lower for word in needs):
            text = pattern.sub(replacement, text)
    return text


def mask_text(text: str | None) -> str:
    """Free text (an error, a reason, a comment) with credentials, e-mails and phones masked.

    Record keys, field names and rule names stay readable: only credential values, e-mail
    addresses and phone-shaped digit groups change.
    """
    if not text:
        return text or ""
    text = redact_secrets(text)
    if "@" in text:  # the pattern needs one, and is slow to find that out on a long text
        text = EMAIL_IN_TEXT.sub(lambda m: mask_email(m.group(0)), text)
    return PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group(0)), text)


def mask_key(key: str) -> str:
    """Record keys: an e-mail used as a key is masked; numeric keys stay searchable."""
    if _EMAIL_VALUE.match(key):
        return mask_email(key)
    return mask_phone(key) if key.startswith("+") else key
