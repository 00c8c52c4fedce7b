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

import functools
import re
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
_NAMESPACE = "Microsoft.Dynamics.CRM"
_LANGUAGE_CODE = 1033
_SYSTEM_VERSION = "5.0.0.0"  # IntroducedVersion of Microsoft's own tables and columns
_CUSTOM_VERSION = "1.0"  # ... and of what an integration's solution adds

# (display name, plural, description) of the tables, as a US English environment shows them.
_TABLE_LABELS: dict[str, tuple[str, str, str]] = {
    "transactioncurrency": (
        "Currency",
        "Currencies",
        "Currency in which a financial transaction is carried out.",
    ),
    "account": (
        "Account",
        "Accounts",
        "Business that represents a customer or potential customer. "
        "The company that is billed in business transactions.",
    ),
    "contact": (
        "Contact",
        "Contacts",
        "Person with whom a business unit has a relationship, such as customer, supplier, and colleague.",
    ),
    "product": ("Product", "Products", "Information about products and their pricing information."),
    "salesorder": ("Order", "Orders", "Quote that has been accepted."),
    "invoice": ("Invoice", "Invoices", "Order that has been billed."),
}
_COLUMN_LABELS = {
    "createdon": "Created On",
    "modifiedon": "Modified On",
    "versionnumber": "Version Number",
    "createdby": "Created By",
    "modifiedby": "Modified By",
    "ownerid": "Owner",
    "statecode": "Status",
    "statuscode": "Status Reason",
    "transactioncurrencyid": "Currency",
    "emailaddress1": "Email",
    "telephone1": "Phone",
    "new_shipstatus": "Ship Status",
}
_STRING_FORMATS = {"emailaddress1": "Email", "telephone1": "Phone"}
# Value range of a numeric column that does not set its own (the Dataverse defaults).
_DEFAULT_RANGES: dict[AttrType, tuple[float, float]] = {
    AttrType.INTEGER: (-2147483648, 2147483647),
    AttrType.BIGINT: (-9223372036854775808, 9223372036854775807),
    AttrType.DECIMAL: (-100000000000, 100000000000),
    AttrType.MONEY: (-922337203685477, 922337203685477),
}
# Subtypes that can be calculated or rollup columns (FormulaDefinition, SourceTypeMask).
_FORMULA_TYPES = STRING_TYPES | {
    AttrType.INTEGER,
    AttrType.DECIMAL,
    AttrType.MONEY,
    AttrType.BOOLEAN,
    AttrType.DATETIME,
}
# EntityMetadata's BooleanManagedProperty values for a table Microsoft ships (values and
# CanBeChanged as an environment reports the account table): property → (ManagedPropertyLogicalName,
# Value, CanBeChanged).
_TABLE_MANAGED_PROPERTIES: dict[str, tuple[str, bool, bool]] = {
    "CanBeInManyToMany": ("canbeinmanytomany", True, False),
    "CanBePrimaryEntityInRelationship": ("canbeprimaryentityinrelationship", True, False),
    "CanBeRelatedEntityInRelationship": ("canberelatedentityinrelationship", True, False),
    "CanChangeHierarchicalRelationship": ("canchangehierarchicalrelationship", False, False),
    "CanChangeTrackingBeEnabled": ("canchangetrackingbeenabled", True, True),
    "CanCreateAttributes": ("cancreateattributes", True, False),
    "CanCreateCharts": ("cancreatecharts", True, False),
    "CanCreateForms": ("cancreateforms", True, False),
    "CanCreateViews": ("cancreateviews", True, False),
    "CanEnableSyncToExternalSearchIndex": ("canenablesynctoexternalsearchindex", True, True),
    "CanModifyAdditionalSettings": ("canmodifyadditionalsettings", True, True),
    "IsAuditEnabled": ("canmodifyauditsettings", True, True),
    "IsConnectionsEnabled": ("canmodifyconnectionsettings", True, True),
    "IsCustomizable": ("iscustomizable", True, False),
    "IsDuplicateDetectionEnabled": ("canmodifyduplicatedetectionsettings", True, True),
    "IsMailMergeEnabled": ("canmodifymailmergesettings", True, True),
    "IsMappable": ("ismappable", True, False),
    "IsOfflineInMobileClient": ("canmodifymobileclientoffline", True, True),
    "IsReadOnlyInMobileClient": ("canmodifymobileclientreadonly", False, True),
    "IsRenameable": ("isrenameable", True, False),
    "IsValidForQueue": ("canmodifyqueuesettings", False, True),
    "IsVisibleInMobile": ("canmodifymobilevisibility", True, False),
    "IsVisibleInMobileClient": ("canmodifymobileclientvisibility", True, True),
}
# EntityMetadata's plain Edm.Boolean properties for such a table (IsValidForAdvancedFind is a
# plain boolean on a table, a managed property on a column).
_TABLE_FLAGS: dict[str, bool] = {
    "AutoCreateAccessTeams": False,
    "AutoRouteToOwnerQueue": False,
    "CanTriggerWorkflow": True,
    "EnforceStateTransitions": False,
    "EntityHelpUrlEnabled": False,
    "HasActivities": True,
    "HasNotes": True,
    "IsActivity": False,
    "IsActivityParty": False,
    "IsAvailableOffline": True,
    "IsBusinessProcessEnabled": True,
    "IsChildEntity": False,
    "IsCustomEntity": False,
    "IsDocumentManagementEnabled": False,
    "IsEnabledForCharts": True,
    "IsEnabledForExternalChannels": False,
    "IsImportable": True,
    "IsIntersect": False,
    "IsKnowledgeManagementEnabled": False,
    "IsLogicalEntity": False,
    "IsManaged": True,
    "IsOptimisticConcurrencyEnabled": True,
    "IsPrivate": False,
    "IsQuickCreateEnabled": True,
    "IsStateModelAware": True,
    "IsValidForAdvancedFind": True,
    "SyncToExternalSearchIndex": False,
}


