"""The operations DAGs act only for an operator (security issue 11, finding 2), through ``dag.test()``.

The finding: an Airflow ``user`` (read-only in the operations UI) triggered
``apply_review_decisions`` and recorded ``decided_by='alice (forged)'`` from the run's conf, and
could replay dead letters. Now each operations DAG that changes the sync state reads the run's
``triggering_user_name`` (set by Airflow, here by ``dag.test()``: ``dag_test``) and that user's
role from SimpleAuthManager's users, with the operations UI's role map; ``decided_by`` and the
replay's ``by`` are that user.

Real runs on a migrated metadata DB in a child process (see ``conftest.py``), in a complete sync
environment (Dataverse sandbox, SQLite ERP, state store seeded with the UI tests' reviews and
dead letters), so that nothing but the role check stands between a run and the state store.

The last test (``slow``) replays the finding as reported, over the REST API of a running
``airflow standalone``: its scheduler runs the tasks under the Task SDK (no metadata DB access),
an Airflow ``user`` is refused, and an operator's decision is recorded under their own name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from d365sync.engine.state import StateStore
from d365sync.ui import queries
from tests.dags.conftest import DAG_TEST_USER, AirflowEnv, RunResult, assert_success, triggered_as
from tests.dags.sync_env import sqlite_sync_env
from tests.ui.conftest import seed

FORGED = "alice (forged)"
CONF = {
    "entity": "customers",
    "review_ids": [1, 2, 3],
    "decision": "erp",
    "decided_by": FORGED,
    "keys": [],
    "entities": ["customers"],
}


def as_user(role: str | None) -> dict[str, str]:
    """``dag_test`` with ``role``; ``alice`` (the name a forged conf uses) is an operator."""
    return triggered_as(role, "alice:op")


@pytest.fixture(scope="module")
def ops(
    airflow_env: AirflowEnv, dataverse_sandbox_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AirflowEnv, StateStore]]:
    """The sync environment's Airflow env, and its state store seeded and open for checks."""
    with (
        sqlite_sync_env(
            airflow_env, dataverse_sandbox_factory, tmp_path_factory, "ops-access", rows=20, seed=3
        ) as sync,
        sync.store() as store,
    ):
        seed(store)
        yield sync.airflow, store


def _snapshot(store: StateStore) -> dict[str, Any]:
    return {
        "open": sorted(r.id for r in store.reviews()),
        "decided": store.reviews(status="decided"),
        "pending": sorted(d.id for d in store.dead_letters()),
        "replay": store.dead_letters(status="replay"),
    }


def _refused(run: RunResult, message: str) -> None:
    assert run.state == "failed", run
    assert set(run.tasks.values()) == {"failed"}, run.tasks
    assert message in run.log, run.log[-4000:]


def test_a_user_role_can_neither_decide_nor_replay_nor_reconcile(ops: tuple[AirflowEnv, StateStore]) -> None:
    env, store = ops
    staging = Path(env.env["D365SYNC_STAGING_ROOT"].removeprefix("file://"))
    before = _snapshot(store)
    decide, replay, reconcile = env.run(
        "apply_review_decisions", "replay_dead_letters", "reconcile", conf=CONF, env=as_user("user")
    )
    needs = "needs the role op or admin (the same roles as the d365sync operations UI). Nothing was changed."
    _refused(decide, f"refused: user 'dag_test' has the role 'user'; apply_review_decisions {needs}")
    _refused(replay, f"refused: user 'dag_test' has the role 'user'; replay_dead_letters {needs}")
    _refused(reconcile, f"refused: user 'dag_test' has the role 'user'; reconcile {needs}")
    assert _snapshot(store) == before
    assert before["decided"] == [] and before["replay"] == [] and before["open"] and before["pending"]
    assert not list(staging.rglob("*.json")), "reconcile wrote no drift report"


@pytest.mark.parametrize(("role", "shown"), [("viewer", "viewer"), (None, "none")])
def test_a_viewer_or_an_unknown_user_cannot_replay(
    ops: tuple[AirflowEnv, StateStore], role: str | None, shown: str
) -> None:
    env, store = ops
    before = _snapshot(store)
    (replay,) = env.run("replay_dead_letters", conf=CONF, env=as_user(role))
    _refused(
        replay, f"refused: user 'dag_test' has the role '{shown}'; replay_dead_letters needs the role op"
    )
    assert _snapshot(store) == before


