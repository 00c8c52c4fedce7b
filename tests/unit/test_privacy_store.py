"""The state store with personal data (issue 11): encryption at rest, rotation, erasure, export, purge.

On a SQLite file; ``tests/integration/test_privacy_postgres.py`` reruns these on PostgreSQL.
Every check of "not stored" reads the raw tables with plain SQL, every text column of every table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, String, Text, inspect, select, text, update

from d365sync.engine import data_subjects
from d365sync.engine.inbox import IncomingEvent
from d365sync.engine.merge import Base
from d365sync.engine.migrations import schema as t
from d365sync.engine.privacy import Cipher, Privacy, PrivacyError, key_hash
from d365sync.engine.staging import Staging
from d365sync.engine.state import (
    AuditEntry,
    BaseRow,
    Failure,
    KeyPair,
    ParkedChild,
    ReviewItem,
    StateStore,
)
from d365sync.spec import Retention

PII = frozenset({"name", "email", "phone"})
GUID = "5a0c7a8e-3f1e-4b7a-9d2c-6e5f4a3b2c1d"
KEY = "C000000042"
NAME, EMAIL, PHONE = "Anna Quistorp", "anna.quistorp@example.org", "+49 30 1234599"
PLANTED = (KEY, NAME, EMAIL, PHONE)
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def new_key() -> str:
    return Fernet.generate_key().decode()


def privacy(*keys: str) -> Privacy:
    p = Privacy(Cipher(list(keys)))
    p.register("customers", PII)
    return p


@pytest.fixture
def key() -> str:
    return new_key()


@pytest.fixture
def store(tmp_path: Path, key: str) -> Iterator[StateStore]:
    with StateStore.open(f"sqlite:///{tmp_path / 'state.db'}", chunk_size=3, privacy=privacy(key)) as s:
        yield s


def reopen(store: StateStore, *keys: str) -> StateStore:
    """The same database through another store with other keys."""
    return StateStore(store.engine, upgrade=False, privacy=privacy(*keys))


def raw_hits(engine: Engine, needles: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(table, column, needle) for every text cell of every table holding a needle (plain SQL)."""
    hits = []
    schema = (engine.get_execution_options().get("schema_translate_map") or {}).get(None)
    meta, prefix = inspect(engine), f'"{schema}".' if schema else ""
    with engine.connect() as conn:
        for table in meta.get_table_names(schema=schema):
            for column in meta.get_columns(table, schema=schema):
                if not isinstance(column["type"], (String, Text)):
                    continue
                for (value,) in conn.execute(text(f'SELECT "{column["name"]}" FROM {prefix}"{table}"')):
                    cell = str(value or "").lower()
                    hits += [(table, column["name"], n) for n in needles if n.lower() in cell]
    return hits


def subject_everywhere(store: StateStore) -> None:
    """The subject in every table that holds record values, as a run would leave it."""
    values = {"number": KEY, "name": NAME, "email": EMAIL, "phone": PHONE, "limit": 100}
    store.save_base("customers", [BaseRow(GUID, KEY, Base(values, 'W/"1"', "1", T0, T0))], "r1")
    store.open_reviews("customers", "r1", [ReviewItem(KEY, "name", NAME, NAME + " Ltd", NAME + " GmbH")])
    row = {"CUST_NO": KEY, "CUST_NAME": NAME, "PHONE": PHONE}
    store.dead_letter("customers", "validate", "r1", [Failure(KEY, "validation: bad", {"rows": [row]})])
    store.park_children("customers", "r1", [ParkedChild(KEY, "accounts", "erp", "P1", {"rows": [row]})])
    entry = AuditEntry(
        KEY, "erp", "update", ["name", "email"], {"name": NAME}, {"name": NAME, "email": EMAIL}
    )
    store.audit("r1", "customers", [entry], "test")


