"""Issue 10 end to end: one unconvertible legacy value quarantines its row, not the whole run.

``d365sync sync --all`` against the real Dataverse sandbox and the SQLite ERP (through the
SQLite3 ODBC driver), with an invoice dated ``'20231399'`` (CHAR(8) ``INV_DATE``) and customers
whose DECIMAL ``CREDIT_LIMIT`` holds ``'N/A'``, ``''`` and ``'abc'`` (SQLite stores text there).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from d365sync.cli import main
from d365sync.engine.reconcile import reconcile
from d365sync.engine.stages import RunContext
from d365sync.engine.state import DeadLetter, StateStore
from d365sync.erp import ErpClient
from d365sync.spec import load_entities
from tests.integration.pipeline_env import ENTITIES, Env, sync_cli_connections
from tests.sandbox_fixtures import SandboxFactory

pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)
BAD_LIMITS = ("N/A", "", "abc")


def _erp(folder: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """The ERP as another user sees it (its triggers re-stamp LAST_UPD on every update)."""
    with sqlite3.connect(folder / "erp.db") as conn:
        return conn.execute(sql, params).fetchall()


def _letters(folder: Path, entity: str) -> dict[str, DeadLetter]:
    with StateStore.open(f"sqlite:///{folder / 'state.db'}") as store:
        return {d.record_key: d for d in store.dead_letters(entity)}


def _audited(folder: Path, entity: str, keys: list[str]) -> list[dict[str, Any]]:
    with StateStore.open(f"sqlite:///{folder / 'state.db'}") as store:
        return [row for key in keys for row in store.audit_log(entity, record_key=key)]


def test_unreadable_values_become_dead_letters_the_rest_syncs_and_a_fix_at_the_source_goes_through(
    dataverse_sandbox_factory: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    sandbox = dataverse_sandbox_factory(seed=10)
    Env.create(sandbox, tmp_path, rows=200).close()  # 200 customers, ~70 invoices, all valid
    # the ERP's own active customers (inactive ones are not created in Dynamics)
    active = "SELECT CUST_NO FROM CUST_MASTER WHERE CUST_NO LIKE 'C%' AND STATUS = 'A'"
    unused = "NOT EXISTS (SELECT 1 FROM SO_HEADER s WHERE s.CUST_NO = c.CUST_NO)"
    bad = f"SELECT CUST_NO FROM CUST_MASTER c WHERE CUST_NO IN ({active}) AND {unused} LIMIT 3"
    customers = [key for (key,) in _erp(tmp_path, bad)]  # no order or invoice depends on them
    invoiced = f"SELECT INV_NO FROM INV_HEADER WHERE CUST_NO IN ({active}) ORDER BY INV_NO"
    invoice = _erp(tmp_path, invoiced)[5][0]
    for key, text in zip(customers, BAD_LIMITS, strict=True):
        _erp(tmp_path, "UPDATE CUST_MASTER SET CREDIT_LIMIT = ? WHERE CUST_NO = ?", text, key)
    _erp(tmp_path, "UPDATE INV_HEADER SET INV_DATE = '20231399' WHERE INV_NO = ?", invoice)
    assert _erp(tmp_path, "SELECT typeof(CREDIT_LIMIT) FROM CUST_MASTER WHERE CUST_NO = ?", customers[0]) == [
        ("text",)
    ]

    sync = ["sync", "--all", *sync_cli_connections(sandbox, tmp_path, monkeypatch)]
    dynamics = sandbox.client()
    request.addfinalizer(dynamics.close)

    def accounts() -> dict[str, Any]:
        return {
            r["accountnumber"]: r for r in dynamics.iter_rows("accounts", ["accountnumber", "creditlimit"])
        }

    def invoices() -> dict[str, Any]:
        return {r["invoicenumber"]: r for r in dynamics.iter_rows("invoices", ["invoicenumber", "duedate"])}

    # run 1: every entity goes through; the four bad rows are dead letters, nothing else is
    assert main(sync) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert (
        f"INV_HEADER key={invoice} column INV_DATE: unreadable CHAR(8) date YYYYMMDD: "
        "month must be in 1..12 (value '20231399')"
    ) in out
    erp_customers = {key for (key,) in _erp(tmp_path, active)}
    synced = accounts()
    assert len(erp_customers) > 150 and erp_customers - set(customers) <= set(synced)
    assert not set(customers) & set(synced)  # nothing about them was written to Dynamics
    erp_invoices = {key for (key,) in _erp(tmp_path, invoiced)}
    assert len(erp_invoices) > 50 and invoice not in invoices()
    assert erp_invoices - {invoice} <= set(invoices())
    assert (
        _audited(tmp_path, "customers", customers) == [] and _audited(tmp_path, "invoices", [invoice]) == []
    )

    letters = _letters(tmp_path, "customers")
    for key, text in zip(customers, BAD_LIMITS, strict=True):
        assert (letters[key].stage, letters[key].error) == (
            "validate",
            f"validation: CUST_MASTER key={key} column CREDIT_LIMIT: unreadable DECIMAL(15,2): "
            f"not a number (value {text!r})",
        )
    assert set(letters) == set(customers)
    [(key, letter)] = _letters(tmp_path, "invoices").items()
    assert (key, letter.stage, letter.attempts) == (invoice, "validate", 1)
    assert letter.payload["rows"][0]["row"]["INV_DATE"] == "20231399"  # the row, kept for the operator

    # run 2: the cursor moved past the bad rows; they are not read (nor dead-lettered) again
    assert main(sync) == 0
    capsys.readouterr()
    assert _letters(tmp_path, "invoices")[invoice].attempts == 1
    assert all(d.attempts == 1 for d in _letters(tmp_path, "customers").values())

    # fixed at the source (the ERP re-stamps LAST_UPD): the records reach Dynamics
    for key in customers:
        _erp(tmp_path, "UPDATE CUST_MASTER SET CREDIT_LIMIT = '2500.00' WHERE CUST_NO = ?", key)
    _erp(tmp_path, "UPDATE INV_HEADER SET INV_DATE = '20231231' WHERE INV_NO = ?", invoice)
    assert main(sync) == 0, capsys.readouterr().err
    capsys.readouterr()
    synced = accounts()
    assert [synced[key]["creditlimit"] for key in customers] == [2500, 2500, 2500]
    assert str(invoices()[invoice]["duedate"]).startswith("2023-12-31")

    # broken again after it synced: reconcile cannot compare it, and calls it no drift either
    _erp(tmp_path, "UPDATE INV_HEADER SET INV_DATE = '20230229' WHERE INV_NO = ?", invoice)
    drift = _reconcile_invoices(tmp_path, dynamics)
    assert invoice not in {d["key"] for d in drift}

    pending = set(_letters(tmp_path, "customers")) | set(_letters(tmp_path, "invoices"))
    assert pending == set()


def _reconcile_invoices(folder: Path, dynamics: Any) -> list[dict[str, Any]]:
    spec = load_entities(ENTITIES)["invoices"]
    erp = ErpClient(f"DRIVER={{SQLite3}};Database={folder / 'erp.db'};")
    with erp, StateStore.open(f"sqlite:///{folder / 'state.db'}") as store:
        ctx = RunContext(spec, dynamics, erp, store, folder / "staging")
        summary = reconcile(ctx, folder / "reports", queue_repairs=False)
    return list(json.loads(Path(summary["report"]).read_text())["drift"])