def _metadata_id(kind: str) -> str:
    return str(uuid.uuid5(METADATA_NAMESPACE, kind))


def _label(text: str | None, owner: str, *, managed: bool = True) -> dict[str, Any]:
    """A ``Label`` as the service returns it: no text gives the empty label."""
    if not text:
        return {"LocalizedLabels": [], "UserLocalizedLabel": None}
    localized = {
        "Label": text,
        "LanguageCode": _LANGUAGE_CODE,
        "IsManaged": managed,
        "MetadataId": _metadata_id(f"label:{owner}"),
        "HasChanged": None,
    }
    return {"LocalizedLabels": [localized], "UserLocalizedLabel": dict(localized)}


def _managed(value: Any, logical_name: str, can_be_changed: bool) -> dict[str, Any]:
    """A ``BooleanManagedProperty`` (or ``AttributeRequiredLevelManagedProperty``)."""
    return {"Value": value, "CanBeChanged": can_be_changed, "ManagedPropertyLogicalName": logical_name}


def _column_label(table: Table, column: Column) -> str:
    if column.name == table.primary_id:
        return _TABLE_LABELS.get(table.logical_name, (table.schema_name,))[0]
    if column.name in _COLUMN_LABELS:
        return _COLUMN_LABELS[column.name]
    words = column.name.removeprefix("new_").replace("_", " ").split()
    return " ".join(w[:1].upper() + w[1:] for w in words)


def entity_definition(table: Table) -> dict[str, Any]:
    """``EntityMetadata`` of a table (no navigation properties; see :func:`_expand`)."""
    name = table.logical_name
    display, plural, description = _TABLE_LABELS.get(name, (table.schema_name, table.schema_name, ""))
    return {
        "MetadataId": table.metadata_id,
        "HasChanged": None,
        "LogicalName": name,
        "SchemaName": schema_name(name),
        "EntitySetName": table.entity_set,
        "LogicalCollectionName": table.entity_set,
        "CollectionSchemaName": schema_name(table.entity_set),
        "PrimaryIdAttribute": table.primary_id,
        "PrimaryNameAttribute": table.primary_name,
        "PrimaryImageAttribute": None,
        "ObjectTypeCode": table.object_type_code,
        "OwnershipType": "UserOwned",
        "TableType": "Standard",
        "IntroducedVersion": _SYSTEM_VERSION,
        "ReportViewName": f"Filtered{schema_name(name)}",
        "ActivityTypeMask": 0,
        "DaysSinceRecordLastModified": 0,
        "DataProviderId": None,
        "EntityHelpUrl": None,
        "ExternalName": None,
        "ExternalCollectionName": None,
        "IconVectorName": None,
        "ChangeTrackingEnabled": table.change_tracking,
        **_TABLE_FLAGS,
        **{
            prop: _managed(value, logical, change)
            for prop, (logical, value, change) in _TABLE_MANAGED_PROPERTIES.items()
        },
        "DisplayName": _label(display, f"entity:{name}:displayname"),
        "DisplayCollectionName": _label(plural, f"entity:{name}:displaycollectionname"),
        "Description": _label(description, f"entity:{name}:description"),
    }


