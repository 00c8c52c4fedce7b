"""Metadata endpoints: service document, ``$metadata`` (CSDL), ``EntityDefinitions`` and WhoAmI.

All of it is generated from :mod:`.schema`.  ``EntityDefinitions`` supports the requests the
Microsoft Python SDK makes to resolve entity set names and attributes
(``$select``, ``$filter=LogicalName eq '…'``, ``(LogicalName='…')``, ``/Attributes``, ``/Keys``,
``$expand=Attributes|Keys``).  As in OData, ``$select`` never drops an expanded navigation
property.  ``$metadata`` declares ``EntityDefinitions`` too (``EntityMetadata`` with its ``Keys`` and
``Attributes`` and the attribute subtypes named by ``@odata.type``), so every entity set in the
service document can be typed from the CSDL.  A lookup shows there as Dataverse shows it: an
``Edm.Guid`` property ``_x_value``, a single-valued navigation property whose referential
constraint names that property, and its partner, a collection-valued navigation property on the
target table (both bound in the entity sets).
"""

from __future__ import annotations

import uuid
from typing import Any
from xml.sax.saxutils import quoteattr

from odata_query import ast

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.config import SandboxConfig
from d365sync.sandbox.dataverse.filters import parse
from d365sync.sandbox.dataverse.protocol import (
    ApiRequest,
    ApiResponse,
    json_response,
    parse_key_values,
    parse_segment,
    split_top_level,
)
from d365sync.sandbox.dataverse.schema import (
    METADATA_NAMESPACE,
    STRING_TYPES,
    TABLES,
    AlternateKey,
    AttrType,
    Column,
    NavLink,
    Table,
    schema_name,
)

_METADATA_TYPES = {
    AttrType.UNIQUEIDENTIFIER: "UniqueIdentifierAttributeMetadata",
    AttrType.STRING: "StringAttributeMetadata",
    AttrType.MEMO: "MemoAttributeMetadata",
    AttrType.INTEGER: "IntegerAttributeMetadata",
    AttrType.BIGINT: "BigIntAttributeMetadata",
    AttrType.DECIMAL: "DecimalAttributeMetadata",
    AttrType.MONEY: "MoneyAttributeMetadata",
    AttrType.BOOLEAN: "BooleanAttributeMetadata",
    AttrType.DATETIME: "DateTimeAttributeMetadata",
    AttrType.PICKLIST: "PicklistAttributeMetadata",
    AttrType.STATE: "StateAttributeMetadata",
    AttrType.STATUS: "StatusAttributeMetadata",
    AttrType.LOOKUP: "LookupAttributeMetadata",
    AttrType.CUSTOMER: "LookupAttributeMetadata",
    AttrType.OWNER: "LookupAttributeMetadata",
}


def _label(text: str) -> dict[str, Any]:
    localized = {"Label": text, "LanguageCode": 1033}
    return {"LocalizedLabels": [localized], "UserLocalizedLabel": localized}


def entity_definition(table: Table) -> dict[str, Any]:
    return {
        "@odata.type": "#Microsoft.Dynamics.CRM.EntityMetadata",
        "MetadataId": table.metadata_id,
        "LogicalName": table.logical_name,
        "SchemaName": schema_name(table.logical_name),
        "EntitySetName": table.entity_set,
        "LogicalCollectionName": table.entity_set,
        "CollectionSchemaName": schema_name(table.entity_set),
        "PrimaryIdAttribute": table.primary_id,
        "PrimaryNameAttribute": table.primary_name,
        "ObjectTypeCode": table.object_type_code,
        "ChangeTrackingEnabled": table.change_tracking,
        "IsCustomEntity": False,
        "IsPrivate": False,
        "IsActivity": False,
        "IsIntersect": False,
        "TableType": "Standard",
        "OwnershipType": "UserOwned",
        "DisplayName": _label(schema_name(table.logical_name)),
    }


