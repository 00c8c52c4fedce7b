"""Shared test fixtures.

Service policy: tests marked ``postgres``, ``mariadb`` or ``redis`` need a real service on
loopback. With ``CI=true`` a missing service is a failure; elsewhere the test is skipped with
the reason, so a laptop without the databases still runs everything else.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from cryptography.fernet import Fernet

pytest_plugins = ["tests.sandbox_fixtures"]

SERVICES: dict[str, tuple[str, int]] = {
    "postgres": (os.environ.get("D365SYNC_TEST_PG_HOST", "127.0.0.1"), 5432),
    "mariadb": (os.environ.get("D365SYNC_TEST_MARIADB_HOST", "127.0.0.1"), 3306),
    "redis": (os.environ.get("D365SYNC_TEST_REDIS_HOST", "127.0.0.1"), 6379),
}

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Entities with `pii: true` fields refuse to run without an encryption key (d365sync.engine.privacy):
# every test, and every Airflow or CLI child process a test starts, gets one generated for the session.
os.environ.setdefault("D365SYNC_PII_KEYS", Fernet.generate_key().decode())


# ``make test`` runs pytest-xdist on two workers. Each test file is one unit of work, so a module's
# fixtures (sandboxes, dag.test() homes) are built once. The files whose checks depend on a real
# Airflow stack keeping time (a scheduler's cycles, a triggerer's polls, Celery heartbeats, kill and
# restart windows) form one unit that a single worker runs one after another: two such stacks at
# once on two cores would starve each other's scheduler loops, while in-process tests beside one
# only slow it down. Stacks that merely have to finish (browser pages, a backfill, the operations
# DAGs' access checks) are ordinary units. (``--dist loadgroup`` would say this with marks, but its
# node-id suffix does not reach the scheduler under pytest 9, so the scheduler is made here.)
STACK_FILES = (
    "tests/soak/",
    "tests/deploy/test_celery_topology.py",
    "tests/deploy/test_celery_worker_kill.py",
    "tests/dags/test_event_runs.py",
)
STACK_UNIT = "airflow-stack"
# Sent first, longest first (their module fixtures take minutes), so that the short files fill the
# end of the run on both workers instead of one long file finishing alone.
LONG_FIRST = (
    STACK_UNIT,
    "tests/dags/test_entity_runs.py",
    "tests/dags/test_backfill.py",
    "tests/dags/test_operations_access.py",
    "tests/dags/test_crash_retry.py",
    "tests/browser/test_review_roundtrip.py",
    "tests/dags/test_operations_runs.py",
    "tests/browser/test_operations_ui.py",
    "tests/dags/test_pii_scan.py",
    "tests/dags/test_load_parts.py",
    "tests/dags/test_dags_test_cli.py",
)


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or the Airflow-stack unit."""
    path = nodeid.split("::", 1)[0]
    return STACK_UNIT if path.startswith(STACK_FILES) else path


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class StackScheduling(LoadScopeScheduling):
        """Load-balanced work units of :func:`work_unit`, the ones in :data:`LONG_FIRST` first."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _assign_work_unit(self, node: object) -> None:
            for unit in reversed(LONG_FIRST):
                if unit in self.workqueue:
                    self.workqueue.move_to_end(unit, last=False)
            super()._assign_work_unit(node)

    return StackScheduling(config, log)


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str) -> tuple[str, int]:
    """Return (host, port) of a service, failing in CI and skipping elsewhere when it is down."""
    host, port = SERVICES[name]
    if not _reachable(host, port):
        message = f"{name} is not reachable on {host}:{port}"
        if IN_CI:
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(f"{message} (set CI=true to make this a failure)")
    return host, port


@pytest.fixture(autouse=True)
def _service_markers(request: pytest.FixtureRequest) -> None:
    for name in SERVICES:
        if request.node.get_closest_marker(name) is not None:
            require_service(name)


@pytest.fixture(scope="session")
def pg_odbc_conn_str() -> Iterator[str]:
    """ODBC connection string for the PostgreSQL ``test`` database (trust auth)."""
    host, port = require_service("postgres")
    yield (f"DRIVER={{PostgreSQL Unicode}};SERVER={host};PORT={port};DATABASE=test;UID=postgres;PWD=;")


@pytest.fixture(scope="session")
def mariadb_odbc_conn_str() -> Iterator[str]:
    """ODBC connection string for the MariaDB ``test`` database (root, empty password)."""
    host, port = require_service("mariadb")
    yield f"DRIVER={{MariaDB Unicode}};SERVER={host};PORT={port};DATABASE=test;UID=root;PWD=;"


@pytest.fixture(scope="session")
def redis_url() -> str:
    host, port = require_service("redis")
    return f"redis://{host}:{port}/0"
