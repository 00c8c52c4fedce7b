"""Three-way merge of one record's Dynamics and ERP values against the last synced base.

Why a three-way merge: comparing each side with the *base* (what both sides held after the
last sync) is the only way to know who changed what. It gives per-field ownership, conflict
policies and, for free, the loop guard: a value equal to the base is our own write coming
back (an echo) and produces no write, with no cooperation from either system.

Everything here is pure (no I/O, no clock) and Airflow-free. Values are canonical: the
transforms have already turned both sides into one representation (Decimal for money, ISO
strings or datetimes for dates), so plain ``==`` is the right comparison.

Semantics, in the order they apply (the reason strings in the output say which one fired):

* Tombstone: once a delete has been synced the record is closed; later changes are reported.
* Stale: a side whose modified timestamp (or numeric version) is older than the one recorded
  in the base is rejected as a whole, as if it had not been extracted.
* Delete: a deleted side triggers the entity's delete policy for that direction on the other
  side (deactivate | delete | ignore); a concurrent edit on the survivor is reported.
* Create: a record never synced and present on one side is created on the other if the
  entity's ``direction`` allows it, else reported. A record present on both sides but never
  synced (initial matching) is merged field by field against an empty base.
* Fields: only one side changed -> it wins if it may own the field; else revert or report
  (``on_foreign_change``). Both changed to the same value -> agreed, no write. Both changed
  differently -> the policy: ``manual_review`` parks; a single-owner field goes to its owner
  (an owned field never takes the non-owner's value, whatever the policy); for ``owner="both"``
  ``last_write_wins`` takes the newer side beyond ``skew_seconds`` and falls back to
  ``prefer`` inside it, ``owner_wins`` takes ``prefer``; with no ``prefer`` the field is parked.
* ``version`` policy: a change is accepted only if the *other* side has not moved the record
  since the last sync (its version/ETag still equals the version recorded in the base, or it
  carries no real change). Otherwise it is a version conflict, settled by
  ``on_version_conflict``: ``manual_review`` (default) parks it, ``owner_wins`` gives it to the
  owner (or ``prefer`` when the owner is "both"; parked if neither).
* Repair: a reconcile repair (``RecordInput.repair``) names the side(s) whose row reconcile
  found current while the base is not: that side is compared with the base by value only,
  never rejected as stale (a direct SQL fix keeps its old ``LAST_UPD`` and ``ROW_VER``); the
  base keeps the newer of its recorded and the row's timestamp/version, so staleness never
  moves backwards. Everything after staleness (ownership, policies, reviews) applies as usual.
* Review queue: a field with an open review item (``RecordInput.under_review``) stays parked
  while the sides disagree and either still differs from the base, so a parked conflict never resolves itself
  behind the reviewer's back (a version conflict would: once the other side's change is
  synced, it has no longer "moved"). A decision (``RecordInput.decided``) overrides everything
  for its field. A parked field keeps its old base value; parked on a first sync it has none,
  so the base simply has no entry for it (never a placeholder): later runs compare each side
  with "no value", which keeps the field parked until the decision sets the value everywhere.
  A side not extracted is *not* at base for a parked field (it differed when the field was
  parked), so the refreshed review item marks it ``unseen`` instead of inventing its value.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

Side = Literal["dynamics", "erp"]
Owner = Literal["dynamics", "erp", "both"]
Policy = Literal["owner_wins", "last_write_wins", "version", "manual_review"]
ForeignChange = Literal["revert", "report"]
VersionConflict = Literal["manual_review", "owner_wins"]
DeleteAction = Literal["deactivate", "delete", "ignore"]
Direction = Literal["both", "dynamics_to_erp", "erp_to_dynamics", "none"]
Operation = Literal["create", "update", "deactivate", "delete"]

SIDES: Final[tuple[Side, Side]] = ("dynamics", "erp")
OWNERS: Final = frozenset({"dynamics", "erp", "both"})
POLICIES: Final = frozenset({"owner_wins", "last_write_wins", "version", "manual_review"})
OTHER: Final[dict[str, Side]] = {"dynamics": "erp", "erp": "dynamics"}
_CREATE_TARGETS: Final[dict[str, tuple[Side, ...]]] = {
    "both": ("dynamics", "erp"),
    "dynamics_to_erp": ("erp",),
    "erp_to_dynamics": ("dynamics",),
    "none": (),
}
_VERSION_DIGITS = re.compile(r"\d+")


class _Missing:
    """Sentinel for 'no base value': never equal to any real value, including None."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = _Missing()