def attribute_definition(table: Table, column: Column) -> dict[str, Any]:
    required = (
        "SystemRequired"
        if column.name == table.primary_id
        else ("ApplicationRequired" if column.required else "None")
    )
    data: dict[str, Any] = {
        "@odata.type": f"#Microsoft.Dynamics.CRM.{_METADATA_TYPES[column.type]}",
        "MetadataId": str(uuid.uuid5(METADATA_NAMESPACE, f"attribute:{table.logical_name}.{column.name}")),
        "LogicalName": column.name,
        "SchemaName": schema_name(column.name),
        "EntityLogicalName": table.logical_name,
        "AttributeType": column.type.value,
        "AttributeTypeName": {"Value": f"{column.type.value}Type"},
        "IsPrimaryId": column.name == table.primary_id,
        "IsPrimaryName": column.name == table.primary_name,
        "IsValidForCreate": not column.readonly,
        "IsValidForUpdate": not column.readonly and column.name != table.primary_id,
        "IsValidForRead": True,
        "IsCustomAttribute": column.custom,
        "RequiredLevel": {
            "Value": required,
            "CanBeChanged": True,
            "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
        },
        "DisplayName": _label(column.name),
    }
    if column.type in STRING_TYPES:
        data["MaxLength"] = column.max_length
    if column.is_lookup:
        data["Targets"] = list(column.targets)
    if column.min_value is not None:
        data["MinValue"], data["MaxValue"] = column.min_value, column.max_value
    return data


def key_definition(table: Table, key: AlternateKey) -> dict[str, Any]:
    return {
        "MetadataId": str(uuid.uuid5(METADATA_NAMESPACE, f"key:{table.logical_name}.{key.name}")),
        "LogicalName": key.name,
        "SchemaName": key.name,
        "EntityLogicalName": table.logical_name,
        "KeyAttributes": list(key.attributes),
        "EntityKeyIndexStatus": "Active",
        "DisplayName": _label(key.name),
    }


# -- a tiny in-memory $filter evaluator for metadata collections ------------------------------
def _evaluate(node: ast._Node, item: dict[str, Any]) -> Any:
    if isinstance(node, ast.BoolOp):
        left = _evaluate(node.left, item)
        return (
            (left and _evaluate(node.right, item))
            if isinstance(node.op, ast.And)
            else (left or _evaluate(node.right, item))
        )
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate(node.operand, item)
    if isinstance(node, ast.Compare):
        left, right = _evaluate(node.left, item), _evaluate(node.right, item)
        ops = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}
        op = ops.get(type(node.comparator))
        if op is None:
            raise errors.bad_request("Only eq and ne are supported on metadata queries.")
        return op(left, right)
    if isinstance(node, ast.Identifier):
        if node.name not in item:
            raise errors.bad_request(f"Could not find a property named '{node.name}' on the metadata type.")
        return item[node.name]
    if isinstance(node, ast.Attribute):
        owner = _evaluate(node.owner, item)
        return owner.get(node.attr) if isinstance(owner, dict) else None
    if isinstance(node, ast.Boolean):
        return node.val.lower() == "true"
    if isinstance(node, ast.Null):
        return None
    if isinstance(node, ast.Integer):
        return int(node.val)
    if isinstance(node, ast.String | ast.GUID):
        return node.val
    if isinstance(node, ast.Call) and node.func.name in ("contains", "startswith", "endswith"):
        subject, needle = (_evaluate(a, item) for a in node.args)
        subject, needle = str(subject or "").lower(), str(needle or "").lower()
        return {"contains": needle in subject, "startswith": subject.startswith(needle)}.get(
            node.func.name, subject.endswith(needle)
        )
    raise errors.bad_request("Unsupported expression in metadata $filter.")


