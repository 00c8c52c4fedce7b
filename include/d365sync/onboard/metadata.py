"""Live metadata of one table on each side, as onboarding needs it.

* Dataverse: ``EntityDefinitions(LogicalName='…')`` with its ``Keys``, its ``Attributes``, and the
  casts to the attribute subtypes that carry a length, a precision or lookup targets (the Web API
  returns those properties only on the derived types).
* ERP: the ODBC catalog (``SQLColumns``, ``SQLPrimaryKeys``, ``SQLStatistics``) through the
  driver, so the same code reads SQLite, PostgreSQL, MariaDB or SQL Server.

Both readers return plain dataclasses; :mod:`.scaffold` and :mod:`.check` never touch a client.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

# Dataverse columns every table carries, managed by the platform: never a business field.
SYSTEM_COLUMNS = frozenset(
    {
        "createdon",
        "modifiedon",
        "createdby",
        "modifiedby",
        "createdonbehalfby",
        "modifiedonbehalfby",
        "ownerid",
        "owningbusinessunit",
        "owninguser",
        "owningteam",
        "statecode",
        "statuscode",
        "versionnumber",
        "importsequencenumber",
        "overriddencreatedon",
        "timezoneruleversionnumber",
        "utcconversiontimezonecode",
    }
)
STRING_TYPES = frozenset({"String", "Memo"})
NUMBER_TYPES = frozenset({"Decimal", "Money", "Double", "Integer", "BigInt"})
LOOKUP_TYPES = frozenset({"Lookup", "Customer", "Owner"})
_CASTS = (
    ("StringAttributeMetadata", "MaxLength", "max_length"),
    ("MemoAttributeMetadata", "MaxLength", "max_length"),
    ("DecimalAttributeMetadata", "Precision", "precision"),
    ("MoneyAttributeMetadata", "Precision", "precision"),
    ("LookupAttributeMetadata", "Targets", "targets"),
)


@dataclass(frozen=True)
class DvAttribute:
    """One Dataverse column: ``type`` is the ``AttributeType`` (String, Money, Lookup …)."""

    name: str
    type: str
    max_length: int | None = None
    precision: int | None = None
    targets: tuple[str, ...] = ()
    custom: bool = False
    primary_id: bool = False
    writable: bool = True
    required: bool = False  # RequiredLevel ApplicationRequired or SystemRequired: a create needs it

    @property
    def business(self) -> bool:
        """A column a sync may map: not the id, not platform-managed, not read-only."""
        return not self.primary_id and self.name not in SYSTEM_COLUMNS and self.writable


@dataclass(frozen=True)
class DvKey:
    """An alternate key with its index status (``Active`` once Dataverse has built the index)."""

    name: str
    attributes: tuple[str, ...]
    status: str


@dataclass(frozen=True)
class DvTable:
    logical_name: str
    entity_set: str
    primary_id: str
    change_tracking: bool
    attributes: Mapping[str, DvAttribute]
    keys: tuple[DvKey, ...] = ()

    def key_on(self, column: str) -> DvKey | None:
        return next((k for k in self.keys if k.attributes == (column,)), None)


@dataclass(frozen=True)
class ErpColumn:
    """One ERP column from ``SQLColumns``: the driver's type name and ODBC type code."""

    name: str
    type_name: str
    sql_type: int
    size: int | None
    scale: int | None
    nullable: bool
    has_default: bool = False  # the database fills it on insert (a stamp, a version, a constant)

    @property
    def kind(self) -> str:
        """char | varchar | decimal | integer | float | timestamp | date | other. The type name
        decides when it is a known one: SQLite's driver reports CHAR and DECIMAL as SQL_VARCHAR."""
        named = _kind_from_name(self.type_name)
        return named if named != "other" else _ODBC_KINDS.get(self.sql_type, "other")

    @property
    def digits(self) -> tuple[int | None, int | None]:
        """(precision, scale) of a decimal: from ``DECIMAL(p,s)`` in the type name when the driver
        spells it (SQLite's reports no usable scale), else from the catalog's size and digits."""
        found = re.search(r"\((\d+)\s*,\s*(\d+)\)", self.type_name)
        if found:
            return int(found[1]), int(found[2])
        return self.size, self.scale


@dataclass(frozen=True)
class ErpTable:
    name: str
    columns: Mapping[str, ErpColumn]
    primary_key: tuple[str, ...]
    indexes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def leads_an_index(self, column: str) -> bool:
        """Whether an index (or the primary key) starts with ``column``: a cursor read can seek."""
        firsts = [cols[0] for cols in self.indexes.values() if cols]
        return column in firsts or (bool(self.primary_key) and self.primary_key[0] == column)