class MergeConfigError(ValueError):
    """A rule uses a word outside the agreed vocabulary; raised once, when rules are built."""


@dataclass(frozen=True, slots=True)
class FieldRule:
    """How one canonical field is owned and how a two-sided change of it is settled."""

    name: str
    owner: Owner = "both"
    policy: Policy = "owner_wins"
    skew_seconds: float = 0.0
    prefer: Side | None = None
    on_foreign_change: ForeignChange = "revert"
    on_version_conflict: VersionConflict = "manual_review"

    def __post_init__(self) -> None:
        _check(self.owner in OWNERS, f"{self.name}: owner {self.owner!r} not in {sorted(OWNERS)}")
        _check(self.policy in POLICIES, f"{self.name}: policy {self.policy!r} not in {sorted(POLICIES)}")
        _check(self.prefer in (None, *SIDES), f"{self.name}: prefer {self.prefer!r} is not a side")
        _check(self.on_foreign_change in ("revert", "report"), f"{self.name}: bad on_foreign_change")
        _check(
            self.on_version_conflict in ("manual_review", "owner_wins"),
            f"{self.name}: bad on_version_conflict",
        )
        _check(self.skew_seconds >= 0, f"{self.name}: skew_seconds must be >= 0")

    def may_own(self, side: str) -> bool:
        """True when ``side`` is allowed to change this field on its own."""
        return self.owner == side or self.owner == "both"

    @property
    def fallback(self) -> Side | None:
        """Who wins a tie: the owner, else the configured ``prefer`` side, else nobody (park)."""
        return self.prefer if self.owner == "both" else self.owner  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class DeletePolicy:
    """What a delete on one side does to the other side, per direction."""

    dynamics_to_erp: DeleteAction = "deactivate"
    erp_to_dynamics: DeleteAction = "deactivate"

    def action_after_delete_on(self, side: str) -> DeleteAction:
        """The action applied to the other side when ``side`` deleted the record."""
        return self.dynamics_to_erp if side == "dynamics" else self.erp_to_dynamics


@dataclass(frozen=True, slots=True)
class EntityRules:
    """The merge-relevant part of an entity spec; the spec loader builds one of these."""

    entity: str
    fields: tuple[FieldRule, ...]
    direction: Direction = "both"
    delete_policy: DeletePolicy = field(default_factory=DeletePolicy)

    def __post_init__(self) -> None:
        _check(self.direction in _CREATE_TARGETS, f"{self.entity}: bad direction {self.direction!r}")
        names = [rule.name for rule in self.fields]
        _check(len(names) == len(set(names)), f"{self.entity}: duplicate field rules")

    @property
    def field_names(self) -> tuple[str, ...]:
        """Mapped canonical field names, in rule order."""
        return tuple(rule.name for rule in self.fields)


@dataclass(frozen=True, slots=True)
class SideRecord:
    """One side's current canonical values as extracted, or a delete marker."""

    values: Mapping[str, Any]
    modified: datetime | None = None
    version: str | None = None
    deleted: bool = False
    by: str | None = None  # who changed it last, where the side tells (a Dataverse systemuser id)

    @classmethod
    def tombstone(cls, modified: datetime | None = None, version: str | None = None) -> SideRecord:
        """A delete seen on this side (change-tracking removal, snapshot miss)."""
        return cls({}, modified, version, deleted=True)


@dataclass(frozen=True, slots=True)
class Base:
    """What both sides held after the last sync: the merge base, stored by the state store."""

    values: Mapping[str, Any]
    dynamics_version: str | None = None
    erp_version: str | None = None
    dynamics_modified: datetime | None = None
    erp_modified: datetime | None = None
    deleted_on: Side | Literal["both"] | None = None

    def version(self, side: str) -> str | None:
        """The version/ETag recorded for ``side`` at the last sync."""
        return self.dynamics_version if side == "dynamics" else self.erp_version

    def modified(self, side: str) -> datetime | None:
        """The modified timestamp recorded for ``side`` at the last sync."""
        return self.dynamics_modified if side == "dynamics" else self.erp_modified


