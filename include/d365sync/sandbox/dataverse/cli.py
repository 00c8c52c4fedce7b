"""``d365sync sandbox dataverse``: run the Dataverse Web API sandbox.

Binds the socket first (``--port 0`` picks a free port), so the printed URL is always the
real one, then serves with uvicorn.  uvicorn handles SIGINT/SIGTERM by finishing in-flight
requests (for at most :data:`GRACEFUL_SHUTDOWN_SECONDS`) and running the app's shutdown, which
closes the SQLite database; the process then prints ``stopped`` and exits 0.  Idle keep-alive
connections do not hold shutdown up, over TLS either (see :meth:`_Server.shutdown`).  The last
startup line is ``ready <base-url>``; test fixtures wait for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import uvicorn

from d365sync.sandbox.dataverse.config import (
    CONFIG_FILE,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT,
    build_config,
    load_file,
)

GRACEFUL_SHUTDOWN_SECONDS = 2
SECRET_ENV = "D365SYNC_SANDBOX_CLIENT_SECRET"  # off the command line, where `ps` shows it
"""How long SIGTERM/SIGINT waits for in-flight requests before cancelling them."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``dataverse`` sub-command on ``d365sync sandbox``."""
    parser = subparsers.add_parser(
        "dataverse",
        help="run the Dataverse Web API sandbox",
        description="A local Dataverse Web API + Entra token endpoint, persisted in SQLite.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument(
        "--data", type=Path, required=True, help="data directory (SQLite, keys, sandbox.json)"
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate (chain) for HTTPS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for HTTPS")
    parser.add_argument("--seed", type=int, default=0, help="seed N accounts (+ related rows) once")
    parser.add_argument("--tenant", help=f"tenant name (default {DEFAULT_TENANT})")
    parser.add_argument("--client-id", help=f"default app's client id (default {DEFAULT_CLIENT_ID})")
    parser.add_argument(
        "--client-secret",
        default=os.environ.get(SECRET_ENV) or None,
        help=f"default app's secret (default: ${SECRET_ENV}, else {DEFAULT_CLIENT_SECRET})",
    )
    parser.add_argument("--env-url", help="environment URL / token audience (default: the server's own URL)")
    parser.add_argument("--retention-seconds", type=float, help="change-tracking retention (default 7 days)")
    parser.add_argument("--token-lifetime", type=int, help="access-token lifetime in seconds (default 3600)")
    parser.add_argument("--limit-requests", type=int, help="requests per window per user (default 6000)")
    parser.add_argument("--limit-window", type=float, help="sliding window seconds (default 300)")
    parser.add_argument("--limit-concurrency", type=int, help="concurrent requests per user (default 52)")
    parser.add_argument(
        "--limit-execution-ms",
        type=int,
        help="combined server time per user per execution window, in ms (default 1200000)",
    )
    parser.add_argument(
        "--limit-execution-window", type=float, help="execution-time sliding window seconds (default 300)"
    )
    parser.add_argument(
        "--record-cost-ms",
        type=float,
        help="simulated server time per record written, in ms (default 0; parallel requests overlap)",
    )
    parser.add_argument(
        "--request-cost-ms", type=float, help="simulated server time per API request, in ms (default 0)"
    )
    parser.add_argument("--knobs", help="JSON test knobs, e.g. '{\"latency_ms\": 20}'")
    parser.set_defaults(func=run)
    return parser


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "requests": args.limit_requests,
        "window_seconds": args.limit_window,
        "concurrency": args.limit_concurrency,
        "execution_time_ms": args.limit_execution_ms,
        "execution_window_seconds": args.limit_execution_window,
    }
    return {k: v for k, v in values.items() if v is not None}


