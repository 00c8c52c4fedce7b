"""Extract: after a full read of Dynamics (no token yet, or an expired one), key-mapped records
the read did not return become deletes; a delta read or a backfill window never makes them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from d365sync.dynamics.changes import Change
from d365sync.engine.merge import Base
from d365sync.engine.stages.context import Window
from d365sync.engine.stages.extract import _dynamics_changes, _erp_snapshot
from d365sync.engine.state import BaseRow, StateStore
from d365sync.spec import EntitySpec, load_entities

ENTITIES = Path(__file__).resolve().parents[2] / "include" / "entities"
GUIDS = {n: f"00000000-0000-0000-0000-00000000000{n}" for n in range(1, 6)}


class Feed:
    def __init__(self, changes: list[Change], full_resync: bool) -> None:
        self.changes, self.full_resync, self.delta_token = changes, full_resync, "next"

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes)


class Dynamics:
    """Accounts C1, C3 (re-created under a new GUID) and C5 exist; C2 and C4 were deleted."""

    def __init__(self, full_resync: bool = False) -> None:
        self.full_resync = full_resync
        rows = [("C1", GUIDS[1]), ("C3", "99999999-0000-0000-0000-000000000003"), ("C5", GUIDS[5])]
        self.rows = [{"accountid": guid, "accountnumber": key} for key, guid in rows]

    def iter_changes(self, entity_set: str, select: list[str], token: str | None, **kw: Any) -> Feed:
        return Feed([Change("upsert", r["accountid"], r) for r in self.rows], self.full_resync)

    def iter_window(self, entity_set: str, select: list[str], start: Any, end: Any) -> list[dict[str, Any]]:
        return self.rows


@pytest.fixture
def specs() -> dict[str, EntitySpec]:
    return load_entities(ENTITIES)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}") as state:
        synced = [BaseRow(GUIDS[n], f"C{n}", Base({"number": f"C{n}"})) for n in (1, 2, 3)]
        synced.append(BaseRow(GUIDS[4], "C4", Base({"number": "C4"}, deleted_on="dynamics")))  # tombstone
        synced.append(BaseRow(None, "C6", Base({"number": "C6"})))  # never in Dynamics
        for entity in ("customers", "products"):
            state.save_base(entity, synced, "r0")
        yield state


def _deletes(spec: EntitySpec, store: StateStore, dynamics: Dynamics, **ctx: Any) -> list[tuple[Any, Any]]:
    options = {"spec": spec, "entity": spec.name, "store": store, "dynamics": dynamics, "window": None}
    context: Any = SimpleNamespace(**(options | ctx))
    entries, _ = _dynamics_changes(context)
    return [(e["key"], e["id"]) for e in entries if e["deleted"]]


def _token(store: StateStore, entity: str) -> None:
    store.stage_watermark(entity, "dynamics", "r0", datetime.now(UTC), "old-token")
    store.commit_watermarks(entity, "r0")


def test_a_full_read_after_an_expired_token_turns_vanished_records_into_deletes(
    specs: dict[str, EntitySpec], store: StateStore
) -> None:
    _token(store, "customers")
    # C2 only: C1 and C5 were read, C3 was read under its key, C4 is already deleted, C6 has no GUID
    assert _deletes(specs["customers"], store, Dynamics(full_resync=True)) == [("C2", GUIDS[2])]


def test_the_first_read_without_a_token_is_a_full_read_too(
    specs: dict[str, EntitySpec], store: StateStore
) -> None:
    assert _deletes(specs["customers"], store, Dynamics()) == [("C2", GUIDS[2])]


def test_a_delta_read_or_a_backfill_window_never_makes_such_deletes(
    specs: dict[str, EntitySpec], store: StateStore
) -> None:
    window = Window(datetime.now(UTC) - timedelta(days=1), datetime.now(UTC))
    assert _deletes(specs["customers"], store, Dynamics(), window=window) == []
    _token(store, "customers")
    assert _deletes(specs["customers"], store, Dynamics(full_resync=False)) == []


def test_an_entity_that_ignores_deletes_to_the_erp_makes_none(
    specs: dict[str, EntitySpec], store: StateStore
) -> None:
    assert specs["products"].deletes.to_erp == "ignore"
    assert _deletes(specs["products"], store, Dynamics(full_resync=True)) == []


class Erp:
    """ITEM_STOCK rows of C1 and C3 (two warehouses) remain; C2's are gone."""

    def iter_rows(self, table: Any, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
        yield [
            {"ITEM_NO": k, "WHSE": w, "QTY_ON_HAND": 1}
            for k, w in (("C1", "W01"), ("C3", "W01"), ("C3", "W02"))
        ]


def test_the_erp_snapshot_read_shares_the_mechanism(specs: dict[str, EntitySpec], store: StateStore) -> None:
    stock = specs["inventory"]
    store.save_base(
        "inventory", [BaseRow(GUIDS[n], f"C{n}", Base({"number": f"C{n}"})) for n in (1, 2, 3)], "r0"
    )
    ctx: Any = SimpleNamespace(spec=stock, entity="inventory", store=store, erp=Erp(), chunk_size=100)
    assert stock.deletes.to_dynamics == "ignore"
    assert [e["key"] for e in _erp_snapshot(ctx)[0] if e["deleted"]] == []
    deletes = stock.deletes.model_copy(update={"to_dynamics": "deactivate"})
    ctx.spec = stock.model_copy(update={"deletes": deletes})
    assert [(e["key"], e["id"]) for e in _erp_snapshot(ctx)[0] if e["deleted"]] == [("C2", None)]
