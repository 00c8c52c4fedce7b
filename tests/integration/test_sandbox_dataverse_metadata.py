"""``EntityDefinitions`` answers in the shapes the Dataverse Web API uses (issue 12, fidelity).

Reference: "Query table definitions using the Web API" and the metadata entity type reference
(EntityMetadata, AttributeMetadata and subtypes, EntityKeyMetadata, BooleanManagedProperty,
AttributeRequiredLevelManagedProperty, Label/LocalizedLabel). Every complex value the sandbox
returns is also checked against the complex type ``$metadata`` declares for it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
import requests

from d365sync.sandbox.dataverse.process import DataverseSandbox
from d365sync.sandbox.dataverse.schema import TABLES

EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
NS = "Microsoft.Dynamics.CRM"
MANAGED_KEYS = {"Value", "CanBeChanged", "ManagedPropertyLogicalName"}
LABEL_KEYS = {"Label", "LanguageCode", "IsManaged", "MetadataId", "HasChanged"}


def _get(sandbox: DataverseSandbox, path: str) -> requests.Response:
    return requests.get(f"{sandbox.api_url}/{path}", headers=sandbox.headers(), timeout=30)


def _ok(sandbox: DataverseSandbox, path: str) -> dict[str, Any]:
    response = _get(sandbox, path)
    assert response.status_code == 200, response.text
    return response.json()


def _assert_managed(value: Any, logical_name: str, expected: Any = None) -> None:
    assert set(value) == MANAGED_KEYS, value
    assert value["ManagedPropertyLogicalName"] == logical_name
    assert isinstance(value["CanBeChanged"], bool)
    if expected is not None:
        assert value["Value"] == expected


def _assert_label(value: Any, text: str | None) -> None:
    assert set(value) == {"LocalizedLabels", "UserLocalizedLabel"}
    if text is None:
        assert value == {"LocalizedLabels": [], "UserLocalizedLabel": None}
        return
    (localized,) = value["LocalizedLabels"]
    assert set(localized) == LABEL_KEYS and localized == value["UserLocalizedLabel"]
    assert (localized["Label"], localized["LanguageCode"], localized["HasChanged"]) == (text, 1033, None)


def test_entity_metadata_managed_properties_labels_and_plain_flags(
    dataverse_sandbox: DataverseSandbox,
) -> None:
    account = _ok(dataverse_sandbox, "EntityDefinitions(LogicalName='account')")
    assert "@odata.type" not in account  # EntityMetadata is the declared type
    assert account["@odata.context"].endswith("/$metadata#EntityDefinitions/$entity")
    _assert_managed(account["CanChangeTrackingBeEnabled"], "canchangetrackingbeenabled", True)
    _assert_managed(account["IsAuditEnabled"], "canmodifyauditsettings")
    _assert_managed(account["IsCustomizable"], "iscustomizable", True)
    _assert_managed(account["IsRenameable"], "isrenameable")
    _assert_managed(account["CanCreateAttributes"], "cancreateattributes", True)
    _assert_managed(account["IsDuplicateDetectionEnabled"], "canmodifyduplicatedetectionsettings")
    # Plain booleans on a table (IsValidForAdvancedFind is only a managed property on a column).
    for name in (
        "ChangeTrackingEnabled",
        "IsValidForAdvancedFind",
        "IsCustomEntity",
        "IsManaged",
        "IsPrivate",
    ):
        assert isinstance(account[name], bool), name
    assert account["ChangeTrackingEnabled"] is True
    _assert_label(account["DisplayName"], "Account")
    _assert_label(account["DisplayCollectionName"], "Accounts")
    assert account["Description"]["UserLocalizedLabel"]["Label"].startswith("Business that represents")
    assert account["OwnershipType"] == "UserOwned" and account["HasChanged"] is None
    salesorder = _ok(dataverse_sandbox, "EntityDefinitions(LogicalName='salesorder')?$select=DisplayName")
    _assert_label(salesorder["DisplayName"], "Order")


def test_attribute_metadata_types_managed_properties_and_subtype_properties(
    dataverse_sandbox: DataverseSandbox,
) -> None:
    rows = _ok(dataverse_sandbox, "EntityDefinitions(LogicalName='account')/Attributes")["value"]
    by_name = {a["LogicalName"]: a for a in rows}
    assert {a["@odata.type"] for a in rows} >= {
        f"#{NS}.{t}"
        for t in ("StringAttributeMetadata", "DateTimeAttributeMetadata", "LookupAttributeMetadata")
    }
    for attribute in rows:
        for name in (
            "IsValidForCreate",
            "IsValidForUpdate",
            "IsValidForRead",
            "IsPrimaryId",
            "IsCustomAttribute",
        ):
            assert isinstance(attribute[name], bool), (attribute["LogicalName"], name)
        _assert_managed(attribute["IsAuditEnabled"], "canmodifyauditsettings")
        _assert_managed(attribute["IsCustomizable"], "iscustomizable")
        _assert_managed(attribute["IsValidForAdvancedFind"], "canmodifysearchsettings")
        _assert_managed(attribute["RequiredLevel"], "canmodifyrequirementlevelsettings")
        assert attribute["RequiredLevel"]["Value"] in {"None", "ApplicationRequired", "SystemRequired"}
        assert attribute["AttributeTypeName"] == {"Value": f"{attribute['AttributeType']}Type"}
        _assert_label(attribute["Description"], None)

    name = by_name["name"]
    assert name["@odata.type"] == f"#{NS}.StringAttributeMetadata"
    assert (name["MaxLength"], name["Format"], name["FormatName"]) == (160, "Text", {"Value": "Text"})
    assert name["RequiredLevel"]["Value"] == "ApplicationRequired" and name["IsPrimaryName"] is True
    _assert_label(name["DisplayName"], "Name")
    assert by_name["emailaddress1"]["Format"] == "Email"
    assert by_name["accountid"]["RequiredLevel"] == {
        "Value": "SystemRequired",
        "CanBeChanged": False,
        "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
    }
    assert by_name["accountid"]["IsValidForUpdate"] is False
    modifiedon = by_name["modifiedon"]
    assert (modifiedon["DateTimeBehavior"], modifiedon["Format"]) == ({"Value": "UserLocal"}, "DateAndTime")
    _assert_managed(modifiedon["CanChangeDateTimeBehavior"], "canchangedatetimebehavior", False)
    assert modifiedon["IsValidForCreate"] is False and modifiedon["IsValidForUpdate"] is False
    assert by_name["creditlimit"]["@odata.type"] == f"#{NS}.MoneyAttributeMetadata"
    assert by_name["creditlimit"]["MinValue"] == 0 and by_name["creditlimit"]["Precision"] == 2
    assert by_name["transactioncurrencyid"]["Targets"] == ["transactioncurrency"]
    assert by_name["ownerid"]["AttributeType"] == "Owner"
    custom = _ok(
        dataverse_sandbox,
        "EntityDefinitions(LogicalName='salesorder')/Attributes(LogicalName='new_shipstatus')",
    )
    assert custom["IsCustomAttribute"] is True and custom["IsManaged"] is False
    assert custom["IsCustomizable"]["CanBeChanged"] is True
    assert custom["DisplayName"]["UserLocalizedLabel"]["IsManaged"] is False


def test_keys_are_entity_key_metadata(dataverse_sandbox: DataverseSandbox) -> None:
    (key,) = _ok(dataverse_sandbox, "EntityDefinitions(LogicalName='account')/Keys")["value"]
    assert "@odata.type" not in key
    assert key["KeyAttributes"] == ["accountnumber"] and key["EntityKeyIndexStatus"] == "Active"
    assert (key["LogicalName"], key["EntityLogicalName"], key["IsManaged"]) == (
        "accountnumber_key",
        "account",
        False,
    )
    _assert_managed(key["IsCustomizable"], "iscustomizable", True)
    assert key["DisplayName"]["UserLocalizedLabel"]["LanguageCode"] == 1033
    expanded = _ok(
        dataverse_sandbox, "EntityDefinitions(LogicalName='account')?$select=LogicalName&$expand=Keys"
    )
    assert expanded["Keys"] == [key]


def test_select_expand_and_context_as_airbyte_asks(dataverse_sandbox: DataverseSandbox) -> None:
    body = _ok(
        dataverse_sandbox,
        "EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute,CanChangeTrackingBeEnabled,"
        "ChangeTrackingEnabled&$expand=Attributes($select=LogicalName,AttributeType)",
    )
    assert body["@odata.context"].endswith(
        "$metadata#EntityDefinitions(LogicalName,EntitySetName,PrimaryIdAttribute,CanChangeTrackingBeEnabled,"
        "ChangeTrackingEnabled,Attributes(LogicalName,AttributeType))"
    )
    assert {row["LogicalName"] for row in body["value"]} == set(TABLES)
    for row in body["value"]:
        assert set(row) == {
            "MetadataId",
            "LogicalName",
            "EntitySetName",
            "PrimaryIdAttribute",
            "CanChangeTrackingBeEnabled",
            "ChangeTrackingEnabled",
            "Attributes",
        }
        assert row["CanChangeTrackingBeEnabled"]["Value"] is True and isinstance(
            row["ChangeTrackingEnabled"], bool
        )
        assert all(
            set(a) == {"@odata.type", "MetadataId", "LogicalName", "AttributeType"} for a in row["Attributes"]
        )


def test_cast_to_a_derived_attribute_type(dataverse_sandbox: DataverseSandbox) -> None:
    path = (
        "EntityDefinitions(LogicalName='invoice')/Attributes/Microsoft.Dynamics.CRM.DateTimeAttributeMetadata"
    )
    body = _ok(dataverse_sandbox, f"{path}?$select=LogicalName,DateTimeBehavior")
    assert body["@odata.context"].endswith(
        f"$metadata#EntityDefinitions('invoice')/Attributes/{NS}.DateTimeAttributeMetadata"
        "(LogicalName,DateTimeBehavior)"
    )
    rows = {row["LogicalName"]: row for row in body["value"]}
    assert set(rows) == {"createdon", "modifiedon", "duedate"}
    # The cast type is the declared type, so no @odata.type; MetadataId always comes back.
    assert all(set(r) == {"MetadataId", "LogicalName", "DateTimeBehavior"} for r in rows.values())
    assert rows["duedate"]["DateTimeBehavior"] == {"Value": "UserLocal"}

    one = _ok(
        dataverse_sandbox,
        "EntityDefinitions(LogicalName='invoice')/Attributes(LogicalName='duedate')/"
        "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata",
    )
    assert one["LogicalName"] == "duedate" and "@odata.type" not in one and one["Format"] == "DateAndTime"
    assert one["@odata.context"].endswith(f"/Attributes/{NS}.DateTimeAttributeMetadata/$entity")
    picklists = _ok(
        dataverse_sandbox,
        "EntityDefinitions(LogicalName='salesorder')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
        "?$select=LogicalName",
    )["value"]
    assert {p["LogicalName"] for p in picklists} == {"new_shipstatus"}
    assert (
        _get(
            dataverse_sandbox,
            "EntityDefinitions(LogicalName='account')/Attributes/Microsoft.Dynamics.CRM.Nope",
        ).status_code
        == 404
    )
    mismatch = _get(
        dataverse_sandbox,
        "EntityDefinitions(LogicalName='account')/Attributes(LogicalName='name')/"
        "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata",
    )
    assert mismatch.status_code == 404


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("$filter=ObjectTypeCode gt 1000 and ObjectTypeCode lt 1100", {"product", "salesorder", "invoice"}),
        (
            "$filter=CanChangeTrackingBeEnabled/Value eq true and ChangeTrackingEnabled eq true",
            {name for name, table in TABLES.items() if table.change_tracking},
        ),
        (f"$filter=OwnershipType eq {NS}.OwnershipTypes'UserOwned' and IsPrivate eq false", set(TABLES)),
        ("$filter=startswith(LogicalName,'trans') or IsCustomizable/Value eq false", {"transactioncurrency"}),
        (
            "$filter=PrimaryImageAttribute eq null and EntitySetName ne 'accounts' and ObjectTypeCode le 2",
            {"contact"},
        ),
    ],
)
def test_metadata_filter(dataverse_sandbox: DataverseSandbox, query: str, expected: set[str]) -> None:
    rows = _ok(dataverse_sandbox, f"EntityDefinitions?$select=LogicalName&{query}")["value"]
    assert {row["LogicalName"] for row in rows} == expected


def test_attribute_filter_on_required_level_and_enum_literal(dataverse_sandbox: DataverseSandbox) -> None:
    required = _ok(
        dataverse_sandbox,
        "EntityDefinitions(LogicalName='account')/Attributes?$select=LogicalName"
        f"&$filter=RequiredLevel/Value eq {NS}.AttributeRequiredLevel'ApplicationRequired'",
    )["value"]
    assert {a["LogicalName"] for a in required} == {"name"}
    long_strings = _ok(
        dataverse_sandbox,
        "EntityDefinitions(LogicalName='account')?$select=LogicalName"
        "&$expand=Attributes($select=LogicalName;$filter=MaxLength ge 250)",
    )["Attributes"]
    assert {a["LogicalName"] for a in long_strings} == {
        "address1_line1",
        "address1_line2",
        "address1_line3",
        "description",
    }
    bad = _get(dataverse_sandbox, "EntityDefinitions?$filter=NoSuchProperty eq 1")
    assert bad.status_code == 400 and "NoSuchProperty" in bad.json()["error"]["message"]


def _declared(csdl: ET.Element) -> dict[str, ET.Element]:
    (schema,) = csdl.iter(f"{EDM}Schema")
    return {
        f"{NS}.{t.get('Name')}": t
        for kind in ("EntityType", "ComplexType", "EnumType")
        for t in schema.findall(f"{EDM}{kind}")
    }


def _members(declared: dict[str, ET.Element], type_name: str) -> dict[str, str]:
    element = declared[type_name]
    found = {p.get("Name", ""): p.get("Type", "") for p in element.findall(f"{EDM}Property")}
    base = element.get("BaseType")
    return {**_members(declared, base.replace("mscrm.", f"{NS}.")), **found} if base else found


def _check(declared: dict[str, ET.Element], type_ref: str, value: Any, where: str) -> None:
    """``value`` fits ``type_ref`` as $metadata declares it (complex types member by member)."""
    if value is None:
        return
    if type_ref.startswith("Collection("):
        assert isinstance(value, list), where
        for index, item in enumerate(value):
            _check(declared, type_ref[len("Collection(") : -1], item, f"{where}[{index}]")
        return
    qualified = type_ref.replace("mscrm.", f"{NS}.")
    element = declared.get(qualified)
    if element is None:  # Edm primitive
        primitive = {"Edm.Boolean": bool, "Edm.String": str, "Edm.Int32": int, "Edm.Guid": str}.get(type_ref)
        if primitive is not None:
            assert isinstance(value, primitive), (where, value)
        return
    if element.tag == f"{EDM}EnumType":
        assert value in {m.get("Name") for m in element.findall(f"{EDM}Member")}, (where, value)
        return
    members = _members(declared, qualified)
    assert isinstance(value, dict) and set(value) <= set(members), (where, value, sorted(members))
    for key, item in value.items():
        _check(declared, members[key], item, f"{where}.{key}")


def test_every_value_matches_its_declared_type(dataverse_sandbox: DataverseSandbox) -> None:
    declared = _declared(ET.fromstring(_get(dataverse_sandbox, "$metadata").content))
    rows = _ok(dataverse_sandbox, "EntityDefinitions?$expand=Attributes,Keys")["value"]
    for row in rows:
        name = row["LogicalName"]
        entity = {k: v for k, v in row.items() if k not in ("Attributes", "Keys")}
        _check(declared, f"{NS}.EntityMetadata", entity, name)
        for key in row["Keys"]:
            _check(declared, f"{NS}.EntityKeyMetadata", key, f"{name} key {key['LogicalName']}")
        for attribute in row["Attributes"]:
            typed = {k: v for k, v in attribute.items() if k != "@odata.type"}
            _check(
                declared,
                attribute["@odata.type"].removeprefix("#"),
                typed,
                f"{name}.{attribute['LogicalName']}",
            )