def _required_level(table: Table, column: Column) -> str:
    if column.name in (table.primary_id, "statecode", "ownerid"):
        return "SystemRequired"
    return "ApplicationRequired" if column.required else "None"


def attribute_definition(table: Table, column: Column) -> dict[str, Any]:
    """``AttributeMetadata`` of a column, typed by ``@odata.type`` (its subtype's properties too)."""
    owner = f"{table.logical_name}.{column.name}"
    custom = column.custom
    system = column.readonly or column.name == table.primary_id  # settings fixed by the platform
    data: dict[str, Any] = {
        "@odata.type": f"#{_NAMESPACE}.{_METADATA_TYPES[column.type]}",
        "MetadataId": _metadata_id(f"attribute:{owner}"),
        "HasChanged": None,
        "AttributeOf": None,
        "AttributeType": column.type.value,
        "AttributeTypeName": {"Value": f"{column.type.value}Type"},
        "ColumnNumber": table.columns.index(column) + 1,
        "DeprecatedVersion": None,
        "IntroducedVersion": _CUSTOM_VERSION if custom else _SYSTEM_VERSION,
        "EntityLogicalName": table.logical_name,
        "LogicalName": column.name,
        "SchemaName": schema_name(column.name),
        "ExternalName": None,
        "InheritsFrom": None,
        "LinkedAttributeId": None,
        "AutoNumberFormat": None,
        "SourceType": 0,
        "IsCustomAttribute": custom,
        "IsManaged": not custom,
        "IsPrimaryId": column.name == table.primary_id,
        "IsPrimaryName": column.name == table.primary_name,
        "IsValidODataAttribute": True,
        "IsValidForCreate": not column.readonly,
        "IsValidForUpdate": not column.readonly and column.name != table.primary_id,
        "IsValidForRead": column.readable,
        "IsValidForForm": column.name != table.primary_id,
        "IsValidForGrid": True,
        "IsRequiredForForm": column.name == table.primary_name,
        "IsSecured": False,
        "CanBeSecuredForCreate": not system,
        "CanBeSecuredForRead": not system,
        "CanBeSecuredForUpdate": not system,
        "IsLogical": False,
        "IsDataSourceSecret": False,
        "IsAuditEnabled": _managed(True, "canmodifyauditsettings", not system),
        "IsCustomizable": _managed(True, "iscustomizable", custom),
        "IsRenameable": _managed(True, "isrenameable", custom),
        "IsValidForAdvancedFind": _managed(True, "canmodifysearchsettings", True),
        "IsGlobalFilterEnabled": _managed(False, "canmodifyglobalfiltersettings", True),
        "IsSortableEnabled": _managed(False, "canmodifyissortablesettings", True),
        "CanModifyAdditionalSettings": _managed(True, "canmodifyadditionalsettings", not system),
        "RequiredLevel": _managed(
            _required_level(table, column), "canmodifyrequirementlevelsettings", not system
        ),
        "DisplayName": _label(_column_label(table, column), f"attribute:{owner}", managed=not custom),
        "Description": _label(None, f"attribute:{owner}:description"),
    }
    data.update(_subtype_properties(column, system))
    return data