@dataclass(frozen=True, slots=True)
class RecordInput:
    """One record to merge. A side left as None was not extracted: it is taken to be at base.

    With no base, None means the record does not exist on that side. ``decided`` carries
    review-queue decisions (field -> chosen canonical value) to apply on this run;
    ``under_review`` names the fields with an open, undecided review item. ``repair`` names
    the sides a reconcile repair vouches for: compared by value, never stale.
    """

    key: Hashable
    dynamics: SideRecord | None = None
    erp: SideRecord | None = None
    base: Base | None = None
    decided: Mapping[str, Any] | None = None
    under_review: Collection[str] = ()
    repair: Collection[Side] = ()


@dataclass(slots=True)
class Write:
    """One write to make on one side. ``fields`` holds only the changed fields for updates."""

    side: Side
    op: Operation
    fields: dict[str, Any]
    expected_version: str | None = None


@dataclass(frozen=True, slots=True)
class FieldDecision:
    """Why a field (or '*' for the whole record) ended as it did; ``winner`` None = nobody."""

    field: str
    winner: str | None
    value: Any
    reason: str


@dataclass(frozen=True, slots=True)
class Conflict:
    """A field parked for manual review; the base keeps its old value until a decision.

    ``unseen`` names the sides not extracted on this run: their current value is unknown (given
    as None here), so the review queue keeps the value it already holds for them. ``base`` is
    None when the field has no base value yet (parked on a first sync).
    """

    field: str
    base: Any
    dynamics: Any
    erp: Any
    reason: str
    unseen: tuple[Side, ...] = ()


@dataclass(frozen=True, slots=True)
class StaleRejection:
    """A side rejected because it is older than what the base says was last synced."""

    side: Side
    reason: str


@dataclass(frozen=True, slots=True)
class Report:
    """Something not applied and not parked: a foreign change, a blocked create, a dropped edit."""

    field: str | None
    side: Side | None
    reason: str


@dataclass(slots=True)
class MergeDecision:
    """Everything the loaders, the state store and the plan need to know about one record.

    ``base`` is the base to store after the writes succeed (None: nothing to store, the record
    is not synced). ``base_changed`` says whether it differs from the input base.
    """

    key: Hashable
    dynamics: Write | None = None
    erp: Write | None = None
    base: Base | None = None
    base_changed: bool = False
    decisions: list[FieldDecision] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    stale: list[StaleRejection] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)

    @property
    def writes(self) -> list[Write]:
        """The writes to make, Dynamics first."""
        return [w for w in (self.dynamics, self.erp) if w is not None]

    def write_for(self, side: str) -> Write | None:
        """The write for one side, if any."""
        return self.dynamics if side == "dynamics" else self.erp


def merge_many(rules: EntityRules, records: Iterable[RecordInput]) -> Iterator[MergeDecision]:
    """Merge a stream of records lazily, so memory stays bounded by the caller's chunk."""
    for record in records:
        yield merge_record(rules, record)


def merge_record(rules: EntityRules, record: RecordInput) -> MergeDecision:
    """Decide one record: the writes per side, the new base, and the reason for each decision."""
    out = MergeDecision(record.key)
    base = record.base
    if base is not None and base.deleted_on is not None:
        return _after_tombstone(record, base, out)
    dyn = _accept(record.dynamics, base, "dynamics", out, repair="dynamics" in record.repair)
    erp = _accept(record.erp, base, "erp", out, repair="erp" in record.repair)
    if (dyn is not None and dyn.deleted) or (erp is not None and erp.deleted):
        return _on_delete(rules, base, dyn, erp, out)
    if base is None and (dyn is None or erp is None):
        return _on_create(rules, dyn, erp, out)
    return _merge_fields(rules, record, base or Base({}), dyn, erp, out)


