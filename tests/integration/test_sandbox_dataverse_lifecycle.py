"""Stopping the sandbox: SIGTERM exits 0 with ``stopped``, even with idle keep-alive clients."""

from __future__ import annotations

import pytest
import requests

from tests.sandbox_fixtures import DataverseSandbox


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_sigterm_with_idle_keep_alive_connection_stops_cleanly(dataverse_sandbox_factory, tls: bool):
    sandbox: DataverseSandbox = dataverse_sandbox_factory(tls=tls)
    with requests.Session() as session:
        # Leave a pooled keep-alive connection idle: over TLS, uvicorn's close would wait for the
        # client's close_notify until the graceful-shutdown timeout ran out.
        response = session.get(
            f"{sandbox.api_url}/WhoAmI", headers=sandbox.headers(), verify=sandbox.verify, timeout=30
        )
        assert response.status_code == 200
        assert response.headers.get("Connection", "keep-alive").lower() != "close"
        assert sandbox.stop() == 0
    log = sandbox.log()
    assert log.rstrip().splitlines()[-1] == "stopped", log[-2000:]
    assert "timeout graceful shutdown exceeded" not in log, log[-2000:]
    assert sandbox.stop() is None  # already stopped: nothing to do
