"""Run the Dataverse sandbox as a child process and talk to it: for tests, benchmarks and demos.

:class:`DataverseSandbox` starts ``d365sync sandbox dataverse`` on a free loopback port, waits for
its ``ready`` line, and offers the addresses (``base_url``, ``api_url``, ``authority`` …), a token
helper and the ``/_sandbox/*`` admin calls (counters, knobs). ``stop()`` ends it by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from d365sync.dynamics import DynamicsClient

DEFAULT_CLIENT_ID = "51f81489-12ee-4a9e-aaae-a2591f45987d"
DEFAULT_CLIENT_SECRET = "sandbox-secret"
DEFAULT_TENANT = "sandbox-tenant"
READY_TIMEOUT = 90.0


class DataverseSandbox:
    """A running sandbox process plus helpers to talk to it."""

    def __init__(
        self,
        data_dir: Path,
        *,
        seed: int = 0,
        tls: tuple[Path, Path, Path] | None = None,
        retention_seconds: float | None = None,
        token_lifetime: int | None = None,
        limits: dict[str, Any] | None = None,
        knobs: dict[str, Any] | None = None,
        record_cost_ms: float | None = None,
        request_cost_ms: float | None = None,
        tenant: str = DEFAULT_TENANT,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        env_url: str | None = None,
        extra_users: list[dict[str, str]] | None = None,
    ) -> None:
        self.data_dir = data_dir
        if extra_users:  # more application users (``sandbox.json``): other integrations, people
            (data_dir / "sandbox.json").write_text(json.dumps({"users": extra_users}), encoding="utf-8")
        # The environment URL clients use and tokens are issued for (``--env-url``), when it is not
        # the server's own address: e.g. https://contoso.crm.dynamics.com reached through a proxy.
        self.env_url = env_url.rstrip("/") if env_url else None
        self.tenant, self.client_id, self.client_secret = tenant, client_id, client_secret
        self.ca_bundle: str | None = str(tls[0]) if tls else None
        self._tls = tls
        self._args = self._build_args(seed, retention_seconds, token_lifetime, limits, knobs)
        for flag, cost in (("--record-cost-ms", record_cost_ms), ("--request-cost-ms", request_cost_ms)):
            if cost is not None:  # simulated server time (ms) per record written / per API request
                self._args += [flag, str(cost)]
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = data_dir / "sandbox.log"
        self.port = 0
        self.base_url = ""
        self._token: tuple[str, float] | None = None
        self.start()

    def _build_args(
        self,
        seed: int,
        retention_seconds: float | None,
        token_lifetime: int | None,
        limits: dict[str, Any] | None,
        knobs: dict[str, Any] | None,
    ) -> list[str]:
        args = [
            "--data",
            str(self.data_dir),
            "--tenant",
            self.tenant,
            "--client-id",
            self.client_id,
            "--client-secret",
            self.client_secret,
        ]
        if seed:
            args += ["--seed", str(seed)]
        if self.env_url:
            args += ["--env-url", self.env_url]
        if self._tls:
            args += ["--tls-cert", str(self._tls[1]), "--tls-key", str(self._tls[2])]
        if retention_seconds is not None:
            args += ["--retention-seconds", str(retention_seconds)]
        if token_lifetime is not None:
            args += ["--token-lifetime", str(token_lifetime)]
        for name, flag in (
            ("requests", "--limit-requests"),
            ("window_seconds", "--limit-window"),
            ("concurrency", "--limit-concurrency"),
            ("execution_time_ms", "--limit-execution-ms"),
            ("execution_window_seconds", "--limit-execution-window"),
        ):
            if limits and name in limits:
                args += [flag, str(limits[name])]
        if knobs:
            args += ["--knobs", json.dumps(knobs)]
        return args

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or restart) the process on ``self.port`` (0 = any) and wait for ``ready``."""
        command = [
            sys.executable,
            "-m",
            "d365sync.cli",
            "sandbox",
            "dataverse",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self._args,
        ]
        offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            text = self._log_path.read_text(errors="replace")[offset:]
            for line in text.splitlines():
                if line.startswith("ready "):
                    self.base_url = line.split(" ", 1)[1].strip()
                    self.port = int(self.base_url.rsplit(":", 1)[1])
                    return
            if self._process.poll() is not None:
                raise RuntimeError(f"sandbox exited with {self._process.returncode}:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sandbox not ready after {READY_TIMEOUT}s:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM the process by pid; SIGKILL if it does not exit within 10 s.

        Returns the exit code (0 after a clean shutdown), or None if nothing was running.
        """
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is not None:
            return process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start again with the same port and data directory."""
        self.stop()
        self._token = None
        self.start()

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (benchmarks read its CPU time from ``/proc``)."""
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    # -- addresses -------------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/data/v9.2"

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.tenant}"

    @property
    def token_url(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    @property
    def scope(self) -> str:
        return f"{self.env_url or self.base_url}/.default"

    @property
    def verify(self) -> str | bool:
        """The ``verify=`` value for requests (the CA bundle under TLS)."""
        return self.ca_bundle or True

    # -- clients -----------------------------------------------------------------------------------
    def airflow_connection(self) -> dict[str, Any]:
        """The ``dynamics`` Airflow connection for this sandbox, as ``AIRFLOW_CONN_DYNAMICS_DEFAULT``
        takes it (JSON): the default app user, and the CA bundle under TLS."""
        extra: dict[str, Any] = {"tenant_id": self.tenant, "authority_host": self.base_url}
        if self.ca_bundle:
            extra["ca_bundle"] = self.ca_bundle
        return {
            "conn_type": "dynamics",
            "host": self.base_url,
            "login": self.client_id,
            "password": self.client_secret,
            "extra": extra,
        }

    def client(self, **overrides: Any) -> DynamicsClient:
        """A :class:`~d365sync.dynamics.DynamicsClient` for the default app user (close it);
        ``overrides`` are further :class:`~d365sync.dynamics.DynamicsConfig` fields (another
        ``client_id`` / ``client_secret`` of ``extra_users`` acts as that user)."""
        from d365sync.dynamics import DynamicsClient, DynamicsConfig

        fields = {
            "environment_url": self.base_url,
            "tenant_id": self.tenant,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "authority_host": self.base_url,
            "verify": self.verify,
        }
        return DynamicsClient(DynamicsConfig(**(fields | overrides)))

    def client_as(self, user: Mapping[str, str]) -> DynamicsClient:
        """A client acting as another application user of ``extra_users`` (``client_id``,
        ``client_secret``), e.g. :data:`~d365sync.sandbox.dataverse.config.PERSON_USER`."""
        return self.client(client_id=user["client_id"], client_secret=user["client_secret"])

    # -- helpers -----------------------------------------------------------------------------------
    def token(self, *, fresh: bool = False) -> str:
        """A client-credentials access token for the default app (cached until near expiry)."""
        if not fresh and self._token and self._token[1] > time.time() + 30:
            return self._token[0]
        response = requests.post(
            self.token_url,
            data={
                "grant_type": "client_credentials",
                "client_id": self.client_id,
                "client_secret": self.client_secret,
                "scope": self.scope,
            },
            verify=self.verify,
            timeout=30,
        )
        response.raise_for_status()
        body = response.json()
        self._token = (body["access_token"], time.time() + body["expires_in"])
        return body["access_token"]

    def headers(self, **extra: str) -> dict[str, str]:
        """Standard Dataverse request headers with a bearer token."""
        return {
            "Authorization": f"Bearer {self.token()}",
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
            **extra,
        }

    def counters(self) -> dict[str, Any]:
        return self._admin("GET", "/_sandbox/counters")

    def webhooks(self, status: str | None = None, limit: int = 100) -> dict[str, Any]:
        """The webhook delivery log: counts by status and the newest ``limit`` deliveries."""
        query = f"?limit={limit}" + (f"&status={status}" if status else "")
        return self._admin("GET", f"/_sandbox/webhooks{query}")

    def reset_counters(self) -> None:
        self._admin("POST", "/_sandbox/counters/reset")

    def set_knobs(self, **knobs: Any) -> dict[str, Any]:
        """E.g. ``set_knobs(throttle_next=3, throttle_retry_after=1)``, ``expire_tokens_now=True``,
        ``record_cost_ms=2`` or ``limits={"execution_time_ms": 500}``."""
        return self._admin("POST", "/_sandbox/knobs", knobs)

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """An admin call; writes carry JSON and the client secret in the admin header."""
        headers = {"X-Sandbox-Admin-Secret": self.client_secret} if method != "GET" else {}
        if method != "GET" and body is None:
            body = {}
        response = requests.request(
            method, self.base_url + path, json=body, headers=headers, verify=self.verify, timeout=30
        )
        response.raise_for_status()
        return response.json()
