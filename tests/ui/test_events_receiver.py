"""The Dataverse webhook receiver over real HTTP (the app mounted under ``/d365sync``): its key,
what it stores (ids and attribute names, never values), deduplication, the sync's own writes,
refusals, and a state store that is down.

Bodies are Dataverse ``RemoteExecutionContext`` JSON as a webhook delivers it.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from d365sync.engine.inbox import InboxEvent
from d365sync.engine.state import StateStore
from d365sync.sandbox.dataverse.process import DataverseSandbox
from d365sync.ui.app import create_app
from d365sync.ui.settings import UiSettings
from tests.notifications import ACCOUNT, APP_USER, PERSON, STREET, context
from tests.ui.conftest import EMAIL, PHONE, PREFIX

KEY, OLD_KEY = "k3y-" + "a" * 28, "old-" + "b" * 28
URL = f"{PREFIX}/events/dataverse"


@dataclass
class Receiver:
    client: TestClient
    app: FastAPI
    db: Path

    def post(self, body: Any, key: str | None = KEY, via: str = "code", **kwargs: Any) -> Any:
        params = {"code": key} if key is not None and via == "code" else {}
        headers = {"x-d365sync-webhook-key": key} if key is not None and via == "header" else {}
        headers |= kwargs.pop("headers", {})
        content = json.dumps(body) if isinstance(body, (dict, list)) else body
        return self.client.post(URL, params=params, headers=headers, content=content, **kwargs)

    def rows(self) -> list[InboxEvent]:
        """What a separate connection sees: committed rows only."""
        with StateStore.open(f"sqlite:///{self.db}") as store:
            return store.inbox_events(limit=10_000)


@contextmanager
def receiver(tmp_path: Path, **settings: Any) -> Iterator[Receiver]:
    db = tmp_path / "state.db"
    values = {"state_url": f"sqlite:///{db}", "personal_fields": frozenset()} | settings
    app = create_app(settings=UiSettings(**values))
    outer = FastAPI()
    outer.mount(PREFIX, app)
    with TestClient(outer, follow_redirects=False) as client:
        yield Receiver(client, app, db)
    app.state.ctx.close()


@pytest.fixture
def hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """The receiver with two keys (a rotation) and the sync's application user configured."""
    monkeypatch.delenv("AIRFLOW_VAR_D365SYNC_WEBHOOK_KEY", raising=False)
    with receiver(tmp_path, webhook_keys=(KEY, OLD_KEY), app_user_ids=frozenset({APP_USER})) as env:
        yield env


def server_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the server side logged (the test's HTTP client logs its own URLs, ``?code=`` included)."""
    return "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))


def state_bytes(db: Path) -> bytes:
    """The database file with its WAL and shared-memory files: everything SQLite wrote."""
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))


# --- authentication ---------------------------------------------------------------------------


def test_no_key_configured_answers_503_and_never_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_VAR_D365SYNC_WEBHOOK_KEY", raising=False)
    with receiver(tmp_path) as env:
        for key in (None, KEY, ""):
            answer = env.post(context(), key=key)
            assert answer.status_code == 503, answer.text
            assert answer.json() == {"detail": "webhook receiver not configured"}
        assert env.rows() == []


def test_keys_shorter_than_16_characters_do_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_VAR_D365SYNC_WEBHOOK_KEY", raising=False)
    with receiver(tmp_path, webhook_keys=("short",)) as env:
        assert env.post(context(), key="short").status_code == 503


def test_the_key_can_come_from_an_airflow_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_D365SYNC_WEBHOOK_KEY", f"{KEY}, {OLD_KEY}")
    with receiver(tmp_path) as env:
        assert env.post(context(), key=OLD_KEY).status_code == 202
        assert env.post(context(), key="x" * 32).status_code == 401


@pytest.mark.parametrize(
    ("key", "via"),
    [
        (None, "code"),
        ("", "code"),
        ("x" * 32, "code"),
        (KEY[:-1], "code"),
        (KEY + "x", "header"),
        (KEY.upper(), "header"),
    ],
)
def test_wrong_or_missing_key_is_401_stores_nothing_and_logs_no_key(
    hook: Receiver, caplog: pytest.LogCaptureFixture, key: str | None, via: str
) -> None:
    with caplog.at_level(logging.DEBUG):
        answer = hook.post(context(), key=key, via=via)
    assert answer.status_code == 401
    assert answer.json() == {"detail": "invalid or missing webhook key"}
    assert hook.rows() == []
    logged = server_log(caplog)
    assert "webhook call refused" in logged
    for secret in filter(None, (key, KEY, OLD_KEY)):
        assert secret not in logged


