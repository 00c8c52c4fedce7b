"""Pipeline parts that need no external system: staging files, connections, plan rendering."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from d365sync.engine import connections as c
from d365sync.engine.pipeline import Plan
from d365sync.engine.stages.context import aware, bucket_of, norm_key
from d365sync.engine.staging import Staging, drop_rows, read_groups, write_groups


def test_staging_round_trips_values_exactly(tmp_path: Path) -> None:
    staging = Staging(tmp_path, "scheduled__2024-01-01T00:00:00+00:00", "customers")
    rows = [
        {
            "key": "C1",
            "row": {"amount": Decimal("10.50"), "at": datetime(2024, 1, 1, tzinfo=UTC), "qty": [1, 2]},
        },
        {"key": None, "row": {}, "deleted": True},
    ]
    name = staging.write("extract/erp/00000.parquet", rows)
    back = staging.read(name)
    assert back == rows and str(back[0]["row"]["amount"]) == "10.50"
    assert ":" not in str(staging.root.relative_to(tmp_path))
    staging.remove()
    assert not staging.root.exists()


def test_a_tagged_read_decodes_only_its_groups_and_keeps_the_written_order(tmp_path: Path) -> None:
    staging = Staging(tmp_path, "r1", "customers")
    rows = [{"key": f"K{i}", "tags": tag} for i, tag in enumerate(["D", "DC", "E", "C", "D", "EC", "DC"])]
    name = staging.write("plan/b00000.parquet", rows, tags=lambda r: r["tags"])
    assert [r["key"] for r in staging.read(name, "D")] == ["K0", "K1", "K4", "K6"]
    assert [r["key"] for r in staging.read(name, "C")] == ["K1", "K3", "K5", "K6"]
    assert staging.read(name) == rows
    with (staging.root / name).open("rb") as handle:
        groups = read_groups(handle)
    assert sorted(k for g in groups for k in g.keys) == sorted(r["key"] for r in rows)  # inspectable
    assert staging.read(staging.write("empty.parquet", [], tags=lambda r: "D"), "D") == []


def test_an_erp_row_is_staged_as_plain_data_and_a_foreign_class_is_refused_by_name(tmp_path: Path) -> None:
    from d365sync.engine.stages.extract import _erp_entry
    from d365sync.erp.reading import Row

    staging = Staging(tmp_path, "r1", "customers")
    entry = _erp_entry("C1", Row({"A": Decimal("1.0")}))
    back = staging.read(staging.write("x.parquet", [entry]))
    assert type(back[0]["row"]) is dict and back[0]["row"] == {"A": Decimal("1.0")}
    name = staging.write("y.parquet", [{"key": "C1", "row": Row({"A": 1})}])
    with pytest.raises(pickle.UnpicklingError, match=r"d365sync\.erp\.reading\.Row"):
        staging.read(name)


def test_a_planted_file_cannot_make_a_reader_run_code(tmp_path: Path) -> None:
    import os

    staging = Staging(tmp_path, "r1", "customers")
    name = staging.write("x.parquet", [{"key": "C1"}])
    with (staging.root / name).open("rb") as handle:
        (group,) = read_groups(handle)
    group.data = pickle.dumps([{"key": os.system}])  # names a global no row holds
    with (staging.root / name).open("wb") as handle:
        write_groups(handle, [group])
    with pytest.raises(pickle.UnpicklingError, match=r"(os|posix)\.system"):
        staging.read(name)


def test_drop_rows_rewrites_only_files_that_lose_a_row(tmp_path: Path) -> None:
    staging = Staging(tmp_path, "r1", "customers")
    rows = [{"key": "C1", "x": 1}, {"key": "C2", "x": 2}, {"key": "C3", "x": 3}]
    name = staging.write("x.parquet", rows, tags=lambda r: "D" if r["x"] % 2 else "C")
    path = staging.root / name
    before = path.stat().st_mtime_ns
    assert drop_rows(path, lambda r: r["key"] == "nobody") == 0 and path.stat().st_mtime_ns == before
    assert drop_rows(path, lambda r: r["key"] == "C3") == 1
    assert staging.read(name) == rows[:2] and staging.read(name, "D") == rows[:1]


def test_buckets_are_stable_and_keys_normalised() -> None:
    assert bucket_of("C000000042", 7) == bucket_of("C000000042", 7)
    assert {bucket_of(f"K{i}", 4) for i in range(100)} == {0, 1, 2, 3}
    assert norm_key("  C1  ") == "C1" and norm_key("   ") is None
    assert aware("2024-01-01T00:00:00Z") == datetime(2024, 1, 1, tzinfo=UTC)
    assert aware(datetime(2024, 1, 1)) == datetime(2024, 1, 1, tzinfo=UTC)


def test_connections_json_and_uri_forms() -> None:
    env = {
        "AIRFLOW_CONN_DYNAMICS_DEFAULT": '{"conn_type": "dynamics", "host": "https://org.crm.dynamics.com", '
        '"login": "app", "password": "pw", "extra": {"tenant_id": "t1", "page_size": "100"}}',
        "AIRFLOW_CONN_ERP_DEFAULT": "erp-odbc://sync:pw@db.example:5432/erp?driver=PostgreSQL+Unicode&chunk_size=500",
        "AIRFLOW_CONN_SYNC_STATE_DEFAULT": "sqlite:////var/lib/state.db",
    }
    dyn = c.dynamics_config(c.from_env("dynamics_default", env))
    assert (dyn.environment_url, dyn.tenant_id, dyn.client_id, dyn.page_size) == (
        "https://org.crm.dynamics.com",
        "t1",
        "app",
        100,
    )
    erp = c.from_env("erp_default", env)
    assert c.erp_conn_str(erp) == (
        "DRIVER={PostgreSQL Unicode};SERVER=db.example;DATABASE=erp;UID=sync;PWD=pw;PORT=5432;"
    )
    assert "pw" not in c.describe(erp)
    assert c.state_url(c.from_env("sync_state_default", env)) == ("sqlite:////var/lib/state.db", None)
    assert c.from_env("missing", env) is None


def test_sandbox_defaults_when_nothing_is_configured() -> None:
    dyn = c.dynamics_config(None)
    assert dyn.environment_url == c.SANDBOX_URL and dyn.authority_host == c.SANDBOX_URL
    assert c.erp_conn_str(None).endswith("var/demo/erp.db;")
    assert c.state_url(None)[0].endswith("var/demo/state.db")


def test_plan_renders_every_section() -> None:
    plan = Plan(
        "customers",
        True,
        {"dynamics": 2, "erp": 1},
        [{"side": "erp", "key": "C2", "reason": "regex: CUST_EMAIL_ID='a***@@'"}],
        [],
        {"dynamics": {"create": 1}, "erp": {"update": 1}},
        [
            {"key": "C1", "side": "dynamics", "op": "create", "fields": ["name"]},
            {"key": "C3", "side": "erp", "op": "update", "fields": ["city"]},
        ],
        [{"key": "I1", "field": "total", "reason": "both changed total; manual_review"}],
        [{"key": "C3", "field": "city", "winner": "dynamics", "reason": "last_write_wins"}],
        [],
        [{"key": "O1", "parent": "customers:C9"}],
    )
    text = plan.render()
    for expected in (
        "DRY RUN",
        "create     C1  name",
        "C3.city: dynamics wins",
        "I1.total",
        "C2",
        "O1 waits for",
    ):
        assert expected in text
