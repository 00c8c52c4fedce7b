"""Pytest fixtures that run the Dataverse Web API sandbox as a real uvicorn subprocess.

Use ``dataverse_sandbox`` (HTTP, 50 seeded accounts) or ``dataverse_sandbox_tls`` (HTTPS with a
throw-away trustme CA; certificate for 127.0.0.1 and localhost) when the shared, session-wide
instance is enough, or ``dataverse_sandbox_factory(**options)`` for a private one::

    def test_something(dataverse_sandbox_factory):
        sandbox = dataverse_sandbox_factory(seed=20_000, limits={"requests": 10})
        slow = dataverse_sandbox_factory(record_cost_ms=2, limits={"execution_time_ms": 5_000})
        token = sandbox.token()
        requests.get(f"{sandbox.api_url}/accounts", headers=sandbox.headers(), verify=sandbox.verify)

A :class:`DataverseSandbox` exposes ``base_url``, ``api_url`` (``…/api/data/v9.2``), ``tenant``,
``client_id``, ``client_secret``, ``authority`` (``base_url/tenant``), ``scope``, ``ca_bundle`` (PEM
path or None), ``verify`` (for requests), ``data_dir``, ``token()``, ``headers()``, ``counters()``,
``reset_counters()``, ``set_knobs(**kw)``, ``webhooks()`` (the webhook delivery log), ``restart()``
(same port and data) and ``stop()``.
Processes are stopped by pid (SIGTERM, then SIGKILL) at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from d365sync.sandbox.dataverse.process import DataverseSandbox

SandboxFactory = Callable[..., DataverseSandbox]


@pytest.fixture(scope="session")
def dataverse_tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA PEM, server cert chain PEM, server key PEM) for 127.0.0.1 and localhost."""
    import trustme

    folder = tmp_path_factory.mktemp("dataverse-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = (folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths[1]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    return paths


@pytest.fixture(scope="session")
def dataverse_sandbox_factory(
    tmp_path_factory: pytest.TempPathFactory, dataverse_tls_files: tuple[Path, Path, Path]
) -> Iterator[SandboxFactory]:
    """Start private sandboxes: ``factory(seed=…, tls=True, retention_seconds=…, limits=…, …)``."""
    started: list[DataverseSandbox] = []

    def make(*, tls: bool = False, **options: Any) -> DataverseSandbox:
        sandbox = DataverseSandbox(
            tmp_path_factory.mktemp("dataverse"), tls=dataverse_tls_files if tls else None, **options
        )
        started.append(sandbox)
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


@pytest.fixture(scope="session")
def dataverse_sandbox(dataverse_sandbox_factory: SandboxFactory) -> DataverseSandbox:
    """A shared plain-HTTP sandbox seeded with 50 accounts (don't change its limits/knobs)."""
    return dataverse_sandbox_factory(seed=50)


@pytest.fixture(scope="session")
def dataverse_sandbox_tls(dataverse_sandbox_factory: SandboxFactory) -> DataverseSandbox:
    """A shared HTTPS sandbox (trustme CA in ``.ca_bundle``) seeded with 20 accounts."""
    return dataverse_sandbox_factory(seed=20, tls=True)
