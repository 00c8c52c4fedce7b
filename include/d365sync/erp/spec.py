"""Typed table specs: the allow-list of every identifier the ERP client may put into SQL.

The client never takes a table or column name from data or from a caller's string; it takes a
:class:`TableSpec`. Specs are frozen value objects, validated on construction, so a later engine
can build them from YAML entity files and get errors before any I/O happens.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Legacy schemas use plain identifiers; anything else is refused so quoting can never be escaped.
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class ColumnType(StrEnum):
    """Logical column types; each dialect maps them to its own DDL and conversions."""

    CHAR = "char"  # fixed width, padded with spaces by the database
    VARCHAR = "varchar"
    DECIMAL = "decimal"
    INTEGER = "integer"
    TIMESTAMP = "timestamp"
    DATE8 = "date8"  # legacy CHAR(8) 'YYYYMMDD' holding a date


class Column(BaseModel):
    """One column: its name, logical type and the limits that writes are validated against."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=IDENTIFIER.pattern)
    type: ColumnType
    length: int | None = Field(default=None, ge=1, le=8000)
    precision: int | None = Field(default=None, ge=1, le=38)
    scale: int | None = Field(default=None, ge=0, le=38)
    nullable: bool = True

    @model_validator(mode="after")
    def _limits_fit_type(self) -> Self:
        if self.type in (ColumnType.CHAR, ColumnType.VARCHAR) and self.length is None:
            raise ValueError(f"column {self.name}: {self.type.value} needs a length")
        decimal = self.type is ColumnType.DECIMAL
        if decimal and (self.precision is None or self.scale is None or self.scale > self.precision):
            raise ValueError(f"column {self.name}: decimal needs precision >= scale")
        return self

    @property
    def limit(self) -> str:
        """Human-readable limit for error messages, e.g. ``VARCHAR(60)`` or ``DECIMAL(15,2)``."""
        if self.type is ColumnType.DECIMAL:
            return f"DECIMAL({self.precision},{self.scale})"
        if self.type is ColumnType.DATE8:
            return "CHAR(8) date YYYYMMDD"
        if self.length is not None:
            return f"{self.type.value.upper()}({self.length})"
        return self.type.value.upper()


class TableSpec(BaseModel):
    """What the client needs to know about one ERP table, and nothing about how to sync it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=IDENTIFIER.pattern)
    columns: tuple[Column, ...] = Field(min_length=1)
    key: tuple[str, ...] = Field(min_length=1)
    cursor_column: str | None = None  # maintained by the ERP; read-only for the client
    version_column: str | None = None  # ROW_VER-style optimistic lock; read-only for the client
    status_column: str | None = None
    inactive_status: str = "I"
    hard_delete: bool = False  # deletes are refused unless the entity opts in

    @model_validator(mode="after")
    def _names_are_columns(self) -> Self:
        known = {c.name for c in self.columns}
        if len(known) != len(self.columns):
            raise ValueError(f"table {self.name}: duplicate column names")
        named = [*self.key, self.cursor_column, self.version_column, self.status_column]
        for name in filter(None, named):
            if name not in known:
                raise ValueError(f"table {self.name}: unknown column {name!r} (columns: {sorted(known)})")
        return self

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"table {self.name}: unknown column {name!r}")

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def writable(self) -> tuple[Column, ...]:
        """Columns a load may set: the ERP maintains the cursor and version columns itself."""
        system = {self.cursor_column, self.version_column}
        return tuple(c for c in self.columns if c.name not in system)

    @property
    def key_columns(self) -> tuple[Column, ...]:
        return tuple(self.column(k) for k in self.key)

    @property
    def updatable(self) -> tuple[Column, ...]:
        return tuple(c for c in self.writable if c.name not in self.key)
