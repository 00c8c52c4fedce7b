"""A large entity's Dataverse load split into parts by dynamic task mapping (issue 14).

``load_parts: 2`` in the entity file maps ``load_dynamics`` over two parts; each writes every
other plan file (disjoint buckets of keys) under the ``dynamics_api`` pool, and commit joins
their manifests. Real ``dag.test()`` on a migrated Airflow database, the Dataverse sandbox over
HTTP, the SQLite ERP through its ODBC driver.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from d365sync import ENTITIES_DIR
from d365sync.engine.state import StateStore
from d365sync.spec import load_entities
from tests.dags.conftest import AirflowEnv, assert_success
from tests.dags.sync_env import SyncEnv, connections_env, init_erp, sqlite_backend, tidy_erp, writes

ERP_ROWS = 300
CHUNK = 40  # several plan files, so both parts get some


@pytest.fixture(scope="module")
def env(
    airflow_env: AirflowEnv, dataverse_sandbox_factory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SyncEnv]:
    folder = tmp_path_factory.mktemp("load-parts")
    entities = folder / "entities"
    shutil.copytree(ENTITIES_DIR, entities)
    path = entities / "customers.yaml"
    path.write_text(path.read_text(encoding="utf-8") + "load_parts: 2\n", encoding="utf-8")
    assert load_entities(entities)["customers"].load_parts == 2
    (folder / "systems").mkdir()
    backend = sqlite_backend(folder / "systems")
    init_erp(backend, ERP_ROWS)
    tidy_erp(backend)
    sandbox = dataverse_sandbox_factory(seed=0)
    airflow = airflow_env.with_env(
        **connections_env(sandbox, backend),
        D365SYNC_STAGING_ROOT=f"file://{folder / 'staging'}",
        D365SYNC_ENTITIES_DIR=str(entities),
        D365SYNC_CHUNK_SIZE=str(CHUNK),
    )
    yield SyncEnv(airflow, sandbox, backend)
    sandbox.stop()


def test_two_mapped_parts_load_every_record_once_and_commit_joins_them(env: SyncEnv) -> None:
    (run,) = env.run("sync_customers")

    assert_success([run])
    assert {t: s for t, s in run.tasks.items() if t.startswith("load_dynamics")} == {
        "load_dynamics[0]": "success",
        "load_dynamics[1]": "success",
    }
    accounts = env.dv_rows("accounts", "accountid,accountnumber")
    numbers = [a["accountnumber"] for a in accounts]
    assert len(numbers) == len(set(numbers)) > 200  # every record once, no duplicates
    assert run.report is not None
    assert run.report["counts"]["dynamics_create"] == len(accounts)  # both parts' counts joined
    # the key map holds every GUID (commit saw both parts' results)
    guids = {a["accountnumber"]: a["accountid"].lower() for a in accounts}
    with StateStore.open(env.backend.state_url) as store:
        stored = store.load_base("customers", "erp", list(guids))
    assert {k: s.dynamics_id for k, s in stored.items()} == guids
    assert all(s.base is not None for s in stored.values())

    (again,) = env.run("sync_customers", conf={"dry_run": True})
    assert_success([again])
    assert writes(again) == {}  # converged: nothing left to write either way
