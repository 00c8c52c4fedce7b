"""Shaping the rows a read returns: ``$select``, ``$expand`` and the lookups' annotations.

``$expand`` joins single-valued navigation properties (``primarycontactid``,
``customerid_account``) with the options Dataverse allows on them: ``$select``, ``$filter`` (the
related row shows as null when it does not match) and a nested ``$expand``; ``nav/$ref`` returns
just the related row's ``@odata.id``.  As in the service, expanded rows carry no ``@odata.etag``
and a query holds at most 15 expansions.  Collection-valued navigation properties (the partners
``$metadata`` declares, e.g. ``contact_customer_accounts``) cannot be expanded in the sandbox.

Lookups render as ``_x_value`` GUIDs; under ``Prefer: odata.include-annotations`` they carry
``…lookuplogicalname``, ``…associatednavigationproperty`` and, as formatted value, the primary
name of the related row, which :class:`Projector` reads for a whole page at once.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from d365sync.sandbox.dataverse import errors
from d365sync.sandbox.dataverse.filters import FilterCompiler, unknown_property
from d365sync.sandbox.dataverse.protocol import split_top_level
from d365sync.sandbox.dataverse.records import FORMATTED_VALUE, Annotations, lookup_target, render
from d365sync.sandbox.dataverse.schema import TABLES, Column, NavLink, Table
from d365sync.sandbox.dataverse.store import Store

MAX_EXPANSIONS = 15  # "You can include up to 15 $expand options in a query" (join-tables docs)
_CHUNK = 500  # ids per IN (…) when fetching related rows
_SINGLE_VALUED_OPTIONS = ("$select", "$filter", "$expand")


@dataclass
class Expansion:
    """One ``$expand`` item on a single-valued navigation property."""

    link: NavLink
    select: list[Column] | None = None
    where: str = ""
    params: list[Any] = field(default_factory=list)
    expand: list[Expansion] = field(default_factory=list)
    ref: bool = False

    @property
    def target(self) -> Table:
        return TABLES[self.link.target]

    def context(self) -> str:
        """This item as ``@odata.context`` lists it: ``primarycontactid(fullname)``."""
        if self.ref:
            return f"{self.link.name},{self.link.name}/$ref()"
        return f"{self.link.name}({','.join(context_items(self.select, self.expand))})"


def context_items(select: list[Column] | None, expand: list[Expansion]) -> list[str]:
    """The ``(…)`` part of a context URL: selected properties, then expansions."""
    return [c.value_name for c in select or []] + [e.context() for e in expand]


def parse_select(table: Table, text: str | None) -> list[Column] | None:
    """``$select``: structural properties only, lookups as ``_x_value`` (a navigation property
    cannot be selected; expand it instead)."""
    if text is None or not text.strip():
        return None
    columns: list[Column] = []
    for name in (n.strip() for n in text.split(",")):
        column = table.by_value_name(name)
        if column is None:
            raise unknown_property(table, name)
        columns.append(column)
    return columns


def parse_expand(table: Table, text: str | None, budget: list[int] | None = None) -> list[Expansion]:
    """``$expand`` items; ``budget`` counts the expansions left across nesting levels."""
    if not text:
        return []
    budget = budget if budget is not None else [MAX_EXPANSIONS]
    expansions: list[Expansion] = []
    for item in split_top_level(text):
        budget[0] -= 1
        if budget[0] < 0:
            raise errors.bad_request(
                f"The query expands more than {MAX_EXPANSIONS} navigation properties; Dataverse allows "
                f"at most {MAX_EXPANSIONS} $expand options in one query."
            )
        expansions.append(_expansion(table, item, budget))
    return expansions


def _expansion(table: Table, item: str, budget: list[int]) -> Expansion:
    name, paren, rest = item.partition("(")
    name = name.strip()
    if paren and not rest.endswith(")"):
        raise errors.bad_request(f"Term '{item}' is not valid in a $select or $expand expression.")
    ref = name.endswith("/$ref")
    name = name.removesuffix("/$ref")
    link = table.navigation(name)
    if link is None:
        if table.partner(name) is not None:
            raise _collection_valued(table, name, ref)
        raise unknown_property(table, name)
    expansion = Expansion(link, ref=ref)
    for option in split_top_level(rest[:-1], ";") if paren else []:
        _apply_option(expansion, option, budget)
    return expansion


def _collection_valued(table: Table, name: str, ref: bool) -> errors.DataverseError:
    if ref:
        return errors.bad_request("Expand with $ref is only supported on lookup type navigation property.")
    return errors.bad_request(
        f"The sandbox cannot expand the collection-valued navigation property '{name}' of "
        f"'{table.type_name}'; query its entity set with a $filter on the lookup instead."
    )


def _apply_option(expansion: Expansion, option: str, budget: list[int]) -> None:
    key, sep, value = option.partition("=")
    key = key.strip()
    target = expansion.target
    if not sep or expansion.ref:
        raise errors.bad_request(f"Term '{option}' is not valid in a $select or $expand expression.")
    if key in ("$top", "$orderby"):
        raise errors.bad_request(
            "Only $select and $filter clause can be provided while doing $expand on many-to-one "
            "relationship or nested one-to-many relationship."
        )
    if key not in _SINGLE_VALUED_OPTIONS:
        raise errors.bad_request(f"The query option '{key}' is not supported in $expand.")
    if key == "$select":
        expansion.select = parse_select(target, value)
    elif key == "$filter":
        expansion.where, expansion.params = FilterCompiler(target).compile(value)
    else:
        expansion.expand = parse_expand(target, value, budget)


# -- rendering -----------------------------------------------------------------------------------
def points_at(link: NavLink, row: sqlite3.Row) -> str | None:
    """The id ``row`` holds for ``link``'s target (None when unset or, polymorphic, another table)."""
    value = row[link.column.name]
    if value is None or (link.column.is_polymorphic and lookup_target(link.column, row) != link.target):
        return None
    return str(value)


