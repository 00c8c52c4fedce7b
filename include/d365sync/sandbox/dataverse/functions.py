"""``Microsoft.Dynamics.CRM.*`` query functions in ``$filter`` → parameterised SQLite.

Dataverse documents 60+ query functions (reference §2; L:webapi/query/filter-rows).  The sandbox
emulates the ones a sync, a reconciliation or an operator is likely to send:

==================================  =====================  ==========================================
function                            parameters             rows whose PropertyName value …
==================================  =====================  ==========================================
In / NotIn                          PropertyValues (1+)    is / is not one of the values
Between / NotBetween                PropertyValues (2)     lies / does not lie in [first, second]
On / NotOn                          PropertyValue (date)   falls / does not fall on that day
OnOrAfter / OnOrBefore              PropertyValue (date)   falls on or after / on or before that day
Today / Yesterday / Tomorrow        (none)                 falls on that day
LastXDays / NextXDays               PropertyValue (X)      lies between midnight X days ago and now /
                                                           between now and the end of day X from now
Last7Days / Next7Days               (none)                 as LastXDays / NextXDays with X = 7
LastXHours / NextXHours             PropertyValue (X)      lies between the start of the hour X hours
                                                           ago and now / between now and X hours on
OlderThanXMinutes / XHours / XDays  PropertyValue (X)      is earlier than now minus X units
==================================  =====================  ==========================================

Rules.  Sources: the function list, the JSON-array syntax and the apostrophe advice are from
L:webapi/query/filter-rows and the function reference pages; the logical-name rule and its error
were observed against a real environment by a third-party project (HTTP 400, "'OpportunityProduct'
entity doesn't contain attribute with Name = '_opportunityid_value'"); the day/hour semantics of
LastX/NextX follow the documented Advanced Find operators ("Last X Days" starts at midnight, "Last
X Hours" at the start of the hour).  Wordings marked *modelled* are the platform's message shapes,
not captured answers.

* Names are taken as written (case-sensitive) and need the ``Microsoft.Dynamics.CRM`` namespace.
  All parameters are named; each function takes exactly the ones listed (else OData's "No function
  signature … matches" 400, *modelled*).
* ``PropertyName`` is the attribute's *logical* name: ``transactioncurrencyid``, not the
  ``_transactioncurrencyid_value`` a client reads; that one is QueryBuilderNoAttribute
  (``0x80041103``: ``'Account' entity doesn't contain attribute with Name = …``).
* ``PropertyValues`` is a ``Collection(Edm.String)`` written as a JSON array: ``['A','B']`` or
  ``["A","B"]``; a value with an apostrophe goes in double quotes (``'O''Brien'`` is "Invalid JSON.
  A comma character ',' was expected …").  Each value is converted to the column's type with the
  normalisation the comparison operators use: strings compare case-insensitively, GUIDs in any
  case or with braces, date/times as UTC, numbers and booleans parsed.  A value that does not
  convert, a wrong number of values (Between takes 2, In at least 1) or a date function on a
  non-date column is InvalidArgument (``0x80040203``, "Condition for attribute 'account.x': …",
  *modelled*).
* There is no count limit on ``PropertyValues``: Dataverse documents none.  The URL limits bound it
  (reference §2: 32 KB for a GET, 64 KB inside ``$batch``), as they bound an ``or`` chain, and
  every value is a string literal under :data:`~d365sync.sandbox.dataverse.filters.MAX_STRING_LITERAL`.
  The values are one flat SQL ``IN`` list, so they add nothing to the nesting depth the
  ``$filter`` limit counts.
* Dates use the calling user's time zone; the sandbox's application user works in UTC, so "today"
  is the UTC day.  Stored values have whole seconds, so "up to now" includes the current second.
  A huge X is clamped to the representable dates.  The ``Not`` functions, like ``ne``, never
  match a null value.

Other documented functions (weeks, months, years, fiscal periods, user/business/hierarchy
conditions, choice columns, language) are a 400 saying the sandbox does not emulate them; names
Dataverse does not have (``LastXMinutes`` among them) get OData's unknown-function 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from odata_query import ast

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.records import format_moment, parse_moment, parse_value
from d365sync.sandbox.dataverse.schema import AttrType, Column, Table

NAMESPACE = ("Microsoft", "Dynamics", "CRM")

# Every query function Dataverse documents (L:webapi/query/filter-rows, "Dataverse query functions").
DOCUMENTED = frozenset(
    {
        *("InFiscalPeriod", "InFiscalPeriodAndYear", "InFiscalYear", "InOrAfterFiscalPeriodAndYear"),
        *("InOrBeforeFiscalPeriodAndYear", "Last7Days", "LastFiscalPeriod", "LastFiscalYear"),
        *("LastMonth", "LastWeek", "LastXDays", "LastXFiscalPeriods", "LastXFiscalYears", "LastXHours"),
        *("LastXMonths", "LastXWeeks", "LastXYears", "LastYear", "Next7Days", "NextFiscalPeriod"),
        *("NextFiscalYear", "NextMonth", "NextWeek", "NextXDays", "NextXFiscalPeriods"),
        *("NextXFiscalYears", "NextXHours", "NextXMonths", "NextXWeeks", "NextXYears", "NextYear"),
        *("OlderThanXDays", "OlderThanXHours", "OlderThanXMinutes", "OlderThanXMonths"),
        *("OlderThanXWeeks", "OlderThanXYears", "On", "OnOrAfter", "OnOrBefore", "ThisFiscalPeriod"),
        *("ThisFiscalYear", "ThisMonth", "ThisWeek", "ThisYear", "Today", "Tomorrow", "Yesterday"),
        *("EqualBusinessId", "EqualUserId", "NotEqualBusinessId", "NotEqualUserId"),
        *("Above", "AboveOrEqual", "EqualUserOrUserHierarchy", "EqualUserOrUserHierarchyAndTeams"),
        *("EqualUserOrUserTeams", "EqualUserTeams", "NotUnder", "Under", "UnderOrEqual"),
        *("ContainValues", "DoesNotContainValues", "Between", "NotBetween", "In", "NotIn"),
        *("EqualUserLanguage", "Contains", "DoesNotContain", "NotOn"),
    }
)

_NAME = ("PropertyName", "Edm.String")
_VALUES = ("PropertyValues", "Collection(Edm.String)")
_DAY = ("PropertyValue", "Edm.String")
_COUNT = ("PropertyValue", "Edm.Int64")
# The emulated functions and their parameters (name, type), in Dataverse's order.
SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(("In", "NotIn", "Between", "NotBetween"), (_NAME, _VALUES)),
    **dict.fromkeys(("On", "NotOn", "OnOrAfter", "OnOrBefore"), (_NAME, _DAY)),
    **dict.fromkeys(("Today", "Yesterday", "Tomorrow", "Last7Days", "Next7Days"), (_NAME,)),
    **dict.fromkeys(("LastXHours", "NextXHours", "LastXDays", "NextXDays"), (_NAME, _COUNT)),
    **dict.fromkeys(("OlderThanXMinutes", "OlderThanXHours", "OlderThanXDays"), (_NAME, _COUNT)),
}
_FIXED_X = {"Last7Days": 7, "Next7Days": 7}

# The .NET type the platform names when a condition value does not fit the attribute.
_CLR_TYPES: dict[AttrType, str] = {
    AttrType.STRING: "System.String",
    AttrType.MEMO: "System.String",
    AttrType.INTEGER: "System.Int32",
    AttrType.PICKLIST: "System.Int32",
    AttrType.STATE: "System.Int32",
    AttrType.STATUS: "System.Int32",
    AttrType.BIGINT: "System.Int64",
    AttrType.DECIMAL: "System.Decimal",
    AttrType.MONEY: "System.Decimal",
    AttrType.BOOLEAN: "System.Boolean",
    AttrType.DATETIME: "System.DateTime",
    AttrType.UNIQUEIDENTIFIER: "System.Guid",
    AttrType.LOOKUP: "System.Guid",
    AttrType.CUSTOMER: "System.Guid",
    AttrType.OWNER: "System.Guid",
}
_SECOND = timedelta(seconds=1)  # whole-second values: "< now + 1 s" is "at or before now"
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(microsecond=0, tzinfo=UTC)

Window = tuple[datetime | None, datetime | None]  # [start, end) in UTC; None leaves that side open


@dataclass(frozen=True)
class Collection(ast.List):
    """A JSON array literal (``['A','B']``, ``["A","B"]``), the form of ``PropertyValues``."""

    source: str = ""


# -- JSON array literals -----------------------------------------------------------------------
_JSON_SPACE = " \t\r\n"
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
# The OData JSON reader's messages (Microsoft.OData.Json.JsonReader), as Dataverse relays them.
_OPEN_SCOPE = (
    "Unexpected end of input was found in JSON content. Not all object and array scopes were closed."
)
_MISSING_COMMA = (
    "A comma character ',' was expected in scope 'Array'. Every two elements in an array and properties "
    "of an object must be separated by commas."
)
_UNEXPECTED_COMMA = (
    "An unexpected comma was found in scope 'Array'. A comma is only valid between properties of an "
    "object or between elements of an array."
)
_UNRECOGNIZED = "A token was not recognized in the JSON content."
_OPEN_STRING = "Unexpected end of input reached while processing a JSON string value."


def read_collection(text: str, start: int) -> tuple[Collection, int]:
    """Read the JSON array opening at ``text[start]`` (a ``[``); return it and the index after it.

    Reads as the OData JSON reader Dataverse uses: strings in double or single quotes with JSON
    backslash escapes (no ``''`` doubling), numbers, ``true``, ``false`` and ``null``.
    """
    items: list[ast._Literal] = []
    index = _skip_space(text, start + 1)
    if text.startswith("]", index):
        return Collection(items, text[start : index + 1]), index + 1
    while True:
        item, index = _read_scalar(text, index)
        items.append(item)
        index = _skip_space(text, index)
        if index >= len(text):
            raise _invalid_json(_OPEN_SCOPE)
        if text[index] == "]":
            return Collection(items, text[start : index + 1]), index + 1
        if text[index] != ",":
            raise _invalid_json(_MISSING_COMMA)
        index = _skip_space(text, index + 1)


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in _JSON_SPACE:
        index += 1
    return index


def _read_scalar(text: str, index: int) -> tuple[ast._Literal, int]:
    if index >= len(text):
        raise _invalid_json(_OPEN_SCOPE)
    if text[index] in "\"'":
        return _read_string(text, index)
    if text[index] == ",":
        raise _invalid_json(_UNEXPECTED_COMMA)
    for word in ("true", "false", "null"):
        if text.startswith(word, index):
            return (ast.Null() if word == "null" else ast.Boolean(word)), index + len(word)
    number = _JSON_NUMBER.match(text, index)
    if number is None:
        raise _invalid_json(_UNRECOGNIZED)
    word = number.group()
    return (ast.Float(word) if any(c in word for c in ".eE") else ast.Integer(word)), number.end()


def _read_string(text: str, index: int) -> tuple[ast.String, int]:
    quote, chars, index = text[index], [], index + 1
    while index < len(text):
        char = text[index]
        if char == quote:
            return ast.String(_join_utf16("".join(chars))), index + 1
        if char == "\\":
            code = text[index + 1 : index + 2]
            if code == "u" and len(hex_digits := text[index + 2 : index + 6]) == 4:
                try:
                    chars.append(chr(int(hex_digits, 16)))
                except ValueError:
                    raise _invalid_json(f"Invalid \\uXXXX escape sequence '\\u{hex_digits}'.") from None
                index += 6
                continue
            if code not in _ESCAPES:
                raise _invalid_json(f"Unrecognized escape sequence '\\{code}' in a JSON string value.")
            chars.append(_ESCAPES[code])
            index += 2
            continue
        chars.append(char)
        index += 1
    raise _invalid_json(_OPEN_STRING)


def _join_utf16(text: str) -> str:
    """Pair ``\\uD83D\\uDE00``-style surrogate escapes into one character; a lone one is invalid."""
    try:
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise _invalid_json("A JSON string value holds an unpaired UTF-16 surrogate escape.") from None


def _invalid_json(detail: str) -> errors.DataverseError:
    return errors.bad_request(f"Invalid JSON. {detail}")


def source_text(node: Any) -> str:
    """A literal as it is written in a URL (``'O''Brien'``, ``['A','B']``, ``42``)."""
    if isinstance(node, Collection):
        return node.source
    if isinstance(node, ast.String):
        return "'" + node.val.replace("'", "''") + "'"
    if isinstance(node, ast.List):
        return "(" + ",".join(source_text(item) for item in node.val) + ")"
    if isinstance(node, ast.Null):
        return "null"
    if isinstance(node, ast.Identifier):
        return ".".join((*node.namespace, node.name))
    return str(getattr(node, "val", node))


# -- compiling a call --------------------------------------------------------------------------
class FunctionCompiler:
    """Compile ``Microsoft.Dynamics.CRM.*`` calls on ``table`` (SQL alias ``alias``)."""

    def __init__(self, table: Table, alias: str) -> None:
        self.table = table
        self.alias = alias

    def compile(self, node: ast.Call) -> tuple[str, list[Any]]:
        """SQL for one call and its parameters; a Dataverse-worded 400 for a bad call."""
        name = node.func.name
        qualified = ".".join((*node.func.namespace, name))
        if node.func.namespace != NAMESPACE or name not in DOCUMENTED:
            raise errors.bad_request(
                f"An unknown function with name '{qualified}' was found. This may also be a function "
                "import or a key lookup on a navigation property, which is not allowed."
            )
        signature = SIGNATURES.get(name)
        if signature is None:
            raise errors.bad_request(
                f"The query function '{qualified}' is not supported by the sandbox (supported: "
                f"{', '.join(SIGNATURES)})."
            )
        args = self._arguments(node, qualified, signature)
        column = self._property(args["PropertyName"])
        subject = f'{self.alias}."{column.name}"'
        if "PropertyValues" in args:
            return self._values(name, column, subject, args["PropertyValues"])
        return self._dates(name, column, subject, args.get("PropertyValue"))

    @staticmethod
    def _arguments(
        node: ast.Call, qualified: str, signature: tuple[tuple[str, str], ...]
    ) -> dict[str, ast._Node]:
        named = {a.name.name: a.param for a in node.args if isinstance(a, ast.NamedParam)}
        if len(named) != len(node.args) or set(named) != {p for p, _ in signature}:
            considered = ", ".join(f"{p} {t}" for p, t in signature)
            raise errors.bad_request(
                f"No function signature for the function with name '{qualified}' matches the specified "
                f"arguments. The function signatures considered are: {node.func.name}({considered})."
            )
        return named

    def _property(self, node: ast._Node) -> Column:
        if not isinstance(node, ast.String):
            raise _cannot_convert(node, "Edm.String")
        column = self.table.column(node.val)
        if column is None:
            raise errors.bad_request(
                f"'{self.table.schema_name}' entity doesn't contain attribute with Name = '{node.val}' and "
                "NameMapping = 'Logical'.",
                errors.QUERY_BUILDER_NO_ATTRIBUTE,
            )
        return column

    def _values(self, name: str, column: Column, subject: str, node: ast._Node) -> tuple[str, list[Any]]:
        if not isinstance(node, Collection):
            raise _cannot_convert(node, "Collection(Edm.String)")
        values = [self._convert(column, item) for item in node.val]
        negate = "NOT " if name.startswith("Not") else ""
        if name.endswith("Between"):
            if len(values) != 2:
                raise self._invalid(
                    column, f"the operator '{name}' takes exactly 2 values, not {len(values)}"
                )
            return f"({subject} {negate}BETWEEN ? AND ?)", values
        if not values:
            raise self._invalid(column, f"the operator '{name}' takes at least 1 value")
        return f"({subject} {negate}IN ({', '.join('?' * len(values))}))", values

    def _convert(self, column: Column, item: ast._Node) -> Any:
        if not isinstance(item, ast.String | ast.Integer | ast.Float | ast.Boolean):
            raise _cannot_convert(item, "Edm.String")
        value = parse_value(column, item.val)
        if value is None:
            raise self._invalid(column, _expected(column, "System.String"))
        return value

    def _dates(
        self, name: str, column: Column, subject: str, node: ast._Node | None
    ) -> tuple[str, list[Any]]:
        if column.type != AttrType.DATETIME:
            raise self._invalid(column, _expected(column, "System.DateTime"))
        now = datetime.now(UTC).replace(microsecond=0)
        if SIGNATURES[name][-1] == _DAY:
            start, end = _day_window(name, self._day(column, node))
        else:
            start, end = _relative_window(name, now, _FIXED_X.get(name, 0) if node is None else _count(node))
        bounds = [(">=", start), ("<", end)]
        sql = " AND ".join(f"{subject} {op} ?" for op, moment in bounds if moment is not None)
        params = [format_moment(moment) for _, moment in bounds if moment is not None]
        return (f"(NOT ({sql}))" if name == "NotOn" else f"({sql})"), params

    def _day(self, column: Column, node: ast._Node | None) -> datetime:
        if not isinstance(node, ast.String | ast.Date | ast.DateTime):
            raise _cannot_convert(node, "Edm.String")
        moment = parse_moment(node.val)
        if moment is None:
            raise self._invalid(column, _expected(column, "System.String"))
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)

    def _invalid(self, column: Column, detail: str) -> errors.DataverseError:
        return errors.bad_request(
            f"Condition for attribute '{self.table.logical_name}.{column.name}': {detail}.",
            errors.INVALID_ARGUMENT,
        )


def _expected(column: Column, received: str) -> str:
    return f"expected argument(s) of type '{_CLR_TYPES[column.type]}' but received '{received}'"


def _cannot_convert(node: Any, edm_type: str) -> errors.DataverseError:
    return errors.bad_request(
        f"Cannot convert the literal '{source_text(node)}' to the expected type '{edm_type}'."
    )


def _count(node: ast._Node) -> int:
    if not isinstance(node, ast.Integer):
        raise _cannot_convert(node, "Edm.Int64")
    return int(node.val)


def _shift(moment: datetime, **delta: int) -> datetime:
    """``moment + timedelta(**delta)``, clamped to the representable range (X can be huge)."""
    try:
        return moment + timedelta(**delta)
    except OverflowError:
        return _LATEST if sum(delta.values()) > 0 else _EARLIEST


def _day_window(name: str, day: datetime) -> Window:
    next_day = _shift(day, days=1)
    return {"OnOrAfter": (day, None), "OnOrBefore": (None, next_day)}.get(name, (day, next_day))


def _relative_window(name: str, now: datetime, x: int) -> Window:
    today = now.replace(hour=0, minute=0, second=0)
    this_hour = now.replace(minute=0, second=0)
    windows: dict[str, Window] = {
        "Today": (today, _shift(today, days=1)),
        "Yesterday": (_shift(today, days=-1), today),
        "Tomorrow": (_shift(today, days=1), _shift(today, days=2)),
        "LastXDays": (_shift(today, days=-x), now + _SECOND),
        "NextXDays": (now, _shift(today, days=x + 1)),
        "LastXHours": (_shift(this_hour, hours=-x), now + _SECOND),
        "NextXHours": (now, _shift(now + _SECOND, hours=x)),
        "OlderThanXMinutes": (None, _shift(now, minutes=-x)),
        "OlderThanXHours": (None, _shift(now, hours=-x)),
        "OlderThanXDays": (None, _shift(now, days=-x)),
    }
    windows["Last7Days"], windows["Next7Days"] = windows["LastXDays"], windows["NextXDays"]
    return windows[name]
