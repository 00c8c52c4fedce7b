"""End-to-end entity runs against the real parts: the Dataverse sandbox over HTTP, the SQLite ERP
through the SQLite3 ODBC driver (seeded by the ERP seeder) and the state store on SQLite.

Acceptance of issue 4: all five entities go through extract → load → commit; then a concurrent
address edit, an invoice amount changed on both sides, a deleted customer and an order whose
customer arrives one run later; then a run that writes nothing. A crash between load and
commit followed by a rerun; a dry run that writes nothing anywhere; watermarks unchanged after
a failed run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from d365sync.engine import pipeline
from d365sync.engine.migrations import schema as t
from d365sync.engine.stages import RunValidationFailed
from tests.integration.pipeline_env import ORDER, Env, running_env
from tests.sandbox_fixtures import SandboxFactory

# GX 1.24.1 imports the deprecated sre_constants/sre_parse modules on Python 3.11 (as in
# tests/unit/test_validation.py): only those two import-time messages are ignored.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"
)


@pytest.fixture
def env(dataverse_sandbox_factory: SandboxFactory, tmp_path: Path) -> Iterator[Env]:
    with running_env(dataverse_sandbox_factory, tmp_path, seed=30) as environment:
        yield environment


def _account(env: Env, number: str) -> dict[str, Any] | None:
    rows = env.dynamics_rows(
        "accounts",
        ["accountid", "accountnumber", "address1_line1", "name", "statecode"],
        f"accountnumber eq '{number}'",
    )
    assert len(rows) <= 1, f"duplicate account {number}"
    return rows[0] if rows else None


def _upsert(env: Env, entity_set: str, logical: str, key: str, record: dict[str, Any]) -> None:
    outcome = env.dynamics.upsert_many(entity_set, key, [record], logical_name=logical)
    assert outcome[0].ok, outcome


def _state_counts(env: Env) -> dict[str, int]:
    tables = (t.record, t.watermark, t.watermark_pending, t.review, t.dead_letter, t.parked, t.audit, t.run)
    with env.store.engine.connect() as conn:
        return {
            table.name: conn.execute(select(func.count()).select_from(table)).scalar_one() for table in tables
        }


def _no_failures(results: dict[str, pipeline.RunResult]) -> None:
    for name, result in results.items():
        assert all(m["failed"] == 0 for m in result.manifests["load"].values()), name


def _synced_invoice(env: Env) -> str:
    for chunk in env.store.iter_base("invoices"):
        for stored in chunk:
            if stored.status == "synced" and stored.dynamics_id:
                return str(stored.erp_key)
    raise AssertionError("no invoice was synced")


def test_five_entities_then_edits_on_both_sides_then_a_run_that_writes_nothing(env: Env) -> None:
    # run 1: the initial sync of all five entities
    _no_failures(env.run_all())
    erp_customers = env.erp_rows("SELECT COUNT(*) FROM CUST_MASTER")[0][0]
    assert erp_customers == 40 + 30  # the ERP's own 40 plus the sandbox's 30 accounts
    assert _account(env, "C000000002") is not None and env.erp_rows(
        "SELECT COUNT(*) FROM CUST_MASTER WHERE CUST_NO = 'ACC-000003'"
    ) == [(1,)]
    assert env.erp_rows("SELECT COUNT(*) FROM SO_HEADER WHERE SO_NO LIKE 'ORD-%'") == [(6,)]

    # edits on both sides
    env.erp.execute(["UPDATE CUST_MASTER SET ADDR_LINE1 = '1 ERP Road' WHERE CUST_NO = 'ACC-000003'"])
    _upsert(
        env,
        "accounts",
        "account",
        "accountnumber",
        {"accountnumber": "ACC-000003", "address1_line1": "2 Dynamics Way"},
    )
    invoice = _synced_invoice(env)
    env.erp.execute([f"UPDATE INV_HEADER SET GROSS_AMOUNT = GROSS_AMOUNT + 10 WHERE INV_NO = '{invoice}'"])
    _upsert(env, "invoices", "invoice", "invoicenumber", {"invoicenumber": invoice, "totalamount": 1.23})
    gone = _account(env, "ACC-000005")
    assert gone is not None
    env.dynamics.delete("accounts", gone["accountid"])
    _upsert(
        env,
        "accounts",
        "account",
        "accountnumber",
        {"accountnumber": "NEW-000001", "name": "Late Parent", "emailaddress1": "late@@parent"},
    )
    parent = _account(env, "NEW-000001")
    assert parent is not None
    bind = {"customerid_account@odata.bind": f"/accounts({parent['accountid']})"}
    order = {"ordernumber": "ORD-LATE01", "name": "late", "totalamount": 119.0, "totaltax": 19.0, **bind}
    _upsert(env, "salesorders", "salesorder", "ordernumber", order)

    # run 2
    results = env.run_all()
    _no_failures(results)
    assert _account(env, "ACC-000003")["address1_line1"] == "2 Dynamics Way"  # type: ignore[index]
    assert env.erp_rows("SELECT ADDR_LINE1 FROM CUST_MASTER WHERE CUST_NO = 'ACC-000003'") == [
        ("2 Dynamics Way",)
    ]
    resolved = results["customers"].plan.resolved
    assert any(
        r["key"] == "ACC-000003" and r["field"] == "address_line1" and r["winner"] == "dynamics"
        for r in resolved
    )
    reviews = env.store.reviews("invoices")
    assert [(r.record_key, r.field) for r in reviews] == [(invoice, "total")]
    changed = reviews[0].changed or {}
    assert set(changed) == {"dynamics", "erp"}, "the queue says when each side changed the total"
    (row,) = env.dynamics_rows("invoices", ["modifiedon"], f"invoicenumber eq '{invoice}'")
    dv_modified = row["modifiedon"]
    assert changed["dynamics"] == datetime.fromisoformat(dv_modified.replace("Z", "+00:00"))
    assert env.erp_rows("SELECT STATUS FROM CUST_MASTER WHERE CUST_NO = 'ACC-000005'") == [("I",)]
    assert [c.record_key for c in env.store.parked_children("orders")] == ["ORD-LATE01"]
    assert env.erp_rows("SELECT COUNT(*) FROM SO_HEADER WHERE SO_NO = 'ORD-LATE01'") == [(0,)]
    assert any(q["key"] == "NEW-000001" for q in results["customers"].plan.quarantined)

    # the parent is fixed in Dynamics; run 3 syncs it and then releases the parked order
    _upsert(
        env,
        "accounts",
        "account",
        "accountnumber",
        {"accountnumber": "NEW-000001", "emailaddress1": "late@parent.example"},
    )
    _no_failures(env.run_all())
    assert env.erp_rows("SELECT CUST_NO FROM SO_HEADER WHERE SO_NO = 'ORD-LATE01'") == [("NEW-000001",)]
    assert env.store.parked_children("orders") == []

    # run 4 writes nothing: no write request, no ERP row version moved, no audit entry
    env.sandbox.reset_counters()
    before, audit_before = env.erp_fingerprint(), len(env.store.audit_log(limit=100_000))
    results = env.run_all()
    assert {n: r.plan.writes for n, r in results.items()} == {n: {"dynamics": {}, "erp": {}} for n in ORDER}
    assert env.write_requests() == 0
    assert env.erp_fingerprint() == before
    assert len(env.store.audit_log(limit=100_000)) == audit_before
    assert [(r.record_key, r.field) for r in env.store.reviews("invoices")] == [(invoice, "total")]


def test_crash_between_load_and_commit_then_rerun_loses_nothing_and_duplicates_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_failures(env.run_all(("customers",)))
    env.erp.execute(
        [
            "INSERT INTO CUST_MASTER (CUST_NO, CUST_NAME, CUST_EMAIL_ID, CURR_CODE, STATUS, LAST_UPD, "
            "ROW_VER) VALUES ('C000000777', 'Crash Test Ltd', 'crash@example.com', 'EURO', 'A', "
            "strftime('%Y-%m-%d %H:%M:%S','now') || '.000', 1)"
        ]
    )
    _upsert(
        env,
        "accounts",
        "account",
        "accountnumber",
        {"accountnumber": "ACC-000002", "name": "Renamed In Dynamics"},
    )
    mark_before = {s: env.store.watermark("customers", s) for s in ("dynamics", "erp")}
    counts_before = (
        env.erp_rows("SELECT COUNT(*) FROM CUST_MASTER")[0][0],
        len(env.dynamics_rows("accounts", ["accountid"])),
    )

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated crash between load and commit")

    monkeypatch.setattr(pipeline, "commit", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        env.run("customers", run_id="crashing")
    assert {s: env.store.watermark("customers", s) for s in ("dynamics", "erp")} == mark_before
    assert env.store.run_report("crashing", "customers").status == "failed"  # type: ignore[union-attr]
    assert _account(env, "C000000777") is not None  # the load did happen before the crash

    monkeypatch.undo()
    _no_failures({"customers": env.run("customers")})
    assert env.erp_rows("SELECT COUNT(*) FROM CUST_MASTER")[0][0] == counts_before[0]
    assert len(env.dynamics_rows("accounts", ["accountid"])) == counts_before[1] + 1
    assert _account(env, "C000000777")["name"] == "Crash Test Ltd"  # type: ignore[index]
    assert env.erp_rows("SELECT CUST_NAME FROM CUST_MASTER WHERE CUST_NO = 'ACC-000002'") == [
        ("Renamed In Dynamics",)
    ]
    assert env.run("customers").plan.writes == {"dynamics": {}, "erp": {}}


def test_dry_run_plans_everything_and_writes_nothing(env: Env) -> None:
    state, erp, accounts = (
        _state_counts(env),
        env.erp_fingerprint(),
        len(env.dynamics_rows("accounts", ["accountid"])),
    )
    env.sandbox.reset_counters()
    results = env.run_all(dry_run=True)
    plan = results["customers"].plan
    assert plan.writes["erp"] == {"create": 30} and plan.writes["dynamics"]["create"] > 20
    text = plan.render()
    assert "DRY RUN" in text and "create" in text and "ACC-000000" in text
    assert results["invoices"].plan.parked  # customers are not synced in a dry run: invoices wait
    assert _state_counts(env) == state
    assert env.erp_fingerprint() == erp
    assert len(env.dynamics_rows("accounts", ["accountid"])) == accounts
    assert env.write_requests() == 0


def test_a_failed_run_leaves_watermarks_where_they_were(env: Env) -> None:
    _no_failures(env.run_all(("customers",)))
    spec = env.specs["customers"]
    env.specs["customers"] = spec.model_copy(
        update={"validation": spec.validation.model_copy(update={"min_rows": 10})}
    )
    env.store.reset_watermark("customers", "erp")  # an operator's full re-read: a full load again
    marks = {s: env.store.watermark("customers", s) for s in ("dynamics", "erp")}
    env.erp.execute(["UPDATE CUST_MASTER SET CUST_EMAIL_ID = 'broken@@mail' WHERE CUST_NO LIKE 'C%'"])
    with pytest.raises(RunValidationFailed, match=r"customers/erp.*stopped: full load"):
        env.run("customers", run_id="invalid")
    assert {s: env.store.watermark("customers", s) for s in ("dynamics", "erp")} == marks
    assert env.store.run_report("invalid", "customers").status == "failed"  # type: ignore[union-attr]
    quarantined = [d for d in env.store.dead_letters("customers") if d.stage == "validate"]
    assert len(quarantined) == 40  # quarantined with the reason, not lost
    assert all("CUST_EMAIL_ID" in d.error and "broken" not in d.error for d in quarantined)  # masked


def test_a_run_builds_data_docs_per_entity_and_side_with_masked_values(env: Env, tmp_path: Path) -> None:
    (key,) = env.erp_rows("SELECT MIN(CUST_NO) FROM CUST_MASTER")[0]
    env.erp.execute([f"UPDATE CUST_MASTER SET CUST_EMAIL_ID = 'ann.smith@@mail' WHERE CUST_NO = '{key}'"])
    docs = tmp_path / "data-docs"
    _no_failures({"customers": env.run("customers", data_docs_dir=str(docs))})
    assert [
        d.record_key.strip() for d in env.store.dead_letters("customers") if "CUST_EMAIL_ID" in d.error
    ] == [key.strip()]
    sites = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("index.html"))
    assert sites == ["customers/dynamics/index.html", "customers/erp/index.html"]
    pages = [p.read_text(encoding="utf-8") for p in (docs / "customers" / "erp").rglob("*.html")]
    assert any("CUST_EMAIL_ID" in page for page in pages), "the failing rule is in the docs"
    assert not any("ann.smith" in page for page in pages), "its value is masked"
    assert not list((tmp_path / "dry").glob("*"))
    env.run("customers", dry_run=True, data_docs_dir=str(tmp_path / "dry"))
    assert not (tmp_path / "dry").exists(), "a dry run writes nothing, Data Docs included"


def test_long_stages_log_and_store_their_progress(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, "d365sync.progress")
    result = env.run("customers", run_id="progress", chunk_size=7, progress_every=0)
    _no_failures({"customers": result})
    lines = caplog.messages
    assert any(re.fullmatch(r"extract_erp: \d[\d,]* rows, [\d,]+ rows/s", m) for m in lines), lines
    load = [m for m in lines if m.startswith("load_dynamics: ")]
    assert load and re.fullmatch(
        r"load_dynamics: [\d,]+/[\d,]+ \(100%\) rows, [\d,]+ rows/s, ETA 0 s \(done\)", load[-1]
    )
    report = env.store.run_report("progress", "customers")
    assert report is not None and report.progress is not None and report.progress["final"] is True


def test_one_process_run_plans_what_the_stage_by_stage_tasks_plan_without_their_files(
    dataverse_sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """``run_entity`` streams a whole-table ERP read into validation and validation into the
    transform (no ``extract/erp`` or ``valid/`` files); the Airflow tasks pass files. Both must
    plan the same records, quarantine the same rows with the same reasons and hold the same keys."""
    from d365sync.engine.pipeline import Plan
    from d365sync.engine.stages import RunContext, extract, resolve, transform, validate

    sandbox = dataverse_sandbox_factory(seed=40)
    rates = {"invalid_email": 0.05, "blank_name": 0.05, "trailing_spaces": 0.1, "unknown_currency": 0.03}
    env = Env.create(sandbox, tmp_path, rows=300, **rates)
    try:
        spec = env.specs["customers"]
        streamed = env.run("customers", dry_run=True, keep_staging=True, chunk_size=40, run_id="streamed")
        unkept = env.run("customers", dry_run=True, chunk_size=40, run_id="unkept")
        assert streamed.manifests["resolve"]["files"] and unkept.manifests["resolve"]["files"] == []
        assert unkept.plan.writes == streamed.plan.writes  # no plan files to read: none written
        folders = {
            p.relative_to(env.staging / "streamed" / "customers").parts[0]
            for p in (env.staging / "streamed" / "customers").rglob("*.parquet")
        }
        assert (
            "valid" not in folders
            and not (env.staging / "streamed" / "customers" / "extract" / "erp").exists()
        )

        ctx = RunContext(
            spec, env.dynamics, env.erp, env.store, env.staging, run_id="tasks", dry_run=True, chunk_size=40
        )
        m: dict[str, Any] = {"extract": {s: extract(ctx, s) for s in ("dynamics", "erp")}}
        assert m["extract"]["erp"]["files"]  # the task path does write them
        m["validate"] = validate(ctx, m["extract"])
        m["transform"] = transform(ctx, m["validate"])
        m["resolve"] = resolve(ctx, m["transform"])
        tasks = Plan.of(ctx, m)
    finally:
        env.close()
        sandbox.stop()

    plan = streamed.plan
    assert plan.totals["quarantined"] > 10 and plan.writes["dynamics"]["create"] > 200
    assert (plan.extracted, plan.writes, plan.totals) == (tasks.extracted, tasks.writes, tasks.totals)
    assert _reasons(plan) == _reasons(tasks)
    assert set(streamed.timings) >= {"extract_erp", "validate", "transform", "resolve"}


def test_resolve_goes_on_while_dataverse_is_slow_on_one_file(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Dynamics load holds plan files beyond the two it writes: while the first file's
    writes hang, resolve hands over two more than the writers take before it waits for the
    first (issue 14). Everything still arrives, once."""
    import importlib
    import threading

    load = importlib.import_module("d365sync.engine.stages.load")  # the package exports load()
    handed: list[str] = []
    waited: list[bool] = []
    released_by_resolve = threading.Event()
    real_write, real_add = load._write_file, load.Loading.add

    def write(ctx: Any, side: Any, fresh: Any, todo: Any, checking: Any) -> Any:
        if side == "dynamics" and todo.name == handed[0]:
            # the first file's requests are slow: until resolve handed over four files, or
            # for 10 s if resolve waits for this file first
            waited.append(released_by_resolve.wait(timeout=10))
        return real_write(ctx, side, fresh, todo, checking)

    def add(self: Any, name: str, entries: Any = None) -> None:
        if self.side == "dynamics":
            handed.append(name)
            if len(handed) == 4:  # two being written, two waiting, and resolve went on
                released_by_resolve.set()
        real_add(self, name, entries)

    monkeypatch.setattr(load, "_write_file", write)
    monkeypatch.setattr(load.Loading, "add", add)
    result = env.run("customers", chunk_size=5)
    monkeypatch.undo()

    assert len(handed) >= 4 and waited == [True]  # resolve went on, and did not wait it out
    _no_failures({"customers": result})
    numbers = [row["accountnumber"] for row in env.dynamics_rows("accounts", ["accountnumber"])]
    assert len(numbers) == len(set(numbers)) >= result.plan.writes["dynamics"]["create"] > 20


