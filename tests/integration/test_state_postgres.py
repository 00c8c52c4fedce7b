"""The state store suites of ``tests/unit/test_state.py`` and ``test_state_inbox.py`` rerun on PostgreSQL.

Each test gets its own schema (created, migrated, dropped), so runs never see each other's
rows and the migrations are exercised from an empty schema every time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from d365sync.engine import migrations
from d365sync.engine.state import StateStore, make_engine
from tests.conftest import SERVICES
from tests.unit.test_state import *  # noqa: F403  (the same tests, collected again here)
from tests.unit.test_state import GUID, T0, first_seen, write_v1_data
from tests.unit.test_state_inbox import *  # noqa: F403

pytestmark = pytest.mark.postgres


def _url() -> str:
    host, port = SERVICES["postgres"]
    return f"postgresql+psycopg2://postgres@{host}:{port}/test"


@pytest.fixture
def pg_schema() -> Iterator[str]:
    name = f"test_state_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_url())
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        yield name
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
    finally:
        admin.dispose()


@pytest.fixture
def store(pg_schema: str) -> Iterator[StateStore]:
    with StateStore.open(_url(), schema=pg_schema, chunk_size=3) as opened:
        yield opened


def test_old_postgres_schema_is_upgraded_with_its_data(pg_schema: str) -> None:
    engine = make_engine(_url(), pg_schema)
    try:
        migrations.upgrade(engine, target=1)
        write_v1_data(engine)
        with StateStore(engine) as upgraded:
            assert upgraded.schema_version() == migrations.HEAD
            assert upgraded.load_base("customers", "dynamics", [GUID])[GUID].base.values == {"name": "A"}
            assert first_seen(upgraded, "C1") == T0
    finally:
        engine.dispose()


def test_tables_live_in_the_test_schema_only(store: StateStore, pg_schema: str) -> None:
    query = text("SELECT table_schema FROM information_schema.tables WHERE table_name = 'sync_record'")
    with store.engine.connect() as conn:
        schemas = {row[0] for row in conn.execute(query)}
    assert pg_schema in schemas and "public" not in schemas
