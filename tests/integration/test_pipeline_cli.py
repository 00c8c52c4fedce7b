"""``d365sync sync`` against the real sandbox and SQLite ERP, configured through AIRFLOW_CONN_*."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from d365sync.cli import main
from d365sync.engine.stages.context import Window
from tests.integration.pipeline_env import Env, sync_cli_connections
from tests.sandbox_fixtures import SandboxFactory

pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)


def test_sync_cli_reads_airflow_connections_dry_runs_then_syncs(
    dataverse_sandbox_factory: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sandbox = dataverse_sandbox_factory(seed=10)
    Env.create(sandbox, tmp_path, rows=20).close()
    staging = sync_cli_connections(sandbox, tmp_path, monkeypatch)

    assert main(["sync", "customers", "--dry-run", *staging]) == 0
    out = capsys.readouterr().out
    assert "customers: DRY RUN" in out and "erp: create 10" in out and sandbox.client_secret not in out

    assert main(["sync", "--all", *staging]) == 0
    out = capsys.readouterr().out
    assert out.index("== customers") < out.index("== orders") < out.index("== invoices")

    assert main(["sync", "customers", *staging]) == 0
    out = capsys.readouterr().out
    assert "dynamics: nothing" in out and "erp: nothing" in out


def test_sync_cli_names_an_unreachable_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = "dynamics://app:s3cret@127.0.0.1:9/http?tenant_id=t&authority_host=http%3A%2F%2F127.0.0.1%3A9"
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", uri)
    assert main(["sync", "customers"]) == 2
    err = capsys.readouterr().err
    assert "Dynamics 365 is unreachable" in err and "127.0.0.1" in err and "s3cret" not in err


@pytest.fixture
def cli_env(
    dataverse_sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Env, list[str]]]:
    """The seed-5 sandbox and a 10-row ERP, ``d365sync sync`` pointed at both: the env and the
    ``--staging`` arguments."""
    sandbox = dataverse_sandbox_factory(seed=5)
    env = Env.create(sandbox, tmp_path, rows=10)
    try:
        yield env, sync_cli_connections(sandbox, tmp_path, monkeypatch)
    finally:
        env.close()


def test_sync_all_runs_products_before_inventory_so_a_new_item_arrives_with_its_stock(
    cli_env: tuple[Env, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    env, staging = cli_env
    assert main(["sync", "--all", *staging]) == 0
    out = capsys.readouterr().out
    assert out.index("== products") < out.index("== inventory")

    item = "ITMNEW000001"
    env.erp.execute(
        [
            "INSERT INTO ITEM_MASTER (ITEM_NO, DESCR, UNIT_PRICE, CURR_CODE, LAST_UPD) VALUES "
            f"('{item}', 'New valve', 12.5, 'EURO', strftime('%Y-%m-%d %H:%M:%S','now') || '.000')",
            f"INSERT INTO ITEM_STOCK (ITEM_NO, WHSE, QTY_ON_HAND) VALUES ('{item}', 'W01', 10.5)",
            f"INSERT INTO ITEM_STOCK (ITEM_NO, WHSE, QTY_ON_HAND) VALUES ('{item}', 'W02', 2.25)",
        ]
    )
    assert main(["sync", "--all", *staging]) == 0  # one run: the product is created with its stock

    products = env.dynamics_rows(
        "products", ["productnumber", "name", "quantityonhand"], f"productnumber eq '{item}'"
    )
    assert [(p["name"], p["quantityonhand"]) for p in products] == [("New valve", 12.75)]


def test_a_hard_delete_during_an_expired_token_is_found_by_the_full_resync(
    cli_env: tuple[Env, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    env, staging = cli_env

    def inactive() -> set[str]:
        return {r[0].strip() for r in env.erp_rows("SELECT CUST_NO FROM CUST_MASTER WHERE STATUS <> 'A'")}

    assert main(["sync", "customers", *staging]) == 0
    capsys.readouterr()
    number = "C000000002"
    (account,) = env.dynamics_rows("accounts", ["accountid"], f"accountnumber eq '{number}'")
    assert env.erp_rows("SELECT STATUS FROM CUST_MASTER WHERE CUST_NO = ?", number) == [("A",)]
    before = inactive()

    # hard-deleted in Dataverse while the change-tracking token ages past its retention
    env.dynamics.delete("accounts", account["accountid"])
    env.sandbox.set_knobs(retention_seconds=0)
    # a backfill window is no full read: what it does not list is merely unchanged there
    window = Window(datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(hours=1))
    env.run("customers", window=window)
    assert inactive() == before

    assert main(["sync", "customers", *staging]) == 0  # the token expired: a full resync
    assert capsys.readouterr().out.count("erp: deactivate 1") == 1
    # customers.yaml: deletes.to_erp = deactivate → CUST_MASTER.STATUS = 'I'
    assert env.erp_rows("SELECT STATUS FROM CUST_MASTER WHERE CUST_NO = ?", number) == [("I",)]
    assert inactive() == before | {number}
    stored = env.store.load_base("customers", "erp", [number])[number]
    assert stored.base is not None and stored.base.deleted_on is not None  # no second delete

    env.sandbox.set_knobs(retention_seconds=7 * 24 * 3600)
    env.sandbox.reset_counters()
    fingerprint = env.erp_fingerprint()
    assert main(["sync", "customers", *staging]) == 0
    out = capsys.readouterr().out
    assert "dynamics: nothing" in out and "erp: nothing" in out
    assert env.write_requests() == 0 and env.erp_fingerprint() == fingerprint
