"""The one parents-first entity order (d365sync.spec.dependency_order), derived from the specs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from d365sync.spec import SpecError, dependencies, dependency_order, load_entities, load_entity
from tests.unit.test_spec import ENTITIES, variant, write


@pytest.fixture
def entity_dir(tmp_path: Path) -> Path:
    shutil.copy(ENTITIES / "_defaults.yaml", tmp_path / "_defaults.yaml")
    return tmp_path


def test_dependency_order_puts_parents_first_from_the_specs_alone() -> None:
    specs = load_entities(ENTITIES)
    order = dependency_order(specs)
    assert sorted(order) == sorted(specs)
    assert order.index("customers") < order.index("orders") < order.index("invoices")
    # inventory sets quantityonhand on the Dynamics products that products creates
    assert order.index("products") < order.index("inventory")
    assert dependencies(specs["inventory"], specs) == {
        "products": "products creates the dynamics product records inventory only updates"
    }
    assert set(dependencies(specs["invoices"], specs)) == {"customers", "orders"}
    assert dependencies(specs["customers"], specs) == dependencies(specs["products"], specs) == {}
    assert order == ["customers", "orders", "invoices", "products", "inventory"]  # alphabetical among equals


def _looks_up(target: str) -> dict[str, Any]:
    return {"c": {"kind": "entity", "entity": target, "dynamics_table": "account"}}


def test_a_dependency_cycle_is_a_spec_error_naming_the_files(entity_dir: Path) -> None:
    write(entity_dir, variant(lookups=_looks_up("beta")), "alpha")
    # beta creates nothing in Dynamics, so it waits for alpha, which creates the accounts it updates
    write(entity_dir, variant(creates={"to_erp": False, "to_dynamics": False}), "beta")
    with pytest.raises(SpecError) as err:
        load_entities(entity_dir)
    text = str(err.value)
    assert "entities depend on each other in a cycle" in text
    assert "alpha.yaml waits for beta.yaml (lookups.c resolves beta records through its key map)" in text
    assert (
        "beta.yaml waits for alpha.yaml (alpha creates the dynamics account records beta only updates)"
        in text
    )
    specs = {name: load_entity(entity_dir / f"{name}.yaml") for name in ("alpha", "beta")}
    with pytest.raises(SpecError, match=r"alpha\.yaml waits for beta\.yaml"):
        dependency_order(specs)


def test_an_unknown_dependency_is_a_spec_error_naming_the_file(entity_dir: Path) -> None:
    spec = load_entity(write(entity_dir, variant(lookups=_looks_up("ghost")), "orphans"))
    with pytest.raises(SpecError, match=r"orphans.yaml: entity orphans: lookups.c: no entity 'ghost'"):
        dependency_order({"orphans": spec})