def test_an_operator_decides_and_replays_as_themself_whatever_the_conf_says(  # after the refusals
    ops: tuple[AirflowEnv, StateStore],
) -> None:
    env, store = ops
    runs = env.run("apply_review_decisions", "replay_dead_letters", conf=CONF, env=as_user("op"))
    assert_success(runs)
    decided = store.reviews("customers", status="decided")
    assert sorted(r.id for r in decided) == [1, 2, 3]
    assert {r.decided_by for r in decided} == {DAG_TEST_USER}, "decided_by is the triggering user"
    assert f"decided_by='{FORGED}' in the run's conf is ignored" in runs[0].log
    replayed = store.dead_letters("customers", status="replay")
    assert sorted(d.record_key for d in replayed) == ["C010", "C011"]
    extra = queries.dead_letter_extra(store.engine, [d.id for d in replayed])
    assert {e["handled_by"] for e in extra.values()} == {DAG_TEST_USER}


# --- the finding as reported: over the REST API of a running Airflow ------------------------

REST_USERS = {"alice": "op", "victor": "viewer", "ursula": "user"}
FINISHED = {"success", "failed"}


def _rest(server: Any, user: str, method: str, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {server.token(user)}", "Accept": "application/json"}
    response = httpx.request(method, f"{server.url}/api/v2/{path}", headers=headers, timeout=30, **kwargs)
    assert response.status_code in (200, 201), f"{method} {path} as {user}: {response.text}"
    return response.json()


def _trigger_and_wait(server: Any, user: str, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """A manual run triggered over the REST API as ``user``, once finished (the scheduler runs it)."""
    body = {"logical_date": None, "conf": conf}
    run = _rest(server, user, "POST", f"dags/{dag_id}/dagRuns", json=body)
    assert run["triggering_user_name"] == user
    deadline = time.monotonic() + 600
    while run["state"] not in FINISHED:
        assert time.monotonic() < deadline, f"{dag_id} {run['dag_run_id']} still {run['state']}"
        time.sleep(2)  # polling a run's state, not synchronising
        run = _rest(server, "alice", "GET", f"dags/{dag_id}/dagRuns/{run['dag_run_id']}")
    return dict(run)


def _task_log(server: Any, dag_id: str, run_id: str) -> str:
    path = f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{dag_id}/logs/1"
    return json.dumps(_rest(server, "alice", "GET", path))  # {"content": [log events]}


@pytest.mark.slow
def test_over_the_rest_api_a_user_is_refused_and_an_operator_decides_as_themself(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from tests.browser.conftest import standalone

    home = tmp_path_factory.mktemp("ops-rest")
    state_url = f"sqlite:///{home / 'state.db'}"
    store = StateStore.open(state_url)
    seed(store)
    state_conn = json.dumps({"conn_type": "sqlite", "host": str(home / "state.db")})
    extra = {"AIRFLOW_CONN_SYNC_STATE_DEFAULT": state_conn, "D365SYNC_TASK_RETRIES": "0"}
    try:
        with standalone(home, (store, state_url), home, extra, "-ops-rest", REST_USERS) as server:
            for dag_id in ("apply_review_decisions", "replay_dead_letters"):
                _rest(server, "alice", "PATCH", f"dags/{dag_id}", json={"is_paused": False})
            before = _snapshot(store)
            viewer = httpx.post(  # a viewer: Airflow itself refuses the trigger
                f"{server.url}/api/v2/dags/apply_review_decisions/dagRuns",
                headers={"Authorization": f"Bearer {server.token('victor')}"},
                json={"logical_date": None, "conf": CONF},
                timeout=30,
            )
            assert viewer.status_code == 403, viewer.text
            for dag_id in ("apply_review_decisions", "replay_dead_letters"):  # a user: Airflow lets it
                run = _trigger_and_wait(server, "ursula", dag_id, CONF)
                assert run["state"] == "failed", (run, server.log_tail())
                log = _task_log(server, dag_id, run["dag_run_id"])
                assert f"refused: user 'ursula' has the role 'user'; {dag_id} needs the role op" in log, log
            assert _snapshot(store) == before

            run = _trigger_and_wait(server, "alice", "apply_review_decisions", CONF)
            assert run["state"] == "success", (run, server.log_tail())
            decided = store.reviews("customers", status="decided")
            assert sorted(r.id for r in decided) == [1, 2, 3]
            assert {r.decided_by for r in decided} == {"alice"}, "not 'alice (forged)' from the conf"
    finally:
        store.close()
