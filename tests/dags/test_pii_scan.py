"""Issue 11 acceptance: after a real sync with personal data and secrets planted, nothing shows them.

One ``dag.test()`` run of ``sync_customers`` (a first, full load) against the Dataverse sandbox and
a SQLite ERP through the real ODBC driver, plus one ``d365sync sync --dry-run`` of the CLI before
it. Planted: e-mails that fail validation (dead-lettered at ``validate``) or the ``email``
transform (dead-lettered at ``transform``), an account name holding a phone, an e-mail and a
password, an over-long phone, an account name that is an HTML/script payload; secrets in the
connections' passwords and extras (and the Dataverse client secret). The customers spec is copied
with ``min_rows: 1`` and ``stop_on_full_load: false``, so the run goes on past the invalid share
and alerts through a webhook on loopback.

Then every place a reader can look is scanned for the planted full e-mails, phones and secrets:
task log files under the test ``AIRFLOW_HOME`` and the runner's own log, XCom in the metadata DB,
the CLI output, the dead-letter ``error`` column of the state store, the alert payloads, and GX
Data Docs built from the same rows and served by the operations UI to a Viewer (with the UI's
dead-letter page for good measure). Secrets on Airflow's own ``_token`` cookie: Airflow sets it,
not the project; Data Docs are served under a ``sandbox`` CSP without scripts (asserted here), so
no script in them can read it.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from d365sync.engine.validation import validate
from d365sync.spec import EntitySpec, load_entities
from tests.dags.conftest import REPO, AirflowEnv, RunResult, assert_success
from tests.dags.sync_env import SyncEnv, connections_env, sqlite_sync_env
from tests.dags.test_alerts import webhook_receiver
from tests.sandbox_fixtures import SandboxFactory
from tests.ui import conftest as ui_conftest

# Airflow's auth manager and real JWTs, as the UI tests use them (session fixtures of tests/ui).
auth_manager = ui_conftest.auth_manager
tokens = ui_conftest.tokens
pytestmark = pytest.mark.filterwarnings(
    r"ignore:module 'sre_(constants|parse)' is deprecated:DeprecationWarning"  # GX 1.x on Python 3.11
)

ERP_PASSWORD = "Erp-Pw-7fq2Xz"
ERP_EXTRA_TOKEN = "erp-extra-tok-93KdQ"
STATE_PASSWORD = "State-Pw-Lm41Vb"
CLIENT_SECRET = "dv-client-secret-Qw8rTz"
DATA_PASSWORD = "Tr0ub4dorZq"
EMAILS = {
    "validate_erp": '"mary quinn"@example.com',  # a space: fails the ERP e-mail expectation
    "transform_quoted": '"q.bert"@example.org',  # passes GX, refused by the email transform
    "transform_domain": "ola.nordmann@exa_mple.com",  # an underscore in the domain: refused too
    "validate_dynamics": '"tom kid"@example.com',
    "in_name": "lena.vogt@example.de",
}
PHONES = {"in_name": "+44 20 7946 0111", "too_long": "+44 (0)20 7946 0222 ext. 999"}
XSS = "<img src=x onerror=alert(document.cookie)>"
NAME = f"Call {PHONES['in_name']} or write to {EMAILS['in_name']}, Password: {DATA_PASSWORD} ({'x' * 20})"
# a personal name (pii: true) past its 60-character rule: shown as a letter and a length only
LONG_NAME = "Margarethe Oberhuber-Wittgenstein Immobilienverwaltung und Beteiligungen"
SECRETS = (ERP_PASSWORD, ERP_EXTRA_TOKEN, STATE_PASSWORD, CLIENT_SECRET, DATA_PASSWORD)
# What must appear nowhere: each full value, and the distinctive parts of it.
LEAKS = (
    *EMAILS.values(),
    "mary quinn",
    "q.bert",
    "ola.nordmann",
    "tom kid",
    "lena.vogt",
    *PHONES.values(),
    "Oberhuber-Wittgenstein",
    "7946 0111",
    "7946 0222",
    *SECRETS,
)


def leaks_in(text: str) -> list[str]:
    return [leak for leak in LEAKS if leak in text]


@dataclass
class Scan:
    env: SyncEnv
    spec: EntitySpec
    entities: Path
    run: RunResult
    cli: subprocess.CompletedProcess[str]
    alerts: list[dict[str, Any]]
    planted: dict[str, str]  # what -> record key


@pytest.fixture(scope="module")
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    with webhook_receiver() as hook:
        yield hook


def _entities(folder: Path) -> Path:
    """The project's entity specs; customers alerts past its invalid share and goes on."""
    shutil.copytree(REPO / "include" / "entities", folder, dirs_exist_ok=True)
    path = folder / "customers.yaml"
    text = path.read_text(encoding="utf-8")
    old = "  invalid_share_threshold: 0.15"
    assert old in text
    path.write_text(
        text.replace(old, f"{old}\n  min_rows: 1\n  stop_on_full_load: false", 1), encoding="utf-8"
    )
    return folder


