"""Property-based tests: two in-memory systems kept in sync by the merge, under random edits.

Each example seeds records, then runs steps of random edits on both sides (updates including
concurrent edits of the same field, creates, deletes, review decisions) followed by a sync:
merge every record against its base, apply the writes to both systems, store the new base.
After each sync the invariants of the issue must hold, and a second sync with no edits must
write nothing (the echo guard). Settings are modest and derandomized so CI is deterministic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from d365sync.engine.merge import (
    SIDES,
    Base,
    DeletePolicy,
    EntityRules,
    FieldRule,
    MergeDecision,
    RecordInput,
    SideRecord,
    merge_record,
)

FIELDS = (
    FieldRule("name", owner="dynamics"),
    FieldRule("email", owner="dynamics", on_foreign_change="report"),
    FieldRule("credit", owner="erp"),
    FieldRule("addr", owner="both", policy="last_write_wins", skew_seconds=30, prefer="dynamics"),
    FieldRule("city", owner="both", policy="last_write_wins", skew_seconds=30),
    FieldRule("note", owner="both", policy="manual_review"),
    FieldRule("terms", owner="erp", policy="version"),
    FieldRule("status", owner="both", policy="version", on_version_conflict="owner_wins", prefer="erp"),
)
NAMES = tuple(rule.name for rule in FIELDS)
OWNER = {rule.name: rule.owner for rule in FIELDS}
VALUES = ("a", "b", "c", None)
T0 = datetime(2024, 1, 1, tzinfo=UTC)

PROFILE = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Row:
    values: dict[str, Any]
    modified: int
    version: int = 1
    active: bool = True


@dataclass
class System:
    prefix: str
    rows: dict[str, Row] = field(default_factory=dict)
    counter: int = 0

    def insert(self, values: dict[str, Any], clock: int) -> str:
        self.counter += 1
        key = f"{self.prefix}{self.counter}"
        self.rows[key] = Row(dict(values), clock)
        return key

    def active_keys(self) -> list[str]:
        return [key for key, row in self.rows.items() if row.active]

    def snapshot(self, key: str | None) -> SideRecord | None:
        """A full extract: every record every time (the strongest test of the echo guard)."""
        if key is None:
            return None
        row = self.rows.get(key)
        if row is None:
            return SideRecord.tombstone()
        return SideRecord(dict(row.values), T0 + timedelta(seconds=row.modified), str(row.version))


@dataclass
class World:
    rules: EntityRules
    systems: dict[str, System] = field(default_factory=lambda: {"dynamics": System("D"), "erp": System("E")})
    pairs: dict[int, dict[str, str | None]] = field(default_factory=dict)
    base: dict[int, Base] = field(default_factory=dict)
    decided: dict[int, dict[str, Any]] = field(default_factory=dict)
    parked: set[tuple[int, str]] = field(default_factory=set)
    reported: set[tuple[int, str]] = field(default_factory=set)
    applied: dict[int, set[str]] = field(default_factory=dict)
    _emitted: set[tuple[int, str]] = field(default_factory=set)
    clock: int = 0
    next_pid: int = 0

    # --- edits ---------------------------------------------------------------------------

    def edit(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "update":
            _, side, pick, name, value, dt = op
            keys = self.systems[side].active_keys()
            if keys:
                self.clock += dt
                row = self.systems[side].rows[keys[pick % len(keys)]]
                row.values[name] = value
                row.version += 1
                row.modified = self.clock
        elif kind == "create":
            _, side, values = op
            self.clock += 1
            self.systems[side].insert(dict(zip(NAMES, values, strict=True)), self.clock)
        elif kind == "delete":
            _, side, pick = op
            keys = sorted(self.systems[side].rows)
            if keys:
                del self.systems[side].rows[keys[pick % len(keys)]]
        elif kind == "decide" and self.parked:
            _, pick, choice = op
            pid, name = sorted(self.parked)[pick % len(self.parked)]
            self.decided.setdefault(pid, {})[name] = VALUES[choice]

    # --- sync ----------------------------------------------------------------------------

    def sync(self) -> list[MergeDecision]:
        self.clock += 1
        self._adopt_new_rows()
        self.reported = set()
        decisions = []
        for pid in sorted(self.pairs):
            decision = self._merge(pid)
            decisions.append(decision)
            self._apply(pid, decision)
        # the review queue: open items are the conflicts re-emitted by this sync
        self.parked, self._emitted = self._emitted, set()
        _label(decisions)
        return decisions

    def _adopt_new_rows(self) -> None:
        """Rows not in the key map yet are never-synced records, one pair each."""
        mapped = {side: {p[side] for p in self.pairs.values()} for side in SIDES}
        for side in SIDES:
            for key in self.systems[side].rows:
                if key not in mapped[side]:
                    self.pairs[self.next_pid] = {"dynamics": None, "erp": None, side: key}
                    self.next_pid += 1

    def _merge(self, pid: int) -> MergeDecision:
        pair = self.pairs[pid]
        record = RecordInput(
            pid,
            self.systems["dynamics"].snapshot(pair["dynamics"]),
            self.systems["erp"].snapshot(pair["erp"]),
            self.base.get(pid),
            self.decided.pop(pid, None),
            frozenset(name for p, name in self.parked if p == pid),
        )
        self.applied[pid] = set(record.decided or ())
        return merge_record(self.rules, record)

    def _apply(self, pid: int, decision: MergeDecision) -> None:
        base = decision.base
        for write in decision.writes:
            meta = self._write(pid, write.side, write.op, write.fields)
            if base is not None and meta is not None:
                base = dataclasses.replace(base, **meta)  # the commit stores post-write ETags
        if base is not None:
            self.base[pid] = base
        elif pid not in self.base and not decision.writes:
            self.pairs.pop(pid)  # a never-synced record that went away
        self._emitted |= {(pid, c.field) for c in decision.conflicts}
        self.reported |= {(pid, r.field) for r in decision.reports if r.field}

    def _write(self, pid: int, side: str, op: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        system = self.systems[side]
        if op == "create":
            self.pairs[pid][side] = system.insert(fields, self.clock)
            row = system.rows[self.pairs[pid][side]]
        elif op == "delete":
            system.rows.pop(self.pairs[pid][side], None)
            return None
        else:
            row = system.rows[self.pairs[pid][side]]
            row.values.update(fields)
            row.active = row.active and op != "deactivate"
            row.version += 1
            row.modified = self.clock
        ts = T0 + timedelta(seconds=row.modified)
        return {f"{side}_version": str(row.version), f"{side}_modified": ts}


def _label(decisions: list[MergeDecision]) -> None:
    """Hypothesis statistics (--hypothesis-show-statistics) show which rules were exercised."""
    for decision in decisions:
        for item in decision.decisions:
            event(item.reason.split(";")[-1].split(":")[0].strip()[:40])
        for write in decision.writes:
            event(f"write {write.op}")
        if decision.conflicts:
            event("conflict parked")


# --- invariants ---------------------------------------------------------------------------------


def check_invariants(world: World, decisions: list[MergeDecision]) -> None:
    check_no_record_lost_or_duplicated(world)
    check_sides_agree(world)
    check_owned_fields_never_take_the_non_owner_value(world, decisions)


def check_no_record_lost_or_duplicated(world: World) -> None:
    for side in SIDES:
        keys = [pair[side] for pair in world.pairs.values() if pair[side] is not None]
        assert len(keys) == len(set(keys)), f"{side} key mapped twice"
        assert set(world.systems[side].rows) <= set(keys), f"{side} row left unmapped"
    for pid, base in world.base.items():
        if base.deleted_on is None:
            for side in SIDES:
                row = world.systems[side].rows.get(world.pairs[pid][side] or "")
                assert row is not None and row.active, f"record {pid} lost on {side}"


def check_sides_agree(world: World) -> None:
    excluded = world.parked | world.reported
    for pid, base in world.base.items():
        if base.deleted_on is not None:
            continue
        dyn = world.systems["dynamics"].rows[world.pairs[pid]["dynamics"]].values
        erp = world.systems["erp"].rows[world.pairs[pid]["erp"]].values
        for name in NAMES:
            if (pid, name) not in excluded:
                assert dyn.get(name) == erp.get(name), (pid, name, dyn, erp)
                assert base.values.get(name) == dyn.get(name), (pid, name, "base")


def check_owned_fields_never_take_the_non_owner_value(world: World, decisions: list[MergeDecision]) -> None:
    """Sync never writes an owned field to its owner, except a create or a human's decision."""
    for decision in decisions:
        assert all(c.dynamics != c.erp for c in decision.conflicts), "same value is no conflict"
        for write in decision.writes:
            if write.op == "create":
                continue
            for name in write.fields:
                decided = name in world.applied[decision.key]
                assert decided or OWNER[name] != write.side, (decision.key, name, write)


