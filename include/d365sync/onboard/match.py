"""How a Dataverse column and an ERP column relate: name similarity, type compatibility, lengths.

Shared by the scaffold (which proposes pairs) and the live check (which judges the pairs a spec
names), so both reason about a pair the same way.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from d365sync.onboard.metadata import LOOKUP_TYPES, NUMBER_TYPES, STRING_TYPES, DvAttribute, ErpColumn

# ERP abbreviations → the word Dataverse spells out (token by token: CUST_NO → customer number).
ERP_WORDS = {
    "no": "number",
    "nbr": "number",
    "num": "number",
    "addr": "address",
    "descr": "description",
    "desc": "description",
    "qty": "quantity",
    "amt": "amount",
    "curr": "currency",
    "cust": "customer",
    "tel": "phone",
    "telephone": "phone",
    "mail": "email",
    "fname": "firstname",
    "lname": "lastname",
}
# Dataverse spellings → the same canonical words.
_DV_WORDS = (("emailaddress", "email"), ("telephone", "phone"))
_PUBLISHER = re.compile(r"^[a-z][a-z0-9]{1,7}_")  # new_, cr3a1_: a custom column's publisher prefix
_DATE_WORDS = ("DATE", "_DT", "DOB")
PAIR_THRESHOLD = 0.6
_EMAIL = "email"


def erp_words(name: str) -> str:
    """``EMAIL_ADDR`` → ``email``; ``PHONE_NO`` → ``phonenumber``; ``CONTACT_NO`` → ``contactnumber``."""
    tokens = [ERP_WORDS.get(t, t) for t in name.lower().split("_") if t]
    return _canonical("".join(tokens))


def dynamics_words(name: str, custom: bool = False) -> str:
    """``emailaddress1`` → ``email``; ``new_contactnumber`` → ``contactnumber``; ``address1_city`` →
    ``addresscity``."""
    name = name.lower()
    if custom:
        name = _PUBLISHER.sub("", name)
    return _canonical(re.sub(r"[\d_]", "", name))


def _canonical(text: str) -> str:
    text = re.sub(r"\d", "", text)
    for long, short in _DV_WORDS:
        text = text.replace(long, short)
    return text.replace("emailaddress", _EMAIL)


def name_score(erp: str, dynamics: str, custom: bool = False) -> float:
    """0..1: equal canonical words score 1; one ending or starting the other (``city`` in
    ``addresscity``) 0.85; otherwise the difflib ratio."""
    a, b = erp_words(erp), dynamics_words(dynamics, custom)
    if a == b:
        return 1.0
    short, long = sorted((a, b), key=len)
    if len(short) >= 4 and (long.endswith(short) or long.startswith(short)):
        return 0.85
    if len(b) >= 4 and b in _token_runs(erp):  # CUST_EMAIL_ID holds the word email
        return 0.8
    return round(SequenceMatcher(None, a, b).ratio(), 2)


def _token_runs(erp: str) -> set[str]:
    """Every run of consecutive ERP words, spelled out: CUST_EMAIL_ID → customer, email, customeremail …"""
    tokens = [ERP_WORDS.get(t, t) for t in erp.lower().split("_") if t]
    return {
        _canonical("".join(tokens[i:j])) for i in range(len(tokens)) for j in range(i + 1, len(tokens) + 1)
    }


def is_date8(col: ErpColumn) -> bool:
    """A legacy CHAR(8) date (``YYYYMMDD``): recognised by width and name."""
    return (
        col.kind in ("char", "varchar") and col.size == 8 and any(w in col.name.upper() for w in _DATE_WORDS)
    )


def type_factor(erp: ErpColumn, dv: DvAttribute) -> float:
    """How well the types fit: 1 a natural pair, 0.6 convertible (a code to a choice), 0 not at all.
    Lookups are never paired by type: they need a ``lookups:`` entry."""
    kind, t = erp.kind, dv.type
    if t in LOOKUP_TYPES:
        return 0.0
    if t == "DateTime":
        return 1.0 if kind in ("timestamp", "date") or is_date8(erp) else 0.0
    if kind in ("char", "varchar"):
        if is_date8(erp):
            return 0.0
        if t in STRING_TYPES:
            return 1.0
        return 0.6 if t in ("Picklist", "Boolean") else 0.0
    if kind == "decimal":
        return 1.0 if t in ("Decimal", "Money") else 0.8 if t in NUMBER_TYPES else 0.0
    if kind == "integer":
        return (
            1.0
            if t in ("Integer", "BigInt")
            else 0.8
            if t in NUMBER_TYPES
            else 0.6
            if t == "Picklist"
            else 0.0
        )
    if kind == "float":
        return 1.0 if t == "Double" else 0.8 if t in NUMBER_TYPES else 0.0
    return 0.0


def pair_score(erp: ErpColumn, dv: DvAttribute) -> float:
    return round(name_score(erp.name, dv.name, dv.custom) * type_factor(erp, dv), 2)


def is_email(erp: ErpColumn, dv: DvAttribute) -> bool:
    return _EMAIL in erp_words(erp.name) and _EMAIL in dynamics_words(dv.name, dv.custom)


def describe_erp(col: ErpColumn) -> str:
    """``VARCHAR(40)``, ``DECIMAL(15,2)``, ``TIMESTAMP`` — the column as a DBA would say it."""
    if col.kind in ("char", "varchar"):
        return f"{col.kind.upper()}({col.size})"
    if col.kind == "decimal":
        precision, scale = col.digits
        return f"DECIMAL({precision},{scale or 0})"
    return col.kind.upper()


def describe_dynamics(attr: DvAttribute) -> str:
    if attr.type in STRING_TYPES and attr.max_length:
        return f"{attr.type}({attr.max_length})"
    if attr.targets:
        return f"{attr.type} → {', '.join(attr.targets)}"
    return attr.type