# ODBC SQL type codes (sql.h / sqlext.h) → a coarse kind the matcher reasons with.
_ODBC_KINDS = {
    1: "char",  # SQL_CHAR
    -8: "char",  # SQL_WCHAR
    12: "varchar",  # SQL_VARCHAR
    -9: "varchar",  # SQL_WVARCHAR
    -1: "varchar",  # SQL_LONGVARCHAR
    -10: "varchar",  # SQL_WLONGVARCHAR
    2: "decimal",  # SQL_NUMERIC
    3: "decimal",  # SQL_DECIMAL
    4: "integer",  # SQL_INTEGER
    5: "integer",  # SQL_SMALLINT
    -5: "integer",  # SQL_BIGINT
    -6: "integer",  # SQL_TINYINT
    6: "float",  # SQL_FLOAT
    7: "float",  # SQL_REAL
    8: "float",  # SQL_DOUBLE
    9: "date",  # SQL_DATE (ODBC 2)
    91: "date",  # SQL_TYPE_DATE
    11: "timestamp",  # SQL_TIMESTAMP (ODBC 2)
    93: "timestamp",  # SQL_TYPE_TIMESTAMP
}


def _kind_from_name(type_name: str) -> str:
    name = type_name.lower()
    for needle, kind in (
        ("varchar", "varchar"),
        ("text", "varchar"),
        ("char", "char"),
        ("dec", "decimal"),
        ("num", "decimal"),
        ("int", "integer"),
        ("timestamp", "timestamp"),
        ("datetime", "timestamp"),
        ("date", "date"),
        ("double", "float"),
        ("float", "float"),
        ("real", "float"),
    ):
        if needle in name:
            return kind
    return "other"


# ------------------------------------------------------------------------------ Dataverse
def read_dynamics_table(client: Any, logical_name: str) -> DvTable:
    """The table's names, change tracking, alternate keys and attributes (one request per cast)."""
    owner = f"EntityDefinitions(LogicalName='{quote(logical_name, safe='')}')"
    table = client.metadata(
        f"{owner}?$select=LogicalName,EntitySetName,PrimaryIdAttribute,ChangeTrackingEnabled&$expand=Keys"
    )
    base = client.metadata(
        f"{owner}/Attributes?$select=LogicalName,AttributeType,IsCustomAttribute,IsPrimaryId,"
        "IsValidForCreate,IsValidForUpdate,AttributeOf,RequiredLevel"
    )
    extra: dict[str, dict[str, Any]] = {}
    for cast, prop, name in _CASTS:
        found = client.metadata(
            f"{owner}/Attributes/Microsoft.Dynamics.CRM.{cast}?$select=LogicalName,{prop}"
        )
        for item in found.get("value", []):
            extra.setdefault(item["LogicalName"], {})[name] = item.get(prop)
    attributes = {}
    for item in base.get("value", []):
        if item.get("AttributeOf"):  # a virtual companion (…name, …yominame): not a column of its own
            continue
        more = extra.get(item["LogicalName"], {})
        attributes[item["LogicalName"]] = DvAttribute(
            name=item["LogicalName"],
            type=str(item.get("AttributeType") or "Virtual"),
            max_length=more.get("max_length"),
            precision=more.get("precision"),
            targets=tuple(more.get("targets") or ()),
            custom=bool(item.get("IsCustomAttribute")),
            primary_id=bool(item.get("IsPrimaryId")),
            writable=bool(item.get("IsValidForCreate") or item.get("IsValidForUpdate")),
            required=(item.get("RequiredLevel") or {}).get("Value")
            in ("ApplicationRequired", "SystemRequired"),
        )
    keys = tuple(
        DvKey(k["LogicalName"], tuple(k.get("KeyAttributes") or ()), str(k.get("EntityKeyIndexStatus")))
        for k in table.get("Keys") or ()
    )
    return DvTable(
        logical_name=table["LogicalName"],
        entity_set=table["EntitySetName"],
        primary_id=table["PrimaryIdAttribute"],
        change_tracking=bool(table.get("ChangeTrackingEnabled")),
        attributes=attributes,
        keys=keys,
    )


# ------------------------------------------------------------------------------------ ERP
def read_erp_table(client: Any, name: str) -> ErpTable:
    """Columns, primary key and indexes of an ERP table from the driver's catalog functions."""
    found = client.catalog(name)
    columns = {c[0]: ErpColumn(*c) for c in found["columns"]}
    indexes = {k: tuple(v) for k, v in found["indexes"].items()}
    return ErpTable(found["name"], columns, tuple(found["primary_key"]), indexes)
