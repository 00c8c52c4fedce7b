"""Change-tracking reads (``Prefer: odata.track-changes``) as a small stateful object.

The feed yields :class:`Change` items (upserted rows, then deleted ids) and exposes the next
delta token only after it has been fully consumed, because a token taken from a half-read
feed would silently skip the unread changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from d365sync.dynamics.errors import DynamicsApiError, DynamicsError
from d365sync.dynamics.paging import NextLinkPaginator

StartFeed = Callable[[str | None], NextLinkPaginator]


@dataclass(frozen=True)
class Change:
    """One change: ``upsert`` carries the row; ``delete`` carries only the id."""

    kind: Literal["upsert", "delete"]
    id: str | None
    row: dict[str, Any] = field(default_factory=dict)


class ChangeFeed:
    """Iterate once; then read ``delta_token`` (and ``full_resync``) for the next run."""

    def __init__(self, start: StartFeed, delta_token: str | None, id_attribute: str | None = None) -> None:
        self._start = start
        self._token_in = delta_token
        self._id_attribute = id_attribute
        self._delta_token: str | None = None
        self._exhausted = False
        self._started = False
        self.full_resync = False
        self.upserts = 0
        self.deletes = 0

    def __iter__(self) -> Iterator[Change]:
        if self._started:
            raise DynamicsError("a ChangeFeed can be iterated only once")
        self._started = True
        paginator, pages = self._open()
        for page in pages:
            for row in page.get("value", []):
                yield self._to_change(row)
        self._delta_token = delta_token_of(paginator.delta_link)
        self._exhausted = True

    @property
    def delta_token(self) -> str:
        if not self._exhausted or self._delta_token is None:
            raise DynamicsError("delta_token is available only after the feed is fully consumed")
        return self._delta_token

    def _open(self) -> tuple[NextLinkPaginator, Iterator[Mapping[str, Any]]]:
        """Fetch the first delta page eagerly so an expired token can switch to a full read."""
        paginator = self._start(self._token_in)
        pages = paginator.pages_iter()
        if self._token_in is None:
            return paginator, pages
        try:
            first = next(pages)
        except DynamicsApiError as exc:
            if not exc.is_expired_delta_token:
                raise
            self.full_resync = True
            paginator = self._start(None)
            return paginator, paginator.pages_iter()
        return paginator, itertools.chain([first], pages)

    def _to_change(self, row: dict[str, Any]) -> Change:
        if is_deleted_entity(row):
            self.deletes += 1
            return Change("delete", str(row.get("id")))
        self.upserts += 1
        row_id = row.get(self._id_attribute) if self._id_attribute else None
        return Change("upsert", None if row_id is None else str(row_id), row)


def is_deleted_entity(row: Mapping[str, Any]) -> bool:
    context = str(row.get("@odata.context", ""))
    return context.endswith("$deletedEntity") or (row.get("reason") == "deleted" and "id" in row)


def delta_token_of(delta_link: str | None) -> str:
    """Extract ``$deltatoken`` from a deltaLink; treat the token itself as opaque."""
    if not delta_link:
        raise DynamicsError("the change-tracking read ended without an @odata.deltaLink")
    tokens = parse_qs(urlsplit(delta_link).query).get("$deltatoken")
    if not tokens:
        raise DynamicsError("the @odata.deltaLink carries no $deltatoken")
    return tokens[0]
