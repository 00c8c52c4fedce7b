"""A Dynamics edit landing between our extract and our load is never overwritten (issue 12).

The ERP side has ``ROW_VER``; Dataverse's ``UpsertMultiple`` takes no ``If-Match``. The load's
freshness check (``engine/stages/freshness.py``) reads what changed in Dataverse since the
extract and defers those records to the next run, which merges both edits by the entity's
rules. Real sandbox over HTTP, real SQLite ODBC ERP, the real pipeline: only the moment of the
user's edit is arranged, by running it just before the load stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from d365sync.engine.stages import Window
from tests.integration.pipeline_env import Env, before_first_write, env_with_person
from tests.sandbox_fixtures import SandboxFactory

# GX 1.24.1 imports the deprecated sre_constants/sre_parse modules on Python 3.11 (as in
# tests/unit/test_validation.py): only those two import-time messages are ignored.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)

KEY = "ACC-000003"
SELECT = ["accountnumber", "address1_city", "telephone1", "creditlimit", "versionnumber"]


@pytest.fixture
def env(dataverse_sandbox_factory: SandboxFactory, tmp_path: Path) -> Iterator[Env]:
    with env_with_person(dataverse_sandbox_factory, tmp_path, seed=10, rows=10) as environment:
        yield environment


def _account(env: Env) -> dict[str, Any]:
    rows = env.dynamics_rows("accounts", SELECT, f"accountnumber eq '{KEY}'")
    assert len(rows) == 1
    return rows[0]


def _erp(env: Env) -> tuple[Any, ...]:
    rows = env.erp_rows("SELECT RTRIM(CITY), PHONE, CREDIT_LIMIT FROM CUST_MASTER WHERE CUST_NO = ?", KEY)
    assert len(rows) == 1
    return rows[0]


def _user_edit(person: Any, **changes: Any) -> None:
    outcome = person.upsert_many(
        "accounts", "accountnumber", [{"accountnumber": KEY, **changes}], logical_name="account"
    )
    assert outcome[0].ok, outcome


def _edit_erp(env: Env) -> None:
    env.erp.execute(
        [f"UPDATE CUST_MASTER SET CITY = 'ERP City', CREDIT_LIMIT = 4321.00 WHERE CUST_NO = '{KEY}'"]
    )


def test_edit_between_extract_and_load_is_deferred_then_merged_with_ours(
    env: Env, person: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.run("customers")
    _edit_erp(env)
    phone = "+44 20 7946 0123"
    before_first_write(monkeypatch, lambda: _user_edit(person, address1_city="User City", telephone1=phone))

    first = env.run("customers")

    account = _account(env)
    assert account["address1_city"] == "User City", "the user's edit was overwritten"
    load = first.manifests["load"]["dynamics"]
    assert (load["deferred"], load["failed"], load["freshness_checks"]) == (1, 0, 1)
    assert first.counts["dynamics_deferred"] == 1  # in the run report, apart from failures
    assert account["creditlimit"] != 4321  # our write of this record waits for the next run
    (letter,) = env.store.dead_letters("customers")
    assert letter.record_key == KEY and letter.stage == "load"
    assert "changed in Dynamics since extract (versionnumber" in letter.error
    assert letter.next_retry_at <= datetime.now(UTC)  # due at once, no backoff

    monkeypatch.undo()
    second = env.run("customers")

    assert second.manifests["load"]["dynamics"]["deferred"] == 0
    account = _account(env)
    # both edits survive in both systems: the user's (city: a later write on a both-owned
    # field; phone: Dynamics-owned) and the ERP's (credit limit: ERP-owned)
    assert (account["address1_city"], account["telephone1"], account["creditlimit"]) == (
        "User City",
        phone,
        4321,
    )
    city, erp_phone, credit = _erp(env)
    assert (city, erp_phone, float(credit)) == ("User City", phone, 4321.0)
    assert env.store.dead_letters("customers") == []


def test_unchanged_records_are_written_with_one_check_per_chunk(env: Env) -> None:
    env.run("customers")
    _edit_erp(env)
    env.sandbox.reset_counters()

    result = env.run("customers")

    load = result.manifests["load"]["dynamics"]
    assert (load["deferred"], load["failed"], load["freshness_checks"]) == (0, 0, 1)
    assert _account(env)["address1_city"] == "ERP City"
    assert env.store.dead_letters("customers") == []


def test_record_deleted_after_extract_is_not_recreated(
    env: Env, person: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.run("customers")
    _edit_erp(env)
    guid = env.dynamics_rows("accounts", ["accountid"], f"accountnumber eq '{KEY}'")[0]["accountid"]
    before_first_write(monkeypatch, lambda: person.delete("accounts", guid))

    result = env.run("customers")

    (letter,) = env.store.dead_letters("customers")
    assert "deleted in Dynamics since extract" in letter.error  # not re-created by the upsert
    assert env.dynamics_rows("accounts", ["accountid"], f"accountnumber eq '{KEY}'") == []
    assert result.manifests["load"]["dynamics"]["deferred"] == 1


def test_backfill_defers_what_a_person_changed_and_writes_over_the_syncs_own_writes(
    env: Env, person: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backfill did not read the Dynamics rows modified after its window; those the sync itself
    wrote last (its initial creates) are at their base and are written, a person's edit waits."""
    env.run("customers")  # creates the ERP's customers in Dynamics: modified by the sync itself
    other = "C000000002"
    env.erp.execute(
        [
            f"UPDATE CUST_MASTER SET CITY = 'ERP City', CREDIT_LIMIT = 4321.00 WHERE CUST_NO = '{KEY}'",
            f"UPDATE CUST_MASTER SET CREDIT_LIMIT = 1234.00 WHERE CUST_NO = '{other}'",
        ]
    )
    start = datetime.now(UTC) - timedelta(hours=1)
    before_first_write(monkeypatch, lambda: _user_edit(person, address1_city="User City"))

    result = env.run("customers", window=Window(start, datetime.now(UTC) + timedelta(minutes=1)))

    assert _account(env)["address1_city"] == "User City"
    rows = env.dynamics_rows("accounts", ["creditlimit"], f"accountnumber eq '{other}'")
    assert [r["creditlimit"] for r in rows] == [1234]
    assert result.manifests["load"]["dynamics"]["deferred"] == 1