def test_personal_values_are_encrypted_at_rest_and_read_back_clear(store: StateStore) -> None:
    subject_everywhere(store)
    assert raw_hits(store.engine, (NAME, EMAIL, PHONE, "Quistorp")) == []
    assert raw_hits(store.engine, (KEY,))  # keys stay clear for lookups
    stored = store.load_base("customers", "erp", [KEY])[KEY]
    assert (
        stored.base is not None and stored.base.values["name"] == NAME and stored.base.values["limit"] == 100
    )
    with store.engine.connect() as conn:
        base_json = conn.execute(select(t.record.c.base_json)).scalar_one()
    assert '"limit":100' in base_json and '"$pii"' in base_json  # non-pii fields stay readable
    (review,) = store.reviews("customers")
    assert (review.base, review.dynamics, review.erp) == (NAME, NAME + " Ltd", NAME + " GmbH")
    decided = store.decide_review(review.id, NAME + " AG", by="someone")
    assert decided.chosen == NAME + " AG" and raw_hits(store.engine, ("Quistorp",)) == []
    (letter,) = store.active_dead_letters("customers")
    assert letter.payload["rows"][0]["CUST_NAME"] == NAME
    assert store.parked_children("customers")[0].payload["rows"][0]["PHONE"] == PHONE
    (audit,) = store.audit_log("customers")
    assert audit["after"]["name"] == NAME and audit["after"]["email"] != EMAIL  # masked, then sealed
    with pytest.raises(PrivacyError, match="none of the 1 key"):
        reopen(store, new_key()).load_base("customers", "erp", [KEY])


def test_rotation_old_key_then_new_key_then_old_key_dropped(store: StateStore, key: str) -> None:
    subject_everywhere(store)
    newer = new_key()
    both = reopen(store, newer, key)
    assert both.load_base("customers", "erp", [KEY])[KEY].base.values["email"] == EMAIL  # type: ignore[union-attr]
    counts = data_subjects.rotate_keys(both, chunk_size=2)
    assert counts == {
        "sync_record": 1,
        "sync_audit": 1,
        "sync_review": 1,
        "sync_dead_letter": 1,
        "sync_parked": 1,
    }
    only_new = reopen(store, newer)
    assert only_new.load_base("customers", "erp", [KEY])[KEY].base.values["phone"] == PHONE  # type: ignore[union-attr]
    assert only_new.reviews("customers")[0].dynamics == NAME + " Ltd"
    assert only_new.active_dead_letters("customers")[0].payload["rows"][0]["CUST_NAME"] == NAME
    assert only_new.parked_children("customers")[0].payload["rows"][0]["CUST_NAME"] == NAME
    assert only_new.audit_log("customers")[0]["before"] == {"name": NAME}
    with pytest.raises(PrivacyError):
        reopen(store, key).load_base("customers", "erp", [KEY])
    assert raw_hits(store.engine, (NAME, EMAIL, PHONE)) == []


def test_rotation_rewrites_fernet_tokens_of_earlier_versions_as_aes_gcm(store: StateStore, key: str) -> None:
    import base64
    import json

    legacy = Fernet(key).encrypt(json.dumps({"email": EMAIL}).encode()).decode()
    store.save_base("customers", [BaseRow(GUID, KEY, Base({"number": KEY}))], "r0")
    with store.engine.begin() as conn:
        conn.execute(update(t.record).values(base_json=json.dumps({"number": KEY, "$pii": legacy})))
    assert store.load_base("customers", "erp", [KEY])[KEY].base.values == {"number": KEY, "email": EMAIL}  # type: ignore[union-attr]
    assert data_subjects.rotate_keys(store)["sync_record"] == 1
    with store.engine.connect() as conn:
        token = json.loads(conn.execute(select(t.record.c.base_json)).scalar_one())["$pii"]
    assert token != legacy and base64.urlsafe_b64decode(token)[0] == 0x91
    assert store.load_base("customers", "erp", [KEY])[KEY].base.values == {"number": KEY, "email": EMAIL}  # type: ignore[union-attr]


def test_rotation_encrypts_values_stored_before_the_field_was_marked(store: StateStore, key: str) -> None:
    clear = StateStore(store.engine, upgrade=False, privacy=Privacy(insecure=True))
    clear.privacy.register("customers", PII)
    clear.save_base("customers", [BaseRow(GUID, KEY, Base({"name": NAME}))], "r0")
    assert raw_hits(store.engine, (NAME,))
    data_subjects.rotate_keys(store)
    assert raw_hits(store.engine, (NAME,)) == []
    assert store.load_base("customers", "erp", [KEY])[KEY].base.values == {"name": NAME}  # type: ignore[union-attr]


