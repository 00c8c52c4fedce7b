"""Exact conversions between Python values and legacy column values, in both directions.

Legacy quirks handled here and nowhere else: CHAR padding (stripped on read, padded by the
database on write), dates kept as CHAR(8) ``YYYYMMDD`` (blank or ``00000000`` means none) and
DECIMAL values, which are never allowed to round silently: a value that does not fit the
column's precision and scale is rejected with the limit named.

A read converter raises ``ValueError`` for a value its column cannot hold (``'20231399'``,
``'N/A'`` in a DECIMAL column on SQLite), with a message that never repeats the value; the
reader (``reading.RowReader``) turns it into a per-row ``UnreadableValue``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from d365sync.erp.dialects import Dialect
from d365sync.erp.errors import RowRejected
from d365sync.erp.spec import Column, ColumnType

Converter = Callable[[Any], Any]

_NO_DATE = {"", "00000000"}
_INT_RANGE = (-(2**31), 2**31 - 1)


# -- reading -------------------------------------------------------------------------------
def read_converter(col: Column) -> Converter | None:
    """Converter for values coming from the driver, or None when the value is already right."""
    match col.type:
        case ColumnType.CHAR:
            return _strip_padding
        case ColumnType.DECIMAL:
            return _decimal_reader(col.scale or 0)
        case ColumnType.DATE8:
            return parse_date8
        case ColumnType.INTEGER:
            return _int_or_none
        case ColumnType.TIMESTAMP:
            return _timestamp_or_none
    return None


def _strip_padding(value: Any) -> Any:
    return value.rstrip(" ") if isinstance(value, str) else value


def _decimal_reader(scale: int) -> Converter:
    quantum = Decimal(1).scaleb(-scale)

    def read(value: Any) -> Decimal | None:
        if value is None:
            return None
        if isinstance(value, Decimal):
            number = value
        else:
            try:
                number = Decimal(repr(value) if isinstance(value, float) else str(value))
            except InvalidOperation:  # '', 'N/A': text in a DECIMAL column (SQLite stores it)
                raise ValueError("not a number") from None
        if not number.is_finite():
            raise ValueError("not a finite number")
        try:
            return number.quantize(quantum)
        except InvalidOperation:
            raise ValueError("too many digits for a decimal") from None

    return read


def parse_date8(value: Any) -> dt.date | None:
    """``'20240131'`` → date; blank and ``00000000`` → None (legacy 'no date')."""
    if value is None:
        return None
    text = str(value).strip()
    if text in _NO_DATE:
        return None
    if len(text) != 8 or not text.isdigit():
        raise ValueError("not 8 digits YYYYMMDD")  # messages never repeat the value (PII)
    return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError("not an integer") from None


def _timestamp_or_none(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError("not a timestamp") from None


# -- writing -------------------------------------------------------------------------------
def to_db(col: Column, value: Any, dialect: Dialect) -> Any:
    """Validate one value against its column and return what to bind; raises RowRejected."""
    if value is None:
        if not col.nullable:
            raise RowRejected(col.name, f"must not be empty ({col.limit} NOT NULL)")
        return None
    match col.type:
        case ColumnType.CHAR | ColumnType.VARCHAR:
            return _text(col, value, dialect)
        case ColumnType.DECIMAL:
            number = to_decimal(col, value)
            return str(number) if dialect.decimal_as_text else number
        case ColumnType.INTEGER:
            return _integer(col, value)
        case ColumnType.TIMESTAMP:
            return _timestamp(col, value)
        case ColumnType.DATE8:
            return format_date8(col, value)
    raise RowRejected(col.name, f"unsupported column type {col.type}")


def _text(col: Column, value: Any, dialect: Dialect) -> str:
    if not isinstance(value, str):
        raise RowRejected(col.name, f"expected text for {col.limit}, got {type(value).__name__}")
    if "\x00" in value:
        raise RowRejected(col.name, "text contains a NUL character")
    length = dialect.text_length(value)
    if col.length is not None and length > col.length:
        raise RowRejected(col.name, f"value has {length} characters; the column limit is {col.limit}")
    return value


def to_decimal(col: Column, value: Any) -> Decimal:
    """Exact DECIMAL: reject non-numbers, extra decimals and too many integer digits."""
    if isinstance(value, bool):
        raise RowRejected(col.name, f"not a number for {col.limit}: {value!r}")
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise RowRejected(col.name, f"not a number for {col.limit}: {_show(value)}") from None
    if not number.is_finite():
        raise RowRejected(col.name, f"not a finite number for {col.limit}: {_show(value)}")
    scale, precision = col.scale or 0, col.precision or 38
    quantized = number.quantize(Decimal(1).scaleb(-scale))
    if quantized != number:
        raise RowRejected(col.name, f"{number} has more than {scale} decimals ({col.limit})")
    if quantized and max(quantized.adjusted() + 1, 0) > precision - scale:
        raise RowRejected(col.name, f"{number} does not fit {col.limit}")
    return quantized


def _integer(col: Column, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RowRejected(col.name, f"not an integer: {_show(value)}")
    try:
        number = int(value)
    except ValueError:
        raise RowRejected(col.name, f"not an integer: {_show(value)}") from None
    if not _INT_RANGE[0] <= number <= _INT_RANGE[1]:
        raise RowRejected(col.name, f"{number} is out of INTEGER range")
    return number


def _timestamp(col: Column, value: Any) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise RowRejected(col.name, f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is not None:  # legacy columns are naive UTC
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def format_date8(col: Column, value: Any) -> str:
    """date → ``'YYYYMMDD'``; a valid ``'YYYYMMDD'`` string passes through unchanged."""
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, dt.date):
        return f"{value.year:04d}{value.month:02d}{value.day:02d}"
    if isinstance(value, str):
        try:
            if parse_date8(value) is not None and len(value) == 8:
                return value
        except ValueError:
            pass
    raise RowRejected(col.name, f"not a date for {col.limit}: {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