# --- record-level paths ---------------------------------------------------------------------


def _accept(
    rec: SideRecord | None, base: Base | None, side: Side, out: MergeDecision, *, repair: bool = False
) -> SideRecord | None:
    """Drop a side that is older than the base (stale), recording why.

    A repaired side is never stale: it keeps the base's newer timestamp/version (so later
    staleness checks are unchanged) and is compared with the base by value alone.
    """
    if rec is None or base is None:
        return rec
    reason = _staleness(rec, base, side)
    if reason is None:
        return rec
    if repair:
        out.decisions.append(FieldDecision("*", side, None, f"repair: {side} compared by value ({reason})"))
        return _at_least_base(rec, base, side)
    out.stale.append(StaleRejection(side, reason))
    return None


def _at_least_base(rec: SideRecord, base: Base, side: Side) -> SideRecord:
    """``rec`` with the newer of its own and the base's timestamp and version for ``side``."""
    seen, modified = base.modified(side), rec.modified
    if modified is None or (seen is not None and seen > modified):
        modified = seen
    new, old = _version_number(rec.version), _version_number(base.version(side))
    version = base.version(side) if new is not None and old is not None and old > new else rec.version
    return SideRecord(rec.values, modified, version, rec.deleted)


def _staleness(rec: SideRecord, base: Base, side: Side) -> str | None:
    """Why ``rec`` is older than the last synced state, or None. Equal is not stale."""
    seen = base.modified(side)
    if rec.modified is not None and seen is not None and rec.modified < seen:
        return (
            f"stale: {side} modified {rec.modified.isoformat()} is older than last synced {seen.isoformat()}"
        )
    new, old = _version_number(rec.version), _version_number(base.version(side))
    if new is not None and old is not None and new < old:
        return f"stale: {side} version {rec.version} is older than last synced {base.version(side)}"
    return None


def _version_number(version: str | None) -> int | None:
    """Numeric value of an ETag (W/"1234") or ROW_VER, when it has one; opaque ones give None."""
    if version is None:
        return None
    match = _VERSION_DIGITS.fullmatch(version.removeprefix('W/"').removesuffix('"'))
    return int(match.group()) if match else None


def _after_tombstone(record: RecordInput, base: Base, out: MergeDecision) -> MergeDecision:
    """A synced delete closes the record: later changes are reported, never written."""
    out.base = base
    for side in SIDES:
        rec = record.dynamics if side == "dynamics" else record.erp
        if rec is not None and not rec.deleted and _differs(rec.values, base.values):
            out.reports.append(
                Report(None, side, f"{side} changed a record deleted on {base.deleted_on}; ignored")
            )
    return out


def _on_delete(
    rules: EntityRules, base: Base | None, dyn: SideRecord | None, erp: SideRecord | None, out: MergeDecision
) -> MergeDecision:
    """Apply the delete policy of the direction the delete travels."""
    if base is None:
        out.decisions.append(
            FieldDecision("*", None, None, "deleted before it was ever synced; nothing to do")
        )
        return out
    dyn_gone, erp_gone = bool(dyn and dyn.deleted), bool(erp and erp.deleted)
    deleted_on: Side | Literal["both"] = (
        "both" if dyn_gone and erp_gone else ("dynamics" if dyn_gone else "erp")
    )
    out.base = _replace_base(base, dyn, erp, base.values, deleted_on)
    out.base_changed = True
    if deleted_on == "both":
        out.decisions.append(FieldDecision("*", None, None, "deleted on both sides"))
        return out
    _propagate_delete(rules, base, deleted_on, dyn if deleted_on == "erp" else erp, out)
    return out


def _propagate_delete(
    rules: EntityRules, base: Base, deleted_on: Side, survivor: SideRecord | None, out: MergeDecision
) -> None:
    """Write the policy's action to the surviving side; its concurrent edits are dropped."""
    target = OTHER[deleted_on]
    action = rules.delete_policy.action_after_delete_on(deleted_on)
    reason = f"deleted on {deleted_on}; delete policy {deleted_on}_to_{target}: {action}"
    out.decisions.append(FieldDecision("*", deleted_on, None, reason))
    if action != "ignore":
        version = survivor.version if survivor is not None else base.version(target)
        _set_write(out, Write(target, action, {}, version))
    if survivor is not None and _differs(survivor.values, base.values):
        out.reports.append(Report(None, target, f"{target} edits dropped: record deleted on {deleted_on}"))


