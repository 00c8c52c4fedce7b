"""``d365sync entity scaffold``: draft an entity file from both systems' live metadata.

The draft pairs the keys (a Dataverse alternate key with the ERP primary key), pairs columns by
name and type with a score, suggests transforms from the types (trim for CHAR, e-mail, decimal
scale, legacy CHAR(8) dates), adds the validation that the narrower side needs, and leaves every
decision that needs a human as ``# TODO``: above all who owns each field (``owner: TODO`` does not
load until it is set). ``d365sync spec check --live`` then verifies the edited file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from d365sync.onboard.match import (
    ERP_WORDS,
    PAIR_THRESHOLD,
    describe_dynamics,
    describe_erp,
    erp_words,
    is_date8,
    is_email,
    name_score,
    pair_score,
)
from d365sync.onboard.metadata import STRING_TYPES, DvAttribute, DvTable, ErpColumn, ErpTable

_CURSOR_WORDS = ("LAST_UPD", "UPDATED", "MODIFIED", "CHANGED", "LAST_CHANGE", "UPD_TS", "CHG")
_VERSION_WORDS = ("ROW_VER", "VERSION", "ROWVERSION")
_PII_WORDS = ("name", "email", "phone", "address", "street", "city", "postcode", "zip", "birth", "mobile")
EMAIL_REGEX = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
OWNER_TODO = "TODO"
CURRENCY_LOOKUP = "transactioncurrencyid"


@dataclass(frozen=True)
class Pair:
    erp: ErpColumn
    dv: DvAttribute
    score: float

    @property
    def field_name(self) -> str:
        return field_name(self.erp.name)


@dataclass
class Draft:
    """What the scaffold found; :func:`render` turns it into the entity file."""

    name: str
    dv: DvTable
    erp: ErpTable
    key: Pair
    pairs: list[Pair]
    cursor: str | None
    version: str | None
    unmatched_erp: list[ErpColumn] = field(default_factory=list)
    unmatched_dv: list[DvAttribute] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def field_name(erp_column: str) -> str:
    """``CONTACT_NO`` → ``contact_number``: the ERP name, lower case, abbreviations spelled out."""
    return "_".join(ERP_WORDS.get(t, t) for t in erp_column.lower().split("_") if t)


def _special(erp: ErpTable, words: tuple[str, ...], kinds: tuple[str, ...]) -> str | None:
    for col in erp.columns.values():
        if col.kind in kinds and any(w in col.name.upper() for w in words):
            return col.name
    return None


def draft(dv: DvTable, erp: ErpTable, name: str) -> Draft:
    """Pair keys and columns (greedy by score, one to one, at least :data:`PAIR_THRESHOLD`)."""
    notes: list[str] = []
    cursor = _special(erp, _CURSOR_WORDS, ("timestamp",))
    version = _special(erp, _VERSION_WORDS, ("integer",))
    key = _key_pair(dv, erp, notes)
    taken_erp = {key.erp.name, cursor, version}
    taken_dv = {key.dv.name}
    candidates = sorted(
        (
            Pair(col, attr, pair_score(col, attr))
            for col in erp.columns.values()
            if col.name not in taken_erp
            for attr in dv.attributes.values()
            if attr.business and attr.name not in taken_dv
        ),
        key=lambda p: (-p.score, p.erp.name, p.dv.name),
    )
    pairs: list[Pair] = []
    for pair in candidates:
        if pair.score < PAIR_THRESHOLD:
            break
        if pair.erp.name in taken_erp or pair.dv.name in taken_dv:
            continue
        pairs.append(pair)
        taken_erp.add(pair.erp.name)
        taken_dv.add(pair.dv.name)
    currency = _currency_pair(dv, erp, taken_dv, taken_erp)
    if currency is not None:
        pairs.append(currency)
        taken_erp.add(currency.erp.name)
        taken_dv.add(currency.dv.name)
    order = list(erp.columns)
    pairs.sort(key=lambda p: order.index(p.erp.name))
    return Draft(
        name=name,
        dv=dv,
        erp=erp,
        key=key,
        pairs=pairs,
        cursor=cursor,
        version=version,
        unmatched_erp=[c for c in erp.columns.values() if c.name not in taken_erp],
        unmatched_dv=[a for a in dv.attributes.values() if a.business and a.name not in taken_dv],
        notes=notes,
    )


def _currency_pair(dv: DvTable, erp: ErpTable, taken_dv: set[Any], taken_erp: set[Any]) -> Pair | None:
    """A legacy currency code column ↔ Dataverse's transactioncurrency lookup: the one lookup the
    shared defaults already resolve (``lookups.currency``), so it can be paired without a human."""
    lookup = dv.attributes.get(CURRENCY_LOOKUP)
    if lookup is None or CURRENCY_LOOKUP in taken_dv:
        return None
    for col in erp.columns.values():
        if (
            col.name not in taken_erp
            and col.kind in ("char", "varchar")
            and "currency" in erp_words(col.name)
        ):
            return Pair(col, lookup, 1.0)
    return None


def _key_pair(dv: DvTable, erp: ErpTable, notes: list[str]) -> Pair:
    if not erp.primary_key:
        raise ValueError(f"ERP table {erp.name} has no primary key: the sync needs one to pair records")
    if len(erp.primary_key) > 1:
        notes.append(
            f"TODO: {erp.name}'s primary key has {len(erp.primary_key)} columns "
            f"({', '.join(erp.primary_key)}); the draft pairs the first. A grouped entity "
            "(erp.grouped) or a single-column unique key may fit better."
        )
    col = erp.columns[erp.primary_key[0]]
    keyed = [
        dv.attributes[k.attributes[0]]
        for k in dv.keys
        if len(k.attributes) == 1 and k.attributes[0] in dv.attributes
    ]
    pool = keyed or [a for a in dv.attributes.values() if a.business and a.type in STRING_TYPES]
    if not pool:
        raise ValueError(
            f"Dynamics table {dv.logical_name} has no alternate key and no text column to key on"
        )
    best = max(pool, key=lambda a: (name_score(col.name, a.name, a.custom), a.name))
    if not keyed:
        notes.append(
            f"TODO: {dv.logical_name} has no alternate key; the draft keys on {best.name}. "
            f"Create an alternate key on {best.name} (Power Apps: Tables > {dv.logical_name} > Keys) "
            "before the first sync: upserts address records by it."
        )
    return Pair(col, best, name_score(col.name, best.name, best.custom))


# ----------------------------------------------------------------------------- rendering
def _flow(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
        .strip()
        .removesuffix("...")
        .strip()
    )


def chains(pair: Pair, is_key: bool = False) -> dict[str, list[Any]]:
    """Transforms suggested from the types; a direction's inverse comes from the engine."""
    erp, dv = pair.erp, pair.dv
    if is_email(erp, dv) and dv.type in STRING_TYPES:
        return {
            "to_erp": [{"email": {"max_length": erp.size}}],
            "to_dynamics": [{"email": {"max_length": dv.max_length or erp.size}}],
        }
    if is_date8(erp) and dv.type == "DateTime":
        return {
            "to_erp": [{"date": {"format": "yyyymmdd"}}],
            "to_dynamics": [{"date": {"format": "iso_datetime_utc"}}],
        }
    if dv.name == CURRENCY_LOOKUP:  # legacy code ↔ ISO code ↔ the currency record (shared defaults)
        return {
            "to_erp": [{"currency": {"to": "legacy"}}],
            "to_dynamics": [{"lookup": {"target": "currency", "to": "bind"}}],
        }
    if is_key and erp.kind in ("char", "varchar"):
        return {"to_erp": ["trim"], "to_dynamics": ["trim"]}
    if erp.kind == "char":  # the database pads CHAR: blanks in, blanks trimmed out
        return {"to_erp": ["trim", {"pad": {"width": erp.size}}], "to_dynamics": ["trim"]}
    if erp.kind == "decimal" and dv.type in ("Decimal", "Money"):
        scale = erp.digits[1] or 0
        return {"to_erp": [{"decimal": {"scale": scale}}], "to_dynamics": [{"decimal": {"scale": scale}}]}
    return {}


