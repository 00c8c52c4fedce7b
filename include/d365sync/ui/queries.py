"""Paginated, filtered reads of the state store for the UI pages.

Why not ``StateStore.reviews()`` and friends: they return whole lists (capped), which is right
for a run and wrong for a page over 10,000 open items. These queries count and slice in SQL on
the same tables; rows become the store's own value objects, so pages and runs agree on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine, Select, func, select

from d365sync.engine.causes import cause_of
from d365sync.engine.migrations import schema as t
from d365sync.engine.privacy import Privacy
from d365sync.engine.state import DeadLetter, Review, _audit, _dead, _review

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of rows plus what the pager needs."""

    items: list[T]
    total: int
    page: int
    size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def has_prev(self) -> bool:
        return self.page > 1

    @property
    def has_next(self) -> bool:
        return self.page < self.pages


@dataclass(frozen=True, slots=True)
class ReviewRow(Review):
    """A review item plus when it was opened (the queue shows its age)."""

    opened_at: datetime | None = None


def _review_row(row: Any, privacy: Privacy | None = None) -> ReviewRow:
    item = _review(row, privacy, display=True)
    values = {f.name: getattr(item, f.name) for f in fields(Review)}
    return ReviewRow(**values, opened_at=row["opened_at"])


@dataclass(frozen=True)
class ReviewFilter:
    """Filter of the review queue: entity, field, record key prefix, status."""

    entity: str | None = None
    field: str | None = None
    key: str | None = None
    status: str = "open"

    def apply(self, query: Select[Any]) -> Select[Any]:
        r = t.review
        query = query.where(r.c.status == self.status)
        if self.entity:
            query = query.where(r.c.entity == self.entity)
        if self.field:
            query = query.where(r.c.field == self.field)
        if self.key:
            query = query.where(r.c.record_key.like(_prefix(self.key), escape="\\"))
        return query


@dataclass(frozen=True)
class AuditFilter:
    """Filter of the audit log: entity, record key (exact or ``prefix*``), time range."""

    entity: str | None = None
    key: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        a = t.audit
        if self.entity:
            query = query.where(a.c.entity == self.entity)
        if self.key:
            key = self.key
            cond = a.c.record_key.like(_prefix(key[:-1]), escape="\\") if key.endswith("*") else None
            query = query.where(cond if cond is not None else a.c.record_key == key)
        if self.since:
            query = query.where(a.c.at >= self.since)
        if self.until:
            query = query.where(a.c.at < self.until)
        return query


def _prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _page(
    engine: Engine, query: Select[Any], order: Sequence[Any], page: int, size: int, row: Callable[[Any], T]
) -> Page[T]:
    page = max(1, page)
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
        rows = conn.execute(query.order_by(*order).limit(size).offset((page - 1) * size)).mappings()
        return Page([row(r) for r in rows], total, page, size)


def review_page(
    engine: Engine, flt: ReviewFilter, page: int = 1, size: int = 50, privacy: Privacy | None = None
) -> Page[ReviewRow]:
    """Open (or decided) review items, oldest first (personal data decrypted with ``privacy``)."""
    query, order = flt.apply(select(t.review)), [t.review.c.id]
    return _page(engine, query, order, page, size, lambda r: _review_row(r, privacy))


def review_ids(engine: Engine, flt: ReviewFilter, limit: int) -> list[int]:
    """Ids of the items a bulk decision covers, oldest first, at most ``limit``."""
    query = flt.apply(select(t.review.c.id)).order_by(t.review.c.id).limit(limit)
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def review(engine: Engine, review_id: int, privacy: Privacy | None = None) -> Review | None:
    with engine.connect() as conn:
        row = conn.execute(select(t.review).where(t.review.c.id == review_id)).mappings().first()
    return None if row is None else _review(row, privacy, display=True)


def review_counts(engine: Engine, status: str = "open") -> dict[str, int]:
    """Items per entity in one status (the queue's tabs)."""
    r = t.review
    query = select(r.c.entity, func.count()).where(r.c.status == status).group_by(r.c.entity)
    with engine.connect() as conn:
        return {entity: n for entity, n in conn.execute(query.order_by(r.c.entity))}


def review_fields(engine: Engine, entity: str | None, status: str = "open") -> list[str]:
    r = t.review
    query = select(r.c.field).where(r.c.status == status).distinct().order_by(r.c.field)
    if entity:
        query = query.where(r.c.entity == entity)
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def dead_letter_page(
    engine: Engine,
    entity: str | None,
    status: str = "pending",
    page: int = 1,
    size: int = 50,
    privacy: Privacy | None = None,
) -> Page[DeadLetter]:
    d = t.dead_letter
    query = select(d).where(d.c.status == status)
    if entity:
        query = query.where(d.c.entity == entity)
    return _page(engine, query, [d.c.id], page, size, lambda r: _dead(r, privacy, display=True))