def _on_create(
    rules: EntityRules, dyn: SideRecord | None, erp: SideRecord | None, out: MergeDecision
) -> MergeDecision:
    """A never-synced record on one side: create it on the other if the direction allows."""
    source: Side = "dynamics" if dyn is not None else "erp"
    rec = dyn if dyn is not None else erp
    if rec is None:
        return out
    target = OTHER[source]
    if target not in _CREATE_TARGETS[rules.direction]:
        reason = f"created on {source}; not propagated: entity direction is {rules.direction}"
        out.reports.append(Report(None, source, reason))
        return out
    values = {name: rec.values[name] for name in rules.field_names if name in rec.values}
    _set_write(out, Write(target, "create", dict(values)))
    out.base = Base(values, **_side_meta(source, rec))
    out.base_changed = True
    out.decisions.append(FieldDecision("*", source, None, f"created on {source}; create on {target}"))
    return out


def _side_meta(side: Side, rec: SideRecord) -> dict[str, Any]:
    """Base keyword arguments carrying one side's version and timestamp."""
    return {f"{side}_version": rec.version, f"{side}_modified": rec.modified}


# --- field-level merge ----------------------------------------------------------------------


@dataclass(slots=True)
class _Ctx:
    """Per-record facts the field rules need: both sides' timestamps and 'moved' flags."""

    dyn: SideRecord | None
    erp: SideRecord | None
    base: Base
    moved: dict[str, bool]


def _merge_fields(
    rules: EntityRules,
    record: RecordInput,
    base: Base,
    dyn: SideRecord | None,
    erp: SideRecord | None,
    out: MergeDecision,
) -> MergeDecision:
    """Compare every mapped field with the base; resolve only those that moved."""
    changed = _changed_fields(rules, base.values, dyn, erp)
    decided = record.decided or {}
    new_values: Mapping[str, Any] = base.values
    writes: dict[str, dict[str, Any]] = {"dynamics": {}, "erp": {}}
    if changed or decided:
        new_values = dict(base.values)
        ctx = _Ctx(dyn, erp, base, _moved(base, dyn, erp, changed))
        for rule, b, d, e in changed:
            if rule.name in decided:
                continue
            if rule.name in record.under_review and d != e:
                out.conflicts.append(_conflict(rule.name, b, d, e, "awaiting review decision", dyn, erp))
            else:
                _resolve(rule, b, d, e, ctx, out, new_values, writes)
        _apply_decided(rules, decided, base.values, dyn, erp, out, new_values, writes)
    elif dyn is not None or erp is not None:
        seen = " and ".join(s for s, r in (("dynamics", dyn), ("erp", erp)) if r is not None)
        out.decisions.append(FieldDecision("*", None, None, f"echo: {seen} values equal base"))
    _emit_writes(base, dyn, erp, writes, out)
    new_base = _replace_base(base, dyn, erp, new_values, None)
    out.base = new_base
    out.base_changed = record.base is None or new_base != record.base
    return out


def _changed_fields(
    rules: EntityRules, base_values: Mapping[str, Any], dyn: SideRecord | None, erp: SideRecord | None
) -> list[tuple[FieldRule, Any, Any, Any]]:
    """The hot loop: (rule, base, dynamics, erp) for fields where either side left the base."""
    dv = dyn.values if dyn is not None else None
    ev = erp.values if erp is not None else None
    out = []
    for rule in rules.fields:
        b = base_values.get(rule.name, MISSING)
        d = b if dv is None else dv.get(rule.name, b)
        e = b if ev is None else ev.get(rule.name, b)
        if d != b or e != b:
            out.append((rule, b, d, e))
    return out


