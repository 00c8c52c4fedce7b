"""Following ``@odata.nextLink`` safely.

Links are used verbatim (Dataverse's skip-token cookie must not be touched) and every link is
remembered as a short digest, so a server that loops (hands out a link twice) raises instead of
spinning forever. Only one page is held in memory at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from d365sync.dynamics.errors import PagingLoopError, redact_url

FetchPage = Callable[[str], Mapping[str, Any]]


class NextLinkPaginator:
    """Yields pages starting at ``first_url``; remembers the final ``@odata.deltaLink``."""

    def __init__(self, fetch: FetchPage, first_url: str) -> None:
        self._fetch = fetch
        self._first_url = first_url
        self._seen: set[bytes] = set()
        self.delta_link: str | None = None
        self.pages = 0

    def pages_iter(self) -> Iterator[Mapping[str, Any]]:
        url: str | None = self._first_url
        while url is not None:
            self._remember(url)
            page = self._fetch(url)
            self.pages += 1
            yield page
            url = page.get("@odata.nextLink")
            self.delta_link = page.get("@odata.deltaLink", self.delta_link)

    def rows(self) -> Iterator[dict[str, Any]]:
        for page in self.pages_iter():
            yield from page.get("value", [])

    def _remember(self, url: str) -> None:
        digest = hashlib.blake2b(url.encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            raise PagingLoopError(f"server repeated a nextLink after {self.pages} page(s): {redact_url(url)}")
        self._seen.add(digest)