def _shape(
    items: list[dict[str, Any]],
    req_select: str | None,
    req_filter: str | None,
    expanded: frozenset[str] = frozenset(),
) -> list[dict]:
    """Apply ``$filter`` and ``$select``; ``expanded`` navigation properties survive ``$select``."""
    if req_filter:
        tree = parse(req_filter)
        items = [i for i in items if _evaluate(tree, i)]
    if req_select:
        names = {n.strip() for n in req_select.split(",")} | expanded | {"@odata.type", "MetadataId"}
        items = [{k: v for k, v in i.items() if k in names} for i in items]
    return items


def _expanded_names(text: str | None) -> frozenset[str]:
    """The navigation property names in an ``$expand`` value (``Keys($select=…),Attributes``)."""
    return frozenset(item.partition("(")[0].strip() for item in split_top_level(text or "") if item.strip())


def _expand(table: Table, entity: dict[str, Any], text: str | None) -> dict[str, Any]:
    for item in split_top_level(text or ""):
        name, _, rest = item.partition("(")
        options = (
            dict(
                (o.partition("=")[0].strip(), o.partition("=")[2])
                for o in split_top_level(rest.rstrip(")"), ";")
            )
            if rest
            else {}
        )
        if name == "Attributes":
            children = [attribute_definition(table, c) for c in table.columns]
        elif name == "Keys":
            children = [key_definition(table, k) for k in table.keys]
        elif name == "OptionSet":
            continue
        else:
            raise errors.bad_request(f"Could not find a property named '{name}' on type 'EntityMetadata'.")
        entity[name] = _shape(children, options.get("$select"), options.get("$filter"))
    return entity


def _find_table(key: str) -> Table:
    values = parse_key_values(key) if "=" in key else {"MetadataId": key.strip()}
    wanted = values.get("LogicalName") or values.get("MetadataId")
    for table in TABLES.values():
        if wanted in (table.logical_name, table.metadata_id):
            return table
    raise errors.not_found(f"Could not find entity with key {key}.", errors.OBJECT_DOES_NOT_EXIST)


def entity_definitions(req: ApiRequest, segments: list[str]) -> ApiResponse:
    """``EntityDefinitions`` and its sub-resources (read-only)."""
    if req.method != "GET":
        raise errors.DataverseError(
            405, errors.METHOD_NOT_ALLOWED, "The sandbox metadata is read-only; only GET is supported."
        )
    _, key = parse_segment(segments[0])
    select, filter_text, expand = req.param("$select"), req.param("$filter"), req.param("$expand")
    base = f"{req.api_url}/$metadata#EntityDefinitions"
    expanded = _expanded_names(expand)
    if key is None:
        if len(segments) > 1:
            raise errors.segment_not_found(segments[1])
        items = [_expand(t, entity_definition(t), expand) for t in TABLES.values()]
        value = _shape(items, select, filter_text, expanded)
        return json_response(200, {"@odata.context": base, "value": value})
    table = _find_table(key)
    if len(segments) == 1:
        entity = _shape([_expand(table, entity_definition(table), expand)], select, None, expanded)[0]
        return json_response(200, {"@odata.context": f"{base}/$entity", **entity})
    child, child_key = parse_segment(segments[1])
    if child == "Attributes":
        items = [attribute_definition(table, c) for c in table.columns]
    elif child == "Keys":
        items = [key_definition(table, k) for k in table.keys]
    else:
        raise errors.segment_not_found(child)
    context = f"{base}({table.metadata_id})/{child}"
    if child_key is None:
        return json_response(200, {"@odata.context": context, "value": _shape(items, select, filter_text)})
    wanted = parse_key_values(child_key).get("LogicalName") if "=" in child_key else child_key.strip()
    match = [i for i in items if wanted in (i["LogicalName"], i["MetadataId"])]
    if not match:
        raise errors.not_found(f"Could not find {child} with key {child_key}.")
    return json_response(200, {"@odata.context": f"{context}/$entity", **_shape(match, select, None)[0]})