def test_erase_leaves_no_key_and_no_value_and_a_tombstone_that_re_pairs(
    store: StateStore, tmp_path: Path
) -> None:
    subject_everywhere(store)
    other = {"number": "C2", "name": "Other Person", "limit": 1}
    store.save_base("customers", [BaseRow("7b1c", "C2", Base(other))], "r1")
    store.start_run("r1", "customers")
    store.finish_run("r1", "customers", "failed", error=f"boom near {KEY}")
    staging = Staging(tmp_path / "staging", "r1", "customers")
    staging.write(
        "extract/erp/00000.parquet", [{"key": KEY, "row": {"CUST_NAME": NAME}}, {"key": "C2", "row": {}}]
    )
    staging.write("extract/dynamics/00000.parquet", [{"key": None, "id": GUID, "deleted": True}])
    before = data_subjects.export(store, "customers", KEY)
    assert before["record"]["base"]["values"]["email"] == EMAIL and len(before["dead_letters"]) == 1

    report = data_subjects.erase(
        store, "customers", KEY, actor="dpo@example.org", fields=PII, staging_roots=[tmp_path / "staging"]
    )

    assert KEY not in str(report) and report["key_hash"] == key_hash("customers", KEY)
    assert report["counts"] == {
        "records": 1,
        "reviews": 1,
        "dead_letters": 1,
        "parked": 1,
        "audit": 1,
        "texts": 1,
        "staging_files": 2,
        "staging_rows": 2,
    }
    assert raw_hits(store.engine, (*PLANTED, "Quistorp")) == []
    assert staging.read("extract/erp/00000.parquet") == [{"key": "C2", "row": {}}]
    assert staging.read("extract/dynamics/00000.parquet") == []
    assert store.load_base("customers", "erp", ["C2"])["C2"].base.values == other  # type: ignore[union-attr]
    erasure = store.audit_log("customers")[0]
    assert (erasure["operation"], erasure["actor"], erasure["fields"]) == (
        "erase",
        "dpo@example.org",
        sorted(PII),
    )
    after = data_subjects.export(store, "customers", KEY)
    assert after["record"]["status"] == "erased" and after["record"]["base"] is None
    assert not (after["reviews"] or after["dead_letters"] or after["parked"] or after["audit"])
    assert len(after["erasures"]) == 1 and NAME not in str(after)

    # the next sync that meets the key again: the tombstone is the pairing, revived, not duplicated
    pair = store.load_base("customers", "erp", [KEY])[KEY]
    assert (pair.status, pair.dynamics_id, pair.base) == ("erased", GUID, None)
    assert store.load_base("customers", "dynamics", [GUID])[GUID].erp_key is None
    assert [r.erp_key for chunk in store.iter_base("customers") for r in chunk] == ["C2"]
    store.reserve_keys("customers", [KeyPair(None, KEY)], "r2")
    store.save_base("customers", [BaseRow(GUID, KEY, Base({"number": KEY, "name": "Back"}))], "r2")
    revived = store.load_base("customers", "erp", [KEY])[KEY]
    assert (revived.record_id, revived.status, revived.dynamics_id) == (pair.record_id, "synced", GUID)
    with store.engine.connect() as conn:
        assert sorted(conn.execute(select(t.record.c.id)).scalars()) == [pair.record_id, pair.record_id + 1]


def test_erase_needs_no_key_and_a_tombstone_pairs_by_dynamics_id(store: StateStore) -> None:
    subject_everywhere(store)
    keyless = StateStore(store.engine, upgrade=False, privacy=Privacy())
    data_subjects.erase(keyless, "customers", f" {KEY} ", actor="cli")
    assert raw_hits(store.engine, PLANTED) == []
    store.save_base("customers", [BaseRow(GUID, KEY, Base({"number": KEY}))], "r2")
    assert store.load_base("customers", "dynamics", [GUID])[GUID].erp_key == KEY


