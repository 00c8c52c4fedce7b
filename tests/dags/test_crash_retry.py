"""A load killed mid-way (SIGKILL after its first write batch), then the run retried: no duplicates,
no lost updates, on either side."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.dags.conftest import AirflowEnv, assert_success
from tests.dags.sync_env import SyncEnv, connections_env, init_erp, sqlite_backend, tidy_erp, writes

EDITS = 20


@pytest.fixture(scope="module")
def env(
    airflow_env: AirflowEnv, dataverse_sandbox_factory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SyncEnv]:
    backend = sqlite_backend(tmp_path_factory.mktemp("crash"))
    init_erp(backend, 300)
    tidy_erp(backend)
    sandbox = dataverse_sandbox_factory(seed=30)
    staging = tmp_path_factory.mktemp("crash-staging")
    airflow = airflow_env.with_env(
        **connections_env(sandbox, backend),
        D365SYNC_STAGING_ROOT=f"file://{staging}",
    )
    yield SyncEnv(airflow, sandbox, backend)
    sandbox.stop()
    shutil.rmtree(staging, ignore_errors=True)


def test_load_killed_mid_way_then_retried(env: SyncEnv) -> None:
    assert_success(env.run("sync_customers"))
    accounts = env.dv_rows("accounts", "accountnumber,statecode", top=5000)
    keys = sorted(a["accountnumber"] for a in accounts if a["statecode"] == 0 and a["accountnumber"])
    paired = [
        k for k in keys if env.erp_scalar('SELECT "STATUS" FROM "CUST_MASTER" WHERE "CUST_NO" = ?', k) == "A"
    ]
    erp_edits, dv_edits = paired[:EDITS], paired[EDITS : 2 * EDITS]
    for i, key in enumerate(erp_edits):  # ERP-owned: flows to Dynamics
        env.erp_update("CUST_MASTER", "CUST_NO", key, CREDIT_LIMIT=10_000 + i)
    for i, key in enumerate(dv_edits):  # Dynamics-owned: flows to the ERP
        env.dv("PATCH", f"accounts(accountnumber='{key}')", {"telephone1": f"+44 20 7946 {i:04d}"})

    # write batches of 4 in the crashed run only, so the kill after the first leaves a partial load
    crashed = env.airflow.runner(
        "sync_customers", env={"D365SYNC_FAULT": "load_dynamics:1", "D365SYNC_CHUNK_SIZE": "4"}
    )
    crashed.communicate(timeout=600)
    assert crashed.returncode == -9, "the fault hook must kill the run mid-load"
    limits = {
        a["accountnumber"]: a["creditlimit"] for a in env.dv_rows("accounts", "accountnumber,creditlimit")
    }
    applied = [k for i, k in enumerate(erp_edits) if float(limits[k] or 0) == 10_000 + i]
    assert 0 < len(applied) < EDITS, f"expected a partial load, got {len(applied)} of {EDITS}"

    (retried,) = env.run("sync_customers")
    assert_success([retried])
    numbers = Counter(a["accountnumber"] for a in env.dv_rows("accounts", "accountnumber", top=5000))
    assert [n for n, c in numbers.items() if c > 1] == []
    limits = {
        a["accountnumber"]: a["creditlimit"] for a in env.dv_rows("accounts", "accountnumber,creditlimit")
    }
    assert [k for i, k in enumerate(erp_edits) if float(limits[k]) != 10_000 + i] == []
    for i, key in enumerate(dv_edits):
        phone = env.erp_scalar('SELECT "PHONE" FROM "CUST_MASTER" WHERE "CUST_NO" = ?', key)
        assert phone.strip() == f"+44 20 7946 {i:04d}", key
    (again,) = env.run("sync_customers")
    assert writes(again) == {}
