"""Generated suite: every ``include/entities/*.yaml`` is tested the moment it exists.

Each entity must load on its own and with the others, produce the ERP client's TableSpec and
the Dynamics ``$select``, give the merge module rules in its exact vocabulary, and round-trip
its example rows: side → canonical → the other side → read back → the same canonical values,
which is what lets the echo guard recognise our own writes.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pytest

from d365sync.engine.transforms import TransformContext
from d365sync.spec import SIDES, EntitySpec, load_entities, load_entity

ENTITIES = Path(__file__).resolve().parents[2] / "include" / "entities"
FILES = sorted(p for p in ENTITIES.glob("*.yaml") if not p.name.startswith("_"))


def fake_lookup(target: str, value: Any, to: Literal["id", "key"]) -> Any:
    """A key map that needs no state: the 'GUID' of key K of target T is 'T:K'."""
    if to == "id":
        return f"{target}:{value}"
    prefix = f"{target}:"
    return value[len(prefix) :] if isinstance(value, str) and value.startswith(prefix) else None


CTX = TransformContext(lookup=fake_lookup)


@pytest.fixture(scope="module")
def all_specs() -> dict[str, EntitySpec]:
    return load_entities(ENTITIES)


@pytest.fixture(params=FILES, ids=[p.stem for p in FILES])
def spec(request: pytest.FixtureRequest, all_specs: dict[str, EntitySpec]) -> EntitySpec:
    return all_specs[request.param.stem]


def test_the_five_business_entities_exist() -> None:
    assert {p.stem for p in FILES} >= {"customers", "products", "inventory", "orders", "invoices"}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_loads_on_its_own(path: Path) -> None:
    loaded = load_entity(path)
    assert loaded.name == path.stem
    assert loaded.source == path


def test_merge_rules_use_the_merge_vocabulary(spec: EntitySpec) -> None:
    rules = spec.merge_fields()
    assert {r.name for r in rules} == set(spec.fields)
    for rule in rules:
        assert rule.owner in ("dynamics", "erp", "both")
        assert rule.policy in ("owner_wins", "last_write_wins", "version", "manual_review")
        assert rule.on_non_owner_change in ("revert", "report")
        assert rule.winner in ("dynamics", "erp") or rule.policy == "manual_review"
        assert (rule.clock_skew_seconds is not None) == (rule.policy == "last_write_wins")


def test_produces_the_erp_table_spec(spec: EntitySpec) -> None:
    table = spec.erp_table_spec()
    assert table.name == spec.erp.table
    assert set(spec.erp.key) <= set(table.key)
    assert {f.erp for f in spec.fields.values() if f.erp} <= set(table.column_names)


def test_produces_the_dynamics_select(spec: EntitySpec) -> None:
    select = spec.dynamics_select
    assert len(select) == len(set(select))
    assert spec.dynamics.key in select
    assert all(not c.endswith("@odata.bind") for c in select)


def test_expectations_name_gx_classes(spec: EntitySpec) -> None:
    for side in SIDES:
        for exp in getattr(spec.validation, side):
            name, kwargs = exp.gx()
            assert name.startswith("Expect")
            assert kwargs["column"] == (exp.derived_column or exp.column)


def test_has_examples(spec: EntitySpec) -> None:
    assert spec.examples.dynamics or spec.examples.erp, "add examples: so the round trip is tested"


def _readback(spec: EntitySpec, side: str, written: dict[str, Any]) -> dict[str, Any]:
    """What the real client would return: Dataverse sends floats, the ERP strips CHAR padding."""
    row = spec.plan.readback(side, written)  # type: ignore[arg-type]
    if side == "dynamics":
        return {k: float(v) if isinstance(v, Decimal) else v for k, v in row.items()}
    table = spec.erp_table_spec()
    chars = {c.name for c in table.columns if c.type.value == "char"}
    return {k: v.rstrip(" ") if k in chars and isinstance(v, str) else v for k, v in row.items()}


def test_examples_round_trip_through_every_writable_side(spec: EntitySpec) -> None:
    plan = spec.plan
    for source in SIDES:
        rows = getattr(spec.examples, source)
        for row in rows:
            canonical = plan.to_canonical(source, row, CTX)
            assert canonical[spec.key] not in (None, "")
            for target in SIDES:
                if target == source:
                    continue
                written = plan.from_canonical(target, canonical, CTX, fields=list(canonical))
                back = plan.to_canonical(target, _readback(spec, target, written), CTX)
                moved = [f.name for f in plan.fields if target in f.writable and f.name in canonical]
                assert {n: back[n] for n in moved} == {n: canonical[n] for n in moved}, (source, row)


def test_writes_only_writable_columns(spec: EntitySpec) -> None:
    table = spec.erp_table_spec()
    writable = {c.name for c in table.writable}
    for f in spec.plan.fields:
        if "erp" in f.writable:
            assert f.write["erp"] in writable, f.name


def test_builds_the_merge_modules_rules(spec: EntitySpec) -> None:
    rules = spec.merge_rules()
    assert rules.field_names == tuple(spec.fields)
