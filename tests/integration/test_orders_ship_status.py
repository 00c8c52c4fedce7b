"""Issue 10: the ERP's ship status must not move the Dynamics-owned order state.

End to end through ``d365sync sync`` (AIRFLOW_CONN_* as in test_pipeline_cli.py) against the
Dataverse sandbox over HTTP and the SQLite ERP through the SQLite3 ODBC driver. The sandbox seeds
two Dynamics orders, ORD-000000 and ORD-000001; the first sync creates them in SO_HEADER.

Before the fix SHIP_STATUS 'P'/'S' was written as statuscode 100002/100001, status reasons of the
Fulfilled state, so Dataverse fulfilled the order (statecode 3) and the next run wrote that
Dynamics-owned state back as STATUS 'C': a partial shipment closed the open ERP order.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from d365sync.cli import main
from d365sync.sandbox.dataverse.metadata import attribute_definition
from d365sync.sandbox.dataverse.schema import TABLES, ddl
from d365sync.sandbox.dataverse.store import DB_FILE, Store
from tests.integration.pipeline_env import Env, sync_cli_connections
from tests.sandbox_fixtures import SandboxFactory

pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)

ORDERS = ("ORD-000000", "ORD-000001")
NOT_SHIPPED, PARTIALLY_SHIPPED, SHIPPED = 100000000, 100000001, 100000002
SHIP_CHOICE = {"P": PARTIALLY_SHIPPED, "S": SHIPPED}


class Cli:
    """``d365sync sync`` with the connections in the environment, plus both systems to look at."""

    def __init__(self, env: Env, staging: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.env, self.staging, self.capsys = env, staging, capsys

    def sync(self, entity: str) -> str:
        self.capsys.readouterr()
        assert main(["sync", entity, "--staging", str(self.staging)]) == 0
        return self.capsys.readouterr().out

    def erp_orders(self) -> dict[str, tuple[Any, ...]]:
        """SO_NO → (STATUS, SHIP_STATUS, ROW_VER) of every order the sync created."""
        rows = self.env.erp_rows(
            "SELECT SO_NO, STATUS, SHIP_STATUS, ROW_VER FROM SO_HEADER WHERE SO_NO LIKE 'ORD-%'"
        )
        return {
            str(r[0]).strip(): tuple(str(v).strip() if isinstance(v, str) else v for v in r[1:]) for r in rows
        }

    def dynamics_states(self) -> dict[str, tuple[int, int]]:
        """ordernumber → (statecode, statuscode)."""
        rows = self.env.dynamics_rows("salesorders", ["ordernumber", "statecode", "statuscode"])
        return {r["ordernumber"]: (r["statecode"], r["statuscode"]) for r in rows}

    def dynamics_ship_status(self) -> dict[str, int | None]:
        """ordernumber → new_shipstatus."""
        rows = self.env.dynamics_rows("salesorders", ["ordernumber", "new_shipstatus"])
        return {r["ordernumber"]: r["new_shipstatus"] for r in rows}

    def dynamics_versions(self) -> dict[str, int]:
        rows = self.env.dynamics_rows("salesorders", ["ordernumber", "versionnumber"])
        return {r["ordernumber"]: r["versionnumber"] for r in rows}

    def ship_in_erp(self, order: str, ship_status: str) -> None:
        """What the ERP's shipping does: SHIP_STATUS and the cursor column LAST_UPD (UTC, seconds)."""
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
        self.env.erp.execute(
            ["UPDATE SO_HEADER SET SHIP_STATUS = ?, LAST_UPD = ? WHERE SO_NO = ?"], (ship_status, now, order)
        )

    def set_state_in_dynamics(self, order: str, statecode: int, statuscode: int) -> None:
        record = {"ordernumber": order, "statecode": statecode, "statuscode": statuscode}
        outcome = self.env.dynamics.upsert_many(
            "salesorders", "ordernumber", [record], logical_name="salesorder"
        )
        assert outcome[0].ok, outcome

    def assert_a_run_writes_nothing(self) -> None:
        """The loop guard: a further run writes to neither system."""
        erp, versions = self.erp_orders(), self.dynamics_versions()
        self.env.sandbox.reset_counters()
        out = self.sync("orders")
        assert "dynamics: nothing" in out and "erp: nothing" in out, out
        assert self.env.write_requests() == 0
        assert self.erp_orders() == erp  # ROW_VER included: no row touched
        assert self.dynamics_versions() == versions


@pytest.fixture
def cli(
    dataverse_sandbox_factory: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Cli]:
    sandbox = dataverse_sandbox_factory(seed=10)
    env = Env.create(sandbox, tmp_path, rows=20)
    sync_cli_connections(sandbox, tmp_path, monkeypatch)
    cli = Cli(env, tmp_path / "staging", capsys)
    cli.sync("customers")
    cli.sync("orders")
    # the orders Dynamics created are open in both systems and not shipped yet
    assert cli.erp_orders() == {o: ("O", "N", 1) for o in ORDERS}
    assert cli.dynamics_states() == {o: (0, 1) for o in ORDERS}
    yield cli
    env.close()
    sandbox.stop()