def _plant(env: SyncEnv) -> dict[str, str]:
    """Personal data and secrets where a user would type them: SQL on the ERP, the Web API on Dynamics."""
    keys = [k for (k,) in _erp_rows(env, 'SELECT "CUST_NO" FROM "CUST_MASTER" ORDER BY "CUST_NO"')]
    accounts = sorted(
        a["accountnumber"] for a in env.dv_rows("accounts", "accountnumber") if a["accountnumber"]
    )
    planted = {
        "validate_erp": keys[0],
        "transform_quoted": keys[1],
        "transform_domain": keys[2],
        "validate_dynamics": accounts[0],
        "in_name": accounts[1],
        "too_long": accounts[2],
        "xss": accounts[3],
        "long_name": accounts[4],
    }
    for what in ("validate_erp", "transform_quoted", "transform_domain"):
        env.erp_update("CUST_MASTER", "CUST_NO", planted[what], CUST_EMAIL_ID=EMAILS[what])
    patches = {
        "validate_dynamics": {"emailaddress1": EMAILS["validate_dynamics"]},
        "in_name": {"name": NAME},
        "too_long": {"telephone1": PHONES["too_long"]},
        "xss": {"address1_country": XSS},  # not personal data: shown, so it must be escaped
        "long_name": {"name": LONG_NAME},
    }
    for what, body in patches.items():
        env.dv("PATCH", f"accounts(accountnumber='{planted[what]}')", body)
    return planted


def _erp_rows(env: SyncEnv, sql: str) -> list[tuple[Any, ...]]:
    database = env.backend.erp_odbc.split("Database=", 1)[1].rstrip(";")
    with sqlite3.connect(database) as db:
        return db.execute(sql).fetchall()