@pytest.mark.parametrize("via", ["code", "header"])
@pytest.mark.parametrize("key", [KEY, OLD_KEY])
def test_either_key_by_query_or_header_is_accepted(hook: Receiver, key: str, via: str) -> None:
    answer = hook.post(context(), key=key, via=via)
    assert answer.status_code == 202, answer.text


def test_an_airflow_user_token_does_not_open_the_receiver(hook: Receiver, tokens: dict[str, str]) -> None:
    for role in ("admin", "op"):
        answer = hook.post(context(), key=None, headers={"authorization": f"Bearer {tokens[role]}"})
        assert answer.status_code == 401
        hook.client.cookies.set("_token", tokens[role])
        assert hook.post(context(), key=None).status_code == 401
        hook.client.cookies.clear()
    assert hook.rows() == []


def test_the_webhook_key_opens_nothing_else(hook: Receiver, auth_manager: Any) -> None:
    for path in ("/api/health", "/reviews", "/dead-letters"):
        answer = hook.client.get(PREFIX + path, params={"code": KEY}, headers={"x-d365sync-webhook-key": KEY})
        assert answer.status_code in (401, 303), path
        assert answer.status_code == 401 or answer.headers["location"].startswith("/auth/login")
    answer = hook.client.post(f"{PREFIX}/dead-letters/1/replay", params={"code": KEY})
    assert answer.status_code == 401


def test_the_receiver_needs_no_csrf_token_nor_session(hook: Receiver) -> None:
    hook.client.cookies.clear()
    answer = hook.post(context(), headers={"origin": "https://evil.example"})
    assert answer.status_code == 202  # a key no browser sends on its own is the whole defence


# --- what is stored ---------------------------------------------------------------------------


def test_create_update_delete_are_stored_with_attribute_names_only(hook: Receiver) -> None:
    sent = [context("Create"), context("Update"), context("Delete")]
    for body in sent:
        answer = hook.post(body)
        assert answer.status_code == 202, answer.text
        assert answer.json() == {
            "accepted": True,
            "duplicate": False,
            "added": 1,
            "ignored": 0,
            "entities": ["customers"],
        }
        assert hook.rows()[-1].message == body["MessageName"]  # committed before the answer
    rows = hook.rows()
    assert [(r.source, r.entity, r.table_name, r.message, r.status) for r in rows] == [
        ("dataverse_webhook", "customers", "account", m, "new") for m in ("Create", "Update", "Delete")
    ]
    names = ("address1_line1", "emailaddress1", "telephone1")
    assert [r.attributes for r in rows] == [names, names, ()]
    assert {r.record_id for r in rows} == {ACCOUNT.lower()}
    assert {(r.user_id, r.depth) for r in rows} == {(PERSON, 1)}
    assert [r.correlation_id for r in rows] == [b["CorrelationId"] for b in sent]
    assert {r.operation_created_on.isoformat() for r in rows if r.operation_created_on} == {
        "2017-09-26T07:04:08+00:00"  # /Date(ms)/ is UTC; the -0700 only says how it was shown
    }
    hook.app.state.ctx.close()  # checkpoint nothing away: the WAL is read as well
    raw = state_bytes(hook.db)
    assert ACCOUNT.lower().encode() in raw and b"emailaddress1" in raw  # the right bytes were read
    for value in (EMAIL, PHONE, STREET, "jane.doe", "7946 0958"):
        assert value.encode() not in raw, value


def test_a_table_two_entities_sync_gives_a_row_for_each(hook: Receiver) -> None:
    answer = hook.post(context(table="product"))
    assert answer.json()["entities"] == ["inventory", "products"]
    assert sorted(r.entity for r in hook.rows()) == ["inventory", "products"]


def test_a_redelivery_is_a_duplicate_and_adds_nothing(hook: Receiver) -> None:
    body = context()
    assert hook.post(body).status_code == 202
    again = hook.post(body, key=OLD_KEY, via="header")
    assert (again.status_code, again.json()) == (200, {"accepted": True, "duplicate": True})
    assert len(hook.rows()) == 1
    assert hook.post(context()).status_code == 202  # another operation on the same record: a row
    assert len(hook.rows()) == 2