def _subtype_properties(column: Column, system: bool) -> dict[str, Any]:
    """The properties ``@odata.type`` adds (StringAttributeMetadata.MaxLength …)."""
    kind = column.type
    data: dict[str, Any] = {}
    if kind in STRING_TYPES:
        fmt = "TextArea" if kind == AttrType.MEMO else _STRING_FORMATS.get(column.name, "Text")
        length = column.max_length or 100
        data |= {"MaxLength": length, "DatabaseLength": length * 2, "Format": fmt}
        data |= {"FormatName": {"Value": fmt}, "ImeMode": "Auto", "IsLocalizable": False}
    elif kind in _DEFAULT_RANGES:
        low, high = _DEFAULT_RANGES[kind]
        data["MinValue"] = low if column.min_value is None else column.min_value
        data["MaxValue"] = high if column.max_value is None else column.max_value
        if kind == AttrType.INTEGER:
            data["Format"] = "None"
        if kind in (AttrType.DECIMAL, AttrType.MONEY):
            data |= {"Precision": 2, "ImeMode": "Auto"}
        if kind == AttrType.MONEY:
            data |= {"PrecisionSource": 2, "IsBaseCurrency": False, "CalculationOf": None}
    elif kind == AttrType.BOOLEAN:
        data["DefaultValue"] = False
    elif kind == AttrType.DATETIME:
        data |= {
            "Format": "DateAndTime",
            "DateTimeBehavior": {"Value": "UserLocal"},
            "CanChangeDateTimeBehavior": _managed(not system, "canchangedatetimebehavior", not system),
            "ImeMode": "Inactive",
            "MinSupportedValue": "1753-01-01T00:00:00Z",
            "MaxSupportedValue": "9999-12-30T23:59:59Z",
        }
    elif kind in (AttrType.PICKLIST, AttrType.STATE, AttrType.STATUS):
        data["DefaultFormValue"] = None
    if column.is_lookup:
        data["Targets"] = list(column.targets)
    if kind in _FORMULA_TYPES:
        data |= {"FormulaDefinition": None, "SourceTypeMask": 0}
    return data


def key_definition(table: Table, key: AlternateKey) -> dict[str, Any]:
    """``EntityKeyMetadata`` of an alternate key (added by the integration, so unmanaged)."""
    owner = f"{table.logical_name}.{key.name}"
    words = key.name.replace("_", " ").split()
    return {
        "MetadataId": _metadata_id(f"key:{owner}"),
        "HasChanged": None,
        "LogicalName": key.name,
        "SchemaName": key.name,
        "EntityLogicalName": table.logical_name,
        "KeyAttributes": list(key.attributes),
        "EntityKeyIndexStatus": "Active",
        "IntroducedVersion": _CUSTOM_VERSION,
        "IsManaged": False,
        "IsCustomizable": _managed(True, "iscustomizable", True),
        "IsExportKey": False,
        "IsSecondaryKey": False,
        "IsSynchronous": False,
        "DisplayName": _label(" ".join(w.title() for w in words), f"key:{owner}", managed=False),
    }


# -- a tiny in-memory $filter evaluator for metadata collections ------------------------------
# Enum literals (``Microsoft.Dynamics.CRM.OwnershipTypes'UserOwned'``) compare as their member name.
_ENUM_LITERAL = re.compile(r"(?<!')\b(?:Microsoft\.Dynamics\.CRM|mscrm)\.\w+(?=')")
_COMPARISONS: dict[type, Any] = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a is not None and b is not None and a < b,
    ast.LtE: lambda a, b: a is not None and b is not None and a <= b,
    ast.Gt: lambda a, b: a is not None and b is not None and a > b,
    ast.GtE: lambda a, b: a is not None and b is not None and a >= b,
}


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
        op = _COMPARISONS.get(type(node.comparator))
        if op is None:
            raise errors.bad_request("Only eq, ne, lt, le, gt and ge are supported on metadata queries.")
        try:
            return op(left, right)
        except TypeError as exc:
            raise errors.bad_request(
                f"The operands of a metadata $filter comparison do not match: {exc}."
            ) from exc
    if isinstance(node, ast.Identifier):
        if node.name in item:
            return item[node.name]
        if node.name in _declared_metadata_properties():  # declared on a subtype this item is not
            return None
        raise errors.bad_request(f"Could not find a property named '{node.name}' on the metadata type.")
    if isinstance(node, ast.Attribute):
        owner = _evaluate(node.owner, item)
        return owner.get(node.attr) if isinstance(owner, dict) else None
    if isinstance(node, ast.Boolean):
        return node.val.lower() == "true"
    if isinstance(node, ast.Null):
        return None
    if isinstance(node, ast.Integer):
        return int(node.val)
    if isinstance(node, ast.Float):
        return float(node.val)
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
    """Apply ``$filter`` and ``$select``; ``expanded`` navigation properties survive ``$select``.

    ``MetadataId`` is always returned, and ``@odata.type`` where an item has it (an attribute of a
    derived type).
    """
    if req_filter:
        tree = parse(_ENUM_LITERAL.sub("", req_filter))
        items = [i for i in items if _evaluate(tree, i)]
    if req_select:
        names = _select_names(req_select) | expanded | {"@odata.type", "MetadataId"}
        items = [{k: v for k, v in i.items() if k in names} for i in items]
    return items