def _moved(
    base: Base, dyn: SideRecord | None, erp: SideRecord | None, changed: list[tuple[FieldRule, Any, Any, Any]]
) -> dict[str, bool]:
    """Has each side moved the record since the last sync (a real change and a new version)?"""
    d_changed = any(d != b for _, b, d, _ in changed)
    e_changed = any(e != b for _, b, _, e in changed)
    return {
        "dynamics": d_changed and _version_moved(dyn, base.dynamics_version),
        "erp": e_changed and _version_moved(erp, base.erp_version),
    }


def _version_moved(rec: SideRecord | None, recorded: str | None) -> bool:
    """An unknown version counts as moved: without a version we only have the values."""
    return rec is None or rec.version is None or recorded is None or rec.version != recorded


def _resolve(
    rule: FieldRule,
    b: Any,
    d: Any,
    e: Any,
    ctx: _Ctx,
    out: MergeDecision,
    new_values: dict[str, Any],
    writes: dict[str, dict[str, Any]],
) -> None:
    """Settle one moved field and record the outcome: a winner, a park or a report."""
    if d == e:
        out.decisions.append(
            FieldDecision(rule.name, "both", d, f"both changed {rule.name} to the same value")
        )
        new_values[rule.name] = d
        return
    if d != b and e != b:
        winner, reason = _both_changed(rule, ctx)
    else:
        winner, reason = _one_changed(rule, "dynamics" if d != b else "erp", b, ctx)
    if winner is None:
        out.conflicts.append(_conflict(rule.name, b, d, e, reason, ctx.dyn, ctx.erp))
    elif winner == "report":
        side: Side = "dynamics" if d != b else "erp"
        out.reports.append(Report(rule.name, side, reason))
    else:
        _take(rule.name, winner, d if winner == "dynamics" else e, d, e, out, new_values, writes, reason)


def _conflict(
    name: str, b: Any, d: Any, e: Any, reason: str, dyn: SideRecord | None, erp: SideRecord | None
) -> Conflict:
    """A parked field as the review queue stores it: real values only, never the sentinel.

    A side that was not extracted stands in with the base value (or the sentinel, when there is
    no base value) only for change detection; what it really holds is unknown, so it is
    reported as ``unseen`` with None.
    """
    unseen = tuple(side for side, rec in zip(SIDES, (dyn, erp), strict=True) if rec is None)
    return Conflict(
        name,
        _plain(b),
        None if dyn is None else _plain(d),
        None if erp is None else _plain(e),
        reason,
        unseen,
    )


def _take(
    name: str,
    winner: str,
    value: Any,
    d: Any,
    e: Any,
    out: MergeDecision,
    new_values: dict[str, Any],
    writes: dict[str, dict[str, Any]],
    reason: str,
) -> None:
    """Make ``value`` the field's value on both sides and in the new base."""
    out.decisions.append(FieldDecision(name, winner, value, reason))
    new_values[name] = value
    if d != value:
        writes["dynamics"][name] = value
    if e != value:
        writes["erp"][name] = value


def _one_changed(rule: FieldRule, side: Side, b: Any, ctx: _Ctx) -> tuple[str | None, str]:
    """Only ``side`` changed the field: ownership first, then the version check."""
    other = OTHER[side]
    name = rule.name
    if not rule.may_own(side):
        if rule.on_foreign_change == "revert" and b is not MISSING:
            return other, f"{side} changed {name} but {other} owns it: reverted"
        return "report", f"{side} changed {name} but {other} owns it: reported, not applied"
    if rule.policy == "version" and ctx.moved[other]:
        return _version_conflict(rule, f"{side} changed {name} but {other} moved the record since last sync")
    return side, f"{side} changed {name}; {_ownership(rule, side)}"


def _both_changed(rule: FieldRule, ctx: _Ctx) -> tuple[str | None, str]:
    """Both sides changed the field to different values: the policy decides."""
    head = f"both changed {rule.name}"
    if rule.policy == "manual_review":
        return None, f"{head}; manual_review"
    if rule.policy == "version":
        return _version_conflict(rule, f"{head}; version mismatch on both sides")
    if rule.owner != "both":
        return rule.owner, f"{head}; {rule.owner} owns it ({rule.policy})"
    if rule.policy == "last_write_wins":
        return _last_write_wins(rule, ctx, head)
    return _fallback(rule, f"{head}; owner_wins with shared ownership")


