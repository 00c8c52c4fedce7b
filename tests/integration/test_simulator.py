"""The soak simulator against the Dataverse sandbox server and a SQLite ERP over ODBC, without a sync.

"Synced" records are made by hand (the same keys on both sides), so this checks the simulator
alone: every edit kind lands in its system as a user's edit would, every bad value sits at its
source and is recorded, ``fix()`` repairs each at the source, and a bad value in a row never
stops the simulator from editing other records.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from d365sync.dynamics import DynamicsClient
from d365sync.erp import ErpClient
from d365sync.sandbox.dataverse.process import DataverseSandbox
from d365sync.sandbox.erp import tables as t
from d365sync.sandbox.erp.seeder import init_sandbox, tidy
from d365sync.sandbox.simulator import BAD_KINDS, DYNAMICS_EDITS, ERP_EDITS, LONG_NAME, Simulator

PAIRED = 40


def _rows(erp: ErpClient, spec: Any, *columns: str) -> list[dict[str, Any]]:
    from d365sync.erp.spec import TableSpec

    wanted = {*spec.key, *columns}
    narrow = TableSpec(name=spec.name, columns=[c for c in spec.columns if c.name in wanted], key=spec.key)
    return [r for chunk in erp.iter_rows(narrow) for r in chunk]


@pytest.fixture
def systems(tmp_path: Path, dataverse_sandbox_factory: Any) -> Iterator[tuple[DynamicsClient, ErpClient]]:
    sandbox: DataverseSandbox = dataverse_sandbox_factory(seed=0)
    with (
        sandbox.client() as dynamics,
        ErpClient(f"DRIVER={{SQLite3}};Database={tmp_path / 'erp.db'};") as erp,
    ):
        init_sandbox(erp, rows=40, seed=3)
        tidy(erp)
        _pair(dynamics, erp)
        yield dynamics, erp
    sandbox.stop()


def _pair(dynamics: DynamicsClient, erp: ErpClient) -> None:
    """The first active ERP customers, their open orders and those orders' invoices, in Dynamics too."""
    customers = [r["CUST_NO"] for r in _rows(erp, t.CUST_MASTER, "STATUS") if r["STATUS"] == "A"][:PAIRED]
    accounts = [{"accountnumber": k, "name": f"Paired {k}"} for k in customers]
    assert all(o.ok for o in dynamics.upsert_many("accounts", "accountnumber", accounts))
    orders = [
        r
        for r in _rows(erp, t.SO_HEADER, "CUST_NO", "STATUS", "SHIP_STATUS")
        if r["CUST_NO"] in customers and r["STATUS"] == "O"
    ]
    assert orders, "the seed must give the paired customers open orders"
    bodies = [
        {
            "ordernumber": o["SO_NO"],
            "name": o["SO_NO"],
            "customerid_account@odata.bind": f"/accounts(accountnumber='{o['CUST_NO']}')",
        }
        for o in orders
    ]
    assert all(o.ok for o in dynamics.upsert_many("salesorders", "ordernumber", bodies))
    numbers = {o["SO_NO"] for o in orders}
    invoices = [r for r in _rows(erp, t.INV_HEADER, "SO_NO", "CUST_NO") if r["SO_NO"] in numbers]
    bodies = [
        {
            "invoicenumber": i["INV_NO"],
            "name": i["INV_NO"],
            "customerid_account@odata.bind": f"/accounts(accountnumber='{i['CUST_NO']}')",
        }
        for i in invoices
    ]
    assert all(o.ok for o in dynamics.upsert_many("invoices", "invoicenumber", bodies))