def _select_names(text: str | None) -> set[str]:
    return {n.strip() for n in (text or "").split(",") if n.strip()}


def _expand_options(item: str) -> tuple[str, dict[str, str]]:
    """``Attributes($select=a,b;$filter=…)`` → (``Attributes``, {``$select``: ``a,b``, …})."""
    name, _, rest = item.partition("(")
    options = (
        dict(
            (o.partition("=")[0].strip(), o.partition("=")[2])
            for o in split_top_level(rest.removesuffix(")"), ";")
        )
        if rest
        else {}
    )
    return name.strip(), options


def _expanded_names(text: str | None) -> frozenset[str]:
    """The navigation property names in an ``$expand`` value (``Keys($select=…),Attributes``)."""
    return frozenset(_expand_options(item)[0] for item in split_top_level(text or ""))


def _expand(table: Table, entity: dict[str, Any], text: str | None) -> dict[str, Any]:
    for item in split_top_level(text or ""):
        name, options = _expand_options(item)
        if name == "Attributes":
            children = [attribute_definition(table, c) for c in table.columns]
        elif name == "Keys":
            children = [key_definition(table, k) for k in table.keys]
        elif name == "OptionSet":
            continue
        else:
            raise errors.bad_request(
                f"Could not find a property named '{name}' on type '{_NAMESPACE}.EntityMetadata'."
            )
        entity[name] = _shape(children, options.get("$select"), options.get("$filter"))
    return entity


def _context_projection(select: str | None, expand: str | None) -> str:
    """The ``(…)`` an ``@odata.context`` gets for ``$select``/``$expand``: ``(LogicalName,Keys(…))``."""
    names = sorted(_select_names(select), key=lambda n: (select or "").find(n)) if select else []
    for item in split_top_level(expand or ""):
        name, options = _expand_options(item)
        names.append(f"{name}({options.get('$select', '')})")
    return f"({','.join(names)})" if names else ""


def _find_table(key: str) -> Table:
    values = parse_key_values(key) if "=" in key else {"MetadataId": key.strip()}
    wanted = values.get("LogicalName") or values.get("MetadataId")
    for table in TABLES.values():
        if wanted in (table.logical_name, table.metadata_id):
            return table
    raise errors.not_found(f"Could not find entity with key {key}.", errors.OBJECT_DOES_NOT_EXIST)


def _cast_type(segment: str) -> str:
    """``Microsoft.Dynamics.CRM.DateTimeAttributeMetadata`` → ``DateTimeAttributeMetadata``."""
    namespace, _, name = segment.rpartition(".")
    if namespace not in (_NAMESPACE, "mscrm") or name not in _ATTRIBUTE_CAST_TYPES:
        raise errors.segment_not_found(segment)
    return name


