"""The run's :class:`TransformContext` lookup: key maps of synced entities, reference tables.

Why only *synced* parents resolve: a child written before its parent exists on the other side
would point at nothing (or fail a foreign key), so an unknown parent raises
:class:`~d365sync.engine.transforms.MissingParent` and the pipeline parks the child until a
run syncs the parent. Reference tables (currencies) are read from Dataverse once per run.
Entity key maps are fetched from the state store in bulk per chunk (:meth:`prime`) and cached.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from d365sync.engine.state import StateStore
from d365sync.engine.transforms import TransformContext
from d365sync.spec import Catalog, EntityLookup, EntitySpec, ReferenceLookup


class KeyMapLookup:
    """``lookup(target, value, to)`` over the state store's key maps and reference tables."""

    def __init__(self, spec: EntitySpec, store: StateStore, dynamics: Any) -> None:
        self._spec, self._store, self._dynamics = spec, store, dynamics
        self._to_id: dict[str, dict[Any, Any]] = {}
        self._to_key: dict[str, dict[Any, Any]] = {}
        self._loaded_refs: set[str] = set()

    def __call__(self, target: str, value: Any, to: Literal["id", "key"]) -> Any:
        if value is None:
            return None
        lookup = self._spec.lookups.get(target)
        if isinstance(lookup, ReferenceLookup):
            self._load_reference(target, lookup)
        elif isinstance(lookup, EntityLookup):
            value = _norm(value, to)
            self.prime(target, to, [value])
        table = self._to_id if to == "id" else self._to_key
        return table.get(target, {}).get(_norm(value, to))

    def prime(self, target: str, to: Literal["id", "key"], values: Iterable[Any]) -> None:
        """Fetch the key map rows of many parents at once (one query per chunk, not per row)."""
        lookup = self._spec.lookups.get(target)
        if not isinstance(lookup, EntityLookup):
            return
        cache = (self._to_id if to == "id" else self._to_key).setdefault(target, {})
        wanted = {_norm(v, to) for v in values if v is not None} - set(cache)
        if not wanted:
            return
        side = "erp" if to == "id" else "dynamics"
        found = self._store.load_base(lookup.entity, side, sorted(wanted))
        for stored in found.values():
            if stored.status == "synced" and stored.dynamics_id and stored.erp_key:
                self._to_id.setdefault(target, {})[stored.erp_key] = stored.dynamics_id
                self._to_key.setdefault(target, {})[stored.dynamics_id] = stored.erp_key
        for value in wanted:
            cache.setdefault(value, None)

    def _load_reference(self, target: str, lookup: ReferenceLookup) -> None:
        if target in self._loaded_refs:
            return
        self._loaded_refs.add(target)
        info = Catalog.sandbox().dynamics.get(lookup.dynamics_table)
        entity_set = lookup.entity_set or (info.entity_set if info else f"{lookup.dynamics_table}s")
        primary = info.primary_id if info else f"{lookup.dynamics_table}id"
        rows = self._dynamics.iter_rows(entity_set, [primary, lookup.key])
        for row in rows:
            guid, key = str(row[primary]).lower(), row.get(lookup.key)
            self._to_id.setdefault(target, {})[key] = guid
            self._to_key.setdefault(target, {})[guid] = key


def _norm(value: Any, to: Literal["id", "key"]) -> Any:
    """Keys are trimmed text; GUIDs lower-case without braces (as the state store keeps them)."""
    text = str(value).strip()
    return text if to == "id" else text.strip("{}").lower()


def transform_context(spec: EntitySpec, store: StateStore, dynamics: Any) -> TransformContext:
    """The per-run context: key-map lookups; no runtime code tables yet (the YAML maps apply)."""
    return TransformContext(lookup=KeyMapLookup(spec, store, dynamics))