def _version_conflict(rule: FieldRule, head: str) -> tuple[str | None, str]:
    """Park a version conflict, or give it to the owner when configured to."""
    if rule.on_version_conflict == "manual_review":
        return None, f"{head}: version conflict, manual review"
    return _fallback(rule, f"{head}: version conflict")


def _last_write_wins(rule: FieldRule, ctx: _Ctx, head: str) -> tuple[str | None, str]:
    """The newer side wins beyond the clock-skew tolerance; inside it, the fallback does."""
    dm = ctx.dyn.modified if ctx.dyn is not None else ctx.base.dynamics_modified
    em = ctx.erp.modified if ctx.erp is not None else ctx.base.erp_modified
    if dm is None or em is None:
        return _fallback(rule, f"{head}; last_write_wins without both timestamps")
    delta = (dm - em).total_seconds()
    if abs(delta) > rule.skew_seconds:
        newer = "dynamics" if delta > 0 else "erp"
        return newer, f"{head}; last_write_wins: {newer} newer by {abs(delta):.0f}s"
    return _fallback(rule, f"{head}; last_write_wins within {rule.skew_seconds:g}s skew tolerance")


def _fallback(rule: FieldRule, head: str) -> tuple[str | None, str]:
    """The owner, else ``prefer``; with neither the field is parked for review."""
    side = rule.fallback
    if side is None:
        return None, f"{head}; no owner or prefer side: manual review"
    return side, f"{head}; falls back to {side}"


def _ownership(rule: FieldRule, side: str) -> str:
    return f"{side} owns it" if rule.owner == side else "both sides may change it"


def _apply_decided(
    rules: EntityRules,
    decided: Mapping[str, Any],
    base_values: Mapping[str, Any],
    dyn: SideRecord | None,
    erp: SideRecord | None,
    out: MergeDecision,
    new_values: dict[str, Any],
    writes: dict[str, dict[str, Any]],
) -> None:
    """A review decision beats whatever the sides hold now: the human saw both values."""
    mapped = set(rules.field_names)
    for name, value in decided.items():
        if name not in mapped:
            continue
        b = base_values.get(name, MISSING)
        d = b if dyn is None else dyn.values.get(name, b)
        e = b if erp is None else erp.values.get(name, b)
        _take(name, "review", value, d, e, out, new_values, writes, f"review decision applied to {name}")


def _emit_writes(
    base: Base,
    dyn: SideRecord | None,
    erp: SideRecord | None,
    writes: dict[str, dict[str, Any]],
    out: MergeDecision,
) -> None:
    """Turn collected field writes into one update per side, with If-Match versions."""
    for side, rec in (("dynamics", dyn), ("erp", erp)):
        fields = writes[side]
        if fields:
            version = rec.version if rec is not None else base.version(side)
            _set_write(out, Write(side, "update", fields, version))


def _set_write(out: MergeDecision, write: Write) -> None:
    if write.side == "dynamics":
        out.dynamics = write
    else:
        out.erp = write


def _replace_base(
    base: Base,
    dyn: SideRecord | None,
    erp: SideRecord | None,
    values: Mapping[str, Any],
    deleted_on: Side | Literal["both"] | None,
) -> Base:
    """The new base: merged values plus each extracted side's version and timestamp."""
    return Base(
        values,
        dynamics_version=dyn.version if dyn is not None else base.dynamics_version,
        erp_version=erp.version if erp is not None else base.erp_version,
        dynamics_modified=dyn.modified if dyn is not None else base.dynamics_modified,
        erp_modified=erp.modified if erp is not None else base.erp_modified,
        deleted_on=deleted_on,
    )


def _differs(values: Mapping[str, Any], base_values: Mapping[str, Any]) -> bool:
    """Does any extracted value differ from the base (i.e. is this more than an echo)?"""
    return any(base_values.get(name, MISSING) != value for name, value in values.items())


def _plain(value: Any) -> Any:
    """The sentinel never leaks out: a missing base is reported as None."""
    return None if value is MISSING else value


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise MergeConfigError(message)
