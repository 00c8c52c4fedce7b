"""``$filter`` → parameterised SQLite, using the maintained ``odata-query`` parser for syntax.

We only reuse its lexer/parser (AST); the translation is ours because Dataverse semantics
differ from plain OData in ways the library's SQL visitor does not model: lookups are filtered
as ``_x_value``, string comparisons are case-insensitive (the columns use ``COLLATE NOCASE``),
GUIDs and dates are normalised to the stored text forms, navigation paths like
``transactioncurrencyid/isocurrencycode`` become correlated sub-queries, and error messages
use Dataverse wording.  ``Microsoft.Dynamics.CRM.*`` query functions are compiled by
:mod:`d365sync.sandbox.dataverse.functions`; the JSON array literal they take for
``PropertyValues`` is read by this module's lexer (see :class:`DataverseLexer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from odata_query import ast
from odata_query.exceptions import ODataException, ParsingException, TokenizingException
from odata_query.grammar import ODataLexer, ODataParser
from sly.lex import Token

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.functions import FunctionCompiler, read_collection, source_text
from d365sync.sandbox.dataverse.records import parse_datetime, parse_value
from d365sync.sandbox.dataverse.schema import (
    GUID_TYPES,
    STRING_TYPES,
    TABLES,
    AttrType,
    Column,
    Table,
    type_column,
)

_NUMERIC = frozenset(
    {
        AttrType.INTEGER,
        AttrType.BIGINT,
        AttrType.DECIMAL,
        AttrType.MONEY,
        AttrType.PICKLIST,
        AttrType.STATE,
        AttrType.STATUS,
    }
)
_OPERATORS: dict[type, str] = {
    ast.Eq: "=",
    ast.NotEq: "<>",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
# Microsoft.OData's QueryParserSettings.DefaultFilterLimit: how deep a $filter may nest (a chain
# of N terms joined by and/or nests N deep).
MAX_FILTER_DEPTH = 800
# A string literal can be no longer than a GET URL (reference §2: 32 KB); it also keeps LIKE
# patterns under SQLite's limit (50,000 bytes), which a 64 KB $batch URL could otherwise exceed.
MAX_STRING_LITERAL = 32 * 1024
_OP_NAMES: dict[type, str] = {
    ast.Eq: "Equal",
    ast.NotEq: "NotEqual",
    ast.Lt: "LessThan",
    ast.LtE: "LessThanOrEqual",
    ast.Gt: "GreaterThan",
    ast.GtE: "GreaterThanOrEqual",
}


@dataclass
class Operand:
    """A translated sub-expression: SQL text, its parameters, and the column it reads (if any)."""

    sql: str
    params: list[Any]
    column: Column | None = None
    literal: ast._Node | None = None


def unknown_property(table: Table, name: str) -> errors.DataverseError:
    return errors.bad_request(f"Could not find a property named '{name}' on type '{table.type_name}'.")


class DataverseLexer(ODataLexer):
    """odata-query's lexer plus the JSON array literal Dataverse's query functions take.

    ``Microsoft.Dynamics.CRM.In(PropertyName='accountnumber',PropertyValues=['A','B'])`` is a
    syntax error for odata-query 0.10: its lexer has no token for ``[`` (the library knows only
    OData's ``('A','B')`` list), so tokenizing stops at that character.  Its grammar cannot be
    extended by subclassing either (SLY builds a parser from the rules in its own class body, so a
    subclass would restate every rule), so this lexer reads the whole array itself and hands the
    unchanged parser one primitive-literal token whose value is the
    :class:`~d365sync.sandbox.dataverse.functions.Collection` node.  A ``[`` inside a string
    literal is part of that string token and never reaches this rule.
    """

    tokens = {*ODataLexer.tokens, "COLLECTION"}

    @_(r"\[")  # type: ignore[name-defined]  # noqa: F821 - SLY's rule decorator, set by its metaclass
    def COLLECTION(self, token: Token) -> Token:
        token.value, self.index = read_collection(self.text, token.index)
        token.type = "STRING"  # any primitive-literal type: the parser passes the value through
        return token


def parse(text: str) -> ast._Node:
    """Parse a ``$filter`` expression, turning parser failures into Dataverse 400s."""
    try:
        return ODataParser().parse(DataverseLexer().tokenize(text))
    except TokenizingException as exc:
        position = getattr(exc.token, "index", 0)
        raise errors.bad_request(
            f"Syntax error: character '{text[position : position + 1]}' is not valid at position "
            f"{position} in '{text}'."
        ) from exc
    except ParsingException as exc:
        if exc.eof or exc.token is None:
            raise errors.bad_request(f"Syntax error: unexpected end of expression in '{text}'.") from exc
        near = source_text(exc.token.value) if isinstance(exc.token.value, ast._Node) else exc.token.value
        raise errors.bad_request(
            f"Syntax error at position {exc.token.index} in '{text}' near '{near}'."
        ) from exc
    except AttributeError as exc:
        # odata-query 0.10's rule for three or more named parameters reads a symbol it never
        # defined (``p.list_items``), so such a call raises AttributeError inside the parser.
        raise errors.bad_request(
            f"Syntax error in '{text}': the sandbox's parser reads at most two named parameters in a "
            "function call."
        ) from exc
    except (ODataException, RecursionError, ValueError, TypeError) as exc:
        raise errors.bad_request(f"Invalid $filter expression '{text}': {exc}") from exc


def check_limits(root: ast._Node) -> None:
    """Refuse (400) filters nested deeper than :data:`MAX_FILTER_DEPTH` or with string literals
    longer than :data:`MAX_STRING_LITERAL`; walks the tree without recursion."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_FILTER_DEPTH:
            raise errors.bad_request(
                f"The $filter expression is nested too deeply: the limit is {MAX_FILTER_DEPTH} "
                "(recursion depth exceeded allowed limit)."
            )
        if isinstance(node, ast.String) and len(node.val) > MAX_STRING_LITERAL:
            raise errors.bad_request(
                f"A string literal in $filter is {len(node.val)} characters long; the maximum is "
                f"{MAX_STRING_LITERAL}."
            )
        if isinstance(node, list | tuple):
            stack.extend((child, depth) for child in node)
        elif isinstance(node, ast._Node):
            for value in vars(node).values() if hasattr(node, "__dict__") else ():
                if isinstance(value, ast._Node | list | tuple):
                    stack.append((value, depth + 1))


class FilterCompiler:
    """Compile one AST for one table; ``alias`` is the SQL alias of the queried table."""

    def __init__(self, table: Table, alias: str = "t") -> None:
        self.table = table
        self.alias = alias

    def compile(self, text: str) -> tuple[str, list[Any]]:
        node = parse(text)
        check_limits(node)
        result = self.boolean(node)
        return result.sql, result.params

    # -- boolean level ----------------------------------------------------------------------
    def boolean(self, node: ast._Node) -> Operand:
        if isinstance(node, ast.BoolOp):
            # A chain ``a or b or c`` is one flat SQL ``(a OR b OR c)``: nesting it as the parser
            # does would overflow SQLite's parser stack (and Python's) long before our limit.
            kind, terms, stack = type(node.op), [], [node]
            while stack:
                item = stack.pop()
                if isinstance(item, ast.BoolOp) and type(item.op) is kind:
                    stack += [item.right, item.left]
                else:
                    terms.append(self.boolean(item))
            op = " AND " if kind is ast.And else " OR "
            return Operand(f"({op.join(t.sql for t in terms)})", [p for t in terms for p in t.params])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.boolean(node.operand)
            return Operand(f"(NOT {inner.sql})", inner.params)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Identifier | ast.Attribute):
            operand = self.value(node)
            if operand.column is not None and operand.column.type == AttrType.BOOLEAN:
                return Operand(f"({operand.sql} = 1)", operand.params)
        raise errors.bad_request("The $filter expression must evaluate to a boolean value.")

    def compare(self, node: ast.Compare) -> Operand:
        if isinstance(node.comparator, ast.In):
            return self._in(node)
        left, right = self.value(node.left), self.value(node.right)
        left, right = self._coerce_pair(left, right), self._coerce_pair(right, left)
        self._check_types(left, right, node.comparator)
        op = _OPERATORS[type(node.comparator)]
        if isinstance(node.right, ast.Null) or isinstance(node.left, ast.Null):
            subject = left if not isinstance(node.left, ast.Null) else right
            if op == "=":
                return Operand(f"({subject.sql} IS NULL)", subject.params)
            if op == "<>":
                return Operand(f"({subject.sql} IS NOT NULL)", subject.params)
            raise errors.bad_request("Null can only be compared with 'eq' or 'ne'.")
        return Operand(f"({left.sql} {op} {right.sql})", left.params + right.params)

    def _in(self, node: ast.Compare) -> Operand:
        left = self.value(node.left)
        if not isinstance(node.right, ast.List):
            raise errors.bad_request("The right operand of 'in' must be a list.")
        items = [self._coerce_pair(self.value(v), left) for v in node.right.val]
        marks = ", ".join(i.sql for i in items) or "NULL"
        params = left.params + [p for i in items for p in i.params]
        return Operand(f"({left.sql} IN ({marks}))", params)

    def call(self, node: ast.Call) -> Operand:
        name = node.func.name.lower()
        if node.func.namespace:
            sql, params = FunctionCompiler(self.table, self.alias).compile(node)
            return Operand(sql, params)
        if name in ("contains", "startswith", "endswith"):
            if len(node.args) != 2:
                raise errors.bad_request(f"The function '{name}' takes two arguments.")
            subject, pattern = self.value(node.args[0]), self.value(node.args[1])
            if not isinstance(node.args[1], ast.String):
                raise errors.bad_request(f"The second argument of '{name}' must be a string literal.")
            text = node.args[1].val.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            like = {"contains": f"%{text}%", "startswith": f"{text}%", "endswith": f"%{text}"}[name]
            del pattern
            return Operand(f"({subject.sql} LIKE ? ESCAPE '\\')", [*subject.params, like])
        raise errors.bad_request(f"The function '{node.func.name}' is not supported in $filter.")

    # -- value level ---------------------------------------------------------------------------
    def value(self, node: ast._Node) -> Operand:
        if isinstance(node, ast.Identifier):
            if node.namespace:
                raise unknown_property(self.table, ".".join((*node.namespace, node.name)))
            column = self._column(node.name)
            return Operand(f'{self.alias}."{column.name}"', [], column)
        if isinstance(node, ast.Attribute):
            return self._navigation(node)
        if isinstance(node, ast.Call) and node.func.name.lower() in ("tolower", "toupper", "trim"):
            inner = self.value(node.args[0]) if node.args else None
            if inner is None:
                raise errors.bad_request(f"The function '{node.func.name}' takes one argument.")
            fn = {"tolower": "LOWER", "toupper": "UPPER", "trim": "TRIM"}[node.func.name.lower()]
            return Operand(f"{fn}({inner.sql})", inner.params, inner.column)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.value(node.operand)
            return Operand(f"(-{inner.sql})", inner.params, literal=inner.literal)
        if isinstance(node, ast._Literal):
            return self._literal(node)
        raise errors.bad_request(f"Unsupported expression in $filter: {type(node).__name__}.")

    def _column(self, name: str) -> Column:
        column = self.table.by_value_name(name)
        if column is None:
            raise unknown_property(self.table, name)
        return column

    def _navigation(self, node: ast.Attribute) -> Operand:
        if not isinstance(node.owner, ast.Identifier):  # Dataverse filters through one lookup only
            raise errors.bad_request(
                "entityRelationshipRole for given navigation property not found", errors.UNEXPECTED
            )
        link = self.table.navigation(node.owner.name)
        if link is None:
            raise unknown_property(self.table, node.owner.name)
        lookup, target = link.column, TABLES[link.target]
        column = target.by_value_name(node.attr)
        if column is None:
            raise unknown_property(target, node.attr)
        condition = f'n."{target.primary_id}" = {self.alias}."{lookup.name}"'
        if lookup.is_polymorphic:
            condition += f" AND {self.alias}.\"{type_column(lookup)}\" = '{target.logical_name}'"
        sql = f'(SELECT n."{column.name}" FROM "{target.logical_name}" n WHERE {condition})'
        return Operand(sql, [], column)

    @staticmethod
    def _literal(node: ast._Literal) -> Operand:
        if isinstance(node, ast.Null):
            return Operand("NULL", [], literal=node)
        if isinstance(node, ast.Integer):
            return Operand("?", [int(node.val)], literal=node)
        if isinstance(node, ast.Float):
            return Operand("?", [float(node.val)], literal=node)
        if isinstance(node, ast.Boolean):
            return Operand("?", [1 if node.val.lower() == "true" else 0], literal=node)
        if isinstance(node, ast.String):
            return Operand("?", [node.val], literal=node)
        if isinstance(node, ast.GUID):
            return Operand("?", [node.val.lower()], literal=node)
        if isinstance(node, ast.DateTime):
            stamp = parse_datetime(node.val)
            if stamp is None:
                raise errors.bad_request(f"The date-time literal '{node.val}' is not valid.")
            return Operand("?", [stamp], literal=node)
        if isinstance(node, ast.Date):
            return Operand("?", [f"{node.val}T00:00:00Z"], literal=node)
        raise errors.bad_request(f"Unsupported literal in $filter: {type(node).__name__}.")

    @staticmethod
    def _coerce_pair(operand: Operand, other: Operand) -> Operand:
        """Strings compared with GUID or date/time columns are GUIDs or date/times: normalise their
        case and format (a string that is neither is compared as it is)."""
        column = other.column
        if column is None or not isinstance(operand.literal, ast.String):
            return operand
        if column.type in GUID_TYPES or column.type == AttrType.DATETIME:
            parsed = parse_value(column, operand.params[0])
            return Operand("?", [operand.params[0] if parsed is None else parsed], literal=operand.literal)
        return operand

    @staticmethod
    def _check_types(left: Operand, right: Operand, comparator: ast._Comparator) -> None:
        """Reject obviously mismatched operands the way the OData layer of Dataverse does."""
        for col_side, lit_side in ((left, right), (right, left)):
            column, literal = col_side.column, lit_side.literal
            if column is None or literal is None or isinstance(literal, ast.Null):
                continue
            numeric_vs_string = column.type in _NUMERIC and isinstance(literal, ast.String)
            string_vs_number = column.type in STRING_TYPES and isinstance(
                literal, ast.Integer | ast.Float | ast.Boolean
            )
            if numeric_vs_string or string_vs_number:
                kinds = (column.edm_type, _literal_edm(literal))
                if col_side is right:
                    kinds = kinds[::-1]
                raise errors.bad_request(
                    "A binary operator with incompatible types was detected. Found operand types "
                    f"'{kinds[0]}' and '{kinds[1]}' for operator kind '{_OP_NAMES[type(comparator)]}'."
                )


def _literal_edm(literal: ast._Node) -> str:
    return {
        ast.String: "Edm.String",
        ast.Integer: "Edm.Int32",
        ast.Float: "Edm.Double",
        ast.Boolean: "Edm.Boolean",
    }.get(type(literal), "Edm.Untyped")