@dataclass(slots=True)
class LetterGroup:
    """Letters of one entity and stage failing for the same cause (:mod:`d365sync.engine.causes`)."""

    entity: str
    stage: str
    cause: str
    sample: str | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    ids: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def token(self) -> str:
        """A short stable name for links and forms (the cause text can be long)."""
        name = f"{self.entity}\x1f{self.stage}\x1f{self.cause}".encode()
        return hashlib.sha256(name).hexdigest()[:16]


def dead_letter_groups(
    engine: Engine, entity: str | None = None, status: str = "pending"
) -> list[LetterGroup]:
    """Letters in ``status`` grouped by entity, stage and cause, the largest group first.

    Reads ids, keys, stages, errors and times only: no payload is decrypted, so grouping a queue
    of 10,000 letters stays cheap.
    """
    d = t.dead_letter
    cols = (d.c.id, d.c.entity, d.c.record_key, d.c.stage, d.c.error, d.c.first_failed_at, d.c.last_failed_at)
    query = select(*cols).where(d.c.status == status).order_by(d.c.id)
    if entity:
        query = query.where(d.c.entity == entity)
    groups: dict[tuple[str, str, str], LetterGroup] = {}
    with engine.connect() as conn:
        for row in conn.execute(query):
            cause = cause_of(row.error, row.record_key)
            group = groups.setdefault(
                (row.entity, row.stage, cause.text), LetterGroup(row.entity, row.stage, cause.text)
            )
            group.ids.append(row.id)
            group.keys.append(row.record_key)
            group.sample = group.sample or cause.sample
            group.first_seen = _earliest(group.first_seen, row.first_failed_at)
            group.last_seen = _latest(group.last_seen, row.last_failed_at)
    return sorted(groups.values(), key=lambda g: (-g.count, g.entity, g.stage, g.cause))


def dead_letter_group(engine: Engine, token: str, status: str = "pending") -> LetterGroup | None:
    """The group a link or form names by :attr:`LetterGroup.token` (None: it is gone)."""
    return next((g for g in dead_letter_groups(engine, status=status) if g.token == token), None)


def dead_letters_by_id(
    engine: Engine, ids: Sequence[int], page: int = 1, size: int = 50, privacy: Privacy | None = None
) -> Page[DeadLetter]:
    """One page of the given letters (a group's row view), in id order."""
    chosen = sorted(ids)[(page - 1) * size : page * size]
    query = select(t.dead_letter).where(t.dead_letter.c.id.in_(chosen)).order_by(t.dead_letter.c.id)
    with engine.connect() as conn:
        items = [_dead(row, privacy, display=True) for row in conn.execute(query).mappings()]
    return Page(items, len(ids), page, size)


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def dead_letter_extra(engine: Engine, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Columns the store's DeadLetter leaves out: first/last failure, who handled it, skip reason."""
    d = t.dead_letter
    cols = (d.c.id, d.c.first_failed_at, d.c.last_failed_at, d.c.handled_by, d.c.skip_reason, d.c.run_id)
    with engine.connect() as conn:
        return {row["id"]: dict(row) for row in conn.execute(select(*cols).where(d.c.id.in_(ids))).mappings()}


def dead_letter(engine: Engine, dead_letter_id: int, privacy: Privacy | None = None) -> DeadLetter | None:
    with engine.connect() as conn:
        query = select(t.dead_letter).where(t.dead_letter.c.id == dead_letter_id)
        row = conn.execute(query).mappings().first()
    return None if row is None else _dead(row, privacy, display=True)


def dead_letter_counts(engine: Engine) -> dict[str, dict[str, int]]:
    """{status: {entity: n}} over every dead letter."""
    d = t.dead_letter
    query = select(d.c.status, d.c.entity, func.count()).group_by(d.c.status, d.c.entity)
    out: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for status, entity, n in conn.execute(query):
            out.setdefault(status, {})[entity] = n
    return out


def audit_page(
    engine: Engine, flt: AuditFilter, page: int = 1, size: int = 50, privacy: Privacy | None = None
) -> Page[dict[str, Any]]:
    """Audit rows, newest first (values were masked when stored; ``pii`` fields decrypted)."""
    query, order = flt.apply(select(t.audit)), [t.audit.c.id.desc()]
    return _page(engine, query, order, page, size, lambda r: _audit(r, privacy, display=True))


def entities(engine: Engine) -> list[str]:
    """Every entity the store knows of (runs, reviews, dead letters, audit)."""
    names: set[str] = set()
    with engine.connect() as conn:
        for table in (t.run, t.review, t.dead_letter, t.watermark):
            names.update(conn.execute(select(table.c.entity).distinct()).scalars())
    return sorted(names)
