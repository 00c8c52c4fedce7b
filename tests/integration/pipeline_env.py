"""A real two-system environment for pipeline tests: the Dataverse sandbox over HTTP, the
SQLite ERP through the SQLite3 ODBC driver seeded by the ERP seeder, a SQLite state store."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from d365sync.dynamics import DynamicsClient
from d365sync.engine.pipeline import RunResult, run_entity
from d365sync.engine.state import StateStore
from d365sync.erp import ErpClient
from d365sync.sandbox.dataverse.process import DataverseSandbox
from d365sync.sandbox.erp import sqlite_airflow_connection
from d365sync.sandbox.erp.seeder import DirtyRates, init_sandbox
from d365sync.spec import EntitySpec, dependency_order, load_entities

ENTITIES = Path(__file__).resolve().parents[2] / "include" / "entities"
ORDER = tuple(dependency_order(load_entities(ENTITIES)))  # the runners' order: parents first
EXTRA_CURRENCIES = ("CHF", "JPY", "SEK", "CAD")  # the ERP uses them; the sandbox seeds USD/EUR/GBP


def sync_cli_connections(
    sandbox: DataverseSandbox, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Point ``d365sync sync`` at the sandbox, the ERP and the state store of ``Env.create(…, folder)``
    through AIRFLOW_CONN_*; returns the ``--staging`` arguments."""
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(sandbox.airflow_connection()))
    monkeypatch.setenv("AIRFLOW_CONN_ERP_DEFAULT", json.dumps(sqlite_airflow_connection(folder / "erp.db")))
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_STATE_DEFAULT", f"sqlite:///{folder / 'state.db'}")
    return ["--staging", str(folder / "staging")]


@dataclass
class Env:
    """Both systems, the state store and the specs; ``run`` syncs one entity for real."""

    sandbox: DataverseSandbox
    dynamics: DynamicsClient
    erp: ErpClient
    store: StateStore
    specs: dict[str, EntitySpec]
    staging: Path

    @classmethod
    def create(cls, sandbox: DataverseSandbox, folder: Path, rows: int = 40, **rates: float) -> Env:
        erp = ErpClient(f"DRIVER={{SQLite3}};Database={folder / 'erp.db'};")
        clean = {name: 0.0 for name in DirtyRates.__dataclass_fields__}
        init_sandbox(erp, rows=rows, rates=DirtyRates(**(clean | rates)))
        dynamics = sandbox.client()
        currencies = [
            {
                "isocurrencycode": c,
                "currencyname": c,
                "currencysymbol": c,
                "exchangerate": 1.0,
                "currencyprecision": 2,
            }
            for c in EXTRA_CURRENCIES
        ]
        dynamics.upsert_many(
            "transactioncurrencies", "isocurrencycode", currencies, logical_name="transactioncurrency"
        )
        store = StateStore.open(f"sqlite:///{folder / 'state.db'}")
        return cls(sandbox, dynamics, erp, store, load_entities(ENTITIES), folder / "staging")

    def close(self) -> None:
        self.store.close()
        self.erp.close()
        self.dynamics.close()

    def run(self, entity: str, **options: Any) -> RunResult:
        return run_entity(
            self.specs[entity],
            dynamics=self.dynamics,
            erp=self.erp,
            store=self.store,
            staging=self.staging,
            **options,
        )

    def run_all(self, order: Iterable[str] = ORDER, **options: Any) -> dict[str, RunResult]:
        return {name: self.run(name, **options) for name in order}

    # -- observations -------------------------------------------------------------------------
    def erp_rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.erp._session.run(lambda cur: [tuple(r) for r in cur.execute(sql, *params).fetchall()])

    def erp_fingerprint(self) -> dict[str, tuple[int, int]]:
        """Row count and ROW_VER total (or count only) per synced ERP table."""
        out = {}
        for table in ("CUST_MASTER", "SO_HEADER"):
            out[table] = self.erp_rows(f"SELECT COUNT(*), SUM(ROW_VER) FROM {table}")[0]
        for table in ("ITEM_MASTER", "ITEM_STOCK", "INV_HEADER"):
            out[table] = self.erp_rows(f"SELECT COUNT(*), 0 FROM {table}")[0]
        return out

    def dynamics_rows(
        self, entity_set: str, select: list[str], filter: str | None = None
    ) -> list[dict[str, Any]]:
        return list(self.dynamics.iter_rows(entity_set, select, filter=filter))

    def write_requests(self) -> int:
        """Write requests the sandbox served since the last reset (reads and tokens excluded)."""
        counters = self.sandbox.counters()
        routes = counters.get("routes", {})
        return sum(n for route, n in routes.items() if not route.upper().startswith("GET"))


@contextmanager
def running_env(
    factory: Callable[..., DataverseSandbox], folder: Path, *, seed: int, rows: int = 40
) -> Iterator[Env]:
    """A private sandbox with ``seed`` accounts and an ERP of ``rows`` customers; both are closed
    and stopped afterwards (the body of the pipeline tests' ``env`` fixtures)."""
    sandbox = factory(seed=seed)
    environment = Env.create(sandbox, folder, rows=rows)
    try:
        yield environment
    finally:
        environment.close()
        sandbox.stop()


#: A person editing in Dynamics: an application user of their own, not the sync's.
PERSON = {
    "client_id": "6d1b8e2a-9c1f-4a57-8a41-3f0e6b2c9d10",
    "client_secret": "person-secret",
    "name": "A person",
}


@contextmanager
def env_with_person(
    sandboxes: Callable[..., DataverseSandbox], folder: Path, *, seed: int, rows: int
) -> Iterator[Env]:
    """:func:`running_env` whose sandbox also knows :data:`PERSON`."""
    with running_env(lambda **o: sandboxes(extra_users=[PERSON], **o), folder, seed=seed, rows=rows) as env:
        yield env


@contextmanager
def person_client(env: Env) -> Iterator[DynamicsClient]:
    """A client acting as :data:`PERSON` (their edits are not the sync's own)."""
    with env.sandbox.client(client_id=PERSON["client_id"], client_secret=PERSON["client_secret"]) as client:
        yield client


def before_first_write(monkeypatch: pytest.MonkeyPatch, action: Callable[[], Any]) -> list[Any]:
    """Run ``action`` once, after the next run's extract and resolve of its first bucket, just
    before the first plan file goes to a load; returns a list that then holds its result."""
    from d365sync.engine.stages.load import Loading

    real, done = Loading.add, []

    def add(self: Loading, name: str, entries: Any = None) -> None:
        if not done:
            done.append(action())
        real(self, name, entries)

    monkeypatch.setattr(Loading, "add", add)
    return done
