"""``d365sync spec check --live``: an entity file against both live systems.

The file is loaded with a catalog built from live metadata (so every unknown table or column is
named as the loader names it), then checked for what only the live systems can tell:

* each paired column's types fit (or a transform converts them), and a narrower side is guarded by
  a ``max_length`` expectation (or a transform with ``max_length``) so a long value is dead-lettered
  before the write instead of failing it;
* the Dynamics key is an alternate key and its index is ``Active``;
* change tracking is on when the entity reads Dynamics by delta;
* the ERP cursor column leads an index, so a change read seeks instead of scanning;
* a create can succeed: Dynamics' required columns and the ERP's NOT NULL columns are filled.

Every :class:`Problem` names where, what, and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d365sync.onboard.match import describe_dynamics, describe_erp, is_date8, type_factor
from d365sync.onboard.metadata import STRING_TYPES, DvTable, ErpColumn, ErpTable


@dataclass(frozen=True)
class Problem:
    where: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}\n    fix: {self.fix}"


@dataclass(frozen=True)
class Live:
    """Live metadata for one entity: its two tables and every Dynamics table its lookups name."""

    dynamics: Mapping[str, DvTable]
    erp: ErpTable


def live_catalog(live: Live) -> Any:
    """A :class:`~d365sync.spec.Catalog` of what the systems hold, for :func:`load_entity`."""
    from d365sync.erp.spec import Column, ColumnType, TableSpec
    from d365sync.spec import Catalog, DynamicsColumnInfo, DynamicsTableInfo

    dynamics = {
        t.logical_name: DynamicsTableInfo(
            t.logical_name,
            t.entity_set,
            t.primary_id,
            {a.name: DynamicsColumnInfo(a.name, bool(a.targets), a.targets) for a in t.attributes.values()},
            tuple(k.attributes for k in t.keys),
        )
        for t in live.dynamics.values()
    }
    types = {
        "char": ColumnType.CHAR,
        "varchar": ColumnType.VARCHAR,
        "decimal": ColumnType.DECIMAL,
        "integer": ColumnType.INTEGER,
        "timestamp": ColumnType.TIMESTAMP,
    }

    def column(c: ErpColumn) -> Any:
        kind = ColumnType.DATE8 if is_date8(c) else types.get(c.kind, ColumnType.VARCHAR)
        if kind == ColumnType.DECIMAL:
            precision, scale = c.digits
            return Column(name=c.name, type=kind, precision=precision or 38, scale=scale or 0)
        length = c.size if kind in (ColumnType.CHAR, ColumnType.VARCHAR) else None
        return Column(name=c.name, type=kind, length=min(length or 8000, 8000) if length else None)

    erp = live.erp
    table = TableSpec(
        name=erp.name,
        columns=tuple(column(c) for c in erp.columns.values()),
        key=erp.primary_key,
        status_column=status_column(erp),
    )
    return Catalog(dynamics, {erp.name: table})


def status_column(erp: ErpTable) -> str | None:
    """The record-status flag a deactivation sets: a one-character column named like one (the
    catalog cannot say which column means "inactive", so the name decides, STATUS first)."""
    flags = [c.name for c in erp.columns.values() if c.kind in ("char", "varchar") and c.size == 1]
    for name in ("STATUS", "REC_STATUS", "RECORD_STATUS", "ACTIVE_FLAG", "STATUS_CODE"):
        if name in flags:
            return name
    return None


def check(path: Path, read: Callable[[str, str, tuple[str, ...]], Live]) -> list[Problem]:
    """Every problem of one entity file; ``read(dynamics_table, erp_table, lookup_tables)`` fetches
    the live metadata. An empty list means the file is ready to sync."""
    from d365sync.spec import SpecError, load_entity, merge_defaults, read_defaults, read_yaml

    raw = merge_defaults(read_defaults(path.parent), read_yaml(path, path.stem))
    problems = list(_undecided(raw))
    if problems:
        return problems
    dv_table = str((raw.get("dynamics") or {}).get("table"))
    erp_table = str((raw.get("erp") or {}).get("table"))
    lookups = tuple(sorted({str(lk.get("dynamics_table")) for lk in (raw.get("lookups") or {}).values()}))
    try:
        live = read(dv_table, erp_table, lookups)
    except LookupError as exc:
        return [Problem(path.name, str(exc), "check the table's name in the entity file against the system")]
    try:
        spec = load_entity(path, catalog=live_catalog(live))
    except SpecError as exc:
        return [Problem(path.name, issue.split(": ", 1)[-1], _spec_fix(issue)) for issue in exc.issues]
    return list(_live_problems(spec, live))


def _undecided(raw: Mapping[str, Any]) -> Iterator[Problem]:
    for name, body in (raw.get("fields") or {}).items():
        if isinstance(body, Mapping) and str(body.get("owner")).upper() == "TODO":
            yield Problem(
                f"field {name!r}",
                "ownership is not decided yet (owner: TODO from the scaffold)",
                "set owner to dynamics, erp or both (both also needs conflict: {policy: …, winner: …})",
            )


def _spec_fix(issue: str) -> str:
    if "unknown" in issue and "column" in issue:
        return "use a column the table has (the message lists near names), or drop the field"
    if "alternate key" in issue:
        return "create the alternate key in Dataverse (Tables > … > Keys) or key on one that exists"
    return "edit the entity file as the message says"


def _live_problems(spec: Any, live: Live) -> Iterator[Problem]:
    dv, erp = live.dynamics[spec.dynamics.table], live.erp
    yield from _key_problems(spec, dv)
    yield from _tracking_problems(spec, dv, erp)
    guarded = {
        side: {x.column: x.max for x in getattr(spec.validation, side) if x.type == "max_length"}
        for side in ("dynamics", "erp")
    }
    for f in spec.fields.values():
        if f.dynamics is None or f.erp is None or f.dynamics not in dv.attributes or f.erp not in erp.columns:
            continue
        yield from _pair_problems(f, dv.attributes[f.dynamics], erp.columns[f.erp], guarded)
    yield from _create_problems(spec, dv, erp)


def _key_problems(spec: Any, dv: DvTable) -> Iterator[Problem]:
    key = dv.key_on(spec.dynamics.key)
    if key is not None and key.status != "Active":
        yield Problem(
            "dynamics.key",
            f"the alternate key {key.name} on {dv.logical_name} is {key.status}, not Active: "
            "upserts by it fail until Dataverse has built its index",
            "wait for the index job; a Failed key usually means duplicate values: clean them, "
            "then reactivate the key (Tables > Keys)",
        )


def _tracking_problems(spec: Any, dv: DvTable, erp: ErpTable) -> Iterator[Problem]:
    if spec.dynamics.change_detection.mode == "delta" and not dv.change_tracking:
        yield Problem(
            "dynamics.change_detection",
            f"delta reads need change tracking, and it is off on {dv.logical_name}",
            f"turn on Track changes for {dv.logical_name} (table properties, or ChangeTrackingEnabled in "
            "EntityDefinitions), or use {mode: cursor, column: modifiedon}",
        )
    cd = spec.erp.change_detection
    if cd.mode == "cursor" and not erp.leads_an_index(cd.column):
        cols = ", ".join([cd.column, *spec.erp.key])
        yield Problem(
            "erp.change_detection",
            f"no index of {erp.name} starts with the cursor column {cd.column}: "
            "every change read scans the table",
            f"CREATE INDEX IX_{erp.name}_{cd.column} ON {erp.name} ({cols})",
        )


def _pair_problems(
    f: Any, attr: Any, col: ErpColumn, guarded: Mapping[str, Mapping[str, int]]
) -> Iterator[Problem]:
    where = f"field {f.name!r}"
    pair = f"Dynamics {attr.name} ({describe_dynamics(attr)}) and ERP {col.name} ({describe_erp(col)})"
    converted = bool(f.to_erp or f.to_dynamics or f.from_erp or f.from_dynamics)
    if type_factor(col, attr) == 0 and not converted:
        yield Problem(
            where, f"{pair} do not fit", "pair another column, or add a transform that converts them"
        )
        return
    if (
        attr.type not in STRING_TYPES
        or col.kind not in ("char", "varchar")
        or not col.size
        or not attr.max_length
    ):
        return
    directions = (
        ("to_erp", "dynamics", attr.name, col.size, attr.max_length),
        ("to_dynamics", "erp", col.name, attr.max_length, col.size),
    )
    for way, source, column, room, longest in directions:
        flows = f.owner in ("both", "dynamics" if way == "to_erp" else "erp")
        if not flows or longest <= room:
            continue
        limit = guarded[source].get(column)
        if limit is not None and limit <= room:
            continue
        if _chain_limit(getattr(f, way)) is not None and _chain_limit(getattr(f, way)) <= room:
            continue
        target = "ERP " + col.name if way == "to_erp" else "Dynamics " + attr.name
        yield Problem(
            where,
            f"{source.capitalize()} {column} holds up to {longest} characters, {target} only {room}: "
            "a longer value would fail its write",
            f"add {{type: max_length, column: {column}, max: {room}}} to validation.{source} (the record is "
            "dead-lettered with the rule named), or a transform that shortens it",
        )


def _chain_limit(chain: Any) -> int | None:
    limits = [int(s.args["max_length"]) for s in chain or () if s.args.get("max_length")]
    return min(limits) if limits else None


def _create_problems(spec: Any, dv: DvTable, erp: ErpTable) -> Iterator[Problem]:
    dv_mapped = {f.dynamics for f in spec.fields.values()}
    erp_mapped = {f.erp for f in spec.fields.values()} | set(spec.erp.create_values)
    if spec.creates.to_dynamics:
        for attr in dv.attributes.values():
            if attr.required and attr.business and attr.name not in dv_mapped:
                yield Problem(
                    "creates.to_dynamics",
                    f"{dv.logical_name}.{attr.name} is required on create, and no field maps it",
                    f"map {attr.name} in a field, or set creates.to_dynamics: false",
                )
    if spec.creates.to_erp:
        for col in erp.columns.values():
            ours = col.name in erp_mapped or col.name in erp.primary_key
            if not col.nullable and not ours and not col.has_default:
                yield Problem(
                    "creates.to_erp",
                    f"{erp.name}.{col.name} is NOT NULL, and no field or create value fills it",
                    f"map {col.name} in a field, add it to erp.create_values, or set creates.to_erp: false",
                )
