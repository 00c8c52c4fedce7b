"""Personal data through real syncs (issue 11): the Dataverse sandbox over HTTP, the SQLite ERP over
ODBC, ``d365sync sync`` and ``d365sync privacy`` as an operator runs them.

* encryption: after real runs the raw state rows (plain SQL, every text column of every table)
  hold none of the planted names, e-mails and phones, yet merges, echoes and dead letters work;
  the key is rotated (old key → new key → old key dropped) with ``privacy rotate-keys``;
* erasure: after ``privacy erase`` neither the key nor the planted values are in the state store
  or in a staging file, and the next sync converges on the same records (no duplicate).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from d365sync.cli import main
from d365sync.engine.privacy import KEYS_ENV, Privacy, PrivacyError
from d365sync.engine.staging import read_groups
from d365sync.engine.state import StateStore
from tests.integration.pipeline_env import Env, sync_cli_connections
from tests.sandbox_fixtures import SandboxFactory
from tests.unit.test_privacy_store import raw_hits

pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)

KEY = "C900000001"
SUBJECT = {
    "accountnumber": KEY,
    "name": "Zelda Quistorp-Planted",
    "emailaddress1": "zelda.quistorp@planted.example",
    "telephone1": "+44 20 7946 0999",
    "address1_line1": "77 Plantation Row",
    "address1_city": "Quistborough",
    "address1_postalcode": "QX1 9ZZ",
    "address1_country": "GB",
}
PLANTED = tuple(v for k, v in SUBJECT.items() if k not in ("accountnumber", "address1_country"))
NEW_PHONE = "+44 20 7946 0111"
NOW = "strftime('%Y-%m-%d %H:%M:%S','now') || '.000'"
BAD = ("C900000002", "Yorick Plantedbad", "+44 20 7946 0888")  # an ERP row with a broken e-mail


@pytest.fixture
def env(
    dataverse_sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    monkeypatch.setenv(KEYS_ENV, Fernet.generate_key().decode())
    sandbox = dataverse_sandbox_factory(seed=5)
    environment = Env.create(sandbox, tmp_path, rows=10)
    outcome = environment.dynamics.upsert_many("accounts", "accountnumber", [SUBJECT], logical_name="account")
    assert outcome[0].ok, outcome
    number, name, phone = BAD
    environment.erp.execute(
        [
            "INSERT INTO CUST_MASTER (CUST_NO, CUST_NAME, CUST_EMAIL_ID, PHONE, CURR_CODE, STATUS, LAST_UPD,"
            f" ROW_VER) VALUES ('{number}', '{name}', 'yorick-without-at', '{phone}', 'EURO', 'A',"
            f" {NOW}, 1)"
        ]
    )
    environment.store.close()  # the CLI runs open their own
    yield environment
    environment.close()
    sandbox.stop()


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def store_with(env: Env, keys: str) -> StateStore:
    return StateStore.open(
        f"sqlite:///{env.staging.parent / 'state.db'}", privacy=Privacy.from_keys(keys, "test")
    )


def erp_update(env: Env, assignments: str) -> None:
    """A user's SQL edit of the subject's ERP row (the cursor column moves with it)."""
    env.erp.execute([f"UPDATE CUST_MASTER SET {assignments}, LAST_UPD = {NOW} WHERE CUST_NO = '{KEY}'"])


def erp_customer(env: Env, number: str) -> list[tuple[Any, ...]]:
    sql = "SELECT CUST_NAME, CUST_EMAIL_ID, PHONE, CREDIT_LIMIT FROM CUST_MASTER WHERE CUST_NO = ?"
    return env.erp_rows(sql, number)


def accounts(env: Env, number: str) -> list[dict[str, Any]]:
    select = ["accountid", "name", "telephone1", "creditlimit"]
    return env.dynamics_rows("accounts", select, f"accountnumber eq '{number}'")


def test_synced_personal_data_is_encrypted_merges_work_and_keys_rotate(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sync = ["sync", "customers", *sync_cli_connections(env.sandbox, tmp_path, monkeypatch)]
    old = os.environ[KEYS_ENV]
    cli(sync, capsys)
    assert erp_customer(env, KEY)[0][:3] == (SUBJECT["name"], SUBJECT["emailaddress1"], SUBJECT["telephone1"])
    with store_with(env, old) as store:
        assert raw_hits(store.engine, (*PLANTED, *BAD[1:])) == []
        (letter,) = store.active_dead_letters("customers")
        assert letter.record_key == BAD[0] and letter.payload["rows"][0]["row"]["CUST_NAME"] == BAD[1]
        base = store.load_base("customers", "erp", [KEY])[KEY].base
        assert base is not None and base.values["name"] == SUBJECT["name"]

    # merges work on decrypted bases: one change each way, nothing reverted, then an echo-free run
    change = {"accountnumber": KEY, "telephone1": NEW_PHONE}
    env.dynamics.upsert_many("accounts", "accountnumber", [change], logical_name="account")
    erp_update(env, "CREDIT_LIMIT = 4321.00, ROW_VER = ROW_VER + 1")
    out = cli(sync, capsys)
    ((name, email, phone, limit),) = erp_customer(env, KEY)
    assert (name, email, phone, Decimal(str(limit))) == (
        SUBJECT["name"],
        SUBJECT["emailaddress1"],
        NEW_PHONE,
        4321,
    )
    ((account,),) = [accounts(env, KEY)]
    assert (account["telephone1"], float(account["creditlimit"])) == (NEW_PHONE, 4321.0)
    assert "dynamics: update 1" in out and "erp: update 1" in out
    assert "dynamics: nothing" in cli(sync, capsys) and "erp: nothing" in cli(sync, capsys)

    # rotation: a new key first, old data readable, rotate-keys, the old key dropped
    new = Fernet.generate_key().decode()
    monkeypatch.setenv(KEYS_ENV, f"{new},{old}")
    with store_with(env, f"{new},{old}") as store:
        assert store.load_base("customers", "erp", [KEY])[KEY].base.values["phone"] == NEW_PHONE  # type: ignore[union-attr]
    rotated = json.loads(cli(["privacy", "rotate-keys"], capsys))["rotated"]
    assert rotated["sync_record"] >= 1 and rotated["sync_dead_letter"] == 1 and rotated["sync_audit"] >= 1
    monkeypatch.setenv(KEYS_ENV, new)
    with store_with(env, new) as store:
        assert (
            store.load_base("customers", "erp", [KEY])[KEY].base.values["email"] == SUBJECT["emailaddress1"]
        )  # type: ignore[union-attr]
        assert store.active_dead_letters("customers")[0].payload["rows"][0]["row"]["PHONE"] == BAD[2]
        assert store.audit_log("customers")
        assert raw_hits(store.engine, (*PLANTED, *BAD[1:], NEW_PHONE)) == []
    with store_with(env, old) as store, pytest.raises(PrivacyError):
        store.load_base("customers", "erp", [KEY])
    assert "dynamics: nothing" in cli(sync, capsys)  # runs on with the new key alone


def staging_hits(root: Path, needles: tuple[str, ...]) -> list[str]:
    hits = []
    for path in root.rglob("*.parquet"):
        with path.open("rb") as handle:
            groups = read_groups(handle)
        staged = [(g.tags, g.keys, g.rows()) for g in groups]
        text = json.dumps(staged, ensure_ascii=False, default=str).lower()
        hits += [f"{path.name}: {n}" for n in needles if n.lower() in text]
    return hits


def test_erased_subject_is_nowhere_and_the_next_sync_converges_without_a_duplicate(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    staging = sync_cli_connections(env.sandbox, tmp_path, monkeypatch)
    key = os.environ[KEYS_ENV]
    with store_with(env, key) as store:  # a run that keeps its staging files (a failed run would too)
        run = Env(env.sandbox, env.dynamics, env.erp, store, env.specs, env.staging)
        run.run("customers", keep_staging=True)
        guid = store.load_base("customers", "erp", [KEY])[KEY].dynamics_id
        # a dead letter of the subject itself: its ERP e-mail broken, then fixed after the erasure
        erp_update(env, "CUST_EMAIL_ID = 'no-at-sign'")
        run.run("customers", keep_staging=True)
        assert {d.record_key for d in store.active_dead_letters("customers")} == {KEY, BAD[0]}
        assert raw_hits(store.engine, (KEY,)) and staging_hits(env.staging, (KEY, SUBJECT["name"]))
    exported = json.loads(cli(["privacy", "export", "--entity", "customers", "--key", KEY, *staging], capsys))
    assert exported["record"]["base"]["values"]["name"] == SUBJECT["name"] and exported["audit"]

    erase = ["privacy", "erase", "--entity", "customers", "--key", KEY, "--actor", "dpo", *staging]
    report = json.loads(cli(erase, capsys))

    assert KEY not in json.dumps(report) and report["counts"]["records"] == 1
    assert report["counts"]["dead_letters"] == 1 and report["counts"]["staging_rows"] > 0
    with store_with(env, key) as store:
        assert raw_hits(store.engine, (KEY, *PLANTED)) == []
        assert store.audit_log("customers")[0]["operation"] == "erase"
    assert staging_hits(env.staging, (KEY, *PLANTED, guid or "-")) == []
    exported = json.loads(cli(["privacy", "export", "--entity", "customers", "--key", KEY, *staging], capsys))
    assert exported["record"]["status"] == "erased" and len(exported["erasures"]) == 1
    assert not any(v in json.dumps(exported) for v in PLANTED)

    # the sources still hold the subject: the next change re-pairs it through the tombstone
    erp_update(env, f"CUST_EMAIL_ID = '{SUBJECT['emailaddress1']}'")
    sync = ["sync", "customers", *staging]
    cli(sync, capsys)
    (account,) = accounts(env, KEY)
    assert account["accountid"] == guid and account["name"] == SUBJECT["name"]
    assert env.erp_rows("SELECT COUNT(*) FROM CUST_MASTER WHERE CUST_NO = ?", KEY) == [(1,)]
    assert erp_customer(env, KEY)[0][:3] == (SUBJECT["name"], SUBJECT["emailaddress1"], SUBJECT["telephone1"])
    with store_with(env, key) as store:
        pair = store.load_base("customers", "erp", [KEY])[KEY]
        assert (pair.status, pair.dynamics_id) == ("synced", guid)
        assert sum(1 for chunk in store.iter_base("customers") for r in chunk if r.dynamics_id == guid) == 1
    out = cli(sync, capsys)
    assert "dynamics: nothing" in out and "erp: nothing" in out