@pytest.mark.parametrize("operation", [None, "00000000-0000-0000-0000-000000000000"])
def test_without_an_operation_id_the_body_is_the_dedupe_key(hook: Receiver, operation: str | None) -> None:
    body = json.dumps(context(OperationId=operation))
    assert hook.post(body).status_code == 202
    assert hook.post(body).json() == {"accepted": True, "duplicate": True}
    assert hook.post(json.dumps(context(OperationId=operation))).status_code == 202  # a new change
    rows = hook.rows()
    assert len(rows) == 2 and all(r.dedupe_key.startswith("sha256:") for r in rows)


@pytest.mark.parametrize("who", ["UserId", "InitiatingUserId"])
def test_the_syncs_own_writes_are_stored_ignored(hook: Receiver, who: str) -> None:
    answer = hook.post(context(**{who: "{" + APP_USER.upper() + "}"}))
    assert answer.status_code == 202
    assert answer.json() == {
        "accepted": True,
        "duplicate": False,
        "added": 0,
        "ignored": 1,
        "entities": ["customers"],
    }
    (row,) = hook.rows()
    assert row.status == "ignored"
    with StateStore.open(f"sqlite:///{hook.db}") as store:
        assert store.inbox_head() == 0  # starts no run
        assert store.inbox_claim("customers", "r1") == []


def test_a_table_no_entity_syncs_is_accepted_and_not_stored(
    hook: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            answer = hook.post(context(table="contact"))
            assert answer.status_code == 202
            assert answer.json()["reason"] == "no entity syncs table contact"
    assert hook.rows() == []
    assert server_log(caplog).count("no entity syncs table contact") == 1  # said once, not per delivery


def test_other_messages_are_accepted_and_not_stored(hook: Receiver) -> None:
    answer = hook.post(context("Assign"))
    assert answer.status_code == 202
    assert answer.json()["reason"] == "message Assign does not start a sync (Create, Update, Delete)"
    assert hook.rows() == []


def test_a_context_without_target_attributes_stores_them_as_unknown(hook: Receiver) -> None:
    body = context()
    del body["InputParameters"]  # what Dataverse sends past 256 KB (x-ms-dynamics-msg-size-exceeded)
    answer = hook.post(body, headers={"x-ms-dynamics-msg-size-exceeded": "true"})
    assert answer.status_code == 202
    assert hook.rows()[0].attributes is None


# --- refusals ---------------------------------------------------------------------------------


def test_a_body_over_one_megabyte_is_413(hook: Receiver) -> None:
    big = json.dumps(context(Padding="x" * (1024 * 1024))).encode()
    assert hook.post(big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the stream itself is capped
        for _ in range(20):
            yield b" " * 65536
        yield json.dumps(context()).encode()

    assert hook.post(chunks()).status_code == 413
    assert hook.post(big, key="x" * 32).status_code == 401  # the key is checked before the body
    assert hook.rows() == []
    fits = json.dumps(context(Padding="x" * 600_000)).encode()  # over Dataverse's 256 KB, under ours
    assert hook.post(fits).status_code == 202


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "the body is not JSON"),
        (b"\xff\xfe", "the body is not JSON"),
        (b"[]", "the body is not a JSON object"),
        (context(MessageName=None), "MessageName is missing"),
        (context(PrimaryEntityName=""), "PrimaryEntityName is missing"),
        (context(PrimaryEntityName=EMAIL), "PrimaryEntityName is not a name"),
        (context(PrimaryEntityId=None), "PrimaryEntityId is missing"),
        (context(PrimaryEntityId=EMAIL), "PrimaryEntityId is not a GUID"),
        (context(UserId=PHONE), "UserId is not a GUID"),
        (context(Depth="1"), "Depth is not a small whole number"),
        (context(OperationCreatedOn=EMAIL), "OperationCreatedOn is not a"),
        (context(InputParameters={"Target": 1}), "InputParameters is not a list"),
        (
            context(InputParameters=[{"key": "Target", "value": {"Attributes": [{"value": EMAIL}]}}]),
            "Attributes holds a pair without a valid key",
        ),
    ],
)
def test_a_malformed_notification_is_400_with_a_reason_and_no_value(
    hook: Receiver, caplog: pytest.LogCaptureFixture, body: Any, reason: str
) -> None:
    with caplog.at_level(logging.DEBUG):
        answer = hook.post(body)
    assert answer.status_code == 400
    assert reason in answer.json()["detail"]
    for value in (EMAIL, PHONE):
        assert value not in answer.text and value not in server_log(caplog)
    assert hook.rows() == []


def test_an_unreachable_state_store_is_503_so_dataverse_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/test?connect_timeout=2"
    monkeypatch.delenv("AIRFLOW_VAR_D365SYNC_WEBHOOK_KEY", raising=False)
    with receiver(tmp_path, state_url=url, webhook_keys=(KEY,), app_user_ids=frozenset()) as env:
        answer = env.post(context())
        assert answer.status_code == 503
        assert answer.json() == {"detail": "state store unavailable; retry"}