def test_purge_deletes_what_is_past_retention_and_keeps_the_rest(store: StateStore, tmp_path: Path) -> None:
    now = T0 + timedelta(days=365)
    subject_everywhere(store)  # audit, pending dead letter, parked child: all "now" (the real clock)
    store.audit("r0", "customers", [AuditEntry("C9", "erp", "update", ["limit"])], "old")
    store.dead_letter("customers", "load", "r0", [Failure("C8", "x"), Failure("C7", "y")], now=T0)
    c8 = store.active_dead_letters("customers")[1]
    store.skip_dead_letter(c8.id, "gave up", by="op")
    store.resolve_dead_letters("customers", "load", ["C7"])
    store.start_run("old", "customers", now=T0)
    store.finish_run("old", "customers", "success")
    store.start_run("stuck", "customers", now=T0)
    store.park_children("orders", "r0", [ParkedChild("O1", "customers", "erp", "C9")])
    store.release_children([c.id or 0 for c in store.parked_children("orders")], "r0")
    data_subjects.erase(store, "customers", "C9", actor="dpo")  # an erasure record: kept forever
    events = [
        IncomingEvent("erp_poll", "customers", "CUST_MASTER", k, "Update", k) for k in ("C1", "C2", "C3")
    ]
    store.inbox_add(events[:2], now=T0)
    store.inbox_add(
        [IncomingEvent("erp_poll", "customers", "CUST_MASTER", "C4", "Update", "C4", ignored=True)], now=T0
    )
    store.inbox_add(events[2:])  # recent, and still waiting for a run
    store.inbox_claim("customers", "r0", limit=1, now=T0)
    store.inbox_done("customers", "r0", now=T0)  # C1 done a year ago; C2 still new: kept
    fields = ("limit", "city", "street")
    store.open_reviews("customers", "r0", [ReviewItem("C6", f, 1, 2, 3) for f in fields])
    applied, closed, _ = store.reviews("customers")[-3:]  # the third stays open
    store.decide_review(applied.id, 4, by="op")
    store.mark_reviews_applied([applied.id], "r0")
    store.close_reviews([closed.id], "r0")
    with store.engine.begin() as conn:  # the controlled clock: these rows are a year old
        conn.execute(update(t.audit).where(t.audit.c.record_key != KEY).values(at=T0))
        conn.execute(update(t.dead_letter).where(t.dead_letter.c.status != "pending").values(resolved_at=T0))
        conn.execute(update(t.parked).where(t.parked.c.status == "released").values(released_at=T0))
        conn.execute(update(t.review).values(applied_at=T0, updated_at=T0))
    young = now - timedelta(days=1)
    assert data_subjects.purge(store, Retention(), now=young - timedelta(days=400)) == {
        "audit": 0,
        "dead_letters": 0,
        "parked": 0,
        "runs": 0,
        "reviews": 0,
        "inbox": 0,
    }
    assert data_subjects.purge(store, Retention(), now=now) == {
        "audit": 1,  # C9's update; the erasure row stays, and KEY's row is recent
        "dead_letters": 2,  # skipped and resolved; the pending letter stays
        "parked": 1,
        "runs": 1,  # the finished one; "stuck" is still running
        "reviews": 2,  # applied and closed; the open items stay, however old
        "inbox": 2,  # C1 done and C4 ignored a year ago; C2 and C3 wait for a run
    }
    assert [e.record_id for e in store.inbox_events("customers")] == ["C2", "C3"]
    assert [(r.record_key, r.field) for r in store.reviews("customers")] == [(KEY, "name"), ("C6", "street")]
    assert [a["operation"] for a in store.audit_log("customers")] == ["erase", "update"]
    assert [d.record_key for d in store.active_dead_letters("customers")] == [KEY]
    assert store.run_report("stuck", "customers") is not None and store.run_report("old", "customers") is None
    assert (
        data_subjects.purge(
            store,
            Retention(audit_days=0, dead_letter_days=0, run_days=0, review_days=0, inbox_days=0),
            now=now,
        )
        == {}
    )

    old_file = tmp_path / "staging" / "run_old" / "customers" / "plan" / "b00000.parquet"
    new_file = tmp_path / "staging" / "run_new" / "customers" / "x.parquet"
    for path in (old_file, new_file):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    month_ago = time.time() - 30 * 86400
    os.utime(old_file, (month_ago, month_ago))
    assert data_subjects.purge_staging([tmp_path / "staging"], 14) == {"staging_files": 1}
    assert not (tmp_path / "staging" / "run_old").exists() and new_file.exists()
