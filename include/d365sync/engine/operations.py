"""Operator actions behind the manual DAGs: replay dead letters, decide review items.

Airflow-free (the DAG's task only passes Params in): the same functions serve a CLI or the UI
plugin. Both only change the state store; the next entity run does the writing — replayed dead
letters are re-injected by extract, decided reviews are fed to the merge as ``decided``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from d365sync.engine.state import StateStore

Decision = Literal["dynamics", "erp", "base"]


def replay_dead_letters(store: StateStore, entity: str, keys: Iterable[str], by: str) -> dict[str, Any]:
    """Make the pending dead letters of ``entity`` (all, or those of ``keys``) due on the next run."""
    wanted = {k.strip() for k in keys if k and k.strip()}
    letters = [d for d in store.dead_letters(entity) if not wanted or d.record_key.strip() in wanted]
    for letter in letters:
        store.replay_dead_letter(letter.id, by)
    found = {d.record_key.strip() for d in letters}
    return {"entity": entity, "replayed": len(letters), "not_found": sorted(wanted - found)}


def apply_review_decisions(
    store: StateStore, entity: str, review_ids: Iterable[int], decision: Decision, by: str
) -> dict[str, Any]:
    """Decide open review items: keep the Dynamics value, the ERP value or the base value."""
    if decision not in ("dynamics", "erp", "base"):
        raise ValueError(f"decision must be dynamics, erp or base, not {decision!r}")
    wanted = {int(i) for i in review_ids}
    open_items = {r.id: r for r in store.reviews(entity, status="open", limit=100_000)}
    decided = []
    for review_id in sorted(wanted & set(open_items)):
        chosen = getattr(open_items[review_id], decision)
        store.decide_review(review_id, chosen, by, comment=f"{decision} value chosen")
        decided.append(review_id)
    return {"entity": entity, "decided": decided, "not_open": sorted(wanted - set(decided))}
