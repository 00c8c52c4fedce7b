"""Table specs of the sandbox ERP, shaped like an old system: UPPER_CASE, CHAR keys, CHAR(8) dates.

These are the allow-list the client and the DDL generator both work from, so the schema a
test creates and the columns the client may touch can never drift apart.
"""

from __future__ import annotations

from d365sync.erp.spec import Column, ColumnType, TableSpec

C = ColumnType


def _char(name: str, n: int, nullable: bool = True) -> Column:
    return Column(name=name, type=C.CHAR, length=n, nullable=nullable)


def _text(name: str, n: int) -> Column:
    return Column(name=name, type=C.VARCHAR, length=n)


def _amount(name: str, precision: int = 15, scale: int = 2) -> Column:
    return Column(name=name, type=C.DECIMAL, precision=precision, scale=scale)


LAST_UPD = Column(name="LAST_UPD", type=C.TIMESTAMP, nullable=False)
ROW_VER = Column(name="ROW_VER", type=C.INTEGER, nullable=False)

CUST_MASTER = TableSpec(
    name="CUST_MASTER",
    columns=(
        _char("CUST_NO", 10, nullable=False),
        _text("CUST_NAME", 60),
        _text("CUST_EMAIL_ID", 80),
        _text("PHONE", 20),
        _text("ADDR_LINE1", 60),
        _text("ADDR_LINE2", 60),
        _text("CITY", 40),
        _char("POSTCODE", 10),
        _char("COUNTRY", 2),
        _char("CURR_CODE", 4),
        _amount("CREDIT_LIMIT"),
        _char("PAY_TERMS", 4),
        _char("STATUS", 1, nullable=False),
        _text("REMARKS", 254),
        LAST_UPD,
        ROW_VER,
    ),
    key=("CUST_NO",),
    cursor_column="LAST_UPD",
    version_column="ROW_VER",
    status_column="STATUS",
)

SO_HEADER = TableSpec(
    name="SO_HEADER",
    columns=(
        _char("SO_NO", 10, nullable=False),
        _char("CUST_NO", 10),
        Column(name="ORDER_DATE", type=C.DATE8),
        _amount("NET_AMOUNT"),
        _amount("TAX_AMOUNT"),
        _char("CURR_CODE", 4),
        _char("STATUS", 1, nullable=False),
        _char("SHIP_STATUS", 1),
        LAST_UPD,
        ROW_VER,
    ),
    key=("SO_NO",),
    cursor_column="LAST_UPD",
    version_column="ROW_VER",
    status_column="STATUS",
    inactive_status="X",
)

INV_HEADER = TableSpec(
    name="INV_HEADER",
    columns=(
        _char("INV_NO", 10, nullable=False),
        _char("SO_NO", 10),
        _char("CUST_NO", 10),
        Column(name="INV_DATE", type=C.DATE8),
        _amount("NET_AMOUNT"),
        _amount("TAX_AMOUNT"),
        _amount("GROSS_AMOUNT"),
        _char("CURR_CODE", 4),
        _char("PAID_FLAG", 1),
        LAST_UPD,
    ),
    key=("INV_NO",),
    cursor_column="LAST_UPD",
)

ITEM_MASTER = TableSpec(
    name="ITEM_MASTER",
    columns=(
        _char("ITEM_NO", 12, nullable=False),
        _text("DESCR", 60),
        _amount("UNIT_PRICE", 13, 4),
        _char("CURR_CODE", 4),
        LAST_UPD,
    ),
    key=("ITEM_NO",),
    cursor_column="LAST_UPD",
)

ITEM_STOCK = TableSpec(  # no timestamp on purpose: only a snapshot diff finds its changes
    name="ITEM_STOCK",
    columns=(
        _char("ITEM_NO", 12, nullable=False),
        _char("WHSE", 4, nullable=False),
        _amount("QTY_ON_HAND", 13, 3),
    ),
    key=("ITEM_NO", "WHSE"),
    hard_delete=True,
)

CURR_CODE_MAP = TableSpec(
    name="CURR_CODE_MAP",
    columns=(_char("LEGACY_CODE", 4, nullable=False), _char("ISO_CODE", 3), _text("DESCR", 40)),
    key=("LEGACY_CODE",),
)

CUST_CONTACT = TableSpec(  # no entity syncs it: the table the README's "add an entity" onboards
    name="CUST_CONTACT",
    columns=(
        _char("CONTACT_NO", 10, nullable=False),
        _char("CUST_NO", 10),
        _text("FIRST_NAME", 40),
        _text("LAST_NAME", 50),
        _text("EMAIL_ADDR", 80),
        _text("PHONE_NO", 20),
        _text("JOB_TITLE", 60),
        LAST_UPD,
        ROW_VER,
    ),
    key=("CONTACT_NO",),
    cursor_column="LAST_UPD",
    version_column="ROW_VER",
)

TABLES: tuple[TableSpec, ...] = (
    CURR_CODE_MAP,
    CUST_MASTER,
    CUST_CONTACT,
    ITEM_MASTER,
    ITEM_STOCK,
    SO_HEADER,
    INV_HEADER,
)

# Legacy currency codes as the old system keyed them, mapped to ISO 4217.
CURRENCIES: tuple[tuple[str, str, str], ...] = (
    ("STG", "GBP", "Pound sterling"),
    ("US$", "USD", "US dollar"),
    ("USD", "USD", "US dollar (new code)"),
    ("EURO", "EUR", "Euro"),
    ("SFR", "CHF", "Swiss franc"),
    ("YEN", "JPY", "Japanese yen"),
    ("SKR", "SEK", "Swedish krona"),
    ("CAN$", "CAD", "Canadian dollar"),
)
UNKNOWN_CURRENCIES: tuple[str, ...] = ("DM", "FF", "XX", "??")
