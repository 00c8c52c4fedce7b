"""A running deployment reads the entity files apart: one that does not load (a scaffold still
being edited, a bad edit) sets aside that entity and those that look it up, never the others."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from d365sync.spec import SpecError, load_entities, load_entities_apart

ENTITIES = Path(__file__).resolve().parents[2] / "include" / "entities"
SHIPPED = {"customers", "inventory", "invoices", "orders", "products"}


@pytest.fixture
def entities(tmp_path: Path) -> Path:
    folder = tmp_path / "entities"
    shutil.copytree(ENTITIES, folder)
    return folder


def test_a_file_still_being_written_sets_aside_only_itself(entities: Path) -> None:
    draft = (entities / "customers.yaml").read_text().replace("owner: dynamics", "owner: TODO", 1)
    (entities / "contacts.yaml").write_text(draft.replace("table: account", "table: contact", 1))
    specs, apart = load_entities_apart(entities)
    assert set(specs) == SHIPPED and set(apart) == {"contacts"}
    assert any("contacts.yaml: entity contacts: field 'name': owner" in issue for issue in apart["contacts"])
    with pytest.raises(SpecError):  # the CLI and the tests stay strict
        load_entities(entities)


def test_a_broken_parent_sets_aside_the_entities_that_look_it_up(entities: Path) -> None:
    (entities / "customers.yaml").write_text("key: [unclosed\n")
    specs, apart = load_entities_apart(entities)
    assert set(apart) == {"customers", "orders", "invoices"}  # orders and invoices look customers up
    assert set(specs) == {"products", "inventory"}
    assert any("no entity 'customers'" in issue for issue in apart["orders"])