def service_document(req: ApiRequest) -> ApiResponse:
    sets = [{"name": t.entity_set, "kind": "EntitySet", "url": t.entity_set} for t in TABLES.values()]
    sets.append({"name": "EntityDefinitions", "kind": "EntitySet", "url": "EntityDefinitions"})
    return json_response(200, {"@odata.context": f"{req.api_url}/$metadata", "value": sets})


def who_am_i(req: ApiRequest, config: SandboxConfig) -> ApiResponse:
    return json_response(
        200,
        {
            "@odata.context": f"{req.api_url}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            "BusinessUnitId": config.business_unit_id,
            "UserId": req.caller.user.systemuserid,
            "OrganizationId": config.organization_id,
        },
    )


def _property_xml(column: Column) -> str:
    name = quoteattr(column.value_name)
    extra = f' MaxLength="{column.max_length}"' if column.type in STRING_TYPES and column.max_length else ""
    return f'<Property Name={name} Type="{column.edm_type}"{extra} />'


def _entity_type_xml(table: Table) -> str:
    lines = [
        f'<EntityType Name="{table.logical_name}">',
        f'<Key><PropertyRef Name="{table.primary_id}" /></Key>',
    ]
    lines += [_property_xml(c) for c in table.columns]
    lines += [_lookup_navigation_xml(link) for link in table.navigations()]
    lines += [_partner_navigation_xml(link) for link in table.partners()]
    lines.append("</EntityType>")
    return "".join(lines)


def _lookup_navigation_xml(link: NavLink) -> str:
    """A lookup's single-valued navigation property, as Dataverse declares it (``Nullable`` false,
    the relationship as ``Partner``, the ``_x_value`` property as referential constraint)."""
    return (
        f'<NavigationProperty Name="{link.name}" Type="mscrm.{link.target}" Nullable="false" '
        f'Partner="{link.partner}"><ReferentialConstraint Property="{link.column.value_name}" '
        f'ReferencedProperty="{TABLES[link.target].primary_id}" /></NavigationProperty>'
    )


def _partner_navigation_xml(link: NavLink) -> str:
    """The collection-valued side of a lookup's relationship, on the table it points at."""
    return (
        f'<NavigationProperty Name="{link.partner}" Type="Collection(mscrm.{link.table})" '
        f'Partner="{link.name}" />'
    )


def _entity_set_xml(table: Table) -> str:
    bindings = "".join(
        f'<NavigationPropertyBinding Path="{path}" Target="{TABLES[target].entity_set}" />'
        for path, target in (
            *((link.name, link.target) for link in table.navigations()),
            *((link.partner, link.table) for link in table.partners()),
        )
    )
    tracking = (
        '<Annotation Term="Org.OData.Capabilities.V1.ChangeTracking"><Record>'
        f'<PropertyValue Property="Supported" Bool="{str(table.change_tracking).lower()}" />'
        "</Record></Annotation>"
    )
    return (
        f'<EntitySet Name="{table.entity_set}" EntityType="Microsoft.Dynamics.CRM.{table.logical_name}">'
        f"{bindings}{tracking}</EntitySet>"
    )


