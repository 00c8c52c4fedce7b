"""Spec loading: clear errors naming file, entity and field; defaults; the merge interface."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from d365sync import spec as spec_module
from d365sync.spec import (
    Catalog,
    DynamicsColumnInfo,
    DynamicsTableInfo,
    SpecError,
    deep_merge,
    load_entities,
    load_entity,
    merge_defaults,
)

ENTITIES = Path(__file__).resolve().parents[2] / "include" / "entities"

BASE: dict[str, Any] = {
    "description": "test customers",
    "dynamics": {"table": "account", "entity_set": "accounts", "key": "accountnumber"},
    "erp": {"table": "CUST_MASTER", "key": "CUST_NO"},
    "key": "number",
    "creates": {"to_erp": True, "to_dynamics": True},
    "deletes": {"to_erp": "deactivate", "to_dynamics": "ignore"},
    "fields": {
        "number": {"owner": "erp", "dynamics": "accountnumber", "erp": "CUST_NO", "to_erp": ["trim"]},
        "email": {
            "owner": "dynamics",
            "dynamics": "emailaddress1",
            "erp": "CUST_EMAIL_ID",
            "to_erp": ["email"],
        },
        "city": {
            "owner": "both",
            "dynamics": "address1_city",
            "erp": "CITY",
            "conflict": {"policy": "last_write_wins", "clock_skew_seconds": 30, "winner": "dynamics"},
        },
    },
}


@pytest.fixture
def entity_dir(tmp_path: Path) -> Path:
    shutil.copy(ENTITIES / "_defaults.yaml", tmp_path / "_defaults.yaml")
    return tmp_path


def write(directory: Path, doc: dict[str, Any], name: str = "clients") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def variant(**changes: Any) -> dict[str, Any]:
    """BASE with dotted-path changes; a value of ``...`` deletes the key."""
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


def error_of(directory: Path, doc: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(SpecError) as err:
        load_entity(write(directory, doc), **kwargs)
    return str(err.value)


def test_base_document_loads(entity_dir: Path) -> None:
    spec = load_entity(write(entity_dir, BASE))
    assert spec.name == "clients"
    assert spec.fields["email"].conflict.policy == "owner_wins"  # from _defaults.yaml
    assert spec.dynamics.change_detection.mode == "delta"
    assert spec.erp.change_detection.mode == "cursor"


# -- the acceptance list: each error names file, entity and field ---------------------------
def test_missing_key(entity_dir: Path) -> None:
    assert "clients.yaml: entity clients: key: Field required" in error_of(entity_dir, variant(key=...))


def test_key_that_is_not_a_field(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(key="id"))
    assert "clients.yaml: entity clients: key: 'id' is not a field" in message


def test_missing_dynamics_alternate_key(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(dynamics__key=...))
    assert "clients.yaml: entity clients: dynamics.key: Field required" in message


def test_key_column_that_is_not_an_alternate_key(entity_dir: Path) -> None:
    doc = variant(dynamics__key="name", fields__number__dynamics="name")
    assert "dynamics.key: 'name' is not an alternate key of account" in error_of(entity_dir, doc)


def test_unknown_transform(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(fields__email__to_erp=["shout"]))
    assert "clients.yaml: entity clients: field 'email': to_erp.0: unknown transform 'shout'" in message
    assert "known: aggregate, case, currency" in message


def test_bad_transform_arguments(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(fields__email__to_erp=[{"pad": {"widht": 3}}]))
    assert "field 'email': to_erp.0: transform 'pad'" in message and "widht" in message


def test_unknown_dynamics_column(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(fields__email__dynamics="emailadress1"))
    assert (
        "clients.yaml: entity clients: field 'email': dynamics: unknown account column 'emailadress1'"
        in message
    )


def test_unknown_erp_column_with_hint(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(fields__city__erp="city"))
    assert "field 'city': erp: unknown CUST_MASTER column 'city'; did you mean 'CITY'?" in message


def test_unknown_tables(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(dynamics__table="acount", erp__table="CUSTOMERS"))
    assert "dynamics.table: unknown Dynamics table 'acount'" in message
    assert "erp.table: unknown ERP table 'CUSTOMERS'" in message


def test_unknown_expectation_and_cursor_columns(entity_dir: Path) -> None:
    doc = variant(
        validation={"erp": [{"type": "not_null", "column": "NOPE"}]},
        erp__change_detection={"mode": "cursor", "column": "UPDATED"},
    )
    message = error_of(entity_dir, doc)
    assert "validation.erp.0.column: unknown CUST_MASTER column 'NOPE'" in message
    assert "erp.change_detection.column: unknown CUST_MASTER column 'UPDATED'" in message


def test_unknown_column_in_a_compound_unique_expectation(entity_dir: Path) -> None:
    rule = {"type": "unique", "column": "CUST_NAME", "together_with": ["EMAIL"], "normalize": True}
    message = error_of(entity_dir, variant(validation={"erp": [rule]}))
    assert "validation.erp.0.column: unknown CUST_MASTER column 'EMAIL'" in message


def test_columns_checked_against_a_catalog_passed_in(entity_dir: Path) -> None:
    """A real environment validates against its own metadata: a column it has is accepted."""
    sandbox = Catalog.sandbox()
    account = sandbox.dynamics["account"]
    columns = {**account.columns, "new_loyalty": DynamicsColumnInfo("new_loyalty")}
    real = Catalog(
        {**sandbox.dynamics, "account": DynamicsTableInfo(**{**account.__dict__, "columns": columns})},
        sandbox.erp,
    )
    doc = variant(fields__loyalty={"owner": "dynamics", "dynamics": "new_loyalty"})
    assert "unknown account column 'new_loyalty'" in error_of(entity_dir, doc)
    assert load_entity(write(entity_dir, doc), catalog=real).fields["loyalty"].dynamics == "new_loyalty"


def test_field_owned_by_neither_side(entity_dir: Path) -> None:
    for owner in (..., None, "none"):
        message = error_of(entity_dir, variant(fields__email__owner=owner))
        assert "clients.yaml: entity clients: field 'email': owned by neither side" in message


def test_owner_without_a_column_on_its_side(entity_dir: Path) -> None:
    message = error_of(
        entity_dir, variant(fields__email__erp=None, fields__email__owner="erp", fields__email__to_erp=[])
    )
    assert "field 'email': owner is erp but the field has no erp column" in message


def test_invalid_owner_value(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(fields__email__owner="crm"))
    assert "field 'email': owner: Input should be 'dynamics', 'erp' or 'both'" in message


def test_value_map_declared_bijective_but_not(entity_dir: Path) -> None:
    doc = variant(value_maps={"terms": {"map": {"N30": 1, "N45": 1, "COD": 3}, "bijective": True}})
    message = error_of(entity_dir, doc)
    where = "clients.yaml: entity clients: value_maps.terms: "
    assert where + "declared bijective but not one-to-one: {1: ['N30', 'N45']}" in message


def test_value_map_on_a_both_owned_field_must_be_bijective(entity_dir: Path) -> None:
    doc = variant(
        value_maps={"terms": {"map": {"N30": 1, "N45": 1}}},
        fields__terms={
            "owner": "both",
            "dynamics": "paymenttermscode",
            "erp": "PAY_TERMS",
            "to_dynamics": [{"value_map": {"map": "terms"}}],
            "conflict": {"policy": "owner_wins", "winner": "erp"},
        },
    )
    message = error_of(entity_dir, doc)
    assert "field 'terms' is owned by both sides, so value map 'terms' must be bijective: true" in message
    assert "collisions: {1: ['N30', 'N45']}" in message


def test_both_owned_field_needs_a_winner(entity_dir: Path) -> None:
    doc = variant(fields__city__conflict={"policy": "last_write_wins"})
    assert "field 'city': owned by both sides: conflict.winner must name" in error_of(entity_dir, doc)


def test_unknown_conflict_policy(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(fields__email__conflict={"policy": "first_write_wins"}))
    assert "field 'email': conflict:" in message and "'owner_wins', 'last_write_wins', 'version'" in message


def test_unknown_value_map_and_lookup_in_a_chain(entity_dir: Path) -> None:
    doc = variant(
        fields__email__to_erp=[{"value_map": {"map": "nope"}}],
        fields__city__to_dynamics=[{"lookup": {"target": "vendors", "to": "bind"}}],
    )
    message = error_of(entity_dir, doc)
    assert "field 'email': value map 'nope' is not declared" in message
    assert "field 'city': lookup target 'vendors' is not declared" in message


def test_lookup_column_needs_a_bind(entity_dir: Path) -> None:
    doc = variant(fields__currency={"owner": "erp", "dynamics": "transactioncurrencyid", "erp": "CURR_CODE"})
    assert "transactioncurrencyid is a lookup: to_dynamics must end with" in error_of(entity_dir, doc)


def test_missing_inverse_asks_for_the_other_direction(entity_dir: Path) -> None:
    doc = variant(fields__city__to_erp=[{"aggregate": {"fn": "sum"}}])
    assert "field 'city': from_erp: transform 'aggregate' has no inverse" in error_of(entity_dir, doc)


def test_custom_transform_import_failure_names_the_field(
    entity_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("D365SYNC_TRANSFORM_MODULES", "nowhere")
    doc = variant(fields__city__from_erp=[{"custom": {"function": "nowhere.mod:fix"}}])
    assert "field 'city': cannot import custom transform 'nowhere.mod:fix'" in error_of(entity_dir, doc)


def test_delta_is_dynamics_only(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(erp__change_detection={"mode": "delta"}))
    assert (
        "clients.yaml: entity clients: erp.change_detection: delta tokens exist only in Dynamics" in message
    )


def test_schedule_must_be_cron(entity_dir: Path) -> None:
    message = error_of(entity_dir, variant(schedule="every hour"))
    assert "schedule: 'every hour' is not a cron expression or @preset" in message


def test_typo_in_a_key_is_refused(entity_dir: Path) -> None:
    assert "owenr: Extra inputs are not permitted" in error_of(
        entity_dir, variant(fields__email__owenr="erp")
    )


def test_name_must_match_file(entity_dir: Path) -> None:
    assert "name: 'customers' must equal the file name 'clients'" in error_of(
        entity_dir, variant(name="customers")
    )


def test_all_problems_of_a_directory_are_reported_together(entity_dir: Path) -> None:
    write(entity_dir, variant(key=...), "one")
    write(entity_dir, variant(fields__email__owner=None), "two")
    write(
        entity_dir,
        variant(lookups={"c": {"kind": "entity", "entity": "ghost", "dynamics_table": "account"}}),
        "three",
    )
    with pytest.raises(SpecError) as err:
        load_entities(entity_dir)
    text = str(err.value)
    assert "one.yaml: entity one: key" in text and "two.yaml: entity two: field 'email'" in text
    assert "three.yaml: entity three: lookups.c: no entity 'ghost'" in text


def test_grouping_needs_a_key_prefix(entity_dir: Path) -> None:
    doc = variant(erp__key="CUST_NAME", erp__grouped=True, fields__number__erp="CUST_NAME")
    assert "erp.key: grouping needs a prefix of the key of CUST_MASTER" in error_of(entity_dir, doc)


def test_a_status_reason_may_not_drag_a_state_the_other_side_owns(entity_dir: Path) -> None:
    """Issue 10: the ERP's ship status as statuscode moved the Dynamics-owned statecode."""
    doc = yaml.safe_load((ENTITIES / "orders.yaml").read_text(encoding="utf-8"))
    doc["value_maps"]["ship_status"] = {"map": {"N": 1, "P": 100002, "S": 100001}}
    doc["fields"]["fulfilment"]["dynamics"] = "statuscode"
    doc["examples"] = {}
    with pytest.raises(SpecError) as err:
        load_entity(write(entity_dir, doc, "orders"))
    message = str(err.value)
    assert "orders.yaml: entity orders: field 'status' (owner dynamics) maps statecode, " in message
    assert (
        "field 'fulfilment' (owner erp) maps statuscode: Dataverse moves statecode and statuscode" in message
    )
    # one owner for both is fine (the order state and its reason both from Dynamics)
    doc["fields"]["fulfilment"]["owner"] = "dynamics"
    assert load_entity(write(entity_dir, doc, "orders")).fields["fulfilment"].dynamics == "statuscode"


