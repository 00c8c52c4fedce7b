"""``make stop`` and ``make sync`` (``scripts/demo.sh``) without starting the real stack.

* ``stop``: with nothing running, with stale pid files, and with stand-in process trees (a fake
  ``airflow`` whose children include one in a session of its own and one that ignores SIGTERM,
  and a fake sandbox): exit 0, says what it stopped, leaves nothing running.
* ``sync`` with the demo up: triggers manual runs through the REST API of the running api-server
  (here a stand-in speaking the same routes), waits for them, prints the summary table, exits 0
  (1 when a run failed), and never creates or opens a metadata DB in the demo's ``AIRFLOW_HOME``.
* The runner's REST client (``d365sync.airflow.runner --api``) against the same stand-in.

The real stack is exercised by hand (``make demo`` / ``make sync`` / ``make stop``) and by the
browser and deploy tests; starting ``airflow standalone`` here would cost minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from d365sync.airflow import runner

REPO = Path(__file__).resolve().parents[2]
DEMO_SH = REPO / "scripts" / "demo.sh"
VENV_BIN = Path(sys.executable).parent
ENTITY_DAGS = runner.resolve_dag_ids([])


def demo_sh(demo: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "DEMO_DIR": str(demo), "VENV": str(VENV_BIN.parent), **env}
    return subprocess.run(
        ["bash", str(DEMO_SH), *args], env=environ, capture_output=True, text=True, timeout=timeout
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of this test counts as gone
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False


# --- make stop ------------------------------------------------------------------------------------


def test_stop_with_nothing_running_exits_0_and_says_so(tmp_path: Path) -> None:
    done = demo_sh(tmp_path / "demo", "stop")
    assert done.returncode == 0, done.stderr
    assert "nothing to stop" in done.stdout


def test_stop_removes_stale_pid_files(tmp_path: Path) -> None:
    pids = tmp_path / "demo" / "pids"
    pids.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "300"])  # a live pid that is not the demo's (pid reuse)
    try:
        (pids / "airflow.pid").write_text(f"{sleeper.pid}\n")
        (pids / "dataverse.pid").write_text("999999999\n")
        done = demo_sh(tmp_path / "demo", "stop")
        assert done.returncode == 0, done.stderr
        assert "airflow: not running (stale pid file" in done.stdout
        assert "dataverse: not running (stale pid file" in done.stdout
        assert alive(sleeper.pid), "stop killed a process that is not the demo's"
        assert list(pids.iterdir()) == []
    finally:
        sleeper.kill()
        sleeper.wait()


FAKE_AIRFLOW = """#!/usr/bin/env bash
# stands in for `airflow standalone`: children in its session, one in a session of its own, one
# that ignores SIGTERM; writes their pids for the test
sleep 300 & echo $! >> "$1"
setsid sleep 301 & echo $! >> "$1"
bash -c 'trap "" TERM; echo $$ >> "$0"; exec sleep 302' "$1" &  # SIGTERM stays ignored
wait
"""


def test_stop_ends_every_process_the_demo_started(tmp_path: Path) -> None:
    demo, bin_dir = tmp_path / "demo", tmp_path / "bin"
    (demo / "pids").mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "airflow").write_text(FAKE_AIRFLOW)
    (bin_dir / "airflow").chmod(0o755)
    children = tmp_path / "children"
    airflow = subprocess.Popen([str(bin_dir / "airflow"), str(children)], start_new_session=True)
    # the sandbox's command line, as start runs it
    sandbox = subprocess.Popen(
        ["bash", "-c", "exec -a 'python d365sync sandbox dataverse --port 0' sleep 300"],
        start_new_session=True,
    )
    (demo / "pids" / "airflow.pid").write_text(f"{airflow.pid}\n")
    (demo / "pids" / "dataverse.pid").write_text(f"{sandbox.pid}\n")
    try:
        deadline = time.monotonic() + 30
        while len(children.read_text().split() if children.exists() else []) < 3:
            assert time.monotonic() < deadline, "the fake airflow did not start its children"
            time.sleep(0.1)
        family = [airflow.pid, sandbox.pid, *map(int, children.read_text().split())]

        # a narrow COLUMNS (a terminal, or xdist's longer temp paths) must not cut the command
        # line that tells the demo's airflow from a reused pid
        done = demo_sh(demo, "stop", DEMO_STOP_GRACE="2", COLUMNS="40")

        assert done.returncode == 0, done.stdout + done.stderr
        assert f"stopped airflow (pid {airflow.pid}): 4 processes, 1 process killed after 2 s" in done.stdout
        assert f"stopped dataverse (pid {sandbox.pid}): 1 process" in done.stdout
        airflow.wait(timeout=10)
        sandbox.wait(timeout=10)
        assert [p for p in family if alive(p)] == []
        assert list((demo / "pids").iterdir()) == []
        again = demo_sh(demo, "stop")
        assert again.returncode == 0 and "nothing to stop" in again.stdout
    finally:
        for proc in (airflow, sandbox):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# --- make sync through a running Airflow -----------------------------------------------------------


@dataclass
class FakeAirflow:
    """The REST routes ``runner --api`` uses; each poll moves a run one state on."""

    fail: set[str] = field(default_factory=set)
    paused: set[str] = field(default_factory=set)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    triggered: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    password: str = "s3cret"
    busy: dict[str, int] = field(default_factory=dict)  # dag_id → 500s before a trigger goes through
    committed_busy: set[str] = field(default_factory=set)  # the first 500 comes after the commit

    def handle(self, method: str, path: str, body: Any, auth: str | None) -> tuple[int, Any]:
        if path == "/api/v2/monitor/health":
            return 200, {"metadatabase": {"status": "healthy"}, "scheduler": {"status": "healthy"}}
        if path == "/auth/token":
            ok = body == {"username": "admin", "password": self.password}
            return (201, {"access_token": "jwt"}) if ok else (401, {"detail": "bad login"})
        if auth != "Bearer jwt":
            return 401, {"detail": "not authenticated"}
        parts = path.removeprefix("/api/v2/dags/").split("/")
        dag_id = parts[0]
        if len(parts) == 1:
            return 200, {"dag_id": dag_id, "is_paused": dag_id in self.paused}
        if len(parts) == 2 and method == "POST":
            run_id = body.get("dag_run_id") or f"manual__{dag_id}"
            if run_id in self.runs:
                return 409, {"detail": f"DAG run {run_id} already exists"}
            busy = self.busy.get(dag_id, 0)
            if busy and dag_id not in self.committed_busy:
                self.busy[dag_id] = busy - 1
                return 500, {"detail": {"reason": "Database error"}}
            self.triggered.append((dag_id, body))
            self.runs[run_id] = {"dag_run_id": run_id, "state": "queued", "polls": 0}
            if busy:  # committed, then the answer failed
                self.busy[dag_id] = busy - 1
                return 500, {"detail": {"reason": "Database error"}}
            return 200, {"dag_run_id": run_id, "state": "queued"}
        run = self.runs[parts[2]]
        if len(parts) == 3:
            run["polls"] += 1
            if run["polls"] >= 2:
                run["state"] = "failed" if dag_id in self.fail else "success"
            elif run["state"] == "queued":
                run["state"] = "running"
            times = {"start_date": "2026-01-01T00:00:00Z", "end_date": "2026-01-01T00:00:12.5Z"}
            return 200, {"dag_run_id": run["dag_run_id"], "state": run["state"], **times}
        if parts[3] == "taskInstances" and len(parts) == 4:
            final = "failed" if dag_id in self.fail else "success"
            tis = [
                {"task_id": "validate", "state": final},
                {"task_id": "report", "state": "success"},
                {"task_id": "sync_events", "state": "skipped"},  # the lane route did not take
            ]
            return 200, {"task_instances": tis, "total_entries": 3}
        if path.endswith("/taskInstances/report/xcomEntries/return_value"):
            if dag_id in self.fail:
                return 404, {"detail": "XCom entry not found"}
            report = {"counts": {"extracted_erp": 7, "erp_create": 2}, "resolutions": {"owner_wins": 1}}
            return 200, {"key": "return_value", "value": json.dumps(report)}
        return 404, {"detail": f"no route {method} {path}"}

    def transport(self) -> httpx.MockTransport:
        def respond(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content) if request.content else None
            status, answer = self.handle(
                request.method, request.url.path, body, request.headers.get("Authorization")
            )
            return httpx.Response(status, json=answer)

        return httpx.MockTransport(respond)


def api_args(tmp_path: Path, *extra: str) -> list[str]:
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"admin": "s3cret", "viewer": "x"}))
    return ["--api", "http://airflow.test", "--passwords", str(passwords), "--poll", "0", *extra]


def test_runner_api_triggers_each_entity_dag_waits_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAirflow()
    assert runner.main(api_args(tmp_path), transport=fake.transport()) == 0
    assert [d for d, _ in fake.triggered] == ENTITY_DAGS  # parents first, the one ordering
    assert all(b["logical_date"] is None and b["conf"] == {} for _, b in fake.triggered)
    out = capsys.readouterr().out
    assert "| sync_customers | success | 12.5 | 0/7 |" in out
    assert "owner_wins: 1" in out


def test_runner_api_exits_1_and_names_the_failed_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAirflow(fail={"sync_products"})
    assert runner.main(api_args(tmp_path, "customers", "products"), transport=fake.transport()) == 1
    out = capsys.readouterr().out
    assert "| sync_products | failed |" in out
    # the runner's own run id; the skipped lane is not a problem worth naming
    assert "sync_products failed: {'validate': 'failed'} (run manual__20" in out


def test_runner_api_triggers_again_when_the_metadata_db_is_busy_and_never_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLite metadata DB busy with the scheduler answers 500 "Database error": the runner asks
    again under the same run id, and a POST that had committed before its 500 is not repeated."""
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)  # the back-off, not the subject
    fake = FakeAirflow(busy={"sync_customers": 2, "sync_orders": 1}, committed_busy={"sync_orders"})
    assert runner.main(api_args(tmp_path, "customers", "orders"), transport=fake.transport()) == 0
    assert [d for d, _ in fake.triggered] == ["sync_customers", "sync_orders"]  # one run each
    assert sorted(fake.runs) == sorted(b["dag_run_id"] for _, b in fake.triggered)
    err = capsys.readouterr().err
    assert err.count("trigger answered HTTP 500; again in") == 3