def _knobs(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--knobs`` JSON with the cost flags on top."""
    knobs: dict[str, Any] = json.loads(args.knobs) if args.knobs else {}
    for name in ("record_cost_ms", "request_cost_ms"):
        if getattr(args, name) is not None:
            knobs[name] = getattr(args, name)
    return knobs or None


class _Server(uvicorn.Server):
    """Prints the ready line once the socket is listening."""

    ready_line = ""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Shut down gracefully on SIGINT/SIGTERM and exit 0 (uvicorn would re-raise the signal)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            print(self.ready_line, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, without waiting on clients to answer a TLS close.

        uvicorn closes idle keep-alive connections (and busy ones once their response is sent)
        with ``transport.close()``.  Over TLS that sends our ``close_notify`` and then waits for the
        client's, which an idle pooled client never sends, so every connection would hold the
        shutdown up for the whole graceful timeout.  TLS does not require waiting for the peer's
        ``close_notify``, so connections whose close has started and whose data is flushed are
        aborted instead.
        """
        reaper = asyncio.create_task(self._abort_closing_tls()) if self.config.is_ssl else None
        try:
            await super().shutdown(sockets=sockets)
        finally:
            if reaper is not None:
                reaper.cancel()
                with suppress(asyncio.CancelledError):
                    await reaper

    async def _abort_closing_tls(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is None or not transport.is_closing():
                    continue
                # The TCP transport under the TLS one (best effort: asyncio internals).
                inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
                unsent = transport.get_write_buffer_size() + (inner.get_write_buffer_size() if inner else 0)
                if unsent == 0:
                    transport.abort()


def _masked(secret: str) -> str:
    """The secret is never printed (logs and CI output are widely readable): two chars, then *."""
    return secret[:2] + "*" * max(len(secret) - 2, 6) if len(secret) > 8 else "*" * 8


def _secret_source(args: argparse.Namespace) -> str:
    """Where the operator finds the real secret."""
    if args.client_secret:
        return f"--client-secret or ${SECRET_ENV}"
    if "client_secret" in load_file(args.data.resolve()):
        return f"client_secret in {args.data.resolve() / CONFIG_FILE}"
    return "the built-in default, see DEFAULT_CLIENT_SECRET in d365sync.sandbox.dataverse.config"


def run(args: argparse.Namespace) -> int:
    from d365sync.sandbox.dataverse.app import create_app
    from d365sync.sandbox.dataverse.seed import ensure_currencies, ensure_users, seed

    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    scheme = "https" if args.tls_cert else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    base_url = f"{scheme}://{host}:{port}"
    config = build_config(
        args.data.resolve(),
        tenant=args.tenant,
        client_id=args.client_id,
        client_secret=args.client_secret,
        env_url=args.env_url,
        retention_seconds=args.retention_seconds,
        token_lifetime=args.token_lifetime,
        limits=_limits(args),
        knobs=_knobs(args),
        seed=args.seed,
    )
    config.env_url = (config.env_url or base_url).rstrip("/")
    app = create_app(config)
    sandbox = app.state.sandbox
    ensure_currencies(sandbox.store, config.users[0])
    ensure_users(sandbox.store, config.users, config.tenant)
    if args.seed:
        seeded = seed(sandbox.store, config.users[0], args.seed)
        print(f"seeded {args.seed} accounts" if seeded else "data directory already seeded", flush=True)
    user = config.users[0]
    print(
        "Dataverse sandbox\n"
        f"  url:           {base_url}\n"
        f"  api:           {base_url}/api/data/v9.2\n"
        f"  env url:       {config.env_url}  (scope {config.env_url}/.default)\n"
        f"  tenant:        {config.tenant}  (authority {base_url}/{config.tenant})\n"
        f"  client id:     {user.client_id}\n"
        f"  client secret: {_masked(user.client_secret)}  ({_secret_source(args)})\n"
        f"  data dir:      {config.data_dir}",
        flush=True,
    )
    uv_config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
        ssl_keyfile=str(args.tls_key) if args.tls_key else None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _Server(uv_config)
    server.ready_line = f"ready {base_url}"
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("stopped", flush=True)
    return 0
