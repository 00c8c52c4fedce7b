"""``d365sync sandbox conflicts``: real conflicts for the demo's review queue.

After the first successful invoices run, a person changes the total of a few invoices in Dataverse
while the ERP's billing changes the same invoices' gross amount, both before the next run. Invoices
are ERP-owned with ``manual_review`` (financial data), so that run parks each one in the review
queue with the base and both sides' values and times, and the rest of the entity goes on.

It reads the connections ``d365sync sync`` reads (``source var/demo/airflow.env``); the Dataverse
edits are made as the sandbox's person user, as a person's would be.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from decimal import Decimal
from typing import Any

ENTITY = "invoices"
RETRY_SECONDS = 10.0


def add_parser(sandbox_kinds: Any) -> None:
    parser = sandbox_kinds.add_parser(
        "conflicts", help="edit a few invoices on both sides after the first sync (demo review queue)"
    )
    parser.add_argument("--invoices", type=int, default=3, help="how many invoices to edit (default 3)")
    parser.add_argument(
        "--wait", type=float, default=1800, help="seconds to wait for the first successful invoices run"
    )
    parser.set_defaults(func=run)


def _first_success(store: Any, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if any(r.status == "success" for r in store.run_reports(ENTITY, limit=20)):
            return True
        time.sleep(5)
    return False


def _edit(person: Any, erp: Any, wanted: int, edited: set[str]) -> int:
    """Edit invoices found in Dataverse on both sides, up to ``wanted`` in all; returns how many."""
    from d365sync.sandbox.erp.tables import INV_HEADER

    q = erp.dialect.q
    for chunk in erp.iter_rows(INV_HEADER):
        for row in chunk:
            number = str(row["INV_NO"]).strip()
            if len(edited) >= wanted:
                return len(edited)
            if number in edited or row["GROSS_AMOUNT"] is None:
                continue
            found = person.get("invoices", {"invoicenumber": number}, ["invoicenumber", "totalamount"])
            if found is None or found.get("totalamount") is None:
                continue
            total = Decimal(str(found["totalamount"]))
            person.update("invoices", {"invoicenumber": number}, {"totalamount": float(total + 1)})
            erp.execute(
                [
                    f"UPDATE {q('INV_HEADER')} SET {q('GROSS_AMOUNT')} = {q('GROSS_AMOUNT')} + 2 "
                    f"WHERE {q('INV_NO')} = ?"
                ],
                (row["INV_NO"],),
            )
            print(f"invoice {number}: Dynamics total {total} → {total + 1}, ERP gross +2.00", flush=True)
            edited.add(number)
    return len(edited)


def run(args: argparse.Namespace) -> int:
    from d365sync.engine import connections as c
    from d365sync.engine.state import StateStore
    from d365sync.sandbox.dataverse.config import PERSON_USER
    from d365sync.sync_cli import open_systems

    dynamics, erp = open_systems(c.from_env(c.DYNAMICS_CONN), c.from_env(c.ERP_CONN))
    url, schema = c.state_url(c.from_env(c.STATE_CONN))
    store = StateStore.open(url, schema=schema)
    person = None
    try:
        deadline = time.monotonic() + args.wait
        if not _first_success(store, deadline):
            print(f"no successful {ENTITY} run within {args.wait:.0f} s: nothing edited", file=sys.stderr)
            return 1
        person_config = dataclasses.replace(
            dynamics.config, client_id=PERSON_USER["client_id"], client_secret=PERSON_USER["client_secret"]
        )
        from d365sync.dynamics import DynamicsClient

        person = DynamicsClient(person_config)
        edited: set[str] = set()
        # a successful run may have synced no invoice yet (each waits, parked, until its customer
        # is in Dataverse): look again until enough are there, or the wait is over
        while _edit(person, erp, args.invoices, edited) < args.invoices and time.monotonic() < deadline:
            print(f"{len(edited)} invoice(s) in Dataverse to edit so far; looking again", flush=True)
            time.sleep(RETRY_SECONDS)
        print(f"{len(edited)} invoice(s) edited on both sides; the next {ENTITY} run parks them for review")
        return 0 if edited else 1
    finally:
        if person is not None:
            person.close()
        store.close()
        erp.close()
        dynamics.close()
