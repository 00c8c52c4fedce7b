"""New Dynamics records: GUIDs from the ``CreateMultiple`` answer, and the delta token moved past
the run's own creates (issue 14).

Real sandbox over HTTP, real SQLite ODBC ERP, the real pipeline. The sandbox starts empty, so
the first sync creates every valid ERP customer in Dataverse; ``ADVANCE_AFTER_CREATES`` is
lowered so the small tables here take the path a large initial load takes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from d365sync.engine.stages import freshness
from tests.integration.pipeline_env import Env, before_first_write, env_with_person
from tests.sandbox_fixtures import SandboxFactory

pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)

load = importlib.import_module("d365sync.engine.stages.load")  # the package exports the function


@pytest.fixture
def env(
    dataverse_sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    monkeypatch.setattr(load, "ADVANCE_AFTER_CREATES", 1)
    with env_with_person(dataverse_sandbox_factory, tmp_path, seed=0, rows=30) as environment:
        yield environment


def _accounts(env: Env) -> dict[str, dict[str, Any]]:
    rows = env.dynamics_rows("accounts", ["accountid", "accountnumber", "name", "address1_city"])
    return {row["accountnumber"]: row for row in rows}


def _key(env: Env) -> str:
    """An ERP customer the first sync creates in Dynamics."""
    return str(env.erp_rows("SELECT MIN(CUST_NO) FROM CUST_MASTER")[0][0]).strip()


def _routes(env: Env) -> dict[str, int]:
    return {route: n for route, n in env.sandbox.counters().get("routes", {}).items() if "token" not in route}


def test_initial_sync_reads_nothing_back_and_the_next_run_starts_after_its_own_creates(env: Env) -> None:
    env.sandbox.reset_counters()
    first = env.run("customers")
    routes = _routes(env)

    accounts = _accounts(env)
    created = first.plan.writes["dynamics"]["create"]
    assert created == len(accounts) > 20
    # the key map holds the GUIDs Dataverse gave the records: from the create answer
    stored = env.store.load_base("customers", "erp", list(accounts))
    assert {key: s.dynamics_id for key, s in stored.items()} == {
        key: row["accountid"].lower() for key, row in accounts.items()
    }
    done = first.manifests["load"]["dynamics"]
    assert (first.manifests["commit"]["token_advanced"], done["failed"], done["deferred"]) == (True, 0, 0)
    creates = sum(n for route, n in routes.items() if "CreateMultiple" in route)
    reads = {r: n for r, n in routes.items() if r.upper().startswith("GET") and "accounts" in r}
    assert creates == 1, routes  # 30 rows: one CreateMultiple, no UpsertMultiple, no $batch
    assert not any("UpsertMultiple" in route or "$batch" in route for route in routes), routes
    # the extract's initial read and the one feed read that moved the token: no GUID read-back
    assert sum(reads.values()) == 2, reads

    second = env.run("customers")

    assert second.plan.extracted["dynamics"] == 0  # no echoes of the initial creates
    assert second.plan.writes == {"dynamics": {}, "erp": {}}


def test_a_person_editing_during_the_load_keeps_the_token_so_the_edit_is_synced(
    env: Env, person: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, key = freshness.Freshness.advance_past, _key(env)

    def edit_then_advance(self: freshness.Freshness, created: set[str]) -> bool:
        person.update("accounts", {"accountnumber": key}, {"address1_city": "Edited Mid-Load"})
        return real(self, created)

    monkeypatch.setattr(freshness.Freshness, "advance_past", edit_then_advance)
    first = env.run("customers")
    monkeypatch.undo()

    assert first.manifests["commit"]["token_advanced"] is False
    second = env.run("customers")

    assert second.plan.extracted["dynamics"] >= first.plan.writes["dynamics"]["create"]  # read again
    city = env.erp_rows("SELECT RTRIM(CITY) FROM CUST_MASTER WHERE CUST_NO = ?", key)
    assert city == [("Edited Mid-Load",)]  # the person's edit reached the ERP
    third = env.run("customers")
    assert third.plan.extracted["dynamics"] == 0  # that run's writes were updates, read once


def test_a_key_created_in_dynamics_after_the_extract_is_deferred_not_overwritten(
    env: Env, person: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key(env)
    done = before_first_write(
        monkeypatch, lambda: person.create("accounts", {"accountnumber": key, "name": "Made by a person"})
    )
    first = env.run("customers")
    monkeypatch.undo()

    accounts = _accounts(env)
    assert accounts[key]["name"] == "Made by a person"  # not overwritten by our create
    assert accounts[key]["accountid"].lower() == done[0].lower()
    manifest = first.manifests["load"]["dynamics"]
    assert (manifest["deferred"], manifest["failed"]) == (1, 0)
    assert manifest["counts"]["create"] == len(accounts) - 1  # everyone else went through
    (letter,) = env.store.dead_letters("customers")
    assert letter.record_key == key and letter.stage == "load"
    assert "already exists" in letter.error

    env.run("customers")  # the retry merges both records as one

    same_key = env.dynamics_rows("accounts", ["accountid"], f"accountnumber eq '{key}'")
    assert [row["accountid"] for row in same_key] == [accounts[key]["accountid"]]
    assert env.store.load_base("customers", "erp", [key])[key].dynamics_id == done[0].lower()
    assert env.store.dead_letters("customers") == []


def test_a_rerun_after_a_crash_mid_load_upserts_its_reserved_keys_and_learns_their_guids(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = load._after_chunk

    def crash(*args: Any) -> None:
        raise RuntimeError("worker lost after the write, before the base was saved")

    monkeypatch.setattr(load, "_after_chunk", crash)
    with pytest.raises(RuntimeError, match="worker lost"):
        env.run("customers")
    monkeypatch.setattr(load, "_after_chunk", real)
    created = _accounts(env)
    assert created  # the crashed attempt did create them

    env.sandbox.reset_counters()
    rerun = env.run("customers")

    accounts = _accounts(env)
    assert set(accounts) == set(created)  # no duplicates: the same records
    stored = env.store.load_base("customers", "erp", list(accounts))
    assert {key: s.dynamics_id for key, s in stored.items()} == {
        key: row["accountid"].lower() for key, row in accounts.items()
    }
    assert rerun.manifests["load"]["dynamics"]["failed"] == 0
    assert env.store.dead_letters("customers") == []
