"""A review opened by a record's first sync survives the next runs and is applied (issue 10).

A customer present in Dynamics *and* in the ERP before its first sync, with a different street
address and ``manual_review`` as the address policy, opens a review on run 1. Run 1 writes the
ERP-owned fields to Dynamics only, so run 2 extracts that record from Dynamics alone: it used to
fail with ``TypeError: cannot store _Missing in the sync state`` (the ERP side, not extracted,
stood in as "no base value" and that sentinel reached the review queue). Everything goes through
``d365sync sync`` with ``AIRFLOW_CONN_*``, as an operator would run it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from d365sync.cli import main
from d365sync.engine.operations import apply_review_decisions
from d365sync.engine.state import StateStore
from d365sync.erp import ErpClient
from d365sync.sandbox.dataverse.process import DataverseSandbox
from tests.integration.pipeline_env import ENTITIES, Env, sync_cli_connections
from tests.sandbox_fixtures import SandboxFactory

pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)

ADDRESS_POLICY = "conflict: {policy: last_write_wins, clock_skew_seconds: 120, winner: dynamics}"
DYNAMICS_STREET = "9 Dynamics Way"


def _entities_with_reviewed_address(folder: Path) -> Path:
    """The shipped entity specs, with every customers address field on ``manual_review``."""
    entities = folder / "entities"
    shutil.copytree(ENTITIES, entities)
    spec = entities / "customers.yaml"
    text = spec.read_text(encoding="utf-8")
    assert text.count(ADDRESS_POLICY) == 1  # the YAML anchor every address field inherits
    spec.write_text(text.replace(ADDRESS_POLICY, "conflict: {policy: manual_review}"), encoding="utf-8")
    return entities


def _seed_the_same_customer_in_dynamics(env: Env) -> tuple[str, str]:
    """Copy one ERP customer into Dynamics with another street: (number, ERP street)."""
    ((number, name, email, phone, street, city, postcode, country),) = env.erp_rows(
        "SELECT CUST_NO, CUST_NAME, CUST_EMAIL_ID, PHONE, ADDR_LINE1, CITY, POSTCODE, COUNTRY"
        " FROM CUST_MASTER WHERE ADDR_LINE1 IS NOT NULL AND ADDR_LINE2 IS NULL AND CITY IS NOT NULL"
        " AND POSTCODE IS NOT NULL AND COUNTRY IS NOT NULL ORDER BY CUST_NO LIMIT 1"
    )
    account = {
        "accountnumber": number.strip(),
        "name": name,
        "emailaddress1": email and email.lower(),
        "telephone1": phone and phone.strip(),
        "address1_line1": DYNAMICS_STREET,
        "address1_city": city.strip(),
        "address1_postalcode": postcode.strip(),
        "address1_country": country.strip().upper(),
    }
    (outcome,) = env.dynamics.upsert_many("accounts", "accountnumber", [account], logical_name="account")
    assert outcome.ok, outcome
    return number.strip(), street.strip()


def test_a_first_sync_review_stays_open_on_the_next_run_and_its_decision_reaches_both_sides(
    dataverse_sandbox_factory: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sandbox = dataverse_sandbox_factory(seed=10)
    env = Env.create(sandbox, tmp_path, rows=20)
    try:
        number, erp_street = _seed_the_same_customer_in_dynamics(env)
    finally:
        env.close()
    staging = sync_cli_connections(sandbox, tmp_path, monkeypatch)
    sync = ["sync", "customers", "--entities", str(_entities_with_reviewed_address(tmp_path)), *staging]

    def streets() -> tuple[str, str]:
        return _streets(sandbox, tmp_path, number)

    # run 1: the street differs on both sides of a never-synced record → one review
    assert main(sync) == 0, capsys.readouterr().err
    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}") as store:
        (review,) = store.reviews("customers")
        assert (review.record_key.strip(), review.field) == (number, "address_line1")
        assert (review.base, review.dynamics, review.erp) == (None, DYNAMICS_STREET, erp_street)
    assert streets() == (DYNAMICS_STREET, erp_street)

    # run 2: the record comes back from Dynamics only; the review stays open, unchanged
    assert main(sync) == 0, capsys.readouterr().err
    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}") as store:
        (again,) = store.reviews("customers")
        assert (again.id, again.base, again.dynamics, again.erp) == (
            review.id,
            None,
            DYNAMICS_STREET,
            erp_street,
        )
        stored = store.load_base("customers", "erp", [review.record_key])[review.record_key]
        assert stored.base is not None and "address_line1" not in stored.base.values
        outcome = apply_review_decisions(store, "customers", [review.id], "dynamics", by="alice")
        assert outcome["decided"] == [review.id]
    assert streets() == (DYNAMICS_STREET, erp_street)

    # run 3: the decision lands on both systems and closes the review
    assert main(sync) == 0, capsys.readouterr().err
    assert streets() == (DYNAMICS_STREET, DYNAMICS_STREET)
    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}") as store:
        assert store.reviews("customers") == []
        assert [r.id for r in store.reviews("customers", status="applied")] == [review.id]
        stored = store.load_base("customers", "erp", [review.record_key])[review.record_key]
        assert stored.base is not None and stored.base.values["address_line1"] == DYNAMICS_STREET

    # run 4: nothing left to write
    capsys.readouterr()
    assert main(sync) == 0
    out = capsys.readouterr().out
    assert "dynamics: nothing" in out and "erp: nothing" in out


def _streets(sandbox: DataverseSandbox, folder: Path, number: str) -> tuple[str, str]:
    """(Dynamics street, ERP street) of one customer, read from each system."""
    client = sandbox.client()
    try:
        (row,) = client.iter_rows("accounts", ["address1_line1"], filter=f"accountnumber eq '{number}'")
    finally:
        client.close()
    erp = ErpClient(f"DRIVER={{SQLite3}};Database={folder / 'erp.db'};")
    try:
        ((street,),) = erp._session.run(
            lambda cur: [
                tuple(r) for r in cur.execute("SELECT ADDR_LINE1 FROM CUST_MASTER WHERE CUST_NO = ?", number)
            ]
        )
    finally:
        erp.close()
    return row["address1_line1"], street.strip()