class Projector:
    """Renders the rows of one response: chosen columns, requested annotations, expansions."""

    def __init__(self, store: Store, annotations: Annotations, api_url: str) -> None:
        self.store = store
        self.annotations = annotations
        self.api_url = api_url

    def rows(
        self,
        table: Table,
        rows: list[sqlite3.Row],
        columns: list[Column],
        expansions: Iterable[Expansion] = (),
        *,
        with_etag: bool = True,
    ) -> list[dict[str, Any]]:
        names = self._names(rows, columns)
        out = [
            render(table, row, columns, annotations=self.annotations, names=names, with_etag=with_etag)
            for row in rows
        ]
        for expansion in expansions:
            self._expand(rows, out, expansion)
        return out

    def _names(self, rows: list[sqlite3.Row], columns: list[Column]) -> dict[str, str]:
        """Lookup id → primary name of the related row, when formatted values are wanted."""
        if not rows or not self.annotations.wants(FORMATTED_VALUE):
            return {}
        wanted: dict[str, set[str]] = defaultdict(set)
        for column in (c for c in columns if c.is_lookup):
            for row in rows:
                if row[column.name] is not None:
                    wanted[lookup_target(column, row)].add(row[column.name])
        names: dict[str, str] = {}
        for target_name, ids in wanted.items():
            target = TABLES.get(target_name)
            if target is not None:
                names.update((r[target.primary_id], r[target.primary_name]) for r in self._fetch(target, ids))
        return names

    def _fetch(
        self, table: Table, ids: Iterable[str], where: str = "", params: Iterable[Any] = ()
    ) -> list[sqlite3.Row]:
        """Rows of ``table`` with the given ids (and matching ``where``), a chunk at a time."""
        wanted = sorted(ids)
        found: list[sqlite3.Row] = []
        extra = f" AND ({where})" if where else ""
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            marks = ", ".join("?" for _ in chunk)
            sql = f'SELECT t.* FROM "{table.logical_name}" t WHERE t."{table.primary_id}" IN ({marks}){extra}'
            found += self.store.fetch(sql, [*chunk, *params])
        return found

    def _expand(self, rows: list[sqlite3.Row], out: list[dict[str, Any]], exp: Expansion) -> None:
        name, target = exp.link.name, exp.target
        ids = [points_at(exp.link, row) for row in rows]
        if exp.ref:
            for rendered, record_id in zip(out, ids, strict=True):
                url = f"{self.api_url}/{target.entity_set}({record_id})"
                rendered[name] = {"@odata.id": url} if record_id else None
            return
        related = self._fetch(target, {i for i in ids if i}, exp.where, exp.params)
        columns = exp.select if exp.select is not None else list(target.readable)
        shown = self.rows(target, related, columns, exp.expand, with_etag=False)
        by_id = {row[target.primary_id]: item for row, item in zip(related, shown, strict=True)}
        for rendered, record_id in zip(out, ids, strict=True):
            rendered[name] = by_id.get(record_id) if record_id else None