@pytest.mark.parametrize("ship_status", ["P", "S"])
def test_a_shipment_in_the_erp_shows_in_dynamics_and_leaves_the_order_open(
    cli: Cli, ship_status: str
) -> None:
    cli.ship_in_erp("ORD-000000", ship_status)

    out = cli.sync("orders")
    assert "update     ORD-000000  fulfilment" in out and "erp: nothing" in out, out
    # Dynamics: the order is still active with its status reason, and shows the ship status
    assert cli.dynamics_states() == {"ORD-000000": (0, 1), "ORD-000001": (0, 1)}
    assert cli.dynamics_ship_status() == {"ORD-000000": SHIP_CHOICE[ship_status], "ORD-000001": None}
    # ERP: the order is still open; only the ERP's own edit moved its row
    assert cli.erp_orders() == {"ORD-000000": ("O", ship_status, 2), "ORD-000001": ("O", "N", 1)}

    # the Dynamics write comes back in the next delta as an echo: nothing is written, no loop
    cli.assert_a_run_writes_nothing()
    assert cli.erp_orders() == {"ORD-000000": ("O", ship_status, 2), "ORD-000001": ("O", "N", 1)}
    assert cli.dynamics_states() == {"ORD-000000": (0, 1), "ORD-000001": (0, 1)}


def test_orders_fulfilled_or_cancelled_in_dynamics_close_the_erp_order_and_keep_the_ship_status(
    cli: Cli,
) -> None:
    cli.ship_in_erp("ORD-000001", "P")
    cli.sync("orders")
    assert cli.dynamics_ship_status() == {"ORD-000000": None, "ORD-000001": PARTIALLY_SHIPPED}

    # Dynamics owns the order state: ORD-000001 is fulfilled there, ORD-000000 cancelled
    cli.set_state_in_dynamics("ORD-000001", 3, 100001)
    cli.set_state_in_dynamics("ORD-000000", 2, 4)
    out = cli.sync("orders")
    assert "dynamics: nothing" in out, out
    assert cli.erp_orders() == {"ORD-000000": ("X", "N", 2), "ORD-000001": ("C", "P", 3)}
    assert cli.dynamics_states() == {"ORD-000000": (2, 4), "ORD-000001": (3, 100001)}
    assert cli.dynamics_ship_status() == {"ORD-000000": None, "ORD-000001": PARTIALLY_SHIPPED}

    cli.assert_a_run_writes_nothing()
    assert cli.erp_orders() == {"ORD-000000": ("X", "N", 2), "ORD-000001": ("C", "P", 3)}


def test_a_ship_status_edited_in_dynamics_is_reverted_to_the_erps(cli: Cli) -> None:
    """The ERP owns the ship status; a Dynamics edit of the column neither reaches the ERP nor sticks."""
    record = {"ordernumber": "ORD-000001", "new_shipstatus": SHIPPED}
    assert cli.env.dynamics.upsert_many("salesorders", "ordernumber", [record], logical_name="salesorder")[
        0
    ].ok

    out = cli.sync("orders")
    assert "update     ORD-000001  fulfilment" in out and "erp: nothing" in out, out
    assert cli.dynamics_ship_status() == {"ORD-000000": None, "ORD-000001": NOT_SHIPPED}
    assert cli.dynamics_states() == {o: (0, 1) for o in ORDERS}
    assert cli.erp_orders() == {o: ("O", "N", 1) for o in ORDERS}
    cli.assert_a_run_writes_nothing()


def test_a_sandbox_data_dir_from_before_the_column_gains_it(tmp_path: Path) -> None:
    """Like a column added to a live environment: existing orders keep their data and read null."""
    table = TABLES["salesorder"]
    older = dataclasses.replace(table, columns=tuple(c for c in table.columns if c.name != "new_shipstatus"))
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        for statement in ddl(older):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO salesorder (salesorderid, name, versionnumber) VALUES (?, ?, ?)", ("a", "Old", 1)
        )
    conn.close()

    store = Store(tmp_path)
    try:
        assert [(r["name"], r["new_shipstatus"]) for r in store.fetch("SELECT * FROM salesorder")] == [
            ("Old", None)
        ]
        metadata = attribute_definition(table, table.column("new_shipstatus"))  # type: ignore[arg-type]
        assert (metadata["SchemaName"], metadata["AttributeType"], metadata["IsCustomAttribute"]) == (
            "new_ShipStatus",
            "Picklist",
            True,
        )
    finally:
        store.close()