def _reasons(plan: Any) -> list[tuple[str, str, str]]:
    return sorted((q["side"], q["key"], q["reason"]) for q in plan.quarantined + plan.transform_errors)


def test_loads_take_each_bucket_while_resolve_merges_the_next(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_entity`` hands each merged bucket to both loads at once: the first plan file goes to
    Dataverse before the last bucket is merged, and the plan files keep only what commit reads
    back (the loads got their entries in memory). Everything still arrives, once."""
    from d365sync.engine.stages.load import Loading
    from d365sync.engine.stages.resolve import plan_tags
    from d365sync.engine.staging import Staging

    events: list[tuple[str, str]] = []
    kept: list[dict[str, Any]] = []
    real_write, real_add = Staging.write, Loading.add

    def write(self: Staging, name: str, rows: Any, tags: Any = None) -> str:
        if name.startswith("plan/"):
            rows = list(rows)
            kept.extend(rows)
            events.append(("planned", name))
        return real_write(self, name, rows, tags)

    def add(self: Loading, name: str, entries: Any = None) -> None:
        assert entries, "a one-process run hands the loads their entries"
        events.append((f"load_{self.side}", name))
        real_add(self, name, entries)

    monkeypatch.setattr(Staging, "write", write)
    monkeypatch.setattr(Loading, "add", add)
    result = env.run("customers", chunk_size=7)
    monkeypatch.undo()

    planned = [name for kind, name in events if kind == "planned"]
    first_load = next(i for i, (kind, _) in enumerate(events) if kind == "load_dynamics")
    last_plan = max(i for i, (kind, _) in enumerate(events) if kind == "planned")
    assert len(planned) > 3 and first_load < last_plan  # loading began while resolve went on
    assert [n for k, n in events if k == "load_dynamics"] == planned  # every bucket, in order
    assert all("C" in plan_tags(e) for e in kept)  # only what commit reads was written

    _no_failures({"customers": result})
    created = result.plan.writes["dynamics"]["create"]
    assert created > 20
    assert {s: m["counts"] for s, m in result.manifests["load"].items()} == result.plan.writes
    accounts = env.dynamics_rows("accounts", ["accountnumber"])
    numbers = [row["accountnumber"] for row in accounts]
    assert len(numbers) == len(set(numbers)) >= created  # no duplicates
    stored = env.store.load_base("customers", "erp", numbers)
    assert sum(1 for s in stored.values() if s.status == "synced" and s.dynamics_id) >= created
    again = env.run("customers")
    assert again.plan.writes == {"dynamics": {}, "erp": {}}