# -- defaults ---------------------------------------------------------------------------------
def test_deep_merge_replaces_a_different_union_variant() -> None:
    base = {"change_detection": {"mode": "cursor", "column": "LAST_UPD", "overlap_seconds": 300}, "x": 1}
    assert deep_merge(base, {"change_detection": {"mode": "snapshot"}})["change_detection"] == {
        "mode": "snapshot"
    }
    merged = deep_merge(base, {"change_detection": {"mode": "cursor", "overlap_seconds": 60}})
    assert merged["change_detection"] == {"mode": "cursor", "column": "LAST_UPD", "overlap_seconds": 60}


def test_field_defaults_precedence() -> None:
    defaults = {"field": {"conflict": {"policy": "owner_wins"}, "on_non_owner_change": "revert"}}
    doc = {
        "field_defaults": {"conflict": {"policy": "manual_review"}},
        "fields": {"a": {}, "b": {"on_non_owner_change": "report"}},
    }
    merged = merge_defaults(defaults, doc)
    assert merged["fields"]["a"] == {"conflict": {"policy": "manual_review"}, "on_non_owner_change": "revert"}
    assert merged["fields"]["b"]["on_non_owner_change"] == "report"
    assert "field_defaults" not in merged


def test_unknown_defaults_keys_are_refused(entity_dir: Path) -> None:
    (entity_dir / "_defaults.yaml").write_text("entities: {}\n", encoding="utf-8")
    with pytest.raises(
        SpecError, match=r"_defaults.yaml: entity defaults: unknown top-level keys \['entities'\]"
    ):
        load_entities(entity_dir)