# -- CSDL for the metadata types behind EntityDefinitions -------------------------------------
# Same names and shapes as real Dataverse, cut down to the properties the sandbox returns.
_STR, _BOOL, _LABEL = "Edm.String", "Edm.Boolean", "mscrm.Label"
# AttributeTypeCode members in SDK order (the enum value is the position).
_ATTRIBUTE_TYPE_CODES = (
    *("Boolean", "Customer", "DateTime", "Decimal", "Double", "Integer", "Lookup", "Memo", "Money"),
    *("Owner", "PartyList", "Picklist", "State", "Status", "String", "Uniqueidentifier"),
    *("CalendarRules", "Virtual", "BigInt", "ManagedProperty", "EntityName"),
)
_METADATA_ENUMS: dict[str, tuple[bool, tuple[tuple[str, int], ...]]] = {
    "OwnershipTypes": (
        True,
        (
            ("None", 0),
            ("UserOwned", 1),
            ("TeamOwned", 2),
            ("BusinessOwned", 4),
            ("OrganizationOwned", 8),
            ("BusinessParented", 16),
            ("Filtered", 32),
        ),
    ),
    "AttributeTypeCode": (
        False,
        tuple((name, value) for value, name in enumerate(_ATTRIBUTE_TYPE_CODES)),
    ),
    "AttributeRequiredLevel": (
        False,
        (("None", 0), ("SystemRequired", 1), ("ApplicationRequired", 2), ("Recommended", 3)),
    ),
    "EntityKeyIndexStatus": (False, (("Pending", 0), ("InProgress", 1), ("Active", 2), ("Failed", 3))),
}
_METADATA_COMPLEX_TYPES: dict[str, tuple[tuple[str, str], ...]] = {
    "LocalizedLabel": (("Label", _STR), ("LanguageCode", "Edm.Int32")),
    "Label": (
        ("LocalizedLabels", "Collection(mscrm.LocalizedLabel)"),
        ("UserLocalizedLabel", "mscrm.LocalizedLabel"),
    ),
    "AttributeTypeDisplayName": (("Value", _STR),),
    "AttributeRequiredLevelManagedProperty": (
        ("Value", "mscrm.AttributeRequiredLevel"),
        ("CanBeChanged", _BOOL),
        ("ManagedPropertyLogicalName", _STR),
    ),
}
_ENTITY_METADATA_PROPERTIES = (
    *((name, _STR) for name in ("LogicalName", "SchemaName", "EntitySetName", "LogicalCollectionName")),
    *((name, _STR) for name in ("CollectionSchemaName", "PrimaryIdAttribute", "PrimaryNameAttribute")),
    ("ObjectTypeCode", "Edm.Int32"),
    *((name, _BOOL) for name in ("ChangeTrackingEnabled", "IsCustomEntity", "IsPrivate", "IsActivity")),
    ("IsIntersect", _BOOL),
    ("TableType", _STR),
    ("OwnershipType", "mscrm.OwnershipTypes"),
    ("DisplayName", _LABEL),
)
_ATTRIBUTE_METADATA_PROPERTIES = (
    *((name, _STR) for name in ("LogicalName", "SchemaName", "EntityLogicalName")),
    ("AttributeType", "mscrm.AttributeTypeCode"),
    ("AttributeTypeName", "mscrm.AttributeTypeDisplayName"),
    *((name, _BOOL) for name in ("IsPrimaryId", "IsPrimaryName", "IsValidForCreate", "IsValidForUpdate")),
    *((name, _BOOL) for name in ("IsValidForRead", "IsCustomAttribute")),
    ("RequiredLevel", "mscrm.AttributeRequiredLevelManagedProperty"),
    ("DisplayName", _LABEL),
)
_KEY_METADATA_PROPERTIES = (
    *((name, _STR) for name in ("LogicalName", "SchemaName", "EntityLogicalName")),
    ("KeyAttributes", "Collection(Edm.String)"),
    ("EntityKeyIndexStatus", "mscrm.EntityKeyIndexStatus"),
    ("DisplayName", _LABEL),
)
# Extra properties of the AttributeMetadata subtypes named in ``@odata.type``.
_ATTRIBUTE_SUBTYPE_PROPERTIES: dict[str, tuple[tuple[str, str], ...]] = {
    "StringAttributeMetadata": (("MaxLength", "Edm.Int32"),),
    "MemoAttributeMetadata": (("MaxLength", "Edm.Int32"),),
    "IntegerAttributeMetadata": (("MinValue", "Edm.Int32"), ("MaxValue", "Edm.Int32")),
    "BigIntAttributeMetadata": (("MinValue", "Edm.Int64"), ("MaxValue", "Edm.Int64")),
    "DecimalAttributeMetadata": (("MinValue", "Edm.Decimal"), ("MaxValue", "Edm.Decimal")),
    "MoneyAttributeMetadata": (("MinValue", "Edm.Double"), ("MaxValue", "Edm.Double")),
    "LookupAttributeMetadata": (("Targets", "Collection(Edm.String)"),),
}


