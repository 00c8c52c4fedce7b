"""Alerts through a real webhook receiver (http.server on loopback) and a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from d365sync.airflow import alerts, settings

SECRET_ERROR = (
    "ODBC failed: DRIVER={SQLite3};UID=erp;PWD=hunter2; customer anna.muller@example.com "
    "phone +49 30 1234567 at https://user:pw@org.crm.dynamics.com/api?sig=abc Bearer eyJabc.def"
)
LEAKS = ("hunter2", "anna.muller", "1234567", "user:pw", "eyJabc", "sig=abc")


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.server.bodies.append(json.loads(self.rfile.read(length)))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"1")

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A JSON webhook on loopback: its URL, and the bodies it received."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", server.bodies  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    with webhook_receiver() as hook:
        yield hook


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture
def smtp(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Mailbox]:
    from aiosmtpd.controller import Controller

    mailbox = _Mailbox()
    with socket.socket() as probe:  # aiosmtpd's readiness check cannot use port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    conn = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": port,
        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@example.org"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_ALERT_SMTP", json.dumps(conn))
    yield mailbox
    controller.stop()


def _failure_context() -> dict[str, Any]:
    ti = SimpleNamespace(dag_id="sync_customers", task_id="load_erp", try_number=2, run_id="manual__1")
    return {"ti": ti, "dag_run": SimpleNamespace(run_id="manual__1"), "exception": RuntimeError(SECRET_ERROR)}


def _channels(**kw: Any) -> settings.AlertChannels:
    base = {
        "webhook_url": None,
        "webhook_format": "generic",
        "smtp_conn_id": None,
        "email_to": (),
        "email_from": None,
    }
    return settings.AlertChannels(**{**base, **kw})


def test_redaction_drops_secrets_and_personal_data() -> None:
    text = alerts.redact(SECRET_ERROR)
    assert not [leak for leak in LEAKS if leak in text], text
    assert "ODBC failed" in text and len(alerts.redact("x" * 1000)) == alerts.MAX_ERROR_CHARS


@pytest.mark.parametrize(
    ("message", "secret"),
    [
        ("storage: DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFy==;", "Zm9vYmFy"),
        ("bus: Endpoint=sb://ns/;SharedAccessKeyName=root;SharedAccessKey=abc123def=", "abc123def"),
        ("ODBC: SERVER=db;UID=erp;PWD={hun;ter2}}x};", "ter2"),
        ("login refused for erp, Password: S3cret-Pw", "S3cret-Pw"),
        ("config password=S3cret-Pw, retrying", "S3cret-Pw"),
        ('AADSTS7000215: {"client_secret": "cs-Abc123"}', "cs-Abc123"),
        ("refresh token=t0k-Abc123 expired", "t0k-Abc123"),
        ("cannot reach admin:S3cret-Pw@db.internal", "S3cret-Pw"),
        ('customer "john doe"@example.com rejected', "john doe"),
        ("customer 'a b'@x.org rejected", "'a b'@x.org"),
    ],
)
def test_redaction_drops_credential_fragments_and_quoted_addresses(message: str, secret: str) -> None:
    """Issue 11, finding 4: the fragments ``redact()`` used to let through."""
    assert secret not in alerts.redact(message)


def test_off_by_default(monkeypatch: pytest.MonkeyPatch, webhook: tuple[str, list[Any]]) -> None:
    for name in ("D365SYNC_ALERT_WEBHOOK_URL", "D365SYNC_ALERT_SMTP_CONN_ID", "D365SYNC_ALERT_EMAIL_TO"):
        monkeypatch.delenv(name, raising=False)
    assert not settings.alert_channels().enabled
    alerts.on_task_failure(_failure_context())
    assert webhook[1] == []


@pytest.mark.parametrize("fmt", ["generic", "slack", "teams"])
def test_failure_callback_posts_to_the_webhook(
    monkeypatch: pytest.MonkeyPatch, webhook: tuple[str, list[Any]], fmt: str
) -> None:
    url, bodies = webhook
    monkeypatch.setenv("D365SYNC_ALERT_WEBHOOK_URL", url)
    monkeypatch.setenv("D365SYNC_ALERT_WEBHOOK_FORMAT", fmt)
    alerts.on_task_failure(_failure_context())
    (body,) = bodies
    dumped = json.dumps(body)
    assert "sync_customers" in dumped and "load_erp" in dumped and "RuntimeError" in dumped
    assert not [leak for leak in LEAKS if leak in dumped], dumped
    assert ("@type" in body) == (fmt == "teams")


def test_failure_callback_sends_mail_through_the_smtp_provider(
    monkeypatch: pytest.MonkeyPatch, smtp: _Mailbox
) -> None:
    monkeypatch.setenv("D365SYNC_ALERT_SMTP_CONN_ID", "alert_smtp")
    monkeypatch.setenv("D365SYNC_ALERT_EMAIL_TO", "ops@example.org, oncall@example.org")
    monkeypatch.delenv("D365SYNC_ALERT_WEBHOOK_URL", raising=False)
    alerts.on_task_failure(_failure_context())
    ((rcpts, message),) = smtp.messages
    assert sorted(rcpts) == ["oncall@example.org", "ops@example.org"]
    assert message["Subject"] == "[d365sync] sync_customers: task failed"
    body = message.get_payload()[0].get_payload(decode=True).decode()
    assert "load_erp" in body and not [leak for leak in LEAKS if leak in body]


def test_deadline_callback_is_async_and_uses_both_channels(
    webhook: tuple[str, list[Any]], smtp: _Mailbox
) -> None:
    url, bodies = webhook
    channels = _channels(webhook_url=url, smtp_conn_id="alert_smtp", email_to=("ops@example.org",))
    context = {"dag_run": {"dag_id": "sync_orders", "dag_run_id": "scheduled__2026"}, "deadline": {}}
    alert = alerts.deadline_alert_from(context, "fallback")
    assert asyncio.run(alerts.asend(alert, channels)) == ["webhook", "smtp"]
    assert "sync_orders: run overran its deadline" in bodies[0]["text"]
    assert smtp.messages[0][1]["Subject"] == "[d365sync] sync_orders: run overran its deadline"


def test_deadline_callback_reads_settings(
    monkeypatch: pytest.MonkeyPatch, webhook: tuple[str, list[Any]]
) -> None:
    monkeypatch.setenv("D365SYNC_ALERT_WEBHOOK_URL", webhook[0])
    asyncio.run(alerts.on_deadline_missed(context=None, dag_id="sync_products"))
    assert webhook[1][0]["alert"]["dag_id"] == "sync_products"


def test_a_broken_channel_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    channels = _channels(webhook_url="http://127.0.0.1:9/nowhere")
    assert alerts.send(alerts.failure_alert(_failure_context()), channels) == []
    assert "alert via webhook failed" in caplog.text