@pytest.fixture(scope="module")
def scan(
    airflow_env: AirflowEnv,
    dataverse_sandbox_factory: SandboxFactory,
    tmp_path_factory: pytest.TempPathFactory,
    webhook: tuple[str, list[dict[str, Any]]],
) -> Iterator[Scan]:
    url, bodies = webhook
    entities = _entities(tmp_path_factory.mktemp("pii-entities"))

    def sandbox(**options: Any) -> Any:
        return dataverse_sandbox_factory(client_secret=CLIENT_SECRET, **options)

    with sqlite_sync_env(
        airflow_env,
        sandbox,
        tmp_path_factory,
        "pii-scan",
        rows=30,
        seed=10,
        D365SYNC_ENTITIES_DIR=str(entities),
        D365SYNC_ALERT_WEBHOOK_URL=url,
    ) as env:
        backend = env.backend
        backend.erp_conn = {
            **backend.erp_conn,
            "password": ERP_PASSWORD,
            "extra": {**backend.erp_conn["extra"], "api_token": ERP_EXTRA_TOKEN},
        }
        backend.state_conn = {**backend.state_conn, "password": STATE_PASSWORD}
        conns = connections_env(env.sandbox, backend)
        env = SyncEnv(env.airflow.with_env(**conns), env.sandbox, backend)
        planted = _plant(env)
        staging = tmp_path_factory.mktemp("pii-cli-staging")
        command = ["sync", "customers", "--dry-run", "--entities", str(entities), "--staging", str(staging)]
        cli = subprocess.run(
            [sys.executable, "-m", "d365sync.cli", *command],
            env={**env.airflow.env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert cli.returncode == 0, cli.stderr[-4000:]
        # dag.test() runs the tasks in the runner's process: their logs are its output (at INFO,
        # to see everything a task logs, its returned value included)
        (run,) = env.run("sync_customers", env={"AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"})
        assert_success([run])
        spec = load_entities(entities)["customers"]
        yield Scan(env, spec, entities, run, cli, bodies, planted)


# ------------------------------------------------------------------------------------ scans
def test_the_run_dead_lettered_the_planted_records_naming_key_field_and_rule(scan: Scan) -> None:
    with scan.env.store() as store:
        letters = {d.record_key: d for d in store.dead_letters("customers")}
    p = scan.planted
    assert letters[p["validate_erp"]].stage == "validate"
    assert "CUST_EMAIL_ID='m***@e***.com'" in letters[p["validate_erp"]].error
    for what in ("transform_quoted", "transform_domain"):
        letter = letters[p[what]]
        assert letter.stage == "transform"
        assert (
            f"record '{p[what]}': field 'email': rule 'email': not a valid e-mail address (value '"
            in letter.error
        )
    assert "o***@e***.com" in letters[p["transform_domain"]].error
    assert f"name='C*** ({len(NAME)} chars)'" in letters[p["in_name"]].error  # pii: a letter and a length
    assert f"name='M*** ({len(LONG_NAME)} chars)'" in letters[p["long_name"]].error
    assert "telephone1='+44 *** *** 99'" in letters[p["too_long"]].error
    planted_in_dynamics = ("validate_dynamics", "in_name", "too_long", "xss", "long_name")
    assert {letters[p[w]].stage for w in planted_in_dynamics} == {"validate"}


def test_dead_letter_errors_hold_no_planted_value(scan: Scan) -> None:
    with scan.env.store() as store:
        errors = [d.error for s in ("pending", "replay") for d in store.dead_letters("customers", status=s)]
    assert errors
    assert [leaks_in(e) for e in errors if leaks_in(e)] == []


def test_task_logs_hold_no_planted_value(scan: Scan) -> None:
    """The task logs of a ``dag.test()`` run are the runner's output; files under ``logs/`` too."""
    logs = [p for p in (scan.env.airflow.home / "logs").rglob("*") if p.is_file()]
    texts = {str(p): p.read_text(encoding="utf-8", errors="replace") for p in logs}
    texts["task logs (runner output)"] = scan.run.log
    assert "Done. Returned value was" in scan.run.log and "invalid share over threshold" in scan.run.log
    assert {name: leaks_in(text) for name, text in texts.items() if leaks_in(text)} == {}


def test_xcom_holds_no_planted_value(scan: Scan) -> None:
    with sqlite3.connect(scan.env.airflow.home / "airflow.db") as db:
        rows = db.execute(
            "SELECT task_id, key, value FROM xcom WHERE dag_id = ? AND run_id = ?",
            ("sync_customers", scan.run.run_id),
        ).fetchall()
    values = {f"{task}/{key}": str(value) for task, key, value in rows}
    assert "validate/return_value" in values and "transform/return_value" in values
    assert "C0" in values["transform/return_value"]  # the samples still name the records
    assert {name: leaks_in(v) for name, v in values.items() if leaks_in(v)} == {}


def test_cli_output_holds_no_planted_value(scan: Scan) -> None:
    out = scan.cli.stdout + scan.cli.stderr
    assert "quarantined rows:" in out and scan.planted["transform_quoted"] in out
    assert leaks_in(out) == []
    assert leaks_in(json.dumps(scan.run.report)) == []


def test_alert_payloads_hold_no_planted_value(scan: Scan) -> None:
    assert scan.alerts, "the invalid share alert was not sent"
    text = json.dumps(scan.alerts)
    assert "invalid rows over the threshold" in text
    assert leaks_in(text) == []


@pytest.fixture(scope="module")
def viewer(
    scan: Scan, tokens: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Path]]:
    """The operations UI over the run's state store and Data Docs built from the planted rows."""
    from d365sync.ui.airflow_api import AirflowApi
    from d365sync.ui.app import create_app
    from d365sync.ui.settings import UiSettings

    docs = tmp_path_factory.mktemp("pii-docs")
    lenient = scan.spec.model_copy(
        update={"validation": scan.spec.validation.model_copy(update={"invalid_share_threshold": 1.0})}
    )
    columns = (
        "accountnumber,name,emailaddress1,telephone1,address1_line1,address1_line2,address1_city,"
        "address1_postalcode,address1_country"
    )
    validate(
        lenient,
        "dynamics",
        scan.env.dv_rows("accounts", columns),
        key_column="accountnumber",
        docs_dir=docs / "dv",
    )
    with scan.env.erp() as erp:
        rows = [r for chunk in erp.iter_rows(scan.spec.erp_table_spec()) for r in chunk]
    validate(lenient, "erp", rows, key_column="CUST_NO", docs_dir=docs / "erp")
    settings = UiSettings(state_url=scan.env.backend.state_url, data_docs_dir=docs)
    app = create_app(settings=settings, airflow_api=AirflowApi("http://127.0.0.1:9"))
    outer = FastAPI()
    outer.mount(ui_conftest.PREFIX, app)
    with TestClient(outer, follow_redirects=False) as client:
        client.cookies.set("_token", tokens["viewer"])
        yield client, docs
    app.state.ctx.close()


def test_data_docs_served_to_a_viewer_hold_no_planted_value_and_run_no_script(
    scan: Scan, viewer: tuple[TestClient, Path]
) -> None:
    client, docs = viewer
    pages = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.html"))
    assert any("validations" in p for p in pages)
    served = ""
    for page in pages:
        response = client.get(f"{ui_conftest.PREFIX}/data-docs/{page}")
        assert response.status_code == 200, (page, response.status_code)
        csp = response.headers["content-security-policy"]
        assert csp.startswith("sandbox") and "allow-scripts" not in csp and "script-src 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        served += response.text
    assert "&lt;img src=x onerror" in served and XSS not in served  # the value is text, not markup
    assert f"C*** ({len(NAME)} chars)" in served  # a pii name: a letter and a length
    assert leaks_in(served) == []


def test_the_dead_letter_page_shows_a_viewer_no_planted_value(
    scan: Scan, viewer: tuple[TestClient, Path]
) -> None:
    client = viewer[0]
    # grouped by cause (the default view), then every row: neither shows a planted value
    grouped = client.get(f"{ui_conftest.PREFIX}/dead-letters?entity=customers").text
    rows = client.get(f"{ui_conftest.PREFIX}/dead-letters?entity=customers&view=rows").text
    assert 'id="group-summary"' in grouped
    assert scan.planted["transform_quoted"] in rows  # the record key is not PII: it is shown
    assert leaks_in(grouped) == [] and leaks_in(rows) == []
