"""Data-subject requests and retention over the stores the sync owns: export, erase, purge, rotate.

The stores: the state store's tables and the staging files (Parquet chunk files, health and
reconcile reports). Dynamics 365 and the ERP are the systems of record; the sync never erases
there (their owners do, see ``docs/security.md``).

* :func:`export` — everything held about one record key, decrypted (a subject access request).
* :func:`erase` — one subject removed or anonymised everywhere: the key map row becomes a
  tombstone (the Dataverse id and a hash of the key, no key, no values) so the next sync that
  sees the record again re-pairs it by key instead of creating a duplicate; dead letters,
  reviews and parked children of the key are deleted; audit rows lose their values and key;
  staging rows that mention the key or the Dataverse id are dropped from their files. One audit
  row records the erasure with no personal data: entity, key hash, actor, counts.
* :func:`purge` / :func:`purge_staging` — retention: old audit rows (never erasure records),
  closed dead letters, released parked children, run reports, applied or closed review items,
  done or ignored inbox events, staging files.
* :func:`rotate_keys` — every encrypted value re-encrypted with the newest key (and every
  ``pii`` value still clear encrypted), so older keys can be dropped.

Airflow-free by rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, delete, func, select, update

from d365sync.engine.codec import decode, encode
from d365sync.engine.migrations import schema as t
from d365sync.engine.privacy import PrivacyConfigError, erased_key, key_hash
from d365sync.engine.state import StateStore, _audit, _child, _dead, _review, _stored

CLOSED_DEAD_LETTERS = ("resolved", "skipped", "superseded")
ERASE_OPERATION = "erase"


class RetentionPeriods(Protocol):
    """Days to keep each kind of row or file (``d365sync.spec.Retention``); 0 keeps forever."""

    audit_days: int
    dead_letter_days: int
    run_days: int
    review_days: int
    staging_days: int
    inbox_days: int


# ------------------------------------------------------------------------------ retention
def purge(store: StateStore, retention: RetentionPeriods, now: datetime | None = None) -> dict[str, int]:
    """Delete state rows past their retention period; returns how many of each kind went."""
    now = now or datetime.now(UTC)
    a, d, p, r, v = t.audit, t.dead_letter, t.parked, t.run, t.review
    counts: dict[str, int] = {}
    with store.engine.begin() as conn:
        if retention.audit_days:
            cutoff = now - timedelta(days=retention.audit_days)
            stmt = delete(a).where(a.c.at < cutoff, a.c.operation != ERASE_OPERATION)
            counts["audit"] = conn.execute(stmt).rowcount
        if retention.dead_letter_days:
            cutoff = now - timedelta(days=retention.dead_letter_days)
            closed = func.coalesce(d.c.resolved_at, d.c.last_failed_at)
            stmt = delete(d).where(d.c.status.in_(CLOSED_DEAD_LETTERS), closed < cutoff)
            counts["dead_letters"] = conn.execute(stmt).rowcount
            stmt = delete(p).where(p.c.status == "released", p.c.released_at < cutoff)
            counts["parked"] = conn.execute(stmt).rowcount
        if retention.run_days:
            cutoff = now - timedelta(days=retention.run_days)
            stmt = delete(r).where(r.c.started_at < cutoff, r.c.status != "running")
            counts["runs"] = conn.execute(stmt).rowcount
        if retention.review_days:
            cutoff = now - timedelta(days=retention.review_days)
            finished = func.coalesce(v.c.applied_at, v.c.updated_at)
            stmt = delete(v).where(v.c.status.in_(("applied", "closed")), finished < cutoff)
            counts["reviews"] = conn.execute(stmt).rowcount
    if retention.inbox_days:
        counts["inbox"] = store.purge_inbox(now - timedelta(days=retention.inbox_days))
    return counts


def purge_staging(roots: Iterable[Any], days: int, now: datetime | None = None) -> dict[str, int]:
    """Delete staging files older than ``days`` (by modification time) under each root, and the
    folders that leaves empty. Roots are local paths or ``ObjectStoragePath``s."""
    if not days:
        return {"staging_files": 0}
    cutoff = (now or datetime.now(UTC)).timestamp() - days * 86400
    removed = 0
    for root in _roots(roots):
        if not root.exists():
            continue
        for path in list(root.rglob("*")):
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        folders = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(str(p)), reverse=True)
        for folder in folders:
            if not any(folder.iterdir()):
                folder.rmdir()
    return {"staging_files": removed}


def _roots(roots: Iterable[Any]) -> Iterator[Any]:
    for root in roots:
        yield Path(root) if isinstance(root, str) else root


# ------------------------------------------------------------------------------- export
def export(store: StateStore, entity: str, key: str) -> dict[str, Any]:
    """What the sync holds about one record key, decrypted, as plain JSON-able data."""
    key = key.strip()
    hashed = erased_key(entity, key)
    privacy = store.privacy
    with store.engine.connect() as conn:
        row = _record_row(conn, entity, key)
        keys = _subject_keys(key, row)
        record = None
        if row is not None:
            stored = _stored(row, privacy)
            record = {
                "status": row["status"],
                "dynamics_id": row["dynamics_id"],
                "erp_key": stored.erp_key,
                "base": None if stored.base is None else asdict(stored.base),
                "first_seen_at": row["first_seen_at"],
                "updated_at": row["updated_at"],
            }
        r, d, p, a = t.review, t.dead_letter, t.parked, t.audit
        reviews = [asdict(_review(x, privacy)) for x in _rows(conn, r, entity, r.c.record_key, keys)]
        letters = [asdict(_dead(x, privacy)) for x in _rows(conn, d, entity, d.c.record_key, keys)]
        parked = [asdict(_child(x, privacy)) for x in _rows(conn, p, entity, p.c.record_key, keys)]
        audit = [_audit(x, privacy) for x in _rows(conn, a, entity, a.c.record_key, keys)]
        erasures = [_audit(x, privacy) for x in _rows(conn, a, entity, a.c.record_key, [hashed])]
    return _plain(
        {
            "entity": entity,
            "key": key,
            "key_hash": key_hash(entity, key),
            "record": record,
            "reviews": reviews,
            "dead_letters": letters,
            "parked": parked,
            "audit": [x for x in audit if x["operation"] != ERASE_OPERATION],
            "erasures": [x for x in erasures if x["operation"] == ERASE_OPERATION],
        }
    )


# -------------------------------------------------------------------------------- erase
def erase(
    store: StateStore,
    entity: str,
    key: str,
    *,
    actor: str,
    fields: Iterable[str] = (),
    staging_roots: Iterable[Any] = (),
    now: datetime | None = None,
) -> dict[str, Any]:
    """Remove or anonymise one data subject in the state store and the staging files.

    ``fields`` (the entity's ``pii`` fields) are named in the erasure's audit row. Needs no
    encryption key: nothing is decrypted. Returns ``{"entity", "key_hash", "counts"}``
    (the key itself is left out, so the result can go to logs and XCom).
    """
    key = key.strip()
    if not key:
        raise ValueError("no record key given")
    now = now or datetime.now(UTC)
    hashed = erased_key(entity, key)
    counts: dict[str, int] = {}
    with store.engine.begin() as conn:
        row = _record_row(conn, entity, key, tombstones=False)
        keys = _subject_keys(key, row)
        counts["records"] = _tombstone(conn, row, hashed, now)
        for name, table in (("reviews", t.review), ("dead_letters", t.dead_letter), ("parked", t.parked)):
            where = (table.c.entity == entity) & func.trim(table.c.record_key).in_(keys)
            counts[name] = conn.execute(delete(table).where(where)).rowcount
        a = t.audit
        where = (a.c.entity == entity) & func.trim(a.c.record_key).in_(keys)
        values = {"record_key": hashed, "before_json": None, "after_json": None}
        counts["audit"] = conn.execute(update(a).where(where).values(values)).rowcount
        counts["texts"] = _scrub_texts(conn, key)
    counts |= erase_from_staging(staging_roots, keys)
    entry = {"run_id": f"privacy:{now:%Y%m%dT%H%M%S%f}", "entity": entity, "record_key": hashed}
    entry |= {"side": "sync", "operation": ERASE_OPERATION, "fields_json": encode(sorted(fields))}
    entry |= {"before_json": None, "after_json": encode(counts), "actor": actor, "at": now}
    with store.engine.begin() as conn:
        conn.execute(t.audit.insert(), entry)
    return {"entity": entity, "key_hash": key_hash(entity, key), "counts": counts}


def _record_row(
    conn: Connection, entity: str, key: str, *, tombstones: bool = True
) -> Mapping[str, Any] | None:
    """The subject's key map row: the live one, else (``tombstones``) its erasure tombstone."""
    r = t.record
    wanted = [key, erased_key(entity, key)] if tombstones else [key]
    rows = {
        row["erp_key"]: row
        for row in conn.execute(select(r).where(r.c.entity == entity, r.c.erp_key.in_(wanted))).mappings()
    }
    return next((rows[k] for k in wanted if k in rows), None)


def _subject_keys(key: str, row: Mapping[str, Any] | None) -> list[str]:
    """The key and the Dataverse id: rows queued before a record had a key are keyed by its id."""
    return [key] + ([row["dynamics_id"]] if row is not None and row["dynamics_id"] else [])


def _rows(conn: Connection, table: Any, entity: str, column: Any, keys: list[str]) -> list[Any]:
    query = select(table).where(table.c.entity == entity, func.trim(column).in_(keys)).order_by(table.c.id)
    return list(conn.execute(query).mappings())


def _tombstone(conn: Connection, row: Mapping[str, Any] | None, hashed: str, now: datetime) -> int:
    """The key map row keeps its Dataverse id and a hash of the key; key, base and versions go."""
    if row is None:
        return 0
    r = t.record
    values: dict[str, Any] = {"erp_key": hashed, "status": "erased", "base_json": None, "run_id": None}
    values |= {c: None for c in ("dynamics_version", "erp_version", "dynamics_modified", "erp_modified")}
    values |= {"deleted_on": None, "updated_at": now}
    return conn.execute(update(r).where(r.c.id == row["id"]).values(values)).rowcount


def _scrub_texts(conn: Connection, key: str) -> int:
    """Free-text columns of other rows (run errors, other records' failures) naming the key."""
    count = 0
    for column in (t.run.c.error, t.dead_letter.c.error, t.dead_letter.c.skip_reason, t.review.c.reason):
        stmt = update(column.table).where(column.contains(key, autoescape=True))
        count += conn.execute(stmt.values({column.name: func.replace(column, key, "[erased]")})).rowcount
    return count


def erase_from_staging(roots: Iterable[Any], keys: Iterable[str]) -> dict[str, int]:
    """Drop the rows of staging chunk files whose key is, or whose data names, one of ``keys``.

    Files are rewritten in place (an emptied file stays, empty), so a manifest naming them still
    reads; a run in flight skips the erased record, and the next run reads it again if the
    source still has it.
    """
    from d365sync.engine.staging import drop_rows

    wanted = {k.strip().lower() for k in keys if k and k.strip()}
    files = rows = 0
    for root in _roots(roots):
        if not wanted or not root.exists():
            continue
        for path in list(root.rglob("*.parquet")):
            dropped = drop_rows(path, lambda row: _names_any(row, wanted))
            files, rows = files + bool(dropped), rows + dropped
    return {"staging_files": files, "staging_rows": rows}


def _names_any(value: Any, wanted: set[str]) -> bool:
    """Whether a text anywhere in ``value`` (a staged row) is one of ``wanted`` (trimmed, any case)."""
    if isinstance(value, str):
        return value.strip().lower() in wanted
    if isinstance(value, Mapping):
        return any(_names_any(v, wanted) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_names_any(v, wanted) for v in value)
    return False


# ------------------------------------------------------------------------------- rotate
#: (table, JSON value columns, how a column's values are sealed)
_SEALED_COLUMNS: tuple[tuple[Any, tuple[str, ...], str], ...] = (
    (t.record, ("base_json",), "values"),
    (t.audit, ("before_json", "after_json"), "values"),
    (t.review, ("base_json", "dynamics_json", "erp_json", "chosen_json"), "field"),
    (t.dead_letter, ("payload_json",), "whole"),
    (t.parked, ("payload_json",), "whole"),
)


def rotate_keys(store: StateStore, chunk_size: int = 500) -> dict[str, int]:
    """Re-encrypt every sealed value with the newest key, and seal ``pii`` values still clear.

    The store's privacy must know the ``pii`` fields of every entity (register them first);
    a value of a field no longer marked ``pii`` is stored clear again.
    """
    privacy = store.privacy
    if privacy.cipher is None:
        raise PrivacyConfigError(f"rotate-keys needs the encryption keys, newest first ({privacy.source})")
    counts: dict[str, int] = {}
    for table, columns, how in _SEALED_COLUMNS:
        extra = [table.c.field] if how == "field" else []
        last, changed = 0, 0
        while True:
            query = (
                select(table.c.id, table.c.entity, *extra, *(table.c[c] for c in columns))
                .where(table.c.id > last)
                .order_by(table.c.id)
                .limit(chunk_size)
            )
            with store.engine.begin() as conn:
                rows = list(conn.execute(query).mappings())
                if not rows:
                    break
                last = rows[-1]["id"]
                updates = [u for row in rows if (u := _resealed(store, row, columns, how)) is not None]
                if updates:
                    values = {c: bindparam(f"new_{c}") for c in columns}
                    stmt = update(table).where(table.c.id == bindparam("_id")).values(values)
                    conn.execute(stmt, updates)
                changed += len(updates)
        counts[table.name] = changed
    return counts


def _resealed(store: StateStore, row: Mapping[str, Any], columns: tuple[str, ...], how: str) -> Any:
    privacy, entity = store.privacy, row["entity"]
    texts = {c: row[c] for c in columns}
    holds = any('"$pii"' in (text or "") for text in texts.values())
    if not holds and not privacy.sealing(entity):
        return None
    out: dict[str, Any] = {"_id": row["id"]}
    for column, text in texts.items():
        if text is None:
            out[f"new_{column}"] = None
            continue
        value = privacy.reveal(decode(text))
        if how == "values":
            value = privacy.seal_values(entity, value) if isinstance(value, dict) else value
        elif how == "field":
            value = privacy.seal_field(entity, row["field"], value)
        else:
            value = privacy.seal_whole(entity, value)
        out[f"new_{column}"] = encode(value)
    return out


# -------------------------------------------------------------------------------- helpers
def _plain(value: Any) -> Any:
    """JSON-able: Decimal as text (scale kept), datetimes as ISO text."""
    from decimal import Decimal

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