# --- strategies ---------------------------------------------------------------------------------

values_st = st.tuples(*[st.sampled_from(VALUES) for _ in NAMES])
create_st = st.tuples(st.just("create"), st.sampled_from(SIDES), values_st)
update_st = st.tuples(
    st.just("update"),
    st.sampled_from(SIDES),
    st.integers(0, 3),
    st.sampled_from(NAMES),
    st.sampled_from(VALUES),
    st.integers(0, 90),
)
concurrent_st = st.builds(
    lambda pick, name, dv, ev, ddt, edt: [
        ("update", "dynamics", pick, name, dv, ddt),
        ("update", "erp", pick, name, ev, edt),
    ],
    st.integers(0, 3),
    st.sampled_from(NAMES),
    st.sampled_from(VALUES),
    st.sampled_from(VALUES),
    st.integers(0, 90),
    st.integers(0, 90),
)
delete_st = st.tuples(st.just("delete"), st.sampled_from(SIDES), st.integers(0, 20))
decide_st = st.tuples(st.just("decide"), st.integers(0, 20), st.integers(0, len(VALUES) - 1))
edit_st = st.one_of(
    *[update_st.map(lambda op: [op])] * 3,
    concurrent_st,
    concurrent_st,
    *[s.map(lambda op: [op]) for s in (create_st, delete_st, decide_st, decide_st)],
)
delete_action_st = st.sampled_from(["deactivate", "delete", "ignore"])