def test_a_failing_write_is_503_and_the_next_delivery_is_stored(hook: Receiver) -> None:
    store = hook.app.state.ctx.store
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE sync_inbox RENAME TO sync_inbox_away"))
    body = context()
    assert hook.post(body).status_code == 503
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE sync_inbox_away RENAME TO sync_inbox"))
    assert hook.post(body).status_code == 202  # Dataverse's retry: stored, not a duplicate
    assert len(hook.rows()) == 1


# --- the sync's application user from WhoAmI --------------------------------------------------


def _dynamics_conn(
    monkeypatch: pytest.MonkeyPatch, base_url: str, tenant: str, client_id: str, secret: str
) -> None:
    conn = {
        "conn_type": "dynamics",
        "host": base_url,
        "login": client_id,
        "password": secret,
        "extra": {"tenant_id": tenant, "authority_host": base_url},
    }
    monkeypatch.setenv("AIRFLOW_CONN_WEBHOOK_DYNAMICS", json.dumps(conn))


def test_the_app_user_comes_from_whoami_when_not_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataverse_sandbox: DataverseSandbox
) -> None:
    sandbox = dataverse_sandbox
    who = requests.get(f"{sandbox.api_url}/WhoAmI", headers=sandbox.headers(), timeout=10).json()["UserId"]
    _dynamics_conn(
        monkeypatch, str(sandbox.base_url), sandbox.tenant, sandbox.client_id, sandbox.client_secret
    )
    with receiver(tmp_path, webhook_keys=(KEY,), dynamics_conn_id="webhook_dynamics") as env:
        assert env.post(context(UserId=who)).json()["ignored"] == 1
        assert env.post(context()).json()["added"] == 1  # a person's change
    assert [r.status for r in env.rows()] == ["ignored", "new"]


def test_whoami_unreachable_stores_new_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{probe.getsockname()[1]}"
    _dynamics_conn(monkeypatch, base, "t", "11111111-2222-3333-4444-555555555555", "s3cret-value")
    settings = {"webhook_keys": (KEY,), "dynamics_conn_id": "webhook_dynamics"}
    with caplog.at_level(logging.WARNING, "d365sync.ui.events"), receiver(tmp_path, **settings) as env:
        for _ in range(3):
            assert env.post(context(UserId=APP_USER)).json()["added"] == 1
    assert [r.status for r in env.rows()] == ["new"] * 3  # the engine's echo guard still applies
    assert server_log(caplog).count("application user is unknown") == 1
    assert "s3cret-value" not in server_log(caplog)


def test_unreadable_entity_files_are_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "entities"
    broken.mkdir()
    (broken / "customers.yaml").write_text("key: [unclosed\n")
    monkeypatch.setenv("D365SYNC_ENTITIES_DIR", str(broken))
    with receiver(tmp_path, webhook_keys=(KEY,), app_user_ids=frozenset()) as env:
        answer = env.post(context())
        assert (answer.status_code, answer.json()) == (503, {"detail": "entity files unreadable; retry"})
        assert env.rows() == []


def test_a_file_still_being_written_holds_back_only_tables_no_loaded_entity_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scaffold with ``owner: TODO`` beside the shipped files: account changes are still taken in
    (customers loads), while a contact change, which that file may be about, gets 503 and is sent
    again; once the file is gone (or loads), the receiver reads the files again."""
    import shutil

    entities = tmp_path / "entities"
    shutil.copytree(Path(__file__).resolve().parents[2] / "include" / "entities", entities)
    draft = (entities / "customers.yaml").read_text().replace("table: account", "table: contact", 1)
    (entities / "contacts.yaml").write_text(draft.replace("owner: dynamics", "owner: TODO", 1))
    monkeypatch.setenv("D365SYNC_ENTITIES_DIR", str(entities))
    with receiver(tmp_path, webhook_keys=(KEY,), app_user_ids=frozenset()) as env:
        assert env.post(context(UserId=PERSON)).json()["added"] == 1
        assert env.post(context(table="contact", UserId=PERSON)).status_code == 503
        (entities / "contacts.yaml").unlink()  # the draft dropped: no entity syncs contact
        answer = env.post(context(table="contact", UserId=PERSON))
        assert answer.status_code == 202 and answer.json()["added"] == 0
    assert [r.entity for r in env.rows()] == ["customers"]