def test_every_edit_kind_lands_in_its_system(systems: tuple[DynamicsClient, ErpClient]) -> None:
    dynamics, erp = systems
    sim = Simulator(dynamics, erp, seed=1)
    for kind in (*DYNAMICS_EDITS, *ERP_EDITS):
        edit = sim.edit(kind)
        assert edit is not None and edit.ok, kind
    by_kind = {e.kind: e for e in sim.edits}
    new_account = by_kind["new_account"].key
    assert dynamics.get("accounts", {"accountnumber": new_account}, ["name"]) is not None
    order = dynamics.get("salesorders", {"ordernumber": by_kind["new_order"].key}, ["_customerid_value"])
    assert order is not None and order["_customerid_value"]
    gone = dynamics.get("accounts", {"accountnumber": by_kind["deactivate_account"].key}, ["statecode"])
    assert gone is not None and gone["statecode"] == 1
    invoice = by_kind["invoice"].key
    assert erp.scalar('SELECT "PAID_FLAG" FROM "INV_HEADER" WHERE "INV_NO" = ?', invoice) == "N"
    shipped = by_kind["partial_shipment"].key
    assert erp.scalar('SELECT "SHIP_STATUS" FROM "SO_HEADER" WHERE "SO_NO" = ?', shipped) == "P"
    # the ERP's triggers stamp LAST_UPD on a user's update, as the real system does
    edited = by_kind["credit_limit"].key
    stamp = erp.scalar('SELECT "LAST_UPD" FROM "CUST_MASTER" WHERE "CUST_NO" = ?', edited)
    assert str(stamp)[:4] >= "2025"
    assert sim.summary()["refused"] == {}


def test_bad_values_sit_at_their_source_and_fix_repairs_them(
    systems: tuple[DynamicsClient, ErpClient],
) -> None:
    dynamics, erp = systems
    sim = Simulator(dynamics, erp, seed=2)
    bad = {kind: sim.inject(kind) for kind in BAD_KINDS}
    assert all(bad.values()), sim.skipped
    assert len({(b.entity, b.key) for b in bad.values()}) == len(bad), "one bad value per record"
    name = dynamics.get("accounts", {"accountnumber": bad["long_name"].key}, ["name"])
    assert name is not None and name["name"] == LONG_NAME and len(LONG_NAME) == 150
    email = dynamics.get("accounts", {"accountnumber": bad["invalid_email"].key}, ["emailaddress1"])
    assert email is not None and "@@" in email["emailaddress1"]
    date = erp.scalar('SELECT "INV_DATE" FROM "INV_HEADER" WHERE "INV_NO" = ?', bad["bad_date"].key)
    assert date == "20231399"
    text = erp.scalar(
        'SELECT typeof("CREDIT_LIMIT") FROM "CUST_MASTER" WHERE "CUST_NO" = ?', bad["text_in_decimal"].key
    )
    assert text == "text"
    # bad rows never stop the user's other edits, and bad records are left alone until fixed
    for kind in ("credit_limit", "payment_terms", "invoice", "account_name"):
        edit = sim.edit(kind)
        assert (
            edit is not None
            and edit.ok
            and (edit.entity, edit.key) not in {(b.entity, b.key) for b in sim.bad}
        )

    fixed = sim.fix()

    assert {b.kind for b in fixed} == set(BAD_KINDS) and all(b.fixed_at for b in fixed)
    assert sim.fix() == [], "fix() repairs each bad value once"
    name = dynamics.get("accounts", {"accountnumber": bad["long_name"].key}, ["name"])
    assert name is not None and len(name["name"]) <= 60
    date = erp.scalar('SELECT "INV_DATE" FROM "INV_HEADER" WHERE "INV_NO" = ?', bad["bad_date"].key)
    assert date == "20231229"
    limit = erp.scalar(
        'SELECT "CREDIT_LIMIT" FROM "CUST_MASTER" WHERE "CUST_NO" = ?', bad["text_in_decimal"].key
    )
    assert Decimal(str(limit)) == Decimal("4321.00")
    landed, held = sim.landed(bad["long_name"])
    assert landed is False and held != bad["long_name"].fixed_value  # nothing synced it: not landed


def test_run_spreads_bad_values_over_the_duration(systems: tuple[DynamicsClient, ErpClient]) -> None:
    dynamics, erp = systems
    ticks = iter(float(n) for n in range(10_000))
    sim = Simulator(dynamics, erp, seed=3)

    sim.run(
        duration=200.0, rate_per_minute=30.0, bad_per_kind=1, clock=lambda: next(ticks), sleep=lambda _: None
    )

    kinds = [e.kind for e in sim.edits]
    assert [k for k in kinds if k.startswith("bad:")] == [f"bad:{k}" for k in BAD_KINDS]
    assert sum(1 for k in kinds if not k.startswith("bad:")) >= 20
    assert set(kinds) >= {*DYNAMICS_EDITS, *ERP_EDITS}, "every kind of edit at least once"
    assert sim.summary()["refused"] == {}, sim.summary()