def entity_definitions(req: ApiRequest, segments: list[str]) -> ApiResponse:
    """``EntityDefinitions`` and its sub-resources (read-only), in the Web API's shapes.

    Managed properties are ``BooleanManagedProperty`` objects (``{"Value", "CanBeChanged",
    "ManagedPropertyLogicalName"}``: ``CanChangeTrackingBeEnabled``, ``IsAuditEnabled``,
    ``IsCustomizable`` …; ``RequiredLevel`` likewise), labels ``{"LocalizedLabels": [...],
    "UserLocalizedLabel": {...}}``, attributes carry ``@odata.type`` and their subtype's properties,
    ``Keys`` are ``EntityKeyMetadata``; ``$metadata`` declares every property returned.  Supported:
    ``$select`` (``MetadataId`` always comes back), ``$filter`` (eq/ne/lt/le/gt/ge, and/or/not,
    contains/startswith/endswith, complex paths like ``IsCustomizable/Value``, enum literals like
    ``Microsoft.Dynamics.CRM.OwnershipTypes'UserOwned'``), ``$expand=Attributes($select=…;$filter=…)``
    and ``Keys``, keys by ``LogicalName`` or ``MetadataId``, and the cast to a derived attribute type,
    ``(LogicalName='x')/Attributes/Microsoft.Dynamics.CRM.DateTimeAttributeMetadata`` (only attributes
    of that type, with its properties; Airbyte reads ``DateTimeBehavior`` that way).
    """
    if req.method != "GET":
        raise errors.DataverseError(
            405, errors.METHOD_NOT_ALLOWED, "The sandbox metadata is read-only; only GET is supported."
        )
    _, key = parse_segment(segments[0])
    select, filter_text, expand = req.param("$select"), req.param("$filter"), req.param("$expand")
    base = f"{req.api_url}/$metadata#EntityDefinitions"
    projection = _context_projection(select, expand)
    expanded = _expanded_names(expand)
    if key is None:
        if len(segments) > 1:
            raise errors.segment_not_found(segments[1])
        items = [_expand(t, entity_definition(t), expand) for t in TABLES.values()]
        value = _shape(items, select, filter_text, expanded)
        return json_response(200, {"@odata.context": f"{base}{projection}", "value": value})
    table = _find_table(key)
    if len(segments) == 1:
        entity = _shape([_expand(table, entity_definition(table), expand)], select, None, expanded)[0]
        return json_response(200, {"@odata.context": f"{base}{projection}/$entity", **entity})
    child, child_key = parse_segment(segments[1])
    if child == "Attributes":
        items = [attribute_definition(table, c) for c in table.columns]
    elif child == "Keys":
        items = [key_definition(table, k) for k in table.keys]
    else:
        raise errors.segment_not_found(child)
    cast = None
    if len(segments) > 2:
        if child != "Attributes" or len(segments) > 3:
            raise errors.segment_not_found(segments[-1])
        cast = _cast_type(segments[2])
        if cast != "AttributeMetadata":
            items = [i for i in items if i["@odata.type"] == f"#{_NAMESPACE}.{cast}"]
    owner = f"('{table.logical_name}')" if "=" in key else f"({table.metadata_id})"
    context = f"{base}{owner}/{child}" + (f"/{_NAMESPACE}.{cast}" if cast else "")
    if child_key is not None:
        wanted = parse_key_values(child_key).get("LogicalName") if "=" in child_key else child_key.strip()
        items = [i for i in items if wanted in (i["LogicalName"], i["MetadataId"])]
        if not items:
            raise errors.not_found(f"Could not find {child} with key {child_key}.")
    shaped = _shape(items, select, None if child_key is not None else filter_text)
    if cast and cast != "AttributeMetadata":  # now the declared type: no @odata.type needed
        shaped = [{k: v for k, v in i.items() if k != "@odata.type"} for i in shaped]
    if child_key is not None:
        return json_response(200, {"@odata.context": f"{context}{projection}/$entity", **shaped[0]})
    return json_response(200, {"@odata.context": f"{context}{projection}", "value": shaped})


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
_STR, _BOOL, _INT, _GUID, _LABEL = "Edm.String", "Edm.Boolean", "Edm.Int32", "Edm.Guid", "mscrm.Label"
_MANAGED = "mscrm.BooleanManagedProperty"
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
    "StringFormat": (
        False,
        tuple(
            (name, value)
            for value, name in enumerate(
                (
                    "Email",
                    "Text",
                    "TextArea",
                    "Url",
                    "TickerSymbol",
                    "PhoneticGuide",
                    "VersionNumber",
                    "Phone",
                )
            )
        ),
    ),
    "IntegerFormat": (
        False,
        (("None", 0), ("Duration", 1), ("TimeZone", 2), ("Language", 3), ("Locale", 4)),
    ),
    "DateTimeFormat": (False, (("DateOnly", 0), ("DateAndTime", 1))),
    "ImeMode": (False, (("Auto", 0), ("Inactive", 1), ("Active", 2), ("Disabled", 3))),
}
_METADATA_COMPLEX_TYPES: dict[str, tuple[tuple[str, str], ...]] = {
    "LocalizedLabel": (
        ("Label", _STR),
        ("LanguageCode", _INT),
        ("IsManaged", _BOOL),
        ("MetadataId", _GUID),
        ("HasChanged", _BOOL),
    ),
    "Label": (
        ("LocalizedLabels", "Collection(mscrm.LocalizedLabel)"),
        ("UserLocalizedLabel", "mscrm.LocalizedLabel"),
    ),
    "BooleanManagedProperty": (
        ("Value", _BOOL),
        ("CanBeChanged", _BOOL),
        ("ManagedPropertyLogicalName", _STR),
    ),
    "AttributeTypeDisplayName": (("Value", _STR),),
    "AttributeRequiredLevelManagedProperty": (
        ("Value", "mscrm.AttributeRequiredLevel"),
        ("CanBeChanged", _BOOL),
        ("ManagedPropertyLogicalName", _STR),
    ),
    "StringFormatName": (("Value", _STR),),
    "MemoFormatName": (("Value", _STR),),
    "DateTimeBehavior": (("Value", _STR),),
}
_ENTITY_METADATA_PROPERTIES = (
    *((name, _STR) for name in ("LogicalName", "SchemaName", "EntitySetName", "LogicalCollectionName")),
    *((name, _STR) for name in ("CollectionSchemaName", "PrimaryIdAttribute", "PrimaryNameAttribute")),
    *((name, _STR) for name in ("PrimaryImageAttribute", "IntroducedVersion", "ReportViewName")),
    *((name, _STR) for name in ("EntityHelpUrl", "ExternalName", "ExternalCollectionName", "IconVectorName")),
    ("TableType", _STR),
    *((name, _INT) for name in ("ObjectTypeCode", "ActivityTypeMask", "DaysSinceRecordLastModified")),
    ("OwnershipType", "mscrm.OwnershipTypes"),
    ("DataProviderId", _GUID),
    ("ChangeTrackingEnabled", _BOOL),
    *((name, _BOOL) for name in _TABLE_FLAGS),
    *((name, _MANAGED) for name in _TABLE_MANAGED_PROPERTIES),
    *((name, _LABEL) for name in ("DisplayName", "DisplayCollectionName", "Description")),
)
_ATTRIBUTE_METADATA_PROPERTIES = (
    *((name, _STR) for name in ("LogicalName", "SchemaName", "EntityLogicalName", "AttributeOf")),
    *((name, _STR) for name in ("DeprecatedVersion", "IntroducedVersion", "ExternalName", "InheritsFrom")),
    ("AutoNumberFormat", _STR),
    ("LinkedAttributeId", _GUID),
    *((name, _INT) for name in ("ColumnNumber", "SourceType")),
    ("AttributeType", "mscrm.AttributeTypeCode"),
    ("AttributeTypeName", "mscrm.AttributeTypeDisplayName"),
    *((name, _BOOL) for name in ("IsPrimaryId", "IsPrimaryName", "IsValidForCreate", "IsValidForUpdate")),
    *(
        (name, _BOOL)
        for name in ("IsValidForRead", "IsCustomAttribute", "IsManaged", "IsValidODataAttribute")
    ),
    *((name, _BOOL) for name in ("IsValidForForm", "IsValidForGrid", "IsRequiredForForm", "IsSecured")),
    *((name, _BOOL) for name in ("CanBeSecuredForCreate", "CanBeSecuredForRead", "CanBeSecuredForUpdate")),
    *((name, _BOOL) for name in ("IsLogical", "IsDataSourceSecret")),
    *(
        (name, _MANAGED)
        for name in ("IsAuditEnabled", "IsCustomizable", "IsRenameable", "IsValidForAdvancedFind")
    ),
    *(
        (name, _MANAGED)
        for name in ("IsGlobalFilterEnabled", "IsSortableEnabled", "CanModifyAdditionalSettings")
    ),
    ("RequiredLevel", "mscrm.AttributeRequiredLevelManagedProperty"),
    *((name, _LABEL) for name in ("DisplayName", "Description")),
)
_KEY_METADATA_PROPERTIES = (
    *((name, _STR) for name in ("LogicalName", "SchemaName", "EntityLogicalName", "IntroducedVersion")),
    ("KeyAttributes", "Collection(Edm.String)"),
    ("EntityKeyIndexStatus", "mscrm.EntityKeyIndexStatus"),
    *((name, _BOOL) for name in ("IsManaged", "IsExportKey", "IsSecondaryKey", "IsSynchronous")),
    ("IsCustomizable", _MANAGED),
    ("DisplayName", _LABEL),
)
_FORMULA = (("FormulaDefinition", _STR), ("SourceTypeMask", _INT))
_STRING_LIKE = (
    ("MaxLength", _INT),
    ("DatabaseLength", _INT),
    ("Format", "mscrm.StringFormat"),
    ("ImeMode", "mscrm.ImeMode"),
    ("IsLocalizable", _BOOL),
)
# Abstract intermediate types, as in Dataverse (casting to them is not allowed).
_ATTRIBUTE_BASE_TYPES = {"EnumAttributeMetadata": (("DefaultFormValue", _INT),)}
_ATTRIBUTE_BASES = {
    "PicklistAttributeMetadata": "EnumAttributeMetadata",
    "StateAttributeMetadata": "EnumAttributeMetadata",
    "StatusAttributeMetadata": "EnumAttributeMetadata",
}
# Extra properties of the AttributeMetadata subtypes named in ``@odata.type``.
_ATTRIBUTE_SUBTYPE_PROPERTIES: dict[str, tuple[tuple[str, str], ...]] = {
    "StringAttributeMetadata": (*_STRING_LIKE, ("FormatName", "mscrm.StringFormatName"), *_FORMULA),
    "MemoAttributeMetadata": (*_STRING_LIKE, ("FormatName", "mscrm.MemoFormatName"), *_FORMULA),
    "IntegerAttributeMetadata": (
        ("MinValue", _INT),
        ("MaxValue", _INT),
        ("Format", "mscrm.IntegerFormat"),
        *_FORMULA,
    ),
    "BigIntAttributeMetadata": (("MinValue", "Edm.Int64"), ("MaxValue", "Edm.Int64")),
    "DecimalAttributeMetadata": (
        ("MinValue", "Edm.Decimal"),
        ("MaxValue", "Edm.Decimal"),
        ("Precision", _INT),
        ("ImeMode", "mscrm.ImeMode"),
        *_FORMULA,
    ),
    "MoneyAttributeMetadata": (
        ("MinValue", "Edm.Double"),
        ("MaxValue", "Edm.Double"),
        ("Precision", _INT),
        ("PrecisionSource", _INT),
        ("ImeMode", "mscrm.ImeMode"),
        ("IsBaseCurrency", _BOOL),
        ("CalculationOf", _STR),
        *_FORMULA,
    ),
    "BooleanAttributeMetadata": (("DefaultValue", _BOOL), *_FORMULA),
    "DateTimeAttributeMetadata": (
        ("Format", "mscrm.DateTimeFormat"),
        ("DateTimeBehavior", "mscrm.DateTimeBehavior"),
        ("CanChangeDateTimeBehavior", _MANAGED),
        ("ImeMode", "mscrm.ImeMode"),
        ("MinSupportedValue", "Edm.DateTimeOffset"),
        ("MaxSupportedValue", "Edm.DateTimeOffset"),
        *_FORMULA,
    ),
    "LookupAttributeMetadata": (("Targets", "Collection(Edm.String)"),),
}
# What ``/Attributes/Microsoft.Dynamics.CRM.<type>`` may cast to.
_ATTRIBUTE_CAST_TYPES = frozenset({"AttributeMetadata", *_METADATA_TYPES.values()})


@functools.cache
def _declared_metadata_properties() -> frozenset[str]:
    """Every property the metadata types declare (a ``$filter`` may name one an item lacks)."""
    groups = [_ENTITY_METADATA_PROPERTIES, _ATTRIBUTE_METADATA_PROPERTIES, _KEY_METADATA_PROPERTIES]
    groups += [*_ATTRIBUTE_SUBTYPE_PROPERTIES.values(), *_ATTRIBUTE_BASE_TYPES.values()]
    return frozenset(name for group in groups for name, _ in group) | {"MetadataId", "HasChanged"}


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
        f'<EntityType Name="{name}" BaseType="mscrm.AttributeMetadata" Abstract="true">'
        f"{_properties_xml(properties)}</EntityType>"
        for name, properties in _ATTRIBUTE_BASE_TYPES.items()
    ]
    parts += [
        f'<EntityType Name="{name}" BaseType="mscrm.{_ATTRIBUTE_BASES.get(name, "AttributeMetadata")}">'
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
