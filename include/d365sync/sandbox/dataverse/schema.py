"""Declarative table definitions: the one source for storage, validation and metadata.

Each :class:`Table` lists its business columns; the system columns every Dataverse table
carries (primary id, createdon/modifiedon, versionnumber, created/modified by, owner, state and
status) are added by :func:`_table`.  The SQLite DDL, the ``EntityDefinitions`` and ``$metadata``
documents, body validation and ``$filter`` column resolution all read these structures, so a
column added here shows up everywhere at once.

A lookup column is read as ``_<name>_value`` and written through its single-valued navigation
property (:class:`NavLink`): ``<name>`` for one target, ``<name>_<target>`` per target for a
polymorphic (Customer) lookup.  Each relationship also gives the target table a collection-valued
navigation property named after the relationship (``account_primary_contact`` on contact).

Besides the business tables, four platform tables hold webhook registrations as Dataverse keeps
them (``sdkmessage``, ``sdkmessagefilter``, ``serviceendpoint``, ``sdkmessageprocessingstep``):
they are not change-tracked and raise no notifications themselves (``Table.notifies``); see
:mod:`.webhooks`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum


class AttrType(StrEnum):
    """Dataverse ``AttributeType`` values used by the sandbox tables."""

    UNIQUEIDENTIFIER = "Uniqueidentifier"
    STRING = "String"
    MEMO = "Memo"
    INTEGER = "Integer"
    BIGINT = "BigInt"
    DECIMAL = "Decimal"
    MONEY = "Money"
    BOOLEAN = "Boolean"
    DATETIME = "DateTime"
    PICKLIST = "Picklist"
    STATE = "State"
    STATUS = "Status"
    LOOKUP = "Lookup"
    CUSTOMER = "Customer"
    OWNER = "Owner"


LOOKUP_TYPES = frozenset({AttrType.LOOKUP, AttrType.CUSTOMER, AttrType.OWNER})
GUID_TYPES = LOOKUP_TYPES | {AttrType.UNIQUEIDENTIFIER}
STRING_TYPES = frozenset({AttrType.STRING, AttrType.MEMO})
EDM_TYPES: dict[AttrType, str] = {
    AttrType.UNIQUEIDENTIFIER: "Edm.Guid",
    AttrType.STRING: "Edm.String",
    AttrType.MEMO: "Edm.String",
    AttrType.INTEGER: "Edm.Int32",
    AttrType.BIGINT: "Edm.Int64",
    AttrType.DECIMAL: "Edm.Decimal",
    AttrType.MONEY: "Edm.Decimal",
    AttrType.BOOLEAN: "Edm.Boolean",
    AttrType.DATETIME: "Edm.DateTimeOffset",
    AttrType.PICKLIST: "Edm.Int32",
    AttrType.STATE: "Edm.Int32",
    AttrType.STATUS: "Edm.Int32",
    AttrType.LOOKUP: "Edm.Guid",
    AttrType.CUSTOMER: "Edm.Guid",
    AttrType.OWNER: "Edm.Guid",
}
SQL_TYPES: dict[AttrType, str] = {
    AttrType.UNIQUEIDENTIFIER: "TEXT",
    AttrType.STRING: "TEXT COLLATE NOCASE",
    AttrType.MEMO: "TEXT COLLATE NOCASE",
    AttrType.INTEGER: "INTEGER",
    AttrType.BIGINT: "INTEGER",
    AttrType.DECIMAL: "REAL",
    AttrType.MONEY: "REAL",
    AttrType.BOOLEAN: "INTEGER",
    AttrType.DATETIME: "TEXT",
    AttrType.PICKLIST: "INTEGER",
    AttrType.STATE: "INTEGER",
    AttrType.STATUS: "INTEGER",
}

METADATA_NAMESPACE = uuid.UUID("6f9619ff-8b86-d011-b42d-00c04fc964ff")
_SCHEMA_NAMES = {
    "transactioncurrency": "TransactionCurrency",
    "salesorder": "SalesOrder",
    "systemuser": "SystemUser",
    "new_shipstatus": "new_ShipStatus",
}


def schema_name(name: str) -> str:
    """The ``SchemaName`` of a table, entity set or column (``salesorder`` → ``SalesOrder``)."""
    return _SCHEMA_NAMES.get(name, name[:1].upper() + name[1:])


@dataclass(frozen=True)
class Column:
    """One attribute.  ``targets`` names the tables a lookup may point at; ``relationships`` names,
    per target, the one-to-many relationship behind it when it is not the derived default (see
    :func:`relationship_name`)."""

    name: str
    type: AttrType
    max_length: int | None = None
    required: bool = False
    targets: tuple[str, ...] = ()
    options: tuple[int, ...] = ()
    readonly: bool = False
    min_value: float | None = None
    max_value: float | None = None
    custom: bool = False
    relationships: tuple[str, ...] = ()
    readable: bool = True
    """False for a write-only column (``serviceendpoint.authvalue``): never returned, not
    queryable, but settable on create and update."""

    @property
    def is_lookup(self) -> bool:
        return self.type in LOOKUP_TYPES

    @property
    def is_polymorphic(self) -> bool:
        return len(self.targets) > 1

    @property
    def value_name(self) -> str:
        """The name a client reads: ``_x_value`` for lookups, the logical name otherwise."""
        return f"_{self.name}_value" if self.is_lookup else self.name

    @property
    def edm_type(self) -> str:
        return EDM_TYPES[self.type]


@dataclass(frozen=True)
class AlternateKey:
    """A Dataverse alternate key (``EntityKeyMetadata``)."""

    name: str
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A Dataverse table as the sandbox serves it."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    object_type_code: int
    columns: tuple[Column, ...]
    keys: tuple[AlternateKey, ...] = ()
    state_status: dict[int, tuple[int, ...]] = field(default_factory=dict)
    default_status: dict[int, int] = field(default_factory=dict)
    change_tracking: bool = True
    notifies: bool = True
    """Whether writes to the table raise webhook notifications (False for the registration
    tables, which hold the steps that notify)."""

    @property
    def type_name(self) -> str:
        return f"Microsoft.Dynamics.CRM.{self.logical_name}"

    @property
    def schema_name(self) -> str:
        return schema_name(self.logical_name)

    @property
    def metadata_id(self) -> str:
        return str(uuid.uuid5(METADATA_NAMESPACE, f"entity:{self.logical_name}"))

    def column(self, name: str) -> Column | None:
        return _COLUMN_INDEX[self.logical_name].get(name)

    @property
    def readable(self) -> tuple[Column, ...]:
        """The columns a read returns by default (all but write-only ones)."""
        return _READABLE[self.logical_name]

    def by_value_name(self, name: str) -> Column | None:
        """Resolve a name as clients read/filter it (``_x_value`` or plain); write-only columns
        are not found."""
        return _VALUE_INDEX[self.logical_name].get(name)

    def navigation(self, name: str) -> NavLink | None:
        """Resolve a single-valued navigation property (case-sensitive, as Dataverse's OData layer).

        Single-target lookups use their own name; polymorphic ones use ``name_target``
        (``customerid_account``), like Dataverse.
        """
        return _NAV_INDEX[self.logical_name].get(name)

    def navigations(self) -> tuple[NavLink, ...]:
        """The single-valued navigation properties, in column order."""
        return tuple(_NAV_INDEX[self.logical_name].values())

    def partners(self) -> tuple[NavLink, ...]:
        """The relationships pointing at this table: its collection-valued navigation properties."""
        return tuple(_PARTNER_INDEX[self.logical_name].values())

    def partner(self, name: str) -> NavLink | None:
        """The relationship whose collection-valued navigation property on this table is ``name``."""
        return _PARTNER_INDEX[self.logical_name].get(name)


@dataclass(frozen=True)
class NavLink:
    """One many-to-one relationship as OData shows it.

    ``name`` is the single-valued navigation property on ``table`` (backed by the lookup
    ``column``) that points at ``target``; ``partner`` is its mirror, the collection-valued
    navigation property on ``target`` (the relationship's name, e.g. ``account_primary_contact``).
    """

    table: str
    name: str
    column: Column
    target: str
    partner: str


def _sys(table_name: str, primary_id: str, states: dict[int, tuple[int, ...]]) -> tuple[Column, ...]:
    """System columns every table carries."""
    return (
        Column(primary_id, AttrType.UNIQUEIDENTIFIER),
        Column("createdon", AttrType.DATETIME, readonly=True),
        Column("modifiedon", AttrType.DATETIME, readonly=True),
        Column("versionnumber", AttrType.BIGINT, readonly=True),
        Column("createdby", AttrType.LOOKUP, targets=("systemuser",), readonly=True),
        Column("modifiedby", AttrType.LOOKUP, targets=("systemuser",), readonly=True),
        # Assignable (``ownerid@odata.bind``) but never empty; defaults to the caller on create.
        Column("ownerid", AttrType.OWNER, targets=("systemuser",), required=True),
        Column("statecode", AttrType.STATE, options=tuple(states)),
        Column("statuscode", AttrType.STATUS, options=tuple(s for v in states.values() for s in v)),
    )


def _table(
    logical_name: str,
    entity_set: str,
    primary_name: str,
    otc: int,
    columns: tuple[Column, ...],
    keys: tuple[AlternateKey, ...] = (),
    states: dict[int, tuple[int, ...]] | None = None,
    *,
    platform: bool = False,
) -> Table:
    """A table with its system columns; ``platform`` tables (the webhook registrations) are
    neither change-tracked nor notifying."""
    states = states or {0: (1,), 1: (2,)}
    primary_id = f"{logical_name}id"
    return Table(
        logical_name=logical_name,
        entity_set=entity_set,
        primary_id=primary_id,
        primary_name=primary_name,
        object_type_code=otc,
        columns=_sys(logical_name, primary_id, states) + columns,
        keys=keys,
        state_status=states,
        default_status={state: statuses[0] for state, statuses in states.items()},
        change_tracking=not platform,
        notifies=not platform,
    )


S = AttrType
SHIP_STATUS_OPTIONS = (100000000, 100000001, 100000002)  # not shipped, partially shipped, shipped
# systemuser.accessmode: read-write, administrative, read, support user, non-interactive (application
# users), delegated admin.
ACCESS_MODES = (0, 1, 2, 3, 4, 5)
_CURRENCY = Column("transactioncurrencyid", S.LOOKUP, targets=("transactioncurrency",))


def _lookup(name: str, target: str, relationship: str) -> Column:
    """A single-table lookup column with its relationship's name."""
    return Column(name, AttrType.LOOKUP, targets=(target,), relationships=(relationship,))


def _customer(name: str, prefix: str, *, required: bool = False) -> Column:
    """A polymorphic Customer column (account or contact): relationships ``<prefix>_accounts``
    and ``<prefix>_contacts``."""
    return Column(
        name,
        S.CUSTOMER,
        targets=("account", "contact"),
        required=required,
        relationships=(f"{prefix}_accounts", f"{prefix}_contacts"),
    )


# -- webhook registrations (the platform tables Dataverse keeps them in) ----------------------
SDK_MESSAGES = ("Create", "Update", "Delete")
"""The messages the sandbox raises notifications for (seeded in ``sdkmessage``)."""
CONTRACTS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)  # 8 = Webhook
WEBHOOK_CONTRACT = 8
AUTH_TYPES = (1, 2, 3, 4, 5, 6, 7, 8, 9)  # 4 WebhookKey, 5 HttpHeader, 6 HttpQueryString
MESSAGE_FORMATS = (1, 2, 3)  # BinaryXML, Json, TextXML
STEP_STAGES = (10, 20, 40)  # pre-validation, pre-operation, post-operation
STEP_MODES = (0, 1)  # synchronous, asynchronous
REGISTRATION_TABLES = (
    _table(
        "sdkmessage",
        "sdkmessages",
        "name",
        4606,
        (
            Column("name", S.STRING, 256, required=True),
            Column("categoryname", S.STRING, 25),
            Column("isprivate", S.BOOLEAN),
            Column("autotransact", S.BOOLEAN),
            Column("isvalidforexecuteasync", S.BOOLEAN),
        ),
        platform=True,
    ),
    _table(
        "sdkmessagefilter",
        "sdkmessagefilters",
        "name",
        4607,
        (
            Column("name", S.STRING, 256),
            Column("primaryobjecttypecode", S.STRING, 128),
            Column("secondaryobjecttypecode", S.STRING, 128),
            Column("iscustomprocessingstepallowed", S.BOOLEAN),
            Column("isvisible", S.BOOLEAN),
            Column("availability", S.INTEGER),
            _lookup("sdkmessageid", "sdkmessage", "sdkmessageid_sdkmessagefilter"),
        ),
        platform=True,
    ),
    _table(
        "serviceendpoint",
        "serviceendpoints",
        "name",
        4618,
        (
            Column("name", S.STRING, 256, required=True),
            Column("description", S.MEMO, 2000),
            Column("contract", S.PICKLIST, options=CONTRACTS, required=True),
            Column("url", S.STRING, 2000),
            Column("authtype", S.PICKLIST, options=AUTH_TYPES),
            Column("authvalue", S.MEMO, 4000, readable=False),
            Column("messageformat", S.PICKLIST, options=MESSAGE_FORMATS),
            Column("userclaim", S.PICKLIST, options=(1, 2, 3)),
            Column("namespaceaddress", S.STRING, 255),
            Column("namespaceformat", S.PICKLIST, options=(1, 2)),
            Column("path", S.STRING, 160),
            Column("connectionmode", S.PICKLIST, options=(1, 2)),
            Column("solutionnamespace", S.STRING, 160),
        ),
        platform=True,
    ),
    _table(
        "sdkmessageprocessingstep",
        "sdkmessageprocessingsteps",
        "name",
        4608,
        (
            Column("name", S.STRING, 256, required=True),
            Column("description", S.STRING, 256),
            Column("mode", S.PICKLIST, options=STEP_MODES, required=True),
            Column("stage", S.PICKLIST, options=STEP_STAGES, required=True),
            Column("rank", S.INTEGER, min_value=0, max_value=2147483647),
            Column("filteringattributes", S.STRING, 100000),
            Column("asyncautodelete", S.BOOLEAN),
            Column("supporteddeployment", S.PICKLIST, options=(0, 1, 2)),
            Column("invocationsource", S.PICKLIST, options=(-1, 0, 1)),
            Column("configuration", S.MEMO, 1073741823),
            _lookup("sdkmessageid", "sdkmessage", "sdkmessageid_sdkmessageprocessingstep"),
            _lookup("sdkmessagefilterid", "sdkmessagefilter", "sdkmessagefilterid_sdkmessageprocessingstep"),
            # Polymorphic in Dataverse (a plug-in type or a service endpoint); the sandbox has
            # service endpoints only, so the navigation property is eventhandler_serviceendpoint.
            Column(
                "eventhandler",
                S.LOOKUP,
                targets=("plugintype", "serviceendpoint"),
                relationships=(
                    "plugintype_sdkmessageprocessingstep",
                    "serviceendpoint_sdkmessageprocessingstep",
                ),
            ),
        ),
        platform=True,
    ),
)

TABLES: dict[str, Table] = {
    t.logical_name: t
    for t in (
        _table(
            "systemuser",
            "systemusers",
            "fullname",
            8,
            (
                Column("fullname", S.STRING, 200),
                Column("domainname", S.STRING, 1024),
                Column("internalemailaddress", S.STRING, 100),
                Column("applicationid", S.UNIQUEIDENTIFIER),
                Column("azureactivedirectoryobjectid", S.UNIQUEIDENTIFIER),
                Column("isdisabled", S.BOOLEAN),
                Column("accessmode", S.PICKLIST, options=ACCESS_MODES),
            ),
        ),
        _table(
            "transactioncurrency",
            "transactioncurrencies",
            "currencyname",
            9105,
            (
                Column("currencyname", S.STRING, 100, required=True),
                Column("isocurrencycode", S.STRING, 5, required=True),
                Column("currencysymbol", S.STRING, 10, required=True),
                Column("exchangerate", S.DECIMAL, min_value=0.0000000001, max_value=100000000000),
                Column("currencyprecision", S.INTEGER, min_value=0, max_value=4),
            ),
            keys=(AlternateKey("isocurrencycode_key", ("isocurrencycode",)),),
        ),
        _table(
            "account",
            "accounts",
            "name",
            1,
            (
                Column("name", S.STRING, 160, required=True),
                Column("accountnumber", S.STRING, 20),
                Column("emailaddress1", S.STRING, 100),
                Column("telephone1", S.STRING, 50),
                Column("address1_line1", S.STRING, 250),
                Column("address1_line2", S.STRING, 250),
                Column("address1_line3", S.STRING, 250),
                Column("address1_city", S.STRING, 80),
                Column("address1_stateorprovince", S.STRING, 50),
                Column("address1_postalcode", S.STRING, 20),
                Column("address1_country", S.STRING, 80),
                Column("description", S.MEMO, 2000),
                Column("creditlimit", S.MONEY, min_value=0, max_value=100000000000000),
                Column("creditonhold", S.BOOLEAN),
                Column("paymenttermscode", S.PICKLIST, options=(1, 2, 3, 4)),
                _CURRENCY,
                _lookup("primarycontactid", "contact", "account_primary_contact"),
                _lookup("parentaccountid", "account", "account_parent_account"),
            ),
            keys=(AlternateKey("accountnumber_key", ("accountnumber",)),),
        ),
        _table(
            "contact",
            "contacts",
            "fullname",
            2,
            (
                Column("firstname", S.STRING, 50),
                Column("lastname", S.STRING, 50, required=True),
                Column("fullname", S.STRING, 160, readonly=True),
                Column("emailaddress1", S.STRING, 100),
                Column("telephone1", S.STRING, 50),
                Column("jobtitle", S.STRING, 100),
                _customer("parentcustomerid", "contact_customer"),
                _CURRENCY,
                # a custom column with an alternate key, as an integration adds one to match the
                # ERP's contact number (the README's "add an entity" walk-through)
                Column("new_contactnumber", S.STRING, 20, custom=True),
            ),
            keys=(AlternateKey("new_contactnumber_key", ("new_contactnumber",)),),
        ),
        _table(
            "product",
            "products",
            "name",
            1024,
            (
                Column("name", S.STRING, 100, required=True),
                Column("productnumber", S.STRING, 100, required=True),
                Column("description", S.MEMO, 2000),
                Column("price", S.MONEY, min_value=0, max_value=100000000000000),
                Column("standardcost", S.MONEY, min_value=0, max_value=100000000000000),
                Column("quantityonhand", S.DECIMAL, min_value=0, max_value=1000000000),
                Column("quantitydecimal", S.INTEGER, min_value=0, max_value=5),
                Column("productstructure", S.PICKLIST, options=(1, 2, 3)),
                _CURRENCY,
            ),
            keys=(AlternateKey("productnumber_key", ("productnumber",)),),
            states={0: (1,), 1: (2,), 2: (0,), 3: (3,)},
        ),
        _table(
            "salesorder",
            "salesorders",
            "name",
            1088,
            (
                Column("name", S.STRING, 300, required=True),
                Column("ordernumber", S.STRING, 100),
                _customer("customerid", "order_customer", required=True),
                Column("description", S.MEMO, 2000),
                Column("totalamount", S.MONEY, min_value=0, max_value=100000000000000),
                Column("totaltax", S.MONEY, min_value=0, max_value=100000000000000),
                Column("datefulfilled", S.DATETIME),
                _CURRENCY,
                # A custom choice column, as an integration adds it (default publisher prefix new_,
                # option values from 100000000): the ERP's ship status. It is not statuscode, whose
                # values belong to a state and move statecode with them.
                Column("new_shipstatus", S.PICKLIST, options=SHIP_STATUS_OPTIONS, custom=True),
            ),
            keys=(AlternateKey("ordernumber_key", ("ordernumber",)),),
            states={0: (1, 2), 1: (3,), 2: (4,), 3: (100001, 100002), 4: (100003,)},
        ),
        _table(
            "invoice",
            "invoices",
            "name",
            1090,
            (
                Column("name", S.STRING, 300, required=True),
                Column("invoicenumber", S.STRING, 100),
                _customer("customerid", "invoice_customer", required=True),
                _lookup("salesorderid", "salesorder", "order_invoices"),
                Column("description", S.MEMO, 2000),
                Column("totalamount", S.MONEY, min_value=0, max_value=100000000000000),
                Column("totaltax", S.MONEY, min_value=0, max_value=100000000000000),
                Column("duedate", S.DATETIME),
                _CURRENCY,
            ),
            keys=(AlternateKey("invoicenumber_key", ("invoicenumber",)),),
            states={0: (1, 2, 4, 5, 6), 2: (100001, 100002), 3: (100003,)},
        ),
        *REGISTRATION_TABLES,
    )
}

ENTITY_SETS: dict[str, Table] = {t.entity_set: t for t in TABLES.values()}

_COLUMN_INDEX: dict[str, dict[str, Column]] = {
    t.logical_name: {c.name: c for c in t.columns} for t in TABLES.values()
}
_VALUE_INDEX: dict[str, dict[str, Column]] = {
    t.logical_name: {c.value_name: c for c in t.columns if c.readable} for t in TABLES.values()
}
_READABLE: dict[str, tuple[Column, ...]] = {
    t.logical_name: tuple(c for c in t.columns if c.readable) for t in TABLES.values()
}


def relationship_name(table: Table, col: Column, target: str) -> str:
    """The one-to-many relationship behind a lookup, named as Dataverse names the system ones
    (``lk_accountbase_createdby``, ``owner_accounts``, ``transactioncurrency_account``) unless the
    column names it (``account_primary_contact``, ``contact_customer_accounts``)."""
    if col.relationships:
        return col.relationships[col.targets.index(target)]
    if col.name in ("createdby", "modifiedby"):
        return f"lk_{table.logical_name}base_{col.name}"
    if col.name == "ownerid":
        return f"owner_{table.entity_set}"
    return f"{target}_{table.logical_name}"


def _nav_links(table: Table) -> list[NavLink]:
    """The single-valued navigation properties of a table's lookups (to tables the sandbox has)."""
    return [
        NavLink(
            table=table.logical_name,
            name=f"{col.name}_{target}" if col.is_polymorphic else col.name,
            column=col,
            target=target,
            partner=relationship_name(table, col, target),
        )
        for col in table.columns
        if col.is_lookup
        for target in col.targets
        if target in TABLES
    ]


_NAV_INDEX: dict[str, dict[str, NavLink]] = {
    t.logical_name: {link.name: link for link in _nav_links(t)} for t in TABLES.values()
}


def _partner_index() -> dict[str, dict[str, NavLink]]:
    index: dict[str, dict[str, NavLink]] = {name: {} for name in TABLES}
    for links in _NAV_INDEX.values():
        for link in links.values():
            index[link.target][link.partner] = link
    return index


_PARTNER_INDEX = _partner_index()


def sql_column(col: Column) -> str:
    """The SQLite column holding an attribute (lookups store the target GUID)."""
    return col.name


def type_column(col: Column) -> str:
    """The SQLite column holding a polymorphic lookup's target table."""
    return f"{col.name}__type"


def missing_columns(table: Table, present: set[str]) -> list[str]:
    """ALTER statements adding the columns a database made by an older schema lacks.

    Like a column added to a live environment: existing rows read it as null.
    """
    statements = []
    for col in table.columns:
        names = [col.name] + ([type_column(col)] if col.is_polymorphic else [])
        for name in names:
            if name not in present:
                kind = "TEXT" if col.is_lookup else SQL_TYPES[col.type]
                statements.append(f'ALTER TABLE "{table.logical_name}" ADD COLUMN "{name}" {kind}')
    return statements


def ddl(table: Table) -> list[str]:
    """CREATE statements for a table, its alternate-key indexes and its version index."""
    parts = [f'"{table.primary_id}" TEXT PRIMARY KEY']
    for col in table.columns:
        if col.name == table.primary_id:
            continue
        if col.is_lookup:
            parts.append(f'"{col.name}" TEXT')
            if col.is_polymorphic:
                parts.append(f'"{type_column(col)}" TEXT')
        else:
            parts.append(f'"{col.name}" {SQL_TYPES[col.type]}')
    statements = [f'CREATE TABLE IF NOT EXISTS "{table.logical_name}" ({", ".join(parts)})']
    statements.append(
        f'CREATE UNIQUE INDEX IF NOT EXISTS "ix_{table.logical_name}_version" '
        f'ON "{table.logical_name}" (versionnumber)'
    )
    for key in table.keys:
        cols = ", ".join(f'"{a}"' for a in key.attributes)
        where = " AND ".join(f'"{a}" IS NOT NULL' for a in key.attributes)
        statements.append(
            f'CREATE UNIQUE INDEX IF NOT EXISTS "ix_{table.logical_name}_{key.name}" '
            f'ON "{table.logical_name}" ({cols}) WHERE {where}'
        )
    return statements