@PROFILE
@given(
    seed=st.lists(create_st, min_size=1, max_size=3),
    steps=st.lists(st.lists(edit_st, min_size=1, max_size=8), min_size=1, max_size=5),
    to_erp=delete_action_st,
    to_dynamics=delete_action_st,
)
def test_random_edits_on_both_sides_keep_the_systems_in_sync(
    seed: list[tuple[Any, ...]], steps: list[list[list[tuple[Any, ...]]]], to_erp: str, to_dynamics: str
) -> None:
    rules = EntityRules("sim", FIELDS, delete_policy=DeletePolicy(to_erp, to_dynamics))  # type: ignore[arg-type]
    world = World(rules)
    for op in seed:
        world.edit(op)
    for edits in [[], *steps]:
        for op in (op for group in edits for op in group):
            world.edit(op)
        check_invariants(world, world.sync())
        again = world.sync()
        assert [d.writes for d in again if d.writes] == [], "second sync wrote: echo guard broken"
        check_invariants(world, again)


@PROFILE
@given(
    steps=st.lists(
        st.lists(st.one_of(concurrent_st, decide_st.map(lambda op: [op])), min_size=1, max_size=6),
        min_size=1,
        max_size=5,
    )
)
def test_concurrent_edits_of_the_same_records_converge(steps: list[list[list[tuple[Any, ...]]]]) -> None:
    """Only updates, on one shared record: the densest stream of same-field conflicts."""
    world = World(EntityRules("sim", FIELDS))
    world.edit(("create", "dynamics", ("a",) * len(NAMES)))
    world.sync()
    for edits in steps:
        for op in (op for group in edits for op in group):
            world.edit(op)
        check_invariants(world, world.sync())
        assert all(not d.writes for d in world.sync())
