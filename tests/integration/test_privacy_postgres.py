"""The personal-data store suite of ``tests/unit/test_privacy_store.py`` rerun on PostgreSQL
(erasure and purge use trim/replace/LIKE/coalesce, which the two databases spell differently)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from d365sync.engine.state import StateStore
from tests.integration.test_state_postgres import _url, pg_schema  # noqa: F401  (the fixture)
from tests.unit.test_privacy_store import *  # noqa: F403  (the same tests, collected again here)
from tests.unit.test_privacy_store import privacy

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(pg_schema: str, key: str) -> Iterator[StateStore]:  # noqa: F811
    with StateStore.open(_url(), schema=pg_schema, chunk_size=3, privacy=privacy(key)) as opened:
        yield opened