def test_runner_api_does_not_trigger_a_paused_dag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeAirflow(paused={"sync_orders"})
    assert runner.main(api_args(tmp_path, "orders"), transport=fake.transport()) == 1
    assert fake.triggered == []
    assert "paused in Airflow, not triggered" in capsys.readouterr().err


def test_runner_api_reports_a_refused_login(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeAirflow(password="other")
    assert runner.main(api_args(tmp_path, "customers"), transport=fake.transport()) == 1
    assert "login as admin refused: HTTP 401" in capsys.readouterr().err


@pytest.fixture
def fake_api() -> Iterator[tuple[FakeAirflow, int]]:
    """The stand-in behind a real HTTP port, for the script."""
    fake = FakeAirflow()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            path = self.path.split("?")[0]
            status, answer = fake.handle(self.command, path, body, self.headers.get("Authorization"))
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_sync_with_the_demo_up_goes_through_its_api_and_never_opens_its_metadata_db(
    tmp_path: Path, fake_api: tuple[FakeAirflow, int]
) -> None:
    fake, port = fake_api
    demo, home = tmp_path / "demo", tmp_path / "airflow-home"
    (demo / "pids").mkdir(parents=True)
    home.mkdir()
    (home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps({"admin": "s3cret"}))
    # the settings start wrote for the running demo
    (demo / "airflow.env").write_text(
        f"export AIRFLOW_HOME={home}\n"
        f"export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///{home}/airflow.db\n"
        f"export AIRFLOW__CORE__DAGS_FOLDER={REPO}/dags\n"
        f"export AIRFLOW__API__PORT={port}\n"
        f"export PATH={VENV_BIN}:$PATH\n"
    )
    standalone = subprocess.Popen(
        ["bash", "-c", "exec -a 'python airflow standalone' sleep 300"], start_new_session=True
    )
    (demo / "pids" / "airflow.pid").write_text(f"{standalone.pid}\n")
    try:
        done = demo_sh(demo, "sync", "customers", timeout=300)
    finally:
        os.killpg(standalone.pid, signal.SIGKILL)
        standalone.wait()

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"demo running: triggering manual runs through http://127.0.0.1:{port}" in done.stdout
    assert "| sync_customers | success |" in done.stdout
    assert [d for d, _ in fake.triggered] == ["sync_customers"]
    assert not (home / "airflow.db").exists()
    assert not (demo / "airflow-sync").exists()  # the offline path was not taken