# -- interfaces --------------------------------------------------------------------------------
def test_merge_fields_expose_exact_values() -> None:
    specs = load_entities(ENTITIES)
    city = {m.name: m for m in specs["customers"].merge_fields()}["city"]
    assert (city.owner, city.policy, city.winner, city.clock_skew_seconds) == (
        "both",
        "last_write_wins",
        "dynamics",
        120,
    )
    assert city.on_non_owner_change == "revert" and city.sides == ("dynamics", "erp")
    total = {m.name: m for m in specs["invoices"].merge_fields()}["total"]
    assert (total.owner, total.policy, total.winner) == ("erp", "manual_review", "erp")
    fulfilment = {m.name: m for m in specs["orders"].merge_fields()}["fulfilment"]
    assert (fulfilment.owner, fulfilment.on_non_owner_change) == ("erp", "revert")
    assert specs["orders"].fields["fulfilment"].dynamics == "new_shipstatus"


def test_merge_rules_build_the_merge_modules_types() -> None:
    specs = load_entities(ENTITIES)
    rules = specs["customers"].merge_rules()
    city = {r.name: r for r in rules.fields}["city"]
    assert (city.owner, city.policy, city.skew_seconds, city.prefer) == (
        "both",
        "last_write_wins",
        120,
        "dynamics",
    )
    assert rules.direction == "both"
    assert (rules.delete_policy.dynamics_to_erp, rules.delete_policy.erp_to_dynamics) == (
        "deactivate",
        "deactivate",
    )
    assert specs["orders"].merge_rules().direction == "dynamics_to_erp"
    assert specs["inventory"].merge_rules().direction == "none"
    assert {r.name: r for r in specs["invoices"].merge_rules().fields}["total"].policy == "manual_review"


def test_erp_table_spec_follows_delete_policy() -> None:
    specs = load_entities(ENTITIES)
    assert specs["orders"].erp_table_spec().inactive_status == "X"
    stock = specs["inventory"].erp_table_spec()
    assert stock.key == ("ITEM_NO", "WHSE") and "LAST_UPD" not in stock.column_names
    assert "REMARKS" not in specs["customers"].erp_table_spec().column_names


def test_every_config_field_is_described() -> None:
    models = [
        obj
        for obj in vars(spec_module).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == spec_module.__name__
    ]
    missing = [f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items() if not f.description]
    assert missing == []


def test_spec_import_stays_light() -> None:
    code = (
        "import sys, d365sync.spec\n"
        "heavy = ('pandas', 'great_expectations', 'airflow', 'pyodbc', 'requests', 'sqlalchemy')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_gx_expectation_classes_exist() -> None:
    gxe = pytest.importorskip("great_expectations.expectations")
    specs = load_entities(ENTITIES)
    names = {
        e.gx()[0] for s in specs.values() for side in ("dynamics", "erp") for e in getattr(s.validation, side)
    }
    assert names and all(hasattr(gxe, n) for n in names)