def _properties_xml(properties: tuple[tuple[str, str], ...]) -> str:
    return "".join(f'<Property Name="{name}" Type="{type_}" />' for name, type_ in properties)


def _metadata_types_xml() -> str:
    """Enum, complex and entity types for ``EntityDefinitions`` (``mscrm.EntityMetadata``)."""
    parts = [
        f'<EnumType Name="{name}" IsFlags="{str(flags).lower()}">'
        + "".join(f'<Member Name="{member}" Value="{value}" />' for member, value in members)
        + "</EnumType>"
        for name, (flags, members) in _METADATA_ENUMS.items()
    ]
    parts += [
        f'<ComplexType Name="{name}">{_properties_xml(properties)}</ComplexType>'
        for name, properties in _METADATA_COMPLEX_TYPES.items()
    ]
    parts.append(
        '<EntityType Name="MetadataBase" Abstract="true"><Key><PropertyRef Name="MetadataId" /></Key>'
        '<Property Name="MetadataId" Type="Edm.Guid" Nullable="false" />'
        '<Property Name="HasChanged" Type="Edm.Boolean" /></EntityType>'
    )
    parts.append(
        '<EntityType Name="EntityMetadata" BaseType="mscrm.MetadataBase">'
        f"{_properties_xml(_ENTITY_METADATA_PROPERTIES)}"
        '<NavigationProperty Name="Attributes" Type="Collection(mscrm.AttributeMetadata)" '
        'ContainsTarget="true" />'
        '<NavigationProperty Name="Keys" Type="Collection(mscrm.EntityKeyMetadata)" ContainsTarget="true" />'
        "</EntityType>"
    )
    parts.append(
        '<EntityType Name="AttributeMetadata" BaseType="mscrm.MetadataBase">'
        f"{_properties_xml(_ATTRIBUTE_METADATA_PROPERTIES)}</EntityType>"
    )
    parts += [
        f'<EntityType Name="{name}" BaseType="mscrm.AttributeMetadata">'
        f"{_properties_xml(_ATTRIBUTE_SUBTYPE_PROPERTIES.get(name, ()))}</EntityType>"
        for name in sorted(set(_METADATA_TYPES.values()))
    ]
    parts.append(
        '<EntityType Name="EntityKeyMetadata" BaseType="mscrm.MetadataBase">'
        f"{_properties_xml(_KEY_METADATA_PROPERTIES)}</EntityType>"
    )
    return "".join(parts)


def csdl() -> bytes:
    """The ``$metadata`` document."""
    types = "".join(_entity_type_xml(t) for t in TABLES.values()) + _metadata_types_xml()
    sets = "".join(_entity_set_xml(t) for t in TABLES.values())
    sets += '<EntitySet Name="EntityDefinitions" EntityType="Microsoft.Dynamics.CRM.EntityMetadata" />'
    who = (
        '<ComplexType Name="WhoAmIResponse">'
        '<Property Name="BusinessUnitId" Type="Edm.Guid" Nullable="false" />'
        '<Property Name="UserId" Type="Edm.Guid" Nullable="false" />'
        '<Property Name="OrganizationId" Type="Edm.Guid" Nullable="false" /></ComplexType>'
        '<Function Name="WhoAmI"><ReturnType Type="Microsoft.Dynamics.CRM.WhoAmIResponse" Nullable="false" />'
        "</Function>"
    )
    document = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices>'
        '<Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">'
        f"{types}{who}"
        f'<EntityContainer Name="System">{sets}'
        '<FunctionImport Name="WhoAmI" Function="Microsoft.Dynamics.CRM.WhoAmI" /></EntityContainer>'
        "</Schema></edmx:DataServices></edmx:Edmx>"
    )
    return document.encode()