def _pii(pair: Pair) -> bool:
    words = pair.field_name.replace("_", "")
    return any(w in words for w in _PII_WORDS)


def _narrower(pair: Pair) -> tuple[str, int] | None:
    """(side whose validation needs a max_length, limit) when one side holds fewer characters."""
    erp_len, dv_len = pair.erp.size, pair.dv.max_length
    if (
        pair.erp.kind not in ("char", "varchar")
        or pair.dv.type not in STRING_TYPES
        or not erp_len
        or not dv_len
    ):
        return None
    if erp_len < dv_len:
        return "dynamics", erp_len
    if dv_len < erp_len:
        return "erp", dv_len
    return None


def _validation(d: Draft) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(side, rule, comment) in the order the file lists them."""
    for side, column in (("dynamics", d.key.dv.name), ("erp", d.key.erp.name)):
        yield side, {"type": "not_null", "column": column}, ""
        yield side, {"type": "unique", "column": column}, ""
    for pair in [d.key, *d.pairs]:
        narrow = _narrower(pair)
        if narrow is not None:
            side, limit = narrow
            column = pair.dv.name if side == "dynamics" else pair.erp.name
            other = f"ERP {pair.erp.name}" if side == "dynamics" else f"Dynamics {pair.dv.name}"
            yield side, {"type": "max_length", "column": column, "max": limit}, f"{other} holds {limit}"
        if is_email(pair.erp, pair.dv):
            yield "dynamics", {"type": "regex", "column": pair.dv.name, "regex": EMAIL_REGEX}, ""
            yield "erp", {"type": "regex", "column": pair.erp.name, "regex": EMAIL_REGEX}, ""
    for pair in d.pairs:
        if pair.dv.required:
            yield (
                "erp",
                {"type": "not_null", "column": pair.erp.name},
                f"{pair.dv.name} is required in Dynamics",
            )


def render(d: Draft, command: str) -> str:
    """The entity file: valid YAML that loads once every ``owner: TODO`` is decided."""
    out = [
        f"# Drafted by `{command}` from live metadata.",
        "# Decide every TODO (above all each field's owner), then run `d365sync spec check --live`.",
        "description: >-",
        f"  {d.name}: Dynamics {d.dv.logical_name} ↔ ERP {d.erp.name}",
        "  (a draft: describe who creates, owns and edits what).",
        "",
        "dynamics:",
        f"  table: {d.dv.logical_name}",
        f"  entity_set: {d.dv.entity_set}",
        f"  key: {d.key.dv.name}" + _key_comment(d),
    ]
    if not d.dv.change_tracking:
        out.append(
            "  change_detection: {mode: cursor, column: modifiedon}  "
            f"# TODO: change tracking is off on {d.dv.logical_name}; turn it on for delta reads"
        )
    out += [
        "erp:",
        f"  table: {d.erp.name}",
        f"  key: {_flow(list(d.erp.primary_key)) if len(d.erp.primary_key) > 1 else d.key.erp.name}",
    ]
    if d.cursor is None:
        out.append(
            "  change_detection: {mode: snapshot}  # no timestamp column: each run diffs the whole table"
        )
    else:
        indexed = "" if d.erp.leads_an_index(d.cursor) else f"  # TODO: no index starts with {d.cursor}"
        out.append(f"  change_detection: {{mode: cursor, column: {d.cursor}, overlap_seconds: 300}}{indexed}")
    out += [
        "",
        f"key: {d.key.field_name}",
        "# TODO: may a record that is new on one side be created on the other? (false: never)",
        "creates: {to_erp: true, to_dynamics: true}",
        "# deletes: {to_erp: ignore, to_dynamics: ignore}  (the default; deactivate or delete instead?)",
        "",
        "fields:",
    ]
    out += _field_lines(d.key, d, is_key=True)
    for pair in d.pairs:
        out += _field_lines(pair, d)
    out += _unmatched_lines(d)
    out += ["", "validation:"]
    for side in ("dynamics", "erp"):
        out.append(f"  {side}:")
        for rule_side, rule, comment in _validation(d):
            if rule_side == side:
                out.append(f"    - {_flow(rule)}" + (f"  # {comment}" if comment else ""))
    out += [f"# {note}" for note in d.notes]
    return "\n".join(out) + "\n"


def _key_comment(d: Draft) -> str:
    key = d.dv.key_on(d.key.dv.name)
    return f"  # alternate key {key.name} ({key.status})" if key else "  # TODO: not an alternate key yet"


def _field_lines(pair: Pair, d: Draft, is_key: bool = False) -> list[str]:
    lines = [f"  {pair.field_name}:"]
    if is_key:
        lines += [
            "    description: The key on both sides.",
            "    owner: both  # the key: both sides hold it; the ERP's number wins a tie",
        ]
    else:
        lines.append(f"    owner: {OWNER_TODO}  # dynamics | erp | both (both also needs conflict.winner)")
        if _pii(pair):
            lines.append("    pii: true  # TODO: personal data? (guessed from the name)")
    lines += [
        f"    dynamics: {pair.dv.name}  # {describe_dynamics(pair.dv)}",
        f"    erp: {pair.erp.name}  # {describe_erp(pair.erp)}; match {pair.score:.2f}",
    ]
    for way, chain in chains(pair, is_key).items():
        lines.append(f"    {way}: {_flow(chain)}")
    if pair.dv.type == "Picklist":
        lines.append("    # TODO: a code ↔ a choice: add a value map (see payment_terms in customers.yaml)")
    if pair.dv.type == "DateTime" and pair.erp.kind == "timestamp":
        lines.append("    # TODO: a timestamp ↔ a date and time: which time zone does the ERP keep?")
    if is_key:
        lines.append("    conflict: {policy: owner_wins, winner: erp}")
    return lines


def _unmatched_lines(d: Draft) -> list[str]:
    lines = []
    if d.unmatched_erp:
        lines.append("  # Not paired (map by hand, or leave out):")
        for col in d.unmatched_erp:
            lines.append(f"  #   ERP {col.name} {describe_erp(col)}{_hint(col, d)}")
    if d.unmatched_dv:
        shown = ", ".join(f"{a.name} ({describe_dynamics(a)})" for a in d.unmatched_dv)
        lines.append(f"  #   Dynamics: {shown}")
    return lines


def _hint(col: ErpColumn, d: Draft) -> str:
    lookups = [a for a in d.dv.attributes.values() if a.targets and a.business]
    if lookups and col.name.upper().endswith(("_NO", "_ID", "_CODE")):
        names = ", ".join(a.name for a in lookups)
        return f": a reference? Dynamics lookups {names} need a `lookups:` entry (see orders.yaml)"
    return ""
